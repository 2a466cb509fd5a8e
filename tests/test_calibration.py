"""The self-calibrating run (calibration module) on a tiny BERT that memorised a toy corpus: the
request found from the data, the target, the guard that undoes steps, the time budget, resume."""
import math
import random

import numpy as np
import pytest
import torch

from deepcut_fast.unlearning.calibration import (PROBE_STEPS, SAMPLE_STEPS_WITHOUT_HELDOUT, Calibrator, check_dtype,
                                                  fixed_sample, probe_seconds, request_kind, sample_focus)
from deepcut_fast.unlearning.evaluation import loss_mia_auc, predict
from deepcut_fast.unlearning.data import TextDataset, forget_indices
from deepcut_fast.unlearning.unlearner import Checkpoint, DeepCUTUnlearner, UnlearnConfig, accuracy
# fixtures tok, original: conftest
from tiny_models import autocast_seen, bf16_cpu, fine_tune, interrupted_at, tiny_bert, toy_corpus

NO_TIME_LIMIT = 1e6  # retraining epochs: the budget never ends these runs
EXACT = "fp32"  # checks predict as ``accuracy`` and ``predict`` do, on every machine (a test compares them)
MEASURE = Calibrator.measure


@pytest.fixture(scope="module")
def heldout():
    return toy_corpus(per_class=20, seed=1)  # same distribution, never trained on


def model_from(state, data, tok):
    model = tiny_bert(data.label_names, tok.vocab_size)
    model.load_state_dict(state)
    return model


def random_forget(data, share=0.25, seed=0):
    return sorted(random.Random(seed).sample(range(len(data)), round(share * len(data))))


def same_weights(model, state):
    return all(torch.equal(p, state[n]) for n, p in model.state_dict().items())


def test_request_is_found_from_the_data(original):
    data, _ = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    assert request_kind("auto", forget, retain) == "class"
    forget, retain = data.partition(random_forget(data))
    assert request_kind("auto", forget, retain) == "sample"
    assert request_kind("mislabelled", forget, retain) == "mislabelled"
    with pytest.raises(ValueError, match="request 'class' needs a class whose every training sample"):
        request_kind("class", forget, retain)


def test_class_request_stops_once_the_class_is_gone(tok, original, heldout):
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    model = model_from(state, data, tok)
    assert accuracy(model, tok, forget) == 1.0
    cfg = UnlearnConfig(learning_rate=2e-3, budget=NO_TIME_LIMIT, steps=60, max_length=32, check_precision=EXACT)
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False, heldout=heldout)
    report = result.calibration
    assert (report["request"], report["met"], report["stopped_because"]) == ("class", True, "target met")
    assert report["forgotten_classes"] == ["tech"] and report["guard_on"] == "held-out data"
    assert len(result.history) < 60 and result.config.gamma == 1.0 and result.config.views == 1
    assert accuracy(model, tok, forget) <= 0.02  # every forget sample is checked (24 <= stop_sample)
    others = heldout.subset([i for i, y in enumerate(heldout.labels) if heldout.label_names[y] != "tech"])
    assert accuracy(model, tok, others) >= report["start"]["guard_accuracy"] - 0.01 - 1e-9


