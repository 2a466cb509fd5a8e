"""Global contrast across ranks (torch.distributed): gather every rank's rows, with gradient.

Each rank gathers the embeddings, labels, forget flags and instance ids of all ranks (ranks
may hold different numbers of rows, e.g. token anchors) and computes the loss of the whole
global batch, exactly the self case of docs/spec.md on the concatenation: self pairs and
same-instance rows are excluded by global index, instance ids are offset per rank to stay globally unique,
and the counts are those of the global batch.

Gradient: the backward of the gather sums the gradient of every rank's loss before taking this
rank's slice, i.e. it is the gradient of the SUM over ranks of their losses. DDP averages
parameter gradients over ranks, so a DDP step gets the gradient of the MEAN of the ranks'
losses: with every rank computing the same global loss, exactly the single-process step on the
concatenated batch. The cost: each rank evaluates the loss of the whole global batch (W x M
anchors), cheap next to the encoder for the batch sizes the encoder allows.
"""
import torch
import torch.distributed as dist

from deepcut_fast.reference import default_instance_ids


class _GatherRows(torch.autograd.Function):
    """all_gather of equally shaped [rows, ...] tensors; backward: all_reduce(SUM), own slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rows = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * rows:(rank + 1) * rows], None


def _all_sizes(rows, device, group):
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([rows], device=device), group=group)
    return [int(s) for s in sizes]


def gather_rows(tensor, sizes, group):
    """Concatenate every rank's ``tensor`` (rank r holds ``sizes[r]`` rows) in rank order;
    differentiable for floating tensors."""
    most = max(sizes)
    padded = torch.cat([tensor, tensor.new_zeros((most - tensor.shape[0],) + tuple(tensor.shape[1:]))])
    if tensor.is_floating_point():
        full = _GatherRows.apply(padded, group)
    else:  # bool travels as uint8: not every backend gathers bool
        wire = padded.to(torch.uint8) if tensor.dtype == torch.bool else padded
        parts = [torch.empty_like(wire) for _ in sizes]
        dist.all_gather(parts, wire.contiguous(), group=group)
        full = torch.cat(parts).to(tensor.dtype)
    return torch.cat([full[r * most:r * most + n] for r, n in enumerate(sizes)])


def gather_batch(z, labels, forget_mask, instance_ids, group):
    """The global batch: (z, labels, forget_mask, instance_ids, this rank's row slice)."""
    sizes = _all_sizes(z.shape[0], z.device, group)
    rank = dist.get_rank(group)
    if instance_ids is None:
        instance_ids = default_instance_ids(z.shape[0], z.device)
    # ids shifted to start at 0, then offset by rank * (largest id count of any rank): unique globally
    instance_ids = instance_ids.to(torch.long) - instance_ids.min()
    span = (instance_ids.max() + 1).reshape(1)
    dist.all_reduce(span, op=dist.ReduceOp.MAX, group=group)
    instance_ids = instance_ids + rank * span
    start = sum(sizes[:rank])
    return (gather_rows(z, sizes, group), gather_rows(labels, sizes, group),
            gather_rows(forget_mask, sizes, group), gather_rows(instance_ids, sizes, group),
            slice(start, start + sizes[rank]))
