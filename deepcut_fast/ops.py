"""Autograd and backend dispatch of the contrastive loss.

The fused backends share one ``torch.library`` custom op pair (forward / backward) so that
``torch.compile(fullgraph=True)`` sees a single opaque node with a fake implementation,
while eager calls run the selected kernel. The op returns per-anchor statistics; the
normalisation before it and the reduction after it are plain differentiable torch code.
"""
from typing import Optional

import torch
from torch import Tensor

from deepcut_fast import compiled
from deepcut_fast.reference import NORM_EPS, default_instance_ids, reduce_anchor_losses, reference_loss_wide

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "cpu", "reference")


def _triton_module():
    from deepcut_fast.kernels import contrastive  # imports triton; optional on CPU-only setups

    return contrastive


def backend_unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot run on this device and dtype, or None if it can."""
    if backend == "reference":
        return None
    if dtype not in FUSED_DTYPES:
        return f"fused kernels take float32, float16 or bfloat16, got {dtype} (use backend='reference')"
    if backend == "triton":
        try:
            kernels = _triton_module()
        except ImportError as err:
            return f"Triton is not installed ({err})"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if kernels.INTERPRET:
                return None
            return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                    "before importing deepcut_fast (slow; meant for tests)")
        return f"Triton kernels run on CUDA devices, got device {device}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu kernel runs on cpu tensors, got device {device}"
        return compiled.unavailable_reason()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` ('auto' picks the fastest available one)."""
    if backend == "auto":  # the fastest fused kernel that runs here, else the reference
        candidate = "triton" if device.type == "cuda" else "cpu"
        return candidate if backend_unavailable_reason(candidate, device, dtype) is None else "reference"
    reason = backend_unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    return backend


def _fused_module(backend: str):
    if backend == "triton":
        return _triton_module()
    if backend == "cpu":
        return compiled.kernels()
    raise ValueError(f"no fused implementation named {backend!r}")


def int32_keys(labels, instance_ids, candidate_labels, ignore_index):
    """(labels, instance ids, candidate labels, ignore_index) as int32, which the Triton kernels
    compare on every pair (int64 compares cost about twice the instructions and registers, enough
    to spill). A plain cast when every value and ignore_index fit; otherwise dense codes that keep
    every equality, with ignored labels coded -1 (and -1 as the ignore_index)."""
    keys = [k for k in (labels, instance_ids, candidate_labels) if k is not None and k.numel()]
    lo, hi = torch.stack([torch.stack(k.aminmax()) for k in keys]).T.tolist() if keys else ([0], [0])
    narrow = torch.iinfo(torch.int32)
    if narrow.min <= min(lo + [ignore_index]) and max(hi + [ignore_index]) <= narrow.max:
        return tuple(None if k is None else k.to(torch.int32) for k in (labels, instance_ids, candidate_labels)) + (
            ignore_index,)
    both = labels if candidate_labels is None else torch.cat([labels, candidate_labels])
    codes = torch.unique(both, return_inverse=True)[1].to(torch.int32).masked_fill_(both == ignore_index, -1)
    ids = torch.unique(instance_ids, return_inverse=True)[1].to(torch.int32)
    label_codes, candidate_codes = codes[:labels.shape[0]], None if candidate_labels is None else codes[labels.shape[0]:]
    return label_codes, ids, candidate_codes, -1


def backend_keys(backend, labels, instance_ids, candidate_labels, ignore_index):
    """The per-row keys as ``backend`` reads them: int32 for Triton, int64 for the CPU kernel."""
    if backend == "triton":
        return int32_keys(labels, instance_ids, candidate_labels, ignore_index)
    return labels, instance_ids, candidate_labels, ignore_index