@pytest.mark.parametrize("sample_forgotten", [True, False])
def test_a_class_sample_that_meets_the_target_is_checked_on_the_whole_class(tok, original, heldout, monkeypatch,
                                                                          sample_forgotten):
    """The check's 8 of the class's 24 rows all lose their class while the other 16 keep it: the
    check counts the whole class (16 of 24 right), not the sample's 0. A sample still far from
    the target costs no more predictions."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    model = model_from(state, data, tok)
    calibrator = Calibrator(tok, forget, retain, heldout, UnlearnConfig(stop_sample=8, max_length=32), "class")
    predicted = []

    def predicted_rows(self, model, rows):
        made = predict(model, tok, rows, max_length=32)
        predicted.append(len(rows))
        if rows is self.forget and sample_forgotten:
            made.probs = np.roll(made.probs, 1, axis=1)  # every row now predicts another class
        return made
    monkeypatch.setattr(Calibrator, "_predict", predicted_rows)
    figures = calibrator.measure(model)
    assert len(forget) == 24 and accuracy(model, tok, forget) == 1.0
    if sample_forgotten:
        assert figures["forget_accuracy"] == pytest.approx(16 / 24) and figures["forget_rows"] == 24
        assert sorted(predicted) == [8, 16, len(calibrator.guard)]
    else:
        assert figures["forget_accuracy"] == 1.0 and figures["forget_rows"] == 8
        assert sorted(predicted) == [8, len(calibrator.guard)]


def test_mislabelled_request_removes_the_wrong_labels(tok, heldout):
    clean = toy_corpus()
    rng = random.Random(0)
    chosen = sorted(rng.sample(range(len(clean)), 8))
    labels = list(clean.labels)
    for i in chosen:
        labels[i] = (labels[i] + rng.randrange(1, len(clean.label_names))) % len(clean.label_names)
    noisy = TextDataset(clean.ids, clean.texts, labels, clean.label_names)
    model = fine_tune(tiny_bert(noisy.label_names, tok.vocab_size), tok, noisy, steps=150)
    forget, retain = noisy.partition(chosen)
    assert accuracy(model, tok, forget) >= 0.75  # the wrong labels were learnt
    # the toy model's recall of a class moves by several samples as the wrong labels go: a looser guard
    cfg = UnlearnConfig(request="mislabelled", learning_rate=2e-3, budget=NO_TIME_LIMIT, steps=80, max_length=32,
                        guard_accuracy_drop=0.05, guard_recall_drop=0.2, check_precision=EXACT)
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False, heldout=heldout)
    report = result.calibration
    assert (report["request"], report["met"]) == ("mislabelled", True)
    # the target: the held-out error rate spread over the other classes, plus one standard error
    error = 1 - report["start"]["guard_accuracy"]
    share = error / (len(clean.label_names) - 1)
    limit = share + (max(share * (1 - share), 1e-4) / len(forget)) ** 0.5
    assert report["aim"] == f"forget accuracy <= {100 * limit:.1f}%"
    assert accuracy(model, tok, forget) <= limit


def test_target_met_before_the_first_step_leaves_the_model_alone(tok, original, heldout):
    """Samples the model never trained on already look like held-out data: nothing to do."""
    data, state = original
    unseen = toy_corpus(per_class=6, seed=2)
    model = model_from(state, data, tok)
    cfg = UnlearnConfig(budget=NO_TIME_LIMIT, max_length=32)
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(unseen, data, progress=False, heldout=heldout)
    assert result.calibration["stopped_because"] == "target met before the first step"
    assert result.calibration["met"] and result.history == [] and same_weights(model, state)
    # no budget is needed, so no retraining step is timed
    assert result.calibration["retrain_epoch_seconds_estimate"] is None
    assert result.calibration["seconds_split"]["budget_probe"] < 1e-3


def test_steps_that_break_the_guard_are_undone(tok, original, heldout):
    """A learning rate that wrecks the model: every check breaks the guard; the first of two is
    let pass (a dip), the second undoes both intervals' steps and halves the rate; the third
    time the run ends on the starting weights."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    model = model_from(state, data, tok)
    cfg = UnlearnConfig(learning_rate=5.0, gamma=5.0, budget=NO_TIME_LIMIT, steps=40, max_length=32,
                        check_time_share=None)
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False, heldout=heldout)
    report = result.calibration
    assert report["stopped_because"] == "guard" and report["undone_checks"] == 3
    assert [c["step"] for c in report["checks"] if c.get("undone")] == [2, 4, 6, 8, 10, 12]
    assert [c["step"] for c in report["checks"] if c.get("dip")] == [2, 6, 10]
    assert len(result.history) == 12 and same_weights(model, state)
    assert report["final"] == report["start"]


def scripted_checks(monkeypatch, forget_accuracies, breaks=None):
    """Checks measure the model as usual, but read these forget accuracies in turn (the start's
    first) and, given ``breaks``, a guard broken (every held-out sample the model got right at
    the start lost) or intact (none lost) in turn after the start."""
    measure, accuracies, script, start = MEASURE, iter(forget_accuracies), iter(breaks or ()), []

    def scripted(self, model, *made):
        figures = dict(measure(self, model, *made), forget_accuracy=next(accuracies))
        if breaks is not None:
            if not start:
                start.append(figures["guard_correct"].copy())
            else:
                figures["guard_correct"] = np.zeros_like(start[0]) if next(script) else start[0].copy()
        return figures
    monkeypatch.setattr(Calibrator, "measure", scripted)


