"""Compile the Triton kernels ahead of time for one GPU architecture and print JSON.

Run without TRITON_INTERPRET (test_gpu_compile.py starts it in a subprocess): the interpreter
replaces the kernels by Python functions that cannot be compiled.
    python tests/aot_compile.py 90
"""
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile for a GPU"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deepcut_fast.kernels import contrastive as k  # noqa: E402

KERNELS = {  # the autotuned launchers' kernels (.fn), compiled once per config
    "forward": (k.forward_kernel.fn, k.GPU_FORWARD_CONFIGS),
    "backward_anchor": (k.backward_anchor_kernel.fn, k.GPU_BACKWARD_CONFIGS),
    "backward_candidate": (k.backward_candidate_kernel.fn, k.GPU_BACKWARD_CONFIGS),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARG_TYPES = {  # U and C take the input dtype; every other argument is a constexpr
    "A_LABEL": "*i64", "A_INST": "*i64", "C_LABEL": "*i64", "C_INST": "*i64",
    "A_FORGET": "*i8", "C_FORGET": "*i8", "COUNT": "*i32",
    "LOSS": "*fp32", "LSE_A": "*fp32", "LSE_P": "*fp32", "GRAD": "*fp32", "DU": "*fp32", "DC": "*fp32",
    "M": "i32", "N": "i32", "D": "i32", "stride_u": "i32", "stride_c": "i32", "stride_du": "i32",
    "stride_dc": "i32", "ignore_index": "i32", "qk_scale": "fp32", "grad_scale": "fp32",
}


def compile_kernel(fn, config, dtype_name, arch, self_case, pull_lse, precision):
    signature = {name: ARG_TYPES.get(name, f"*{dtype_name}" if name in ("U", "C") else "constexpr")
                 for name in fn.arg_names}
    constexprs = dict(config.kwargs, SELF=self_case, PULL_LSE=pull_lse, UPCAST=False, PRECISION=precision)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", compiled.asm["ptx"])))
    return dict(shared=compiled.metadata.shared, mma=mma)


def variants(arch):
    """Every (kernel, dtype, config) the autotuner may pick, plus the other constexpr branches."""
    for kernel, (fn, configs) in KERNELS.items():
        for dtype_name, dtype in DTYPES.items():
            for index, config in enumerate(configs):
                yield dict(kernel=kernel, dtype=dtype_name, config=index, self_case=True, pull_lse=True,
                           precision=k.dot_precision(dtype))
        yield dict(kernel=kernel, dtype="bf16", config=0, self_case=False, pull_lse=False, precision="ieee")
        yield dict(kernel=kernel, dtype="fp32", config=0, self_case=True, pull_lse=True, precision="tf32")


def main(arch):
    results = []
    for v in variants(arch):
        fn, configs = KERNELS[v["kernel"]]
        out = compile_kernel(fn, configs[v["config"]], v["dtype"], arch, v["self_case"], v["pull_lse"],
                             v["precision"])
        results.append(dict(v, arch=arch, **out))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]))
