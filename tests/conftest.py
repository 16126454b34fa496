"""Shared test setup: the --device option, hypothesis profiles, tolerance helpers, NaN poisoning.

Kernel tests (marked `interpreter`) run the Triton code: on CUDA, or on CPU when the whole
pytest process runs under TRITON_INTERPRET=1 (it must be set before `kernels` is imported,
so it is set on the command line, never here).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "interp", max_examples=15, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu", max_examples=150, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly", max_examples=1000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_default_profile = "gpu" if torch.cuda.is_available() else "interp"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="device for kernel tests: cuda (default when available) or cpu")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda asked for, but no CUDA device is present")
    return torch.device(name)


@pytest.fixture
def triton_device(device) -> torch.device:
    """The device on which the Triton path runs here, or skip with the reason."""
    from kernels._utils import triton_can_run
    if not triton_can_run(device):
        pytest.skip(f"Triton cannot run on {device}: use a GPU or run pytest with TRITON_INTERPRET=1")
    return device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill every torch.empty / empty_like / new_empty with NaN (floats) or a huge value (ints),
    so an output element a kernel forgot to write fails loudly instead of reading as zero."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    yield


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (computed in float64 / complex128)."""
    a = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64).cpu()
    e = expected.detach().to(torch.complex128 if expected.is_complex() else torch.float64).cpu()
    if not torch.isfinite(a.abs()).all():
        bad = (~torch.isfinite(a.abs())).nonzero()[:5].tolist()
        raise AssertionError(f"non-finite values in the result at {bad}")
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_rel_close(actual, expected, tol: float, name: str = "output") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_error(actual, expected)
    assert err <= tol, f"{name}: max relative error {err:.3e} > {tol:.1e}"
