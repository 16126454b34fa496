"""Benchmarks of kernels.vandermonde (the S4D log-Vandermonde sum), Triton against the reference,
at the registry's bench shapes (kernels.ops.OPS["vandermonde"].bench; the last one is
--bench-size small), on S4D-Lin inputs (bench._common.pair_case).

Counted: 7 FLOPs per (n, l) term forward (a complex multiply and the real part), 14 backward
(gflops in extra_info). The Triton kernel runs the sum as tf32x3 tensor-core GEMMs, not bound by
the CUDA-core fp32 peak, so its floor is the memory one: the (B, L) fp32 output written (and the
incoming gradient read backward). The reference materialises (B, N, L) complex64: skipped where
that would need more than ~20 GiB.
"""
from __future__ import annotations

import pytest

from bench._common import N_PAIRS, pair_case, run
from kernels.ops import OPS

SHAPES = {k: (v["B"], v["L"]) for k, v in OPS["vandermonde"].bench.items()}
SMALL = list(SHAPES)[-1]
REFERENCE_LIMIT = 20 * 2**30


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_bench_vandermonde(benchmark, bench_size, provider, shape_name, direction):
    if (bench_size == "small") != (shape_name == SMALL):
        pytest.skip(f"{shape_name} is not in the {bench_size!r} bench size")
    B, L = SHAPES[shape_name]
    need = (3 if direction == "fwd" else 6) * B * N_PAIRS * L * 8
    if provider == "reference" and need > REFERENCE_LIMIT:
        pytest.skip(f"the reference would materialise ~{need / 2**30:.0f} GiB of (B, N, L) complex64")
    fn, work = pair_case("vandermonde", direction, provider, B, L, "cuda")
    run(benchmark, fn, op="vandermonde", direction=direction, provider=provider,
        shape=dict(B=B, N=N_PAIRS, L=L), dtype="complex64", **work)
