"""Largest DeepCUT batch one process fits in a memory budget, with and without gradient caching.

    python -m benchmarks.gradcache_memory --budget-gb 3 --chunk 16 --out benchmarks/results/gradcache-cpu.json

One DeepCUT forward+backward (MiniLM-L6, BBC News documents cut to --max-length tokens, 2
dropout views, a third of the batch forget samples) per measurement, each in a fresh process:
after a warm-up step the peak is reset, so the figure is what the step adds (activations,
gradients; the model and its optimiser state are the same for every batch and not counted).
CPU: peak resident set (VmHWM); CUDA: torch.cuda.max_memory_allocated. Batches double from
--start until the step exceeds the budget. The time cost of caching is the step time of both
modes at the largest batch the plain step fits, measured in the same run.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cpu_memory import REPO_ROOT, status_kib


def measure(batch, chunk, max_length, device):
    import torch

    from deepcut_fast.unlearning.data import load_bbc_news
    from deepcut_fast.unlearning.model import encode, load_base_encoder
    from deepcut_fast.unlearning.unlearner import UnlearnConfig, cached_deepcut_step, deepcut_loss

    data = load_bbc_news()
    model, tokenizer = load_base_encoder(data.label_names)
    model.to(device).train()
    cfg = UnlearnConfig(views=2, chunk_size=chunk, max_length=max_length)

    def step(size):
        picked = [i * 7 % len(data) for i in range(size)]
        inputs = encode(tokenizer, [data.texts[i] for i in picked], max_length, device)
        labels = torch.tensor([data.labels[i] for i in picked], device=device)
        forget = torch.arange(size, device=device) % 3 == 0
        if chunk is None:
            deepcut_loss(model, inputs, labels, forget, cfg)[0].backward()
        else:
            cached_deepcut_step(model, inputs, labels, forget, cfg)
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: they are not the batch's

    step(4)  # warm-up: thread pools, allocator, gradient buffers
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = status_kib("VmHWM") * 1024
    return dict(batch=batch, chunk=chunk, seconds=time.perf_counter() - start, peak_extra_bytes=peak - before)


def run_in_fresh_process(batch, chunk, max_length, device):
    cmd = [sys.executable, "-m", "benchmarks.gradcache_memory", "--one", str(batch), "--one-chunk", str(chunk or 0),
           "--max-length", str(max_length), "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gb", type=float, default=3.0)
    parser.add_argument("--chunk", type=int, default=16, help="gradient-caching chunk (samples)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--start", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one measurement
    parser.add_argument("--one-chunk", type=int, default=0, help=argparse.SUPPRESS)  # its chunk, 0: plain step
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.one_chunk or None, args.max_length, args.device)))
        return
    budget = args.budget_gb * 2 ** 30
    results = {}
    for mode, chunk in (("plain", None), ("gradient_caching", args.chunk)):
        rows, batch = [], args.start
        while batch <= args.max_batch:
            rows.append(run_in_fresh_process(batch, chunk, args.max_length, args.device))
            print(json.dumps(dict(mode=mode, **rows[-1])), flush=True)
            if rows[-1]["peak_extra_bytes"] > budget:
                break
            batch *= 2
        fitting = [r["batch"] for r in rows if r["peak_extra_bytes"] <= budget]
        results[mode] = dict(largest_batch=max(fitting) if fitting else 0, runs=rows)
    same = results["plain"]["largest_batch"]
    timed = {mode: run_in_fresh_process(same, chunk, args.max_length, args.device)["seconds"]
             for mode, chunk in (("plain", None), ("gradient_caching", args.chunk))} if same else {}
    import platform

    import torch

    host = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    report = dict(command="python -m benchmarks.gradcache_memory " + " ".join(sys.argv[1:]), host=host,
                  device=args.device, budget_gb=args.budget_gb, chunk=args.chunk,
                  max_length=args.max_length, date=time.strftime("%Y-%m-%d"), results=results,
                  time_at_batch=same, seconds=timed,
                  caching_time_ratio=timed["gradient_caching"] / timed["plain"] if timed else None)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
