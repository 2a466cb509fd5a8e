"""torch.compile(fullgraph=True) over a model that calls the loss: no graph break, same result."""
import pytest
import torch
from torch import nn

from batches import make_batch
from conftest import backend_device
from deepcut_fast import ContrastiveUnlearnLoss


class TinyUnlearner(nn.Module):
    """An encoder with dropout, a classifier and the DeepCUT objective, as a training step uses it."""

    def __init__(self, dim, classes, backend):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16))
        self.head = nn.Linear(16, classes)
        self.contrast = ContrastiveUnlearnLoss(temperature=0.2, backend=backend)

    def forward(self, x, labels, forget_mask, instance_ids):
        z = self.encoder(x)
        retain = ~forget_mask
        ce = nn.functional.cross_entropy(self.head(z), torch.where(retain, labels, -100))
        return ce + 0.5 * self.contrast(z, labels, forget_mask, instance_ids)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_compiled_training_step_matches_eager(backend):
    device = backend_device(backend)
    b = make_batch(12, 20, classes=3, views=2, forget_frac=0.3, device=device)
    model = TinyUnlearner(20, 3, backend).to(device).eval()  # eval: same dropout mask in both runs
    args = (b["z"], b["labels"], b["forget_mask"], b["instance_ids"])

    eager = model(*args)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = compiled_model(*args)  # fullgraph=True raises on any graph break
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))

    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fused_op_passes_torch_library_checks(backend):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration."""
    from deepcut_fast import ops

    b = make_batch(9, 12, views=1, n_candidates=10, device=backend_device(backend))
    u = torch.nn.functional.normalize(b["z"]).requires_grad_()
    cand = torch.nn.functional.normalize(b["candidates"]).requires_grad_()
    for candidates, labels in ((None, None), (cand, b["candidate_labels"])):
        args = (u, b["labels"], b["forget_mask"], b["instance_ids"], candidates, labels, 0.2, True, -100, True, backend)
        torch.library.opcheck(ops.contrast_forward, args)
