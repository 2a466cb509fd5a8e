"""Static cost model of the Triton kernels, without a GPU.

    python -m benchmarks.kernel_cost --json benchmarks/results/kernel-cost.json [--arch 90] [--dtype bf16] \
        [--prechosen kernels/prechosen.json]

Every kernel variant that can launch (each autotune config x fp32/fp16/bf16 x self/bank case x
forget pull x shift x the widths it runs at, for sm_90 and sm_80; the backward's product kernel
in both operand layouts) is compiled ahead of time exactly as the runtime specialises it:
pointers 16-byte aligned and the integer arguments that are multiples of 16 (M, N, R, D, the
strides and the scratch's column bounds at the shapes below) marked divisible by 16, and BLOCK_D
as the launcher sets it (narrow fp16/bf16 rows are resident, others streamed in chunks of D).
For each: registers, spill bytes and shared memory (``ptxas -v`` from the triton wheel), whether
the dots use wgmma (sm_90) / mma.sync (sm_80), and from the SASS (``cuobjdump -sass``) of its
tile loops (inner loops over D counted once per chunk of D): instructions, MUFU (exp2/log2) and
tensor-core instructions per pair in the full-tile loop (the steady state: ``sass_per_pair``)
and instructions per pair in the masked-tile loop, a pair being one (anchor, candidate) entry
handled by one thread (for the product kernel: one dL/ds entry consumed, per tile of output
columns).

Per loss call it reports GEMM-equivalents (tensor-core work / 2MND) of the forward and backward
and a roofline estimate for an H100 SXM of their time and of their fraction of a same-shape
bf16/fp16 matmul (forward: 2MND useful flops, backward: 4MND), at N = M = 32k with D = 128 and
768. The model, all modelled and none measured:
- 132 SMs at 1.83 GHz; 989.4 dense bf16/fp16 tensor TFLOP/s (1024 FMA per clock per SM);
- 4 warp instructions issued per clock per SM (128 thread instructions); 16 MUFU results per
  clock per SM; 3.35 TB/s of HBM3;
- HBM traffic counts the backward's dL/ds scratch (written once, read by both products), the
  products' fp32 read-modify-write of their output once per block of scratch columns and their
  other operand once per block; tiles re-read within a launch are taken as L2 hits (optimistic),
  and the row reads of the forward and of the narrow backward kernels (O((M + N) D) per block
  of rows, from L2) as free;
- a call has 10% forget anchors (FORGET_FRACTION): full tiles take the full-tile loop's cost,
  masked ones the masked loop's, and pairs a kernel skips (retain anchors against forget
  candidates in the self case) cost nothing (``tile_shares``); so in the self case the forward
  does 0.91 of a same-shape matmul's work, and its fraction of that matmul can pass 100%;
- a kernel takes the longest of its tensor, issue, MUFU and HBM times (perfect overlap:
  optimistic), with the autotuner's best config; fp32 records get no fraction (no bf16
  tensor-core peak).
"""
import argparse
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SMS, CLOCK_HZ = 132, 1.83e9
TENSOR_FLOPS = 989.4e12
ISSUE_PER_CLOCK_PER_SM = 128
MUFU_PER_CLOCK_PER_SM = 16
HBM_BYTES_PER_S = 3.35e12
FORGET_FRACTION = 0.1  # forget anchors in the modelled call (see tile_shares)
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
SHAPES = [(32 * 1024, 128), (32 * 1024, 768)]  # (M = N, D)
DTYPES = ("fp32", "fp16", "bf16")
# "fixed": unit rows at a temperature >= 0.05 (the default loss), one exp per pair shifted by the
# bound; "running": a running maximum (normalize=False, or smaller temperatures)
SHIFTS = ("fixed", "running")
ARG_TYPES = {  # U, C, DS, A and B take the input dtype; every other argument is a constexpr
    "A_LABEL": "*i32", "A_INST": "*i32", "C_LABEL": "*i32", "C_INST": "*i32",
    "A_ORDER": "*i32", "C_ORDER": "*i32", "OUT_ROWS": "*i32", "B_ROWS": "*i32", "A_FORGET": "*i8", "C_FORGET": "*i8", "COUNT": "*i32",
    "LOSS": "*fp32", "PULL_MEAN": "*fp32", "LSE_A": "*fp32", "LSE_P": "*fp32", "OUT": "*fp32",
    "COEF": "*fp32", "POS_W": "*fp32", "A_SCALE": "*fp32", "P_SCALE": "*fp32",
    "M": "i32", "N": "i32", "R": "i32", "D": "i32", "K": "i32", "stride_u": "i32", "stride_c": "i32", "stride_ds": "i32",
    "stride_a": "i32", "stride_b": "i32", "stride_out": "i32", "col_start": "i32", "col_end": "i32",
    "span": "i32", "ignore_index": "i32", "qk_scale": "fp32", "scale": "fp32", "grad_scale": "fp32",
}
INPUT_DTYPE_ARGS = {"U", "C", "DS", "A", "B"}
# at the shapes above
DIVISIBLE_INTS = {"M", "N", "R", "D", "K", "stride_u", "stride_c", "stride_ds", "stride_a", "stride_b", "stride_out",
                  "col_start", "col_end", "span"}
