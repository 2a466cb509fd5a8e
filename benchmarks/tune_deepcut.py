"""DeepCUT settings tried on one scenario and seed, against the cached original and retrained models.

    python -m benchmarks.tune_deepcut --scenario class --seed 0 --cache runs/study-cache \
        --try "views=1" "retain_batch_size=16" "learning_rate=1e-4,steps=8"

Each ``--try`` is a comma-separated list of UnlearnConfig overrides of the scenario's default
(``scenario_config``); "" is the default itself (run when no ``--try`` is given). Prints one JSON line per setting with the
scenario's own figures, test F1, the distance to the retrained model, steps, seconds, the time
ratio to retraining (timed by a short probe in this run, as the study does) and the stopping
rule's checks as (step, forget accuracy, retain accuracy; null where the forget condition failed
and the retain sample was not measured).
"""
import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from deepcut_fast.unlearning.baselines import deepcut
from deepcut_fast.unlearning.demo import SCENARIOS, DemoOptions, retrain_time_same_run, scenario_figures, train_models
from deepcut_fast.unlearning.evaluation import gap_to, headline, predict_sets, report_from_predictions


def parse_overrides(text):
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = value if key in ("embedding", "forget_pull") else \
            None if value == "None" else int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS, default="class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/study-cache")
    parser.add_argument("--try", dest="tries", nargs="*", default=[])
    args = parser.parse_args()
    opts = DemoOptions(scenario=args.scenario, seed=args.seed)
    data, original, tokenizer, retrained = train_models(opts, Path(args.cache))
    def figures(model):
        preds = predict_sets(model, tokenizer, data["forget"], data["retain"], data["test"], max_length=opts.max_length)
        report = report_from_predictions(preds, data["train"].label_names)
        return report, scenario_figures(opts, preds, data, data["train"].label_names)

    gold, gold_scenario = figures(retrained[0][1])
    retrain_seconds = retrain_time_same_run(opts, data["retain"], tokenizer)["retrain_seconds_same_run"]
    print(json.dumps(dict(setting="retrain", retrain_seconds=round(retrain_seconds, 1), **gold_scenario,
                          test_f1=headline(gold)["test_f1"])), flush=True)
    for text in args.tries or [""]:
        config = replace(opts.unlearn, **parse_overrides(text))
        start = time.perf_counter()
        result = deepcut(copy.deepcopy(original), tokenizer, data["forget"], data["retain"], config, progress=False)
        seconds = time.perf_counter() - start
        report, extra = figures(result.model)
        print(json.dumps(dict(setting=text or "default", steps=len(result.history), seconds=round(seconds, 1),
                              time_ratio=round(seconds / retrain_seconds, 3), **{k: round(v, 2) for k, v in extra.items()},
                              test_f1=round(headline(report)["test_f1"], 2),
                              distance=round(gap_to(report, gold)["distance"], 4),
                              checks=[(r["step"], round(r["forget_accuracy"], 3), r.get("retain_accuracy"))
                                      for r in result.history if "forget_accuracy" in r])), flush=True)


if __name__ == "__main__":
    main()