@torch.library.custom_op("deepcut_fast::contrast_forward", mutates_args=())
def contrast_forward(u: Tensor, labels: Tensor, forget: Tensor, instance_ids: Tensor,
                     candidates: Optional[Tensor], candidate_labels: Optional[Tensor],
                     temperature: float, pull_lse: bool, ignore_index: int, unit_rows: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-anchor (loss, logsumexp over A, logsumexp over P, |P|) of rows u; the two
    log-sum-exps are in the backend's own units and go back only to its backward. ``unit_rows``:
    u and the candidates are unit vectors (normalize=True), so every similarity is at most 1 and
    a backend may shift its exponentials by that bound instead of a running maximum."""
    labels, instance_ids, candidate_labels, ignore_index = backend_keys(backend, labels, instance_ids,
                                                                        candidate_labels, ignore_index)
    return _fused_module(backend).forward(u, labels, forget, instance_ids, candidates,
                                          candidate_labels, temperature, pull_lse, ignore_index, unit_rows)


@contrast_forward.register_fake
def _(u, labels, forget, instance_ids, candidates, candidate_labels, temperature, pull_lse,
      ignore_index, unit_rows, backend):
    M = u.shape[0]
    stats = tuple(u.new_empty(M, dtype=torch.float32) for _ in range(3))
    return stats + (u.new_empty(M, dtype=torch.int32),)


@torch.library.custom_op("deepcut_fast::contrast_backward", mutates_args=())
def contrast_backward(grad_loss: Tensor, u: Tensor, labels: Tensor, forget: Tensor,
                      instance_ids: Tensor, candidates: Optional[Tensor],
                      candidate_labels: Optional[Tensor], lse_a: Tensor, lse_p: Tensor,
                      count: Tensor, temperature: float, pull_lse: bool, ignore_index: int,
                      unit_rows: bool, backend: str, need_anchor_grad: bool,
                      need_candidate_grad: bool) -> tuple[Tensor, Tensor]:
    """(dL/du, dL/dcandidates) in the inputs' dtypes; a gradient not needed is empty."""
    labels, instance_ids, candidate_labels, ignore_index = backend_keys(backend, labels, instance_ids,
                                                                        candidate_labels, ignore_index)
    du, dc = _fused_module(backend).backward(
        grad_loss, u, labels, forget, instance_ids, candidates, candidate_labels, lse_a, lse_p,
        count, temperature, pull_lse, ignore_index, unit_rows, need_anchor_grad, need_candidate_grad)
    du = u.new_empty(0, u.shape[1]) if du is None else du.to(u.dtype)
    dc = u.new_empty(0, u.shape[1]) if dc is None else dc.to(candidates.dtype)
    return du, dc


@contrast_backward.register_fake
def _(grad_loss, u, labels, forget, instance_ids, candidates, candidate_labels, lse_a, lse_p,
      count, temperature, pull_lse, ignore_index, unit_rows, backend, need_anchor_grad, need_candidate_grad):
    du = torch.empty_like(u) if need_anchor_grad else u.new_empty(0, u.shape[1])
    dc = torch.empty_like(candidates) if need_candidate_grad else u.new_empty(0, u.shape[1])
    return du, dc


def _setup_context(ctx, inputs, output):
    u, labels, forget, instance_ids, candidates, candidate_labels, *options = inputs
    _, lse_a, lse_p, count = output
    ctx.save_for_backward(u, labels, forget, instance_ids, candidates, candidate_labels,
                          lse_a, lse_p, count)
    ctx.options = options  # temperature, pull_lse, ignore_index, unit_rows, backend


def _backward(ctx, grad_loss, *unused_stat_grads):
    u, labels, forget, instance_ids, candidates, candidate_labels, lse_a, lse_p, count = ctx.saved_tensors
    need_anchor = ctx.needs_input_grad[0]
    need_candidate = candidates is not None and ctx.needs_input_grad[4]
    du, dc = contrast_backward(grad_loss, u, labels, forget, instance_ids, candidates,
                               candidate_labels, lse_a, lse_p, count, *ctx.options,
                               need_anchor, need_candidate)
    return (du if need_anchor else None, None, None, None, dc if need_candidate else None,
            None, None, None, None, None, None)


contrast_forward.register_autograd(_backward, setup_context=_setup_context)


NORMALIZE_CHUNK_BYTES = 64 << 20  # fp32 scratch of the normalisation, per chunk of rows


def chunk_rows(dim):
    """Rows per chunk of the normalisation: their fp32 scratch fits NORMALIZE_CHUNK_BYTES."""
    return max(1, NORMALIZE_CHUNK_BYTES // (4 * max(1, dim)))


def _row_chunks(x):
    rows = chunk_rows(x.shape[1])
    return [slice(i, i + rows) for i in range(0, x.shape[0], rows)]


class UnitRows(torch.autograd.Function):
    """Rows scaled to unit length in fp32 and returned in the input dtype, like
    ``F.normalize(x.float(), eps=NORM_EPS).to(x.dtype)``, in chunks of rows: autograd keeps the
    input (which the caller holds anyway) and the M norms instead of an fp32 copy of it, and the
    backward recomputes each chunk. At M = 1M, D = 512 that is 2 GiB less at the peak."""

    @staticmethod
    def forward(ctx, x):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        wide_dtype = torch.promote_types(x.dtype, torch.float32)
        norms = torch.empty(x.shape[0], device=x.device, dtype=wide_dtype)
        for rows in _row_chunks(x):
            wide = x[rows].to(wide_dtype)
            norms[rows] = wide.norm(dim=1)
            out[rows] = (wide / norms[rows].clamp(min=NORM_EPS)[:, None]).to(x.dtype)
        ctx.save_for_backward(x, norms)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, norms = ctx.saved_tensors
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        for rows in _row_chunks(x):
            wide, g, n = x[rows].to(norms.dtype), grad[rows].to(norms.dtype), norms[rows][:, None]
            scale = n.clamp(min=NORM_EPS)
            unit = wide / scale
            # d(x / |x|) projects out the component along the row; below eps it is x / eps
            projected = torch.where(n > NORM_EPS, g - unit * (unit * g).sum(1, keepdim=True), g)
            dx[rows] = (projected / scale).to(x.dtype)
        return dx


def memory_plan(rows: int, dim: int, dtype: torch.dtype) -> dict:
    """The buffers of one forward+backward of the fused loss in the self case (z of [rows, dim]
    in ``dtype``, normalised, Triton backend), by name -> bytes, and ``peak``: the most that is
    alive at once, z and its gradient included. O(rows) vectors (labels, ids, flags, per-anchor
    statistics, the reduction) are summed as ``per_row``; tiles live in registers and shared
    memory, dL/ds exists one bounded block of columns at a time (``ds_scratch``), and nothing of
    size rows x rows exists beyond it. ``tests/test_memory_plan.py`` checks that the op allocates
    exactly these [rows, dim] buffers and the scratch, and otherwise only chunks and O(rows) vectors."""
    element = torch.empty(0, dtype=dtype).element_size()
    full = rows * dim * element
    chunk = min(rows, chunk_rows(dim)) * dim * 4
    kernels = _triton_module()
    # narrow fp16/bf16 rows need no dL/ds scratch (the backward recomputes S in two kernels)
    columns = 0 if kernels.resident_width(dim, dtype) else kernels.scratch_columns(rows, rows, element)
    plan = dict(z=full, unit_rows=full, du_fp32=rows * dim * 4, ds_scratch=rows * columns * element, du=full,
                dz=full, per_row=rows * 128, normalize_scratch=8 * chunk)
    if dtype == torch.float32:  # the cast of du to the input dtype is du itself
        plan["du"] = 0
    # the peak is in the backward: the op's du in fp32 beside z and the unit rows, with the dL/ds
    # scratch while the kernels run and then du's cast; then the normalisation's backward (z, du,
    # dz and its scratch chunks)
    during_kernels = plan["z"] + plan["unit_rows"] + plan["du_fp32"] + plan["ds_scratch"]
    during_cast = plan["z"] + plan["unit_rows"] + plan["du_fp32"] + plan["du"]
    during_normalisation = plan["z"] + plan["du"] + plan["dz"] + plan["normalize_scratch"]
    plan["peak"] = max(during_kernels, during_cast, during_normalisation) + plan["per_row"]
    return plan


def canonical_rows(x):
    """Per-row labels, instance ids and flags as the kernels read them: contiguous, and integers
    as int64 whatever integer dtype they came in (an unsigned byte cannot hold ignore_index, -100,
    or the kernels' padding values). The Triton backend narrows the keys to int32 inside the op
    (``int32_keys``)."""
    if x is None:
        return None
    return (x if x.dtype == torch.bool else x.to(torch.int64)).contiguous()


def in_input_dtype(loss, dtype):
    """``loss`` (computed in fp32 or wider) cast to the inputs' dtype; an error instead of inf or
    nan where the value does not fit (e.g. a loss above 65504 in float16)."""
    out = loss.to(dtype)
    if torch.compiler.is_compiling() or bool(torch.isfinite(out).all()):
        return out
    finite = torch.isfinite(loss)
    if bool(finite.all()):
        worst = loss.abs().max().item()
        name = str(dtype).replace("torch.", "")
        raise ValueError(f"the loss ({worst:.6g}) does not fit in {name} (largest finite value "
                         f"{torch.finfo(dtype).max:.6g}): use float32 or bfloat16 embeddings, or a larger temperature")
    raise ValueError(f"the loss is not finite even in {loss.dtype} (unnormalised logits too large?): "
                     "use normalize=True or smaller embeddings")


def contrastive_unlearn_loss(z, labels, forget_mask, instance_ids, candidates, candidate_labels,
                             temperature, forget_weight, retain_weight, forget_pull, normalize,
                             reduction, ignore_index, backend):
    """The loss on an already validated batch (see deepcut_fast.loss for the arguments)."""
    backend = resolve_backend(backend, z.device, z.dtype)
    labels, forget_mask, instance_ids, candidate_labels = map(
        canonical_rows, (labels, forget_mask, instance_ids, candidate_labels))
    if backend == "reference":
        loss = reference_loss_wide(
            z, labels, forget_mask, instance_ids=instance_ids, candidates=candidates,
            candidate_labels=candidate_labels, temperature=temperature, forget_weight=forget_weight,
            retain_weight=retain_weight, forget_pull=forget_pull, normalize=normalize, reduction=reduction,
            ignore_index=ignore_index)
        return in_input_dtype(loss, z.dtype)

    def unit_rows(x):  # normalise in fp32, then run the kernel in the input dtype
        return UnitRows.apply(x) if normalize else x

    if instance_ids is None:
        instance_ids = default_instance_ids(z.shape[0], z.device)
    per_anchor, _, _, count = contrast_forward(
        unit_rows(z), labels, forget_mask, instance_ids,
        None if candidates is None else unit_rows(candidates), candidate_labels,
        float(temperature), forget_pull == "logsumexp", int(ignore_index), bool(normalize), backend)
    loss = reduce_anchor_losses(per_anchor, count > 0, forget_mask, forget_weight, retain_weight, reduction)
    return in_input_dtype(loss, z.dtype)
