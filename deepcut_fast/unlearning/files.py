"""Outputs of long jobs: atomic writes, a lock on the output folder, and fault injection.

A reader never sees a half-written file or model directory: everything is written beside its
final name (``<name>.tmp``) and renamed into place. An output folder is held by one process at
a time through an advisory lock that the operating system drops when the process dies, so a
killed job never leaves it stuck.
"""
import fcntl
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"
FAULT_VARIABLE = "DEEPCUT_FAULT_AT"


def fault_point(name):
    """Fault injection for the kill-and-resume tests: when the environment variable
    DEEPCUT_FAULT_AT equals ``name`` (e.g. "step:3", "write:checkpoint.pt", "save:model"), the
    process kills itself with SIGKILL here, as a power cut or the OOM killer would."""
    if os.environ.get(FAULT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Path, write_bytes):
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        write_bytes(f)
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"write:{path.name}")
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj):
    atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_model_atomically(save, directory: Path):
    """``save(folder)`` (e.g. save_pretrained) into a temporary folder, then renamed into place."""
    tmp = directory.with_name(directory.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    fault_point(f"save:{directory.name}")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


class FolderInUse(RuntimeError):
    """Another live process holds the output folder."""


@contextmanager
def claimed_folder(folder: Path):
    """Hold ``folder`` for this process: create it if needed, take its lock (refused with
    FolderInUse while another live process has it), and remove leftovers of an interrupted write
    (``*.tmp``). If the body fails and the folder was created here and holds nothing of value,
    it is removed again, so a failed run leaves no trace."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise FolderInUse(f"{folder} is in use by another running process (pid {holder}); wait for it to "
                          "finish or choose another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    for stale in folder.glob("*" + TMP_SUFFIX):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    try:
        yield folder
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        lock.close()  # closing the file drops the lock
