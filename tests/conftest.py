"""Test setup: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when kernels are decorated, so it is set here, before any test
module imports deepcut_fast.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from deepcut_fast import ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = [b for b in ops.BACKENDS if b not in ("auto", "reference")]


def available_fused_backends():
    """Every fused backend that runs here; one parity suite covers them all."""
    return [pytest.param(b, marks=pytest.mark.skipif(
        ops.backend_unavailable_reason(b, DEVICE, torch.float32) is not None,
        reason=str(ops.backend_unavailable_reason(b, DEVICE, torch.float32))))
        for b in FUSED_BACKENDS]
