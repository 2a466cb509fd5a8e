"""The compiled kernels of csrc/ (``deepcut_fast._C``) behind the same interface as the
Triton launchers: ``forward(...)`` and ``backward(...)`` of ``cpu`` and ``cuda``."""
from types import SimpleNamespace

import torch  # the extension needs torch's symbols loaded first

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


def unavailable_reason(device_type: str):
    """Why the compiled kernel for this device type cannot run, or None."""
    if _C is None:
        return _IMPORT_ERROR
    if device_type == "cuda" and not _C.with_cuda:
        return f"deepcut_fast._C was built without CUDA (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return None


def _cpu_backward(*args):
    return tuple(_C.cpu_backward(*args, CPU_PER_THREAD_BUDGET_BYTES))


def _cuda_backward(*args):
    return tuple(_C.cuda_backward(*args))


def kernels(device_type: str) -> SimpleNamespace:
    """forward/backward of the compiled kernel for 'cpu' or 'cuda' (raises if unavailable)."""
    reason = unavailable_reason(device_type)
    if reason is not None:
        raise ImportError(reason)
    backward = _cpu_backward if device_type == "cpu" else _cuda_backward
    return SimpleNamespace(forward=getattr(_C, f"{device_type}_forward"), backward=backward)
