"""A MoCo-style queue of recent retain embeddings, usable as the loss's ``candidates``.

Each step pushes the batch's retain rows (detached: the bank carries no gradient) and the
oldest rows fall out once ``size`` is reached, so anchors meet many more retain samples than
one batch holds, at no encoder cost.
"""
import torch


class RetainQueue:
    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size must be an int >= 1, got {size!r}")
        self.size = size
        self.embeddings = None  # [n, D], oldest first
        self.labels = None  # [n]

    def __len__(self):
        return 0 if self.labels is None else self.labels.shape[0]

    @torch.no_grad()
    def push(self, z, labels, forget_mask, ignore_index=-100):
        """Enqueue the retain rows of a batch (not forget, label not ``ignore_index``)."""
        keep = ~forget_mask & (labels != ignore_index)
        rows, row_labels = z.detach()[keep], labels[keep]
        if self.labels is not None:
            rows, row_labels = torch.cat([self.embeddings, rows]), torch.cat([self.labels, row_labels])
        self.embeddings, self.labels = rows[-self.size:].clone(), row_labels[-self.size:].clone()

    def candidates(self):
        """(embeddings [n, D], labels [n]) for ``contrastive_unlearn_loss(candidates=...,
        candidate_labels=...)``, or (None, None) while empty."""
        return (None, None) if not len(self) else (self.embeddings, self.labels)

    def state_dict(self):
        return dict(size=self.size, embeddings=self.embeddings, labels=self.labels)

    def load_state_dict(self, state):
        self.size, self.embeddings, self.labels = state["size"], state["embeddings"], state["labels"]
