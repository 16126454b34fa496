"""Benchmarks of kernels.cauchy (the S4 Cauchy sum over conjugate pairs).

Shapes (anchors.md): B rows = 4 Woodbury sums x H channels, N = 32 conjugate pairs, L nodes:
(B, L) = (1024, 16384) [the anchor: S4 CUDA ext 0.724 / 2.49 ms, target <= 0.25 / <= 1.0 ms],
(256, 16384), (1024, 65536), (4096, 4096); --bench-size small: (256, 4096). Inputs are S4's
(kernels.cauchy.s4_like_inputs): v (4, H, N) against w = dt Lambda (H, N), broadcast as S4 calls
it, and the first L rfft nodes of a length-2L sequence on the imaginary axis (Nyquist excluded, as
sashimi.s4 does).

Providers: triton (the kernels), reference (kernels.reference.cauchy in complex64, which
materialises (B, N, L): skipped where it would need more than ~20 GiB, estimated as 3 (forward)
or 6 (forward + backward) complex64 buffers of B N L).

What is counted (extra_info gflops and fraction_of_floor at 51.6 TFLOP/s; bytes at 3.0 TB/s):
  flops: per (row, pair, node) term, 14 for the forward (the pair fraction (a z - b) / D with
         z^2 hoisted: 13 fp32 operations and one reciprocal, as in anchors.md) and 28 for the
         backward (the two sums T1, T2 sharing one reciprocal); fwd+bwd = 42. The kernels
         actually issue 16 + 1 (forward) and ~29 + 1 (backward) instructions per term.
  bytes: the output written (B L 8) forward; plus the incoming gradient read (B L 8) backward.
"""
from __future__ import annotations

import pytest
import torch

from bench._common import run
from kernels.ops import OPS

OP = "cauchy"
N = 32
SPEC = OPS[OP]                                      # shapes, work model: the registry's
SHAPES = {k: (v["B"], v["L"]) for k, v in SPEC.bench.items()}
SMALL = list(SHAPES)[-1]                            # --bench-size small
REFERENCE_LIMIT = 20 * 2**30


def _shape(bench_size: str, name: str) -> tuple[int, int]:
    if bench_size == "small" and name != SMALL:
        pytest.skip("--bench-size small: the small shape only")
    return SHAPES[name]


def _inputs(B: int, L: int, requires_grad: bool):
    from kernels.ops import s4_like_inputs

    g = torch.Generator().manual_seed(0)
    v, z, w = s4_like_inputs(B // 4, N, 2 * L, sums=4, generator=g, device="cuda")
    z = z[:L].contiguous()
    return v.requires_grad_(requires_grad), z, w.requires_grad_(requires_grad)


def _work(B: int, L: int, direction: str) -> dict:
    flops, nbytes = SPEC.work(dict(B=B, N=N, L=L), direction)
    return dict(flops=flops, nbytes=nbytes)


def _skip_reference(provider: str, B: int, L: int, buffers: int) -> None:
    need = buffers * B * N * L * 8
    if provider == "reference" and need > REFERENCE_LIMIT:
        pytest.skip(f"the reference would materialise ~{need / 2**30:.0f} GiB of (B, N, L) "
                    f"complex64 (limit {REFERENCE_LIMIT / 2**30:.0f} GiB)")


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_bench_cauchy_fwd(benchmark, bench_size, provider, shape_name):
    from kernels.cauchy import cauchy

    B, L = _shape(bench_size, shape_name)
    _skip_reference(provider, B, L, 3)
    v, z, w = _inputs(B, L, requires_grad=False)
    fn = lambda: cauchy(v, z, w, backend=provider)  # noqa: E731
    with torch.no_grad():
        run(benchmark, fn, op=OP, direction="fwd", provider=provider, shape=dict(B=B, N=N, L=L),
            dtype="complex64", **_work(B, L, "fwd"))


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "reference"])
def test_bench_cauchy_fwdbwd(benchmark, bench_size, provider, shape_name):
    from kernels.cauchy import cauchy

    B, L = _shape(bench_size, shape_name)
    _skip_reference(provider, B, L, 6)
    v, z, w = _inputs(B, L, requires_grad=True)
    G = torch.randn(4, B // 4, L, dtype=torch.complex64, device="cuda")

    def fn():
        return torch.autograd.grad(cauchy(v, z, w, backend=provider), (v, w), G)

    run(benchmark, fn, op=OP, direction="fwdbwd", provider=provider, shape=dict(B=B, N=N, L=L),
        dtype="complex64", **_work(B, L, "fwdbwd"))
