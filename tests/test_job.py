"""deepcut-fast unlearn on a small saved model and CSV data: outputs, errors, resume."""
import csv
import json

import pytest

from deepcut_fast.cli import main
from tiny_models import fine_tune, tiny_bert, tokenizer, toy_corpus


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    tok = tokenizer()
    data = toy_corpus()
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        writer.writerows(zip(data.ids, data.texts, [data.label_names[y] for y in data.labels]))
    return root


def run(saved, out, *extra):
    return main(["unlearn", "--model", str(saved / "model"), "--data", str(saved / "train.csv"), "--id-column", "id",
                 "--out", str(out), "--lr", "2e-3", "--max-length", "32", *extra])


def test_unlearn_class_writes_model_and_report(saved, tmp_path):
    assert run(saved, tmp_path / "out", "--forget-class", "tech", "--steps", "20") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sizes"] == {"forget": 24, "retain": 48} and len(report["history"]) == 20
    assert report["metrics"]["forget"]["accuracy"] <= 0.1 and report["metrics"]["retain"]["accuracy"] >= 0.95
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_rerun_after_interruption_resumes(saved, tmp_path, monkeypatch):
    from deepcut_fast.unlearning import unlearner

    real, calls = unlearner.deepcut_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    ids = tmp_path / "forget.txt"
    ids.write_text("business-0\nbusiness-1\nsport-3\n")
    monkeypatch.setattr(unlearner, "deepcut_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(saved, tmp_path / "out", "--forget-ids", str(ids), "--steps", "6", "--checkpoint-every", "2")
    monkeypatch.undo()
    assert (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "model").exists()
    run(saved, tmp_path / "out", "--forget-ids", str(ids), "--steps", "6", "--checkpoint-every", "2")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["resumed_from_step"] == 2 and [r["step"] for r in report["history"]] == list(range(1, 7))


def test_labels_outside_the_models_classes(saved, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text,label\n1,hello,weather\n2,world,tech\n")
    with pytest.raises(ValueError, match=r"labels \['weather'\] are not among the classes"):
        main(["unlearn", "--model", str(saved / "model"), "--data", str(bad), "--out", str(tmp_path / "o"),
              "--forget-class", "tech"])
