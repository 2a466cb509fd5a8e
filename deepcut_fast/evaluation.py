"""How well a model forgot: utility, per-class recall and membership inference (scikit-learn).

- accuracy and macro-F1 on the forget, retain and test sets, and per-class recall;
- loss-threshold membership inference: the ROC AUC of telling forget samples (members of the
  original training set) from test samples (non-members) by their loss. 0.5 means the forget
  set looks like unseen data, as it does to a model retrained without it;
- "MIA efficacy" (the confidence-based attack of the unlearning literature): an SVC learns to
  tell retain samples (members) from test samples (non-members) from the model's confidence
  (probability of the true class, and prediction entropy); efficacy is the share of forget
  samples it classifies as non-members (higher: more forgotten);
- the gap of each figure to a reference model's (the retrained one, the gold standard).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepcut_fast.unlearning.model import encode

SETS = ("forget", "retain", "test")


@dataclass
class Predictions:
    labels: np.ndarray  # true class ids
    probs: np.ndarray  # softmax probabilities [n, classes]

    @property
    def predicted(self):
        return self.probs.argmax(1)

    @property
    def losses(self):
        return -np.log(np.clip(self.probs[np.arange(len(self.labels)), self.labels], 1e-12, None))


@torch.no_grad()
def predict(model, tokenizer, data, batch_size=64, max_length=96) -> Predictions:
    """Class probabilities of ``data`` (a TextDataset) with dropout off."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(data), batch_size):
        logits = model(**encode(tokenizer, data.texts[start:start + batch_size], max_length, device)).logits
        probs.append(F.softmax(logits.float(), -1).cpu().numpy())
    model.train(was_training)
    return Predictions(np.asarray(data.labels), np.concatenate(probs) if probs else np.zeros((0, 0)))


def classification_metrics(p: Predictions, label_names):
    """Accuracy, macro-F1 (over the classes present in the set) and recall of every class."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    classes = list(range(len(label_names)))
    present = sorted(set(p.labels.tolist()))
    recall = recall_score(p.labels, p.predicted, labels=classes, average=None, zero_division=0)
    return dict(accuracy=float(accuracy_score(p.labels, p.predicted)),
                macro_f1=float(f1_score(p.labels, p.predicted, labels=present, average="macro", zero_division=0)),
                recall={label_names[c]: float(recall[c]) for c in classes if c in present})


def loss_mia_auc(forget: Predictions, test: Predictions):
    """ROC AUC of the loss-threshold attack, members = forget, non-members = test (0.5 = chance)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(forget.labels)), np.zeros(len(test.labels))]
    return float(roc_auc_score(y, -np.r_[forget.losses, test.losses]))  # lower loss: "member"


def _confidence_features(p: Predictions):
    true_prob = p.probs[np.arange(len(p.labels)), p.labels]
    entropy = -(p.probs * np.log(np.clip(p.probs, 1e-12, None))).sum(1)
    return np.c_[true_prob, entropy]


def svc_mia_efficacy(retain: Predictions, test: Predictions, forget: Predictions, seed=0):
    """Share of forget samples that an SVC trained on retain (member) vs test (non-member)
    confidence features calls non-members. Classes are balanced by subsampling retain."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    n = min(len(retain.labels), len(test.labels))
    members = _confidence_features(retain)[rng.choice(len(retain.labels), n, replace=False)]
    x = np.r_[members, _confidence_features(test)[:n]]
    y = np.r_[np.ones(n), np.zeros(n)]
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float((attack.predict(_confidence_features(forget)) == 0).mean())


def report_from_predictions(preds, label_names):
    """Every figure of this module from the predictions on the forget, retain and test sets."""
    report = {name: classification_metrics(preds[name], label_names) for name in SETS}
    report["mia_loss_auc"] = loss_mia_auc(preds["forget"], preds["test"])
    report["mia_svc_efficacy"] = svc_mia_efficacy(preds["retain"], preds["test"], preds["forget"])
    return report


def evaluate(model, tokenizer, forget, retain, test, label_names, **predict_options):
    """Every figure of this module for one model; sets are TextDatasets."""
    preds = {name: predict(model, tokenizer, data, **predict_options)
             for name, data in (("forget", forget), ("retain", retain), ("test", test))}
    return report_from_predictions(preds, label_names)


def headline(report):
    """The scalar figures compared across methods (F1 in points, MIA figures as they are)."""
    out = {f"{s}_f1": 100 * report[s]["macro_f1"] for s in SETS}
    out.update({f"{s}_accuracy": 100 * report[s]["accuracy"] for s in SETS})
    out["mia_loss_auc"] = report["mia_loss_auc"]
    out["mia_svc_efficacy"] = report["mia_svc_efficacy"]
    return out


def gap_to(report, reference):
    """|figure - reference figure| for each headline figure, and their mean ("distance")."""
    mine, theirs = headline(report), headline(reference)
    gaps = {k: abs(mine[k] - theirs[k]) for k in mine}
    # the distance averages fractions: F1 and accuracy gaps back from points to [0, 1]
    gaps["distance"] = float(np.mean([g if k.startswith("mia") else g / 100 for k, g in gaps.items()]))
    return gaps
