"""Autotuning of the Triton kernels: the key, the per-size buckets, and the configs that large
launches take without timing (chosen by the static cost model, kept in kernels/prechosen.json)."""
import json
from pathlib import Path

import pytest
import torch

from deepcut_fast.kernels import contrastive as k

COST_RECORDS = Path(__file__).parents[1] / "benchmarks" / "results" / "kernel-cost.json"
KERNELS = {"forward": k.GPU_FORWARD_CONFIGS, "score_grad": k.GPU_SCORE_GRAD_CONFIGS}


def gpu_tuned(name):
    """The kernel with the GPU's configs (the interpreter's launcher has one config, never pruned)."""
    fn = {"forward": k.forward_kernel, "score_grad": k.score_grad_kernel}[name].fn
    return k.TunedKernel(name, fn, KERNELS[name], KERNELS[name])


def pruned(tuner, dtype, dim, self_case, pull, fixed_shift=True):
    tuner.nargs = dict(U=torch.empty(0, dtype=dtype), D=dim)  # what the autotuner holds during a launch
    return tuner.prune_configs(dict(SELF=self_case, PULL_LSE=pull, UPCAST=False, PRECISION="ieee",
                                    FIXED_SHIFT=fixed_shift))


def test_prechosen_table_is_the_cost_models_choice():
    from benchmarks.kernel_cost import prechosen_table

    table = json.loads(k.PRECHOSEN_FILE.read_text())
    assert table == prechosen_table(json.loads(COST_RECORDS.read_text())["calls"])
    combos = {k.prechosen_key(kernel, case, pull, shift, dtype, dim) for kernel in KERNELS for case in (True, False)
              for pull in (True, False) for shift in (True, False) for dtype in k.DTYPE_NAMES for dim in (128, 768)}
    assert set(table) == combos  # every launch that can happen has its choice
    assert all(0 <= index < len(KERNELS[key.split("/")[0]]) for key, index in table.items())


def test_every_size_bucket_has_its_own_tuner_keyed_on_case_pull_and_precision():
    kernel = gpu_tuned("forward")
    assert kernel.tuner(100) is kernel.tuner(128) is not kernel.tuner(129)
    assert kernel.tuner(4096).keys == ["D", "SELF", "PULL_LSE", "PRECISION", "FIXED_SHIFT"]  # Triton adds dtypes
    assert len(kernel.tuners) == 3


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 128), (torch.float16, 768), (torch.float32, 512)])
def test_large_launches_take_the_prechosen_config_untimed(name, dtype, dim):
    table = json.loads(k.PRECHOSEN_FILE.read_text())
    kernel = gpu_tuned(name)
    for self_case, pull, shift in ((True, True, True), (False, False, False), (True, False, False)):
        index = table[k.prechosen_key(name, self_case, pull, shift, dtype, dim)]
        assert pruned(kernel.tuner(1 << 20), dtype, dim, self_case, pull, shift) == [KERNELS[name][index]]
        # at or below 65,536 rows every config is timed
        assert pruned(kernel.tuner(1 << 16), dtype, dim, self_case, pull, shift) == KERNELS[name]


def test_tune_all_times_every_config(monkeypatch):
    monkeypatch.setenv("DEEPCUT_TUNE_ALL", "1")
    assert pruned(gpu_tuned("forward").tuner(1 << 20), torch.bfloat16, 128, True, True) == k.GPU_FORWARD_CONFIGS


def test_the_product_is_timed_at_every_size_and_restores_its_output():
    """The backward's GEMM accumulates into its output: timing runs must start from the same
    values, and a launch at 1M rows is short, so it is never pruned to an untimed choice."""
    product = k.TunedKernel("product", k.product_kernel.fn, k.GPU_PRODUCT_CONFIGS, k.GPU_PRODUCT_CONFIGS,
                            key=k.product_kernel.key, prechosen=False, restore=k.product_kernel.restore)
    tuner = product.tuner(1 << 20)
    assert tuner.restore_value == ["OUT"] and tuner.keys == ["N", "TRANS_A", "PRECISION"]
    tuner.nargs = dict(N=512)
    assert tuner.prune_configs(dict(TRANS_A=True, UPCAST=False, PRECISION="ieee")) == k.GPU_PRODUCT_CONFIGS
