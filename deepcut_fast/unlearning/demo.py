"""The offline demo: BBC News + MiniLM-L6, DeepCUT against retraining and the baselines.

Scenarios (the forget set of each):
- ``class``: every training document of one class (default "tech");
- ``noisy``: 10% of the training set relabelled to a random wrong class before the original is
  trained until it has memorised them (>= 90% accuracy on the wrong labels); forget = those;
- ``random``: a random 10% of the training set.

The original (fine-tuned on the whole training set) and the retrained models (the pretrained
base trained on the retain set, two seeds: the second shows the seed-to-seed noise) are cached
under ``<out>/cache`` so a rerun skips them. Every output is written atomically.
"""
import copy
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deepcut_fast.evaluation import (Predictions, classification_metrics, gap_to, headline, predict,
                                     report_from_predictions)
from deepcut_fast.unlearning import baselines
from deepcut_fast.unlearning.data import TextDataset, forget_indices, load_bbc_news, split
from deepcut_fast.unlearning.files import atomic_write, save_model_atomically
from deepcut_fast.unlearning.model import default_model_path, load_classifier
from deepcut_fast.unlearning.unlearner import UnlearnConfig, accuracy

SCENARIOS = ("class", "noisy", "random")
METHOD_ORDER = ("original", "retrain", "retrain_seed2", "deepcut", "finetune_retain", "gradient_ascent",
                "gradient_difference", "random_relabel")


@dataclass
class DemoOptions:
    scenario: str = "class"
    forget_class: str = "tech"
    fraction: float = 0.1  # noisy / random scenarios
    seed: int = 0
    train_steps: int = 60  # original and retrain budget (batches of 32)
    max_memorise_rounds: int = 6  # noisy: extra rounds of train_steps until the wrong labels are learnt
    max_length: int = 64
    unlearn: UnlearnConfig = None
    quick: bool = False  # a small subset and few steps: a smoke test of the whole pipeline

    def __post_init__(self):
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.unlearn is None:
            self.unlearn = UnlearnConfig(gamma=1.0, temperature=0.5, steps=10, learning_rate=5e-5,
                                         max_length=self.max_length, seed=self.seed)
        if self.quick:
            self.train_steps, self.max_memorise_rounds = 8, 1
            self.unlearn = replace(self.unlearn, steps=3)


def prepare_data(opts: DemoOptions):
    """(train as the original saw it, test, forget positions in train, scenario notes)."""
    data = load_bbc_news()
    if opts.quick:
        keep = random.Random(opts.seed).sample(range(len(data)), 300)
        data = data.subset(sorted(keep))
    train, test = split(data, 0.2, seed=0)  # the split is fixed; seeds vary the training
    rng = random.Random(opts.seed)
    notes = {}
    if opts.scenario == "class":
        chosen = forget_indices(train, forget_class=opts.forget_class)
    else:
        chosen = sorted(rng.sample(range(len(train)), max(1, round(opts.fraction * len(train)))))
    if opts.scenario == "noisy":  # relabel the chosen documents to a random wrong class
        classes = len(train.label_names)
        labels = list(train.labels)
        notes["true_labels"] = {train.ids[i]: labels[i] for i in chosen}
        for i in chosen:
            labels[i] = (labels[i] + rng.randrange(1, classes)) % classes
        train = TextDataset(train.ids, train.texts, labels, train.label_names, train.columns)
    return train, test, chosen, notes


def _train(model, tokenizer, data, opts, seed, steps):
    """Fine-tune on ``data`` with CE (the original, and retraining on the retain set)."""
    cfg = UnlearnConfig(steps=steps, learning_rate=5e-5, retain_batch_size=32, max_length=opts.max_length, seed=seed)
    return baselines.retrain(model, tokenizer, data.subset([]), data, cfg).model


def cached_model(directory: Path, label_names, build):
    """Load the model saved in ``directory``, or build, save (atomically) and return it."""
    if (directory / "config.json").exists():
        return load_classifier(directory, label_names)
    model, tokenizer, seconds = build()
    save_model_atomically(model, tokenizer, directory)
    (directory / "seconds.txt").write_text(f"{seconds}\n")
    return model, tokenizer


def train_original(opts, train, forget, cache: Path):
    def build():
        start = time.perf_counter()
        model, tokenizer = load_classifier(default_model_path(), train.label_names)
        model = _train(model, tokenizer, train, opts, opts.seed, opts.train_steps)
        if opts.scenario == "noisy":  # keep training until the wrong labels are memorised
            for _ in range(opts.max_memorise_rounds):
                if accuracy(model, tokenizer, forget, opts.max_length) >= 0.9:
                    break
                model = _train(model, tokenizer, train, opts, opts.seed + 1, opts.train_steps)
        return model, tokenizer, time.perf_counter() - start

    return cached_model(cache / f"original-{opts.scenario}-seed{opts.seed}", train.label_names, build)


