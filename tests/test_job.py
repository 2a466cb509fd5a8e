"""deepcut-fast unlearn on a small saved model and CSV data: outputs, errors, resume."""
import json

import pytest

from deepcut_fast.cli import main
from tiny_models import fine_tune, interrupted_at, save_toy_job, tiny_bert, tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_toy_job(tmp_path_factory.mktemp("job"))


def run(saved, out, *extra):
    return main(["unlearn", "--model", str(saved / "model"), "--data", str(saved / "train.csv"), "--id-column", "id",
                 "--out", str(out), "--lr", "2e-3", "--max-length", "32", *extra])


def test_unlearn_class_writes_model_and_report(saved, tmp_path):
    # calibrated (the default): a whole class is found to be one, and the run stops once it is gone
    assert run(saved, tmp_path / "out", "--forget-class", "tech", "--steps", "20", "--budget", "1000") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    calibration = report["calibration"]
    assert (calibration["request"], calibration["met"], calibration["stopped_because"]) == ("class", True, "target met")
    assert calibration["guard_on"] == "retain sample (no held-out data)"
    assert report["sizes"] == {"forget": 24, "retain": 48} and len(report["history"]) < 20
    assert report["config"]["learning_rate"] == 2e-3 and report["config"]["views"] == 1  # given; the class's
    assert report["metrics"]["forget"]["accuracy"] <= 0.02 and report["metrics"]["retain"]["accuracy"] >= 0.95
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_rerun_after_interruption_resumes(saved, tmp_path):
    ids = tmp_path / "forget.txt"
    ids.write_text("business-0\nbusiness-1\nsport-3\n")
    with interrupted_at(4):
        assert run(saved, tmp_path / "out", "--forget-ids", str(ids), "--steps", "6", "--no-calibrate",
                   "--checkpoint-every", "2") == 130
    assert (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "model").exists()
    run(saved, tmp_path / "out", "--forget-ids", str(ids), "--steps", "6", "--no-calibrate", "--checkpoint-every", "2")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["resumed_from_step"] == 2 and [r["step"] for r in report["history"]] == list(range(1, 7))


def test_labels_outside_the_models_classes(saved, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text,label\n1,hello,weather\n2,world,tech\n")
    assert main(["unlearn", "--model", str(saved / "model"), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--forget-class", "tech"]) == 1
    assert "labels ['weather'] are not among the classes" in capsys.readouterr().err


def evaluate_cli(saved, model, out, *extra):
    return main(["evaluate", "--model", str(model), "--data", str(saved / "train.csv"), "--id-column", "id",
                 "--out", str(out), "--max-length", "32", "--forget-class", "tech", *extra])


def test_evaluate_against_a_reference(saved, tmp_path):
    run(saved, tmp_path / "unlearned", "--forget-class", "tech", "--steps", "20", "--no-calibrate")
    test_csv = saved / "train.csv"  # only the figures' plumbing is under test here, not their meaning
    assert evaluate_cli(saved, saved / "model", tmp_path / "self.json", "--test", str(test_csv),
                        "--reference", str(saved / "model")) == 0
    same = json.loads((tmp_path / "self.json").read_text())
    assert same["gap_to_reference"]["distance"] == 0 and same["sizes"] == {"forget": 24, "retain": 48}
    evaluate_cli(saved, tmp_path / "unlearned" / "model", tmp_path / "after.json", "--test", str(test_csv),
                 "--reference", str(saved / "model"))
    after = json.loads((tmp_path / "after.json").read_text())
    gap = after["gap_to_reference"]["forget_accuracy"]
    assert gap == pytest.approx(100 * abs(after["metrics"]["forget"]["accuracy"] -
                                          after["reference_metrics"]["forget"]["accuracy"]))
    assert after["metrics"]["forget"]["accuracy"] <= 0.1 and gap >= 90


def test_evaluate_reference_needs_a_test_set(saved, tmp_path, capsys):
    assert evaluate_cli(saved, saved / "model", tmp_path / "r.json", "--reference", str(saved / "model")) == 1
    assert "needs a test set" in capsys.readouterr().err


def test_unlearn_token_task_from_jsonl(tmp_path):
    from tiny_models import toy_ner_corpus

    tok = tokenizer()
    data = toy_ner_corpus(24)
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size, task="token"), tok, data, steps=30)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [dict(id=i, tokens=w, tags=[data.label_names[t] for t in y], forget=n < 4)
            for n, (i, w, y) in enumerate(zip(data.ids, data.texts, data.labels))]
    (tmp_path / "ner.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["unlearn", "--task", "token", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "ner.jsonl"),
                 "--test", str(tmp_path / "ner.jsonl"), "--id-column", "id", "--forget-column", "forget",
                 "--out", str(tmp_path / "out"), "--steps", "3", "--no-calibrate", "--max-length", "32"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["embedding"] == "token" and report["sizes"] == {"forget": 4, "retain": 20}
    assert set(report["metrics"]["forget"]["recall"]) <= {"PER", "LOC"}
    assert {"test", "mia_loss_auc", "mia_svc_efficacy"} <= set(report["metrics"])  # --test was used
    assert (tmp_path / "out" / "model" / "config.json").exists()
