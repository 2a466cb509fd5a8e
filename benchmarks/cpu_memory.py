"""Peak extra host memory of one forward+backward of the loss, measured in a fresh process.

    python -m benchmarks.cpu_memory --backend cpu --rows 4096 --dim 384 [--limit-gb 20]

Linux only: after a small warm-up call (thread pools, BLAS workspaces) and once the inputs
exist, the peak resident set (VmHWM) is reset through /proc/self/clear_refs, so the figure is
what the loss itself adds (its buffers, saved tensors and gradients). With --limit-gb the address space is capped
so that a method that needs more fails fast and is reported as OOM instead of swapping.
Prints one JSON line.
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def status_kib(field):
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, ...), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


TEMPERATURE = 0.5


def workload(rows, dim):
    """The CPU benchmark's batch: fp32, 5 classes, 2 views of each sample, 10% forget."""
    from deepcut_fast.testing import synthetic_batch

    return synthetic_batch(rows // 2, dim, views=2, classes=5, forget_fraction=0.1, class_separation=1.0,
                           view_noise=0.2)


def measure(backend, rows, dim):
    from deepcut_fast import contrastive_unlearn_loss

    def run(rows):
        batch = workload(rows, dim)
        batch["z"].requires_grad_()
        return lambda: contrastive_unlearn_loss(**batch, temperature=TEMPERATURE, backend=backend).backward()

    run(256)()  # one-time costs (thread pools, BLAS workspaces, lazy init) are not the loss's
    step = run(rows)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = status_kib("VmRSS")
    try:
        step()
    except (MemoryError, RuntimeError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return dict(backend=backend, rows=rows, dim=dim, oom=True, error=str(err).splitlines()[0][:200])
    return dict(backend=backend, rows=rows, dim=dim, oom=False,
                peak_extra_bytes=(status_kib("VmHWM") - before) * 1024)


def peak_extra_memory(backend, rows, dim, limit_gb=None, timeout=3600):
    """Run `measure` in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.cpu_memory", "--backend", backend, "--rows", str(rows),
           "--dim", str(dim)] + (["--limit-gb", str(limit_gb)] if limit_gb else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--limit-gb", type=float, default=None)
    args = parser.parse_args()
    if args.limit_gb:
        limit = int(args.limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(measure(args.backend, args.rows, args.dim)))


if __name__ == "__main__":
    main()
