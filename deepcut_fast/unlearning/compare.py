"""``deepcut-fast compare``: DeepCUT against retraining and every baseline, on a user's own files.

What it runs, all on the same forget set, settings, target, guard and time budget:
- the original model (the user's, or one ``deepcut-fast finetune`` made, which saves its recipe);
- a retrained reference: the recipe's pretrained base trained on the retain set only (the gold
  standard), and with a second seed unless told not to (how far two retrainings fall apart:
  the noise floor any method is judged against); both cached under ``<out>/cache``, named by a
  fingerprint of what they are trained on, so a rerun or another method list reuses them;
- DeepCUT and the baselines (``METHODS_COMPARED``).

Every model is measured on the forget, retain and test sets: logits (accuracy, F1, membership
inference), the request's own figures (a forgotten class's recall; a mislabelled sample's given
label), the encoder's representation (k-NN accuracy and linear CKA to the retrained model) and
relearning (accuracy on the forget set after a few fine-tuning steps on part of it). The test
file is split in two fixed halves unless ``--heldout`` is given: one sets the calibrated target
and guard, the other is what the report measures. ``report.json``, ``report.md`` and
``report.png`` (time beside distance to retraining) are written atomically.
"""
import copy
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from deepcut_fast.unlearning import baselines
from deepcut_fast.unlearning.calibration import request_kind
from deepcut_fast.unlearning.data import split
from deepcut_fast.unlearning.evaluation import (Predictions, classification_metrics, gap_to, headline, predict_sets,
                                                report_from_predictions)
from deepcut_fast.unlearning.files import atomic_write, atomic_write_json, claimed_folder, save_model_atomically
from deepcut_fast.unlearning.model import (default_model_path, is_decoder_only, load_classifier, quiet_loading,
                                          save_trained)
from deepcut_fast.unlearning.probes import reference_embeddings, relearn_curve, representation_figures
from deepcut_fast.unlearning.recipe import RECIPE_FILE, Recipe, saved_recipe
from deepcut_fast.unlearning.unlearner import UnlearnConfig

METHODS_COMPARED = ("deepcut", "finetune_retain", "gradient_ascent", "gradient_difference", "random_relabel", "scrub",
                    "salun", "npo")
REFERENCES = ("original", "retrain", "retrain_seed2")


def load_base(recipe: Recipe, label_names):
    """(model, tokenizer): the recipe's pretrained model with a new head for ``label_names``."""
    with quiet_loading():
        return load_classifier(recipe.base or default_model_path(), label_names)


def fit(model, tokenizer, data, recipe: Recipe, seed, steps=None, learning_rate=None, desc=None):
    """Cross-entropy training on ``data`` as the recipe says, in its precision (``steps`` and
    ``learning_rate`` override it); the UnlearnResult. A progress bar labelled ``desc`` when given."""
    cfg = UnlearnConfig(calibrate=False, steps=recipe.steps(len(data)) if steps is None else steps,
                        learning_rate=recipe.learning_rate if learning_rate is None else learning_rate,
                        retain_batch_size=recipe.batch_size, max_length=recipe.max_length, seed=seed,
                        precision=recipe.precision)
    return baselines.retrain(model, tokenizer, data.subset([]), data, cfg, progress=desc is not None, desc=desc)


def cached_model(directory: Path, label_names, build):
    """(model, tokenizer, seconds it took to train): loaded from ``directory``, or built with
    ``build() -> (model, tokenizer, seconds)`` and saved there atomically."""
    if not (directory / "config.json").exists():
        model, tokenizer, seconds = build()
        save_model_atomically(lambda folder: (save_trained(model, tokenizer, folder),
                                              (folder / "seconds.txt").write_text(f"{seconds}\n")), directory)
    model, tokenizer = load_classifier(directory, label_names)
    return model, tokenizer, float((directory / "seconds.txt").read_text())


def fingerprint(*parts):
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def retrained_models(recipe: Recipe, retain, cache: Path, second_seed=True, progress=False, prefix=""):
    """[(name, model, seconds)]: the recipe's base trained on ``retain`` with the recipe's seed
    ("retrain") and, with ``second_seed``, the next one ("retrain_seed2"); cached in ``cache``
    under a name that fingerprints the recipe and the retain set."""
    out = []
    for name, seed in (("retrain", recipe.seed), ("retrain_seed2", recipe.seed + 1))[:2 if second_seed else 1]:
        key = fingerprint(recipe.cache_key(), seed, retain.ids, retain.labels, retain.texts)
        directory = cache / f"retrain-{prefix}seed{seed}-{key}"

        def build(seed=seed):
            start = time.perf_counter()
            model, tokenizer = load_base(recipe, retain.label_names)
            model = fit(model, tokenizer, retain, recipe, seed, desc=f"retrain (seed {seed})" if progress else None).model
            return model, tokenizer, time.perf_counter() - start

        model, _, seconds = cached_model(directory, retain.label_names, build)
        out.append((name, model, seconds))
    return out