@pytest.mark.parametrize("breaks, steps, undone, mean_broke", [((True, True, False), 4, [], [2]),
                                                               ((True, True, True), 2, [2, 2], [2]),
                                                               ((False, True, True, True), 4, [4, 4], [4])])
def test_a_dip_in_the_guard_gets_one_interval_to_recover(tok, original, heldout, monkeypatch, breaks, steps, undone,
                                                         mean_broke):
    """A broken guard (the mean of the steps' weights too) followed by an intact one keeps every
    step; a break at the last check (no interval left to recover in) is undone at once when the
    point halfway back breaks it too."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    scripted_checks(monkeypatch, (0.9, 0.8, 0.7, 0.6, 0.5), breaks)  # each check nearer the target
    cfg = UnlearnConfig(learning_rate=1e-4, budget=NO_TIME_LIMIT, steps=steps, max_length=32, check_time_share=None)
    result = DeepCUTUnlearner(model_from(state, data, tok), tok, cfg).unlearn(forget, retain, progress=False,
                                                                              heldout=heldout)
    report = result.calibration
    assert [c["step"] for c in report["checks"] if c.get("undone")] == undone
    assert [c["step"] for c in report["checks"] if c.get("halfway")] == undone[1:]
    assert report["undone_checks"] == (1 if undone else 0) and len(result.history) == steps
    assert [c["step"] for c in report["checks"] if c.get("mean_broke_guard")] == mean_broke
    kept = max({0, 2, 4} - set(undone) - {s for s in (2, 4) if s > steps})
    assert report["final"]["step"] == kept
    assert same_weights(result.model, state) == (kept == 0)


def run_two_steps(tok, original, heldout, monkeypatch, breaks, budget=NO_TIME_LIMIT, stop_after=None):
    """A class request's run of two steps (the budget ends it after ``stop_after`` steps when
    given) whose checks read ``breaks``; (result, its report)."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    scripted_checks(monkeypatch, (0.9, 0.8, 0.7, 0.6), breaks)
    if stop_after is not None:
        monkeypatch.setattr(Calibrator, "out_of_time", lambda self, seconds, taken: taken >= stop_after)
    cfg = UnlearnConfig(learning_rate=1e-4, budget=budget, steps=2 if stop_after is None else 10, max_length=32,
                        check_time_share=None)
    result = DeepCUTUnlearner(model_from(state, data, tok), tok, cfg).unlearn(forget, retain, progress=False,
                                                                              heldout=heldout)
    return result, result.calibration


@pytest.mark.parametrize("stop_after", [None, 2])
def test_a_last_check_that_breaks_the_guard_keeps_the_point_halfway_back_if_it_passes(tok, original, heldout,
                                                                                     monkeypatch, stop_after):
    """The last check (the step limit's, or a dip the budget ends the run in) breaks the guard,
    the point halfway between it and the start passes: the run ends there, with the mean of the
    two states' weights."""
    data, state = original
    result, report = run_two_steps(tok, original, heldout, monkeypatch, (True, True, False), stop_after=stop_after)
    assert [(c["step"], bool(c.get("halfway")), bool(c.get("undone"))) for c in report["checks"]] == \
        [(0, False, False), (2, False, True), (2, True, False)]
    assert report["final"]["halfway"] and report["final"]["forget_accuracy"] == 0.6
    two_steps = run_two_steps(tok, original, heldout, monkeypatch, (False,))[0].model.state_dict()
    for name, p in result.model.named_parameters():
        assert torch.allclose(p, (state[name] + two_steps[name]) / 2, atol=1e-6), name


def test_a_run_that_ends_in_a_dip_ends_on_its_last_good_state(tok, original, heldout, monkeypatch):
    """The budget ends the run right after a check that broke the guard, and the point halfway
    back breaks it too: the steps are undone."""
    data, state = original
    result, report = run_two_steps(tok, original, heldout, monkeypatch, (True, True, True), stop_after=2)
    assert report["stopped_because"] == "budget" and len(result.history) == 2
    assert [(c["step"], bool(c.get("dip")), bool(c.get("undone"))) for c in report["checks"]] == \
        [(0, False, False), (2, True, True), (2, False, True)]
    assert report["undone_checks"] == 1 and report["final"] == report["start"] and same_weights(result.model, state)


