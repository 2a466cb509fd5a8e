"""Bad input to the command line: one line naming what is wrong, no traceback, --out untouched;
and unlearning jobs that refuse to mix two runs (fingerprint, lock, damaged checkpoint)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepcut_fast.cli import main
from deepcut_fast.unlearning.files import claimed_folder
from tiny_models import interrupted_at, save_toy_job


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_toy_job(tmp_path_factory.mktemp("job"))
    (root / "latin1.csv").write_bytes("id,text,label\n1,caf\xe9 ok,tech\n".encode("latin-1"))
    (root / "ragged.csv").write_text("id,text,label\n1,a b,tech\n2,a,b,tech\n")
    rows = [json.dumps(dict(id=i, text="a b", label="tech")) for i in range(8)]
    rows[5] = '{"id": 5, "text": "a b" "label": "tech"}'  # line 6: a comma is missing
    (root / "broken.jsonl").write_text("\n".join(rows) + "\n")
    (root / "forget.txt").write_text("business-0\nsport-1\n")
    (root / "unknown_ids.txt").write_text("business-0\nnobody\n")
    (root / "empty_ids.txt").write_text("")
    (root / "not_a_model").mkdir()
    (root / "data.txt").write_text("id,text,label\n")
    return root


def unlearn_args(saved, out, **changes):
    args = dict(model=saved / "model", data=saved / "train.csv", id_column="id", forget_ids=saved / "forget.txt",
                out=out, steps="2", max_length="32", no_calibrate=True)  # fixed steps: the mechanics under test
    args.update(changes)
    flat = []
    for key, value in args.items():
        if value is not None:
            flat += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flat


BAD_UNLEARN = [  # (changes to a good unlearn command, what the one line must say)
    (dict(model="{root}/missing"), "model directory {root}/missing does not exist"),
    (dict(model="{root}/not_a_model"), "has no config.json"),
    (dict(data="{root}/missing.csv"), "{root}/missing.csv: no such file"),
    (dict(data="{root}/data.txt"), "must be .csv or .jsonl"),
    (dict(data="{root}/latin1.csv"), "latin1.csv, line 2, column 6: byte 0xe9 is not UTF-8"),
    (dict(data="{root}/ragged.csv"), "ragged.csv, line 3: the number of fields differs from the header's 3"),
    (dict(data="{root}/broken.jsonl"), "broken.jsonl, line 6: not valid JSON"),
    (dict(test="{root}/missing_test.csv"), "{root}/missing_test.csv: no such file"),
    (dict(forget_ids="{root}/missing_ids.txt"), "missing_ids.txt: no such file"),
    (dict(forget_ids="{root}/unknown_ids.txt"), "1 forget ids are not in the training set, e.g. ['nobody']"),
    (dict(forget_ids="{root}/empty_ids.txt"), "the forget set is empty"),
    (dict(forget_ids=None, forget_class="weather"), "forget_class 'weather' is not a class"),
    (dict(forget_ids=None, forget_column="missing"), "forget column 'missing' not found"),
    (dict(text_column="body"), "column 'body' not found; columns are ['id', 'label', 'text']"),
    (dict(steps="0"), "--steps must be >= 1, got 0"),
    (dict(steps="-3"), "--steps must be >= 1, got -3"),
    (dict(lr="0"), "--lr must be a finite number > 0, got 0.0"),
    (dict(temperature="-1"), "--temperature must be a finite number > 0, got -1.0"),
    (dict(gamma="nan"), "--gamma must be a finite number >= 0, got nan"),
    (dict(views="0"), "--views must be >= 1, got 0"),
    (dict(stop_forget_accuracy="5"), "--stop-forget-accuracy must be a fraction between 0 and 1, got 5.0"),
    (dict(stop_retain_drop="0.01"), "--stop-retain-drop needs --stop-forget-accuracy"),
    (dict(stop_forget_accuracy="0.1", no_calibrate=None),
     "--stop-forget-accuracy is the fixed stopping rule of a run without calibration (--no-calibrate)"),
    (dict(budget="0"), "--budget must be a finite number > 0, got 0.0"),
    (dict(guard_accuracy_drop="1.5"), "--guard-accuracy-drop must be a fraction between 0 and 1, got 1.5"),
    (dict(forget_batch_size="0"), "--forget-batch-size must be >= 1, got 0"),
    (dict(checkpoint_every="0"), "--checkpoint-every must be >= 1, got 0"),
    (dict(layer="9"), "layer 9 is out of range"),
    (dict(steps="two"), "argument --steps: invalid int value: 'two'"),
    (dict(embedding="max"), "argument --embedding: invalid choice: 'max'"),
]


def one_line_failure(capsys, argv):
    capsys.readouterr()  # what earlier commands printed
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's own errors
        code = exited.code
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("changes, message", BAD_UNLEARN, ids=[str(c) for c, _ in BAD_UNLEARN])
def test_bad_unlearn_input_is_one_line_and_leaves_out_untouched(saved, tmp_path, capsys, changes, message):
    changes = {k: v.format(root=saved) if isinstance(v, str) else v for k, v in changes.items()}
    out = tmp_path / "out"
    err = one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, **changes))
    assert message.format(root=saved) in err
    assert not out.exists()


def test_an_existing_out_is_left_as_it_was(saved, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, steps="0"))
    one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, model=saved / "missing"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("changes, message", [
    (dict(test=None, reference="{root}/model"), "comparing with a reference model needs a test set"),
    (dict(reference="{root}/missing"), "model directory {root}/missing does not exist"),
    (dict(data="{root}/broken.jsonl"), "broken.jsonl, line 6: not valid JSON"),
])
def test_bad_evaluate_input_is_one_line(saved, tmp_path, capsys, changes, message):
    args = dict(model=saved / "model", data=saved / "train.csv", id_column="id", forget_ids=saved / "forget.txt",
                test=saved / "train.csv", out=tmp_path / "eval.json", max_length="32")
    args.update({k: v.format(root=saved) if isinstance(v, str) else v for k, v in changes.items()})
    argv = ["evaluate"] + [x for k, v in args.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]
    assert message.format(root=saved) in one_line_failure(capsys, argv)
    assert not (tmp_path / "eval.json").exists()


def test_the_console_script_prints_one_line_and_debug_the_traceback(saved, tmp_path):
    argv = [sys.executable, "-m", "deepcut_fast.cli", "unlearn"] + unlearn_args(saved, tmp_path / "o", steps="0")
    plain = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert plain.returncode == 1 and plain.stderr.strip().splitlines() == [
        "deepcut-fast unlearn: error: --steps must be >= 1, got 0 (--debug shows the traceback)"]
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "cli.py" in debug.stderr


# --- jobs that cannot mix runs -------------------------------------------------------------------

def interrupted_run(saved, out, capsys, **changes):
    """A run stopped after its first checkpoint (steps 4, checkpoint every 2, stopped at step 3)."""
    with interrupted_at(3):
        assert main(["unlearn"] + unlearn_args(saved, out, steps="4", checkpoint_every="2", **changes)) == 130
    capsys.readouterr()
    assert (out / "checkpoint.pt").exists()


def test_resume_with_other_settings_or_forget_set_is_refused(saved, tmp_path, capsys):
    out = tmp_path / "out"
    interrupted_run(saved, out, capsys)
    err = one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, steps="4", checkpoint_every="2", lr="1e-3"))
    assert "belongs to another run (differs in: learning_rate 5e-05 -> 0.001)" in err and "--restart" in err
    other_ids = saved / "other_ids.txt"
    other_ids.write_text("tech-0\n")
    err = one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, steps="4", checkpoint_every="2",
                                                              forget_ids=other_ids))
    assert "differs in: the forget" in err
    assert (out / "checkpoint.pt").exists() and not (out / "model").exists()  # nothing was touched
    # --restart starts the other run over, and its result is then refused to a third run
    assert main(["unlearn", "--restart"] + unlearn_args(saved, out, steps="4", lr="1e-3")) == 0
    assert json.loads((out / "report.json").read_text())["config"]["learning_rate"] == 1e-3
    err = one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, steps="4"))
    assert "holds the result of another run (differs in: learning_rate 0.001 -> 5e-05)" in err


def test_rerun_of_a_finished_run_returns_its_result(saved, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["unlearn"] + unlearn_args(saved, out)) == 0
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert main(["unlearn"] + unlearn_args(saved, out)) == 0
    assert (out / "model" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_names_the_file_and_restart(saved, tmp_path, capsys, damage):
    out = tmp_path / "out"
    interrupted_run(saved, out, capsys)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint"}[damage])
    err = one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out, steps="4", checkpoint_every="2"))
    assert f"{path} is damaged or incomplete" in err and "--restart" in err
    assert main(["unlearn", "--restart"] + unlearn_args(saved, out, steps="4", checkpoint_every="2")) == 0


def test_an_out_in_use_by_a_live_process_is_refused(saved, tmp_path, capsys):
    out = tmp_path / "out"
    with claimed_folder(out):  # as another process running on it would hold it
        err = one_line_failure(capsys, ["unlearn"] + unlearn_args(saved, out))
    assert f"{out} is in use by another running process (pid {os.getpid()})" in err
    assert not (out / "model").exists()
    assert main(["unlearn"] + unlearn_args(saved, out)) == 0  # the lock went with its holder


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from deepcut_fast.unlearning.files import claimed_folder\n"
        f"with claimed_folder({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match="in use by another running process"):
        with claimed_folder(out):
            pass
    holder.kill()
    holder.wait()
    with claimed_folder(out):  # the operating system dropped the dead holder's lock
        pass


def test_meta_tensors_are_refused_by_name():
    from deepcut_fast import contrastive_unlearn_loss

    z = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="z is on the meta device"):
        contrastive_unlearn_loss(z, torch.zeros(4, dtype=torch.long, device="meta"),
                                 torch.zeros(4, dtype=torch.bool, device="meta"))


def test_relative_out_paths_work(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["unlearn"] + unlearn_args(saved, Path("relative-out"))) == 0
    assert (tmp_path / "relative-out" / "report.json").exists()
