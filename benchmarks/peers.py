"""Workloads and the methods that compute them, for the benchmark sweep.

A workload is one batch of the loss's inputs; a method turns it into a differentiable scalar.
Peers only appear on the workloads where they compute exactly the same thing:

- ``supcon`` (retain-only batch, self case): pytorch-metric-learning's ``SupConLoss`` equals
  this loss with no forget rows. Both normalise the rows; anchor i contrasts with every other
  row (A(i)) and averages the log-probability of its same-label rows (P(i)); anchors without
  positives drop out of the mean. Checked numerically in benchmarks/test_peers.py.
- ``one_positive`` (candidates given, unique labels 0..M-1 for anchors and candidates): the
  loss reduces to InfoNCE with one positive per row, ``LSE_j s_ij - s_ii``. Inf-CL
  (``inf_cl.cal_inf_loss(q, k, scale=1/tau)``) computes exactly that on unit rows (CUDA only).
- ``self`` and ``candidates``: DeepCUT batches (10% forget, 2 views, 20 classes); only this
  package's backends, the eager reference and torch.compile of the reference compute them.
"""
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from deepcut_fast import available_backends, contrastive_unlearn_loss, contrastive_unlearn_loss_reference
from deepcut_fast.testing import synthetic_batch

WORKLOADS = ("self", "candidates", "supcon", "one_positive")
TEMPERATURE = 0.1
CLASSES = 20
VIEWS = 2


@dataclass
class Workload:
    name: str
    z: torch.Tensor
    labels: torch.Tensor
    forget_mask: torch.Tensor
    instance_ids: Optional[torch.Tensor]
    candidates: Optional[torch.Tensor]
    candidate_labels: Optional[torch.Tensor]

    @property
    def shape(self):
        """(M anchors, N candidates, D)."""
        n = self.z.shape[0] if self.candidates is None else self.candidates.shape[0]
        return self.z.shape[0], n, self.z.shape[1]

    def loss_kwargs(self):
        return dict(instance_ids=self.instance_ids, candidates=self.candidates,
                    candidate_labels=self.candidate_labels, temperature=TEMPERATURE)


def make_workload(name, rows, dim, dtype, device, seed=0):
    """`rows` anchors (and as many candidates where the workload has a bank) of size `dim`."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def ints(high, n):
        return torch.randint(0, high, (n,), generator=g).to(device)

    no_forget = torch.zeros(rows, dtype=torch.bool, device=device)
    if name in ("self", "candidates"):
        views = VIEWS if name == "self" else 1
        b = synthetic_batch(rows // views, dim, views=views, classes=CLASSES, forget_fraction=0.1,
                            candidates=rows if name == "candidates" else None, seed=seed, device=device, dtype=dtype)
        return Workload(name, b["z"], b["labels"], b["forget_mask"], b["instance_ids"], b.get("candidates"),
                        b.get("candidate_labels"))
    if name == "supcon":
        return Workload(name, rand(rows, dim), ints(CLASSES, rows), no_forget, None, None, None)
    if name == "one_positive":
        unique = torch.arange(rows, device=device)
        return Workload(name, rand(rows, dim), unique, no_forget, None, rand(rows, dim), unique.clone())
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


@dataclass
class Method:
    name: str
    workloads: tuple
    unavailable: Callable  # (device, dtype) -> reason or None
    build: Callable  # () -> loss function of a Workload with grad-requiring leaves


def _backend(name):
    return Method(
        name=name, workloads=WORKLOADS,
        unavailable=lambda device, dtype: available_backends(device, dtype)[name],
        build=lambda: lambda w: contrastive_unlearn_loss(w.z, w.labels, w.forget_mask, backend=name, **w.loss_kwargs()))


def _reference(compiled):
    def build():
        fn = torch.compile(contrastive_unlearn_loss_reference) if compiled else contrastive_unlearn_loss_reference
        return lambda w: fn(w.z, w.labels, w.forget_mask, **w.loss_kwargs())

    return Method("reference_compiled" if compiled else "reference", WORKLOADS, lambda device, dtype: None, build)


def _pml_unavailable(device, dtype):
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError as err:
        return f"pytorch-metric-learning is not installed ({err})"
    return None


def _pml_build():
    from pytorch_metric_learning.losses import SupConLoss

    loss = SupConLoss(temperature=TEMPERATURE)
    return lambda w: loss(w.z, w.labels)


def _infcl_unavailable(device, dtype):
    if device.type != "cuda":
        return "Inf-CL's Triton kernels run on CUDA only"
    try:
        import inf_cl  # noqa: F401
    except ImportError as err:
        return f"inf-cl is not installed ({err})"
    return None


def _infcl_build():
    from inf_cl import cal_inf_loss

    def loss(w):
        # Inf-CL takes unit rows and a logit scale; its head_dim must divide D
        head_dim = functools.reduce(lambda best, h: h if w.z.shape[1] % h == 0 else best, (16, 32, 64, 128, 256), None)
        return cal_inf_loss(F.normalize(w.z, dim=1), F.normalize(w.candidates, dim=1),
                            scale=1.0 / TEMPERATURE, head_dim=head_dim)

    return loss


METHODS = {m.name: m for m in [
    _backend("triton"), _backend("cpu"), _reference(False), _reference(True),
    Method("supcon_pml", ("supcon",), _pml_unavailable, _pml_build),
    Method("inf_cl", ("one_positive",), _infcl_unavailable, _infcl_build),
]}
