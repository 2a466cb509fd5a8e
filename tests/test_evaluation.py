"""Unlearning metrics against values worked out by hand."""
import numpy as np
import pytest

import torch

from deepcut_fast.unlearning.data import forget_indices
from deepcut_fast.unlearning.evaluation import (Predictions, classification_metrics, evaluate, gap_to, headline,
                                                loss_mia_auc, predict, svc_mia_efficacy)
from tiny_models import tiny_bert, tokenizer, toy_corpus


def preds(labels, predicted, confidence=0.9, classes=3):
    """Probabilities that put `confidence` on the predicted class."""
    probs = np.full((len(labels), classes), (1 - confidence) / (classes - 1))
    probs[np.arange(len(labels)), predicted] = confidence
    return Predictions(np.asarray(labels), probs)


def test_classification_metrics_by_hand():
    m = classification_metrics(preds([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.0})
    # F1: a: P 1/2 R 1/2 -> 0.5; b: P 2/3 R 1 -> 0.8; c: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_counts_only_classes_present_in_the_set():
    m = classification_metrics(preds([2, 2, 2], [2, 2, 0]), ["a", "b", "c"])
    assert set(m["recall"]) == {"c"} and m["recall"]["c"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_loss_mia_auc():
    member = preds([0] * 20, [0] * 20, confidence=0.95)
    nonmember = preds([0] * 20, [0] * 20, confidence=0.6)
    assert loss_mia_auc(member, nonmember) == pytest.approx(1.0)
    assert loss_mia_auc(nonmember, member) == pytest.approx(0.0)
    assert loss_mia_auc(member, member) == pytest.approx(0.5)


def test_svc_efficacy_tells_forgotten_from_remembered():
    rng = np.random.default_rng(0)

    def sample(center, n=60):
        conf = np.clip(rng.normal(center, 0.03, n), 0.34, 0.999)
        probs = np.c_[conf, (1 - conf) / 2, (1 - conf) / 2]
        return Predictions(np.zeros(n, dtype=int), probs)

    retain, test = sample(0.98), sample(0.55)
    assert svc_mia_efficacy(retain, test, sample(0.55)) >= 0.9  # looks unseen: forgotten
    assert svc_mia_efficacy(retain, test, sample(0.98)) <= 0.1  # looks like training data


def test_gap_and_distance():
    report = dict(forget=dict(macro_f1=0.5, accuracy=0.5), retain=dict(macro_f1=0.9, accuracy=0.9),
                  test=dict(macro_f1=0.8, accuracy=0.8), mia_loss_auc=0.6, mia_svc_efficacy=0.3)
    same = gap_to(report, report)
    assert same["distance"] == 0
    other = dict(report, forget=dict(macro_f1=0.1, accuracy=0.5), mia_loss_auc=0.5)
    gaps = gap_to(report, other)
    assert gaps["forget_f1"] == pytest.approx(40) and gaps["mia_loss_auc"] == pytest.approx(0.1)
    assert gaps["distance"] == pytest.approx((0.4 + 0.1) / (len(headline(report)) - 1))  # not the SVC's
    assert gap_to(report, dict(report, mia_svc_efficacy=0.9))["distance"] == 0


def test_evaluate_end_to_end():
    tok = tokenizer()
    data = toy_corpus(per_class=8)
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    test = toy_corpus(per_class=4, seed=1)
    model = tiny_bert(data.label_names, tok.vocab_size).eval()
    report = evaluate(model, tok, forget, retain, test, data.label_names)
    assert set(report) == {"forget", "retain", "test", "mia_loss_auc", "mia_svc_efficacy"}
    assert set(report["forget"]["recall"]) == {"tech"}

    def losses_and_hits(texts, labels):  # straight from the model, not through the evaluation code
        with torch.no_grad():
            logits = model(**tok(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")).logits
        labels = torch.tensor(labels)
        return (torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy(),
                (logits.argmax(1) == labels).float().mean().item())

    forget_loss, forget_hits = losses_and_hits(forget.texts, forget.labels)
    test_loss, test_hits = losses_and_hits(test.texts, test.labels)
    assert report["forget"]["accuracy"] == pytest.approx(forget_hits)
    assert report["test"]["accuracy"] == pytest.approx(test_hits)
    # AUC of "lower loss = member" by counting pairs (Mann-Whitney), ties as halves; padding to
    # other batch shapes may reorder one near-tied pair, so one pair's worth of slack
    pairs = len(forget_loss) * len(test_loss)
    wins = (forget_loss[:, None] < test_loss[None, :]).sum() + 0.5 * (forget_loss[:, None] == test_loss[None, :]).sum()
    assert report["mia_loss_auc"] == pytest.approx(wins / pairs, abs=1 / pairs)


def test_predictions_keep_the_data_order_when_batched_by_length():
    tok = tokenizer()
    data = toy_corpus(per_class=4)
    # lengths that batching by length reorders: long, short, long, ...
    texts = [t if i % 2 else " ".join([t] * 4) for i, t in enumerate(data.texts)]
    data = type(data)(data.ids, texts, data.labels, data.label_names)
    model = tiny_bert(data.label_names, tok.vocab_size).eval()
    batched = predict(model, tok, data, batch_size=5, max_length=64, embedding="mean")
    for i in range(len(data)):  # each text alone: no padding, no reordering
        alone = predict(model, tok, data.subset([i]), batch_size=1, max_length=64, embedding="mean")
        np.testing.assert_allclose(batched.probs[i], alone.probs[0], atol=1e-5)
        np.testing.assert_allclose(batched.embeddings[i], alone.embeddings[0], atol=1e-4)
    np.testing.assert_array_equal(batched.labels, data.labels)
