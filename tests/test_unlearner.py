"""DeepCUT unlearning on a small random BERT with the real MiniLM tokenizer (fast, offline)."""
import pytest
import torch
import torch.nn.functional as F

from deepcut_fast import contrastive_unlearn_loss_reference as reference
from deepcut_fast.unlearning.data import forget_indices
from deepcut_fast.unlearning.model import embed
from deepcut_fast.unlearning.unlearner import DeepCUTUnlearner, UnlearnConfig, deepcut_loss
from tiny_models import tiny_bert, toy_corpus  # fixtures tok, original: conftest


def batch(tok, data, n=10):
    enc = tok(data.texts[:: len(data) // n][:n], padding=True, return_tensors="pt")
    labels = torch.tensor(data.labels[:: len(data) // n][:n])
    forget = torch.arange(n) % 3 == 0
    return enc, labels, forget


@pytest.mark.parametrize("embedding", ["cls", "mean", "pooler"])
def test_loss_is_retain_ce_plus_gamma_contrast(tok, embedding):
    data = toy_corpus(per_class=5)
    model = tiny_bert(data.label_names, tok.vocab_size).eval()  # dropout off: the views agree
    enc, labels, forget = batch(tok, data)
    cfg = UnlearnConfig(gamma=0.7, temperature=0.3, views=2, embedding=embedding, backend="reference")
    loss, parts = deepcut_loss(model, enc, labels, forget, cfg)

    out = model(**enc, output_hidden_states=True)
    z = embed(model, out, enc["attention_mask"], embedding).repeat(2, 1)
    contrast = reference(z, labels.repeat(2), forget.repeat(2), instance_ids=torch.arange(10).repeat(2),
                         temperature=0.3)
    want = F.cross_entropy(out.logits[~forget], labels[~forget]) + 0.7 * contrast
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts["contrast"], contrast.detach())


def test_token_level_anchors_ignore_padding(tok):
    data = toy_corpus(per_class=4)
    model = tiny_bert(data.label_names, tok.vocab_size, task="token").eval()
    enc, _, forget = batch(tok, data, n=6)
    token_labels = torch.randint(0, 3, enc["input_ids"].shape)
    token_labels[enc["attention_mask"] == 0] = -100
    token_labels[:, 0] = -100  # [CLS]
    cfg = UnlearnConfig(embedding="token", views=2, backend="reference")
    loss, parts = deepcut_loss(model, enc, token_labels, forget, cfg)

    hidden = model(**enc, output_hidden_states=True).hidden_states[-1].flatten(0, 1).repeat(2, 1)
    n = token_labels.numel()
    want = reference(hidden, token_labels.flatten().repeat(2), forget[:, None].expand_as(token_labels).flatten().repeat(2),
                     instance_ids=torch.arange(n).repeat(2), temperature=cfg.temperature)
    torch.testing.assert_close(parts["contrast"], want.detach())
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="token labels"):
        deepcut_loss(model, enc, token_labels, forget, UnlearnConfig(embedding="cls"))


@pytest.mark.parametrize("gamma, forgets", [(1.0, True), (0.0, False)])
def test_class_unlearning_comes_from_the_contrastive_term(tok, original, gamma, forgets):
    """DeepCUT removes a memorised class in 20 steps; CE on the retain set alone (gamma = 0,
    same steps) does not, while both keep the retained classes."""
    data, state = original
    model = tiny_bert(data.label_names, tok.vocab_size)
    model.load_state_dict(state)
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    unlearner = DeepCUTUnlearner(model, tok, UnlearnConfig(calibrate=False, steps=20, learning_rate=2e-3, gamma=gamma))
    assert unlearner.accuracy(forget) == 1.0
    result = unlearner.unlearn(forget, retain, progress=False)
    assert len(result.history) == 20 and not result.stopped_early
    assert unlearner.accuracy(retain) >= 0.95
    if forgets:
        assert unlearner.accuracy(forget) <= 0.1
    else:
        assert unlearner.accuracy(forget) >= 0.9


def test_stopping_rule_ends_the_run_early(tok, original):
    data, state = original
    model = tiny_bert(data.label_names, tok.vocab_size)
    model.load_state_dict(state)
    forget, retain = data.partition(forget_indices(data, forget_class="sport"))
    cfg = UnlearnConfig(calibrate=False, steps=60, learning_rate=2e-3, stop_forget_accuracy=0.2, check_every=2)
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False)
    assert result.stopped_early and len(result.history) < 60
    assert result.history[-1]["forget_accuracy"] <= 0.2


def test_stopping_rule_waits_for_the_retain_samples(tok, original, monkeypatch):
    """With stop_retain_drop, a check where the forget accuracy is low enough but the retain
    sample is still more than the drop below its starting accuracy does not stop the run; the
    first check where both hold does. The accuracies are scripted (the toy model never loses its
    retain samples), so the rule itself is what is tested; the rule does not change the batches."""
    import deepcut_fast.unlearning.unlearner as module

    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="sport"))
    script = {"forget": [0.6, 0.1, 0.0, 0.0, 0.0, 0.0], "retain": [0.95, 0.80, 0.90, 0.94, 0.95]}

    def scripted(model, tokenizer, sample, max_length):
        return script["forget" if sample.ids[0] in forget.ids else "retain"].pop(0)

    def run(drop):
        model = tiny_bert(data.label_names, tok.vocab_size)
        model.load_state_dict(state)
        cfg = UnlearnConfig(calibrate=False, steps=12, learning_rate=2e-3, stop_forget_accuracy=0.2, stop_retain_drop=drop,
                            check_every=2)
        return DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False)

    monkeypatch.setattr(module, "accuracy", scripted)
    waiting = run(0.02)  # retain starts at 0.95: steps 4 (0.80) and 6 (0.90) fail it, step 8 (0.94) passes
    assert waiting.retain_accuracy_before == 0.95 and waiting.stopped_early
    assert [r["step"] for r in waiting.history if "retain_accuracy" in r] == [4, 6, 8]
    assert len(waiting.history) == 8
    script.update(forget=[0.6, 0.1], retain=[])
    plain = run(None)  # forget accuracy alone: stops at step 4 and never looks at the retain set
    assert len(plain.history) == 4 and plain.retain_accuracy_before is None
    assert [r["loss"] for r in waiting.history[:4]] == pytest.approx([r["loss"] for r in plain.history])