def retrain_step_seconds(recipe: Recipe, retain, tokenizer, steps=2):
    """Seconds per retraining step as the machine runs now: the mean of ``steps`` steps of the
    recipe's base on ``retain``, after one that warms up."""
    model, _ = load_base(recipe, retain.label_names)
    history = fit(model, tokenizer, retain, recipe, 0, steps=steps + 1).history
    return sum(h["seconds"] for h in history[1:]) / steps


def retrain_timing(recipe: Recipe, retain, step_seconds):
    """Retraining's time at ``step_seconds`` a step: the figures a time ratio divides by."""
    steps = recipe.steps(len(retain))
    return dict(retrain_step_seconds=step_seconds, retrain_steps=steps, retrain_seconds_same_run=step_seconds * steps)


def retrain_time_same_run(recipe: Recipe, retain, tokenizer, probe_steps=6):
    """Retraining's time as if it ran now (``retrain_timing`` of ``probe_steps`` timed steps).
    Cached models may have trained under another load, so time ratios use this."""
    return retrain_timing(recipe, retain, retrain_step_seconds(recipe, retain, tokenizer, probe_steps))


def request_figures(request, preds, sets, label_names, forgotten_classes=(), true_labels=None):
    """The request's own figures. class: the forgotten classes' recall on their training and test
    samples, and the other classes' test F1. mislabelled: accuracy on the given (wrong) labels
    and, when known, on the true ones."""
    if request == "mislabelled":
        forget = preds["forget"]
        out = dict(wrong_label_accuracy=100 * float((forget.predicted == forget.labels).mean()))
        if true_labels is not None:
            out["true_label_accuracy"] = 100 * float((forget.predicted == np.asarray(true_labels)).mean())
        return out
    if request != "class":
        return {}
    targets = [label_names.index(c) for c in forgotten_classes]
    test, forget = preds["test"], preds["forget"]
    in_class = np.isin(forget.labels, targets)
    others = ~np.isin(test.labels, targets)
    gone_test = np.isin(test.labels, targets)
    other_f1 = classification_metrics(Predictions(test.labels[others], test.probs[others]), label_names)["macro_f1"]
    return dict(forgotten_class_recall_train=100 * float((forget.predicted[in_class] == forget.labels[in_class]).mean()),
                forgotten_class_recall_test=100 * float((test.predicted[gone_test] == test.labels[gone_test]).mean())
                if gone_test.any() else float("nan"),
                other_classes_test_f1=100 * other_f1)


def compare_methods(original, tokenizer, sets, retrained, config: UnlearnConfig, recipe: Recipe,
                    methods=METHODS_COMPARED, true_labels=None, probes=True, progress=True, references=True):
    """Run ``methods`` from copies of ``original`` and measure every model. ``sets``: train,
    forget, retain, heldout and test TextDatasets; ``retrained``: [(name, model, seconds)].
    Returns the report (without writing it). ``references=False``: the original and retrained
    models are not measured and the report has no summary (rows for ``merged_report``)."""
    forget, retain, test = sets["forget"], sets["retain"], sets["test"]
    label_names = sets["train"].label_names
    request = request_kind(config.request, forget, retain)
    # every method: the same settings, target, guard and budget (a share of retraining as the recipe runs it)
    config = replace(config.for_request(request, is_decoder_only(original)), retrain_precision=recipe.precision,
                     retrain_epochs=recipe.epochs)
    config = config.on_device(next(original.parameters()).device)
    forgotten = [label_names[c] for c in sorted(set(forget.labels) - set(retain.labels))] if request == "class" else []
    probed = dict(forget=forget, retain=retain, test=test)
    probes = probes and not forget.token_level
    reference = dict((name, model) for name, model, _ in retrained).get("retrain")
    if probes and reference is not None:
        reference = reference_embeddings(reference, tokenizer, probed, config.embedding, config.max_length)
    rows = {}

    def record(name, model, seconds, steps=0, calibration=None):
        # one pass per set gives the logits and, for the probes, the embeddings
        preds = predict_sets(model, tokenizer, forget, retain, test, max_length=config.max_length,
                             embedding=config.embedding if probes else None)
        row = report_from_predictions(preds, label_names)
        row.update(seconds=seconds, steps=steps,
                   request=request_figures(request, preds, sets, label_names, forgotten, true_labels))
        if probes:
            row["representation"] = representation_figures(model, tokenizer, probed, reference, config.embedding,
                                                           config.max_length,
                                                           own={name: p.embeddings for name, p in preds.items()})
            row["relearn_curve"] = relearn_curve(model, tokenizer, forget, max_length=config.max_length)
        if calibration is not None:
            row["calibration"] = calibration  # its checks too: what each check measured, which were undone
        rows[name] = row

    if references:
        record("original", original, 0.0)
        for name, model, seconds in retrained:
            record(name, model, seconds, steps=recipe.steps(len(retain)))
    # Each method's time ratio divides by retraining steps timed right before and right after it:
    # this machine's speed drifts within a comparison (Rotten Tomatoes, mislabelled, seed 0:
    # DeepCUT's budget probe timed a retraining step at 1.13 s, the other methods' probes at
    # 0.70-0.80 s and steps timed after every method at 0.85 s; the run kept to 0.39 of its own
    # estimate of an epoch, but measured 0.26 of retraining timed once, after every method).
    step_seconds = [retrain_step_seconds(recipe, retain, tokenizer)]
    for name in methods:
        start = time.perf_counter()
        result = baselines.METHODS[name](copy.deepcopy(original), tokenizer, forget, retain, config,
                                         progress=progress, heldout=sets["heldout"])
        seconds = time.perf_counter() - start
        step_seconds.append(retrain_step_seconds(recipe, retain, tokenizer))
        record(name, result.model, seconds, len(result.history), result.calibration)
        rows[name]["timing"] = retrain_timing(recipe, retain, (step_seconds[-2] + step_seconds[-1]) / 2)
    timing = retrain_timing(recipe, retain, float(np.mean(step_seconds)))
    counts = np.bincount(sets["train"].labels, minlength=len(label_names))
    minority = label_names[int(np.argmin(counts))]
    report = dict(request=request, forgotten_classes=forgotten, minority_class=minority, config=asdict(config),
                  recipe=asdict(recipe), sizes={k: len(v) for k, v in sets.items() if hasattr(v, "texts")},
                  summary=None, details=rows, timing=timing)
    return rescored(report) if references else report


