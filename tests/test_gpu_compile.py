"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU.

The interpreter accepts code the GPU compiler refuses and cannot show which instructions a
dot becomes. aot_compile.py compiles each kernel for A100 and H100 targets, for every input
dtype and every tile config the autotuner may pick, specialised as the runtime does; here the PTX must use tensor cores
(mma.sync on sm_80, wgmma on sm_90) in the input dtype for fp16/bf16, and shared memory must
fit the target (Triton would only report that at launch time, on the GPU).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = (80, 90)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block (opt-in maximum)


@pytest.fixture(scope="module")
def compiled():
    """Compile once per architecture, both at the same time, in processes without the interpreter."""
    script = Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(script.parents[1])] + env.get("PYTHONPATH", "").split(os.pathsep))
    procs = [subprocess.Popen([sys.executable, str(script), str(a)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in ARCHS]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        results += json.loads(out)
    return results


def test_every_variant_was_compiled(compiled):
    assert {r["arch"] for r in compiled} == set(ARCHS)
    assert {r["dtype"] for r in compiled} == {"fp32", "fp16", "bf16"}
    assert {r["kernel"] for r in compiled} == {"forward", "score_grad", "product", "anchor_grad", "candidate_grad"}
    assert {(r["kernel"], r["dim"]) for r in compiled if r["kernel"] == "forward"} == {("forward", 128), ("forward", 768)}
    assert {r["transpose_a"] for r in compiled if r["kernel"] == "product"} == {False, True}


def test_shared_memory_fits(compiled):
    too_big = [r for r in compiled if r["shared"] > SHARED_MEMORY_LIMIT[r["arch"]]]
    assert not too_big


def test_half_precision_dots_use_tensor_cores_in_the_input_dtype(compiled):
    for r in compiled:
        if r["dtype"] == "fp32":
            continue
        instruction = "wgmma.mma_async" if r["arch"] == 90 else "mma.sync"
        ptx_type = {"fp16": "f16", "bf16": "bf16"}[r["dtype"]]
        operands = f".{ptx_type}.{ptx_type}"
        assert any(i.startswith(instruction) and operands in i for i in r["mma"]), str(r)


def test_fp32_dots_follow_torch_matmul_precision(compiled):
    """IEEE fp32 (torch's default 'highest') must not use TF32; 'high' must use TF32 mma."""
    for r in compiled:
        if r["dtype"] != "fp32":
            continue
        if r["precision"] == "ieee":
            assert not r["mma"], r
        else:
            assert any(".tf32.tf32" in i for i in r["mma"]), r