def test_no_halfway_check_past_the_budget(tok, original, heldout, monkeypatch):
    """A budget spent by the first step leaves no room to measure the point halfway back."""
    data, state = original
    result, report = run_two_steps(tok, original, heldout, monkeypatch, (True,), budget=1e-9)
    assert report["stopped_because"] == "budget" and len(result.history) == 1
    assert [(c["step"], bool(c.get("undone"))) for c in report["checks"]] == [(0, False), (1, True)]
    assert same_weights(result.model, state)


@pytest.mark.parametrize("script, steps, ends_on", [((0.9, 0.95, 0.97), 4, 0), ((0.9, 0.5, 0.7), 4, 2)])
def test_run_ends_on_the_check_nearest_its_target(tok, original, heldout, monkeypatch, script, steps, ends_on):
    """Checks that pass the guard but move away from the target: the run rewinds to the nearest
    state (the start, or step 2), with the weights a run that stopped there has."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))

    def run(script, steps):
        scripted_checks(monkeypatch, script)
        cfg = UnlearnConfig(learning_rate=1e-5, budget=NO_TIME_LIMIT, steps=steps, max_length=32, check_time_share=None)
        return DeepCUTUnlearner(model_from(state, data, tok), tok, cfg).unlearn(
            forget, retain, progress=False, heldout=heldout)

    result = run(script, steps)
    report = result.calibration
    assert [c["step"] for c in report["checks"]] == [0, 2, 4] and not any(c.get("undone") for c in report["checks"])
    assert report["rewound_to_step"] == ends_on and report["final"] == report["checks"][ends_on // 2]
    assert report["final"]["forget_accuracy"] == script[ends_on // 2] and not report["met"]
    stopped_there = run(script[:ends_on // 2 + 1], ends_on).model if ends_on else model_from(state, data, tok)
    assert same_weights(result.model, stopped_there.state_dict())
    assert not same_weights(result.model, model_from(state, data, tok).state_dict()) or ends_on == 0


@pytest.mark.parametrize("script, checked_at, stopped", [
    ((0.9, 0.03, 0.01), [0, 4, 5], "target met"),  # x0.43 a step: 2% reached at step 5, where the check finds it
    ((0.9, 0.03, 0.025, 0.01), [0, 4, 5, 8], "target met"),  # the early check misses it: the next is the regular one
    ((0.9, 0.2, 0.1), [0, 4, 8], "steps"),  # x0.69 a step: 2% 7 steps on (2 in a straight line: 0.175 a step)
    ((0.9, 0.5, 0.4), [0, 4, 8], "steps"),  # x0.86 a step: 23 more steps
])
def test_a_class_request_checks_early_where_the_fall_of_its_accuracy_meets_the_target(
        tok, original, heldout, monkeypatch, script, checked_at, stopped):
    """Checks every 4 steps; a kept check whose forget accuracy fell fast enough since the last one that, at the same
    rate per step, it reaches the 2% target before the next check adds one check at that step."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    scripted_checks(monkeypatch, script)
    cfg = UnlearnConfig(learning_rate=1e-5, budget=NO_TIME_LIMIT, steps=8, max_length=32, check_every=4,
                        check_time_share=None)
    result = DeepCUTUnlearner(model_from(state, data, tok), tok, cfg).unlearn(forget, retain, progress=False,
                                                                              heldout=heldout)
    report = result.calibration
    assert report["request"] == "class" and [c["step"] for c in report["checks"]] == checked_at
    assert report["stopped_because"] == stopped


