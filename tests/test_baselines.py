"""Every unlearning method runs with the same signature and moves the model the way it should."""
import copy
import time

import pytest
import torch

from deepcut_fast.unlearning import baselines
from deepcut_fast.unlearning.data import forget_indices
from deepcut_fast.unlearning.model import encode_labelled
from deepcut_fast.unlearning.unlearner import UnlearnConfig, accuracy
from tiny_models import fine_tune, tiny_bert, tokenizer, toy_corpus


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    data = toy_corpus()
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    return tok, data, model, forget, retain


@pytest.mark.parametrize("name", sorted(baselines.METHODS))
def test_same_signature_and_budget(setup, name):
    tok, _, model, forget, retain = setup
    cfg = UnlearnConfig(calibrate=False, steps=4, learning_rate=1e-3)
    result = baselines.METHODS[name](copy.deepcopy(model), tok, forget, retain, cfg, progress=False)
    assert len(result.history) == (0 if name == "original" else 4)
    assert not result.model.training


@pytest.mark.parametrize("name", ["gradient_ascent", "gradient_difference", "random_relabel", "scrub", "salun",
                                  "npo"])
def test_forget_accuracy_falls(setup, name):
    tok, _, model, forget, retain = setup
    result = baselines.METHODS[name](copy.deepcopy(model), tok, forget, retain,
                                     UnlearnConfig(calibrate=False, steps=15, learning_rate=2e-3), progress=False)
    assert accuracy(result.model, tok, forget) < 0.5


def test_retrain_learns_the_retain_set_only(setup):
    tok, data, _, forget, retain = setup
    base = tiny_bert(data.label_names, tok.vocab_size, seed=1)
    result = baselines.retrain(base, tok, forget, retain, UnlearnConfig(calibrate=False, steps=60, learning_rate=2e-3),
                               progress=False)
    assert accuracy(result.model, tok, retain) >= 0.95
    assert accuracy(result.model, tok, forget) == 0.0  # never saw the class


def test_npo_starts_at_its_bound_and_scrub_alternates(setup):
    """NPO's first step compares the model with itself: margin 0, loss (2 / beta) log 2; SCRUB's
    odd steps ascend the forget KL (0 at the start: student = teacher), even steps descend CE."""
    import math

    tok, _, model, forget, retain = setup
    cfg = UnlearnConfig(calibrate=False, steps=4, learning_rate=1e-3)
    npo = baselines.npo(copy.deepcopy(model), tok, forget, retain, cfg, progress=False)
    # dropout makes the student differ slightly from its eval-mode reference
    assert npo.history[0]["npo"] == pytest.approx(2 / baselines.NPO_BETA * math.log(2), rel=1e-3)
    scrub = baselines.scrub(copy.deepcopy(model), tok, forget, retain, cfg, progress=False)
    max_steps, min_steps = scrub.history[0::2], scrub.history[1::2]
    assert all("forget_kl" in r and "ce" not in r for r in max_steps)
    assert all("ce" in r and "retain_kl" in r for r in min_steps)
    assert max_steps[1]["forget_kl"] > max_steps[0]["forget_kl"]  # the max step drives it up


def test_salun_moves_only_the_salient_weights(setup):
    tok, _, model, forget, retain = setup
    cfg = UnlearnConfig(calibrate=False, steps=5, learning_rate=1e-3)
    masks = baselines.saliency_mask(copy.deepcopy(model), tok, forget, cfg)
    model_copy = copy.deepcopy(model).eval()  # the forget loss's gradient, computed here independently
    inputs, labels = encode_labelled(tok, forget.texts, forget.labels, cfg.max_length, "cpu")
    torch.nn.functional.cross_entropy(model_copy(**inputs).logits, labels).backward()
    grads = {n: p.grad for n, p in model_copy.named_parameters() if p.grad is not None}
    reached = sum(int((g != 0).sum()) for g in grads.values())
    salient = sum(int(m.sum()) for m in masks.values())
    assert salient == pytest.approx(baselines.SALUN_SHARE * reached, rel=0.01)  # half of the weights it reaches
    assert all(not masks[n][g == 0].any() for n, g in grads.items())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = dict(baselines.salun(copy.deepcopy(model), tok, forget, retain, cfg, progress=False).model.named_parameters())
    for name, mask in masks.items():
        moved = (after[name].detach() - before[name]).abs()
        # outside the mask only AdamW's weight decay acts: |w| * lr * 0.01 per step
        assert (moved[~mask] <= 5 * 1e-3 * 0.01 * before[name].abs()[~mask] + 1e-6).all(), name  # + rounding
    assert any((after[n].detach() - before[n])[m].abs().max() > 1e-4 for n, m in masks.items() if m.any())


