"""Test setup: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when kernels are decorated, so it is set here, before any test
module imports deepcut_fast.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and tokenizers come from local files only

import pytest  # noqa: E402

from deepcut_fast import BACKENDS, available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = [b for b in BACKENDS if b not in ("auto", "reference")]


def backend_device(backend):
    """The device a backend's tests run on: the CPU kernel on CPU tensors, the others on DEVICE."""
    return torch.device("cpu") if backend == "cpu" else DEVICE


def available_fused_backends():
    """Every fused backend that runs here; one parity suite covers them all."""
    params = []
    for b in FUSED_BACKENDS:
        reason = available_backends(backend_device(b))[b]
        params.append(pytest.param(b, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.fixture(scope="session")
def tok():
    """The real MiniLM tokenizer (offline)."""
    from tiny_models import tokenizer

    return tokenizer()


@pytest.fixture(scope="session")
def original(tok):
    """The toy corpus and the state of a tiny BERT fine-tuned until it memorised it."""
    from tiny_models import fine_tune, tiny_bert, toy_corpus

    data = toy_corpus()
    model = fine_tune(tiny_bert(data.label_names, tok.vocab_size), tok, data)
    return data, model.state_dict()
