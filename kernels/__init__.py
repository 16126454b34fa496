"""Triton kernels for SaShiMi: S4 Cauchy and log-Vandermonde sums, the fused embedding +
stereo interleave, and the recurrent state-space steps.

Every op has a Triton path and a plain-PyTorch reference (`kernels.reference`) with the same
signature; `backend="auto"` picks Triton for CUDA tensors (and for CPU tensors under
TRITON_INTERPRET=1) and the reference otherwise. Importing an op module registers its
`torch.library` custom ops (namespace `sashimi_kernels`). Triton compiles on first use.
"""
from __future__ import annotations

import importlib

from kernels import reference

_OPS = ("cauchy", "vandermonde", "embed_interleave", "ssm_step", "dplr_step")
__all__ = list(_OPS) + ["reference"]

# DEV-ONLY tolerant import while the op modules are being written in parallel; replaced by
# plain `from kernels.<op> import <op>` lines before landing.
for _op in _OPS:
    try:
        globals()[_op] = getattr(importlib.import_module(f"kernels.{_op}"), _op)
    except (ModuleNotFoundError, AttributeError):
        pass