def test_gradient_ascent_stops_when_there_is_no_forget_sample(setup):
    """Gradient ascent trains on forget samples alone: it has nothing to do when none is left (as when
    the calibrated focus keeps none): it takes no step and says so, instead of failing on an
    empty batch."""
    tok, data, model, _, retain = setup
    result = baselines.gradient_ascent(copy.deepcopy(model), tok, data.subset([]), retain,
                                       UnlearnConfig(calibrate=False, steps=4, learning_rate=1e-3), progress=False)
    assert result.history == [] and not result.model.training
    assert torch.equal(next(result.model.parameters()), next(model.parameters()))


def test_salun_counts_its_saliency_mask_in_the_budget(setup, monkeypatch):
    """SalUn's mask is a pass over the whole forget set before its first step; a calibrated run
    counts it in its time budget like the steps and checks, so every method gets the same time.
    Here retraining is timed at 3 s an epoch (a 3 s budget at 1 epoch) and the mask takes 3.2 s:
    the run takes the one step that always runs, where without the mask the budget holds the
    two steps its cap allows."""
    from deepcut_fast.unlearning import unlearner

    tok, _, model, forget, retain = setup
    epoch_steps = unlearner.steps_per_epoch(len(retain), UnlearnConfig().retain_batch_size)
    monkeypatch.setattr(unlearner, "probe_seconds", lambda *args: 3.0 / epoch_steps)
    real_mask = baselines.saliency_mask

    def slow_mask(*args, **kwargs):
        time.sleep(3.2)
        return real_mask(*args, **kwargs)

    cfg = UnlearnConfig(budget=1.0, learning_rate=1e-3, check_time_share=None)
    unmasked = baselines.random_relabel(copy.deepcopy(model), tok, forget, retain, cfg, progress=False)
    assert len(unmasked.history) > 1  # the budget holds more than the first step
    monkeypatch.setattr(baselines, "saliency_mask", slow_mask)
    result = baselines.salun(copy.deepcopy(model), tok, forget, retain, cfg, progress=False)
    split = result.calibration["seconds_split"]
    assert len(result.history) == 1 and result.calibration["stopped_because"] == "budget"
    assert split["preparation"] >= 3.2
    assert result.calibration["seconds"] == pytest.approx(sum(split.values()))


def test_salun_makes_no_mask_for_a_run_without_steps(setup, monkeypatch):
    """A run whose target is met at the start takes no step, so SalUn's mask (a pass over the
    whole forget set) is not made: no time goes to it."""
    from deepcut_fast.unlearning.calibration import Calibrator

    tok, _, model, forget, retain = setup
    begin = Calibrator.begin
    monkeypatch.setattr(Calibrator, "begin", lambda self, *args: begin(self, *args) or True)  # "met at the start"

    def no_mask(*args, **kwargs):
        raise AssertionError("the saliency mask was made for a run that takes no step")

    monkeypatch.setattr(baselines, "saliency_mask", no_mask)
    result = baselines.salun(copy.deepcopy(model), tok, forget, retain, UnlearnConfig(learning_rate=1e-3),
                             progress=False)
    assert result.history == [] and result.calibration["stopped_because"] == "target met before the first step"
    assert result.calibration["seconds_split"]["preparation"] == 0


@pytest.mark.parametrize("name", ["scrub", "npo", "salun"])
def test_work_before_the_first_step_counts_in_the_run_time(setup, monkeypatch, name):
    """SCRUB's teacher and NPO's reference (copies of the original) and SalUn's mask are made
    before the first step: a calibrated run reports them as its preparation, inside its time."""
    from deepcut_fast.unlearning import unlearner

    tok, _, model, forget, retain = setup
    monkeypatch.setattr(unlearner, "probe_seconds", lambda *args: 1e-3)  # a budget of about one step
    result = baselines.METHODS[name](copy.deepcopy(model), tok, forget, retain,
                                     UnlearnConfig(learning_rate=1e-3), progress=False)
    split = result.calibration["seconds_split"]
    assert split["preparation"] > 0
    assert result.calibration["seconds"] == pytest.approx(sum(split.values()))
