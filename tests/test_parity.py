"""Every fused backend against the float64 reference, on the cases docs/spec.md singles out.

Under CPU-only CI the Triton kernels run in Triton's interpreter (see conftest.py); on a GPU
machine the same tests run the compiled kernels.
"""
import pytest
import torch

from batches import assert_matches, loss_and_grads, make_batch, reference_float64
from conftest import available_fused_backends, backend_device
from deepcut_fast import contrastive_unlearn_loss

pytestmark = pytest.mark.parametrize("backend", available_fused_backends())

# name: (make_batch arguments, loss options)
CASES = {
    "ragged_candidates": (dict(samples=37, dim=257, n_candidates=100), {}),
    "ragged_self": (dict(samples=100, dim=257), {}),
    "m_ne_n": (dict(samples=50, dim=64, n_candidates=130, classes=4), {}),
    "no_positives": (dict(samples=20, dim=24, classes=1000), {}),
    "single_class": (dict(samples=40, dim=33, classes=1), {}),
    "all_forget": (dict(samples=30, dim=40, forget_frac=1.0), {}),
    "no_forget": (dict(samples=30, dim=40, forget_frac=0.0), {}),
    "whole_class_forgotten": (dict(samples=45, dim=40, whole_class=1), {}),
    "ignored_rows": (dict(samples=60, dim=48, ignore_frac=0.3), {}),
    "ignored_candidates": (dict(samples=30, dim=48, ignore_frac=0.3, n_candidates=70), {}),
    "two_views": (dict(samples=25, dim=40, views=2), {}),
    "three_views": (dict(samples=17, dim=40, views=3, forget_frac=0.5), {}),
    "mean_pull": (dict(samples=25, dim=40, views=2), dict(forget_pull="mean")),
    "mean_pull_candidates": (dict(samples=25, dim=40, n_candidates=45), dict(forget_pull="mean")),
    "weights": (dict(samples=30, dim=40, views=2), dict(forget_weight=2.5, retain_weight=0.25)),
    "unnormalized": (dict(samples=30, dim=40), dict(normalize=False, temperature=5.0)),
    "one_row": (dict(samples=1, dim=16), {}),
    # at D = 1 normalised rows are +-1 and their gradient is identically 0: test it unnormalised
    "dim_one_unnormalized": (dict(samples=20, dim=1, n_candidates=9), dict(normalize=False)),
}
LOW_PRECISION_CASES = ["ragged_candidates", "ragged_self", "two_views", "ignored_rows", "mean_pull"]


def check(backend, batch_args, options, dtype=torch.float32, upstream=None):
    options = dict(dict(temperature=0.1), **options)
    batch = make_batch(**batch_args, device=backend_device(backend), dtype=dtype)
    got = loss_and_grads(contrastive_unlearn_loss, batch, upstream, backend=backend, **options)
    want = reference_float64(batch, upstream, **options)
    assert_matches(got, want, dtype, options["temperature"], f"{backend} {dtype}")


@pytest.mark.parametrize("case", CASES)
def test_cases_fp32(backend, case):
    check(backend, *CASES[case])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_cases_low_precision(backend, case, dtype):
    check(backend, *CASES[case], dtype=dtype)


@pytest.mark.parametrize("temperature", [0.01, 0.07, 0.3, 1.0])
@pytest.mark.parametrize("pull", ["logsumexp", "mean"])
def test_temperatures(backend, temperature, pull):
    check(backend, dict(samples=24, dim=40, views=2), dict(temperature=temperature, forget_pull=pull))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("candidates", [None, 41])
def test_reductions_with_uneven_upstream_gradient(backend, reduction, candidates):
    rows = 2 * 23
    upstream = torch.linspace(-1.0, 3.0, rows) if reduction == "none" else torch.tensor(-1.7)
    check(backend, dict(samples=23, dim=40, views=2, n_candidates=candidates, ignore_frac=0.1),
          dict(reduction=reduction), upstream=upstream)


def test_detached_candidates(backend):
    batch = make_batch(20, 32, n_candidates=50, device=backend_device(backend))
    z = batch.pop("z").requires_grad_()
    loss = contrastive_unlearn_loss(z, **batch, backend=backend)
    (dz,) = torch.autograd.grad(loss, z)
    ref = dict(batch, z=z.detach().double().requires_grad_(),
               candidates=batch["candidates"].double())
    want = contrastive_unlearn_loss(**ref, backend="reference")
    (want_dz,) = torch.autograd.grad(want, ref["z"])
    torch.testing.assert_close(dz.double(), want_dz, rtol=1e-4, atol=1e-5)


