"""Synthetic batches and comparison helpers shared by the tests."""
import torch

from deepcut_fast import contrastive_unlearn_loss_reference
from deepcut_fast.testing import synthetic_batch

# Unit roundoff of each input dtype; tolerances below scale with it and with 1/temperature,
# because similarities of rounded unit vectors are off by ~eps and the loss divides them by tau.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FP32_FLOOR = 2e-5  # fp32 accumulation over N terms and exp2 approximations on GPU


def tolerance(dtype, temperature, logit_bound=None):
    """Allowed error relative to max(1, |loss|) for the loss, and to the gradient scale below.
    Rounding moves a similarity by about u * |s|: |s| <= 1/tau for unit rows; unnormalised rows
    pass ``logit_bound`` (max |z_i| * max |c_j| / tau), since large logits round coarser."""
    largest_logit = 1 / temperature if logit_bound is None else max(1 / temperature, logit_bound)
    return max(FP32_FLOOR, 4 * UNIT_ROUNDOFF[dtype] * largest_logit)


def gradient_scale(reference_grad, temperature, rows):
    """max|reference grad|, but at least 1 / (tau * rows), the size of dL/du for a mean over
    `rows` anchors: where the exact gradient cancels to 0 (an anchor whose only contrast row
    is its only positive, D = 1 normalisation) rounding of O(1/tau) terms remains."""
    return max(reference_grad.abs().max().item(), 1.0 / (temperature * rows))


def make_batch(samples, dim, *, forget_frac=0.3, ignore_frac=0.0, n_candidates=None, **options):
    """``synthetic_batch`` with the tests' argument names."""
    return synthetic_batch(samples, dim, forget_fraction=forget_frac, ignore_fraction=ignore_frac,
                           candidates=n_candidates, **options)


def loss_and_grads(loss_fn, batch, upstream=None, **options):
    """Loss and gradients w.r.t. z (and candidates) of `loss_fn` on a copy of `batch`."""
    batch = dict(batch)
    leaves = [batch["z"].detach().clone().requires_grad_()]
    batch["z"] = leaves[0]
    if batch.get("candidates") is not None:
        leaves.append(batch["candidates"].detach().clone().requires_grad_())
        batch["candidates"] = leaves[1]
    loss = loss_fn(**batch, **options)
    weighted = loss if upstream is None else (loss * upstream.to(loss.device, loss.dtype)).sum()
    grads = torch.autograd.grad(weighted, leaves)
    return loss.detach(), grads


def reference_float64(batch, upstream=None, **options):
    """The oracle: the reference in float64 on the same (already rounded) input values."""
    wide = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    return loss_and_grads(contrastive_unlearn_loss_reference, wide, upstream, **options)


def assert_matches(actual, expected, dtype, temperature, what, logit_bound=None, gradient_floors=(0.0, 0.0)):
    """Loss and gradients within `tolerance` of the reference (see gradient_scale; a gradient's
    scale is at least its entry of ``gradient_floors``)."""
    tol = tolerance(dtype, temperature, logit_bound)
    loss, grads = actual
    ref_loss, ref_grads = expected
    scale = ref_loss.abs().max().clamp(min=1.0)
    err = ((loss.double().cpu() - ref_loss.cpu()).abs().max() / scale).item()
    assert err <= tol, f"{what}: loss error {err:.3g} > {tol:.3g}"
    for name, g, r, floor in zip(("dz", "dcandidates"), grads, ref_grads, gradient_floors):
        err = (g.double().cpu() - r.cpu()).abs().max().item() / max(floor, gradient_scale(r, temperature, len(r)))
        assert err <= tol, f"{what}: {name} error {err:.3g} > {tol:.3g}"
