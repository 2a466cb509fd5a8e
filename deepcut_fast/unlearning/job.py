"""``deepcut-fast unlearn`` and ``deepcut-fast evaluate`` on a user's model and data files.

unlearn: the fine-tuned model and data in, the unlearned model out. Every input is read and
checked before the model loads and before anything is written. The run checkpoints every few
steps to ``<out>/checkpoint.pt``; started again with the same ``--out`` after an interruption,
it continues from the last checkpoint. The unlearned model (``<out>/model``, save_pretrained)
and ``<out>/report.json`` are written atomically, and the checkpoint is removed once they exist.
A run is fingerprinted (model files, data, forget set, settings): a checkpoint or a result of
another run in ``--out`` is refused rather than continued or overwritten (``restart`` discards
them), and a folder in use by a live process is refused too.

Requests in sequence: ``--previous RUN`` starts from that run's model; the forget set is the new
request's samples and every earlier request's (never retained again), and the report measures
each request's samples apart. Every run appends its record to the chain in ``<out>/audit.jsonl``
(``audit.py``), which ``deepcut-fast audit`` verifies.

evaluate: any model (the original, an unlearned one) on the forget / retain / test sets, with
the gap of every figure to a reference model (typically one retrained without the forget set).

``task`` is "sequence" (text and label columns) or "token" (word-list and tag-list columns,
JSONL or a ``datasets`` Dataset; anchors are tokens, ``embedding="token"``).
"""
import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from deepcut_fast.unlearning.audit import AUDIT_FILE, ids_hash, model_hash, new_record, read_chain, verify, write_chain
from deepcut_fast.unlearning.evaluation import classification_metrics, evaluate, gap_to, headline, predict
from deepcut_fast.unlearning.calibration import request_kind
from deepcut_fast.unlearning.data import forget_indices, load_table, load_token_table, read_json
from deepcut_fast.unlearning.files import atomic_write_json, claimed_folder, save_model_atomically
from deepcut_fast.unlearning.model import (adapter_base_path, is_adapter, is_decoder_only, load_classifier,
                                          resolve_embedding, save_trained)
from deepcut_fast.unlearning.recipe import saved_recipe
from deepcut_fast.unlearning.unlearner import (CHECKPOINT_EVERY, Checkpoint, CheckpointError, DeepCUTUnlearner,
                                              UnlearnConfig, fingerprint_differences)


def model_config(model_dir):
    """The transformers config of a saved model directory (read without loading the weights);
    for a PEFT adapter, its base model's (which names the classes)."""
    from transformers import AutoConfig

    if is_adapter(model_dir):
        model_dir = adapter_base_path(model_dir)
    if not (Path(model_dir) / "config.json").is_file():
        what = "has no config.json" if Path(model_dir).is_dir() else "does not exist"
        raise FileNotFoundError(f"model directory {model_dir} {what}: give a folder saved with save_pretrained")
    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def model_label_names(model_dir, config=None):
    """The classes of a fine-tuned classifier, in id order, from its config (read if not given)."""
    config = model_config(model_dir) if config is None else config
    return [config.id2label[i] for i in sorted(config.id2label)]


def check_layer(config, layer):
    """The hidden layer an embedding is taken from exists in a model with this transformers
    config (embeddings + one state per layer)."""
    states = getattr(config, "num_hidden_layers", None)
    if states is not None and not -(states + 1) <= layer < states + 1:
        raise ValueError(f"layer {layer} is out of range: the model has {states + 1} hidden states")


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


def read_sets(model_dir, data_path, forget_spec, task, columns, test_path=None, layer=-1, forgotten=(),
              previous_data=None):
    """(label names, train, forget, retain, test or None), all read and checked, with the
    hidden ``layer`` the embedding comes from. ``forgotten``: ids that earlier requests removed
    (from training data whose digest was ``previous_data``), forgotten again with this one."""
    config = model_config(model_dir)
    check_layer(config, layer)
    label_names = model_label_names(model_dir, config)
    train = load_data(data_path, label_names, task, columns)
    if previous_data is not None and data_digest(train, task) != previous_data:
        raise ValueError(f"--data {data_path} is not the training data of the --previous run (rows, texts or labels "
                         "differ): the requests of one sequence are made on one training set")
    chosen = forget_indices(train, **forget_spec)
    if forgotten:
        chosen = sorted(set(chosen) | set(forget_indices(train, ids=forgotten)))
    forget, retain = train.partition(chosen)
    test = None if test_path is None else load_data(test_path, label_names, task, columns, keep_ids=False)
    return label_names, train, forget, retain, test


