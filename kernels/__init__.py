"""Triton kernels of deepcut_fast, importable as ``deepcut_fast.kernels``.

Pure compute: launchers take prepared tensors and return raw per-anchor statistics or
gradients. Autograd, dispatch and argument checks live in the layers above.
"""
