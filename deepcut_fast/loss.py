"""Public API: the DeepCUT contrastive unlearning loss (docs/spec.md, section 2), with argument checks."""
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from deepcut_fast import ops

FORGET_PULLS = ("logsumexp", "mean")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float64,) + ops.FUSED_DTYPES
BACKENDS = ops.BACKENDS  # the values of ``backend=``; "auto" picks one of the others


def available_backends(device="cpu", dtype=torch.float32) -> Dict[str, Optional[str]]:
    """Every concrete backend (all of BACKENDS but "auto") mapped to None where it runs on
    ``device`` with ``dtype``, else to the reason it cannot (missing build, wrong device, ...)."""
    device = torch.device(device)
    return {b: ops.backend_unavailable_reason(b, device, dtype) for b in BACKENDS if b != "auto"}


def _check_vector(name, value, length, kind, device):
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] (one entry per row), got {list(value.shape)}")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but z is on {device}; put them on one device")


def _check_embeddings(name, value, device=None, dim=None, dtype=None):
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape [rows, D], got {list(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one feature, got {list(value.shape)}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shapes without data): move it to a real device first")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but z is on {device}; put them on one device")
    if dim is not None and value.shape[1] != dim:
        raise ValueError(f"{name} must have D = {dim} features like z, got {value.shape[1]}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have z's dtype {dtype}, got {value.dtype}")


def _check_values(z, labels, candidates, candidate_labels, ignore_index):
    """Checks that read tensor values (one device sync each); skipped while torch.compile traces."""
    for name, x in (("z", z), ("candidates", candidates)):
        # max and min propagate NaN and see +-Inf: no [rows, D] temporaries, unlike isfinite(x)
        if x is not None and not bool(torch.isfinite(torch.stack([x.amax(), x.amin()])).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    for name, y in (("labels", labels), ("candidate_labels", candidate_labels)):
        if y is not None and bool(((y < 0) & (y != ignore_index)).any()):
            bad = y[(y < 0) & (y != ignore_index)][0].item()
            raise ValueError(f"{name} must be class ids >= 0 or ignore_index={ignore_index}, found {bad}")


def contrastive_unlearn_loss(
    z: Tensor,
    labels: Tensor,
    forget_mask: Tensor,
    *,
    instance_ids: Optional[Tensor] = None,
    candidates: Optional[Tensor] = None,
    candidate_labels: Optional[Tensor] = None,
    temperature: float = 0.07,
    forget_weight: float = 1.0,
    retain_weight: float = 1.0,
    forget_pull: str = "logsumexp",
    normalize: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """DeepCUT contrastive unlearning loss.

    Forget anchors are pushed away from their own class and pulled toward retain rows of other
    classes; retain anchors keep their class clusters and never see forget rows.

    Args:
        z: [M, D] anchor embeddings (one row per sample and view, or per token).
        labels: [M] integer class ids; rows equal to ``ignore_index`` take no part.
        forget_mask: [M] bool, True where the row belongs to the forget set.
        instance_ids: [M] ints; rows sharing an id are views of one sample (default: all distinct).
        candidates: optional [N, D] bank of retain embeddings (default: the rows of ``z``).
        candidate_labels: [N] integer class ids of ``candidates`` (required with them).
        temperature: tau > 0 dividing the cosine similarities.
        forget_weight, retain_weight: weights of the forget and retain anchor groups.
        forget_pull: "logsumexp" (pull toward the nearest other class) or "mean".
        normalize: L2-normalise rows first (cosine similarity).
        reduction: "mean" (per group over anchors with positives), "sum" or "none" ([M]).
        ignore_index: label value of rows that are neither anchors nor candidates.
        backend: "auto", "triton", "cpu" or "reference".
        process_group: a torch.distributed group (e.g. ``torch.distributed.group.WORLD``): the
            loss of the global batch, every rank's rows gathered with gradient, as one process
            would compute it on the concatenation (``deepcut_fast.distributed``); under DDP the
            step equals the single-process step. Candidates stay local to each rank.

    Returns:
        A scalar (or [M] for reduction="none": this rank's rows) in z's dtype.
    """
    _check_embeddings("z", z)
    M, D = z.shape
    _check_vector("labels", labels, M, "int", z.device)
    _check_vector("forget_mask", forget_mask, M, "bool", z.device)
    if instance_ids is not None:
        _check_vector("instance_ids", instance_ids, M, "int", z.device)
    if candidates is None and candidate_labels is not None:
        raise ValueError("candidate_labels was given without candidates")
    if candidates is not None:
        if candidate_labels is None:
            raise ValueError("candidates need candidate_labels ([N] class ids)")
        _check_embeddings("candidates", candidates, z.device, D, z.dtype)
        _check_vector("candidate_labels", candidate_labels, candidates.shape[0], "int", z.device)
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, weight in (("forget_weight", forget_weight), ("retain_weight", retain_weight)):
        if not isinstance(weight, (int, float)) or weight != weight or abs(weight) == float("inf"):
            raise ValueError(f"{name} must be a finite number, got {weight!r}")
    if forget_pull not in FORGET_PULLS:
        raise ValueError(f"forget_pull must be one of {FORGET_PULLS}, got {forget_pull!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not torch.compiler.is_compiling():
        _check_values(z, labels, candidates, candidate_labels, ignore_index)
    local = slice(None)
    if process_group is not None:
        from deepcut_fast.distributed import gather_batch

        z, labels, forget_mask, instance_ids, local = gather_batch(z, labels, forget_mask, instance_ids,
                                                                   process_group)
    loss = ops.contrastive_unlearn_loss(
        z, labels, forget_mask, instance_ids, candidates, candidate_labels, temperature,
        forget_weight, retain_weight, forget_pull, normalize, reduction, ignore_index, backend)
    return loss[local] if reduction == "none" else loss


class ContrastiveUnlearnLoss(nn.Module):
    """Module form of :func:`contrastive_unlearn_loss`; the options are fixed at construction."""

    def __init__(self, *, temperature=0.07, forget_weight=1.0, retain_weight=1.0,
                 forget_pull="logsumexp", normalize=True, reduction="mean", ignore_index=-100,
                 backend="auto", process_group=None):
        super().__init__()
        self.options = dict(temperature=temperature, forget_weight=forget_weight,
                            retain_weight=retain_weight, forget_pull=forget_pull,
                            normalize=normalize, reduction=reduction, ignore_index=ignore_index,
                            backend=backend, process_group=process_group)

    def forward(self, z, labels, forget_mask, instance_ids=None, candidates=None,
                candidate_labels=None):
        return contrastive_unlearn_loss(z, labels, forget_mask, instance_ids=instance_ids,
                                        candidates=candidates, candidate_labels=candidate_labels,
                                        **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
