"""Synthetic batches and comparison helpers shared by the tests."""
import torch

from deepcut_fast import contrastive_unlearn_loss_reference

# Unit roundoff of each input dtype; tolerances below scale with it and with 1/temperature,
# because similarities of rounded unit vectors are off by ~eps and the loss divides them by tau.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FP32_FLOOR = 2e-5  # fp32 accumulation over N terms and exp2 approximations on GPU


def tolerance(dtype, temperature):
    """Allowed error relative to max(1, |loss|) for the loss, and to the gradient scale below."""
    return max(FP32_FLOOR, 4 * UNIT_ROUNDOFF[dtype] / temperature)


def gradient_scale(reference_grad, temperature, rows):
    """max|reference grad|, but at least 1 / (tau * rows), the size of dL/du for a mean over
    `rows` anchors: where the exact gradient cancels to 0 (an anchor whose only contrast row
    is its only positive, D = 1 normalisation) rounding of O(1/tau) terms remains."""
    return max(reference_grad.abs().max().item(), 1.0 / (temperature * rows))


def make_batch(samples, dim, *, classes=3, views=1, forget_frac=0.3, ignore_frac=0.0,
               n_candidates=None, seed=0, device="cpu", dtype=torch.float32, whole_class=None):
    """A batch of `samples` x `views` rows: views of a sample are noisy copies of one embedding
    (like dropout passes), sharing label, forget flag and instance id."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, dim, generator=g)
    z = base.repeat_interleave(views, 0) + 0.3 * torch.randn(samples * views, dim, generator=g)
    sample_labels = torch.randint(0, classes, (samples,), generator=g)
    sample_forget = torch.rand(samples, generator=g) < forget_frac
    if whole_class is not None:
        sample_forget = sample_labels == whole_class
    labels = sample_labels.repeat_interleave(views)
    labels[torch.rand(samples * views, generator=g) < ignore_frac] = -100
    batch = dict(z=z.to(dtype), labels=labels, forget_mask=sample_forget.repeat_interleave(views),
                 instance_ids=torch.arange(samples).repeat_interleave(views))
    if n_candidates is not None:
        candidate_labels = torch.randint(0, classes, (n_candidates,), generator=g)
        candidate_labels[torch.rand(n_candidates, generator=g) < ignore_frac] = -100
        batch.update(candidates=torch.randn(n_candidates, dim, generator=g).to(dtype),
                     candidate_labels=candidate_labels)
    return {k: v.to(device) for k, v in batch.items()}


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


def assert_matches(actual, expected, dtype, temperature, what):
    """Loss and gradients within `tolerance` of the reference (see gradient_scale)."""
    tol = tolerance(dtype, temperature)
    loss, grads = actual
    ref_loss, ref_grads = expected
    scale = ref_loss.abs().max().clamp(min=1.0)
    err = ((loss.double().cpu() - ref_loss.cpu()).abs().max() / scale).item()
    assert err <= tol, f"{what}: loss error {err:.3g} > {tol:.3g}"
    for name, g, r in zip(("dz", "dcandidates"), grads, ref_grads):
        err = (g.double().cpu() - r.cpu()).abs().max().item() / gradient_scale(r, temperature, len(r))
        assert err <= tol, f"{what}: {name} error {err:.3g} > {tol:.3g}"