PRODUCT_LAYOUTS = ("dS", "dS^T")  # du += dS @ c, dc += dS^T @ u (TRANS_A)


def kernels():
    """name -> the jitted kernel behind the autotuned launcher (its configs: ``configs``)."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile for a GPU"
    from deepcut_fast.kernels import contrastive as k

    return {name: getattr(k, f"{name}_kernel").fn for name in k.GPU_CONFIGS}


def configs(kernel, arch, dtype):
    """The tile configs ``kernel`` may launch with on sm_<arch> in ``dtype`` ("bf16", ...)."""
    from deepcut_fast.kernels.contrastive import gpu_configs

    return gpu_configs(kernel, arch, dtype)


def compile_variant(fn, config, dtype, arch, self_case, pull_lse, precision, fixed_shift=True, transpose_a=False,
                    block_d=0):
    """triton.compile of one variant for sm_<arch>, specialised as the runtime would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ARG_TYPES.get(name, f"*{dtype}" if name in INPUT_DTYPE_ARGS else "constexpr")
                 for name in fn.arg_names}
    flags = dict(SELF=self_case, PULL_LSE=pull_lse, UPCAST=False, PRECISION=precision, FIXED_SHIFT=fixed_shift,
                 TRANS_A=transpose_a, BLOCK_D=block_d)
    constexprs = dict(config.kwargs, **{name: value for name, value in flags.items() if name in fn.arg_names})
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in DIVISIBLE_INTS}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def mma_instructions(compiled):
    return sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", compiled.asm["ptx"])))


