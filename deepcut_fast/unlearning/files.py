"""Atomic outputs: a reader never sees a half-written file or model directory."""
import json
import os
import shutil
from pathlib import Path


def atomic_write(path: Path, write_bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write_bytes(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj):
    atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_model_atomically(model, tokenizer, directory: Path):
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