def summary_row(row, gold, timing, minority):
    """The scalar figures of one model: headline, the test recall of the ``minority`` class, the
    request's own, representation (k-NN, CKA), relearning (mean accuracy over its curve, and its
    gap to the retrained model's), time (against the row's own ``timing``, retraining timed right
    before and after its method, in the run that made the row: ``merged_report``; rows without
    one, against the report's ``timing``)."""
    timing = row.get("timing", timing)
    out = dict(headline(row), minority_recall_test=100 * row["test"]["recall"].get(minority, float("nan")),
               **row["request"], steps=row["steps"], seconds=row["seconds"],
               time_ratio=row["seconds"] / timing["retrain_seconds_same_run"],
               distance_to_retrain=gap_to(row, gold)["distance"])
    for key, value in row.get("representation", {}).items():
        out[key] = 100 * value if key.startswith("knn") else value
    if "relearn_curve" in row:
        out["relearn_accuracy"] = 100 * float(np.mean(row["relearn_curve"]))
        out["relearn_gap"] = 100 * float(np.mean(np.abs(np.subtract(row["relearn_curve"], gold["relearn_curve"]))))
    if "calibration" in row:
        out["target_met"] = row["calibration"]["met"]
    return out


def rescored(report):
    """``report`` with its summary computed again from its stored details (after a change to how
    a figure is summarised, such as the distance)."""
    gold, minority = report["details"]["retrain"], report["minority_class"]
    summary = {name: summary_row(row, gold, report["timing"], minority) for name, row in report["details"].items()}
    return dict(report, summary=summary)


def merged_report(report, rerun, methods):
    """``report`` with the rows of ``methods`` taken from ``rerun`` (the same request, models and
    sets, those methods run again): each such row keeps the retraining timed in its own run
    (``timing``), against which its time ratio is taken."""
    if rerun["sizes"] != report["sizes"] or rerun["request"] != report["request"]:
        raise ValueError("a rerun merges only into a report of the same request and sets")
    details = dict(report["details"])
    for name in methods:
        details[name] = {"timing": rerun["timing"], **rerun["details"][name]}
    return rescored(dict(report, details=details))


COLUMNS = [("forget_f1", "forget F1"), ("retain_f1", "retain F1"), ("test_f1", "test F1"),
           ("forget_accuracy", "forget acc"), ("mia_loss_auc", "MIA AUC"), ("mia_svc_efficacy", "MIA eff."),
           ("forgotten_class_recall_train", "class recall train"), ("forgotten_class_recall_test", "class recall test"),
           ("other_classes_test_f1", "other test F1"), ("wrong_label_accuracy", "wrong-label acc"),
           ("true_label_accuracy", "true-label acc"), ("knn_forget", "k-NN forget"), ("knn_test", "k-NN test"),
           ("cka_forget", "CKA forget"), ("cka_test", "CKA test"), ("relearn_gap", "relearn gap"),
           ("distance_to_retrain", "dist. to retrain"), ("steps", "steps"), ("seconds", "time s"),
           ("time_ratio", "time / retrain")]
