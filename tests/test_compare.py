"""``deepcut-fast finetune`` and ``deepcut-fast compare`` end to end on a tiny BERT and CSV files."""
import json
import shutil

import pytest
import torch

from deepcut_fast.cli import main
from deepcut_fast.unlearning import compare
from deepcut_fast.unlearning.compare import METHODS_COMPARED, REFERENCES, fit
from deepcut_fast.unlearning.data import write_table
from deepcut_fast.unlearning.recipe import RECIPE_FILE, Recipe
from tiny_models import autocast_seen, bf16_cpu, tiny_bert, toy_corpus


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("compare")
    train, test = toy_corpus(), toy_corpus(per_class=12, seed=5)
    base = tiny_bert(train.label_names, tok.vocab_size)  # the "pretrained" model the recipe starts from
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    write_table(train, root / "train.csv")
    write_table(test, root / "test.csv")
    assert main(["finetune", "--data", str(root / "train.csv"), "--id-column", "id", "--out", str(root / "original"),
                 "--base", str(root / "base"), "--epochs", "25", "--lr", "2e-3", "--max-length", "32"]) == 0
    return root


def test_finetune_saves_its_recipe(files):
    recipe = Recipe.load(files / "original" / RECIPE_FILE)
    assert recipe == Recipe(base=str(files / "base"), epochs=25, learning_rate=2e-3, max_length=32)


