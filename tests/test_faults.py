"""An unlearn job killed with SIGKILL (no cleanup, as the OOM killer or a power cut would) at
several points resumes to the same final weights as an uninterrupted run, and never leaves a
half-written model, report or checkpoint under its final name."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deepcut_fast.unlearning.audit import verify
from deepcut_fast.unlearning.files import FAULT_VARIABLE
from tiny_models import save_toy_job

# training (after the checkpoint of step 2), the first checkpoint write, the final model save,
# the final report write and the audit record's
KILL_POINTS = ["step:3", "write:checkpoint.pt", "save:model", "write:report.json", "write:audit.jsonl"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = save_toy_job(tmp_path_factory.mktemp("faults"))
    (root / "forget.txt").write_text("business-0\nsport-1\ntech-2\n")
    return root


def unlearn(job, out, fault=None):
    argv = [sys.executable, "-m", "deepcut_fast.cli", "unlearn", "--model", str(job / "model"), "--data",
            str(job / "train.csv"), "--id-column", "id", "--forget-ids", str(job / "forget.txt"), "--out", str(out),
            "--steps", "6", "--no-calibrate", "--checkpoint-every", "2", "--lr", "2e-3", "--max-length", "32"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop(FAULT_VARIABLE, None)
    if fault:
        env[FAULT_VARIABLE] = fault
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def assert_nothing_half_written(out):
    """Every output under its final name is complete; partial writes only under *.tmp names."""
    if (out / "model").exists():
        assert (out / "model" / "config.json").exists() and weights(out)
    if (out / "report.json").exists():
        assert json.loads((out / "report.json").read_text())["history"]
    if (out / "checkpoint.pt").exists():
        assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] >= 1


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    done = unlearn(job, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return weights(out)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_job_resumes_to_the_same_weights(job, tmp_path, uninterrupted, point):
    out = tmp_path / "out"
    killed = unlearn(job, out, fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert_nothing_half_written(out)
    resumed = unlearn(job, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_nothing_half_written(out)
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.pt").exists()
    mine = weights(out)
    assert mine.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(mine[name], tensor), name
    report = json.loads((out / "report.json").read_text())
    assert [r["step"] for r in report["history"]] == list(range(1, 7))
    assert [r["hash"] for r in verify(out)] == [report["audit"]["hash"]]  # one record, matching the model
