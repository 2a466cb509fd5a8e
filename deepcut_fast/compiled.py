"""The compiled CPU kernel of csrc/ (``deepcut_fast._C``) behind the same interface as the
Triton launchers: ``forward(...)`` and ``backward(...)``."""
from types import SimpleNamespace

import torch  # noqa: F401  (the extension needs torch's symbols loaded first)

# The CPU backward may keep one fp32 copy of the candidate gradient per thread (one pass
# instead of two over the pairs) while the copies stay under this many bytes.
CPU_PER_THREAD_BUDGET_BYTES = float(1 << 30)
INSTALL_HINT = "build it with: pip install --no-build-isolation -e .  (from the repository root)"

try:
    from deepcut_fast import _C
except ImportError as err:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"the compiled extension deepcut_fast._C is missing ({err}); {INSTALL_HINT}"
else:
    _IMPORT_ERROR = None


def unavailable_reason():
    """Why the compiled CPU kernel cannot run, or None."""
    return _IMPORT_ERROR


# The CPU kernel keeps a running maximum whatever the rows are: the contract's ``unit_rows``
# is not passed on.
def _forward(*args):
    *inputs, _unit_rows = args
    return _C.cpu_forward(*inputs)


def _backward(*args):
    *inputs, _unit_rows, need_anchor_grad, need_candidate_grad = args
    return tuple(_C.cpu_backward(*inputs, need_anchor_grad, need_candidate_grad, CPU_PER_THREAD_BUDGET_BYTES))


def kernels() -> SimpleNamespace:
    """forward/backward of the compiled CPU kernel (raises if it is unavailable)."""
    if _C is None:
        raise ImportError(_IMPORT_ERROR)
    return SimpleNamespace(forward=_forward, backward=_backward)
