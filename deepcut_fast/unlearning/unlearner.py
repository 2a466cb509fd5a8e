"""DeepCUT unlearning of a transformers classifier (docs/spec.md, section 1).

One step takes a batch of forget and retain samples, runs the encoder ``views`` times with
dropout on, and minimises  CE(retain logits) + gamma * L_contrast  where L_contrast is this
package's fused loss on the chosen embeddings (the views of one sample share an instance id).
Token classification uses token embeddings as anchors, with -100 labels ignored.
"""
import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepcut_fast.unlearning.evaluation import classification_metrics, predict
from deepcut_fast.loss import BACKENDS, FORGET_PULLS, contrastive_unlearn_loss
from deepcut_fast.queue import RetainQueue
from deepcut_fast.unlearning.calibration import (REQUEST_SETTINGS, REQUESTS, RETRAIN_SHARE, Calibrator,
                                                  fixed_sample, probe_seconds, request_kind, steps_per_epoch)
from deepcut_fast.unlearning.data import TextDataset
from deepcut_fast.unlearning.files import atomic_write, fault_point
from deepcut_fast.unlearning.model import (EMBEDDINGS, PRECISION_CHOICES, PRECISIONS, autocast_to, embed,
                                          encode_labelled, is_decoder_only, resolve_embedding, resolve_precision,
                                          set_activation_checkpointing, trained_parameters)


def steps_for(epochs, size, batch_size):
    """Optimiser steps of ``epochs`` passes over ``size`` samples in batches of ``batch_size``:
    a partial last batch is a step, and there is always at least one."""
    return max(1, math.ceil(epochs * size / batch_size))


class ConfigError(ValueError):
    """A bad UnlearnConfig setting; ``field`` names it (the CLI turns it into its option)."""

    def __init__(self, field_name, message):
        super().__init__(message)
        self.field = field_name


