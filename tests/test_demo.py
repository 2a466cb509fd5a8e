"""Integration: the demo pipeline on the real MiniLM and a 300-document subset of BBC News."""
import json
import re

import pytest
import torch

from deepcut_fast.unlearning.compare import rescored
from deepcut_fast.unlearning.demo import METHOD_ORDER, DemoOptions, cache_name, prepare_data, run_demo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoOptions(quick=True), out, progress=False)


def test_rescored_report_recomputes_the_summary(quick_run):
    """The study's --rescore path: a report's summary comes back from its stored details alone."""
    _, report = quick_run
    stored = json.loads(json.dumps(report))
    assert rescored(dict(stored, summary={}))["summary"] == stored["summary"]


def test_report_covers_every_method(quick_run):
    out, report = quick_run
    assert list(report["summary"]) == list(METHOD_ORDER)
    assert report["sizes"]["forget"] + report["sizes"]["retain"] == report["sizes"]["train"]
    gold = report["details"]["retrain"]
    for name, row in report["summary"].items():
        mine = report["details"][name]
        assert row["forget_f1"] == pytest.approx(100 * mine["forget"]["macro_f1"])
        # distance: the mean gap over the headline figures but the SVC's, F1 and accuracy as fractions
        gaps = [abs(mine[s][k] - gold[s][k]) for s in ("forget", "retain", "test") for k in ("macro_f1", "accuracy")]
        gaps += [abs(mine["mia_loss_auc"] - gold["mia_loss_auc"])]
        assert row["distance_to_retrain"] == pytest.approx(sum(gaps) / len(gaps))
    assert report["summary"]["retrain"]["distance_to_retrain"] == 0
    assert report["summary"]["retrain"]["forgotten_class_recall_train"] == 0  # never saw the class
    assert json.loads((out / "report.json").read_text())["summary"] == json.loads(json.dumps(report["summary"]))
    assert "| deepcut |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_rerun_uses_the_cached_models(quick_run):
    out, report = quick_run
    cached = sorted(p.name for p in (out / "cache").iterdir())
    assert [re.fullmatch(r"(.*)-[0-9a-f]{10}-quick", name).group(1) for name in cached] == \
        ["original-clean-seed0", "retrain-class-seed0", "retrain-class-seed1"]
    again = run_demo(DemoOptions(quick=True), out, progress=False)
    for name in ("original", "retrain", "retrain_seed2"):  # same models, same figures
        assert again["summary"][name]["test_f1"] == pytest.approx(report["summary"][name]["test_f1"])


def test_rerunning_some_methods_replaces_only_their_rows(quick_run, tmp_path):
    """The study's --methods path: the named methods run again on the cached models and their
    rows, each with the retraining timed in its own run, replace theirs in the report; every
    other row and the report's own timing stay as they were."""
    out, report = quick_run
    (tmp_path / "report.json").write_text(json.dumps(report))
    merged = run_demo(DemoOptions(quick=True), tmp_path, progress=False, cache=out / "cache", methods=["salun"],
                      extra=dict(code_version="abc1234"))
    stored = json.loads(json.dumps(report))
    assert merged["timing"] == stored["timing"] and merged["reruns"] == {"salun": {"code_version": "abc1234"}}
    for name in METHOD_ORDER:
        if name != "salun":
            assert merged["details"][name] == stored["details"][name], name
            assert merged["summary"][name] == stored["summary"][name], name
    rerun = merged["details"]["salun"]
    assert rerun["timing"]["retrain_seconds_same_run"] != stored["timing"]["retrain_seconds_same_run"]
    assert merged["summary"]["salun"]["time_ratio"] == \
        pytest.approx(rerun["seconds"] / rerun["timing"]["retrain_seconds_same_run"])
    assert json.loads((tmp_path / "report.json").read_text())["reruns"] == merged["reruns"]


def test_rerunning_some_methods_needs_a_full_report(quick_run, tmp_path):
    out, _ = quick_run
    with pytest.raises(FileNotFoundError, match="report of a full run"):
        run_demo(DemoOptions(quick=True), tmp_path, progress=False, cache=out / "cache", methods=["salun"])


def test_cache_names_follow_the_training_data():
    """Forgetting another class must not reuse the retrained model of the first one; the
    original, trained on the same clean data, is shared."""
    names = {}
    for forget_class in ("tech", "sports"):
        opts = DemoOptions(forget_class=forget_class, quick=True)
        train, _, _, chosen, _ = prepare_data(opts)
        retain = train.partition(chosen)[1]
        names[forget_class] = (cache_name(opts, "original", 0, train), cache_name(opts, "retrain", 0, retain))
    assert names["tech"][0] == names["sports"][0]
    assert names["tech"][1] != names["sports"][1]
    longer = DemoOptions(quick=True)
    longer.train_epochs *= 2  # quick sets its own budget; a changed one must change the name
    assert cache_name(longer, "original", 0, train) != names["sports"][0]


def test_unknown_scenario():
    with pytest.raises(ValueError, match="scenario must be one of"):
        DemoOptions(scenario="everything")


def test_seeds_vary_training_not_the_forget_set():
    first, second = (prepare_data(DemoOptions(scenario="noisy", seed=seed, quick=True)) for seed in (0, 1))
    assert first[3] == second[3] and first[0].labels == second[0].labels
    train, _, _, chosen, notes = first
    relabelled = [train.labels[i] for i in chosen]
    assert all(wrong != notes["true_labels"][train.ids[i]] for i, wrong in zip(chosen, relabelled))
    other_data_seed = prepare_data(DemoOptions(scenario="noisy", data_seed=1, quick=True))
    assert other_data_seed[3] != first[3]


def test_dropout_off_is_restored():
    from deepcut_fast.unlearning.demo import dropout_off
    from tiny_models import tiny_bert, tokenizer

    tok = tokenizer()
    model = tiny_bert(["a", "b"], tok.vocab_size).train()
    inputs = tok(["one two three"], return_tensors="pt")
    with dropout_off(model):  # train mode, yet two passes agree
        torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_memorise_trains_until_the_wrong_labels_are_given():
    """On a toy corpus with relabelled documents: epochs of the schedule are taken one at a time
    and stop once >= 90% of the wrong labels are given; a model that already gives them trains
    no further."""
    from deepcut_fast.unlearning.data import TextDataset
    from deepcut_fast.unlearning.demo import memorise
    from deepcut_fast.unlearning.unlearner import accuracy
    from tiny_models import tiny_bert, tokenizer, toy_corpus

    tok = tokenizer()
    data = toy_corpus(per_class=12)
    chosen = list(range(0, len(data), 6))
    labels = list(data.labels)
    for i in chosen:
        labels[i] = (labels[i] + 1) % len(data.label_names)
    noisy = TextDataset(data.ids, data.texts, labels, data.label_names)
    forget = noisy.subset(chosen)
    opts = DemoOptions(scenario="noisy", memorise_schedule=((2e-3, True),) + ((2e-3, False),) * 39)
    model = tiny_bert(data.label_names, tok.vocab_size)
    assert accuracy(model, tok, forget, opts.max_length) < 0.9
    model, epochs, memorised = memorise(model, tok, noisy, forget, opts)
    assert memorised >= 0.9 and 1 <= epochs < len(opts.memorise_schedule)
    assert accuracy(model, tok, forget, opts.max_length) == memorised
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert memorise(model, tok, noisy, forget, opts, first_epoch=epochs)[1] == epochs
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
