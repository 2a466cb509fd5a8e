"""The sweep runs end to end on the CPU, records OOMs instead of dropping them, and resumes."""
import csv
import json

import pytest
import torch

from benchmarks import sweep
from benchmarks.peers import METHODS


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_quick_plan_on_cpu(tmp_path):
    sweep.main(["--plan", "quick", "--device", "cpu", "--out", str(tmp_path)])
    results = rows(tmp_path)
    status = {(r["workload"], r["method"]): r["status"] for r in results}
    assert status[("self", "cpu")] == "ok" and status[("self", "reference")] == "ok"
    pml_missing = METHODS["supcon_pml"].unavailable(torch.device("cpu"), torch.float32)  # an optional peer
    assert status[("supcon", "supcon_pml")] == ("ok" if pml_missing is None else f"unavailable: {pml_missing}")
    assert status[("one_positive", "inf_cl")].startswith("unavailable: Inf-CL")
    assert ("self", "supcon_pml") not in status  # peers only run where they compute the same loss
    ok = [r for r in results if r["status"] == "ok"]
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwdbwd"}
    for r in ok:
        assert float(r["ms_q20"]) <= float(r["ms_median"]) <= float(r["ms_q80"])
        flops = sweep.FLOPS_PER_MND[r["mode"]] * int(r["n"]) ** 2 * int(r["dim"])
        assert float(r["tflops"]) == pytest.approx(flops / (float(r["ms_median"]) * 1e-3) / 1e12)
        assert float(r["fraction_of_matmul"]) == pytest.approx(float(r["tflops"]) / float(r["matmul_tflops"]))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert {"device", "torch", "triton", "date", "command"} <= set(meta)
    assert (tmp_path / "time_vs_n.png").stat().st_size > 0


def test_oom_is_recorded_and_larger_sizes_are_not_tried(tmp_path, monkeypatch):
    calls = []

    def exhausted():
        def loss(workload):
            calls.append(workload.shape)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return loss

    monkeypatch.setattr(METHODS["reference"], "build", exhausted)
    sweep.main(["--plan", "quick", "--device", "cpu", "--out", str(tmp_path), "--methods", "cpu", "reference"])
    ref = [r for r in rows(tmp_path) if r["method"] == "reference" and r["workload"] == "self"]
    assert {r["n"]: r["status"] for r in ref} == {"64": "OOM", "128": "OOM (a smaller size of this series was OOM)"}
    assert [shape[0] for shape in calls] == [64] * 4  # once per workload's series, never at 128


def test_resume_continues_and_refuses_to_overwrite(tmp_path):
    args = ["--plan", "quick", "--device", "cpu", "--out", str(tmp_path), "--methods", "cpu"]
    sweep.main(args)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")  # as if interrupted
    with pytest.raises(FileExistsError, match="--resume"):
        sweep.main(args)
    sweep.main(args + ["--resume"])
    resumed = (tmp_path / "results.jsonl").read_text().splitlines()
    assert resumed[:5] == lines[:5] and len(resumed) == len(lines)


def test_resume_drops_a_last_line_cut_short_by_a_kill(tmp_path):
    args = ["--plan", "quick", "--device", "cpu", "--out", str(tmp_path), "--methods", "cpu"]
    sweep.main(args)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # killed mid-write
    sweep.main(args + ["--resume"])
    assert len(rows(tmp_path)) == len(lines)
    sweep.main(args + ["--resume"])  # and the file stays readable afterwards
    assert len(rows(tmp_path)) == len(lines)
