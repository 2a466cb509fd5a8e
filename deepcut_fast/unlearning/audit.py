"""The audit record of a model's deletion requests: one JSON line per ``unlearn`` run, chained.

Every run folder holds ``audit.jsonl``: the records of the runs that led to its model, oldest
first, the run's own last. A record names the request, hashes its forget ids, the model before
and after (every file's bytes), and carries the settings, the times, the target and the figures.
Each record holds the hash of its own content (``hash``) and of the record before it
(``previous``; null for the first), so that removing, reordering or editing a record breaks the
chain, and ``model_before`` of a record must equal ``model_after`` of the one before.
``verify`` checks all of it and that the folder's model still has the last record's hash.

What a chain of hashes proves: that the file is as the runs wrote it, unless someone rewrote
every later record and the model with it. Keeping the last record's hash (``audit`` prints it)
somewhere the model owner does not control turns that into a check against any rewrite
(``deepcut-fast audit RUN --head HASH``).
"""
import hashlib
import json
from pathlib import Path

from deepcut_fast.unlearning.data import json_lines
from deepcut_fast.unlearning.files import atomic_write

AUDIT_FILE = "audit.jsonl"


class AuditError(ValueError):
    """The chain is broken, a record was edited, or the model no longer matches it."""


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_hash(obj) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def ids_hash(ids) -> str:
    """The hash of a set of row ids (order and repeats do not matter)."""
    return content_hash(sorted({str(i) for i in ids}))


def model_hash(model_dir) -> str:
    """The SHA-256 of a saved model: every file's path and full content."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        file_digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(_canonical([str(path.relative_to(root)), file_digest.hexdigest()]))
    return digest.hexdigest()


def new_record(chain, **fields) -> dict:
    """The record that follows ``chain`` (the records before it), with its index, the previous
    record's hash and its own."""
    record = dict(fields, index=len(chain), previous=chain[-1]["hash"] if chain else None)
    return dict(record, hash=content_hash(record))


def read_chain(run_dir) -> list:
    """The records of ``run_dir/audit.jsonl`` (an empty list when there is none)."""
    path = Path(run_dir) / AUDIT_FILE
    if not path.exists():
        return []
    return json_lines(path.read_text(), path, AuditError)


def write_chain(run_dir, records):
    """``run_dir/audit.jsonl`` holding ``records``, written atomically."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write(Path(run_dir) / AUDIT_FILE, lambda f: f.write(text.encode()))


def verify(run_dir, head=None) -> list:
    """The chain of ``run_dir``, checked: every record's hash and link, the models passed from
    record to record, the folder's model against the last record and, when given, the last
    record's hash against ``head``. Raises AuditError naming the line at fault."""
    path = Path(run_dir) / AUDIT_FILE
    if not path.exists():
        raise AuditError(f"{path} does not exist: not the folder of an unlearn run")
    records = read_chain(run_dir)
    if not records:
        raise AuditError(f"{path} holds no record")
    for number, record in enumerate(records, 1):
        where = f"{path} line {number}"
        missing = {"hash", "previous", "index", "model_before", "model_after"} - set(record)
        if missing:
            raise AuditError(f"{where}: the record lacks {sorted(missing)}")
        if content_hash({k: v for k, v in record.items() if k != "hash"}) != record["hash"]:
            raise AuditError(f"{where}: the record was edited (its content does not match its hash)")
        before = records[number - 2] if number > 1 else None
        if record["previous"] != (before["hash"] if before else None) or record["index"] != number - 1:
            raise AuditError(f"{where}: the chain is broken (a record before it was removed, replaced or reordered)")
        if before is not None and record["model_before"] != before["model_after"]:
            raise AuditError(f"{where}: its model_before is not the model the record before it produced")
    model = Path(run_dir) / "model"
    if not model.is_dir():
        raise AuditError(f"{model} does not exist: the run's model is missing")
    if model_hash(model) != records[-1]["model_after"]:
        raise AuditError(f"{model} does not match the last record's model_after: the model was replaced or "
                         "modified, or the last record was removed")
    if head is not None and records[-1]["hash"] != head:
        raise AuditError(f"{path}: the last record's hash {records[-1]['hash']} is not the expected head {head}")
    return records