def _digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_digest(model_dir) -> str:
    """A digest of a model directory: every file's name and size, config.json whole, and the
    first and last MiB of every other file (enough to tell two checkpoints apart without reading
    gigabytes)."""
    parts = []
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 20 if path.name != "config.json" else size)
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
        parts.append((str(path.relative_to(model_dir)), size, hashlib.sha256(head + tail).hexdigest()))
    return _digest(parts)


def data_digest(train, task) -> str:
    return _digest(train.ids, train.texts, train.labels, task)


def run_fingerprint(model_dir, train, forget, config: UnlearnConfig, task, merge=False) -> dict:
    """What makes a run: the model files (an adapter's base model too), the training data, the
    forget set and the settings."""
    model = [model_digest(model_dir)] + ([model_digest(adapter_base_path(model_dir))] if is_adapter(model_dir) else [])
    return dict(model=_digest(model), data=data_digest(train, task), forget=_digest(sorted(forget.ids)),
                settings=dict(asdict(config), merge=merge))


def _metrics(model, tokenizer, forget, retain, test, label_names, max_length):
    if test is not None:  # every figure, membership inference included
        return evaluate(model, tokenizer, forget, retain, test, label_names, max_length=max_length)
    return {name: classification_metrics(predict(model, tokenizer, data, max_length=max_length), label_names)
            for name, data in (("forget", forget), ("retain", retain))}


@contextlib.contextmanager
def distributed(device=None):
    """Join the process group that ``torchrun`` or ``accelerate launch`` describes in the
    environment (WORLD_SIZE > 1): NCCL with one GPU per local rank, gloo on CPUs; leave it at
    the end if this joined it. Yields (rank, this process's device): ``device`` when given
    (one process), else the local rank's GPU, else the CPU."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if device is not None and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        device = torch.device(device)
    else:
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


def _previous_result(out: Path, fingerprint: dict):
    """The report of a finished run in ``out`` with this fingerprint, None if there is none;
    refused if ``out`` holds another run's result."""
    path = out / "report.json"
    if not path.exists():
        return None
    report = read_json(path)
    differences = fingerprint_differences(report.get("fingerprint") or {}, fingerprint)
    if differences:
        raise CheckpointError(f"{out} holds the result of another run (differs in: {'; '.join(differences)}); "
                              "replace it with --restart, or choose another --out")
    return report


def previous_run(run_dir):
    """(model directory, report, audit chain) of a finished unlearn run that a new request
    continues from; its chain is verified first (a broken one is not continued)."""
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").is_file() or not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"--previous {run_dir} is not a finished unlearn run (it needs report.json and model/)")
    chain = verify(run_dir)
    return run_dir / "model", read_json(run_dir / "report.json"), chain


def retraining_settings(model_dir, previous=None):
    """How a retraining would run, which the time budget is measured against: {retrain_precision,
    retrain_epochs} from the model's recipe.json (finetune writes it), with ``previous`` (an
    earlier run's folder) the ones that run budgeted against; the config's defaults (fp32, 2
    epochs) where neither says."""
    if previous is not None:
        report = Path(previous) / "report.json"  # a missing one is reported by the job
        config = read_json(report).get("config", {}) if report.is_file() else {}
        # reports before an option carry none: the default
        return {k: config[k] for k in ("retrain_precision", "retrain_epochs") if k in config}
    recipe = saved_recipe(model_dir)
    return {} if recipe is None else dict(retrain_precision=recipe.precision, retrain_epochs=recipe.epochs)


def _request_sets(train, requests):
    """{request id: its forget samples} of [(request id, ids)]."""
    return {name: train.subset(forget_indices(train, ids=ids)) for name, ids in requests}


def _audit_record(chain, report, model_before, model_after, started, reference_gaps):
    metrics, calibration = report["metrics"], report["calibration"] or {}
    figures = dict(forget_accuracy={name: m["accuracy"] for name, m in metrics["requests"].items()},
                   retain_accuracy=metrics["retain"]["accuracy"])
    for key in ("mia_loss_auc", "mia_svc_efficacy"):
        if key in metrics:
            figures[key] = metrics[key]
    if "test" in metrics:
        figures.update(test_accuracy=metrics["test"]["accuracy"], test_macro_f1=metrics["test"]["macro_f1"])
    if reference_gaps is not None:
        figures["distance_to_reference"] = reference_gaps["distance"]
    this = report["requests"][-1]
    return new_record(chain, request=this["request"], forget_ids_hash=ids_hash(this["forget_ids"]),
                      forget_size=len(this["forget_ids"]), forgotten_ids_hash=report["fingerprint"]["forget"],
                      forgotten_size=report["sizes"]["forget"], model_before=model_before, model_after=model_after,
                      settings=report["config"], started=started, seconds=report["seconds"],
                      target=calibration.get("aim"), target_met=calibration.get("met"),
                      stopped_because=calibration.get("stopped_because"), figures=figures)


