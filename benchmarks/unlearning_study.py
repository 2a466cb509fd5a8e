"""The unlearning study: every demo scenario over several training seeds, and the issue's targets.

    python -m benchmarks.unlearning_study --out benchmarks/results/unlearning-study \
        --cache runs/study-cache [--scenarios class noisy random] [--seeds 0 1 2] [--models-only]

Each (scenario, seed) is one ``run_demo`` into ``<out>/<scenario>-seed<seed>/``; a finished one
is skipped on a rerun (pass ``--rerun`` to run the methods again on the cached models). The
forget set is the same for every seed (``data_seed`` 0): the seeds vary training only, so the
spread is the training noise of one deletion request. ``study.json`` and ``study.md`` hold the
mean and standard deviation over seeds of every figure, and each DeepCUT target as met or missed.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from deepcut_fast.unlearning.demo import METHOD_ORDER, SCENARIOS, DemoOptions, run_demo, train_models
from deepcut_fast.unlearning.files import atomic_write, atomic_write_json

BASELINES = ("original", "finetune_retain", "gradient_ascent", "gradient_difference", "random_relabel")


def aggregate(reports):
    """{method: {figure: (mean, sd)}} over the seeds' summaries."""
    out = {}
    for method in METHOD_ORDER:
        rows = [r["summary"][method] for r in reports]
        out[method] = {k: (float(np.mean([row[k] for row in rows])), float(np.std([row[k] for row in rows], ddof=1))
                           if len(rows) > 1 else 0.0) for k in rows[0]}
    return out


def targets(scenario, reports):
    """The issue's DeepCUT targets for one scenario, checked on the seed means: {name: (value, limit, met)}."""
    def mean(method, key, of=None):
        return float(np.mean([r["summary"][method][key] for r in reports]))

    def gap(method, key, to="retrain"):  # mean over seeds of |method - retrain| on one figure
        return float(np.mean([abs(r["summary"][method][key] - r["summary"][to][key]) for r in reports]))

    checks = {}
    if scenario == "class":
        checks["forgotten-class recall, training docs (%)"] = (mean("deepcut", "forgotten_class_recall_train"), 2.0)
        checks["forgotten-class recall, test docs (%)"] = (mean("deepcut", "forgotten_class_recall_test"), 5.0)
        checks["other classes' test F1 gap to retrain (points)"] = (gap("deepcut", "other_classes_test_f1"), 0.5)
    elif scenario == "noisy":
        checks["wrong-label accuracy gap to retrain (points)"] = (gap("deepcut", "wrong_label_accuracy"), 3.0)
        checks["test F1 gap to retrain (points)"] = (gap("deepcut", "test_f1"), 1.0)
    else:  # no further from retrain than the two retrain seeds are from each other
        for key in ("forget_f1", "test_f1", "mia_loss_auc"):
            checks[f"{key} gap to retrain (seed-to-seed gap)"] = (gap("deepcut", key), gap("retrain_seed2", key))
    # retraining's time measured under the same load as DeepCUT (see demo.retrain_time_same_run)
    checks["time / retrain time"] = (float(np.mean([r["summary"]["deepcut"]["seconds"] /
                                                    r["timing"]["retrain_seconds_same_run"] for r in reports])), 0.25)
    closest = min(mean(b, "distance_to_retrain") for b in BASELINES)
    checks["distance to retrain (closest baseline)"] = (mean("deepcut", "distance_to_retrain"), closest)
    return {name: (value, limit, value <= limit) for name, (value, limit) in checks.items()}


def markdown(study):
    lines = []
    for scenario, entry in study.items():
        stats = entry["aggregate"]
        keys = [k for k in stats["deepcut"] if k not in ("forget_accuracy", "retain_accuracy", "test_accuracy")]
        lines += [f"## Scenario `{scenario}` (seeds {entry['seeds']}; mean ± sd over seeds)", "",
                  "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for method, row in stats.items():
            lines.append(f"| {method} | " + " | ".join(
                f"{m:.3f} ± {s:.3f}" if k.startswith("mia") or k == "distance_to_retrain" else f"{m:.1f} ± {s:.1f}"
                for k, (m, s) in ((k, row[k]) for k in keys)) + " |")
        lines += ["", "| DeepCUT target | value | limit | met |", "|---|---|---|---|"]
        lines += [f"| {name} | {v:.3f} | {limit:.3f} | {'yes' if ok else 'NO'} |"
                  for name, (v, limit, ok) in entry["targets"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/unlearning-study")
    parser.add_argument("--cache", default="runs/study-cache", help="trained originals and retrained models")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models-only", action="store_true", help="train and cache the models, run no method")
    parser.add_argument("--rerun", action="store_true", help="run the methods again where a report exists")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run nothing: aggregate the reports that exist for the given seeds")
    args = parser.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    study = {}
    for scenario in args.scenarios:
        reports = []
        for seed in args.seeds:
            opts = DemoOptions(scenario=scenario, seed=seed)
            run_dir = out / f"{scenario}-seed{seed}"
            if args.aggregate_only:
                if (run_dir / "report.json").exists():
                    reports.append(json.loads((run_dir / "report.json").read_text()))
                continue
            if args.models_only:
                train_models(opts, cache)
            elif (run_dir / "report.json").exists() and not args.rerun:
                reports.append(json.loads((run_dir / "report.json").read_text()))
            else:
                reports.append(run_demo(opts, run_dir, progress=False, cache=cache))
            print(f"done: {scenario} seed {seed}", flush=True)
        if reports:
            seeds = [r["options"]["seed"] for r in reports]
            study[scenario] = dict(seeds=seeds, aggregate=aggregate(reports), targets=targets(scenario, reports))
    if study:
        atomic_write_json(out / "study.json", study)
        atomic_write(out / "study.md", lambda f: f.write(markdown(study).encode()))
        print(markdown(study))


if __name__ == "__main__":
    main()