def recorded_run(tok, original, heldout, monkeypatch, steps, breaks):
    """A class request's run of ``steps``, its checks every two steps reading ``breaks`` (and forget accuracies
    nearer the target each time): (result, the weights after each step, the weights each check measured)."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    scripted_checks(monkeypatch, [0.9 - 0.1 * i for i in range(8)], breaks)
    after_steps, measured = [], []
    after_step, measure = Calibrator.after_step, Calibrator.measure

    def weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def recording_after_step(self, step, model, *args, **kwargs):
        after_steps.append(weights(model))
        return after_step(self, step, model, *args, **kwargs)

    def recording_measure(self, model, *made):
        measured.append(weights(model))
        return measure(self, model, *made)

    monkeypatch.setattr(Calibrator, "after_step", recording_after_step)
    monkeypatch.setattr(Calibrator, "measure", recording_measure)
    cfg = UnlearnConfig(learning_rate=1e-3, budget=NO_TIME_LIMIT, steps=steps, max_length=32, check_time_share=None)
    result = DeepCUTUnlearner(model_from(state, data, tok), tok, cfg).unlearn(forget, retain, progress=False,
                                                                              heldout=heldout)
    return result, after_steps, measured


def mean_weights(weights):
    return {n: sum(w[n] for w in weights) / len(weights) for n in weights[0]}


def close_weights(a, b):
    return all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.mark.parametrize("steps, breaks, mean_of", [
    (2, (True, False), slice(0, 2)),  # at the last check
    (4, (False, True, False), slice(2, 4)),  # after the state kept at step 2
    (4, (True, True, True, False), slice(2, 4)),  # after a dip at step 2
    (6, (True, True, True, True, True, False), slice(4, 6)),  # after step 4 restored the start
])
def test_a_check_that_breaks_the_guard_keeps_the_mean_of_the_steps_since_the_last_check(
        tok, original, heldout, monkeypatch, steps, breaks, mean_of):
    """The weights a check measures break the guard, the mean of the weights after each step since the last check
    passes it: the run keeps the mean (here it ends on it)."""
    result, after_steps, measured = recorded_run(tok, original, heldout, monkeypatch, steps, breaks)
    report = result.calibration
    assert report["final"]["step"] == steps and report["final"]["mean_of_steps"]
    assert [c["step"] for c in report["checks"] if c.get("undone")][-1] == steps  # the steps' last weights
    assert close_weights(measured[-1], mean_weights(after_steps[mean_of]))
    assert close_weights(dict(result.model.named_parameters()), measured[-1])


def test_at_the_last_check_the_budget_holds_the_mean_includes_the_last_good_state(tok, original, heldout,
                                                                                 monkeypatch):
    """Room for one more check only, after a check that broke the guard: no point halfway back could follow a mean
    that breaks it too, so the one state measured is the mean of the start and the two steps' weights."""
    monkeypatch.setattr(Calibrator, "_budget_seconds", lambda self: math.inf if len(self.state["checks"]) < 2
                        else self.elapsed() + 1.5 * self.state["check_estimate"])
    result, after_steps, measured = recorded_run(tok, original, heldout, monkeypatch, 2, (True, False))
    final = result.calibration["final"]
    assert final["step"] == 2 and final["mean_of_steps"] and final["with_last_good"]
    assert close_weights(measured[-1], mean_weights([measured[0]] + after_steps))
    assert not close_weights(measured[-1], mean_weights(after_steps))
    assert close_weights(dict(result.model.named_parameters()), measured[-1])


def test_the_run_goes_on_from_the_mean_it_keeps(tok, original, heldout, monkeypatch):
    """Steps 1-2 are the same with or without a broken guard at step 2; step 3 starts from their mean when the mean
    was kept, and the check at step 4 measures the weights themselves again."""
    result, after_steps, measured = recorded_run(tok, original, heldout, monkeypatch, 4, (True, False, False))
    assert [(c["step"], bool(c.get("mean_of_steps"))) for c in result.calibration["checks"]] == \
        [(0, False), (2, False), (2, True), (4, False)]
    assert close_weights(measured[-1], after_steps[-1])
    _, plain_steps, _ = recorded_run(tok, original, heldout, monkeypatch, 4, (False, False))
    assert all(close_weights(a, b) for a, b in zip(after_steps[:2], plain_steps[:2]))
    assert not close_weights(after_steps[2], plain_steps[2])


@pytest.mark.parametrize("share, check_steps, budget_steps, interval", [
    (1 / 3, 3.0, 1e6, 6), (1 / 2, 3.0, 1e6, 3), (1 / 3, 0.2, 1e6, 2), (1 / 3, 30.0, 1e6, 8), (None, 30.0, 1e6, 2),
    (1 / 3, 3.0, 15, 4), (1 / 3, 3.0, 8, 2)])