def _tool(name):
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_stats(compiled, arch):
    """(registers, spill store + load bytes) from ptxas -v: the wheel's ptxas that reads this PTX
    version (Triton emits the version of the ptxas it compiles with)."""
    version = re.search(r"^\.version (\d+)\.", compiled.asm["ptx"], re.M).group(1)
    tool = "ptxas" if int(version) <= 8 else "ptxas-blackwell"
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([_tool(tool), "-v", f"-arch=sm_{arch}{'a' if arch == 90 else ''}",
                              str(ptx), "-o", str(Path(folder) / "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)) + int(spills.group(2))


def sass_lines(compiled):
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    return [(int(address, 16), text.strip()) for address, text in found]


def loop_profiles(lines, d_chunks):
    """{"full": ..., "masked": ...}: (instructions, MUFU, tensor-core instructions) of one
    iteration of the kernel's cheapest and its dearest tile loop (outermost loops with dot work:
    tensor-core instructions, or FFMA for fp32 dots; the loss kernels walk full tiles in one and
    masked tiles in another, the product has one), inner loops counted ``d_chunks`` times (they
    walk D in chunks)."""
    loops = []
    for address, text in lines:
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    outer = [(a, b) for a, b in loops if not any(c < a and b < d for c, d in loops)]

    def profile(start, end):
        inner = [(a, b) for a, b in loops if start < a and b < end]

        def weight(address):  # how often an instruction runs per outer iteration
            return d_chunks if any(a <= address <= b for a, b in inner) else 1

        body = [(address, text) for address, text in lines if start <= address <= end]
        count = sum(weight(a) for a, _ in body)
        mufu = sum(weight(a) for a, t in body if re.search(r"\bMUFU\.", t))
        tensor = sum(weight(a) for a, t in body if re.search(r"\b(HGMMA|HMMA|WGMMA)\b", t))
        fma = any(re.search(r"\bFFMA\b", t) for _, t in body)  # fp32 dots without tensor cores
        return count, mufu, tensor, fma

    found = [p[:3] for p in sorted(profile(a, b) for a, b in outer) if p[2] or p[3]]
    return dict(full=found[0], masked=found[-1]) if found else None


def tile_shares(kernel, case):
    """(full, masked) shares of the M x N pairs in a call with FORGET_FRACTION forget anchors:
    retain anchors against retain candidates are full tiles, forget anchors' tiles are masked,
    and in the self case retain anchors skip forget candidates (the diagonal and the last partial
    tile are left out: a vanishing share at N = 32k)."""
    if kernel == "product":
        return 1.0, 0.0
    f = FORGET_FRACTION
    if kernel == "candidate_grad" and case == "self":  # blocks of forget candidates mask every anchor tile
        return (1 - f) ** 2, 1 - (1 - f) ** 2
    return ((1 - f) ** 2, f) if case == "self" else (1 - f, f)


def block_d(dim, dtype):
    """The kernels' BLOCK_D at width ``dim`` in ``dtype`` ("bf16", ...): 0 where rows are streamed."""
    import torch
    from deepcut_fast.kernels.contrastive import resident_width

    return resident_width(dim, getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]))


def widths(kernel, dtype):
    """The D of SHAPES at which ``kernel`` runs in ``dtype``: the forward at every D, the
    resident-row backward kernels on narrow rows, the dL/ds scratch and its products on the others."""
    dims = [dim for _, dim in SHAPES]
    if kernel in ("anchor_grad", "candidate_grad"):
        return [d for d in dims if block_d(d, dtype)]
    if kernel in ("score_grad", "product"):
        return [d for d in dims if not block_d(d, dtype)]
    return dims


def variants(archs, dtypes):
    from deepcut_fast.kernels.contrastive import dot_precision
    import torch

    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for arch in archs:
        for kernel, fn in kernels().items():
            for dtype in dtypes:
                if not widths(kernel, dtype):
                    continue
                for index, config in enumerate(configs(kernel, arch, dtype)):
                    if kernel == "product":
                        branches = [(layout, None, None) for layout in PRODUCT_LAYOUTS]
                    else:
                        branches = itertools.product(("self", "bank"), (True, False), SHIFTS)
                    for (case, pull, shift), dim in itertools.product(branches, widths(kernel, dtype)):
                        yield dict(kernel=kernel, config=index, arch=arch, dtype=dtype, case=case, pull=pull,
                                   shift=shift, dim=dim, precision=dot_precision(torch_dtypes[dtype])), fn, config


def pairs_per_iteration(kernel, block, threads, dim):
    """Pairs one thread handles per iteration of the steady-state loop: a tile of (anchor,
    candidate) entries, or for the product a BLOCK_M x BLOCK_K block of dL/ds consumed for one of
    the ceil(D / BLOCK_N) tiles of output columns."""
    if kernel == "product":
        return block["BLOCK_M"] * block["BLOCK_K"] / (threads * math.ceil(dim / block["BLOCK_N"]))
    return block["BLOCK_M"] * block["BLOCK_N"] / threads


def measure(record, fn, config):
    dim, resident = record["dim"], block_d(record["dim"], record["dtype"])
    compiled = compile_variant(fn, config, record["dtype"], record["arch"], record["case"] == "self",
                               record["pull"], record["precision"], record["shift"] == "fixed",
                               record["case"] == "dS^T", resident)
    registers, spills = ptxas_stats(compiled, record["arch"])
    kw = config.kwargs
    record.update(regs=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                  mma=mma_instructions(compiled), block=dict(kw, num_warps=config.num_warps,
                                                             num_stages=config.num_stages, BLOCK_D=resident))
    pairs = pairs_per_iteration(record["kernel"], kw, 32 * config.num_warps, dim)
    streamed = "BLOCK_K" in kw and record["kernel"] != "product" and not resident
    profiles = loop_profiles(sass_lines(compiled), math.ceil(dim / kw["BLOCK_K"]) if streamed else 1)
    if profiles is not None:
        (count, mufu, tensor), (masked, masked_mufu, _) = profiles["full"], profiles["masked"]
        record.update(sass_per_pair=count / pairs, mufu_per_pair=mufu / pairs, tensor_per_pair=tensor / pairs,
                      masked_sass_per_pair=masked / pairs, masked_mufu_per_pair=masked_mufu / pairs)
    return record


def _measure_variant(record):
    """``measure`` in a worker process, which finds the kernel and config by name and index."""
    fn = kernels()[record["kernel"]]
    return measure(record, fn, configs(record["kernel"], record["arch"], record["dtype"])[record["config"]])


def gemm_equivalents(kernel, case):
    """Tensor-core work of one kernel over the whole call, in units of 2MND: the forward and
    score_grad each compute S once for the pairs they do not skip, anchor_grad and candidate_grad
    S and one product each, and each product is one GEMM of that size."""
    products = 2 if kernel in ("anchor_grad", "candidate_grad") else 1
    return products * sum(tile_shares(kernel, case))


def hbm_bytes(record, rows, dim):
    """Modelled HBM traffic of one kernel over a call at M = N = rows (see the module docstring)."""
    from deepcut_fast.kernels.contrastive import scratch_columns

    element = ELEMENT_BYTES[record["dtype"]]
    scores = rows * rows * element
    if record["kernel"] == "score_grad":
        return scores
    if record["kernel"] == "product":
        blocks = math.ceil(rows / scratch_columns(rows, rows, element))
        if record["case"] == "dS":  # du (all rows) updated once per block, c read once
            return scores + rows * dim * (8 * blocks + element)
        return scores + rows * dim * (element * blocks + 8)  # u read once per block, dc rows once
    return 0


def kernel_time(record, rows):
    """Modelled seconds of one kernel over a call at M = N = rows and the record's D."""
    full, masked = tile_shares(record["kernel"], record["case"])
    pairs, dim = rows * rows, record["dim"]
    tensor = gemm_equivalents(record["kernel"], record["case"]) * 2 * rows * rows * dim / TENSOR_FLOPS
    issue = pairs * (full * record["sass_per_pair"] + masked * record["masked_sass_per_pair"]) / (
        ISSUE_PER_CLOCK_PER_SM * SMS * CLOCK_HZ)
    mufu = pairs * (full * record["mufu_per_pair"] + masked * record["masked_mufu_per_pair"]) / (
        MUFU_PER_CLOCK_PER_SM * SMS * CLOCK_HZ)
    memory = hbm_bytes(record, rows, dim) / HBM_BYTES_PER_S
    return max(tensor, issue, mufu, memory)


def _fastest(records, rows):
    """(modelled seconds, record) of the fastest config among ``records``."""
    return min(((kernel_time(r, rows), r) for r in records), key=lambda pair: pair[0])


def backward_parts(dim, dtype):
    """The kernels of the backward at width ``dim`` in ``dtype`` (the product once per operand layout)."""
    if block_d(dim, dtype):
        return ["anchor_grad", "candidate_grad"]
    return ["score_grad"] + [f"product {layout}" for layout in PRODUCT_LAYOUTS]


def calls(records):
    """Per (dtype, case, pull, shift, shape) on sm_90: GEMM-equivalents and modelled fractions of a
    call: the forward and the backward's kernels at that width."""
    out = []
    def variant(r):
        return r["arch"], r["dtype"], r["case"], r["pull"], r["shift"]

    measured = [r for r in records if "sass_per_pair" in r]
    loss_variants = {variant(r) for r in measured if r["arch"] == 90 and r["kernel"] != "product"}  # an H100 model
    for arch, dtype, case, pull, shift in sorted(loss_variants):
        for rows, dim in SHAPES:
            def found(part):
                if part.startswith("product"):
                    return [r for r in measured if r["kernel"] == "product" and r["dim"] == dim and
                            (r["arch"], r["dtype"], r["case"]) == (arch, dtype, part.split()[1])]
                return [r for r in measured if r["kernel"] == part and r["dim"] == dim and
                        variant(r) == (arch, dtype, case, pull, shift)]

            parts = {part: found(part) for part in ["forward"] + backward_parts(dim, dtype)}
            if not all(parts.values()):
                continue
            best = {name: _fastest(records, rows) for name, records in parts.items()}
            fwd_t = best["forward"][0]
            backward = [name for name in best if name != "forward"]
            bwd_t = sum(best[name][0] for name in backward)
            half = dtype != "fp32"
            out.append(dict(arch=arch, dtype=dtype, case=case, pull=pull, shift=shift, n=rows, dim=dim,
                            forget_fraction=FORGET_FRACTION,
                            gemm_equivalents_fwd=gemm_equivalents("forward", case),
                            gemm_equivalents_bwd=sum(gemm_equivalents(best[name][1]["kernel"], case) for name in backward),
                            modelled_seconds_fwd=fwd_t, modelled_seconds_bwd=bwd_t,
                            modelled_seconds={name: t for name, (t, _) in best.items()},
                            modelled_fraction_fwd=(2 * rows * rows * dim / TENSOR_FLOPS) / fwd_t if half else None,
                            modelled_fraction_bwd=(4 * rows * rows * dim / TENSOR_FLOPS) / bwd_t if half else None,
                            configs={name: r["config"] for name, (_, r) in best.items()}))
    return out


def prechosen_table(call_rows):
    """{prechosen_key: config index}: per kernel, case, pull and dtype, the config the model rates
    fastest at D = 128 (for narrow D) and D = 768 (wide), as the kernels' large-row launches use it."""
    from deepcut_fast.kernels.contrastive import DTYPE_NAMES, prechosen_key

    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    table = {}
    for c in call_rows:
        for kernel, index in c["configs"].items():
            if kernel.startswith("product"):  # the product is timed at every size (a short GEMM)
                continue
            table[prechosen_key(kernel, c["case"] == "self", c["pull"], c["shift"] == "fixed", dtypes[c["dtype"]],
                                c["dim"])] = index
    return dict(sorted(table.items()))


def markdown(records, call_rows):
    lines = ["| kernel | config | arch | dtype | case | pull | shift | D | regs | spill B | shared KB | mma | SASS/pair | "
             "MUFU/pair | SASS/pair, masked tiles |", "|---" * 15 + "|"]
    for r in records:
        if r["dtype"] != "bf16" or r["arch"] != 90:
            continue
        mma = "yes" if r["mma"] else "no"
        pull, shift = ("—", "—") if r["kernel"] == "product" else (r["pull"], r["shift"])
        lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | {r['dtype']} | {r['case']} | {pull} | "
                     f"{shift} | {r['dim']} | {r['regs']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {mma} | "
                     f"{r['sass_per_pair'] or 0:.1f} | {r['mufu_per_pair'] or 0:.2f} | "
                     f"{r['masked_sass_per_pair'] or 0:.1f} |")
    lines += ["", "| arch | dtype | case | pull | shift | N = M | D | GEMM-eq fwd | GEMM-eq bwd | modelled fwd / matmul "
              "| modelled bwd / matmul |", "|---" * 11 + "|"]
    for c in call_rows:
        if c["dtype"] == "fp32":
            continue
        lines.append(f"| sm_{c['arch']} | {c['dtype']} | {c['case']} | {c['pull']} | {c['shift']} | {c['n']} | {c['dim']} | "
                     f"{c['gemm_equivalents_fwd']:.2f} | {c['gemm_equivalents_bwd']:.2f} | "
                     f"{c['modelled_fraction_fwd']:.1%} | {c['modelled_fraction_bwd']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the records (and a .md table beside it)")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles at a time (processes)")
    parser.add_argument("--prechosen", default=None,
                        help="also write the configs the model rates fastest (kernels/prechosen.json: the configs "
                             "that launches of more than 65,536 rows take without timing them)")
    args = parser.parse_args(argv)
    records = []
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for record in pool.imap(_measure_variant, [r for r, _, _ in variants(args.arch, args.dtype)]):
            records.append(record)
            print(f"{record['kernel']} config {record['config']} sm_{record['arch']} {record['dtype']} "
                  f"{record['case']} pull={record['pull']} shift={record['shift']}: {record['regs']} regs, "
                  f"{record['spill_bytes']} B spilled, {record['sass_per_pair'] or 0:.1f} SASS/pair", file=sys.stderr)
    call_rows = calls(records)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(model=dict(sms=SMS, clock_hz=CLOCK_HZ, tensor_flops=TENSOR_FLOPS,
                                               issue_per_clock_per_sm=ISSUE_PER_CLOCK_PER_SM,
                                               mufu_per_clock_per_sm=MUFU_PER_CLOCK_PER_SM),
                                    kernels=records, calls=call_rows), indent=1))
    path.with_suffix(".md").write_text(markdown(records, call_rows))
    if args.prechosen:
        Path(args.prechosen).write_text(json.dumps(prechosen_table(call_rows), indent=1) + "\n")
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
