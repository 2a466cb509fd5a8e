"""Representation probes (k-NN, CKA, relearning) against independent computations."""
import numpy as np
import pytest
import torch

from deepcut_fast.unlearning.data import forget_indices
from deepcut_fast.unlearning.probes import (knn_accuracy, linear_cka, relearn_curve, relearn_split,
                                            representation_figures)
from tiny_models import fine_tune, tiny_bert, tokenizer, toy_corpus


def brute_force_knn(queries, labels, memory, memory_labels, k, leave_self_out):
    hits = 0
    for i, q in enumerate(queries):
        sims = [(float(np.dot(q, m) / np.linalg.norm(q) / np.linalg.norm(m)), j) for j, m in enumerate(memory)
                if not (leave_self_out and j == i)]
        nearest = [j for _, j in sorted(sims, reverse=True)[:k]]
        votes = np.bincount(np.asarray(memory_labels)[nearest], minlength=2)
        hits += int(votes.argmax() == labels[i])
    return hits / len(queries)


@pytest.mark.parametrize("leave_self_out", [False, True])
def test_knn_accuracy_matches_a_brute_force_vote(leave_self_out):
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(60, 8))
    memory_labels = (memory[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)  # binary, k odd: no ties
    queries = memory if leave_self_out else rng.normal(size=(25, 8))
    labels = memory_labels if leave_self_out else (queries[:, 0] > 0).astype(int)
    expected = brute_force_knn(queries, labels, memory, memory_labels, 5, leave_self_out)
    assert knn_accuracy(queries, labels, memory, memory_labels, k=5, leave_self_out=leave_self_out,
                        chunk=7) == pytest.approx(expected)


def test_linear_cka_matches_the_gram_matrix_form():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 9))
    centre = np.eye(40) - 1 / 40
    k, l = centre @ x @ x.T @ centre, centre @ y @ y.T @ centre
    expected = np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    assert linear_cka(x, 3 * x @ rotation + 2) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def unlearnt():
    """A tiny BERT that memorised the toy corpus, and a copy retrained without the class 'tech'."""
    tok = tokenizer()
    data = toy_corpus()
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    original = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    retrained = fine_tune(tiny_bert(data.label_names, tok.vocab_size, seed=1), tok, retain)
    return tok, data, forget, retain, original, retrained


def test_representation_figures(unlearnt):
    tok, data, forget, retain, original, retrained = unlearnt
    test = toy_corpus(per_class=10, seed=3)
    sets = dict(forget=forget, retain=retain, test=test)
    figures = representation_figures(original, tok, sets, reference=original, max_length=32)
    assert figures["cka_forget"] == pytest.approx(1.0) and figures["cka_test"] == pytest.approx(1.0)
    assert figures["knn_retain"] >= 0.9 and 0 <= figures["knn_test"] <= 1
    # the retain memory has no 'tech' sample: no forget sample can get its class from its neighbours
    assert figures["knn_forget"] == 0.0
    other = representation_figures(retrained, tok, sets, reference=original, max_length=32)
    assert other["cka_forget"] < 1.0 and "cka_retain" not in other


def test_relearn_curve_measures_the_rest_of_the_forget_set_and_leaves_the_model(unlearnt):
    tok, data, forget, retain, original, retrained = unlearnt
    learnt, measured = relearn_split(forget)
    assert len(learnt) == 4 and not set(learnt.ids) & set(measured.ids)
    before = {k: v.clone() for k, v in retrained.state_dict().items()}
    curve = relearn_curve(retrained, tok, forget, steps=6, learning_rate=5e-3, max_length=32)
    assert len(curve) == 7 and curve[0] == 0.0  # never trained on the class
    assert curve[-1] > curve[0]  # four samples teach it back
    assert all(torch.equal(before[k], v) for k, v in retrained.state_dict().items())
    assert relearn_curve(original, tok, forget, steps=0, max_length=32) == [1.0]
