"""Deletion requests in sequence (``unlearn --previous``) and their audit record
(``deepcut-fast audit``): cumulative forget sets, every earlier set measured again, and a chain
that rejects an edited record, a removed record and a swapped model file."""
import json
import shutil

import numpy as np
import pytest

from deepcut_fast.cli import main
from deepcut_fast.unlearning.audit import model_hash, verify
from deepcut_fast.unlearning.data import load_table, write_table
from deepcut_fast.unlearning.evaluation import predict
from deepcut_fast.unlearning.model import load_classifier
from tiny_models import save_toy_job, toy_corpus

# the third request repeats a sample of the first: only its new samples are its own
REQUESTS = [["business-0", "sport-1"], ["tech-2", "business-3"], ["sport-4", "tech-5", "business-0"]]


def unlearn(root, out, start, ids_file, *extra):
    return main(["unlearn", *start, "--data", str(root / "train.csv"), "--id-column", "id", "--forget-ids",
                 str(ids_file), "--test", str(root / "test.csv"), "--out", str(out), "--steps", "3", "--no-calibrate",
                 "--lr", "2e-3", "--max-length", "32", *extra])


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    """Three requests, each on the model of the one before; the last compared with a reference."""
    root = save_toy_job(tmp_path_factory.mktemp("sequence"))
    write_table(toy_corpus(per_class=8, seed=1), root / "test.csv")
    runs = []
    for n, ids in enumerate(REQUESTS):
        (root / f"request{n}.txt").write_text("\n".join(ids) + "\n")
        start = ["--model", str(root / "model")] if n == 0 else ["--previous", str(runs[-1])]
        extra = ["--reference", str(root / "model")] if n == 2 else []
        assert unlearn(root, root / f"run{n}", start, root / f"request{n}.txt", *extra) == 0
        runs.append(root / f"run{n}")
    return root, runs


def report(run):
    return json.loads((run / "report.json").read_text())


def test_forget_sets_accumulate(sequence):
    _, runs = sequence
    last = report(runs[2])
    assert [r["request"] for r in last["requests"]] == ["request-1", "request-2", "request-3"]
    assert [sorted(r["forget_ids"]) for r in last["requests"]] == [sorted(REQUESTS[0]), sorted(REQUESTS[1]),
                                                                   ["sport-4", "tech-5"]]
    assert [report(r)["sizes"] for r in runs] == [dict(forget=2, retain=70), dict(forget=4, retain=68),
                                                  dict(forget=6, retain=66)]


def test_every_earlier_forget_set_is_measured_on_the_last_model(sequence):
    root, runs = sequence
    figures = report(runs[2])["metrics"]["requests"]
    assert list(figures) == ["request-1", "request-2", "request-3"]
    train = load_table(root / "train.csv", id_column="id")
    model, tok = load_classifier(runs[2] / "model", train.label_names)
    for name, ids in zip(figures, [REQUESTS[0], REQUESTS[1], ["sport-4", "tech-5"]]):
        rows = train.subset([train.ids.index(i) for i in ids])
        preds = predict(model, tok, rows, max_length=32)
        assert figures[name]["accuracy"] == pytest.approx(float(np.mean(preds.predicted == preds.labels)))


def test_audit_chain_links_the_runs(sequence, capsys):
    root, runs = sequence
    records = verify(runs[2])
    assert [r["request"] for r in records] == ["request-1", "request-2", "request-3"]
    assert records[0]["model_before"] == model_hash(root / "model")
    assert [r["model_after"] for r in records] == [model_hash(r / "model") for r in runs]
    assert len(set(r["model_after"] for r in records)) == 3  # every request changed the model
    assert [r["forgotten_size"] for r in records] == [2, 4, 6] and records[2]["forget_size"] == 2
    assert set(records[2]["figures"]["forget_accuracy"]) == {"request-1", "request-2", "request-3"}
    assert records[2]["figures"]["distance_to_reference"] > 0 and "distance_to_reference" not in records[1]["figures"]
    assert "mia_loss_auc" in records[0]["figures"]
    assert verify(runs[1]) == records[:2]  # an earlier run's folder holds the chain up to it
    assert main(["audit", str(runs[2]), "--head", records[2]["hash"]]) == 0
    assert "chain verified: 3 records" in capsys.readouterr().out


