"""Benchmarks of kernels.embed_interleave (the fused embedding + stereo interleave).

Anchor shape B=16, L=64000, C=2 (8 s of 16 kHz stereo per row, 2,048,000 rows), D=64, V=256;
--bench-size small: B=2, L=8192. Tokens: the trainer's non-contiguous view batch[:, :L]; dtype
names the table and the output alike. Forward providers: triton (check=False: the kernel alone),
triton_checked (the default check=True: one aminmax and a host sync more), torch (F.embedding on
the interleaved view, scaled), reference. Backward: triton (one-hot tensor-core accumulation,
fp32 atomics), triton_det (deterministic), torch (nn.Embedding's backward), reference.
Bytes at the floor (the table stays in cache): R (8 + D bytes_out) forward, R (8 + D bytes_grad)
backward, R = B L C. Targets (bench/anchors.json): forward >= 80% of that floor, backward >= 5x
faster than torch's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench._common import run

OP = "embed_interleave"
V, D = 256, 64
SCALE = 8.0
SHAPES = {"B16-L64000-C2-D64-V256": dict(B=16, L=64000, C=2),     # the anchor
          "B2-L8192-C2-D64-V256": dict(B=2, L=8192, C=2)}        # --bench-size small
SMALL = "B2-L8192-C2-D64-V256"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(shape: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, L, C = shape["B"], shape["L"], shape["C"]
    batch = torch.randint(0, V, (B, L + 1, C), generator=g).cuda()
    weight = torch.randn(V, D, generator=g).to(dtype).cuda()
    return batch[:, :L], weight


def _shape(bench_size: str, name: str) -> dict:
    if bench_size == "small" and name != SMALL:
        pytest.skip("--bench-size small: the small shape only")
    return SHAPES[name]


def _case(bench_size: str, shape_name: str, dtype: str):
    """(kernels, shape, tokens, weight) of one benchmark."""
    import kernels
    shape = _shape(bench_size, shape_name)
    return (kernels, shape, *_inputs(shape, DTYPES[dtype]))


def _shape_dict(shape: dict) -> dict:
    return dict(shape, D=D, V=V)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "triton_checked", "torch", "reference"])
def test_bench_embed_interleave_fwd(benchmark, bench_size, provider, shape_name, dtype):
    kernels, shape, tokens, weight = _case(bench_size, shape_name, dtype)
    (B, L, C), R = tokens.shape, tokens.numel()

    if provider == "triton":
        fn = lambda: kernels.embed_interleave(tokens, weight, SCALE, check=False)  # noqa: E731
    elif provider == "triton_checked":
        fn = lambda: kernels.embed_interleave(tokens, weight, SCALE)  # noqa: E731
    elif provider == "torch":
        fn = lambda: F.embedding(tokens.reshape(B, L * C), weight) * SCALE  # noqa: E731
    else:
        fn = lambda: kernels.reference.embed_interleave(tokens, weight, SCALE)  # noqa: E731

    nbytes = R * (8 + D * weight.element_size())
    with torch.no_grad():
        run(benchmark, fn, op=OP, direction="fwd", provider=provider, shape=_shape_dict(shape),
            dtype=dtype, nbytes=nbytes)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "triton_det", "torch", "reference"])
def test_bench_embed_interleave_bwd(benchmark, bench_size, provider, shape_name, dtype):
    kernels, shape, tokens, weight = _case(bench_size, shape_name, dtype)
    grad_out = torch.randn(tokens.shape[0], tokens[0].numel(), D, device="cuda").to(weight.dtype)
    B, L, C = tokens.shape
    w = weight.detach().requires_grad_()

    if provider in ("triton", "triton_det"):
        det = provider == "triton_det"
        bwd = torch.ops.sashimi_kernels.embed_interleave_bwd     # the backward alone
        fn = lambda: bwd(grad_out, tokens, V, weight.dtype, SCALE, det)  # noqa: E731
    elif provider == "torch":
        # nn.Embedding on the interleaved view; unscaled, so only the embedding backward is timed
        out = F.embedding(tokens.reshape(B, L * C), w)
        fn = lambda: torch.autograd.grad(out, w, grad_out, retain_graph=True)  # noqa: E731
    else:
        out = kernels.reference.embed_interleave(tokens, w, SCALE)
        fn = lambda: torch.autograd.grad(out, w, grad_out, retain_graph=True)  # noqa: E731

    nbytes = tokens.numel() * (8 + D * grad_out.element_size())
    run(benchmark, fn, op=OP, direction="bwd", provider=provider, shape=_shape_dict(shape),
        dtype=dtype, nbytes=nbytes)