@pytest.mark.parametrize("changes, message", [
    (dict(embedding="max"), "embedding must be one of"),
    (dict(views=0), "views must be >= 1"),
    (dict(forget_pull="min"), "forget_pull must be one of"),
    (dict(steps=None, epochs=None, calibrate=False), "give steps or epochs"),
    (dict(stop_forget_accuracy=0.1), "fixed stopping rule of a run without calibration"),
    (dict(request="everything"), "request must be one of"),
    (dict(budget=0), "budget must be a finite number > 0"),
    (dict(retrain_epochs=float("inf")), "retrain_epochs must be a finite number > 0"),
    (dict(guard_recall_drop=2), "guard_recall_drop must be a fraction between 0 and 1"),
    (dict(forget_batch_size=0), "forget_batch_size must be >= 1"),
    (dict(stop_retain_drop=0.01), "stop_retain_drop needs stop_forget_accuracy"),
])
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        UnlearnConfig(**changes)


@pytest.mark.parametrize("changes, epochs", [({}, 0.4), (dict(retrain_epochs=3), 0.6), (dict(budget=0.3), 0.3),
                                             (dict(budget=0.3, retrain_epochs=3), 0.3)])
def test_default_budget_is_a_fifth_of_retraining(changes, epochs):
    """Without a budget, a calibrated run gets a fifth of retraining's epochs (2 unless told)."""
    assert UnlearnConfig(**changes).budget_epochs == pytest.approx(epochs)


def test_epochs_give_steps():
    assert UnlearnConfig(calibrate=False, steps=None, epochs=2, forget_batch_size=16).total_steps(170, 1000) == 22


def test_layer_out_of_range(tok):
    data = toy_corpus(per_class=2)
    model = tiny_bert(data.label_names, tok.vocab_size).eval()
    enc, labels, forget = batch(tok, data, n=6)
    with pytest.raises(ValueError, match="layer 7 is out of range: the model has 3 hidden states"):
        deepcut_loss(model, enc, labels, forget, UnlearnConfig(layer=7))


def test_interrupted_run_resumes_to_the_same_model(tok, original, tmp_path, monkeypatch):
    """Stop a checkpointed run mid-way; the resumed run ends exactly where an uninterrupted one does."""
    import deepcut_fast.unlearning.unlearner as module

    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    # a stopping rule that checks both samples at every step and never fires: its starting
    # retain accuracy must come back from the checkpoint
    cfg = UnlearnConfig(calibrate=False, steps=6, learning_rate=2e-3, stop_forget_accuracy=1.0, stop_retain_drop=-1.0, check_every=1)

    def fresh():
        model = tiny_bert(data.label_names, tok.vocab_size)
        model.load_state_dict(state)
        return DeepCUTUnlearner(model, tok, cfg)

    straight = fresh().unlearn(forget, retain, progress=False)

    checkpoint = module.Checkpoint(tmp_path / "state.pt", every=2)
    calls = []

    def interrupted_at_step_5(*args):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint of step 4
            raise KeyboardInterrupt
        return deepcut_loss(*args)

    monkeypatch.setattr(module, "deepcut_loss", interrupted_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        fresh().unlearn(forget, retain, progress=False, checkpoint=checkpoint)
    monkeypatch.undo()
    assert checkpoint.load()["step"] == 4

    resumed = fresh().unlearn(forget, retain, progress=False, checkpoint=checkpoint)
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history])
    assert resumed.retain_accuracy_before == straight.retain_accuracy_before
    assert [r["retain_accuracy"] for r in resumed.history] == [r["retain_accuracy"] for r in straight.history]
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b)
