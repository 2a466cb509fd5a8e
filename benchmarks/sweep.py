"""Benchmark sweep: the fused kernels against the reference, torch.compile and public peers.

    python -m benchmarks.sweep --plan headline scaling --out benchmarks/results/<device>-<date> [--resume]
    python -m benchmarks.sweep --plan quick --device cpu --out /tmp/sweep      # CPU smoke run

For every point (workload, dtype, D, N) and method it measures forward, backward and
forward+backward separately: median and 20%/80% quantiles of time (triton.testing.do_bench
with warm-up on CUDA; repeated perf_counter on CPU), the peak memory of one forward+backward
above the inputs (torch.cuda.max_memory_allocated after a reset; CUDA only), and achieved
TFLOP/s. FLOP counts: forward 2*M*N*D (the similarity product); backward 4*M*N*D (the two
gradient products dS @ C and dS^T @ U; recomputing S is not counted as useful work);
forward+backward 6*M*N*D. Next to them, the TFLOP/s that torch.matmul reaches on the same D,
N and dtype in the same run (rows capped so its output stays under 1 GiB) is the practical
limit. A method that runs out of memory is recorded as OOM at that size, and larger sizes of
the same series are recorded as OOM without being tried.

Results are appended to <out>/results.jsonl one measurement at a time (flushed and synced),
so an interrupted sweep loses nothing and --resume skips what is there. At the end
<out>/results.csv (written atomically), <out>/meta.json and PNG plots are produced.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.peers import METHODS, make_workload

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOPS_PER_MND = {"fwd": 2, "bwd": 4, "fwdbwd": 6}
FUSED = ("triton", "cpu")
ALL_DIMS = (128, 384, 768, 1024, 4096)
MATMUL_OUTPUT_CAP_BYTES = 2 ** 30


def plan_points(plan):
    """(workload, dtype, D, N, methods) of each named plan; see the module docstring."""
    k = 1024
    if plan == "quick":  # CPU smoke test of the whole pipeline
        for workload in ("self", "candidates", "supcon", "one_positive"):
            for n in (64, 128):
                yield workload, "fp32", 48, n, FUSED + ("reference", "supcon_pml", "inf_cl")
        return
    if plan == "headline":  # the targets
        for dtype in DTYPES:
            for d in ALL_DIMS:
                yield "self", dtype, d, 16 * k, FUSED
        yield "self", "bf16", 128, 32 * k, FUSED + ("reference", "reference_compiled")
        yield "candidates", "bf16", 384, 32 * k, FUSED + ("reference", "reference_compiled")
        yield "supcon", "bf16", 384, 16 * k, FUSED + ("reference", "supcon_pml")
        yield "one_positive", "bf16", 768, 64 * k, FUSED + ("inf_cl",)
        yield "self", "bf16", 512, 1024 * k, FUSED
        return
    if plan == "gpu-check":  # scripts/gpu_check.sh: the headline comparison that fits a few minutes
        for d in (128, 384, 768):
            for n in (16 * k, 32 * k, 64 * k):
                yield "self", "bf16", d, n, FUSED + ("reference", "reference_compiled")
        yield "one_positive", "bf16", 768, 64 * k, FUSED + ("inf_cl",)
        yield "self", "bf16", 512, 1024 * k, FUSED  # the 1M-row memory run
        return
    if plan == "gpu-check-dry":  # the same on a CPU at tiny sizes (scripts/gpu_check.sh --dry-run)
        for d in (32, 48):
            for n in (64, 128):
                yield "self", "fp32", d, n, FUSED + ("reference",)
        yield "one_positive", "fp32", 48, 128, FUSED + ("inf_cl",)
        return
    if plan == "scaling":  # time and memory vs N
        for n in (4 * k, 8 * k, 16 * k, 32 * k, 64 * k, 128 * k, 256 * k, 1024 * k):
            yield "self", "bf16", 384, n, FUSED + ("reference", "reference_compiled")
        return
    raise ValueError(f"unknown plan {plan!r}")


def is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower() \
        or "can't allocate memory" in str(err).lower()


def time_ms(fn, device, reset=()):
    """(median, q20, q80) in ms of fn(); gradients of `reset` are cleared before each call."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=list(reset),
                                             quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up
    samples = []
    for _ in range(5):
        for x in reset:
            x.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=5)
    return statistics.median(samples), q[0], q[-1]


def measure_method(method, workload, device):
    """{mode: (median, q20, q80)} and the peak extra bytes of one forward+backward (CUDA)."""
    loss_fn = method.build()
    leaves = [t for t in (workload.z, workload.candidates) if t is not None and t.is_floating_point()]
    for t in leaves:
        t.requires_grad_(True)
    times = {"fwd": time_ms(lambda: loss_fn(workload), device, leaves)}
    loss = loss_fn(workload)
    times["bwd"] = time_ms(lambda: loss.backward(retain_graph=True), device, leaves)
    del loss
    times["fwdbwd"] = time_ms(lambda: loss_fn(workload).backward(), device, leaves)
    peak = None
    if device.type == "cuda":
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(workload).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return times, peak


