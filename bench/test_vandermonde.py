"""Benchmarks of kernels.vandermonde (S4D log-Vandermonde): forward and forward+backward, Triton
against the plain-PyTorch reference, at the anchor sizes (shared/anchors.md: N = 32 pairs,
B x L = 1024 x 16384, 256 x 16384, 1024 x 65536, 4096 x 4096), on S4D-Lin inputs.

What is counted. Useful work per (n, l) term: forward 7 FLOPs (the power-recurrence minimum: a
complex multiply, 6, and adding the real part, 1), backward 14 (the complex multiply, plus the
complex-by-real multiply-adds of g E and g l E, 4 + 4), so forward+backward 21. extra_info
carries those as `gflops` and, for reference, `fp32_floor_ms` (that work at the H100's 51.6
TFLOP/s fp32 CUDA-core peak: 0.073 ms forward at the first anchor). The Triton kernel runs the
sum as tf32x3 tensor-core GEMMs, which are not bound by that CUDA-core peak, so the floor it is
measured against (`floor_ms`, `fraction_of_floor`, `gbps`) is the memory one: forward writes the
(B, L) fp32 output, forward+backward also reads the (B, L) incoming gradient.
"""
from __future__ import annotations

import pytest
import torch

from bench._common import H100_FP32_FLOPS, run
from kernels.ops import OPS, make_s4d_inputs
from kernels.vandermonde import vandermonde

N = 32
_SHAPES = [(v["B"], v["L"]) for v in OPS["vandermonde"].bench.values()]   # the registry's
FULL_SHAPES, SMALL_SHAPES = _SHAPES[:-1], _SHAPES[-1:]                     # last: --bench-size small
REFERENCE_LIMIT = 20 * 2 ** 30  # bytes
FLOPS_PER_TERM = {d: OPS["vandermonde"].work(dict(B=1, N=1, L=1), d)[0] for d in ("fwd", "fwdbwd")}


def _params():
    return [pytest.param(provider, B, L, id=f"{provider}-B{B}-N{N}-L{L}")
            for B, L in FULL_SHAPES + SMALL_SHAPES for provider in ("triton", "reference")]


def _reference_bytes(B, L, direction):
    """The reference materialises (B, N, L) complex64 tensors: ~3 live in the forward, ~6 with
    the saved tensors and gradients of the backward."""
    return (3 if direction == "fwd" else 6) * B * N * L * 8


def _setup(bench_size, provider, B, L, direction):
    if ((B, L) in SMALL_SHAPES) != (bench_size == "small"):
        pytest.skip(f"shape B={B} L={L} is not in the {bench_size!r} bench size")
    if provider == "reference" and _reference_bytes(B, L, direction) > REFERENCE_LIMIT:
        gib = _reference_bytes(B, L, direction) / 2 ** 30
        pytest.skip(f"the reference would need ~{gib:.0f} GiB (materialises (B, N, L))")
    v, x = make_s4d_inputs((B,), N, "lin", generator=torch.Generator().manual_seed(0),
                           device="cuda")
    return v, x


def _record(benchmark, direction, B, L):
    terms = B * N * L
    flops = FLOPS_PER_TERM[direction] * terms
    ms = benchmark.extra_info["ms_p50"]
    benchmark.extra_info.update(
        flops_per_term=FLOPS_PER_TERM[direction],
        gflops=flops / (ms * 1e-3) / 1e9,
        fp32_floor_ms=flops / H100_FP32_FLOPS * 1e3,
    )


@pytest.mark.parametrize("provider, B, L", _params())
def test_bench_vandermonde_fwd(benchmark, bench_size, provider, B, L):
    v, x = _setup(bench_size, provider, B, L, "fwd")

    def fn():
        with torch.no_grad():
            return vandermonde(v, x, L, backend=provider)

    run(benchmark, fn, op="vandermonde", direction="fwd", provider=provider,
        shape=dict(B=B, N=N, L=L), dtype="complex64",
        nbytes=B * L * 4 + 2 * B * N * 8)
    _record(benchmark, "fwd", B, L)


@pytest.mark.parametrize("provider, B, L", _params())
def test_bench_vandermonde_fwdbwd(benchmark, bench_size, provider, B, L):
    v, x = _setup(bench_size, provider, B, L, "fwdbwd")
    v.requires_grad_()
    x.requires_grad_()
    g = torch.randn(B, L, device="cuda")

    def fn():
        return torch.autograd.grad(vandermonde(v, x, L, backend=provider), (v, x), g)

    run(benchmark, fn, op="vandermonde", direction="fwdbwd", provider=provider,
        shape=dict(B=B, N=N, L=L), dtype="complex64",
        nbytes=2 * B * L * 4 + 6 * B * N * 8)
    _record(benchmark, "fwdbwd", B, L)
