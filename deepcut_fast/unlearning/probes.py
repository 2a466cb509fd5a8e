"""Evaluation beyond logits: what the latent space still knows about the forget set.

DeepCUT acts on embeddings, and a method can change only the classifier head while the encoder
still separates the forgotten samples: figures from the logits alone cannot tell. These probes
read the encoder (sequence classifiers):

- ``knn_accuracy``: cosine k-nearest-neighbour accuracy (k = 5, majority vote) of frozen
  embeddings, with the retain set's embeddings as the labelled memory: for the forget and test
  sets, and for the retain set itself leaving each sample out of its own neighbours. A model
  retrained without the forget set places forget samples like test samples;
- ``linear_cka``: linear centred kernel alignment (Kornblith et al. 2019) between two models'
  embeddings of the same samples, 1 for representations equal up to rotation and scale: of the
  unlearned model against the retrained one, on the forget and test sets;
- ``relearn_curve``: a few fine-tuning steps on a small part of the forget set, and the accuracy
  on the rest of it after each step. Knowledge that was hidden rather than removed returns in a
  few steps; a retrained model shows how fast it returns from nothing.
"""
import random

import numpy as np
import torch
import torch.nn.functional as F

from deepcut_fast.unlearning.evaluation import SETS, classification_metrics, predict
from deepcut_fast.unlearning.model import encode_labelled, trained_parameters

KNN_NEIGHBOURS = 5
RELEARN_SHARE, RELEARN_MIN, RELEARN_MAX = 0.1, 4, 64  # of the forget set: the samples relearnt
RELEARN_STEPS, RELEARN_LR, RELEARN_EVAL = 10, 5e-5, 256


def embeddings(model, tokenizer, data, embedding="auto", layer=-1, max_length=96) -> np.ndarray:
    """[n, hidden] float32 embeddings of a text dataset with dropout off (``embedding`` as in
    UnlearnConfig; "auto" resolved for the model)."""
    return predict(model, tokenizer, data, max_length=max_length, embedding=embedding, layer=layer).embeddings


def _unit(x):
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def knn_accuracy(queries, query_labels, memory, memory_labels, k=KNN_NEIGHBOURS, leave_self_out=False, chunk=1024):
    """Share of ``queries`` whose k most cosine-similar ``memory`` rows vote for their label
    (ties go to the smallest class id). ``leave_self_out``: queries are the memory itself, and a
    row is not its own neighbour."""
    queries, memory = _unit(np.asarray(queries, np.float32)), _unit(np.asarray(memory, np.float32))
    memory_labels, query_labels = np.asarray(memory_labels), np.asarray(query_labels)
    classes = int(max(memory_labels.max(), query_labels.max())) + 1
    hits = 0
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ memory.T
        if leave_self_out:
            rows = np.arange(sims.shape[0])
            sims[rows, start + rows] = -np.inf
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((sims.shape[0], classes))
        np.add.at(votes, (np.repeat(np.arange(sims.shape[0]), k), memory_labels[nearest].ravel()), 1)
        hits += int((votes.argmax(1) == query_labels[start:start + chunk]).sum())
    return hits / max(1, len(queries))


def linear_cka(x, y):
    """Linear CKA of two [n, d1] / [n, d2] representations of the same n samples."""
    x = np.asarray(x, np.float64) - np.mean(x, 0)
    y = np.asarray(y, np.float64) - np.mean(y, 0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def representation_figures(model, tokenizer, sets, reference=None, embedding="auto", max_length=96, own=None):
    """{"knn_<set>": k-NN accuracy of each of ``sets`` ({"forget", "retain", "test"} datasets)
    and, with ``reference`` (a model, or its ``reference_embeddings``), "cka_forget" and
    "cka_test": linear CKA between the two models' embeddings of those sets}. ``own``: the
    model's embeddings of the sets when they are at hand (``predict(..., embedding=)``)."""
    mine = own or {name: embeddings(model, tokenizer, sets[name], embedding, max_length=max_length) for name in SETS}
    memory, memory_labels = mine["retain"], sets["retain"].labels
    out = {f"knn_{name}": knn_accuracy(mine[name], sets[name].labels, memory, memory_labels,
                                       leave_self_out=name == "retain") for name in SETS}
    if reference is not None:
        if not isinstance(reference, dict):
            reference = reference_embeddings(reference, tokenizer, sets, embedding, max_length)
        out.update({f"cka_{name}": linear_cka(mine[name], theirs) for name, theirs in reference.items()})
    return out


def reference_embeddings(reference, tokenizer, sets, embedding="auto", max_length=96):
    """The reference model's embeddings of the forget and test sets, for ``representation_figures``
    (computed once when many models are compared with one reference)."""
    return {name: embeddings(reference, tokenizer, sets[name], embedding, max_length=max_length)
            for name in ("forget", "test")}


def relearn_split(forget, seed=0):
    """(the forget samples relearnt, the forget samples measured): a fixed share of the forget
    set, and a fixed sample of at most RELEARN_EVAL of the rest."""
    order = list(range(len(forget)))
    random.Random(seed).shuffle(order)
    count = min(RELEARN_MAX, max(RELEARN_MIN, round(RELEARN_SHARE * len(forget))))
    return forget.subset(sorted(order[:count])), forget.subset(sorted(order[count:count + RELEARN_EVAL]))


def relearn_curve(model, tokenizer, forget, steps=RELEARN_STEPS, learning_rate=RELEARN_LR, max_length=96, seed=0):
    """Accuracy on the measured part of the forget set before and after each of ``steps``
    full-batch AdamW steps of cross-entropy on the relearnt part (``relearn_split``), with
    dropout on. Works on a copy: ``model`` is left as it was."""
    import copy

    learnt, measured = relearn_split(forget, seed)
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    inputs, labels = encode_labelled(tokenizer, learnt.texts, learnt.labels, max_length, device)
    optimizer = torch.optim.AdamW([p for _, p in trained_parameters(model)], lr=learning_rate)
    torch.manual_seed(seed)

    def accuracy():
        return classification_metrics(predict(model, tokenizer, measured, max_length=max_length),
                                      forget.label_names)["accuracy"]

    curve = [accuracy()]
    for _ in range(steps):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(**inputs).logits, labels).backward()
        optimizer.step()
        curve.append(accuracy())
    return curve
