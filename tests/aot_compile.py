"""Compile the Triton kernels ahead of time for one GPU architecture and print JSON.

Run without TRITON_INTERPRET (test_gpu_compile.py starts it in a subprocess): the interpreter
replaces the kernels by Python functions that cannot be compiled. The kernels are specialised
as the runtime specialises them (benchmarks/kernel_cost.py, compile_variant), so the figures
are those of the kernels that launch.
    python tests/aot_compile.py 90
"""
import itertools
import json
import sys

import torch

from benchmarks.kernel_cost import block_d, compile_variant, configs, kernels, mma_instructions, widths
from deepcut_fast.kernels.contrastive import dot_precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def variants(arch):
    """Every (kernel, dtype, config, width) the autotuner may pick on sm_<arch>, plus the other
    constexpr branches (the bank case, TF32, the product's transposed operand)."""
    for kernel in kernels():
        for dtype_name, dtype in DTYPES.items():
            dims = widths(kernel, dtype_name)  # none: the kernel never runs in this dtype
            for index, dim in itertools.product(range(len(configs(kernel, arch, dtype_name)) if dims else 0), dims):
                yield dict(kernel=kernel, dtype=dtype_name, config=index, dim=dim, self_case=True, pull_lse=True,
                           precision=dot_precision(dtype), transpose_a=False)
        for dtype_name, precision in (("bf16", "ieee"), ("fp32", "tf32")):
            for dim in widths(kernel, dtype_name):
                yield dict(kernel=kernel, dtype=dtype_name, config=0, dim=dim, self_case=dtype_name == "fp32",
                           pull_lse=dtype_name == "fp32", precision=precision, transpose_a=kernel == "product")


def main(arch):
    results, found = [], kernels()
    for v in variants(arch):
        config = configs(v["kernel"], arch, v["dtype"])[v["config"]]
        compiled = compile_variant(found[v["kernel"]], config, v["dtype"], arch, v["self_case"], v["pull_lse"],
                                   v["precision"], transpose_a=v["transpose_a"], block_d=block_d(v["dim"], v["dtype"]))
        results.append(dict(v, arch=arch, shared=compiled.metadata.shared, mma=mma_instructions(compiled)))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]))
