"""Compile the Triton kernels ahead of time for one GPU architecture and print JSON.

Run without TRITON_INTERPRET (test_gpu_compile.py starts it in a subprocess): the interpreter
replaces the kernels by Python functions that cannot be compiled. The kernels are specialised
as the runtime specialises them (benchmarks/kernel_cost.py, compile_variant), so the figures
are those of the kernels that launch.
    python tests/aot_compile.py 90
"""
import json
import sys

import torch

from benchmarks.kernel_cost import compile_variant, configs, kernels, mma_instructions
from deepcut_fast.kernels.contrastive import dot_precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def variants(arch):
    """Every (kernel, dtype, config) the autotuner may pick on sm_<arch>, plus the other constexpr
    branches (the bank case, TF32, the product's transposed operand)."""
    for kernel in kernels():
        for dtype_name, dtype in DTYPES.items():
            for index in range(len(configs(kernel, arch, dtype_name))):
                yield dict(kernel=kernel, dtype=dtype_name, config=index, self_case=True, pull_lse=True,
                           precision=dot_precision(dtype), transpose_a=False)
        yield dict(kernel=kernel, dtype="bf16", config=0, self_case=False, pull_lse=False, precision="ieee",
                   transpose_a=kernel == "product")
        yield dict(kernel=kernel, dtype="fp32", config=0, self_case=True, pull_lse=True, precision="tf32",
                   transpose_a=kernel == "product")


def main(arch):
    results, found = [], kernels()
    for v in variants(arch):
        config = configs(v["kernel"], arch, v["dtype"])[v["config"]]
        compiled = compile_variant(found[v["kernel"]], config, v["dtype"], arch, v["self_case"], v["pull_lse"],
                                   v["precision"], transpose_a=v["transpose_a"])
        results.append(dict(v, arch=arch, shared=compiled.metadata.shared, mma=mma_instructions(compiled)))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]))
