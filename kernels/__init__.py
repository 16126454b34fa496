"""Triton kernels for SaShiMi: S4 Cauchy and log-Vandermonde sums, the fused embedding +
stereo interleave, the joint per-frame embedding (the `frames` stereo layout), and the recurrent
state-space steps.

Every op has a Triton path and a plain-PyTorch reference (`kernels.reference`) with the same
signature; `backend="auto"` picks Triton for CUDA tensors (and for CPU tensors under
TRITON_INTERPRET=1) and the reference otherwise. Importing an op module registers its
`torch.library` custom ops (namespace `sashimi_kernels`). Triton compiles on first use.
"""
from __future__ import annotations

from kernels import reference
from kernels.cauchy import cauchy
from kernels.dplr_step import dplr_step
from kernels.embed_frames import embed_frames
from kernels.embed_interleave import embed_interleave
from kernels.ssm_step import ssm_step
from kernels.tier_step import tier_step
from kernels.vandermonde import vandermonde

__all__ = ["cauchy", "vandermonde", "embed_interleave", "embed_frames", "ssm_step", "dplr_step", "tier_step",
           "reference"]
