"""Host-side helpers shared by every op: backend dispatch, input checks, autotune configs.

(NVTX ranges: kernels.profiling.nvtx_range, re-exported here; device-side helpers: kernels._jit.)

Nothing here queries CUDA at import time, so the package imports on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass

import torch

from kernels.profiling import nvtx_range  # noqa: F401  (kept importable from here)

BACKENDS = ("auto", "triton", "reference")

_warned: set[str] = set()


def interpreting() -> bool:
    """True when Triton runs its interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device of all tensors, or a ValueError naming them."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on the same device, got {listing}")
    return next(iter(devices.values()))


def choose_backend(op: str, backend: str, device: torch.device) -> str:
    """Resolve backend="auto" | "triton" | "reference" to the path that will run.

    auto: Triton on CUDA (or CPU under TRITON_INTERPRET=1), else the reference, with one warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if triton_can_run(device):
        return "triton"
    if backend == "triton":
        raise ValueError(
            f"{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), "
            f"got a tensor on {device}"
        )
    warn_once(
        f"reference:{op}:{device.type}",
        f"{op}: no GPU for {device} tensors, running the plain-PyTorch reference path "
        f"(set TRITON_INTERPRET=1 before importing kernels to run the Triton code on CPU)",
    )
    return "reference"


def require_complex(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_complex():
            raise ValueError(f"{op}: {name} must be complex (complex64 or complex128), got {t.dtype}")


def check_pair_inputs(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Two complex (..., N) tensors of one op (cauchy's v, w; vandermonde's v, x): same N >= 1,
    leading dims that broadcast. Clear ValueErrors naming them."""
    na, nb = names
    require_complex(op, **{na: a, nb: b})
    if a.dim() < 1 or b.dim() < 1:
        raise ValueError(f"{op}: {na} and {nb} must have shape (..., N), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{op}: {na} and {nb} must have the same N (last dim), got {na} "
                         f"{tuple(a.shape)} and {nb} {tuple(b.shape)}")
    if a.shape[-1] < 1:
        raise ValueError(f"{op}: N must be >= 1, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    try:
        torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except RuntimeError:
        raise ValueError(f"{op}: the leading dims of {na} {tuple(a.shape[:-1])} and {nb} "
                         f"{tuple(b.shape[:-1])} do not broadcast") from None


def configs(all_configs: list) -> list:
    """Autotune configs: the first only under the interpreter (several configs need a driver)."""
    return all_configs[:1] if interpreting() else all_configs


def device_guard(device: torch.device):
    """Launch on the tensors' GPU: Triton launches on the *current* CUDA device, which under
    torchrun or with tensors on cuda:1 is not necessarily theirs."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class GPU:
    """What the host launchers plan a launch for: SM count, compute capability, ROCm or not."""
    sms: int
    capability: tuple[int, int]
    hip: bool = False


H100 = GPU(sms=132, capability=(9, 0))
_assumed: list[GPU | None] = [None]


@contextlib.contextmanager
def assume_gpu(gpu: GPU = H100):
    """Launchers plan for `gpu` instead of asking the driver: compiling ahead of time on meta
    tensors, with no GPU present (scripts/aot_check.py, through kernels.ops.launch_configs)."""
    previous, _assumed[0] = _assumed[0], gpu
    try:
        yield gpu
    finally:
        _assumed[0] = previous


def gpu_for(device: torch.device) -> GPU | None:
    """The GPU a launch on `device` plans for: the assumed one, the CUDA device's, or None
    (the interpreter on CPU)."""
    if _assumed[0] is not None:
        return _assumed[0]
    if device.type != "cuda":
        return None
    return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_gpu(index: int) -> GPU:
    p = torch.cuda.get_device_properties(index)
    return GPU(p.multi_processor_count, (p.major, p.minor), torch.version.hip is not None)
