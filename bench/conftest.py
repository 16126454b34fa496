"""Benchmarks need a CUDA device (triton.testing.do_bench needs a driver): without one,
every benchmark is skipped with the reason and `pytest bench --benchmark-only` exits 0."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; none is present on this machine")
    for item in items:
        item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--bench-size", default="full", choices=("small", "full"),
                     help="small: a quick pass (< 1 minute); full: the anchor sizes")


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU and library versions in the JSON's machine_info (bench.compare refuses other GPUs)."""
    import triton
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    if torch.cuda.is_available():
        machine_info["gpu_name"] = torch.cuda.get_device_name()
