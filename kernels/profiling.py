"""Profiling helpers that sashimi (and users) may import: NVTX ranges for nsys.

Range names are "sashimi/<part>/<what>" (profiles/README.md lists them); they cost ~nothing
without a profiler attached, and nothing without the nvtx package.
"""
from __future__ import annotations

import contextlib

import torch

try:  # optional dependency
    import nvtx as _nvtx
except Exception:  # pragma: no cover - depends on the environment
    _nvtx = None

__all__ = ["nvtx_range"]


def nvtx_range(name: str):
    """An NVTX range for nsys, a no-op without the nvtx package or while torch.compile traces."""
    if _nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain="sashimi")
