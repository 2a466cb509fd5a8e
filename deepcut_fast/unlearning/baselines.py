"""Unlearning baselines with DeepCUT's signature: ``method(model, tokenizer, forget, retain, config)``.

All run through the same loop (``train_steps``: same batches of forget and retain samples,
same optimiser, same step cap) and return an UnlearnResult; only the per-step loss differs.
With a calibrated config (the default) every method also stops on the same target, guard and
time budget, set from ``heldout`` (see the calibration module).
``retrain`` is the gold standard: the caller passes the pretrained base model (not the
fine-tuned original) and a training budget, and it learns the retain set from scratch.
"""
import copy

import torch
import torch.nn.functional as F

from deepcut_fast.unlearning.calibration import Calibrator, request_kind
from deepcut_fast.unlearning.model import encode_labelled, trained_parameters, transformers_model
from deepcut_fast.unlearning.unlearner import (DeepCUTUnlearner, UnlearnResult, cross_entropy, steps_for,
                                              train_steps)


def _calibrator(tokenizer, forget, retain, heldout, config):
    if not config.calibrate:
        return None
    kind = request_kind(config.request, forget, retain)
    return Calibrator(tokenizer, forget, retain, heldout, config.for_request(kind), kind)  # the request's guard


def _ce(model, inputs, labels, rows):
    if not rows.any():
        return torch.zeros((), device=labels.device)
    return cross_entropy(model(**inputs).logits[rows], labels[rows])


def _retain_ce_step(model, inputs, labels, forget_mask):
    ce = _ce(model, inputs, labels, ~forget_mask)
    return ce, {"ce": ce.detach()}