def test_checks_are_spaced_to_their_share_of_the_time(tok, original, heldout, share, check_steps, budget_steps,
                                                      interval):
    """A check that costs ``check_steps`` steps, a budget of ``budget_steps`` steps: checks come
    every ``interval`` steps, so that they take at most ``share`` of the time, but two checks
    and their intervals fit in the budget (at least check_every, at most 4x it; None: every
    check_every)."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    model = model_from(state, data, tok)
    cfg = UnlearnConfig(max_length=32, check_time_share=share).for_request("class")
    calibrator = Calibrator(tok, forget, retain, heldout, cfg, "class")
    optimizer = torch.optim.AdamW(model.parameters())
    calibrator.start_clock()
    step_seconds = 10.0  # scripted: far more than the test's own time, which the budget counts too
    calibrator.begin(model, lambda: budget_steps * step_seconds / cfg.budget_epochs, 1, optimizer)
    assert calibrator.state["check_estimate"] > 0  # timed on the start's predictions
    calibrator.state["check_estimate"] = check_steps * step_seconds
    for step in range(1, 17):  # the model does not change: no check meets the target or breaks the guard
        assert calibrator.after_step(step, model, optimizer, step_seconds=step_seconds) is None
    assert [c["step"] for c in calibrator.state["checks"]] == list(range(0, 17, interval))


@pytest.mark.parametrize("first, second, room, estimates, kept", [
    (2.0, 1.0, True, [2.0, 1.0], 1.0), (1.0, 2.0, True, [1.0, 2.0], 1.0), (2.0, 1.0, False, [2.0, None], 2.0)])
def test_retraining_is_timed_again_after_the_first_check_and_the_faster_kept(tok, original, heldout, first, second,
                                                                             room, estimates, kept):
    """The budget's probe runs once more after the first check, when the budget left holds ten
    times what the first probe took (``room``), and the run's epoch estimate is the faster of
    the two: scripted probes of ``first`` then ``second`` seconds a step, 3 steps an epoch."""
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    model = model_from(state, data, tok)
    cfg = UnlearnConfig(max_length=32, check_time_share=None, budget=NO_TIME_LIMIT).for_request("class")
    calibrator = Calibrator(tok, forget, retain, heldout, cfg, "class")
    optimizer = torch.optim.AdamW(model.parameters())
    timings, probes = iter([first, second]), []

    def probe():
        probes.append(calibrator.state["checks"][-1]["step"])  # the last check before this timing
        return next(timings)

    calibrator.start_clock()
    calibrator.begin(model, probe, 3, optimizer)
    if not room:
        calibrator.state["probe_seconds"] = NO_TIME_LIMIT * 3 * first  # the whole budget, and more
    for step in range(1, 3 * cfg.check_every + 1):  # the model does not change: the run goes on
        assert calibrator.after_step(step, model, optimizer, step_seconds=1e-3) is None
    assert probes == ([0, cfg.check_every] if room else [0])
    assert calibrator.state["epoch_estimates"] == [3 * e if e is not None else None for e in estimates]
    assert calibrator.state["epoch_seconds"] == 3 * kept


@pytest.mark.parametrize("given, kind, bound", [(None, "mislabelled", 0.15), (None, "class", 0.05), (None, "sample", 0.05),
                                                (0.02, "mislabelled", 0.02)])
def test_guard_recall_bound_is_the_requests_unless_given(given, kind, bound):
    """Mislabelled samples get the wider recall bound; a bound the caller gives is kept."""
    assert UnlearnConfig(guard_recall_drop=given).for_request(kind).guard_recall_drop == bound


def test_time_budget_ends_the_run(tok, original, heldout):
    data, state = original
    forget, retain = data.partition(forget_indices(data, forget_class="tech"))
    model = model_from(state, data, tok)
    cfg = UnlearnConfig(budget=1e-9, steps=50, max_length=32, learning_rate=1e-5)  # too slow to meet the target
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False, heldout=heldout)
    report = result.calibration
    # the first step always runs; then the budget ends the run, checking that step
    assert report["stopped_because"] == "budget" and len(result.history) == 1
    assert [c["step"] for c in report["checks"]] == [0, 1]
    assert report["retrain_epoch_seconds_estimate"] > 0 and not report["met"]
    split = report["seconds_split"]  # disjoint parts of the run's time: the steps are timed apart too
    assert split["budget_probe"] > 0 and split["checks"] > 0
    assert sum(split.values()) == pytest.approx(report["seconds"])
    assert split["steps"] >= sum(record["seconds"] for record in result.history)


def test_sample_request_focus_and_start_come_from_one_prediction(tok, original, heldout):
    """The start figures of the check's fixed forget sample and the focus over every forget
    sample, both from one prediction of the forget set: the same as predicting each apart. A
    third of the held-out labels are wrong, so that the target lies below the forget accuracy
    and the focus is not empty."""
    data, state = original
    forget, retain = data.partition(random_forget(data))
    model = model_from(state, data, tok)
    classes = len(heldout.label_names)
    hard = TextDataset(heldout.ids, heldout.texts, [(y + 1) % classes if i % 3 == 0 else y
                                                    for i, y in enumerate(heldout.labels)], heldout.label_names)
    cfg = UnlearnConfig(max_length=32, stop_sample=10, check_precision=EXACT).for_request("sample")
    calibrator = Calibrator(tok, forget, retain, hard, cfg, "sample")
    calibrator.start_clock()
    calibrator.begin(model, lambda: 1.0, 1, torch.optim.AdamW(model.parameters()))
    start, target = calibrator.state["start"], calibrator.state["target"]
    every, guard = (predict(model, tok, d, max_length=32) for d in (forget, calibrator.guard))
    assert start["forget_accuracy"] == accuracy(model, tok, fixed_sample(forget, 10, cfg.seed), 32)
    assert start["mia_auc"] == pytest.approx(loss_mia_auc(predict(model, tok, calibrator.forget, max_length=32), guard))
    membership = guard.losses if start["mia_auc"] > target.mia_auc else None
    focus = sample_focus(every.predicted == every.labels, every.losses, target.forget_accuracy, membership)
    assert calibrator.state["focus"] == focus and 0 < len(focus) < len(forget)


def test_budget_probe_leaves_the_model_as_it_was(tok, original):
    """The timed retraining steps (a retain set smaller than their batches wraps around) change
    no weight, gradient or random state."""
    data, state = original
    model = model_from(state, data, tok)
    rng = torch.get_rng_state()
    seconds = probe_seconds(model, tok, data.subset(range(5)), UnlearnConfig(max_length=32))
    assert seconds > 0 and same_weights(model, state) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("retrain_precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_budget_probe_times_retraining_in_its_own_precision(tok, original, retrain_precision, dtype):
    """The budget's retraining steps run as retraining would, whatever the run's own precision."""
    data, state = original
    model = model_from(state, data, tok)
    seen = autocast_seen(model)
    probe_seconds(model, tok, data.subset(range(5)),
                  UnlearnConfig(max_length=32, precision="bf16", retrain_precision=retrain_precision))
    assert seen == [dtype] * PROBE_STEPS


@pytest.mark.parametrize("native, picked, dtype", [(True, "bf16", torch.bfloat16), (False, "fp32", None)])
def test_auto_precision_trains_in_bf16_only_where_the_cpu_computes_it(monkeypatch, tok, original, native, picked,
                                                                      dtype):
    """precision="auto": every training step's forward passes autocast to bf16 on a CPU with
    native bf16, none on another; the result's config names the precision that ran."""
    bf16_cpu(monkeypatch, native)
    data, state = original
    forget, retain = data.partition(random_forget(data))
    model = model_from(state, data, tok)
    seen = autocast_seen(model)
    cfg = UnlearnConfig(calibrate=False, steps=2, max_length=32, precision="auto")
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False)
    assert result.config.precision == picked
    assert len(seen) >= 2 and set(seen) == {dtype}


