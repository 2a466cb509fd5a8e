"""Property-based: every backend against the float64 reference over random inputs.

Hypothesis draws the embedding dtype, the integer dtype of labels and instance ids (unsigned
bytes included), shapes, memory layouts (strided and transposed embeddings, strided labels),
temperatures from 1e-4 to 1, unnormalised embeddings up to 1e3 in size, forget and ignore
masks, candidates, both pulls and all three reductions. A backend must give the reference's
answer within the dtype's tolerance, or refuse with an error saying that the loss does not fit
the dtype, and then only where it truly does not; a gradient beyond the dtype's range must
overflow to inf, not to a finite wrong value.

Profiles: the normal run draws DEEPCUT_HYPOTHESIS_EXAMPLES (default 25) cases per backend; the
long profile (README, "Numerics") is

    DEEPCUT_HYPOTHESIS_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_properties.py --hypothesis-show-statistics
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from batches import assert_matches, loss_and_grads, make_batch, reference_float64
from conftest import available_fused_backends, backend_device
from deepcut_fast import contrastive_unlearn_loss, contrastive_unlearn_loss_reference

EXAMPLES = int(os.environ.get("DEEPCUT_HYPOTHESIS_EXAMPLES", "25"))
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
INTEGERS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def relayout(x, layout):
    """The same values in another memory layout: every other column of a wider buffer, or
    column-major; vectors: every other element of a longer buffer."""
    if layout == "contiguous":
        return x
    if x.dim() == 1:
        wide = x.new_zeros(2 * x.shape[0])
        wide[::2] = x
        return wide[::2]
    if layout == "transposed":
        return x.t().contiguous().t()
    wide = x.new_zeros(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x
    return wide[:, ::2]


@st.composite
def inputs(draw):
    integer = draw(st.sampled_from(INTEGERS))
    normalize = draw(st.booleans())
    args = dict(samples=draw(st.integers(1, 40)), dim=draw(st.integers(1, 70)),
                classes=draw(st.integers(1, 5)),
                views=draw(st.integers(1, 3)), forget_frac=draw(st.floats(0, 1)),
                # an unsigned byte cannot hold ignore_index = -100
                ignore_frac=0.0 if integer == torch.uint8 else draw(st.sampled_from([0.0, 0.2])),
                n_candidates=draw(st.one_of(st.none(), st.integers(1, 70))), seed=draw(st.integers(0, 2 ** 16)))
    options = dict(forget_pull=draw(st.sampled_from(["logsumexp", "mean"])),
                   reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                   temperature=10 ** draw(st.floats(-4, 0)), normalize=normalize)
    scale = 1.0 if normalize else 10 ** draw(st.floats(-2, 3))
    return args, options, dict(dtype=draw(st.sampled_from(FLOATS)), integer=integer, scale=scale,
                               layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])))


def draw_batch(args, drawn, device):
    batch = make_batch(**args, device=device)
    batch["z"] = batch["z"] * drawn["scale"]
    if batch.get("candidates") is not None:
        batch["candidates"] = batch["candidates"] * drawn["scale"]
    for key in ("z", "candidates"):
        if key in batch:
            batch[key] = relayout(batch[key].to(drawn["dtype"]), drawn["layout"])
    for key in ("labels", "instance_ids", "candidate_labels"):
        if key in batch:
            batch[key] = relayout(batch[key].to(drawn["integer"]), drawn["layout"])
    return batch


@pytest.mark.parametrize("backend", available_fused_backends() + ["reference"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=inputs())
def test_every_backend_matches_the_float64_reference(backend, case):
    args, options, drawn = case
    dtype = drawn["dtype"]
    batch = draw_batch(args, drawn, backend_device(backend) if backend != "reference" else "cpu")
    upstream = torch.linspace(-1.0, 2.0, batch["z"].shape[0]) if options["reduction"] == "none" else None
    want = reference_float64(batch, upstream, **options)
    try:
        got = loss_and_grads(contrastive_unlearn_loss, batch, upstream, backend=backend, **options)
    except ValueError as err:
        assert "does not fit in" in str(err), err
        # a refusal is right only where the exact loss is out of the dtype's range
        assert want[0].abs().max().item() > 0.99 * torch.finfo(dtype).max, err
        return
    largest = torch.finfo(dtype).max
    if any(w.abs().max().item() > 0.99 * largest for w in want[1]):
        # the exact gradient does not fit the dtype: it overflows to inf, as IEEE rounding (and a
        # GradScaler, which skips such a step) expect, where it is beyond the range
        for g, w in zip(got[1], want[1]):
            beyond = w.cpu().abs() > 1.01 * largest
            assert not torch.isfinite(g.cpu()[beyond]).any(), f"{backend} {drawn}: a finite gradient beyond {dtype}"
        return
    bound, floors = None, (0.0, 0.0)
    if not options["normalize"]:  # the largest logit the rows allow
        rows = batch["z"].double().norm(dim=1).max()
        others = rows if batch.get("candidates") is None else batch["candidates"].double().norm(dim=1).max()
        bound = (rows * others).item() / options["temperature"]
    else:
        floors = unit_row_gradient_scales(batch, upstream, options)
    assert_matches(got, want, dtype, options["temperature"], f"{backend} {drawn}", bound, floors)


def unit_row_gradient_scales(batch, upstream, options):
    """For normalised inputs: max_i |dL/du_i| / |z_i| of z (and of the candidates). Rounding
    errs relative to the gradient with respect to the unit rows u = z / |z|; the normalisation's
    backward then projects out the part along u and divides by |z|. Where that projection
    cancels most of the gradient (at D = 1 all of it), what remains is small next to the
    rounding, so errors are measured against this scale rather than the projected gradient."""
    wide = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    units = {k: torch.nn.functional.normalize(wide[k], dim=1) for k in ("z", "candidates") if k in wide}
    _, grads = loss_and_grads(contrastive_unlearn_loss_reference, dict(wide, **units), upstream,
                              **dict(options, normalize=False))
    norms = [wide[k].norm(dim=1) for k in ("z", "candidates") if k in wide]
    return tuple((g.norm(dim=1) / n).max().item() for g, n in zip(grads, norms)) + (0.0,)
