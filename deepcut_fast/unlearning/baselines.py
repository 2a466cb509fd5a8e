"""Unlearning baselines with DeepCUT's signature: ``method(model, tokenizer, forget, retain, config)``.

All run through the same loop (``train_steps``: same batches of forget and retain samples,
same optimiser, same step budget) and return an UnlearnResult; only the per-step loss differs.
``retrain`` is the gold standard: the caller passes the pretrained base model (not the
fine-tuned original) and a training budget, and it learns the retain set from scratch.
"""
import torch

from deepcut_fast.unlearning.model import transformers_model
from deepcut_fast.unlearning.unlearner import (DeepCUTUnlearner, UnlearnResult, cross_entropy, steps_for,
                                              train_steps)


def _ce(model, inputs, labels, rows):
    if not rows.any():
        return torch.zeros((), device=labels.device)
    return cross_entropy(model(**inputs).logits[rows], labels[rows])


def _retain_ce_step(model, inputs, labels, forget_mask):
    ce = _ce(model, inputs, labels, ~forget_mask)
    return ce, {"ce": ce.detach()}


def original(model, tokenizer, forget, retain, config, progress=True):
    """No unlearning: the fine-tuned model as it is."""
    return UnlearnResult(model.eval())


def deepcut(model, tokenizer, forget, retain, config, progress=True):
    return DeepCUTUnlearner(model, tokenizer, config).unlearn(forget, retain, progress=progress)


def finetune_retain(model, tokenizer, forget, retain, config, progress=True):
    """Keep training on the retain set only (forgetting by catastrophic interference)."""
    return train_steps(model, tokenizer, forget, retain, config, _retain_ce_step, forget_batch_size=0, progress=progress,
                       desc="fine-tune retain")


def retrain(base_model, tokenizer, forget, retain, config, progress=True, desc="retrain"):
    """Gold standard: train the pretrained base on the retain set only. ``config.steps`` (or
    ``config.epochs`` over the retain set) is the training budget, not an unlearning budget.
    ``desc`` labels the progress bar (the demo also trains its original through here)."""
    steps = config.steps if config.steps is not None else steps_for(config.epochs, len(retain),
                                                                     config.retain_batch_size)
    return train_steps(base_model, tokenizer, forget, retain, config, _retain_ce_step, steps=steps, forget_batch_size=0,
                       progress=progress, desc=desc)


def gradient_ascent(model, tokenizer, forget, retain, config, progress=True):
    """Maximise the loss on the forget set."""
    def step(model, inputs, labels, forget_mask):
        ascent = -_ce(model, inputs, labels, forget_mask)
        return ascent, {"forget_ce": -ascent.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, retain_batch_size=0, progress=progress,
                       desc="gradient ascent")


def gradient_difference(model, tokenizer, forget, retain, config, progress=True):
    """Ascent on the forget set plus descent on the retain set."""
    def step(model, inputs, labels, forget_mask):
        logits = model(**inputs).logits
        forget_ce = cross_entropy(logits[forget_mask], labels[forget_mask])
        retain_ce = cross_entropy(logits[~forget_mask], labels[~forget_mask])
        return retain_ce - forget_ce, {"forget_ce": forget_ce.detach(), "ce": retain_ce.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, progress=progress, desc="gradient difference")


def random_relabel(model, tokenizer, forget, retain, config, progress=True):
    """Train on the forget samples with random wrong labels, and on the retain set."""
    generator = torch.Generator().manual_seed(config.seed)
    classes = transformers_model(model).config.num_labels

    def step(model, inputs, labels, forget_mask):
        shift = torch.randint(1, classes, labels.shape, generator=generator).to(labels.device)
        rows = forget_mask.view(-1, *[1] * (labels.dim() - 1)) & (labels != -100)  # tokens: keep -100
        wrong = torch.where(rows, (labels + shift) % classes, labels)  # never the true label
        ce = cross_entropy(model(**inputs).logits, wrong)
        return ce, {"ce": ce.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, progress=progress, desc="random relabel")


METHODS = {f.__name__: f for f in (original, deepcut, finetune_retain, gradient_ascent, gradient_difference,
                                   random_relabel)}