def test_without_heldout_data_a_sample_target_is_not_measured(tok, original):
    data, state = original
    forget, retain = data.partition(random_forget(data))
    model = model_from(state, data, tok)
    result = DeepCUTUnlearner(model, tok, UnlearnConfig(budget=NO_TIME_LIMIT, max_length=32)).unlearn(
        forget, retain, progress=False)
    report = result.calibration
    assert (report["measured"], report["met"], report["stopped_because"]) == (False, False, "steps")
    assert report["guard_on"] == "retain sample (no held-out data)" and "needs held-out data" in report["aim"]
    assert len(result.history) == SAMPLE_STEPS_WITHOUT_HELDOUT


def test_calibrated_run_resumes_to_the_same_model(tok, original, tmp_path):
    data, state = original
    forget, retain = data.partition(random_forget(data))
    cfg = UnlearnConfig(budget=NO_TIME_LIMIT, max_length=32, learning_rate=1e-3)

    def run(checkpoint=None):
        return DeepCUTUnlearner(model_from(state, data, tok), tok, cfg).unlearn(
            forget, retain, progress=False, checkpoint=checkpoint)

    straight = run()
    checkpoint = Checkpoint(tmp_path / "state.pt", every=2)
    with interrupted_at(5), pytest.raises(KeyboardInterrupt):
        run(checkpoint)
    assert checkpoint.load()["step"] == 4
    resumed = run(checkpoint)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history])
    drop = ("seconds",)
    assert [{k: v for k, v in c.items() if k not in drop} for c in resumed.calibration["checks"]] == \
        [{k: v for k, v in c.items() if k not in drop} for c in straight.calibration["checks"]]
    assert same_weights(resumed.model, straight.model.state_dict())


