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

from bench._common import N_PAIRS, pair_case, run
from kernels.ops import OPS

SHAPES = {k: (v["B"], v["L"]) for k, v in OPS["cauchy"].bench.items()}
SMALL = list(SHAPES)[-1]
REFERENCE_LIMIT = 20 * 2**30


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_bench_cauchy(benchmark, bench_size, provider, shape_name, direction):
    if (bench_size == "small") != (shape_name == SMALL):
        pytest.skip(f"{shape_name} is not in the {bench_size!r} bench size")
    B, L = SHAPES[shape_name]
    need = (3 if direction == "fwd" else 6) * B * N_PAIRS * L * 8
    if provider == "reference" and need > REFERENCE_LIMIT:
        pytest.skip(f"the reference would materialise ~{need / 2**30:.0f} GiB of (B, N, L) complex64")
    fn, work = pair_case("cauchy", direction, provider, B, L, "cuda")
    run(benchmark, fn, op="cauchy", direction=direction, provider=provider, shape=dict(B=B, N=N_PAIRS, L=L),
        dtype="complex64", **work)