def test_compare_runs_every_method_on_csv_files(files, capsys):
    out = files / "out"
    argv = ["compare", "--model", str(files / "original"), "--data", str(files / "train.csv"), "--id-column", "id",
            "--test", str(files / "test.csv"), "--forget-class", "tech", "--out", str(out), "--lr", "2e-3",
            "--steps", "8", "--budget", "1000", "--max-length", "32"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["summary"]) == list(REFERENCES + METHODS_COMPARED)
    assert report["request"] == "class" and report["forgotten_classes"] == ["tech"]
    assert report["sizes"] == dict(train=72, forget=24, retain=48, heldout=18, test=18)  # test split in halves
    deepcut, retrain = report["summary"]["deepcut"], report["summary"]["retrain"]
    assert retrain["forgotten_class_recall_train"] == 0.0  # retrained without the class
    assert deepcut["target_met"] and deepcut["forgotten_class_recall_train"] <= 2.0
    assert report["details"]["deepcut"]["calibration"]["stopped_because"] == "target met"
    assert report["config"]["precision"] in ("fp32", "bf16")  # "auto" resolved: what every method ran in
    assert retrain["distance_to_retrain"] == 0 and retrain["cka_test"] == pytest.approx(1.0)
    for row in report["summary"].values():
        assert {"knn_forget", "knn_test", "cka_forget", "relearn_gap", "time_ratio"} <= set(row)
    assert (out / "report.md").read_text().count("\n| ") == 1 + 11 and (out / "report.png").stat().st_size > 10_000
    cached = sorted(p.name for p in (out / "cache").iterdir())
    assert [name.rsplit("-", 1)[0] for name in cached] == ["retrain-seed0", "retrain-seed1"]
    # a rerun with fewer methods reuses both retrained models
    assert main(argv + ["--methods", "deepcut", "--one-retrain"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert list(again["summary"]) == ["original", "retrain", "deepcut"]
    assert again["summary"]["retrain"]["test_f1"] == pytest.approx(retrain["test_f1"])
    assert sorted(p.name for p in (out / "cache").iterdir()) == cached


def test_each_method_is_timed_against_retraining_steps_timed_beside_it(files, tmp_path, monkeypatch):
    """The machine's speed drifts within a comparison: a method's time ratio divides by the
    retraining steps timed right before and right after it, not by one timing for all."""
    timed = iter([1.0, 2.0, 3.0])  # seconds per retraining step: before deepcut, between, after npo
    monkeypatch.setattr(compare, "retrain_step_seconds", lambda *args, **kwargs: next(timed))
    out = tmp_path / "o"
    assert main(["compare", "--model", str(files / "original"), "--data", str(files / "train.csv"), "--id-column",
                 "id", "--test", str(files / "test.csv"), "--forget-class", "tech", "--out", str(out), "--steps", "2",
                 "--max-length", "32", "--methods", "deepcut,npo", "--one-retrain"]) == 0
    report = json.loads((out / "report.json").read_text())
    steps = report["timing"]["retrain_steps"]
    assert report["timing"]["retrain_step_seconds"] == pytest.approx(2.0)  # the mean of every timing
    for name, per_step in (("deepcut", 1.5), ("npo", 2.5)):
        assert report["details"][name]["timing"]["retrain_step_seconds"] == pytest.approx(per_step)
        assert report["summary"][name]["time_ratio"] == \
            pytest.approx(report["summary"][name]["seconds"] / (per_step * steps))
    assert report["summary"]["retrain"]["time_ratio"] == \
        pytest.approx(report["summary"]["retrain"]["seconds"] / (2.0 * steps))


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_training_runs_in_the_recipe_precision_whatever_the_cpu(monkeypatch, tok, precision, dtype):
    """Fine-tuning and retraining repeat the recipe: on a CPU where unlearning steps would pick bf16,
    an fp32 recipe still trains without autocast."""
    bf16_cpu(monkeypatch, True)
    data = toy_corpus(per_class=4)
    model = tiny_bert(data.label_names, tok.vocab_size)
    seen = autocast_seen(model)
    fit(model, tok, data, Recipe(max_length=32, precision=precision), seed=0, steps=2)
    assert len(seen) == 2 and set(seen) == {dtype}


def test_compare_retrains_and_budgets_in_the_recipe_precision(files, tmp_path):
    """The budget is a fifth of retraining as the recipe runs it: in its precision and epochs."""
    recipe = json.loads((files / "original" / RECIPE_FILE).read_text())
    (tmp_path / "bf16.json").write_text(json.dumps(dict(recipe, precision="bf16")))
    out = tmp_path / "o"
    assert main(["compare", "--model", str(files / "original"), "--data", str(files / "train.csv"), "--id-column",
                 "id", "--test", str(files / "test.csv"), "--forget-class", "tech", "--out", str(out), "--steps", "2",
                 "--max-length", "32", "--recipe", str(tmp_path / "bf16.json"), "--methods", "deepcut",
                 "--one-retrain"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["precision"] == report["config"]["retrain_precision"] == "bf16"
    assert report["config"]["retrain_epochs"] == recipe["epochs"]
    assert report["details"]["deepcut"]["calibration"]["budget_epochs"] == pytest.approx(0.2 * recipe["epochs"])
    # a bf16 retraining is not the fp32 one: its cache name differs
    assert Recipe(**dict(recipe, precision="bf16")).cache_key() != Recipe(**recipe).cache_key()


def test_unlearn_budgets_against_the_retraining_the_model_was_fine_tuned_in(files, tmp_path, capsys):
    """A model that finetune made in bf16 over 3 epochs is budgeted against a bf16 retraining of
    3 epochs (a fifth of it: 0.6 epochs), and so is a further request on the run's model (which
    has no recipe beside it); options given win; an earlier run's unreadable report is named."""
    model = tmp_path / "bf16-model"
    shutil.copytree(files / "original", model)
    recipe = json.loads((model / RECIPE_FILE).read_text())
    (model / RECIPE_FILE).write_text(json.dumps(dict(recipe, precision="bf16", epochs=3.0)))
    for n in range(4):
        (tmp_path / f"ids{n}.txt").write_text(f"tech-{n}\n")

    def budgeted_against(start, out, request, extra=()):
        assert main(["unlearn", *start, "--data", str(files / "train.csv"), "--id-column", "id", "--forget-ids",
                     str(tmp_path / f"ids{request}.txt"), "--test", str(files / "test.csv"), "--out", str(out),
                     "--steps", "1", "--max-length", "32", *extra]) == 0
        report = json.loads((out / "report.json").read_text())
        return (report["config"]["retrain_precision"], report["config"]["retrain_epochs"],
                pytest.approx(report["calibration"]["budget_epochs"]))

    assert budgeted_against(["--model", str(model)], tmp_path / "first", 0) == ("bf16", 3.0, 0.6)
    assert budgeted_against(["--previous", str(tmp_path / "first")], tmp_path / "second", 1) == ("bf16", 3.0, 0.6)
    assert budgeted_against(["--model", str(model)], tmp_path / "told", 2,
                            ["--retrain-precision", "fp32", "--retrain-epochs", "1"]) == ("fp32", 1.0, 0.2)
    assert budgeted_against(["--model", str(model)], tmp_path / "budget", 3, ["--budget", "0.3"]) == ("bf16", 3.0, 0.3)

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "first", broken)
    (broken / "report.json").write_text('{"config": {"retrain_precision": "bf')
    capsys.readouterr()
    assert main(["unlearn", "--previous", str(broken), "--data", str(files / "train.csv"), "--id-column", "id",
                 "--forget-ids", str(tmp_path / "ids1.txt"), "--out", str(tmp_path / "after-broken")]) == 1
    err = capsys.readouterr().err
    assert f"{broken / 'report.json'}: not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_recipe_precision_is_checked():
    with pytest.raises(ValueError, match="recipe precision must be one of .*'fp32'.*, got 'auto'"):
        Recipe(precision="auto")


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "{root}/missing.json"], "missing.json: no such file"),
    (["--methods", "deepcut,magic"], "methods ['magic'] are not among"),
])
def test_compare_input_errors_are_one_line(files, tmp_path, capsys, extra, message):
    argv = ["compare", "--model", str(files / "original"), "--data", str(files / "train.csv"), "--id-column", "id",
            "--test", str(files / "test.csv"), "--forget-class", "tech", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main(argv + [e.format(root=files) for e in extra]) == 1
    err = capsys.readouterr().err
    assert message.format(root=files) in err and len(err.strip().splitlines()) == 1


def test_compare_without_a_recipe_says_how_to_get_one(files, tmp_path, capsys):
    assert main(["compare", "--model", str(files / "base"), "--data", str(files / "train.csv"), "--test",
                 str(files / "test.csv"), "--forget-class", "tech", "--out", str(tmp_path / "o")]) == 1
    assert "has no recipe.json" in capsys.readouterr().err
