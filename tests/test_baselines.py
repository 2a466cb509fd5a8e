"""Every unlearning method runs with the same signature and moves the model the way it should."""
import copy

import pytest

from deepcut_fast.unlearning import baselines
from deepcut_fast.unlearning.data import forget_indices
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
    cfg = UnlearnConfig(steps=4, learning_rate=1e-3)
    result = baselines.METHODS[name](copy.deepcopy(model), tok, forget, retain, cfg, progress=False)
    assert len(result.history) == (0 if name == "original" else 4)
    assert not result.model.training


@pytest.mark.parametrize("name", ["gradient_ascent", "gradient_difference", "random_relabel"])
def test_forget_accuracy_falls(setup, name):
    tok, _, model, forget, retain = setup
    result = baselines.METHODS[name](copy.deepcopy(model), tok, forget, retain,
                                     UnlearnConfig(steps=15, learning_rate=2e-3), progress=False)
    assert accuracy(result.model, tok, forget) < 0.5


def test_retrain_learns_the_retain_set_only(setup):
    tok, data, _, forget, retain = setup
    base = tiny_bert(data.label_names, tok.vocab_size, seed=1)
    result = baselines.retrain(base, tok, forget, retain, UnlearnConfig(steps=60, learning_rate=2e-3), progress=False)
    assert accuracy(result.model, tok, retain) >= 0.95
    assert accuracy(result.model, tok, forget) == 0.0  # never saw the class
