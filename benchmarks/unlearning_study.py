"""The unlearning study: every demo scenario on every corpus over several training seeds, and the targets.

    python -m benchmarks.unlearning_study --out benchmarks/results/unlearning-study \
        --cache runs/study-cache [--corpora bbc_news rotten_tomatoes debates_2016] \
        [--scenarios class noisy random] [--seeds 0 1 2] \
        [--models-only | --aggregate-only | --rescore | --methods M ...]

Each (corpus, scenario, seed) is one ``run_demo`` (the default, calibrated ``unlearn`` settings
for DeepCUT and every baseline) into ``<out>/<corpus>/<scenario>-seed<seed>/``; a finished one
is skipped on a rerun (``--rerun`` runs the methods again on the cached models; ``--methods``
only the ones named, into the existing reports). The forget set
is the same for every seed (``data_seed`` 0): the seeds vary training only, so the spread is the
training noise of one deletion request. ``study.json`` and ``study.md`` hold the mean and
standard deviation over seeds of every figure, and each target as met or missed.
"""
import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from deepcut_fast.unlearning.compare import METHODS_COMPARED, THREE_PLACES, rescored, write_report
from deepcut_fast.unlearning.data import CORPORA
from deepcut_fast.unlearning.demo import METHOD_ORDER, SCENARIOS, DemoOptions, report_title, run_demo, train_models
from deepcut_fast.unlearning.files import atomic_write, atomic_write_json

BASELINES = tuple(m for m in METHODS_COMPARED if m != "deepcut")


def code_version():
    """The commit the code is at, "-modified" when the package or the benchmark scripts differ
    from it; None outside a git checkout. Each report records it, so a table says which code
    made its figures."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "deepcut_fast", "benchmarks/*.py"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-modified" if changed else "")


def aggregate(reports):
    """{method: {figure: (mean, sd)}} over the seeds' summaries (the methods every report has)."""
    out = {}
    for method in (m for m in METHOD_ORDER if all(m in r["summary"] for r in reports)):
        rows = [r["summary"][method] for r in reports]
        keys = [k for k in rows[0] if all(isinstance(row.get(k), (int, float)) for row in rows)]
        out[method] = {k: (float(np.mean([row[k] for row in rows])),
                           float(np.std([row[k] for row in rows], ddof=1)) if len(rows) > 1 else 0.0) for k in keys}
    return out


def targets(scenario, reports):
    """DeepCUT's targets for one scenario, on the seed means: {name: (value, limit, met, floor)},
    ``floor`` being the same figure for the second retrained model (None where it means
    nothing: time, and the distance whose limit is that floor already): a limit below it asks
    for more agreement than two retrainings have."""
    def mean(method, key):
        return float(np.mean([r["summary"][method][key] for r in reports]))

    def gap(method, key, to="retrain"):  # mean over seeds of |method - retrain| on one figure
        return float(np.mean([abs(r["summary"][method][key] - r["summary"][to][key]) for r in reports]))

    def distance(method):
        return mean(method, "distance_to_retrain")

    def one_minus_cka(method):
        return 1 - mean(method, "cka_forget")

    baselines = [b for b in BASELINES if all(b in r["summary"] for r in reports)]
    checks = {}  # name: (figure of a method, limit, whether a floor means something)
    if scenario == "class":
        checks["forgotten-class recall, training docs (%)"] = (
            lambda m: mean(m, "forgotten_class_recall_train"), 2.0, True)
        checks["forgotten-class recall, test docs (%)"] = (
            lambda m: mean(m, "forgotten_class_recall_test"), 5.0, True)
        checks["other classes' test F1 gap to retrain (points)"] = (
            lambda m: gap(m, "other_classes_test_f1"), 0.5, True)
    elif scenario == "noisy":
        checks["wrong-label accuracy gap to retrain (points)"] = (lambda m: gap(m, "wrong_label_accuracy"), 3.0, True)
        checks["test F1 gap to retrain (points)"] = (lambda m: gap(m, "test_f1"), 1.0, True)
    else:
        checks["distance to retrain (2x retrain-vs-retrain)"] = (distance, 2 * distance("retrain_seed2"), False)
        checks["distance to retrain (the original's)"] = (distance, distance("original"), False)
        checks["test F1 gap to retrain (points)"] = (lambda m: gap(m, "test_f1"), 1.0, True)
        checks["minority-class test recall gap (points)"] = (lambda m: gap(m, "minority_recall_test"), 5.0, True)
    checks["time / retrain time"] = (lambda m: mean(m, "time_ratio"), 0.25, False)
    checks["distance to retrain (closest baseline)"] = (distance, min(distance(b) for b in baselines), True)
    for key in ("knn_forget", "knn_test"):  # representation: no baseline closer to retraining
        checks[f"{key} gap to retrain (closest baseline)"] = (
            lambda m, key=key: gap(m, key), min(gap(b, key) for b in baselines), True)
    checks["1 - CKA to retrain, forget set (closest baseline)"] = (one_minus_cka,
                                                                   min(one_minus_cka(b) for b in baselines), True)
    out = {}
    for name, (figure, limit, has_floor) in checks.items():
        value = figure("deepcut")
        out[name] = (value, limit, value <= limit, figure("retrain_seed2") if has_floor else None)
    return out


