"""Benchmarks of kernels.tier_step: one generation step of a whole tier of the paper model
(8 layers x [S4 block, FF block]) in one kernel.

Shapes: the three tiers of the paper model, H = 64 (every step), 128 (every 4th), 256 (every
16th); N = 32 stored state entries (d_state 64), F = 2H, n_layers = 8, ssm "diag" and "dplr"
(rank 1); batch B in {1, 16, 256}. --bench-size small: H = 64, B = 1.

Providers:
  triton         one eager call per timed run (host cost included: at B = 1 it dominates)
  reference      kernels.reference.tier_step, eager (~100 PyTorch ops per tier step)
  triton_graph   100 tier steps captured in one torch.cuda.CUDAGraph, one replay per timed run;
                 extra_info["us_per_step"] = replay time / 100: what generation sees

nbytes per step (the memory floor, bytes_per_step in extra_info): every parameter once (the
weights: 6 H^2 fp32 matrix entries per layer, the S4 constants 8 bytes per complex (H, N) entry:
dA, dB, C, plus P, Q, W for dplr, the norms, biases, D), the state read and written
(2 x n B H N x 8 bytes), x read and y written. weight_bytes in extra_info is the parameters only.
At B = 1 the kernel is one CTA: expect it to sit far below the HBM floor and be bounded by what
one SM pulls from L2 (~0.1 TB/s) plus a few dependent round trips per block (see the report).
"""
from __future__ import annotations

import pytest
import torch

from bench._common import capture_graph, run
from kernels.ops import lower, tier_params

N, R, N_LAYERS = 32, 1, 8
TIERS = [64, 128, 256]
BATCHES = [1, 16, 256]
SSMS = ["diag", "dplr"]
PROVIDERS = ["triton", "reference", "triton_graph"]
GRAPH_STEPS = 100


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
        def one_step():
            return kernels.tier_step(x, state, p, ssm, backend=backend)

        if provider.endswith("_graph"):
            graph = capture_graph(one_step, GRAPH_STEPS)
            p50 = run(benchmark, graph.replay, op="tier_step", direction="fwd", provider=provider,
                      shape=shape, dtype="fp32/complex64", nbytes=GRAPH_STEPS * nbytes)
            us_per_step = p50 * 1e3 / GRAPH_STEPS
            benchmark.extra_info["steps_per_replay"] = GRAPH_STEPS
            benchmark.group = benchmark.group + f"-graph{GRAPH_STEPS}"
        else:
            p50 = run(benchmark, one_step, op="tier_step", direction="fwd", provider=provider,
                      shape=shape, dtype="fp32/complex64", nbytes=nbytes)
            us_per_step = p50 * 1e3
    benchmark.extra_info.update(us_per_step=us_per_step, weight_bytes=weight_bytes,
                                bytes_per_step=nbytes, ssm=ssm)
    if backend == "triton":
        from kernels.tier_step import _tier_step_fwd_kernel
        benchmark.extra_info["best_config"] = str(getattr(_tier_step_fwd_kernel, "best_config", None))