def train_retrained(opts, retain, cache: Path, seed, steps):
    def build():
        start = time.perf_counter()
        model, tokenizer = load_classifier(default_model_path(), retain.label_names)
        return _train(model, tokenizer, retain, opts, seed, steps), tokenizer, time.perf_counter() - start

    return cached_model(cache / f"retrain-{opts.scenario}-seed{seed}", retain.label_names, build)


def scenario_figures(opts, preds, label_names):
    """Figures specific to a scenario (class: the forgotten class's recall on its training and
    test documents, and the other classes' test F1)."""
    if opts.scenario != "class":
        return {}
    target = label_names.index(opts.forget_class)
    test = preds["test"]
    others = test.labels != target
    other_f1 = classification_metrics(Predictions(test.labels[others], test.probs[others]), label_names)["macro_f1"]
    return dict(forgotten_class_recall_train=100 * float((preds["forget"].predicted == target).mean()),
                forgotten_class_recall_test=100 * classification_metrics(test, label_names)["recall"][opts.forget_class],
                other_classes_test_f1=100 * other_f1)


def run_demo(opts: DemoOptions, out: Path, progress=True):
    """Run every method, write report.json / report.md / report.png into ``out``; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    train, test, chosen, notes = prepare_data(opts)
    forget, retain = train.partition(chosen)
    original_model, tokenizer = train_original(opts, train, forget, cache)
    retrain_steps = opts.train_steps
    rows = {}

    def record(name, model, seconds):
        preds = {set_name: predict(model, tokenizer, data, max_length=opts.max_length)
                 for set_name, data in (("forget", forget), ("retain", retain), ("test", test))}
        report = report_from_predictions(preds, train.label_names)
        report.update(seconds=seconds, scenario=scenario_figures(opts, preds, train.label_names))
        rows[name] = report

    record("original", original_model, 0.0)
    for name, seed in (("retrain", opts.seed), ("retrain_seed2", opts.seed + 1000)):
        model, _ = train_retrained(opts, retain, cache, seed, retrain_steps)
        seconds_file = cache / f"retrain-{opts.scenario}-seed{seed}" / "seconds.txt"
        record(name, model, float(seconds_file.read_text()) if seconds_file.exists() else float("nan"))
    for name in ("deepcut", "finetune_retain", "gradient_ascent", "gradient_difference", "random_relabel"):
        start = time.perf_counter()
        result = baselines.METHODS[name](copy.deepcopy(original_model), tokenizer, forget, retain, opts.unlearn,
                                         progress=progress)
        record(name, result.model, time.perf_counter() - start)

    gold = rows["retrain"]
    summary = {}
    for name in METHOD_ORDER:
        r = rows[name]
        summary[name] = dict(headline(r), **r["scenario"], seconds=r["seconds"],
                             distance_to_retrain=gap_to(r, gold)["distance"])
    report = dict(options=dict(asdict(opts), unlearn=asdict(opts.unlearn)), sizes=dict(
        train=len(train), forget=len(forget), retain=len(retain), test=len(test)), summary=summary, details=rows,
        notes={k: len(v) for k, v in notes.items()})
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    atomic_write(out / "report.md", lambda f: f.write(markdown_table(report).encode()))
    atomic_write(out / "report.png", lambda f: plot_summary(summary, opts, f))
    return report


COLUMNS = [("forget_f1", "forget F1"), ("retain_f1", "retain F1"), ("test_f1", "test F1"),
           ("forget_accuracy", "forget acc"), ("mia_loss_auc", "MIA AUC"), ("mia_svc_efficacy", "MIA eff."),
           ("forgotten_class_recall_train", "class recall train"), ("forgotten_class_recall_test", "class recall test"),
           ("other_classes_test_f1", "other test F1"), ("distance_to_retrain", "dist. to retrain"),
           ("seconds", "time s")]


def markdown_table(report):
    summary = report["summary"]
    columns = [(k, title) for k, title in COLUMNS if any(k in row for row in summary.values())]
    lines = [f"Scenario `{report['options']['scenario']}`; sizes {report['sizes']}", "",
             "| method | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in summary.items():
        cells = [f"{row[k]:.3f}" if k.startswith("mia") or k == "distance_to_retrain" else f"{row[k]:.1f}"
                 for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary, opts, f):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, key in ((-0.2, "forget_f1"), (0.2, "test_f1")):
        left.bar([i + offset for i in range(len(names))], [summary[n][key] for n in names], width=0.4, label=key)
    left.set(title=f"F1 ({opts.scenario} scenario)", ylabel="macro-F1 (%)")
    left.legend()
    right.bar(range(len(names)), [summary[n]["distance_to_retrain"] for n in names], color="tab:green")
    right.set(title="distance to the retrained model (lower is better)")
    for ax in (left, right):
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
