"""Synthetic inputs of the loss, for tests, benchmarks and ``deepcut-fast check``."""
from typing import Optional

import torch


def synthetic_batch(samples: int, dim: int, *, views: int = 1, classes: int = 3, forget_fraction: float = 0.3,
                    ignore_fraction: float = 0.0, candidates: Optional[int] = None, class_separation: float = 0.0,
                    view_noise: float = 0.3, whole_class: Optional[int] = None, seed: int = 0, device="cpu",
                    dtype=torch.float32) -> dict:
    """Keyword inputs of ``contrastive_unlearn_loss`` for ``samples`` x ``views`` rows of size ``dim``.

    The views of a sample are noisy copies (``view_noise``) of one embedding, like dropout passes
    of one text, and share its label, forget flag and instance id. Sample embeddings are standard
    normal around a per-class centre scaled by ``class_separation`` (0: no class structure).
    A ``forget_fraction`` of the samples is forgotten, or every sample of ``whole_class``;
    an ``ignore_fraction`` of the rows (and of the candidates) is labelled -100. With
    ``candidates=N`` the batch also has a bank of N random retain rows and their labels.
    Returns a dict with z, labels, forget_mask, instance_ids (and candidates, candidate_labels).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, dim, generator=g)
    noise = view_noise * torch.randn(samples * views, dim, generator=g)
    sample_labels = torch.randint(0, classes, (samples,), generator=g)
    sample_forget = torch.rand(samples, generator=g) < forget_fraction
    if whole_class is not None:
        sample_forget = sample_labels == whole_class
    labels = sample_labels.repeat_interleave(views)
    labels[torch.rand(samples * views, generator=g) < ignore_fraction] = -100
    batch = dict(labels=labels, forget_mask=sample_forget.repeat_interleave(views),
                 instance_ids=torch.arange(samples).repeat_interleave(views))
    if candidates is not None:
        candidate_labels = torch.randint(0, classes, (candidates,), generator=g)
        candidate_labels[torch.rand(candidates, generator=g) < ignore_fraction] = -100
        batch.update(candidates=torch.randn(candidates, dim, generator=g).to(dtype),
                     candidate_labels=candidate_labels)
    if class_separation:  # drawn last: the other draws do not depend on it
        base = base + class_separation * torch.randn(classes, dim, generator=g)[sample_labels]
    batch["z"] = (base.repeat_interleave(views, 0) + noise).to(dtype)
    return {k: v.to(device) for k, v in batch.items()}