def test_sample_focus_takes_the_accuracy_excess_else_the_membership_excess():
    """The forget samples a sample-level run unlearns, computed by hand: 10 samples, 8 correct,
    target accuracy 60% (an excess of 2: the two correct ones of highest loss); held-out median
    loss 1.0, with 7 forget losses below it where a model that never saw them puts 5 (an excess of
    2: the two lowest losses), taken when accuracy is at its target (90%)."""
    losses = np.array([0.05, 0.9, 0.2, 3.0, 0.01, 0.5, 0.7, 2.0, 0.8, 1.2])
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    heldout = np.array([0.5, 1.0, 1.5, 0.2, 2.5])
    assert sample_focus(correct, losses, 0.6) == [1, 9]  # losses 1.2 and 0.9: least sure of the correct
    assert sample_focus(correct, losses, 0.6, heldout) == [1, 9]  # an accuracy excess comes first
    assert sample_focus(correct, losses, 0.9, heldout) == [0, 4]  # accuracy at target: membership alone
    assert sample_focus(correct, losses, 0.9, np.array([0.001, 0.002])) == []  # nothing below the median


@pytest.mark.parametrize("avx512_bf16, amx, run_precision, picked", [
    (True, False, "fp32", torch.bfloat16), (False, True, "fp32", torch.bfloat16),
    (False, False, "fp32", None), (False, False, "fp16", torch.float16)])
def test_auto_check_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, run_precision,
                                                                      picked):
    bf16_cpu(monkeypatch, avx512_bf16, amx)
    assert check_dtype("auto", run_precision, torch.device("cpu")) == picked
    assert check_dtype("fp32", "bf16", torch.device("cpu")) is None  # said outright, whatever the hardware
    assert check_dtype("bf16", "fp32", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("check_precision, dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_checks_measure_in_their_precision(tok, original, heldout, check_precision, dtype):
    """A check's figures are those of predictions under its autocast, and in bf16 within a
    sample and 0.02 of the fp32 ones (the tiny model's 24 forget rows)."""
    data, state = original
    forget, retain = data.partition(random_forget(data))
    model = model_from(state, data, tok)
    cfg = UnlearnConfig(max_length=32, check_precision=check_precision).for_request("sample")
    calibrator = Calibrator(tok, forget, retain, heldout, cfg, "sample")
    figures = calibrator.measure(model)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        made = [predict(model, tok, d, max_length=32) for d in (calibrator.forget, calibrator.guard)]
    exact = [predict(model, tok, d, max_length=32) for d in (calibrator.forget, calibrator.guard)]
    assert figures["forget_accuracy"] == np.mean(made[0].predicted == made[0].labels)
    assert figures["mia_auc"] == loss_mia_auc(*made)
    assert abs(figures["forget_accuracy"] - np.mean(exact[0].predicted == exact[0].labels)) <= 1 / len(forget)
    assert figures["mia_auc"] == pytest.approx(loss_mia_auc(*exact), abs=0.02)
