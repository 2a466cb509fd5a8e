"""The fused op's memory plan: every buffer one forward+backward allocates, checked against
``ops.memory_plan``, and the plan's peak at M = N = 1M, D = 512 in bf16 under 8 GB.

The allocations are recorded with a TorchDispatchMode (each op output that is not a view of,
or written into, one of its inputs). The Triton kernels are replaced by stubs that only zero their outputs: their tiles
live in registers and shared memory, and the interpreter's own scratch is not what a GPU
allocates.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import available_fused_backends
from deepcut_fast import contrastive_unlearn_loss, ops
from deepcut_fast.testing import synthetic_batch

pytestmark = pytest.mark.skipif("triton" not in str(available_fused_backends()), reason="needs the triton backend")


class Allocations(TorchDispatchMode):
    """(op, shape, dtype, bytes) of every storage an op creates inside the block: an output
    that is not a view of (or written into) one of the op's inputs."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.log.append((str(func), tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return out


class ZeroingKernel:
    """Stands in for a Triton launcher: ``kernel[grid](*args)`` zeroes the output buffers."""

    def __init__(self, outputs):
        self.outputs = outputs

    def __getitem__(self, grid):
        return lambda *args, **kwargs: [args[i].zero_() for i in self.outputs]


ROWS, DIM, CHUNK_ROWS = 96, 256, 8  # sizes where [rows, D], chunk and per-row buffers differ in size


@pytest.fixture
def stubbed(monkeypatch):
    from deepcut_fast.kernels import contrastive

    monkeypatch.setattr(ops, "NORMALIZE_CHUNK_BYTES", CHUNK_ROWS * DIM * 4)
    monkeypatch.setattr(contrastive, "forward_kernel", ZeroingKernel([12, 13, 14]))
    monkeypatch.setattr(contrastive, "score_grad_kernel", ZeroingKernel([14]))
    monkeypatch.setattr(contrastive, "product_kernel", ZeroingKernel([2]))
    monkeypatch.setattr(contrastive, "anchor_grad_kernel", ZeroingKernel([14]))
    monkeypatch.setattr(contrastive, "candidate_grad_kernel", ZeroingKernel([14]))
    return contrastive


def sizes(log, low, high):
    return sorted((shape, str(kind)) for _, shape, kind, size in log if low < size <= high)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_op_allocates_exactly_its_memory_plan(stubbed, dtype):
    batch = synthetic_batch(ROWS // 2, DIM, views=2, classes=5, forget_fraction=0.1, dtype=dtype)
    z = batch.pop("z").requires_grad_()
    with Allocations() as recorded:
        contrastive_unlearn_loss(z, **batch, temperature=0.5, backend="triton").backward()
    full, chunk, per_row = ROWS * DIM * z.element_size(), CHUNK_ROWS * DIM * 4, 8 * ROWS
    # [rows, D]: the unit rows, du as the op returns it (in the input dtype), dz
    assert sizes(recorded.log, chunk, 1 << 40) == [((ROWS, DIM), str(dtype))] * 3
    # everything else: the normalisation's chunks of rows, and O(rows) vectors
    assert all(shape[0] == CHUNK_ROWS for shape, _ in sizes(recorded.log, per_row, chunk))
    plan = ops.memory_plan(ROWS, DIM, dtype)
    assert sum(size for _, _, _, size in recorded.log if size <= per_row) <= plan["per_row"]
    assert plan["unit_rows"] == plan["dz"] == full


@pytest.mark.parametrize("dim", [DIM, 320])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_backward_launcher_keeps_one_fp32_gradient_buffer(stubbed, dtype, dim):
    """Inside the op: du in fp32, into which the self case's candidate term is added in place
    (no second [rows, D] buffer, no sum of two), and for rows that are not narrow fp16/bf16 ones
    one block of dL/ds columns."""
    u = torch.randn(ROWS, dim).to(dtype)
    labels, forget, ids = torch.zeros(ROWS, dtype=torch.long), torch.zeros(ROWS, dtype=torch.bool), torch.arange(ROWS)
    stats = (torch.zeros(ROWS), torch.zeros(ROWS), torch.zeros(ROWS, dtype=torch.int32))
    grad = torch.ones(ROWS)
    with Allocations() as recorded:
        du, dc = stubbed.backward(grad, u, labels, forget, ids, None, None, *stats, 0.5, True, -100, True, True, False)
    assert dc is None and du.dtype == torch.float32
    narrow = dtype != torch.float32 and dim <= stubbed.WIDE_D
    columns = 0 if narrow else stubbed.MIN_SCRATCH_COLUMNS  # ROWS rows fit in one block of the smallest width
    scratch = [] if narrow else [((ROWS, columns), str(dtype))]
    assert sizes(recorded.log, CHUNK_ROWS * dim * 4, 1 << 40) == sorted([((ROWS, dim), "torch.float32")] + scratch)
    plan = ops.memory_plan(ROWS, dim, dtype)
    assert plan["du_fp32"] == du.untyped_storage().nbytes()
    assert plan["ds_scratch"] == ROWS * columns * u.element_size()


def test_the_scratch_stays_within_its_budget_and_covers_the_columns():
    from deepcut_fast.kernels.contrastive import DS_SCRATCH_BYTES, MIN_SCRATCH_COLUMNS, scratch_columns

    assert scratch_columns(32 * 1024, 32 * 1024, 2) == 2048  # 128 MiB of bf16 at 32k anchors
    assert scratch_columns(32 * 1024, 32 * 1024, 4) == 1024
    assert scratch_columns(4096, 1000, 2) == 1024  # a whole small N in one block
    assert scratch_columns(1 << 20, 1 << 20, 2) == MIN_SCRATCH_COLUMNS  # the floor, above the budget
    for rows, cols, size in ((100, 5000, 2), (12345, 70000, 4), (1 << 17, 1 << 17, 2)):
        columns = scratch_columns(rows, cols, size)
        assert columns >= MIN_SCRATCH_COLUMNS and columns & (columns - 1) == 0
        assert rows * columns * size <= max(DS_SCRATCH_BYTES, rows * MIN_SCRATCH_COLUMNS * size)


def test_one_million_rows_of_512_in_bf16_peak_under_8_gb():
    plan = ops.memory_plan(1 << 20, 512, torch.bfloat16)
    assert plan["peak"] < 8e9
    # z, the unit rows, du in fp32 and its cast (1 + 1 + 2 + 1 GiB), 128 MiB of per-row vectors;
    # the 512 MiB dL/ds scratch is freed before the cast
    assert plan["ds_scratch"] == 2 ** 29
    assert plan["peak"] == 5 * 2 ** 30 + (1 << 20) * 128