def original(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """No unlearning: the fine-tuned model as it is."""
    return UnlearnResult(model.eval())


def deepcut(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    return DeepCUTUnlearner(model, tokenizer, config).unlearn(forget, retain, progress=progress, heldout=heldout)


def finetune_retain(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """Keep training on the retain set only (forgetting by catastrophic interference)."""
    return train_steps(model, tokenizer, forget, retain, config, _retain_ce_step, forget_batch_size=0, progress=progress,
                       desc="fine-tune retain", calibrator=_calibrator(tokenizer, forget, retain, heldout, config))


def retrain(base_model, tokenizer, forget, retain, config, progress=True, desc="retrain"):
    """Gold standard: train the pretrained base on the retain set only. ``config.steps`` (or
    ``config.epochs`` over the retain set) is the training budget, not an unlearning budget.
    ``desc`` labels the progress bar (the demo also trains its original through here)."""
    steps = config.steps if config.steps is not None else steps_for(config.epochs, len(retain),
                                                                     config.retain_batch_size)
    return train_steps(base_model, tokenizer, forget, retain, config, _retain_ce_step, steps=steps, forget_batch_size=0,
                       progress=progress, desc=desc)


def gradient_ascent(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """Maximise the loss on the forget set."""
    def step(model, inputs, labels, forget_mask):
        ascent = -_ce(model, inputs, labels, forget_mask)
        return ascent, {"forget_ce": -ascent.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, retain_batch_size=0, progress=progress,
                       desc="gradient ascent", calibrator=_calibrator(tokenizer, forget, retain, heldout, config))


def gradient_difference(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """Ascent on the forget set plus descent on the retain set."""
    def step(model, inputs, labels, forget_mask):
        logits = model(**inputs).logits
        forget_ce = cross_entropy(logits[forget_mask], labels[forget_mask])
        retain_ce = cross_entropy(logits[~forget_mask], labels[~forget_mask])
        return retain_ce - forget_ce, {"forget_ce": forget_ce.detach(), "ce": retain_ce.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, progress=progress, desc="gradient difference",
                       calibrator=_calibrator(tokenizer, forget, retain, heldout, config))


def random_relabel(model, tokenizer, forget, retain, config, progress=True, heldout=None, desc="random relabel",
                   prepare=None):
    """Train on the forget samples with random wrong labels, and on the retain set. ``prepare``:
    the caller's work before the first step (SalUn's mask; ``train_steps``)."""
    generator = torch.Generator().manual_seed(config.seed)
    classes = transformers_model(model).config.num_labels

    def step(model, inputs, labels, forget_mask):
        ce = cross_entropy(model(**inputs).logits, _wrong_labels(labels, forget_mask, classes, generator))
        return ce, {"ce": ce.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, progress=progress, desc=desc,
                       calibrator=_calibrator(tokenizer, forget, retain, heldout, config), prepare=prepare)


def _wrong_labels(labels, forget_mask, classes, generator):
    """The labels with every forget row's (every labelled token's) replaced by a random other class."""
    shift = torch.randint(1, classes, labels.shape, generator=generator).to(labels.device)
    rows = forget_mask.view(-1, *[1] * (labels.dim() - 1)) & (labels != -100)  # tokens: keep -100
    return torch.where(rows, (labels + shift) % classes, labels)  # never the true label


def _frozen(model):
    """A frozen copy of the model before unlearning (SCRUB's teacher, NPO's reference)."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _kl_to(teacher_logits, student_logits, temperature):
    """KL(teacher || student) of the temperature-softened class distributions, per row, times
    T^2 (distillation's usual scale)."""
    t = F.log_softmax(teacher_logits.flatten(0, -2) / temperature, -1)
    s = F.log_softmax(student_logits.flatten(0, -2) / temperature, -1)
    return (t.exp() * (t - s)).sum(-1) * temperature ** 2


SCRUB_TEMPERATURE, SCRUB_ALPHA, SCRUB_GAMMA = 4.0, 0.001, 0.99


def scrub(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """SCRUB (Kurmanji et al. 2023): the original model is a frozen teacher; odd steps are "max"
    steps that push the student's forget predictions away from the teacher's (ascent on their
    KL), even steps "min" steps on the retain set: gamma * CE + alpha * KL to the teacher
    (distillation temperature 4, alpha 0.001, gamma 0.99, the public defaults)."""
    teacher, counter = [], [0]  # the teacher is made once a step will run (train_steps' prepare)

    def step(model, inputs, labels, forget_mask):
        counter[0] += 1
        logits = model(**inputs).logits
        with torch.no_grad():
            taught = teacher[0](**inputs).logits
        rows = forget_mask if counter[0] % 2 else ~forget_mask
        kl = _kl_to(taught[rows], logits[rows], SCRUB_TEMPERATURE).mean()
        if counter[0] % 2:
            return -kl, {"forget_kl": kl.detach()}
        ce = cross_entropy(logits[rows], labels[rows])
        return SCRUB_GAMMA * ce + SCRUB_ALPHA * kl, {"ce": ce.detach(), "retain_kl": kl.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, progress=progress, desc="SCRUB",
                       calibrator=_calibrator(tokenizer, forget, retain, heldout, config),
                       prepare=lambda: teacher.append(_frozen(model)))


SALUN_SHARE = 0.5  # of the weights, those with the largest forget-loss gradients


def saliency_mask(model, tokenizer, forget, config, batch_size=32):
    """SalUn's weight saliency: {parameter: bool mask} of the SALUN_SHARE of the trainable
    weights that the cross-entropy over the whole forget set reaches (non-zero gradient), those
    with the largest |gradient|."""
    params = dict(trained_parameters(model))
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the saliency of the model as it is, without dropout noise
    for start in range(0, len(forget), batch_size):
        texts, labels = forget.texts[start:start + batch_size], forget.labels[start:start + batch_size]
        inputs, targets = encode_labelled(tokenizer, texts, labels, config.max_length, device)
        (cross_entropy(model(**inputs).logits, targets, reduction="sum") / len(forget)).backward()
    model.train(was_training)
    magnitudes = torch.cat([p.grad.abs().flatten() for p in params.values() if p.grad is not None])
    # the share is of the weights the forget loss reaches: in a language model most of the
    # vocabulary's embeddings get no gradient, and would otherwise make the mask everything else
    reached = magnitudes[magnitudes > 0].float()
    threshold = torch.quantile(reached[::max(1, reached.numel() // 10_000_000)], 1 - SALUN_SHARE)
    masks = {n: (p.grad.abs() > threshold) if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
             for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    return masks


def salun(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """SalUn (Fan et al. 2024): random labels on the forget samples plus CE on the retain set, as
    ``random_relabel``, updating only the salient weights (``saliency_mask``): the other
    weights' gradients are zeroed, so that only weight decay moves them. The mask, a pass over
    the whole forget set, is made once a step will run (not when the target is met at the
    start), and a calibrated run counts its time in its budget."""
    hooks = []

    def mask_gradients():
        masks = saliency_mask(model, tokenizer, forget, config)
        hooks.extend(p.register_hook(lambda grad, mask=masks[n]: grad * mask)
                     for n, p in model.named_parameters() if n in masks)

    try:
        return random_relabel(model, tokenizer, forget, retain, config, progress, heldout, desc="SalUn",
                              prepare=mask_gradients)
    finally:
        for hook in hooks:
            hook.remove()


NPO_BETA = 0.1


def npo(model, tokenizer, forget, retain, config, progress=True, heldout=None):
    """Negative preference optimisation (Zhang et al. 2024) for a classifier: on forget samples
    -(2 / beta) log sigmoid(beta * (CE_model - CE_reference)), with the original as the frozen
    reference (beta 0.1): a bounded push away from the forget labels, unlike gradient ascent;
    plus CE on the retain samples."""
    reference = []  # made once a step will run (train_steps' prepare)

    def step(model, inputs, labels, forget_mask):
        logits = model(**inputs).logits
        if not forget_mask.any():
            ce = cross_entropy(logits, labels)
            return ce, {"ce": ce.detach()}
        with torch.no_grad():
            reference_ce = _sample_ce(reference[0](**inputs).logits[forget_mask], labels[forget_mask])
        margin = _sample_ce(logits[forget_mask], labels[forget_mask]) - reference_ce
        preference = -(2 / NPO_BETA) * F.logsigmoid(NPO_BETA * margin).mean()
        ce = cross_entropy(logits[~forget_mask], labels[~forget_mask])
        return preference + ce, {"npo": preference.detach(), "ce": ce.detach()}

    return train_steps(model, tokenizer, forget, retain, config, step, progress=progress, desc="NPO",
                       calibrator=_calibrator(tokenizer, forget, retain, heldout, config),
                       prepare=lambda: reference.append(_frozen(model)))


def _sample_ce(logits, labels):
    """CE per sample (the mean over its labelled tokens, for token classification)."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(1).clamp(min=1)
    return per_token.view(labels.shape).sum(1) / counts


METHODS = {f.__name__: f for f in (original, deepcut, finetune_retain, gradient_ascent, gradient_difference,
                                   random_relabel, scrub, salun, npo)}
