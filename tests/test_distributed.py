"""Global contrast across 2 CPU processes (gloo, launched with torchrun) against one process on
the concatenated batch. The checks themselves run in tests/ddp_worker.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.mark.parametrize("check", ["loss", "ddp_step"])
def test_two_ranks_equal_one_process(check, tmp_path):
    run = torchrun(WORKER, check, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == [f"{check}-rank0.ok", f"{check}-rank1.ok"]


def test_unlearn_cli_under_torchrun(tmp_path):
    """deepcut-fast unlearn on 2 processes (global batch split between them, gradient caching and
    a queue on): it runs, rank 0 alone writes the outputs, and the class is forgotten."""
    import json

    from tiny_models import save_toy_job

    save_toy_job(tmp_path)
    run = torchrun("-m", "deepcut_fast.cli", "unlearn", "--model", tmp_path / "model", "--data", tmp_path / "train.csv",
                   "--forget-class", "tech", "--out", tmp_path / "out", "--steps", "20", "--no-calibrate", "--lr", "2e-3",
                   "--max-length", "32", "--chunk-size", "8", "--queue-size", "64")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["processes"] == 2 and len(report["history"]) == 20
    assert report["metrics"]["forget"]["accuracy"] <= 0.2 and report["metrics"]["retain"]["accuracy"] >= 0.9
    assert run.stdout.count("unlearned 24 samples") == 1  # printed by rank 0 only