@pytest.fixture
def copied(sequence, tmp_path):
    _, runs = sequence
    shutil.copytree(runs[2], tmp_path / "run")
    return tmp_path / "run"


def audit_error(run, capsys, *extra):
    assert main(["audit", str(run), *extra]) == 1
    return capsys.readouterr().err


def rewrite(run, edit):
    path = run / "audit.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in edit(lines)))


def test_audit_rejects_an_edited_record(copied, capsys):
    def edit(records):
        records[1]["figures"]["forget_accuracy"]["request-1"] = 0.0
        return records

    rewrite(copied, edit)
    assert "line 2: the record was edited" in audit_error(copied, capsys)


def test_audit_rejects_an_edited_record_with_its_hash_recomputed(copied, capsys):
    from deepcut_fast.unlearning.audit import content_hash

    def edit(records):
        records[0]["target_met"] = True
        records[0]["hash"] = content_hash({k: v for k, v in records[0].items() if k != "hash"})
        return records

    rewrite(copied, edit)
    assert "line 2: the chain is broken" in audit_error(copied, capsys)


def test_audit_rejects_a_removed_record(copied, capsys):
    rewrite(copied, lambda records: [records[0], records[2]])
    assert "line 2: the chain is broken" in audit_error(copied, capsys)


def test_audit_rejects_removing_the_last_record(copied, capsys):
    rewrite(copied, lambda records: records[:2])
    assert "does not match the last record's model_after" in audit_error(copied, capsys)


def test_audit_rejects_a_swapped_model_file(sequence, copied, capsys):
    _, runs = sequence
    shutil.copy(runs[1] / "model" / "model.safetensors", copied / "model" / "model.safetensors")
    assert "the model was replaced or modified" in audit_error(copied, capsys)


def test_audit_rejects_another_head(copied, capsys):
    assert "is not the expected head" in audit_error(copied, capsys, "--head", "0" * 64)


def test_rerun_returns_the_finished_request_without_a_new_record(sequence):
    root, runs = sequence
    before = (runs[1] / "audit.jsonl").read_text()
    assert unlearn(root, runs[1], ["--previous", str(runs[0])], root / "request1.txt") == 0
    assert (runs[1] / "audit.jsonl").read_text() == before


def test_a_run_folder_continued_from_another_request_is_refused(sequence, capsys):
    root, runs = sequence
    assert unlearn(root, runs[1], ["--previous", str(runs[1])], root / "request2.txt") == 1
    assert "holds the result of another run" in capsys.readouterr().err


def test_sequence_errors_name_the_option(sequence, tmp_path, capsys):
    root, runs = sequence
    assert unlearn(root, tmp_path / "a", ["--previous", str(root)], root / "request1.txt") == 1
    assert f"--previous {root} is not a finished unlearn run" in capsys.readouterr().err
    assert unlearn(root, tmp_path / "b", ["--previous", str(runs[0])], root / "request0.txt") == 1
    assert "every sample of this request was forgotten by an earlier request" in capsys.readouterr().err
    assert unlearn(root, tmp_path / "c", ["--previous", str(runs[0])], root / "request1.txt",
                   "--request-id", "request-1") == 1
    assert "--request-id 'request-1' names an earlier request" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text((root / "train.csv").read_text().replace("market", "markets"))
    assert main(["unlearn", "--previous", str(runs[0]), "--data", str(other), "--id-column", "id", "--forget-ids",
                 str(root / "request1.txt"), "--out", str(tmp_path / "d"), "--no-calibrate", "--steps", "1"]) == 1
    assert "is not the training data of the --previous run" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a request starts from one model
        main(["unlearn", "--previous", str(runs[0]), "--model", str(root / "model"), "--data", "x", "--out", "y",
              "--forget-class", "tech"])
    assert not any((tmp_path / name).exists() for name in "abcd")  # a refused run leaves nothing
