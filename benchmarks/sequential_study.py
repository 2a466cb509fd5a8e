"""Deletion requests in sequence: several requests, each applied to the model the last one left.

    python -m benchmarks.sequential_study --out benchmarks/results/sequential-study \
        --work runs/sequential-study --cache runs/study-cache [--corpora bbc_news rotten_tomatoes] \
        [--seeds 0 1 2] [--requests 5] [--fraction 0.02]

For each corpus and training seed: the demo's original model (fine-tuned on the fixed training
split, cached), then ``--requests`` disjoint random requests of ``--fraction`` of the training set
each (the same documents for every seed), each one a default ``deepcut-fast unlearn`` run with
``--previous`` set to the run before (calibrated on the held-out half of the test split, measured
on the other half). After request k the unlearned model is compared with a model retrained without
requests 1..k (the demo's recipe and seed, cached): accuracy on each earlier request's documents
(forgetting must not be reversed), test macro-F1, and time against retraining timed right after
the request. The chain of each sequence is verified with ``audit``. The run folders (data files,
models) live in ``--work``: each is a normal unlearn output, so a rerun resumes where it stopped; a finished request's figures are kept beside it
(``request-<k>.json``) and not measured again.
``--out`` receives ``study.json`` and ``study.md`` (the figures per request, mean and sd over
seeds, and the targets), every sequence's figures and its verified ``audit.jsonl``.
"""
import argparse
import json
import math
import random
from pathlib import Path

import numpy as np

from deepcut_fast.unlearning.audit import verify, write_chain
from deepcut_fast.unlearning.compare import retrain_time_same_run
from deepcut_fast.unlearning.data import CORPORA, write_table
from deepcut_fast.unlearning.demo import DemoOptions, cache_name, prepare_data, train_original, train_retrained
from deepcut_fast.unlearning.evaluation import classification_metrics, predict
from deepcut_fast.unlearning.files import atomic_write, atomic_write_json
from deepcut_fast.unlearning.job import run_unlearn_job
from deepcut_fast.unlearning.model import load_classifier
from deepcut_fast.unlearning.unlearner import UnlearnConfig

from benchmarks.unlearning_study import code_version


def requests_of(train, count, fraction, seed=0):
    """``count`` disjoint random sets of ``fraction`` of ``train`` (positions), fixed by ``seed``."""
    size = max(1, round(fraction * len(train)))
    order = random.Random(seed).sample(range(len(train)), count * size)
    return [sorted(order[k * size:(k + 1) * size]) for k in range(count)]


def accuracy_on(model, tokenizer, data, max_length):
    preds = predict(model, tokenizer, data, max_length=max_length)
    return float(np.mean(preds.predicted == preds.labels))


def run_sequence(corpus, seed, out: Path, cache: Path, count, fraction):
    """One corpus and seed: every request in turn; [per-request figures]."""
    opts = DemoOptions(scenario="random", corpus=corpus, seed=seed)
    train, heldout, test, _, _ = prepare_data(opts)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", train), ("heldout", heldout), ("test", test)):
        if not (out / f"{name}.csv").exists():
            write_table(data, out / f"{name}.csv")
    original, tokenizer = train_original(opts, train, train.subset([]), cache, progress=True)
    original_dir = cache / cache_name(opts, "original", seed, train)
    requests = requests_of(train, count, fraction)
    rows, previous, forgotten = [], None, []
    for k, positions in enumerate(requests, 1):
        forgotten = sorted(set(forgotten) | set(positions))
        run, row_file = out / f"request-{k}", out / f"request-{k}.json"
        if row_file.exists():  # measured by an earlier invocation: its retraining was timed then
            rows.append(json.loads(row_file.read_text()))
            previous = run
            continue
        retain = train.partition(forgotten)[1]
        retrained, retrain_seconds = train_retrained(opts, retain, cache, seed, progress=True)
        reference_dir = cache / cache_name(opts, "retrain", seed, retain)
        ids_file = out / f"request-{k}.txt"
        if not ids_file.exists():
            atomic_write(ids_file, lambda f, p=positions: f.write("".join(train.ids[i] + "\n" for i in p).encode()))
        report = run_unlearn_job(None if previous else original_dir, out / "train.csv", run,
                                 UnlearnConfig(max_length=opts.max_length, seed=seed), dict(ids_file=ids_file),
                                 test_path=out / "test.csv", heldout_path=out / "heldout.csv",
                                 columns=dict(id_column="id"), previous=previous, reference_dir=reference_dir,
                                 progress=False)
        timing = retrain_time_same_run(opts.recipe(), retain, tokenizer)
        sets = [train.subset(p) for p in requests[:k]]
        row = dict(request=k, forgotten=len(forgotten), seconds=report["seconds"],
                   time_ratio=report["seconds"] / timing["retrain_seconds_same_run"],
                   target_met=bool(report["calibration"]["met"]),
                   stopped_because=report["calibration"]["stopped_because"],
                   distance_to_retrain=report["gap_to_reference"]["distance"],
                   unlearned_test_f1=100 * report["metrics"]["test"]["macro_f1"],
                   unlearned_forget_acc=[100 * m["accuracy"] for m in report["metrics"]["requests"].values()])
        for name, model in (("retrained", retrained), ("original", original)):
            test_preds = predict(model, tokenizer, test, max_length=opts.max_length)
            row[f"{name}_test_f1"] = 100 * classification_metrics(test_preds, train.label_names)["macro_f1"]
            row[f"{name}_forget_acc"] = [100 * accuracy_on(model, tokenizer, s, opts.max_length) for s in sets]
        earlier = train.subset(sorted(set(forgotten) - set(positions))) if k > 1 else None
        if earlier is not None:  # every earlier request together: the reversal check's sample
            unlearned, _ = load_classifier(run / "model", train.label_names)
            row.update(unlearned_earlier_acc=100 * accuracy_on(unlearned, tokenizer, earlier, opts.max_length),
                       retrained_earlier_acc=100 * accuracy_on(retrained, tokenizer, earlier, opts.max_length),
                       earlier_size=len(earlier))
        row.update(retrain_seconds_same_run=timing["retrain_seconds_same_run"], code_version=code_version())
        atomic_write_json(row_file, row)
        rows.append(row)
        previous = run
        print(f"{corpus} seed {seed} request {k}: {row}", flush=True)
    records = verify(previous)
    return rows, records


