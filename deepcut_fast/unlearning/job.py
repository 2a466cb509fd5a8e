"""``deepcut-fast unlearn`` and ``deepcut-fast evaluate`` on a user's model and data files.

unlearn: the fine-tuned model and data in, the unlearned model out. The run checkpoints every
few steps to ``<out>/checkpoint.pt``; started again with the same ``--out`` after an
interruption, it continues from the last checkpoint. The unlearned model (``<out>/model``,
save_pretrained) and ``<out>/report.json`` are written atomically, and the checkpoint is
removed once they exist.

evaluate: any model (the original, an unlearned one) on the forget / retain / test sets, with
the gap of every figure to a reference model (typically one retrained without the forget set).

``task`` is "sequence" (text and label columns) or "token" (word-list and tag-list columns,
JSONL or a ``datasets`` Dataset; anchors are tokens, ``embedding="token"``).
"""
import contextlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from deepcut_fast.unlearning.evaluation import classification_metrics, evaluate, gap_to, headline, predict
from deepcut_fast.unlearning.data import forget_indices, load_table, load_token_table
from deepcut_fast.unlearning.files import atomic_write_json, save_model_atomically
from deepcut_fast.unlearning.model import load_classifier
from deepcut_fast.unlearning.unlearner import CHECKPOINT_EVERY, Checkpoint, DeepCUTUnlearner, UnlearnConfig


def model_label_names(model_dir):
    """The classes of a fine-tuned classifier, in id order, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return [config.id2label[i] for i in sorted(config.id2label)]


def load_data(path, label_names, task="sequence", columns=None, keep_ids=True):
    """A data file as a TextDataset with the model's classes (labels outside them fail).
    ``columns``: text_column / label_column (sequence) or tokens_column / tags_column (token),
    and id_column."""
    columns = dict(columns or {})
    if not keep_ids:
        columns.pop("id_column", None)
    if task == "token":
        return load_token_table(path, label_names=label_names, **columns)
    if task != "sequence":
        raise ValueError(f"task must be 'sequence' or 'token', got {task!r}")
    return load_table(path, label_names=label_names, **columns)


def _sets(model_dir, data_path, forget_spec, task, columns):
    label_names = model_label_names(model_dir)
    train = load_data(data_path, label_names, task, columns)
    forget, retain = train.partition(forget_indices(train, **forget_spec))
    return label_names, forget, retain


def _metrics(model, tokenizer, forget, retain, test_path, label_names, task, columns, max_length):
    if test_path is not None:  # every figure, membership inference included
        test = load_data(test_path, label_names, task, columns, keep_ids=False)
        return evaluate(model, tokenizer, forget, retain, test, label_names, max_length=max_length)
    return {name: classification_metrics(predict(model, tokenizer, data, max_length=max_length), label_names)
            for name, data in (("forget", forget), ("retain", retain))}


@contextlib.contextmanager
def distributed():
    """Join the process group that ``torchrun`` or ``accelerate launch`` describes in the
    environment (WORLD_SIZE > 1): NCCL with one GPU per local rank, gloo on CPUs; leave it at
    the end if this joined it. Yields (rank, this process's device)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    joined = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if joined:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield (dist.get_rank() if dist.is_initialized() else 0), device
    finally:
        if joined:
            dist.destroy_process_group()


def run_unlearn_job(model_dir, data_path, out, config: UnlearnConfig, forget_spec: dict, test_path=None,
                    columns=None, checkpoint_every=CHECKPOINT_EVERY, progress=True, task="sequence"):
    """Unlearn ``forget_spec`` (forget_indices' keywords) from the model in ``model_dir``. Under
    torchrun / accelerate launch every rank trains (DDP) and rank 0 writes the outputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label_names, forget, retain = _sets(model_dir, data_path, forget_spec, task, columns)
    model, tokenizer = load_classifier(model_dir, label_names, task=task)
    checkpoint = Checkpoint(out / "checkpoint.pt", every=checkpoint_every)
    resumed_from = (checkpoint.load() or {}).get("step", 0)
    with distributed() as (rank, device):
        world = dist.get_world_size() if dist.is_initialized() else 1
        start = time.perf_counter()
        result = DeepCUTUnlearner(model.to(device), tokenizer, config).unlearn(forget, retain, progress=progress,
                                                                               checkpoint=checkpoint)
        seconds = time.perf_counter() - start
    if rank > 0:  # the model is the same on every rank: rank 0 evaluates and writes
        return None
    metrics = _metrics(model, tokenizer, forget, retain, test_path, label_names, task, columns, config.max_length)
    save_model_atomically(result.model, tokenizer, out / "model")
    report = dict(config=vars(config), sizes=dict(forget=len(forget), retain=len(retain)), seconds=seconds,
                  processes=world,
                  resumed_from_step=resumed_from, stopped_early=result.stopped_early, metrics=metrics,
                  history=result.history)
    atomic_write_json(out / "report.json", report)
    checkpoint.path.unlink(missing_ok=True)
    return report


def run_evaluate_job(model_dir, data_path, test_path, out_file, forget_spec: dict, reference_dir=None,
                     columns=None, max_length=96, task="sequence"):
    """Every evaluation figure of the model in ``model_dir`` (and of ``reference_dir``, with the
    gaps to it); writes ``out_file`` (JSON) atomically and returns the report."""
    if reference_dir is not None and test_path is None:
        raise ValueError("comparing with a reference model needs a test set (the membership figures use it)")
    label_names, forget, retain = _sets(model_dir, data_path, forget_spec, task, columns)
    reports = {}
    for name, directory in (("model", model_dir), ("reference", reference_dir)):
        if directory is not None:
            model, tokenizer = load_classifier(directory, label_names, task=task)
            reports[name] = _metrics(model, tokenizer, forget, retain, test_path, label_names, task, columns,
                                     max_length)
    report = dict(sizes=dict(forget=len(forget), retain=len(retain)), model=str(model_dir), metrics=reports["model"])
    if reference_dir is not None:
        report.update(reference=str(reference_dir), reference_metrics=reports["reference"],
                      gap_to_reference=gap_to(reports["model"], reports["reference"]))
    if test_path is not None:
        report["headline"] = headline(reports["model"])
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_file, report)
    return report