def grad_error(backend, batch, **options):
    """(loss, max |dz - float64 dz| / max |float64 dz|) of one backend."""
    got = loss_and_grads(contrastive_unlearn_loss, batch, backend=backend, **options)
    want = reference_float64(batch, **options)
    return got[0], ((got[1][0].double().cpu() - want[1][0].cpu()).abs().max() / want[1][0].abs().max()).item()


@pytest.mark.parametrize("scale", [1e2, 1e3])
def test_large_unnormalised_logits(backend, scale):
    """Logits of about 2e5 and 2e7 in fp32: the backward must recompute each similarity exactly as
    the forward did (Triton was off by 0.8% and 540% before); the reference itself is 1e-7 off."""
    batch = make_batch(40, 16, classes=3, seed=2, device=backend_device(backend))
    batch["z"] = batch["z"] * scale
    assert grad_error(backend, batch, temperature=0.5, normalize=False)[1] <= 1e-5


@pytest.mark.parametrize("integer", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("samples", [12, 31])
def test_narrow_integer_labels(backend, integer, samples):
    """Labels in any integer dtype (uint8 gave wrong losses on Triton where M was not a tile multiple)."""
    batch = make_batch(samples, 16, classes=3, seed=1, device=backend_device(backend))
    batch = dict(batch, labels=batch["labels"].to(integer), instance_ids=batch["instance_ids"].to(integer))
    assert grad_error(backend, batch, temperature=0.5)[1] <= 1e-5


def test_fp16_small_temperature(backend):
    """tau = 1e-4: the loss (about 6e3) fits fp16 and is returned; at tau = 1e-6 it does not, and
    that is an error rather than inf."""
    batch = make_batch(40, 16, classes=3, seed=3, device=backend_device(backend), dtype=torch.float16)
    loss, _ = grad_error(backend, batch, temperature=1e-4)
    want = reference_float64(batch, temperature=1e-4)[0].item()
    assert abs(loss.item() - want) <= 4 * 2 ** -11 * want
    with pytest.raises(ValueError, match=r"does not fit in float16 \(largest finite value 65504\)"):
        contrastive_unlearn_loss(**batch, temperature=1e-6, backend=backend)


def test_fp16_gradient_with_tiny_coefficients(backend):
    """512 anchors and an upstream gradient of 0.01 make every dL/ds about 1e-7: below fp16's
    smallest normal (6e-5), where rounding dS to fp16 for the tensor-core product lost 16% of
    the gradient. The backward normalises dS first; what remains is the rounding of the fp16
    result itself (the exact gradient rounded to fp16 is about 1.6% off at this scale)."""
    batch = make_batch(256, 32, views=2, classes=5, forget_frac=0.1, device=backend_device(backend),
                       dtype=torch.float16)
    upstream = torch.tensor(1e-2)
    got = loss_and_grads(contrastive_unlearn_loss, batch, upstream, backend=backend, temperature=0.5)[1][0].double()
    want = reference_float64(batch, upstream, temperature=0.5)[1][0].cpu()
    scale = want.abs().max()
    rounding = ((want.half().double() - want).abs().max() / scale).item()
    assert ((got.cpu() - want).abs().max() / scale).item() <= 1.5 * rounding + 1e-3


@pytest.mark.parametrize("temperature", [0.05, 0.0499])
@pytest.mark.parametrize("pull", ["logsumexp", "mean"])
def test_similarities_at_both_bounds_near_the_fixed_shift_threshold(backend, temperature, pull):
    """Rows +-v: every similarity is +1 or -1. With unit rows and a temperature of 0.05 or more
    the Triton kernels shift every exponential by the bound 1/temperature instead of a running
    maximum (a term at -1 is then 2^-58 before the per-row rescale); just below 0.05 they keep
    the running maximum. Both must match the reference."""
    batch = make_batch(30, 16, views=2, classes=3, seed=4, device=backend_device(backend))
    sign = torch.where(batch["labels"] % 2 == 0, 1.0, -1.0).to(batch["z"].device)
    batch["z"] = sign[:, None] * torch.linspace(-1.0, 1.0, 16, device=batch["z"].device)
    options = dict(temperature=temperature, forget_pull=pull)
    got = loss_and_grads(contrastive_unlearn_loss, batch, backend=backend, **options)
    want = reference_float64(batch, **options)
    assert_matches(got, want, torch.float32, temperature, f"{backend} at {temperature}")


@pytest.mark.parametrize("candidates", [None, 23])
def test_keys_beyond_int32(backend, candidates):
    """Labels, instance ids and ignore_index beyond the int32 range: the Triton kernels compare
    int32 keys, so the op codes such keys densely (keeping every equality) and must still match."""
    batch = make_batch(20, 16, views=2, classes=3, ignore_frac=0.2, n_candidates=candidates, seed=5,
                       device=backend_device(backend))
    ignore = 2 ** 41
    for key in ("labels", "candidate_labels"):
        if batch.get(key) is not None:
            batch[key] = torch.where(batch[key] == -100, ignore, batch[key] * 2 ** 33 + 5)
    batch["instance_ids"] = batch["instance_ids"] * 2 ** 35 - 2 ** 40
    options = dict(temperature=0.3, ignore_index=ignore)
    got = loss_and_grads(contrastive_unlearn_loss, batch, backend=backend, **options)
    want = reference_float64(batch, **options)
    assert_matches(got, want, torch.float32, 0.3, f"{backend} with wide keys")


@pytest.mark.parametrize("pull", ["logsumexp", "mean"])
def test_instance_ids_shared_by_forget_and_retain_rows(backend, pull):
    """A forget anchor excludes every row of its own instance, retain rows included: ids that
    mix forget and retain rows (not what the trainer makes, but what a caller may pass) must give
    the same positives as the pairwise definition, for the anchors' own class and the others."""
    batch = make_batch(36, 24, views=2, classes=3, forget_frac=0.4, ignore_frac=0.1, seed=11,
                       device=backend_device(backend))
    rows = batch["labels"].shape[0]
    batch["instance_ids"] = torch.arange(rows, device=batch["labels"].device) % 7  # ids across forget/retain
    assert (batch["forget_mask"] & torch.isin(batch["instance_ids"], batch["instance_ids"][~batch["forget_mask"]])).any()
    options = dict(temperature=0.2, forget_pull=pull)
    got = loss_and_grads(contrastive_unlearn_loss, batch, backend=backend, **options)
    want = reference_float64(batch, **options)
    assert_matches(got, want, torch.float32, 0.2, f"{backend} with shared instance ids")


@pytest.mark.parametrize("tile", [(32, 32), (64, 32), (16, 32)])
@pytest.mark.parametrize("width", ["narrow", "wide"])
@pytest.mark.parametrize("candidates", [None, 150])
@pytest.mark.parametrize("pull", ["logsumexp", "mean"])
def test_every_kind_of_tile(backend, pull, candidates, width, tile, monkeypatch):
    """Enough rows for every kind of tile the Triton kernels walk in ``row_order``: full tiles of
    retain rows (no masks), the diagonal, the last partial retain tile, forget rows, ignored rows
    left out; resident blocks taller, as tall and shorter than the tiles they walk. Narrow rows
    take the resident-row kernels (in the interpreter forced for fp32 rows, to compare at fp32
    tolerances; on a GPU in bf16); wide ones (forced) dL/ds in several blocks of columns, each
    split into several windows, and the products."""
    samples, dtype = 170, torch.float32
    if backend == "triton":
        from deepcut_fast.kernels import contrastive as k

        if k.INTERPRET:  # the interpreter takes any tile: small ones, so that few rows meet every kind
            block_m, block_n = tile
            tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n}
            chunked = [k.triton.Config(dict(tiles, BLOCK_K=32))]
            for name, configs in [("forward", chunked), ("score_grad", chunked),
                                  ("anchor_grad", [k.triton.Config(tiles)]), ("candidate_grad", [k.triton.Config(tiles)])]:
                launcher = getattr(k, f"{name}_kernel")
                monkeypatch.setattr(k, f"{name}_kernel", k.TunedKernel(name, launcher.fn, configs,
                                                                       restore=launcher.restore))
            if width == "narrow":
                monkeypatch.setattr(k, "RESIDENT_DTYPES", k.RESIDENT_DTYPES + (torch.float32,))
            block_n = tile[1]
        elif tile != (32, 32):
            pytest.skip("a GPU takes its own tiles")
        else:  # the GPU's tiles are up to 128 rows
            samples, dtype, block_n = 1500, torch.bfloat16 if width == "narrow" else torch.float32, 64
        if width == "wide":
            monkeypatch.setattr(k, "WIDE_D", 0)
        monkeypatch.setattr(k, "DS_SCRATCH_BYTES", 0)
        monkeypatch.setattr(k, "MIN_SCRATCH_COLUMNS", 4 * block_n)  # blocks of 4 tiles of columns
        monkeypatch.setattr(k, "SCORE_GRAD_SPAN", 2 * block_n)  # windows of 2 tiles
    elif (tile, width) != ((32, 32), "narrow"):
        pytest.skip("tiles and widths are the Triton kernels'")
    check(backend, dict(samples=samples, dim=40, classes=4, forget_frac=0.15, ignore_frac=0.1,
                        n_candidates=candidates and samples - 20, seed=3), dict(forget_pull=pull), dtype=dtype)
