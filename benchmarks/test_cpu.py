"""CPU: fused C++ kernel vs the eager reference, fp32 forward+backward (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_cpu.py --benchmark-enable --benchmark-group-by=param:rows
    DEEPCUT_BENCH_LARGE=1 ...   # adds M = N = 65536 (minutes; the reference runs out of memory)

Time comes from pytest-benchmark; the peak extra memory of one call is measured in a fresh
process (benchmarks/cpu_memory.py, median of 3) and stored in each result's extra_info.
In the normal test run (--benchmark-disable) each case runs once, without the memory
subprocesses, and its loss is checked against the float64 reference.
"""
import os
import statistics

import pytest
import torch

from benchmarks.cpu_memory import TEMPERATURE, peak_extra_memory, workload
from deepcut_fast import available_backends, contrastive_unlearn_loss, contrastive_unlearn_loss_reference

DIM = 384
LARGE = os.environ.get("DEEPCUT_BENCH_LARGE") == "1"
ROWS = [1024, 4096] + ([65536] if LARGE else [])
MEMORY_LIMIT_GB = 16  # a method that needs more is recorded as OOM rather than swapping the host


@pytest.mark.skipif(available_backends()["cpu"] is not None, reason="CPU kernel not built")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rows", ROWS)
def test_forward_backward(benchmark, backend, rows):
    batch = workload(rows, DIM)

    def step():
        x = batch["z"].detach().requires_grad_()
        loss = contrastive_unlearn_loss(**dict(batch, z=x), temperature=TEMPERATURE, backend=backend)
        loss.backward()
        return loss.detach(), x.grad

    if benchmark.disabled:  # the normal test run: one call, checked against float64
        loss, grad = benchmark(step)
        wide = dict(batch, z=batch["z"].double())
        expected = contrastive_unlearn_loss_reference(**wide, temperature=TEMPERATURE)
        assert abs(loss.item() - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))
        assert torch.isfinite(grad).all()
        return
    memory = [peak_extra_memory(backend, rows, DIM, MEMORY_LIMIT_GB) for _ in range(3 if rows <= 4096 else 1)]
    benchmark.extra_info.update(dim=DIM, dtype="float32", threads=torch.get_num_threads())
    if any(m["oom"] for m in memory):
        benchmark.extra_info["oom"] = True
        pytest.skip(f"{backend} OOM at M = N = {rows} under a {MEMORY_LIMIT_GB} GB limit: {memory[0]['error']}")
    benchmark.extra_info["peak_extra_mb"] = statistics.median(m["peak_extra_bytes"] for m in memory) / 2 ** 20
    loss, grad = benchmark.pedantic(step, rounds=3 if rows <= 4096 else 1, warmup_rounds=1 if rows <= 4096 else 0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.skipif(available_backends()["cpu"] is not None, reason="CPU kernel not built")
def test_memory_probe_sees_the_reference_matrices():
    """The memory probe itself: at M = N = 2048 the reference holds several M x N fp32 matrices
    (16 MiB each), the fused kernel only O((M + N) D) buffers."""
    fused, reference = (peak_extra_memory(b, 2048, 64)["peak_extra_bytes"] for b in ("cpu", "reference"))
    assert reference > 3 * 2048 * 2048 * 4
    assert fused < reference / 4
