"""Benchmarks of the recurrent steps kernels.ssm_step and kernels.dplr_step (generation).

H = 256 channels (the paper model's widest tier), N = 32 stored state entries, rank 1, batch 1,
16, 256 (--bench-size small: 1). Providers: triton and reference, one eager call per timed run
(at B = 1 the host cost of a call dominates); triton_graph and reference_graph, 100 steps in one
CUDA graph, us_per_step = replay / 100: what generation sees. Bytes at the floor: the state read
and written, the per-channel constants once, u read and y written (kernels.ops OPS[op].work).
"""
from __future__ import annotations

import pytest
import torch

from bench._common import run_step
from kernels.ops import OPS, lower, step_system

H, N, R = 256, 32, 1
BATCHES = [1, 16, 256]
PROVIDERS = ["triton", "reference", "triton_graph", "reference_graph"]


def _step_inputs(op: str, B: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stable inputs (the state stays bounded over thousands of in-place steps), from the
    registry's factory: S4D-Lin for the diagonal step, a HiPPO-like normal-plus-low-rank system
    (Q = P) for the DPLR step."""
    g = torch.Generator().manual_seed(0)
    consts = step_system(H, N, 0 if op == "ssm_step" else R, generator=g)
    state = torch.randn(B, H, N, generator=g, dtype=torch.complex64).to(device)
    u = torch.randn(B, H, generator=g).to(device)
    return state, u, lower(consts, device)


def _nbytes(op: str, B: int) -> float:
    return OPS[op].work(dict(B=B, H=H, N=N, r=0 if op == "ssm_step" else R), "fwd")[1]


def _bench_step(benchmark, bench_size, op: str, provider: str, B: int):
    if bench_size == "small" and B != 1:
        pytest.skip("--bench-size small: B = 1 only")
    import kernels
    fn_op, backend = getattr(kernels, op), provider.removesuffix("_graph")
    state, u, consts = _step_inputs(op, B, torch.device("cuda"))
    shape = dict(B=B, H=H, N=N) if op == "ssm_step" else dict(B=B, H=H, N=N, r=R)
    with torch.inference_mode():
        run_step(benchmark, lambda: fn_op(state, u, **consts, backend=backend), provider, nbytes=_nbytes(op, B),
                 kernel="_step_fwd_kernel", op=op, direction="fwd", shape=shape, dtype="complex64")


_PARAMS = [pytest.param(p, B, id=f"{p}-B{B}-H{H}-N{N}") for B in BATCHES for p in PROVIDERS]


@pytest.mark.parametrize("provider,B", _PARAMS)
def test_bench_ssm_step_fwd(benchmark, bench_size, provider, B):
    _bench_step(benchmark, bench_size, "ssm_step", provider, B)


@pytest.mark.parametrize("provider,B", _PARAMS)
def test_bench_dplr_step_fwd(benchmark, bench_size, provider, B):
    _bench_step(benchmark, bench_size, "dplr_step", provider, B)