@dataclass
class UnlearnConfig:
    """Options of a DeepCUT run.

    By default the run calibrates itself (``calibrate``, docs in ``calibration``): it finds what
    the request is (``request``: "auto", or "class" / "sample" / "mislabelled"), takes that
    request's ``gamma``, ``views``, ``learning_rate`` and ``embedding`` where they are None, and
    runs until the forget set looks as it would to a retrained model, under a utility guard and
    a time budget (``budget_epochs``: a fifth of retraining unless ``budget`` says); ``steps``
    (or ``epochs``) then only caps it.
    With ``calibrate=False`` it runs ``steps`` (``epochs``: passes over the forget set), or
    until the fixed stopping rule below fires."""
    gamma: Optional[float] = None  # None: the request's setting (calibration.REQUEST_SETTINGS)
    temperature: float = 0.5
    views: Optional[int] = None
    forget_pull: str = "logsumexp"
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    # None: the request's; "auto": token for token data, last for decoder-only models, else cls
    embedding: Optional[str] = None
    layer: int = -1
    learning_rate: Optional[float] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    forget_batch_size: int = 16
    retain_batch_size: int = 32
    max_length: int = 96
    request: str = "auto"
    calibrate: bool = True
    # calibrated runs: time limit, in epochs of retraining on the retain set; None: a fifth
    # (calibration.RETRAIN_SHARE) of retraining's ``retrain_epochs`` (0.4 of a 2-epoch one)
    budget: Optional[float] = None
    guard_accuracy_drop: float = 0.01  # calibrated runs: the utility guard (calibration module)
    guard_recall_drop: Optional[float] = None  # None: the request's (5 points; mislabelled 15)
    heldout_sample: Optional[int] = 256  # held-out (or retain) rows each check predicts
    # fixed stopping rule (calibrate=False): stop once accuracy on the forget set (its training
    # labels) is at most this, checked every `check_every` steps; None: run all steps.
    # With `stop_retain_drop`, the run also waits until accuracy on a fixed sample of as many
    # retain samples is at most this far below its value before the first step (the contrast
    # pushes retain samples too; CE needs a few steps to repair them); a negative value waits
    # for it to rise that far above its start. Checks predict a fixed random sample of at most
    # `stop_sample` forget samples (None: all); calibrated runs check as often, on as many.
    stop_forget_accuracy: Optional[float] = None
    stop_retain_drop: Optional[float] = None
    check_every: int = 2
    # calibrated runs: checks take at most this share of the run's time, checking every
    # check_every steps or (up to 4x) more when a check costs more than a step (on BBC News a
    # check's 384 predictions cost about two DeepCUT steps in fp32); None: every check_every steps.
    # A fifth rather than a third leaves the budget more steps: on BBC News mislabelled 0.038 ->
    # 0.028 from retraining, the whole class and random deletion as near (study README)
    check_time_share: Optional[float] = 0.2
    stop_sample: Optional[int] = 128
    seed: int = 0
    backend: str = "auto"
    # precision of the forward passes: "fp32", or autocast to "bf16" / "fp16" (fp16 with a
    # gradient scaler); "auto": bf16 where the device computes it natively (a DeepCUT step in
    # about 0.4 of its fp32 time on a CPU with AVX512-BF16, benchmarks/step_precision.py), else
    # fp32. Gradient checkpointing recomputes activations in the backward (less memory)
    precision: str = "auto"
    # calibrated runs: precision of the checks' predictions; "auto": bf16 where the device computes
    # it natively (a third of fp32's time on a CPU with AVX512-BF16), else ``precision``
    check_precision: str = "auto"
    # calibrated runs: the precision retraining would run in, for the budget's timed retraining
    # steps (fp32: how transformers' Trainer fine-tunes unless told otherwise)
    retrain_precision: str = "fp32"
    # calibrated runs: the epochs retraining would run (how the model was fine-tuned: its
    # recipe.json, which finetune writes), of which the default budget is a share
    retrain_epochs: float = 2.0
    gradient_checkpointing: bool = False
    # large batches: gradient caching in chunks of this many samples (None: off), and a queue of
    # this many recent retain embeddings as extra candidates (0: off)
    chunk_size: Optional[int] = None
    queue_size: int = 0

    def __post_init__(self):
        def fail(name, message):
            raise ConfigError(name, f"{name} {message}, got {getattr(self, name)!r}")

        for name, choices in (("embedding", EMBEDDINGS), ("forget_pull", FORGET_PULLS), ("backend", BACKENDS),
                              ("precision", PRECISION_CHOICES), ("check_precision", PRECISION_CHOICES),
                              ("retrain_precision", PRECISION_CHOICES),
                              ("request", REQUESTS)):
            if getattr(self, name) not in choices and not (name in REQUEST_SETTINGS["sample"] and
                                                           getattr(self, name) is None):
                fail(name, f"must be one of {choices}")
        if self.steps is None and self.epochs is None and not self.calibrate:
            raise ConfigError("steps", "give steps or epochs: without calibration nothing else ends the run")
        for name in ("steps", "views", "forget_batch_size", "retain_batch_size", "max_length", "check_every",
                     "stop_sample", "chunk_size", "heldout_sample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("epochs", "temperature", "learning_rate", "budget", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and not (0 < value < math.inf):
                fail(name, "must be a finite number > 0")
        for name in ("gamma", "forget_weight", "retain_weight", "queue_size"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < math.inf:
                fail(name, "must be a finite number >= 0")
        if self.check_time_share is not None and not 0 < self.check_time_share < 1:
            fail("check_time_share", "must be a fraction between 0 and 1 (exclusive) or None")
        for name in ("guard_accuracy_drop", "guard_recall_drop"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 1:
                fail(name, "must be a fraction between 0 and 1")
        if self.stop_forget_accuracy is not None and not 0 <= self.stop_forget_accuracy <= 1:
            fail("stop_forget_accuracy", "must be a fraction between 0 and 1")
        if self.stop_retain_drop is not None and not -1 <= self.stop_retain_drop <= 1:  # < 0: wait for a rise
            fail("stop_retain_drop", "must be a fraction between -1 and 1")
        if self.precision == "fp16" and self.chunk_size is not None:
            raise ConfigError("precision", "precision fp16 needs a gradient scaler, which gradient caching "
                              "(chunk_size) does not use: take bf16")
        if self.calibrate and self.stop_forget_accuracy is not None:
            raise ConfigError("stop_forget_accuracy", "stop_forget_accuracy is the fixed stopping rule of a run "
                              "without calibration (calibrate=False)")
        if self.stop_retain_drop is not None and self.stop_forget_accuracy is None:
            raise ConfigError("stop_retain_drop", "stop_retain_drop needs stop_forget_accuracy: it only delays "
                              "the stop that the forget accuracy triggers")

    def for_request(self, kind, decoder_only=False):
        """This config with the settings of request ``kind`` wherever they are None. The
        embedding chosen per request was tuned on an encoder; a decoder-only model keeps "auto"
        (the last token, which it pools)."""
        settings = dict(REQUEST_SETTINGS[kind], **({"embedding": "auto"} if decoder_only else {}))
        return replace(self, **{k: v for k, v in settings.items() if getattr(self, k) is None})

    def on_device(self, device):
        """This config with its "auto" precisions resolved to the ones that run on ``device``."""
        return replace(self, precision=resolve_precision(self.precision, device),
                       retrain_precision=resolve_precision(self.retrain_precision, device))

    def total_steps(self, forget_size, retain_size):
        """The run's steps (a cap when calibrating: without steps or epochs, as many as ``budget_epochs``
        epochs of retraining take, which a DeepCUT step, costlier than a retraining step, never
        reaches within the time budget)."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return steps_for(self.epochs, forget_size, self.forget_batch_size)
        return max(self.check_every, steps_for(self.budget_epochs, retain_size, self.retain_batch_size))

    @property
    def budget_epochs(self):
        """A calibrated run's time limit in retraining epochs: ``budget``, else ``RETRAIN_SHARE``
        of ``retrain_epochs``."""
        return RETRAIN_SHARE * self.retrain_epochs if self.budget is None else self.budget


def _views(model, inputs, config, kind):
    """The ``views`` dropout passes of a batch: (``kind`` embeddings [views * rows, D], [logits per view])."""
    outputs = [model(**inputs, output_hidden_states=True) for _ in range(config.views)]
    z = torch.cat([embed(model, o, inputs["attention_mask"], kind, config.layer).flatten(0, -2) for o in outputs])
    return z, [o.logits for o in outputs]


def cross_entropy(logits, labels, reduction="mean"):
    """CE over samples ([B, C] / [B]) or over tokens ([B, T, C] / [B, T], -100 ignored)."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction=reduction)


def _retain_ce_sum(logits, labels, forget_mask):
    """CE summed over the views and the retain targets (samples, or tokens not labelled -100)."""
    retain = ~forget_mask
    return sum(cross_entropy(l[retain], labels[retain], reduction="sum") for l in logits)


def _retain_targets(labels, forget_mask, views):
    return max(1, int((labels[~forget_mask] != -100).sum()) * views)


def _rows(labels, forget_mask, views, rows=slice(None)):
    """Labels, forget flags and instance ids of the contrast rows of ``rows`` of the batch, in
    ``_views`` order (view by view); every sample (or token) keeps one id across its views."""
    instance = torch.arange(labels.numel(), device=labels.device).view(labels.shape)[rows]
    row_forget = forget_mask[:, None].expand_as(labels) if labels.dim() == 2 else forget_mask
    return (labels[rows].flatten().repeat(views), row_forget[rows].flatten().repeat(views),
            instance.flatten().repeat(views))


def _contrast(z, labels, forget, instance, config, queue=None, process_group=None):
    """The self-case contrastive loss, plus the loss against a retain queue when one is given
    (then this batch's retain rows join the queue)."""
    options = dict(temperature=config.temperature, forget_weight=config.forget_weight,
                   retain_weight=config.retain_weight, forget_pull=config.forget_pull, backend=config.backend)
    loss = contrastive_unlearn_loss(z, labels, forget, instance_ids=instance, process_group=process_group, **options)
    if queue is not None:
        bank, bank_labels = queue.candidates()
        if bank is not None:
            loss = loss + contrastive_unlearn_loss(z, labels, forget, candidates=bank.to(z.dtype),
                                                   candidate_labels=bank_labels, **options)
        queue.push(z, labels, forget)
    return loss


def _embedding_kind(model, labels, config):
    """The embedding contrasted for this model and batch ("auto" resolved); it must fit the labels."""
    kind = resolve_embedding(config.embedding, model, labels.dim() == 2)
    if (labels.dim() == 2) != (kind == "token"):
        raise ValueError("token labels [B, T] go with embedding='token', sequence labels [B] with the others")
    return kind


def deepcut_loss(model, inputs, labels, forget_mask, config: UnlearnConfig, queue=None, process_group=None):
    """CE on retain rows + gamma * contrastive loss over ``config.views`` dropout passes.

    inputs: tokenised batch (input_ids, attention_mask, ...); labels: [B] class ids, or [B, T]
    token labels with -100 on padding and special tokens; forget_mask: [B] bool.
    queue: an optional RetainQueue (extra retain candidates); process_group: contrast the
    global batch across ranks. Returns (loss, {"ce": ..., "contrast": ...}). Settings left None
    in ``config`` take the sample-level request's values (``unlearn`` fills in the request's own).
    """
    config = config.for_request("sample")
    kind = _embedding_kind(model, labels, config)
    z, logits = _views(model, inputs, config, kind)
    ce = _retain_ce_sum(logits, labels, forget_mask) / _retain_targets(labels, forget_mask, config.views)
    contrast = _contrast(z, *_rows(labels, forget_mask, config.views), config, queue, process_group)
    return ce + config.gamma * contrast, {"ce": ce.detach(), "contrast": contrast.detach()}


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_deepcut_step(model, inputs, labels, forget_mask, config: UnlearnConfig, queue=None, process_group=None):
    """``deepcut_loss`` back-propagated with gradient caching (GradCache): embed the batch in
    chunks of ``config.chunk_size`` samples without keeping activations, take the contrastive
    loss and its gradient with respect to all embeddings at once, then re-run each chunk with
    autograd (same dropout masks: its RNG state is saved) and back-propagate its slice of that
    gradient together with its share of the CE. Peak activation memory follows the chunk, not
    the batch. Leaves the gradients in the parameters; returns (detached loss, parts).
    None settings as in ``deepcut_loss``."""
    config = config.for_request("sample")
    kind = _embedding_kind(model, labels, config)
    device = labels.device
    chunks = [slice(i, i + config.chunk_size) for i in range(0, labels.shape[0], config.chunk_size)]
    states, pieces = [], []
    with torch.no_grad():
        for rows in chunks:
            states.append(_rng_state(device))
            pieces.append(_views(model, {k: v[rows] for k, v in inputs.items()}, config, kind)[0])
    z = torch.cat(pieces).requires_grad_()
    meta = [torch.cat(parts) for parts in zip(*(_rows(labels, forget_mask, config.views, rows) for rows in chunks))]
    contrast = _contrast(z, *meta, config, queue, process_group)
    (config.gamma * contrast).backward()
    targets, ce, start = _retain_targets(labels, forget_mask, config.views), 0.0, 0
    for i, (rows, state) in enumerate(zip(chunks, states)):
        _set_rng_state(state, device)
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")  # DDP: all-reduce once, at the end
        with contextlib.nullcontext() if sync else model.no_sync():
            piece, logits = _views(model, {k: v[rows] for k, v in inputs.items()}, config, kind)
            chunk_ce = _retain_ce_sum(logits, labels[rows], forget_mask[rows]) / targets
            ((piece * z.grad[start:start + piece.shape[0]]).sum() + chunk_ce).backward()
        start += piece.shape[0]
        ce += chunk_ce.detach()
    loss = ce + config.gamma * contrast.detach()
    return loss, {"ce": torch.as_tensor(ce), "contrast": contrast.detach()}


@dataclass
class UnlearnResult:
    model: torch.nn.Module
    history: list = field(default_factory=list)  # one dict per step
    stopped_early: bool = False
    retain_accuracy_before: Optional[float] = None  # the stopping rule's retain sample, before step 1
    peak_memory_bytes: Optional[int] = None  # see peak_memory_bytes()
    calibration: Optional[dict] = None  # calibrated runs: the target, whether it was met, the checks
    config: Optional["UnlearnConfig"] = None  # the settings the run used (the request's filled in)


def accuracy(model, tokenizer, data: TextDataset, max_length=96):
    """Accuracy of ``model`` on ``data`` with dropout off (of word tags, for token data)."""
    if len(data) == 0:
        return 0.0
    return classification_metrics(predict(model, tokenizer, data, max_length=max_length), data.label_names)["accuracy"]


def _should_stop(model, tokenizer, forget_check, retain_check, config, record, retain_before):
    """The stopping rule; writes the accuracies it measured into the step's ``record``."""
    record["forget_accuracy"] = accuracy(model, tokenizer, forget_check, config.max_length)
    if record["forget_accuracy"] > config.stop_forget_accuracy:
        return False
    if config.stop_retain_drop is None:
        return True
    record["retain_accuracy"] = accuracy(model, tokenizer, retain_check, config.max_length)
    return record["retain_accuracy"] >= retain_before - config.stop_retain_drop


CHECKPOINT_EVERY = 5  # steps between checkpoints, unless the caller says otherwise


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, or written by another run."""


def fingerprint_differences(saved: dict, current: dict) -> list:
    """What differs between two run fingerprints ({"model": digest, "data": ..., "settings":
    {...}}), in words: the parts, and for the settings each key with both values."""
    found = []
    for part in sorted(set(saved) | set(current)):
        mine, theirs = saved.get(part), current.get(part)
        if mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found += [f"{key} {mine.get(key)!r} -> {theirs.get(key)!r}" for key in sorted(set(mine) | set(theirs))
                      if mine.get(key) != theirs.get(key)]
        else:
            found.append(f"the {part}")
    return found


class Checkpoint:
    """Everything needed to continue a run exactly (model, optimiser, sampling and RNG state,
    history), saved atomically to one file every ``every`` steps. With a ``fingerprint`` (what
    the run is: model, data, forget set, settings), a checkpoint of another run is refused
    instead of continued, so that one model never mixes two runs."""

    def __init__(self, path, every=CHECKPOINT_EVERY, fingerprint: Optional[dict] = None):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        self.path, self.every, self.fingerprint = Path(path), every, fingerprint
        self._state = None

    def load(self):
        """The saved state (read once, then kept), or None when there is no checkpoint."""
        if self._state is None and self.path.exists():
            try:
                state = torch.load(self.path, weights_only=False)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a checkpoint of this package")
            except Exception as err:  # torch raises several kinds for a truncated or empty file
                raise CheckpointError(f"{self.path} is damaged or incomplete ({type(err).__name__}: "
                                      f"{str(err).strip()[:80] or 'empty'}); start over with --restart") from None
            differences = fingerprint_differences(state.get("fingerprint") or {}, self.fingerprint or {})
            if self.fingerprint is not None and differences:
                raise CheckpointError(f"{self.path} belongs to another run (differs in: {'; '.join(differences)}); "
                                      "start over with --restart, or choose another --out")
            self._state = state
        return self._state

    def save(self, state):
        self._state = None
        atomic_write(self.path, lambda f: torch.save(dict(state, fingerprint=self.fingerprint), f))


def train_steps(model, tokenizer, forget: TextDataset, retain: TextDataset, config: UnlearnConfig, step_loss,
                steps=None, forget_batch_size=None, retain_batch_size=None, progress=True, desc="unlearn",
                checkpoint: Optional[Checkpoint] = None, extra_state=None, calibrator: Optional[Calibrator] = None,
                prepare=None):
    """The loop every method shares: each step draws forget and retain samples (walking seeded
    permutations), tokenises them into one batch, and takes an AdamW step on
    ``step_loss(model, inputs, labels, forget_mask) -> (loss, parts)`` (a loss without grad
    means step_loss back-propagated itself, as gradient caching does). Applies the config's
    stopping rule and returns an UnlearnResult with one history record per step. With a
    ``checkpoint`` whose file exists, the run continues from it instead of starting over;
    ``extra_state`` (state_dict / load_state_dict, e.g. a RetainQueue) is saved with it.
    With a ``calibrator`` the run stops on its target, guard and time budget instead of the
    config's fixed rule, and ``result.calibration`` reports it. ``prepare()``: a method's work
    before its first step (SCRUB's teacher, NPO's reference, SalUn's saliency mask), done only
    when a step will run; a calibrated run counts its time as preparation.

    Under torch.distributed (torchrun, accelerate launch) the model is wrapped in DDP and the
    batch sizes are global: every rank walks the same permutations and takes its share of each
    batch, so the global batch is the one a single process would draw; rank 0 saves the
    checkpoints."""
    from tqdm.auto import tqdm

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)

    forget_batch_size = config.forget_batch_size if forget_batch_size is None else forget_batch_size
    retain_batch_size = config.retain_batch_size if retain_batch_size is None else retain_batch_size
    steps = config.total_steps(len(forget), len(retain)) if steps is None else steps
    if config.learning_rate is None:
        raise ValueError("learning_rate is None: resolve the config for its request first (for_request)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout masks
    optimizer = torch.optim.AdamW([p for _, p in trained_parameters(model)], lr=config.learning_rate)
    precision = resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    orders = {"forget": [], "retain": []}
    forget_check, retain_check = (fixed_sample(data, config.stop_sample, config.seed) for data in (forget, retain))

    def next_batch(name, data, size):  # walk a fresh permutation, reshuffle when used up
        picked = []
        while len(picked) < min(size, len(data)):
            if not orders[name]:
                orders[name] = torch.randperm(len(data), generator=generator).tolist()
            picked.append(orders[name].pop())
        return picked

    result = UnlearnResult(model)
    first, stop_reason = 1, None
    if calibrator is not None:
        calibrator.start_clock()
    state = checkpoint.load() if checkpoint is not None else None
    epoch_steps = steps_per_epoch(len(retain), config.retain_batch_size)

    def probe():  # seconds of a retraining step, for the calibrated budget
        return probe_seconds(model, tokenizer, retain, config)

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        orders, result.history, first = state["orders"], state["history"], state["step"] + 1
        result.retain_accuracy_before = state.get("retain_accuracy_before")  # absent in older checkpoints
        if extra_state is not None:
            extra_state.load_state_dict(state["extra"])
        if calibrator is not None:
            calibrator.load_state_dict(state["calibration"])
            calibrator.use_probe(probe, epoch_steps)
    elif calibrator is not None:
        if calibrator.begin(model, probe, epoch_steps, optimizer):
            stop_reason = "target met before the first step"
    if calibrator is not None:
        forget = calibrator.training_forget(forget)
    if len(forget) == 0 and retain_batch_size == 0:  # e.g. a calibrated focus that keeps no forget sample
        stop_reason, steps = stop_reason or "nothing to train on", first - 1
    elif calibrator is None and config.stop_forget_accuracy is not None and config.stop_retain_drop is not None:
        result.retain_accuracy_before = accuracy(model, tokenizer, retain_check, config.max_length)
    if prepare is not None and stop_reason is None and first <= steps:
        started = time.perf_counter()
        prepare()  # before DDP wraps the model: its backward is the method's own
        if calibrator is not None:
            calibrator.count_preparation(time.perf_counter() - started)
    model.train()
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    step_seconds = 0.0
    for step in tqdm(range(first, steps + 1), desc=desc, disable=not progress or rank > 0, initial=first - 1,
                     total=steps):
        if calibrator is not None and (stop_reason or _any_rank(calibrator.out_of_time(step_seconds, step - 1), world, device)):
            stop_reason = stop_reason or "budget"
            break
        start = time.perf_counter()
        f_idx = next_batch("forget", forget, forget_batch_size)[rank::world]
        r_idx = next_batch("retain", retain, retain_batch_size)[rank::world]
        texts = [forget.texts[i] for i in f_idx] + [retain.texts[i] for i in r_idx]
        inputs, labels = encode_labelled(tokenizer, texts, [forget.labels[i] for i in f_idx] +
                                         [retain.labels[i] for i in r_idx], config.max_length, device)
        forget_mask = torch.arange(len(texts), device=device) < len(f_idx)
        optimizer.zero_grad(set_to_none=True)
        with autocast_to(device.type, PRECISIONS[precision]):
            loss, parts = step_loss(trained, inputs, labels, forget_mask)
        if loss.requires_grad:
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step_seconds = time.perf_counter() - start
        record = dict(step=step, loss=loss.item(), seconds=step_seconds, **{k: float(v) for k, v in parts.items()})
        result.history.append(record)
        fault_point(f"step:{step}")
        if calibrator is not None:
            stop_reason = calibrator.after_step(step, model, optimizer, last=step == steps, step_seconds=step_seconds)
            if stop_reason:
                break
        elif config.stop_forget_accuracy is not None and (step % config.check_every == 0 or step == steps):
            if _should_stop(model, tokenizer, forget_check, retain_check, config, record,
                            result.retain_accuracy_before):
                result.stopped_early = step < steps
                break
        if checkpoint is not None and step % checkpoint.every == 0 and rank == 0:
            checkpoint.save(dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 generator=generator.get_state(), torch_rng=torch.get_rng_state(), orders=orders,
                                 cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                 scaler=scaler.state_dict(),
                                 history=result.history, retain_accuracy_before=result.retain_accuracy_before,
                                 extra=None if extra_state is None else extra_state.state_dict(),
                                 calibration=None if calibrator is None else calibrator.state_dict()))
    if calibrator is not None:
        if stop_reason == "budget" and result.history:
            calibrator.conclude(result.history[-1]["step"], model, optimizer)
        result.stopped_early = stop_reason != "steps"
        result.calibration = calibrator.finish(stop_reason or "steps", model)
    model.eval()
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    result.peak_memory_bytes = peak_memory_bytes(device)
    return result


def _any_rank(flag, world, device):
    """``flag`` on any rank (so that every rank takes the same decision from its own clock)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def peak_memory_bytes(device) -> int:
    """Peak memory so far: of the GPU since the run's start, or of the whole process on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class DeepCUTUnlearner:
    """Runs DeepCUT on a sequence classifier, or on a token classifier with
    ``embedding="token"`` (word-list data, ``load_token_table``): ``unlearn(forget, retain)``."""

    def __init__(self, model, tokenizer, config: Optional[UnlearnConfig] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or UnlearnConfig()

    def accuracy(self, data: TextDataset):
        return accuracy(self.model, self.tokenizer, data, self.config.max_length)

    def settings_for(self, forget: TextDataset, retain: TextDataset):
        """(request kind, the config with that request's settings) that ``unlearn`` will use."""
        kind = request_kind(self.config.request, forget, retain)
        return kind, self.config.for_request(kind, is_decoder_only(self.model))

    def unlearn(self, forget: TextDataset, retain: TextDataset, progress=True,
                checkpoint: Optional[Checkpoint] = None, heldout: Optional[TextDataset] = None) -> UnlearnResult:
        """Unlearn ``forget``; ``heldout``: data the model never trained on, which sets a
        calibrated run's target and guard (see the calibration module)."""
        if len(forget) == 0 or len(retain) == 0:
            raise ValueError(f"need forget and retain samples, got {len(forget)} and {len(retain)}")
        kind, cfg = self.settings_for(forget, retain)
        cfg = cfg.on_device(next(self.model.parameters()).device)  # the report names the precisions that ran
        if forget.token_level != (resolve_embedding(cfg.embedding, self.model, forget.token_level) == "token"):
            raise ValueError(f"embedding={cfg.embedding!r} does not fit the data: token classification data "
                             "(word lists) needs embedding='token', text data one of 'cls', 'mean', 'pooler', "
                             "'last'")
        queue = RetainQueue(cfg.queue_size) if cfg.queue_size else None
        group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        step = deepcut_loss if cfg.chunk_size is None else cached_deepcut_step
        calibrator = Calibrator(self.tokenizer, forget, retain, heldout, cfg, kind) if cfg.calibrate else None
        result = train_steps(self.model, self.tokenizer, forget, retain, cfg,
                             lambda model, inputs, labels, mask: step(model, inputs, labels, mask, cfg, queue, group),
                             progress=progress, desc="DeepCUT", checkpoint=checkpoint, extra_state=queue,
                             calibrator=calibrator)
        result.config = cfg
        return result
