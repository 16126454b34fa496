"""Benchmarks of the recurrent steps kernels.ssm_step and kernels.dplr_step (generation).

Shapes: H = 256 channels (the widest tier of the paper model), N = 32 stored state entries
(d_state 64 as conjugate pairs), rank r = 1, batch B in {1, 16, 256}; --bench-size small: B = 1.

Providers:
  triton, reference            one eager call per timed run (the host-side cost of a call is
                                in the time: at B = 1 it is what dominates)
  triton_graph, reference_graph 100 steps captured in one torch.cuda.CUDAGraph, one replay per
                                timed run; extra_info["us_per_step"] = replay time / 100 is the
                                number generation sees (anchors.md: ~1.18 us per graph kernel)

nbytes per step (the floor): the state read and written (2 x B H N x 8 bytes), the per-channel
constants read once (ssm: dA, dB, C; dplr: dA, dB, C, P, Q, W: 8 bytes each per (H, N) entry per
rank, plus D), u read and y written (4 bytes per (B, H)).
"""
from __future__ import annotations

import pytest
import torch

from bench._common import capture_graph, run
from kernels.ops import OPS, lower, step_system

H, N, R = 256, 32, 1
BATCHES = [1, 16, 256]
PROVIDERS = ["triton", "reference", "triton_graph", "reference_graph"]
GRAPH_STEPS = 100


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

    fn_op = getattr(kernels, op)
    backend = provider.removesuffix("_graph")
    state, u, consts = _step_inputs(op, B, torch.device("cuda"))
    shape = dict(B=B, H=H, N=N) if op == "ssm_step" else dict(B=B, H=H, N=N, r=R)
    nbytes = _nbytes(op, B)

    with torch.inference_mode():
        def one_step():
            return fn_op(state, u, **consts, backend=backend)

        if not provider.endswith("_graph"):
            p50 = run(benchmark, one_step, op=op, direction="fwd", provider=provider, shape=shape,
                      dtype="complex64", nbytes=nbytes)
            benchmark.extra_info["us_per_step"] = p50 * 1e3
            _record_config(benchmark, op, backend)
            return

        graph = capture_graph(one_step, GRAPH_STEPS)
        p50 = run(benchmark, graph.replay, op=op, direction="fwd", provider=provider, shape=shape,
                  dtype="complex64", nbytes=GRAPH_STEPS * nbytes)
        benchmark.extra_info["steps_per_replay"] = GRAPH_STEPS
        benchmark.extra_info["us_per_step"] = p50 * 1e3 / GRAPH_STEPS
        benchmark.group = benchmark.group + f"-graph{GRAPH_STEPS}"
        _record_config(benchmark, op, backend)


def _record_config(benchmark, op: str, backend: str) -> None:
    """The autotuner's choice (BLOCK_H, ROWS, num_warps) for the Triton provider."""
    if backend != "triton":
        return
    from kernels._step import _step_fwd_kernel  # ssm_step and dplr_step: one kernel, R = rank

    best = getattr(_step_fwd_kernel, "best_config", None)
    benchmark.extra_info["best_config"] = str(best)


_PARAMS = [pytest.param(p, B, id=f"{p}-B{B}-H{H}-N{N}") for B in BATCHES for p in PROVIDERS]


@pytest.mark.parametrize("provider,B", _PARAMS)
def test_bench_ssm_step_fwd(benchmark, bench_size, provider, B):
    _bench_step(benchmark, bench_size, "ssm_step", provider, B)


@pytest.mark.parametrize("provider,B", _PARAMS)
def test_bench_dplr_step_fwd(benchmark, bench_size, provider, B):
    _bench_step(benchmark, bench_size, "dplr_step", provider, B)