def summarise(sequences):
    """{request k: {figure: (mean, sd)}} over seeds, and the targets per request."""
    out = {}
    for k in range(len(sequences[0])):
        rows = [seq[k] for seq in sequences]
        figures = {}

        def add(name, values):
            figures[name] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)

        add("time_ratio", [r["time_ratio"] for r in rows])
        add("distance_to_retrain", [r["distance_to_retrain"] for r in rows])
        add("test_f1_gap", [abs(r["unlearned_test_f1"] - r["retrained_test_f1"]) for r in rows])
        add("new_request_acc_unlearned", [r["unlearned_forget_acc"][-1] for r in rows])
        add("new_request_acc_retrained", [r["retrained_forget_acc"][-1] for r in rows])
        add("new_request_acc_original", [r["original_forget_acc"][-1] for r in rows])
        add("target_met", [float(r["target_met"]) for r in rows])
        targets = dict(test_f1_within_1=figures["test_f1_gap"][0] <= 1.0, time_within_025=figures["time_ratio"][0] <= 0.25)
        if "unlearned_earlier_acc" in rows[0]:
            add("earlier_acc_unlearned", [r["unlearned_earlier_acc"] for r in rows])
            add("earlier_acc_retrained", [r["retrained_earlier_acc"] for r in rows])
            # no reversal: earlier requests' accuracy at most the retrained model's plus one
            # standard error of that sample (binomial, at the retrained model's accuracy)
            p, n = figures["earlier_acc_retrained"][0] / 100, rows[0]["earlier_size"]
            slack = 100 * math.sqrt(max(p * (1 - p), 1e-4) / n)
            figures["reversal_limit"] = (figures["earlier_acc_retrained"][0] + slack, 0.0)
            targets["no_reversal"] = figures["earlier_acc_unlearned"][0] <= figures["reversal_limit"][0]
        out[k + 1] = dict(figures=figures, targets=targets)
    return out


def markdown(study):
    lines = []
    for corpus, entry in study.items():
        lines += [f"## {corpus} (seeds {entry['seeds']}; {entry['requests']} requests of {entry['fraction']:.0%} of "
                  "the training set; mean ± sd over seeds)", "",
                  "| request | forgotten | earlier requests' acc. unlearned / retrained (limit) | new request's acc. "
                  "unlearned / retrained / original | test F1 gap | distance to retrain | time / retrain | "
                  "calibrated target met | targets |", "|---" * 9 + "|"]
        for k, item in entry["summary"].items():
            f, t = item["figures"], item["targets"]

            def ms(name, digits=1):
                mean, sd = f[name]
                return f"{mean:.{digits}f} ± {sd:.{digits}f}"

            earlier = (f"{ms('earlier_acc_unlearned')} / {ms('earlier_acc_retrained')} "
                       f"({f['reversal_limit'][0]:.1f})") if "earlier_acc_unlearned" in f else "—"
            verdict = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in t.items())
            lines.append(f"| {k} | {entry['forgotten'][int(k) - 1]} | {earlier} | {ms('new_request_acc_unlearned')} / "
                         f"{ms('new_request_acc_retrained')} / {ms('new_request_acc_original')} | {ms('test_f1_gap')} | "
                         f"{ms('distance_to_retrain', 3)} | {ms('time_ratio', 2)} | {ms('target_met', 2)} | {verdict} |")
        lines += ["", f"Code: {', '.join(entry['code_versions'])}.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/sequential-study")
    parser.add_argument("--work", default="runs/sequential-study", help="the run folders")
    parser.add_argument("--cache", default="runs/study-cache")
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=["bbc_news", "rotten_tomatoes"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.02)
    args = parser.parse_args(argv)
    out, work, cache = Path(args.out), Path(args.work), Path(args.cache)
    study = {}
    for corpus in args.corpora:
        sequences = []
        for seed in args.seeds:
            rows, records = run_sequence(corpus, seed, work / corpus / f"seed{seed}", cache, args.requests,
                                         args.fraction)
            sequences.append(rows)
            (out / corpus / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            write_chain(out / corpus / f"seed{seed}", records)  # the verified record, as evidence
        atomic_write_json(out / corpus / "sequences.json", dict(seeds=args.seeds, sequences=sequences))
        study[corpus] = dict(seeds=args.seeds, requests=args.requests, fraction=args.fraction,
                             forgotten=[r["forgotten"] for r in sequences[0]], summary=summarise(sequences),
                             code_versions=sorted({str(r.get("code_version")) for seq in sequences for r in seq}))
        atomic_write_json(out / "study.json", study)
        atomic_write(out / "study.md", lambda f: f.write(markdown(study).encode()))
    print(markdown(study))


if __name__ == "__main__":
    main()
