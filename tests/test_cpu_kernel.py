"""Internals of the compiled CPU kernel that the public parity suite cannot reach."""
import pytest
import torch

from batches import make_batch
from deepcut_fast import available_backends, compiled, ops

pytestmark = pytest.mark.skipif(available_backends()["cpu"] is not None, reason=str(available_backends()["cpu"]))


@pytest.mark.parametrize("candidates", [None, 300])
def test_second_pass_equals_per_thread_buffers(candidates):
    """Budget 0 forces the two-pass candidate gradient; it must equal the one-pass result."""
    b = make_batch(150, 40, views=2, n_candidates=candidates, forget_frac=0.3, ignore_frac=0.1)
    u = torch.nn.functional.normalize(b["z"])
    c = None if candidates is None else torch.nn.functional.normalize(b["candidates"])
    args = (u, b["labels"], b["forget_mask"], b["instance_ids"], c, b.get("candidate_labels"), 0.2, True, -100)
    loss, lse_a, lse_p, count = compiled._C.cpu_forward(*args)
    grad = torch.linspace(-1, 2, u.shape[0])
    backward_args = (grad, *args[:6], lse_a, lse_p, count, 0.2, True, -100, True, candidates is not None)
    one_pass = compiled._C.cpu_backward(*backward_args, float(1 << 30))
    two_pass = compiled._C.cpu_backward(*backward_args, 0.0)
    for got, want in zip(two_pass, one_pass):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_uses_cpu_kernel():
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "cpu"