def _append_audit(out: Path, chain, record):
    """``out/audit.jsonl``: the chain of the model this run started from, then its own record
    (written again only when it is not there yet: a run killed between its report and its
    audit record completes the record on the rerun)."""
    if [r.get("hash") for r in read_chain(out)] != [r["hash"] for r in chain] + [record["hash"]]:
        write_chain(out, chain + [record])


def run_unlearn_job(model_dir, data_path, out, config: UnlearnConfig, forget_spec: dict, test_path=None,
                    columns=None, checkpoint_every=CHECKPOINT_EVERY, progress=True, task="sequence",
                    restart=False, device=None, merge=False, heldout_path=None, previous=None, request_id=None,
                    reference_dir=None):
    """Unlearn ``forget_spec`` (forget_indices' keywords) from the model in ``model_dir`` (a full
    model, or a PEFT adapter: saved as an adapter again, or merged into a full model with
    ``merge``) on ``device`` (default: the GPU when there is one). Under torchrun / accelerate
    launch every rank trains (DDP) and rank 0 writes the outputs. A rerun of a finished run
    returns its report; ``restart`` discards what ``out`` holds first. A calibrated run sets its
    target and guard on ``heldout_path`` (default: the test file, ``test_path``).

    ``previous``: the folder of an earlier run whose model this request starts from (instead of
    ``model_dir``): the forget set is this request's samples and every earlier request's (none is
    retained again), and the report measures each request's samples apart. ``request_id`` names
    the request in the report and the audit record (default ``request-<n>``); ``reference_dir``
    is a model retrained without every forgotten sample, whose distance the record keeps."""
    out = Path(out)
    chain, earlier, previous_data = [], [], None
    if previous is not None:
        if model_dir is not None:
            raise ValueError("--previous continues from the model of that run: leave out --model")
        model_dir, previous_report, chain = previous_run(previous)
        earlier = [(r["request"], r["forget_ids"]) for r in previous_report["requests"]]
        previous_data = previous_report["fingerprint"]["data"]
    elif model_dir is None:
        raise ValueError("give the model to unlearn from (--model), or an earlier run to continue (--previous)")
    request_id = request_id or f"request-{len(chain) + 1}"
    if request_id in [name for name, _ in earlier]:
        raise ValueError(f"--request-id {request_id!r} names an earlier request of this sequence: give a new one")
    if reference_dir is not None and test_path is None:
        raise ValueError("a --reference model is compared on the membership figures, which need --test")
    label_names, train, forget, retain, test = read_sets(model_dir, data_path, forget_spec, task, columns, test_path,
                                                         config.layer, [i for _, ids in earlier for i in ids],
                                                         previous_data)
    if reference_dir is not None:
        model_label_names(reference_dir)  # checked before any model loads
    new_ids = sorted(set(train.subset(forget_indices(train, **forget_spec)).ids) - {i for _, ids in earlier for i in ids})
    if not new_ids:
        raise ValueError("every sample of this request was forgotten by an earlier request: nothing to unlearn")
    requests = earlier + [(request_id, new_ids)]
    heldout = test if heldout_path is None else load_data(heldout_path, label_names, task, columns, keep_ids=False)
    # the settings as the run will take them (the fingerprint and the report show these)
    config = config.for_request(request_kind(config.request, forget, retain), is_decoder_only(model_config(model_dir)))
    fingerprint = run_fingerprint(model_dir, train, forget, config, task, merge)
    fingerprint.update(request=request_id, previous=chain[-1]["hash"] if chain else None)
    if heldout is not None:
        fingerprint["heldout"] = _digest(heldout.texts, heldout.labels)
    writer = int(os.environ.get("RANK", "0")) == 0  # the rank that writes (known before joining the group)
    with claimed_folder(out) if writer else contextlib.nullcontext(out):
        checkpoint = Checkpoint(out / "checkpoint.pt", every=checkpoint_every, fingerprint=fingerprint)
        if restart and writer:
            checkpoint.path.unlink(missing_ok=True)
            for name in ("report.json", AUDIT_FILE):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "model", ignore_errors=True)
        elif restart:  # the other ranks start over with rank 0 and leave the old files to it
            checkpoint = None
        finished = None if restart else _previous_result(out, fingerprint)
        if finished is not None and (out / "model").is_dir():
            if writer:
                checkpoint.path.unlink(missing_ok=True)  # left if the run was killed after its report
                if finished.get("audit"):
                    _append_audit(out, chain, finished["audit"])
            return finished if writer else None
        resumed_from = ((checkpoint.load() if checkpoint else None) or {}).get("step", 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        model_before = model_hash(model_dir) if writer else None
        model, tokenizer = load_classifier(model_dir, label_names, task=task)
        with distributed(device) as (rank, device):
            world = dist.get_world_size() if dist.is_initialized() else 1
            start = time.perf_counter()
            result = DeepCUTUnlearner(model.to(device), tokenizer, config).unlearn(forget, retain, progress=progress,
                                                                                   checkpoint=checkpoint,
                                                                                   heldout=heldout)
            seconds = time.perf_counter() - start
        if rank > 0:  # the model is the same on every rank: rank 0 evaluates and writes
            return None
        metrics = _metrics(model, tokenizer, forget, retain, test, label_names, config.max_length)
        metrics["requests"] = {name: classification_metrics(predict(model, tokenizer, data, max_length=config.max_length),
                                                            label_names)
                               for name, data in _request_sets(train, requests).items()}
        reference_gaps = None
        if reference_dir is not None:
            reference, _ = load_classifier(reference_dir, label_names, task=task)
            reference_gaps = gap_to(metrics, _metrics(reference, tokenizer, forget, retain, test, label_names,
                                                      config.max_length))
        save_model_atomically(lambda folder: save_trained(result.model, tokenizer, folder, merge), out / "model")
        new_steps = [r["seconds"] for r in result.history[resumed_from:]]
        report = dict(config=asdict(result.config), calibration=result.calibration, embedding=resolve_embedding(config.embedding, model, forget.token_level),
                      sizes=dict(forget=len(forget), retain=len(retain)), seconds=seconds, processes=world,
                      device=str(device), seconds_per_step=sum(new_steps) / max(1, len(new_steps)),
                      peak_memory_bytes=result.peak_memory_bytes, adapter=is_adapter(model_dir), merged=merge,
                      resumed_from_step=resumed_from, stopped_early=result.stopped_early,
                      metrics=metrics, history=result.history, fingerprint=fingerprint,
                      requests=[dict(request=name, forget_ids=ids) for name, ids in requests],
                      previous=None if previous is None else str(previous))
        if reference_gaps is not None:
            report.update(reference=str(reference_dir), gap_to_reference=reference_gaps)
        report["audit"] = _audit_record(chain, report, model_before, model_hash(out / "model"), started,
                                        reference_gaps)
        atomic_write_json(out / "report.json", report)
        _append_audit(out, chain, report["audit"])
        checkpoint.path.unlink(missing_ok=True)
        return report


def run_evaluate_job(model_dir, data_path, test_path, out_file, forget_spec: dict, reference_dir=None,
                     columns=None, max_length=UnlearnConfig.max_length, task="sequence"):
    """Every evaluation figure of the model in ``model_dir`` (and of ``reference_dir``, with the
    gaps to it); writes ``out_file`` (JSON) atomically and returns the report."""
    if reference_dir is not None and test_path is None:
        raise ValueError("comparing with a reference model needs a test set (the membership figures use it)")
    label_names, _, forget, retain, test = read_sets(model_dir, data_path, forget_spec, task, columns, test_path)
    if reference_dir is not None:
        model_label_names(reference_dir)  # checked before any model loads
    reports = {}
    for name, directory in (("model", model_dir), ("reference", reference_dir)):
        if directory is not None:
            model, tokenizer = load_classifier(directory, label_names, task=task)
            reports[name] = _metrics(model, tokenizer, forget, retain, test, label_names, max_length)
    report = dict(sizes=dict(forget=len(forget), retain=len(retain)), model=str(model_dir), metrics=reports["model"])
    if reference_dir is not None:
        report.update(reference=str(reference_dir), reference_metrics=reports["reference"],
                      gap_to_reference=gap_to(reports["model"], reports["reference"]))
    if test_path is not None:
        report["headline"] = headline(reports["model"])
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_file, report)
    return report
