"""Plain PyTorch reference of the DeepCUT contrastive loss (docs/spec.md, section 2).

It materialises the M x N similarity matrix and every mask, so it is easy to check by
reading and is the oracle of every test and the baseline of every benchmark. It is not
meant to be fast or memory-frugal.
"""
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def default_instance_ids(rows, device):
    """Every row its own instance: the default when no instance ids are given."""
    return torch.arange(rows, device=device)


def reduce_anchor_losses(per_anchor, counted, forget_mask, forget_weight, retain_weight, reduction):
    """The loss from per-anchor losses (docs/spec.md): anchors not ``counted`` (no positive, or
    ignored) add nothing; "mean" divides each group by its counted anchors (an empty group adds
    0), "sum" does not, "none" returns ``per_anchor``. Shared by the reference and the fused path."""
    if reduction == "none":
        return per_anchor
    forget_rows = counted & forget_mask
    retain_rows = counted & ~forget_mask
    forget_total = torch.where(forget_rows, per_anchor, 0.0).sum()
    retain_total = torch.where(retain_rows, per_anchor, 0.0).sum()
    if reduction == "mean":
        forget_total = forget_total / forget_rows.sum().clamp(min=1)
        retain_total = retain_total / retain_rows.sum().clamp(min=1)
    return forget_weight * forget_total + retain_weight * retain_total


def pair_masks(labels, forget_mask, candidate_labels, instance_ids, self_case, ignore_index):
    """Boolean [M, N] masks (in_a, in_p): the contrast set A(i) and the positives P(i)."""
    M, N = labels.shape[0], candidate_labels.shape[0]
    device = labels.device
    forget = forget_mask[:, None]
    if self_case:
        candidate_is_retain = ~forget_mask[None, :]
        same_instance = instance_ids[:, None] == instance_ids[None, :]
        excluded = torch.eye(M, dtype=torch.bool, device=device) | (forget & same_instance)
    else:  # a candidate bank holds retain rows only and excludes nothing
        candidate_is_retain = torch.ones(1, N, dtype=torch.bool, device=device)
        excluded = torch.zeros(M, N, dtype=torch.bool, device=device)
    usable = (labels != ignore_index)[:, None] & (candidate_labels != ignore_index)[None, :] & ~excluded
    same_class = labels[:, None] == candidate_labels[None, :]
    # retain anchors see retain rows only; forget anchors also see same-class forget rows
    in_a = usable & (candidate_is_retain | (forget & same_class))
    # retain anchors: same-class retain rows; forget anchors: other-class retain rows
    in_p = in_a & candidate_is_retain & (same_class != forget)
    return in_a, in_p


def contrastive_unlearn_loss_reference(
    z, labels, forget_mask, *, instance_ids=None, candidates=None, candidate_labels=None,
    temperature=0.07, forget_weight=1.0, retain_weight=1.0, forget_pull="logsumexp",
    normalize=True, reduction="mean", ignore_index=-100,
):
    """Same signature and result as deepcut_fast.contrastive_unlearn_loss, without checks.
    fp16 and bf16 inputs are computed in fp32 (as the fused kernels accumulate) and the result
    is cast back to their dtype."""
    return reference_loss_wide(
        z, labels, forget_mask, instance_ids=instance_ids, candidates=candidates,
        candidate_labels=candidate_labels, temperature=temperature, forget_weight=forget_weight,
        retain_weight=retain_weight, forget_pull=forget_pull, normalize=normalize, reduction=reduction,
        ignore_index=ignore_index).to(z.dtype)


def reference_loss_wide(z, labels, forget_mask, *, instance_ids, candidates, candidate_labels, temperature,
                        forget_weight, retain_weight, forget_pull, normalize, reduction, ignore_index):
    """The reference in fp32 for fp16/bf16 inputs (float64 stays float64), before the cast back."""
    wide = torch.promote_types(z.dtype, torch.float32)
    z = z.to(wide)
    candidates = None if candidates is None else candidates.to(wide)
    self_case = candidates is None
    u = F.normalize(z, dim=1, eps=NORM_EPS) if normalize else z
    if self_case:
        c, candidate_labels = u, labels
        if instance_ids is None:
            instance_ids = default_instance_ids(z.shape[0], z.device)
    else:
        c = F.normalize(candidates, dim=1, eps=NORM_EPS) if normalize else candidates
    s = u @ c.T / temperature
    in_a, in_p = pair_masks(labels, forget_mask, candidate_labels, instance_ids, self_case, ignore_index)

    n_pos = in_p.sum(1)
    counted = n_pos > 0  # anchors without positives contribute nothing
    # Rows that are not counted may have empty sets; give them zeros so that no log(0) (and no
    # NaN gradient) appears. Only masks are used, no data-dependent shapes: torch.compile works.
    def masked(keep):
        return torch.where(counted[:, None], s.masked_fill(~keep, float("-inf")), 0.0)

    lse_a = torch.logsumexp(masked(in_a), dim=1)
    lse_pos = torch.logsumexp(masked(in_p), dim=1)
    mean_pos = (s * in_p).sum(1) / n_pos.clamp(min=1)
    use_lse = forget_mask & (forget_pull == "logsumexp")
    per_anchor = torch.where(counted, lse_a - torch.where(use_lse, lse_pos, mean_pos), 0.0)

    return reduce_anchor_losses(per_anchor, counted, forget_mask, forget_weight, retain_weight, reduction)