def matmul_tflops(dtype, n, d, device):
    """TFLOP/s of torch.matmul on [rows, D] x [D, N] (rows capped by the output size)."""
    rows = max(256, min(n, MATMUL_OUTPUT_CAP_BYTES // (n * torch.tensor([], dtype=dtype).element_size())))
    a = torch.randn(rows, d, device=device, dtype=dtype)
    b = torch.randn(n, d, device=device, dtype=dtype)
    median, _, _ = time_ms(lambda: a @ b.T, device)
    return 2 * rows * n * d / (median * 1e-3) / 1e12


class ResultLog:
    """Append-only JSON lines with a key per measurement, so a sweep can resume."""

    def __init__(self, path, resume):
        self.path = Path(path)
        self.records = []
        if resume and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            for number, line in enumerate(lines, start=1):
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    if number < len(lines):  # only the last line can be cut short by a kill
                        raise ValueError(f"{self.path}, line {number}: not valid JSON") from None
                    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))  # drop it
        elif self.path.exists():
            raise FileExistsError(f"{self.path} exists; pass --resume to continue it or pick another --out")
        self.done = {self.key(r) for r in self.records}

    @staticmethod
    def key(r):
        return (r["workload"], r["dtype"], r["dim"], r["n"], r["method"], r["mode"])

    def add(self, record):
        self.records.append(record)
        self.done.add(self.key(record))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_point(log, workload_name, dtype_name, d, n, methods, device, oom_series):
    dtype = DTYPES[dtype_name]
    base = dict(workload=workload_name, dtype=dtype_name, dim=d, n=n, device=device.type)
    limit = None
    for name in methods:
        method = METHODS[name]
        if all((workload_name, dtype_name, d, n, name, mode) in log.done for mode in FLOPS_PER_MND):
            continue
        reason = method.unavailable(device, dtype)
        status, times, peak = "ok", {}, None
        if workload_name not in method.workloads:
            continue
        if reason is not None:
            status = f"unavailable: {reason}"
        elif (workload_name, dtype_name, d, name) in oom_series:
            status = "OOM (a smaller size of this series was OOM)"
        else:
            try:
                workload = make_workload(workload_name, n, d, dtype, device)
                times, peak = measure_method(method, workload, device)
            except Exception as err:  # noqa: BLE001 - every failure is recorded, none stops the sweep
                status = "OOM" if is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                if is_oom(err):
                    oom_series.add((workload_name, dtype_name, d, name))
            finally:
                workload = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if status == "ok" and limit is None:
            limit = matmul_tflops(dtype, n, d, device)
        for mode, flops in FLOPS_PER_MND.items():
            if (workload_name, dtype_name, d, n, name, mode) in log.done:  # kept from an interrupted run
                continue
            record = dict(base, method=name, mode=mode, status=status)
            if mode in times:
                median, q20, q80 = times[mode]
                tflops = flops * n * n * d / (median * 1e-3) / 1e12  # every workload has M = N
                record.update(ms_median=median, ms_q20=q20, ms_q80=q80, tflops=tflops,
                              matmul_tflops=limit, fraction_of_matmul=tflops / limit,
                              peak_extra_bytes=peak)
            log.add(record)
            print(json.dumps(record), flush=True)


def environment(device, argv):
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, "-m", "benchmarks.sweep", *argv]),
                torch=torch.__version__, python=platform.python_version(), host=platform.node(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name(device)
        meta["cuda"] = torch.version.cuda
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            meta["driver"] = None
    else:
        meta["device"] = f"CPU ({meta['cpu']}, {meta['threads']} threads)"
    return meta


def write_atomically(path, write):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_outputs(out, records, meta):
    fields = ["workload", "dtype", "dim", "n", "device", "method", "mode", "status", "ms_median", "ms_q20",
              "ms_q80", "tflops", "matmul_tflops", "fraction_of_matmul", "peak_extra_bytes"]

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)

    write_atomically(out / "results.csv", write_csv)
    write_atomically(out / "meta.json", lambda f: json.dump(meta, f, indent=2))
    from benchmarks.plots import plot_all

    return plot_all(records, out, meta.get("device", ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", nargs="*", default=["headline", "scaling"],
                        choices=["quick", "headline", "scaling", "gpu-check", "gpu-check-dry"],
                        help="plans to measure (none: only rewrite the CSV, meta and plots from results.jsonl)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="directory for results.jsonl, results.csv, meta.json, plots")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out / "results.jsonl", args.resume)
    oom_series = {(r["workload"], r["dtype"], r["dim"], r["method"]) for r in log.records if r["status"].startswith("OOM")}
    meta = environment(device, argv)
    for plan in args.plan:
        for workload, dtype, d, n, methods in plan_points(plan):
            chosen = [m for m in methods if args.methods is None or m in args.methods]
            run_point(log, workload, dtype, d, n, chosen, device, oom_series)
    plots = write_outputs(out, log.records, meta)
    print(f"wrote {out / 'results.csv'}, {out / 'meta.json'} and {len(plots)} plots")


if __name__ == "__main__":
    main()
