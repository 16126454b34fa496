"""Benchmarks of kernels.cauchy (the S4 Cauchy sum over conjugate pairs), Triton against the
reference, at the registry's bench shapes (kernels.ops.OPS["cauchy"].bench; the last one is
--bench-size small), on S4's inputs (bench._common.pair_case).

Counted (extra_info gflops, fraction_of_floor): 14 FLOPs per (row, pair, node) term forward (the
pair fraction (a z - b) / D with z^2 hoisted: 13 fp32 operations and one reciprocal) and 28
backward; bytes: the output written, plus the incoming gradient read backward. The reference
materialises (B, N, L) complex64: skipped where that would need more than ~20 GiB.
"""
from __future__ import annotations

import pytest

from bench._common import bench_pair
from kernels.ops import OPS


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape_name", list(OPS["cauchy"].bench))
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_bench_cauchy(benchmark, bench_size, provider, shape_name, direction):
    bench_pair(benchmark, bench_size, "cauchy", provider, shape_name, direction)
