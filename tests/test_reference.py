"""The reference against docs/spec.md read literally (a pair-by-pair loop), plus properties of the loss."""
import math

import pytest
import torch

from batches import make_batch
from deepcut_fast import contrastive_unlearn_loss_reference as reference


def spec_loop(z, labels, forget, inst, cand, cand_labels, tau, pull, fw, rw, reduction):
    """docs/spec.md, section 2, transcribed loop by loop, in float64 Python numbers."""
    def unit(row):
        norm = max(math.sqrt(sum(x * x for x in row)), 1e-12)
        return [x / norm for x in row]

    u = [unit(row) for row in z.tolist()]
    self_case = cand is None
    if self_case:
        c, cy, cf = u, labels.tolist(), forget.tolist()
    else:
        c, cy, cf = [unit(row) for row in cand.tolist()], cand_labels.tolist(), [False] * len(cand)
    y, f, ids = labels.tolist(), forget.tolist(), inst.tolist()
    losses, groups = [], []
    for i in range(len(u)):
        if y[i] == -100:
            losses.append(0.0)
            groups.append(None)
            continue
        A, P = [], []
        for j in range(len(c)):
            if cy[j] == -100:
                continue
            if self_case and (j == i or (f[i] and ids[j] == ids[i])):
                continue
            s = sum(a * b for a, b in zip(u[i], c[j])) / tau
            if not f[i]:
                if not cf[j]:
                    A.append(s)
                    if cy[j] == y[i]:
                        P.append(s)
            elif not cf[j] or cy[j] == y[i]:
                A.append(s)
                if not cf[j] and cy[j] != y[i]:
                    P.append(s)
        if not P:
            losses.append(0.0)
            groups.append(None)
            continue
        lse = lambda xs: max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs))  # noqa: E731
        pull_term = lse(P) if f[i] and pull == "logsumexp" else sum(P) / len(P)
        losses.append(lse(A) - pull_term)
        groups.append("forget" if f[i] else "retain")
    if reduction == "none":
        return losses
    total = 0.0
    for group, weight in (("forget", fw), ("retain", rw)):
        members = [l for l, g in zip(losses, groups) if g == group]
        if members:
            total += weight * (sum(members) / len(members) if reduction == "mean" else sum(members))
    return total


@pytest.mark.parametrize("pull", ["logsumexp", "mean"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("candidates", [False, True])
def test_reference_equals_spec_loop(pull, reduction, candidates):
    b = make_batch(9, 5, classes=3, views=2, forget_frac=0.4, ignore_frac=0.15,
                   n_candidates=11 if candidates else None, seed=3, dtype=torch.float64)
    options = dict(temperature=0.3, forget_pull=pull, forget_weight=0.7, retain_weight=1.3,
                   reduction=reduction)
    got = reference(**b, **options)
    want = spec_loop(b["z"], b["labels"], b["forget_mask"], b["instance_ids"], b.get("candidates"),
                     b.get("candidate_labels"), 0.3, pull, 0.7, 1.3, reduction)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("candidates", [False, True])
def test_reference_gradients_are_correct(candidates):
    b = make_batch(5, 4, classes=2, views=2, forget_frac=0.4, n_candidates=6 if candidates else None,
                   seed=1, dtype=torch.float64)
    leaves = [b["z"].requires_grad_()] + ([b["candidates"].requires_grad_()] if candidates else [])
    fn = lambda *xs: reference(xs[0], b["labels"], b["forget_mask"], instance_ids=b["instance_ids"],  # noqa: E731
                               candidates=xs[1] if candidates else None,
                               candidate_labels=b.get("candidate_labels"), temperature=0.5)
    assert torch.autograd.gradcheck(fn, leaves)


def test_retain_anchors_never_see_forget_rows():
    b = make_batch(12, 6, views=2, forget_frac=0.4, seed=2, dtype=torch.float64)
    before = reference(**b, reduction="none")
    moved = dict(b, z=b["z"].clone())
    moved["z"][b["forget_mask"]] = torch.randn(int(b["forget_mask"].sum()), 6, dtype=torch.float64)
    after = reference(**moved, reduction="none")
    retain = ~b["forget_mask"]
    torch.testing.assert_close(after[retain], before[retain])
    assert not torch.allclose(after[~retain], before[~retain])


def test_forget_gradient_pushes_away_from_own_class():
    """One gradient step on the forget anchor lowers its similarity to its own class."""
    z = torch.tensor([[1.0, 0.1], [0.9, -0.2], [0.0, 1.0], [0.1, 0.9]], dtype=torch.float64,
                     requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    forget = torch.tensor([True, False, False, False])
    reference(z, labels, forget, temperature=0.5, forget_weight=1.0, retain_weight=0.0).backward()
    stepped = z.detach() - 0.01 * z.grad
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0)  # noqa: E731
    assert cos(stepped[0], z[1].detach()) < cos(z[0].detach(), z[1].detach())
    assert cos(stepped[0], z[2].detach()) > cos(z[0].detach(), z[2].detach())