def markdown(study):
    lines = []
    for (corpus, scenario), entry in ((tuple(k.split("/")), v) for k, v in study.items()):
        stats = entry["aggregate"]
        keys = [k for k in stats["deepcut"] if k not in ("forget_accuracy", "retain_accuracy", "test_accuracy")]
        lines += [f"## {corpus}, scenario `{scenario}` (seeds {entry['seeds']}; mean ± sd over seeds)", "",
                  f"Code: {', '.join(entry['code_versions'])}.", "",
                  "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for method, row in stats.items():
            lines.append(f"| {method} | " + " | ".join(
                "" if k not in row else f"{row[k][0]:.3f} ± {row[k][1]:.3f}" if k in THREE_PLACES
                else f"{row[k][0]:.1f} ± {row[k][1]:.1f}" for k in keys) + " |")
        lines += ["", "| DeepCUT target | value | limit | met | 2nd retraining |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {v:.3f} | {limit:.3f} | {'yes' if ok else 'NO'} | "
                  f"{'' if floor is None else f'{floor:.3f}'} |"
                  for name, (v, limit, ok, floor) in entry["targets"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/unlearning-study")
    parser.add_argument("--cache", default="runs/study-cache", help="trained originals and retrained models")
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models-only", action="store_true", help="train and cache the models, run no method")
    parser.add_argument("--rerun", action="store_true", help="run the methods again where a report exists")
    parser.add_argument("--methods", nargs="+", choices=METHODS_COMPARED,
                        help="run only these methods again (on the cached models) and put their rows into the "
                             "existing reports, each timed against retraining in its own run")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run nothing: aggregate the reports that exist for the given seeds")
    parser.add_argument("--rescore", action="store_true",
                        help="run nothing: recompute the summaries of the reports that exist from their stored "
                             "details (after a change to a summarised figure), rewrite them, and aggregate")
    args = parser.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    study = {}
    for corpus, scenario in ((c, s) for c in args.corpora for s in args.scenarios):
        reports = []
        for seed in args.seeds:
            opts = DemoOptions(scenario=scenario, corpus=corpus, seed=seed)
            run_dir = out / corpus / f"{scenario}-seed{seed}"
            if args.aggregate_only or args.rescore:
                if (run_dir / "report.json").exists():
                    reports.append(json.loads((run_dir / "report.json").read_text()))
                    if args.rescore:
                        reports[-1] = rescored(reports[-1])
                        write_report(run_dir, reports[-1], report_title(reports[-1]))
                continue
            if args.models_only:
                train_models(opts, cache)
            elif args.methods and not (run_dir / "report.json").exists():
                print(f"skipped: {corpus} {scenario} seed {seed} has no report to rerun methods in", flush=True)
                continue
            elif (run_dir / "report.json").exists() and not (args.rerun or args.methods):
                reports.append(json.loads((run_dir / "report.json").read_text()))
            else:
                reports.append(run_demo(opts, run_dir, progress=False, cache=cache,
                                        extra=dict(code_version=code_version()), methods=args.methods))
            print(f"done: {corpus} {scenario} seed {seed}", flush=True)
        if reports:
            seeds = [r["options"]["seed"] for r in reports]
            versions = sorted({r.get("code_version") or "not recorded" for r in reports} |
                              {f"{m}: {v.get('code_version')}" for r in reports for m, v in r.get("reruns", {}).items()})
            study[f"{corpus}/{scenario}"] = dict(seeds=seeds, code_versions=versions, aggregate=aggregate(reports),
                                                 targets=targets(scenario, reports))
    if study:
        atomic_write_json(out / "study.json", study)
        atomic_write(out / "study.md", lambda f: f.write(markdown(study).encode()))
        print(markdown(study))


if __name__ == "__main__":
    main()
