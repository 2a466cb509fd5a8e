"""Token classification: word-list data, label alignment, entity-level metrics, and DeepCUT with
token anchors on a tiny random BERT (real MiniLM tokenizer)."""
import json

import numpy as np
import pytest

from deepcut_fast.unlearning.evaluation import TokenPredictions, entity_metrics, evaluate, predict
from deepcut_fast.unlearning.data import forget_indices, load_token_table
from deepcut_fast.unlearning.model import encode_labelled
from deepcut_fast.unlearning.unlearner import DeepCUTUnlearner, UnlearnConfig, accuracy
from tiny_models import fine_tune, tiny_bert, tokenizer, toy_ner_corpus


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def test_load_token_table_maps_tag_names(tmp_path):
    path = tmp_path / "ner.jsonl"
    rows = [{"id": "a", "tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]},
            {"id": "b", "tokens": ["Rome"], "tags": ["B-LOC"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_token_table(path, id_column="id")
    assert data.token_level and data.label_names == ["B-LOC", "B-PER", "O"]
    assert data.texts[0] == ["John", "lives", "in", "Paris"] and data.labels == [[1, 2, 2, 0], [0]]
    assert forget_indices(data, ids=["b"]) == [1]
    with pytest.raises(ValueError, match="forget_class is class unlearning"):
        forget_indices(data, forget_class="B-LOC")
    with pytest.raises(ValueError, match=r"labels \['B-PER'\] are not among the classes"):
        load_token_table(path, label_names=["O", "B-LOC"])


def test_load_token_table_rejects_ragged_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}))
    with pytest.raises(ValueError, match="row 0: 2 words but 1 tags"):
        load_token_table(path)
    path.write_text(json.dumps({"tokens": "a b", "tags": ["O"]}))
    with pytest.raises(ValueError, match="must be lists"):
        load_token_table(path)


def test_tags_go_on_first_subwords_only(tok):
    words = [["unbelievably", "long", "words"], ["paris"]]
    inputs, labels = encode_labelled(tok, words, [[3, 1, 2], [0]], 64, "cpu")
    for b, sentence in enumerate(words):
        tagged = (labels[b] != -100).nonzero().flatten().tolist()
        assert [tok.convert_ids_to_tokens(int(inputs["input_ids"][b, p])) for p in tagged] == \
            [tok.tokenize(w)[0] for w in sentence]
        assert labels[b, tagged].tolist() == [[3, 1, 2], [0]][b]
    assert len(tok.tokenize("unbelievably")) > 1  # the case under test: a word of several subwords
    assert labels[1, inputs["attention_mask"][1] == 0].eq(-100).all()


def test_entity_metrics_by_hand():
    names = ["B-LOC", "B-PER", "I-PER", "O"]
    gold = np.array([1, 2, 3, 0])  # John Smith (PER), in, Paris (LOC)
    probs = np.eye(4)[[1, 2, 3, 3]]  # finds the person, misses the place
    m = entity_metrics(TokenPredictions([gold], [probs]), names)
    assert m["entity_f1"] == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert m["recall"] == {"LOC": 0.0, "PER": 1.0}
    assert m["macro_f1"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.75)
    half = TokenPredictions([gold], [np.full((4, 4), 0.25)])
    assert half.losses == pytest.approx([np.log(4)])


@pytest.fixture(scope="module")
def ner_original(tok):
    """Forget set: the sentences about two people who appear nowhere else."""
    retain = toy_ner_corpus(48, seed=0, people=["john smith", "mary jones"])
    forget = toy_ner_corpus(12, seed=1, people=["peter brown", "anna white"])
    test = toy_ner_corpus(24, seed=2, people=["john smith", "mary jones"])
    model = fine_tune(tiny_bert(retain.label_names, tok.vocab_size, task="token"), tok, _joined(retain, forget), steps=80)
    return forget, retain, test, model


def _joined(a, b):
    from deepcut_fast.unlearning.data import TextDataset

    return TextDataset(a.ids + [f"f{i}" for i in b.ids], a.texts + b.texts, a.labels + b.labels, a.label_names)


def test_deepcut_with_token_anchors_forgets_the_people(tok, ner_original):
    forget, retain, test, model = ner_original
    before = evaluate(model, tok, forget, retain, test, forget.label_names, max_length=64)
    tag_accuracy_before = accuracy(model, tok, forget, 64)
    assert before["forget"]["recall"]["PER"] > 0.9 and before["retain"]["entity_f1"] > 0.9
    cfg = UnlearnConfig(calibrate=False, embedding="token", gamma=1.0, temperature=0.5, steps=30, learning_rate=2e-3,
                        forget_batch_size=6, retain_batch_size=12, max_length=64, backend="reference")
    result = DeepCUTUnlearner(model, tok, cfg).unlearn(forget, retain, progress=False)
    after = evaluate(result.model, tok, forget, retain, test, forget.label_names, max_length=64)
    assert after["forget"]["recall"]["PER"] < before["forget"]["recall"]["PER"] - 0.3
    assert after["retain"]["entity_f1"] > 0.8
    assert after["mia_loss_auc"] < before["mia_loss_auc"] and len(result.history) == 30  # forget losses rose
    assert accuracy(result.model, tok, forget, 64) < tag_accuracy_before  # the model is updated in place


def test_sequence_embedding_on_token_data_is_refused(tok):
    data = toy_ner_corpus(8)
    model = tiny_bert(data.label_names, tok.vocab_size, task="token")
    with pytest.raises(ValueError, match="needs embedding='token'"):
        DeepCUTUnlearner(model, tok, UnlearnConfig(embedding="cls")).unlearn(data.subset([0]), data.subset([1, 2]))
    assert isinstance(predict(model, tok, data, max_length=64), TokenPredictions)
