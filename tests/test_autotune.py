"""Autotuning of the Triton kernels: the key, the per-size buckets, and the configs that large
launches take without timing (chosen by the static cost model, kept in kernels/prechosen.json)."""
import json
from pathlib import Path

import pytest
import torch

from deepcut_fast.kernels import contrastive as k

COST_RECORDS = Path(__file__).parents[1] / "benchmarks" / "results" / "kernel-cost.json"
KERNELS = ("forward", "score_grad", "anchor_grad", "candidate_grad")  # the kernels with prechosen configs


def launches(kernel, dtype, dim):
    """Whether ``kernel`` runs for rows of ``dim`` features in ``dtype``: the forward always, the
    recomputing backward kernels for narrow rows, dL/ds into the scratch for the others."""
    if kernel == "forward":
        return True
    return bool(k.resident_width(dim, dtype)) == (kernel != "score_grad")


def gpu_tuned(name, arch=90):
    """The kernel as it runs on sm_<arch> (the interpreter's launcher has one config, never pruned)."""
    tuned = getattr(k, f"{name}_kernel")
    return k.TunedKernel(name, tuned.fn, [], key=tuned.key, prechosen=tuned.prechosen, restore=tuned.restore,
                         dtype_arg=tuned.dtype_arg, arch=arch, gpu=True)


def pruned(tuner, dtype, dim, self_case, pull, fixed_shift=True):
    tuner.nargs = dict(U=torch.empty(0, dtype=dtype), D=dim)  # what the autotuner holds during a launch
    return tuner.prune_configs(dict(SELF=self_case, PULL_LSE=pull, UPCAST=False, PRECISION="ieee",
                                    FIXED_SHIFT=fixed_shift))


def test_prechosen_table_is_the_cost_models_choice():
    from benchmarks.kernel_cost import prechosen_table

    table = json.loads(k.PRECHOSEN_FILE.read_text())
    assert table == prechosen_table(json.loads(COST_RECORDS.read_text())["calls"])
    combos = {k.prechosen_key(kernel, case, pull, shift, dtype, dim) for kernel in KERNELS for case in (True, False)
              for pull in (True, False) for shift in (True, False) for dtype in k.DTYPE_NAMES for dim in (128, 768)
              if launches(kernel, dtype, dim)}
    assert set(table) == combos  # every launch that can happen has its choice
    names = {name: dtype for dtype, name in k.DTYPE_NAMES.items()}
    for key, index in table.items():
        kernel, *_, dtype, _ = key.split("/")
        assert 0 <= index < len(k.gpu_configs(kernel, 90, names[dtype]))


def test_every_size_bucket_has_its_own_tuner_keyed_on_case_pull_and_precision():
    kernel = gpu_tuned("forward")
    assert kernel.tuner(100) is kernel.tuner(128) is not kernel.tuner(129)
    assert kernel.tuner(4096).keys == ["D", "SELF", "PULL_LSE", "PRECISION", "FIXED_SHIFT"]  # Triton adds dtypes
    assert len(kernel.tuners) == 3


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 128), (torch.float16, 768), (torch.float32, 512)])
def test_large_launches_take_the_prechosen_config_untimed(name, dtype, dim):
    if not launches(name, dtype, dim):
        pytest.skip(f"{name} does not run for {dtype} rows of {dim}")
    table = json.loads(k.PRECHOSEN_FILE.read_text())
    kernel = gpu_tuned(name)
    allowed = k.gpu_configs(name, 90, dtype)
    for self_case, pull, shift in ((True, True, True), (False, False, False), (True, False, False)):
        index = table[k.prechosen_key(name, self_case, pull, shift, dtype, dim)]
        assert pruned(kernel.tuner(1 << 20), dtype, dim, self_case, pull, shift) == [allowed[index]]
        # at or below 65,536 rows every config of the architecture and dtype is timed
        assert pruned(kernel.tuner(1 << 16), dtype, dim, self_case, pull, shift) == allowed


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("arch", [80, 86, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_architecture_and_dtype_gets_its_own_configs(name, arch, dtype):
    """fp32 and sm_80 take the tiles that compile without spills there; sm_80 is never prechosen."""
    if not any(launches(name, dtype, dim) for dim in (128, 768)):
        pytest.skip(f"{name} does not run for {dtype} rows")
    kernel = gpu_tuned(name, arch)
    allowed = k.gpu_configs(name, arch, dtype)
    assert allowed == k.GPU_CONFIGS[name][90 if arch >= 90 else 80, "fp32" if dtype == torch.float32 else "half"]
    assert pruned(kernel.tuner(4096), dtype, 128, True, True) == allowed
    if arch < 90:
        assert pruned(kernel.tuner(1 << 20), dtype, 128, True, True) == allowed


def test_tune_all_times_every_config(monkeypatch):
    monkeypatch.setenv("DEEPCUT_TUNE_ALL", "1")
    allowed = k.gpu_configs("forward", 90, torch.bfloat16)
    assert pruned(gpu_tuned("forward").tuner(1 << 20), torch.bfloat16, 128, True, True) == allowed


def test_the_product_is_timed_at_every_size_and_restores_its_output():
    """The backward's GEMM accumulates into its output: timing runs must start from the same
    values, and a launch at 1M rows is short, so it is never pruned to an untimed choice."""
    tuner = gpu_tuned("product").tuner(1 << 20)
    assert tuner.restore_value == ["OUT"] and tuner.keys == ["N", "TRANS_A", "PRECISION"]
    tuner.nargs = dict(A=torch.empty(0, dtype=torch.bfloat16), N=512)
    assert tuner.prune_configs(dict(TRANS_A=True, UPCAST=False, PRECISION="ieee")) == k.gpu_configs(
        "product", 90, torch.bfloat16)
