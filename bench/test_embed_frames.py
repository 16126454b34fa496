"""Benchmarks of kernels.embed_frames (the joint per-frame embedding: the `frames` layout's encoder).

Bench shape (the registry's): B=16, L=32000, C=2, D=64, V=256, the same audio as
embed_interleave's anchor at one position per frame; --bench-size small: B=2, L=4096. Tokens: the
trainer's view batch[:, :L]; weight (C, V, D). Forward providers: triton (check=False), triton_checked
(check=True), reference; fwd+bwd: triton (check=True, the fast backward), triton_det
(deterministic), reference. Bytes at the floor, F = B L: F (8 C + D bytes_out) forward, plus
F (8 C + D bytes_grad) backward (the per-channel backward reads grad_out C times, above it).
"""
from __future__ import annotations

import pytest
import torch

from bench._common import run
from kernels.ops import OPS

OP = "embed_frames"
V = 256
SCALE = 8.0
SPEC = OPS[OP]
SHAPES = dict(SPEC.bench, **{"B2-L4096-C2-D64": dict(B=2, L=4096, C=2, D=64)})
SMALL = "B2-L4096-C2-D64"                             # --bench-size small
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _shape(bench_size: str, name: str) -> dict:
    if bench_size == "small" and name != SMALL:
        pytest.skip("--bench-size small: the small shape only")
    return SHAPES[name]


def _inputs(shape: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, L, C, D = shape["B"], shape["L"], shape["C"], shape["D"]
    batch = torch.randint(0, V, (B, L + 1, C), generator=g).cuda()
    weight = torch.randn(C, V, D, generator=g).to(dtype).cuda()
    return batch[:, :L], weight


def _case(bench_size: str, shape_name: str, dtype: str):
    """(kernels, shape, tokens, weight) of one benchmark."""
    import kernels
    shape = _shape(bench_size, shape_name)
    return (kernels, shape, *_inputs(shape, DTYPES[dtype]))


def _fwd_bytes(shape: dict, out_bytes: int) -> int:
    return shape["B"] * shape["L"] * (8 * shape["C"] + shape["D"] * out_bytes)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "triton_checked", "reference"])
def test_bench_embed_frames_fwd(benchmark, bench_size, provider, shape_name, dtype):
    kernels, shape, tokens, weight = _case(bench_size, shape_name, dtype)
    if provider == "triton":
        fn = lambda: kernels.embed_frames(tokens, weight, SCALE, check=False)  # noqa: E731
    elif provider == "triton_checked":
        fn = lambda: kernels.embed_frames(tokens, weight, SCALE)  # noqa: E731
    else:
        fn = lambda: kernels.reference.embed_frames(tokens, weight, SCALE)  # noqa: E731
    with torch.no_grad():
        run(benchmark, fn, op=OP, direction="fwd", provider=provider, shape=dict(shape, V=V),
            dtype=dtype, nbytes=_fwd_bytes(shape, weight.element_size()))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "triton_det", "reference"])
def test_bench_embed_frames_fwdbwd(benchmark, bench_size, provider, shape_name, dtype):
    kernels, shape, tokens, weight = _case(bench_size, shape_name, dtype)
    B, L, D = shape["B"], shape["L"], shape["D"]
    grad_out = torch.randn(B, L, D, device="cuda").to(weight.dtype)
    w = weight.detach().requires_grad_()

    if provider == "reference":
        def fn():
            out = kernels.reference.embed_frames(tokens, w, SCALE)
            return torch.autograd.grad(out, w, grad_out)
    else:
        det = provider == "triton_det"

        def fn():
            out = kernels.embed_frames(tokens, w, SCALE, deterministic=det)
            return torch.autograd.grad(out, w, grad_out)

    nbytes = 2 * _fwd_bytes(shape, weight.element_size())     # bytes_grad == bytes_out here
    run(benchmark, fn, op=OP, direction="fwdbwd", provider=provider, shape=dict(shape, V=V),
        dtype=dtype, nbytes=nbytes)
