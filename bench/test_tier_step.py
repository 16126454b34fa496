"""Benchmarks of kernels.tier_step: one generation step of a whole tier of the paper model
(8 layers x [S4 block, FF block]) in one kernel.

The three tiers H = 64, 128, 256 (N = 32, F = 2H), ssm diag and dplr (rank 1), batch 1, 16, 256
(--bench-size small: H = 64, B = 1). Providers: triton (one eager call), reference
(kernels.reference.tier_step, ~100 PyTorch ops), triton_graph (100 steps in one CUDA graph,
us_per_step = replay / 100). Bytes at the floor (bytes_per_step): every parameter once, the state
read and written, x read and y written; weight_bytes: the parameters alone. At B = 1 the kernel
is one CTA, bounded by what one SM pulls from L2, far below the HBM floor.
"""
from __future__ import annotations

import pytest
import torch

from bench._common import run_step
from kernels.ops import lower, tier_params

N, R, N_LAYERS = 32, 1, 8
TIERS = [64, 128, 256]
BATCHES = [1, 16, 256]
SSMS = ["diag", "dplr"]
PROVIDERS = ["triton", "reference", "triton_graph"]


def _tier_inputs(ssm: str, B: int, H: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stable stacked inputs (the states stay bounded over thousands of steps), from the
    registry's factory: S4D-Lin for diag, a HiPPO-like normal-plus-low-rank system (Q = P) for
    dplr, random Linear / LayerNorm weights."""
    g = torch.Generator().manual_seed(0)
    p = lower(tier_params(N_LAYERS, H, N, 2 * H, R if ssm == "dplr" else 0, generator=g), device)
    state = (0.1 * torch.randn(N_LAYERS, B, H, N, generator=g, dtype=torch.complex128)).to(torch.complex64).to(device)
    x = torch.randn(B, H, generator=g).to(device)
    return x, state, p


def _bytes(p: dict, state: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    """(weight bytes, total bytes) moved by one tier step at the floor."""
    weights = sum(v.numel() * v.element_size() for v in p.values())
    return weights, weights + 2 * state.numel() * state.element_size() + 2 * x.numel() * 4


@pytest.mark.parametrize("provider,ssm,H,B", [
    pytest.param(pr, s, H, B, id=f"{pr}-{s}-H{H}-B{B}")
    for s in SSMS for H in TIERS for B in BATCHES for pr in PROVIDERS])
def test_bench_tier_step_fwd(benchmark, bench_size, provider, ssm, H, B):
    if bench_size == "small" and (H != 64 or B != 1):
        pytest.skip("--bench-size small: H = 64, B = 1 only")
    import kernels

    backend = provider.removesuffix("_graph")
    x, state, p = _tier_inputs(ssm, B, H, torch.device("cuda"))
    weight_bytes, nbytes = _bytes(p, state, x)
    shape = dict(B=B, H=H, N=N, F=2 * H, n=N_LAYERS) | (dict(r=R) if ssm == "dplr" else {})

    with torch.inference_mode():
        run_step(benchmark, lambda: kernels.tier_step(x, state, p, ssm, backend=backend), provider, nbytes=nbytes,
                 kernel="_tier_step_fwd_kernel", op="tier_step", direction="fwd", shape=shape, dtype="fp32/complex64")
    benchmark.extra_info.update(weight_bytes=weight_bytes, bytes_per_step=nbytes, ssm=ssm)