THREE_PLACES = ("mia_loss_auc", "mia_svc_efficacy", "cka_forget", "cka_test", "distance_to_retrain", "time_ratio")


def markdown_table(report, title):
    summary = report["summary"]
    columns = [(k, t) for k, t in COLUMNS if any(k in row for row in summary.values())]
    lines = [f"{title}; request `{report['request']}`; sizes {report['sizes']}", "",
             "| method | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in summary.items():
        cells = ["" if k not in row else f"{row[k]:.3f}" if k in THREE_PLACES else f"{row[k]:.1f}" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    t = report["timing"]
    lines += ["", f"Retraining timed in this run, before and after each method: {t['retrain_step_seconds']:.2f} s/step "
              f"in the mean x {t['retrain_steps']} steps = {t['retrain_seconds_same_run']:.0f} s. A method's "
              "time / retrain divides by the steps timed just before and after it (the machine's speed "
              "drifts); the retrain rows' own time is their training, possibly under another load."]
    return "\n".join(lines) + "\n"


def plot_summary(summary, title, f):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for offset, key in ((-0.2, "forget_f1"), (0.2, "test_f1")):
        left.bar([i + offset for i in range(len(names))], [summary[n][key] for n in names], width=0.4, label=key)
    left.set(title=f"F1 ({title})", ylabel="macro-F1 (%)")
    left.set_xticks(range(len(names)), names, rotation=35, ha="right")
    left.legend()
    for name in names:  # each model: its time beside its distance to the retrained model
        right.scatter(summary[name]["time_ratio"], summary[name]["distance_to_retrain"])
        right.annotate(name, (summary[name]["time_ratio"], summary[name]["distance_to_retrain"]), fontsize=8)
    right.set(title="distance to the retrained model vs time", xlabel="time / retraining time",
              ylabel="distance (lower is better)")
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_report(out: Path, report, title):
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.md", lambda f: f.write(markdown_table(report, title).encode()))
    atomic_write(out / "report.png", lambda f: plot_summary(report["summary"], title, f))


def finetune(data, out: Path, recipe: Recipe, progress=True):
    """Fine-tune the recipe's base on ``data`` (a TextDataset) into ``out`` (save_pretrained,
    with ``recipe.json`` beside the weights), atomically; returns the recipe."""
    model, tokenizer = load_base(recipe, data.label_names)
    model = fit(model, tokenizer, data, recipe, recipe.seed, desc="fine-tune" if progress else None).model

    def save(folder):
        save_trained(model, tokenizer, folder)
        (folder / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=1) + "\n")

    save_model_atomically(save, out)
    return recipe


def run_compare(model_dir, data_path, test_path, out, forget_spec, config: UnlearnConfig, recipe: Recipe = None,
                heldout_path=None, columns=None, second_seed=True, methods=None, progress=True):
    """``deepcut-fast compare`` (module docstring). ``recipe``: how the model was fine-tuned
    (default: the ``recipe.json`` that ``finetune`` saved beside it)."""
    from deepcut_fast.unlearning.job import load_data, model_label_names, read_sets

    out = Path(out)
    if recipe is None:
        recipe = saved_recipe(model_dir)
    if recipe is None:
        raise FileNotFoundError(f"{model_dir} has no {RECIPE_FILE}: retraining repeats the recipe that made the "
                                "model; give --recipe FILE, or make the model with deepcut-fast finetune")
    methods = METHODS_COMPARED if methods is None else tuple(methods)
    unknown = sorted(set(methods) - set(METHODS_COMPARED))
    if unknown:
        raise ValueError(f"methods {unknown} are not among {list(METHODS_COMPARED)}")
    label_names, train, forget, retain, test = read_sets(model_dir, data_path, forget_spec, "sequence", columns, test_path)
    if heldout_path is not None:
        heldout = load_data(heldout_path, label_names, "sequence", columns, keep_ids=False)
    elif test is None:
        raise ValueError("compare measures every model on held-out data: give --test")
    else:  # one half calibrates, the other is measured
        heldout, test = split(test, 0.5, seed=0)
    with claimed_folder(out):
        model, tokenizer = load_classifier(model_dir, model_label_names(model_dir))
        retrained = retrained_models(recipe, retain, out / "cache", second_seed, progress)
        sets = dict(train=train, forget=forget, retain=retain, heldout=heldout, test=test)
        report = compare_methods(model, tokenizer, sets, retrained, config, recipe, methods, progress=progress)
        write_report(out, report, f"{Path(model_dir).name} on {Path(data_path).name}")
    return report
