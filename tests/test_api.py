"""Public API: argument checks, valid edge cases, dispatch and the module wrapper."""
import pytest
import torch

from batches import make_batch
from conftest import backend_device
from deepcut_fast import ContrastiveUnlearnLoss, contrastive_unlearn_loss, ops
from deepcut_fast import contrastive_unlearn_loss_reference as reference
from deepcut_fast.reference import pair_masks


@pytest.fixture
def batch():
    return make_batch(10, 8, views=2, n_candidates=7)


def call(batch, **changes):
    args = dict(batch, **changes)
    return contrastive_unlearn_loss(args.pop("z"), args.pop("labels"), args.pop("forget_mask"), **args)


@pytest.mark.parametrize("changes, error, message", [
    (dict(z=torch.randn(20)), ValueError, "z must have shape \\[rows, D\\]"),
    (dict(z=torch.randint(0, 3, (20, 8))), TypeError, "z must be float32"),
    (dict(z=torch.randn(0, 8), labels=torch.zeros(0, dtype=torch.long), forget_mask=torch.zeros(0, dtype=torch.bool),
          instance_ids=None), ValueError, "z must have at least one row"),
    (dict(labels=torch.zeros(19, dtype=torch.long)), ValueError, "labels must have shape \\[20\\]"),
    (dict(labels=torch.zeros(20)), TypeError, "labels must be an integer tensor"),
    (dict(forget_mask=torch.zeros(20, dtype=torch.long)), TypeError, "forget_mask must be a bool tensor"),
    (dict(forget_mask=torch.zeros(21, dtype=torch.bool)), ValueError, "forget_mask must have shape \\[20\\]"),
    (dict(instance_ids=torch.zeros(20)), TypeError, "instance_ids must be an integer tensor"),
    (dict(candidate_labels=None), ValueError, "candidates need candidate_labels"),
    (dict(candidates=None), ValueError, "candidate_labels was given without candidates"),
    (dict(candidates=torch.randn(7, 9)), ValueError, "candidates must have D = 8"),
    (dict(candidates=torch.randn(7, 8, dtype=torch.float64)), TypeError, "candidates must have z's dtype"),
    (dict(candidate_labels=torch.zeros(6, dtype=torch.long)), ValueError, "candidate_labels must have shape \\[7\\]"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=-0.1), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
    (dict(forget_weight=float("inf")), ValueError, "forget_weight must be a finite number"),
    (dict(forget_pull="max"), ValueError, "forget_pull must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
    (dict(labels=torch.tensor([-3] + [0] * 19)), ValueError, "labels must be class ids >= 0 or ignore_index=-100, found -3"),
    (dict(candidate_labels=torch.tensor([-5] + [0] * 6)), ValueError, "candidate_labels must be class ids >= 0"),
])
def test_bad_arguments_raise_clear_errors(batch, changes, error, message):
    with pytest.raises(error, match=message):
        call(batch, **changes)


@pytest.mark.parametrize("name, value", [("nan", float("nan")), ("inf", float("inf"))])
@pytest.mark.parametrize("where", ["z", "candidates"])
def test_non_finite_embeddings_are_rejected(batch, name, value, where):
    bad = batch[where].clone()
    bad[3, 2] = value
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        call(batch, **{where: bad})


def test_devices_must_agree(batch):
    meta = torch.zeros(20, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels is on meta but z is on cpu"):
        call(batch, labels=meta)


def test_unavailable_backend_says_why():
    reason = ops.backend_unavailable_reason("triton", torch.device("cpu"), torch.float64)
    assert "float32, float16 or bfloat16" in reason
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable: fused kernels take"):
        call(make_batch(4, 3, dtype=torch.float64), backend="triton")


def test_auto_picks_the_compiled_kernel_on_cpu_and_triton_on_cuda():
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float64) == "reference"
    if torch.cuda.is_available():
        assert ops.resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"


def test_missing_extension_names_the_install_command(monkeypatch):
    from deepcut_fast import compiled

    monkeypatch.setattr(compiled, "_C", None)
    monkeypatch.setattr(compiled, "_IMPORT_ERROR", "deepcut_fast._C is missing; " + compiled.INSTALL_HINT)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        call(make_batch(4, 3), backend="cpu")
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"


def test_the_retired_cuda_backend_is_an_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpu', 'reference'\)"):
        call(make_batch(4, 3), backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("forget_frac, ignore_frac, classes", [
    (0.0, 0.0, 3),   # no forget rows
    (1.0, 0.0, 3),   # no retain rows: forget anchors have no positives
    (0.3, 1.0, 3),   # every row ignored
    (0.3, 0.0, 1),   # a single class: forget anchors have no positives
])
def test_degenerate_batches_are_valid(backend, forget_frac, ignore_frac, classes):
    b = make_batch(6, 5, views=2, classes=classes, forget_frac=forget_frac, ignore_frac=ignore_frac,
                   device=backend_device(backend))
    z = b.pop("z").requires_grad_()
    loss = contrastive_unlearn_loss(z, **b, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    if forget_frac == 1.0 or ignore_frac == 1.0:  # nothing counted: 0 and no gradient
        assert loss.item() == 0.0 and not z.grad.any()


def test_groups_are_weighted_and_averaged_separately():
    b = make_batch(12, 6, views=2, forget_frac=0.4, dtype=torch.float64)
    per_anchor = reference(**b, reduction="none")
    forget = b["forget_mask"]
    _, in_p = pair_masks(b["labels"], forget, b["labels"], b["instance_ids"], True, -100)
    counted = in_p.any(1)
    want = 0.3 * per_anchor[forget & counted].mean() + 2.0 * per_anchor[~forget & counted].mean()
    got = contrastive_unlearn_loss(**b, forget_weight=0.3, retain_weight=2.0)
    torch.testing.assert_close(got, want)


def test_module_wrapper_matches_function():
    b = make_batch(10, 8, views=2, n_candidates=7)
    module = ContrastiveUnlearnLoss(temperature=0.2, forget_pull="mean", reduction="sum")
    assert "temperature=0.2" in repr(module)
    want = contrastive_unlearn_loss(**b, temperature=0.2, forget_pull="mean", reduction="sum")
    torch.testing.assert_close(module(**b), want)


def test_reference_backend_in_fp16_at_small_temperature():
    """The reference computes fp16 inputs in fp32: at tau = 1e-4 it returned -inf before, and at
    tau = 1e-6 (a loss above fp16's range) nan; now the value, and an error."""
    from batches import reference_float64

    b = make_batch(40, 16, classes=3, seed=3, dtype=torch.float16)
    want = reference_float64(b, temperature=1e-4)[0].item()
    got = contrastive_unlearn_loss(**b, temperature=1e-4, backend="reference").item()
    assert abs(got - want) <= 4 * 2 ** -11 * want
    with pytest.raises(ValueError, match="does not fit in float16"):
        contrastive_unlearn_loss(**b, temperature=1e-6, backend="reference")


def test_unit_rows_match_normalize_and_its_gradient(monkeypatch):
    """The normaliser that recomputes in chunks instead of keeping an fp32 copy: same values and
    gradients as F.normalize, over several chunks, with a zero row (below eps)."""
    monkeypatch.setattr(ops, "NORMALIZE_CHUNK_BYTES", 4 * 5 * 3)  # chunks of 3 rows of D = 5
    x = torch.randn(10, 5, dtype=torch.float64)
    x[4] = 0.0
    torch.testing.assert_close(ops.UnitRows.apply(x), torch.nn.functional.normalize(x, dim=1, eps=1e-12))
    torch.autograd.gradcheck(ops.UnitRows.apply, (x[[0, 1, 2, 3, 5, 6, 7]].clone().requires_grad_(),))
    g = torch.randn(10, 5, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (ops.UnitRows.apply(leaf) * g).sum().backward()
    ref = x.clone().requires_grad_()
    (torch.nn.functional.normalize(ref, dim=1, eps=1e-12) * g).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)
