"""CPU: fused C++ kernel vs the eager reference, fp32 forward+backward (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_cpu.py --benchmark-enable --benchmark-group-by=param:rows
    DEEPCUT_BENCH_LARGE=1 ...   # adds M = N = 65536 (minutes; the reference runs out of memory)

Time comes from pytest-benchmark; the peak extra memory of one call is measured in a fresh
process (benchmarks/cpu_memory.py, median of 3) and stored in each result's extra_info.
In the normal test run (--benchmark-disable) each case runs once, so the suite stays correct.
"""
import os
import statistics

import pytest
import torch

from benchmarks.cpu_memory import peak_extra_memory
from deepcut_fast import compiled, contrastive_unlearn_loss
from deepcut_fast.cli import _example_batch

DIM = 384
LARGE = os.environ.get("DEEPCUT_BENCH_LARGE") == "1"
ROWS = [1024, 4096] + ([65536] if LARGE else [])
MEMORY_LIMIT_GB = 16  # a method that needs more is recorded as OOM rather than swapping the host


@pytest.mark.skipif(compiled.unavailable_reason("cpu") is not None, reason="CPU kernel not built")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rows", ROWS)
def test_forward_backward(benchmark, backend, rows):
    memory = [peak_extra_memory(backend, rows, DIM, MEMORY_LIMIT_GB) for _ in range(3 if rows <= 4096 else 1)]
    benchmark.extra_info.update(dim=DIM, dtype="float32", threads=torch.get_num_threads())
    if any(m["oom"] for m in memory):
        benchmark.extra_info["oom"] = True
        pytest.skip(f"{backend} OOM at M = N = {rows} under a {MEMORY_LIMIT_GB} GB limit: {memory[0]['error']}")
    benchmark.extra_info["peak_extra_mb"] = statistics.median(m["peak_extra_bytes"] for m in memory) / 2 ** 20

    z, labels, forget, ids = _example_batch(rows, DIM, 5, 2, 0.1, "cpu", torch.float32, seed=0)

    def step():
        x = z.detach().requires_grad_()
        loss = contrastive_unlearn_loss(x, labels, forget, instance_ids=ids, temperature=0.5, backend=backend)
        loss.backward()
        return loss.detach(), x.grad

    loss, grad = benchmark.pedantic(step, rounds=3 if rows <= 4096 else 1, warmup_rounds=1 if rows <= 4096 else 0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
