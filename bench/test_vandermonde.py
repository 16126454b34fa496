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

from bench._common import bench_pair
from kernels.ops import OPS


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape_name", list(OPS["vandermonde"].bench))
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_bench_vandermonde(benchmark, bench_size, provider, shape_name, direction):
    bench_pair(benchmark, bench_size, "vandermonde", provider, shape_name, direction)
