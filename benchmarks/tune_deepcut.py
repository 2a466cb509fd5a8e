"""DeepCUT settings tried on one corpus, scenario and seed, against the cached original and retrained models.

    python -m benchmarks.tune_deepcut --corpus bbc_news --scenario class --seed 0 --cache runs/study-cache \
        --try "views=1" "retain_batch_size=16" "learning_rate=1e-4,budget=0.25"

Each ``--try`` is a comma-separated list of UnlearnConfig overrides of the default (calibrated,
``demo.default_config``); "" is the default itself (run when no ``--try`` is given). Every run
calibrates on the demo's held-out half and is measured on its test half. Prints one JSON line per
setting with the scenario's own figures, test F1, the distance to the retrained model, steps,
seconds, the time ratio to retraining (timed by a short probe in this run, as the study does),
and the calibration: its target, whether it was met, why the run stopped, and its checks as
(step, forget accuracy, membership AUC, held-out accuracy, [each class's held-out recall], undone, [what else
the check was: a dip, halfway back, the mean of the steps (with the last good state), a mean that broke the guard]).
"""
import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from deepcut_fast.unlearning.baselines import deepcut
from deepcut_fast.unlearning.data import CORPORA
from deepcut_fast.unlearning.calibration import request_kind
from deepcut_fast.unlearning.compare import request_figures, retrain_time_same_run
from deepcut_fast.unlearning.demo import SCENARIOS, DemoOptions, train_models
from deepcut_fast.unlearning.evaluation import gap_to, headline, predict_sets, report_from_predictions


def parse_overrides(text):
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = value if key in ("embedding", "forget_pull", "request", "precision", "check_precision") else \
            None if value == "None" else int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="bbc_news")
    parser.add_argument("--scenario", choices=SCENARIOS, default="class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/study-cache")
    parser.add_argument("--try", dest="tries", nargs="*", default=[])
    args = parser.parse_args()
    opts = DemoOptions(scenario=args.scenario, corpus=args.corpus, seed=args.seed)
    data, original, tokenizer, retrained = train_models(opts, Path(args.cache))
    names = data["train"].label_names
    request = request_kind(opts.unlearn.request, data["forget"], data["retain"])
    forgotten = [names[c] for c in sorted(set(data["forget"].labels) - set(data["retain"].labels))]
    true_labels = [data["notes"]["true_labels"][i] for i in data["forget"].ids] if opts.scenario == "noisy" else None

    def figures(model):
        preds = predict_sets(model, tokenizer, data["forget"], data["retain"], data["test"], max_length=opts.max_length)
        report = report_from_predictions(preds, names)
        return report, request_figures(request, preds, data, names, forgotten, true_labels)

    gold, gold_scenario = figures(retrained[0][1])
    retrain_seconds = retrain_time_same_run(opts.recipe(), data["retain"], tokenizer)["retrain_seconds_same_run"]
    print(json.dumps(dict(setting="retrain", retrain_seconds=round(retrain_seconds, 1), **gold_scenario,
                          test_f1=headline(gold)["test_f1"])), flush=True)
    for name, model in (("original", original), ("retrain_seed2", retrained[1][1])):  # the bounds a run must beat
        report, extra = figures(model)
        print(json.dumps(dict(setting=name, **{k: round(v, 2) for k, v in extra.items()},
                              test_f1=round(headline(report)["test_f1"], 2),
                              distance=round(gap_to(report, gold)["distance"], 4))), flush=True)
    for text in args.tries or [""]:
        config = replace(opts.unlearn, **parse_overrides(text))
        start = time.perf_counter()
        result = deepcut(copy.deepcopy(original), tokenizer, data["forget"], data["retain"], config, progress=False,
                         heldout=data["heldout"])
        seconds = time.perf_counter() - start
        report, extra = figures(result.model)
        print(json.dumps(dict(setting=text or "default", steps=len(result.history), seconds=round(seconds, 1),
                              time_ratio=round(seconds / retrain_seconds, 3), **{k: round(v, 2) for k, v in extra.items()},
                              test_f1=round(headline(report)["test_f1"], 2),
                              distance=round(gap_to(report, gold)["distance"], 4),
                              **calibration_summary(result.calibration))), flush=True)


def calibration_summary(calibration):
    if calibration is None:
        return {}
    checks = [(c["step"], round(c["forget_accuracy"], 3), round(c.get("mia_auc", float("nan")), 3),
               round(c["guard_accuracy"], 3), [round(v, 2) for k, v in c.items() if k.startswith("recall/")],
               bool(c.get("undone")),
               [k for k in ("dip", "halfway", "mean_of_steps", "with_last_good", "mean_broke_guard") if c.get(k)])
              for c in calibration["checks"]]
    return dict(aim=calibration["aim"], met=calibration["met"], stopped=calibration["stopped_because"], checks=checks,
                seconds_split={k: round(v, 1) for k, v in calibration["seconds_split"].items()},
                retrain_epoch_seconds_estimate=calibration["retrain_epoch_seconds_estimate"])


if __name__ == "__main__":
    main()
