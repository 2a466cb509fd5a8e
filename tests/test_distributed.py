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
