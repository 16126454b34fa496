"""kernels.embed_interleave: the fused embedding + stereo interleave, forward and backward.

Oracle: kernels.reference.embed_interleave (forward: bitwise equal in fp32; backward: its autograd
on an fp32 copy of the table, i.e. fp32 accumulation rounded once to the weight's dtype).
Interpreter-marked tests run the Triton code (CUDA, or CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernels import reference
from kernels.embed_interleave import embed_interleave
from tests.strategies import dims, seeds

EI = importlib.import_module("kernels.embed_interleave")   # the module (kernels.embed_interleave is the function)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_tokens(B, L, C, V, *, layout="contiguous", dtype=torch.int64, gen=None, device="cpu",
                skew=False) -> torch.Tensor:
    """(B, L, C) tokens in [0, V) with the given memory layout (values drawn on CPU, then moved).

    layouts: contiguous; slice (the trainer's batch[:, :L] of a (B, L+1, C) batch); permuted
    ((B, C, L) storage viewed as (B, L, C)); step (every other time step of (B, 2L, C))."""
    hi = min(V, 2) if skew else V            # skew: every token is 0 or 1 (heavy contention)
    if layout == "contiguous":
        t = torch.randint(0, hi, (B, L, C), generator=gen)
    elif layout == "slice":
        t = torch.randint(0, hi, (B, L + 1, C), generator=gen).to(dtype).to(device)[:, :L]
        return t
    elif layout == "permuted":
        t = torch.randint(0, hi, (B, C, L), generator=gen).to(dtype).to(device).transpose(1, 2)
        return t
    elif layout == "step":
        t = torch.randint(0, hi, (B, 2 * L, C), generator=gen).to(dtype).to(device)[:, ::2]
        return t
    else:
        raise AssertionError(layout)
    return t.to(dtype).to(device)


def make_weight(V, D, dtype, gen, device):
    return torch.randn(V, D, generator=gen).to(dtype).to(device)


def assert_fwd_equal(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact, except bf16 output under the interpreter (its casts truncate: 1 bf16 ulp)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        o, e = out.float(), expected.float()
        assert torch.equal(torch.isnan(o), torch.isnan(e))
        ok = (o - e).abs() <= e.abs() * 2.0**-7
        assert bool(ok[~torch.isnan(e)].all()), f"max diff {(o - e).abs().max().item()}"
    else:
        assert torch.equal(out, expected), \
            f"max diff {(out.float() - expected.float()).abs().max().item()}"


def reference_grad(tokens, weight, scale, out_dtype, grad_out):
    """(fp32 grad of the reference, fp32 bound scale: sum of |scale * grad_out| per table row)."""
    w32 = weight.detach().float().requires_grad_()
    out = reference.embed_interleave(tokens, w32, scale, out_dtype)
    out.backward(grad_out)
    B, L, C = tokens.shape
    idx = tokens.reshape(B * L * C).long()
    mag = torch.zeros_like(w32).index_add_(0, idx, grad_out.reshape(B * L * C, -1).float().abs() * abs(scale))
    return w32.grad, mag


def assert_grad_close(grad, expected, mag, weight_dtype, tol=1e-5):
    """fp32: |g - ref| <= tol * sum|terms| per element; bf16: plus one rounding of ref (1 ulp
    when the final cast truncates under the interpreter)."""
    assert grad.shape == expected.shape and grad.dtype == weight_dtype
    g = grad.float()
    assert torch.isfinite(g).all(), "non-finite gradient"
    bound = tol * mag + 1e-30
    if weight_dtype == torch.bfloat16:
        bound = bound + expected.abs() * 2.0**-7
    err = (g - expected).abs()
    bad = err > bound
    assert not bool(bad.any()), (f"{int(bad.sum())} gradient entries off, first at "
                                 f"{bad.nonzero()[:3].tolist()}, max err {err.max().item():.3e}")


def run_bwd(tokens, weight, scale, out_dtype, deterministic, grad_out):
    w = weight.detach().clone().requires_grad_()
    out = embed_interleave(tokens, w, scale, out_dtype=out_dtype, deterministic=deterministic,
                           backend="triton")
    (grad,) = torch.autograd.grad(out, w, grad_out)
    return grad


# ------------------------------------------------------------------------------------------------
# anchor cases (Triton path)
# ------------------------------------------------------------------------------------------------

ANCHORS = [
    # B, L, C, V, D, token dtype, weight dtype, out dtype, layout
    pytest.param(1, 1, 1, 1, 1, torch.int64, torch.float32, None, "contiguous", id="B1-L1-C1-V1-D1-i64-fp32"),
    pytest.param(2, 17, 2, 256, 64, torch.int64, torch.float32, None, "slice", id="B2-L17-C2-V256-D64-i64-fp32-slice"),
    pytest.param(2, 16, 2, 256, 64, torch.int32, torch.bfloat16, None, "permuted", id="B2-L16-C2-V256-D64-i32-bf16-perm"),
    pytest.param(3, 15, 3, 5, 17, torch.int32, torch.float32, torch.bfloat16, "contiguous", id="B3-L15-C3-V5-D17-i32-fp32to-bf16"),
    pytest.param(1, 33, 1, 300, 70, torch.int64, torch.bfloat16, torch.float32, "step", id="B1-L33-C1-V300-D70-i64-bf16to-fp32-step"),
    pytest.param(2, 31, 2, 17, 33, torch.int64, torch.float32, None, "slice", id="B2-L31-C2-V17-D33-i64-fp32-slice"),
    pytest.param(1, 7, 2, 65536, 3, torch.int64, torch.float32, None, "contiguous", id="B1-L7-C2-V65536-D3-i64-fp32"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,L,C,V,D,tok_dtype,w_dtype,out_dtype,layout", ANCHORS)
def test_embed_interleave_fwd(triton_device, nan_poison, B, L, C, V, D, tok_dtype, w_dtype, out_dtype, layout):
    gen = torch.Generator().manual_seed(1000 + B * L * C + V + D)
    tokens = make_tokens(B, L, C, V, layout=layout, dtype=tok_dtype, gen=gen, device=triton_device)
    weight = make_weight(V, D, w_dtype, gen, triton_device)
    out = embed_interleave(tokens, weight, 1.7, out_dtype=out_dtype, backend="triton")
    assert out.shape == (B, L * C, D)
    assert_fwd_equal(out, reference.embed_interleave(tokens, weight, 1.7, out_dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("B,L,C,V,D,tok_dtype,w_dtype,out_dtype,layout", ANCHORS)
def test_embed_interleave_bwd(triton_device, nan_poison, B, L, C, V, D, tok_dtype, w_dtype, out_dtype, layout,
                              deterministic):
    gen = torch.Generator().manual_seed(2000 + B * L * C + V + D)
    tokens = make_tokens(B, L, C, V, layout=layout, dtype=tok_dtype, gen=gen, device=triton_device)
    weight = make_weight(V, D, w_dtype, gen, triton_device)
    od = w_dtype if out_dtype is None else out_dtype
    grad_out = torch.randn(B, L * C, D, generator=gen).to(od).to(triton_device)
    grad = run_bwd(tokens, weight, -0.75, out_dtype, deterministic, grad_out)
    expected, mag = reference_grad(tokens, weight, -0.75, out_dtype, grad_out)
    assert_grad_close(grad, expected, mag, w_dtype)


# ------------------------------------------------------------------------------------------------
# properties (hypothesis)
# ------------------------------------------------------------------------------------------------

vocab = st.one_of(st.sampled_from([1, 2, 3, 16, 17, 256, 300]), st.integers(1, 300))
scales = st.one_of(st.sampled_from([1.0, -1.0, 8.0, 0.125]),
                   st.floats(-16, 16, allow_nan=False, allow_infinity=False, width=32))
layouts = st.sampled_from(["contiguous", "slice", "permuted", "step"])
float_dtypes = st.sampled_from([torch.float32, torch.bfloat16])
# the device fixtures are session constants: nothing to reset between examples
# (and the ops are cheap enough under the interpreter for more examples than the interp profile's)
fixture_ok = settings(suppress_health_check=list(settings().suppress_health_check)
                      + [HealthCheck.function_scoped_fixture],
                      max_examples=max(40, settings().max_examples))


@pytest.mark.interpreter
@fixture_ok
@given(B=st.integers(1, 3), L=dims(24), C=st.integers(1, 3), V=vocab, D=dims(70), scale=scales,
       tok_dtype=st.sampled_from([torch.int32, torch.int64]), w_dtype=float_dtypes,
       out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]), layout=layouts, seed=seeds)
@example(B=1, L=1, C=1, V=1, D=1, scale=1.0, tok_dtype=torch.int64, w_dtype=torch.float32,
         out_dtype=None, layout="contiguous", seed=0)
def test_embed_interleave_fwd_properties(triton_device, B, L, C, V, D, scale, tok_dtype, w_dtype, out_dtype,
                                         layout, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = make_tokens(B, L, C, V, layout=layout, dtype=tok_dtype, gen=gen, device=triton_device)
    weight = make_weight(V, D, w_dtype, gen, triton_device)
    out = embed_interleave(tokens, weight, scale, out_dtype=out_dtype, backend="triton")
    assert_fwd_equal(out, reference.embed_interleave(tokens, weight, scale, out_dtype))
    # de-interleave: channel c of step l is row l*C + c
    od = out.dtype
    for c in range(C):
        chan = out.view(B, L, C, D)[:, :, c]
        assert_fwd_equal(chan, (weight[tokens[:, :, c].long()].float() * scale).to(od))


@pytest.mark.interpreter
@fixture_ok
@given(B=st.integers(1, 3), L=dims(20), C=st.integers(1, 3), V=vocab, D=dims(40), scale=scales,
       w_dtype=float_dtypes, out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
       layout=layouts, deterministic=st.booleans(), skew=st.booleans(), seed=seeds)
@example(B=3, L=20, C=2, V=256, D=64, scale=1.0, w_dtype=torch.float32, out_dtype=None,
         layout="slice", deterministic=False, skew=True, seed=1)
def test_embed_interleave_bwd_properties(triton_device, B, L, C, V, D, scale, w_dtype, out_dtype, layout,
                                         deterministic, skew, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = make_tokens(B, L, C, V, layout=layout, gen=gen, device=triton_device, skew=skew)
    weight = make_weight(V, D, w_dtype, gen, triton_device)
    od = w_dtype if out_dtype is None else out_dtype
    grad_out = torch.randn(B, L * C, D, generator=gen).to(od).to(triton_device)
    grad = run_bwd(tokens, weight, scale, out_dtype, deterministic, grad_out)
    expected, mag = reference_grad(tokens, weight, scale, out_dtype, grad_out)
    assert_grad_close(grad, expected, mag, w_dtype)


# ------------------------------------------------------------------------------------------------
# determinism, strides, large vocabulary, out-of-range tokens, semantics
# ------------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("V", [256, 2000], ids=["onehot-V256", "sorted-V2000"])
def test_deterministic_is_bitwise_reproducible(triton_device, V):
    gen = torch.Generator().manual_seed(7)
    B, L, C, D = 2, 100, 2, 16                        # 400 rows: several row partitions
    tokens = make_tokens(B, L, C, V, layout="slice", gen=gen, device=triton_device)
    tokens[:, : L // 2] = 3                           # a hot token: many updates of one row
    weight = make_weight(V, D, torch.float32, gen, triton_device)
    grad_out = torch.randn(B, L * C, D, generator=gen).to(triton_device)
    g1 = run_bwd(tokens, weight, 0.3, None, True, grad_out)
    g2 = run_bwd(tokens, weight, 0.3, None, True, grad_out)
    assert torch.equal(g1, g2)
    expected, mag = reference_grad(tokens, weight, 0.3, None, grad_out)
    assert_grad_close(g1, expected, mag, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("V", [256, 3000], ids=["onehot", "large-V"])
def test_bwd_strided_grad_out(triton_device, nan_poison, deterministic, V):
    """The launcher takes grad_out with any strides (here: every other column of a wider tensor)."""
    gen = torch.Generator().manual_seed(11)
    B, L, C, D = 2, 9, 2, 20
    tokens = make_tokens(B, L, C, V, layout="permuted", gen=gen, device=triton_device)
    wide = torch.randn(B, L * C, 2 * D, generator=gen).to(triton_device)
    grad_out = wide[..., ::2]
    assert not grad_out.is_contiguous()
    grad = EI.embed_interleave_bwd(grad_out, tokens, V, torch.float32, 2.0, deterministic)
    weight = torch.zeros(V, D, device=triton_device)
    expected, mag = reference_grad(tokens, weight, 2.0, None, grad_out.contiguous())
    assert_grad_close(grad, expected, mag, torch.float32)


@pytest.mark.interpreter
def test_fwd_strided_weight(triton_device, nan_poison):
    gen = torch.Generator().manual_seed(12)
    V, D = 40, 24
    table = torch.randn(D, V, generator=gen).to(triton_device)
    weight = table.t()                                # (V, D), column-major storage
    tokens = make_tokens(2, 11, 2, V, layout="slice", gen=gen, device=triton_device)
    out = embed_interleave(tokens, weight, 0.5, backend="triton")
    assert_fwd_equal(out, reference.embed_interleave(tokens, weight, 0.5))


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_large_vocab_16bit(triton_device, nan_poison, deterministic):
    """V = 65536 (16-bit audio): the backward that does not build a one-hot."""
    gen = torch.Generator().manual_seed(13)
    B, L, C, D, V = 1, 6, 2, 16, 65536
    tokens = make_tokens(B, L, C, V, gen=gen, device=triton_device)
    tokens[0, 0, :] = V - 1                           # both channels of step 0 hit the last row
    tokens[0, 3, 1] = V - 1
    weight = make_weight(V, D, torch.float32, gen, triton_device)
    out = embed_interleave(tokens, weight, 3.0, backend="triton")
    assert_fwd_equal(out, reference.embed_interleave(tokens, weight, 3.0))
    grad_out = torch.randn(B, L * C, D, generator=gen).to(triton_device)
    grad = run_bwd(tokens, weight, 3.0, None, deterministic, grad_out)
    expected, mag = reference_grad(tokens, weight, 3.0, None, grad_out)
    assert_grad_close(grad, expected, mag, torch.float32)
    assert grad[V - 1].abs().sum() > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_sorted_path_pieces(triton_device, monkeypatch, w_dtype):
    """The sort + segment backward with segments cut into several pieces (SEGMENT_ROWS shrunk),
    and routed to at small V (ONEHOT_MAX_V shrunk), against the reference."""
    monkeypatch.setattr(EI, "SEGMENT_ROWS", 3)
    monkeypatch.setattr(EI, "ONEHOT_MAX_V", 4)
    gen = torch.Generator().manual_seed(14)
    B, L, C, D, V = 2, 13, 2, 5, 9
    tokens = make_tokens(B, L, C, V, layout="step", gen=gen, device=triton_device)
    tokens[0] = 4                                     # a run of 26 rows: 9 pieces of <= 3
    weight = make_weight(V, D, w_dtype, gen, triton_device)
    grad_out = torch.randn(B, L * C, D, generator=gen).to(w_dtype).to(triton_device)
    for det in (True, False):
        grad = run_bwd(tokens, weight, 1.5, None, det, grad_out)
        expected, mag = reference_grad(tokens, weight, 1.5, None, grad_out)
        assert_grad_close(grad, expected, mag, w_dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("V", [256, 70000], ids=["onehot", "large-V"])
@pytest.mark.parametrize("bad", [-1, "V"], ids=["negative", "eqV"])
def test_out_of_range_raises(triton_device, V, bad):
    tokens = torch.zeros(1, 4, 2, dtype=torch.int64, device=triton_device)
    tokens[0, 2, 1] = V if bad == "V" else bad
    weight = torch.randn(V, 4, device=triton_device)
    with pytest.raises(ValueError, match="outside"):
        embed_interleave(tokens, weight, backend="triton")
    with pytest.raises(ValueError, match="outside"):
        embed_interleave(tokens, weight, backend="reference")


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("V", [40, 3000], ids=["onehot", "large-V"])
def test_check_false_gives_nan_rows(triton_device, nan_poison, V, deterministic):
    """check=False: no error, out-of-range rows are NaN, valid rows exact, and the bad rows add
    nothing to the gradient (even though their upstream gradient is NaN)."""
    gen = torch.Generator().manual_seed(15)
    B, L, C, D = 2, 5, 2, 8
    tokens = make_tokens(B, L, C, V, gen=gen, device=triton_device)
    tokens[0, 1, 0] = -5
    tokens[1, 4, 1] = V
    tokens[1, 0, 0] = 2**40                           # would wrap to a valid int32 index
    weight = make_weight(V, D, torch.float32, gen, triton_device).requires_grad_()
    out = embed_interleave(tokens, weight, 2.0, check=False, deterministic=deterministic, backend="triton")
    bad = (tokens < 0) | (tokens >= V)
    rows_bad = bad.reshape(B, L * C)
    assert torch.isnan(out[rows_bad]).all()
    safe = tokens.clamp(0, V - 1)
    expected = reference.embed_interleave(safe, weight.detach(), 2.0)
    assert torch.equal(out[~rows_bad], expected[~rows_bad])
    grad_out = torch.randn(B, L * C, D, generator=gen).to(triton_device)
    grad_out[rows_bad] = float("nan")
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    g_clean = grad_out.clone()
    g_clean[rows_bad] = 0.0
    expected_grad, mag = reference_grad(safe, weight, 2.0, None, g_clean)
    assert_grad_close(grad, expected_grad, mag, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape,D", [((0, 5, 2), 3), ((2, 0, 2), 3), ((2, 3, 2), 0)], ids=["B0", "L0", "D0"])
def test_empty_shapes(triton_device, shape, D):
    tokens = torch.zeros(shape, dtype=torch.int64, device=triton_device)
    weight = torch.randn(4, D, device=triton_device, requires_grad=True)
    for det in (False, True):
        out = embed_interleave(tokens, weight, deterministic=det, backend="triton")
        assert out.shape == (shape[0], shape[1] * shape[2], D)
        (grad,) = torch.autograd.grad(out.sum(), weight)
        assert grad.shape == (4, D) and not grad.any()


@pytest.mark.interpreter
def test_mono_equals_embedding(triton_device):
    gen = torch.Generator().manual_seed(16)
    B, L, V, D = 3, 19, 256, 32
    tokens = make_tokens(B, L, 1, V, gen=gen, device=triton_device)
    weight = make_weight(V, D, torch.float32, gen, triton_device)
    out = embed_interleave(tokens, weight, 4.0, backend="triton")
    assert torch.equal(out, F.embedding(tokens[..., 0], weight) * 4.0)


@pytest.mark.interpreter
def test_autograd_and_dtypes(triton_device):
    gen = torch.Generator().manual_seed(17)
    tokens = make_tokens(1, 4, 2, 10, gen=gen, device=triton_device)
    weight = make_weight(10, 8, torch.bfloat16, gen, triton_device)
    out = embed_interleave(tokens, weight, backend="triton")
    assert out.dtype == torch.bfloat16 and not out.requires_grad
    out = embed_interleave(tokens, weight.requires_grad_(), out_dtype=torch.float32, backend="triton")
    assert out.dtype == torch.float32 and out.requires_grad
    out.sum().backward()
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.shape == (10, 8)
    counts = torch.bincount(tokens.reshape(-1), minlength=10).to(torch.bfloat16)
    assert torch.equal(weight.grad, counts[:, None].expand(10, 8))


@pytest.mark.interpreter
def test_torch_compile_fullgraph(triton_device):
    gen = torch.Generator().manual_seed(18)
    B, L, C, V, D = 2, 6, 2, 12, 8
    batch = make_tokens(B, L, C, V, layout="slice", gen=gen, device=triton_device)
    weight = make_weight(V, D, torch.float32, gen, triton_device).requires_grad_()
    proj = torch.randn(D, generator=gen).to(triton_device)

    def fn(tokens, w):
        x = embed_interleave(tokens, w, 2.0, out_dtype=torch.float32, backend="triton")
        return (torch.tanh(x) @ proj).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(batch, weight)
    (grad,) = torch.autograd.grad(loss, weight)
    loss_ref = fn(batch, weight)
    (grad_ref,) = torch.autograd.grad(loss_ref, weight)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)
    bad = batch.clone()
    bad[0, 0, 0] = V                                   # the check runs inside the opaque op
    with pytest.raises(ValueError, match="outside"):
        compiled(bad, weight)


@pytest.mark.interpreter
def test_opcheck(triton_device):
    gen = torch.Generator().manual_seed(19)
    tokens = make_tokens(2, 3, 2, 7, layout="slice", gen=gen, device=triton_device)
    weight = make_weight(7, 5, torch.float32, gen, triton_device).requires_grad_()
    op = torch.ops.sashimi_kernels.embed_interleave_fwd.default
    torch.library.opcheck(op, (tokens, weight, 1.5, torch.float32, False, True))
    grad_out = torch.randn(2, 6, 5, generator=gen).to(triton_device)
    torch.library.opcheck(torch.ops.sashimi_kernels.embed_interleave_bwd.default,
                          (grad_out, tokens, 7, torch.float32, 1.5, True))


# ------------------------------------------------------------------------------------------------
# no Triton: errors raised before dispatch, the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,weight,kwargs,match", [
    pytest.param(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 2), {}, "3-D", id="tokens-2d"),
    pytest.param(torch.zeros(1, 2, 3), torch.zeros(4, 2), {}, "integer", id="tokens-float"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.bool), torch.zeros(4, 2), {}, "integer", id="tokens-bool"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2, 1), {}, "2-D", id="weight-3d"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.float16), {},
                 "float32 or bfloat16", id="weight-fp16"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2), {"out_dtype": torch.float16},
                 "out_dtype", id="out-fp16"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2), {"out_dtype": "bf16"},
                 "out_dtype", id="out-str"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2), {"scale": torch.tensor(2.0)},
                 "scale", id="scale-tensor"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2), {"backend": "cuda"},
                 "backend", id="bad-backend"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(4, 2, device="meta"), {},
                 "same device", id="devices"),
    pytest.param(torch.full((1, 2, 3), 4, dtype=torch.int64), torch.zeros(4, 2), {"backend": "reference"},
                 "outside", id="reference-eqV"),
])
def test_errors(tokens, weight, kwargs, match):
    with pytest.raises(ValueError, match=match):
        embed_interleave(tokens, weight, **kwargs)


def test_reference_matches_naive_loop():
    gen = torch.Generator().manual_seed(20)
    B, L, C, V, D = 2, 5, 3, 11, 4
    tokens = torch.randint(0, V, (B, L, C), generator=gen)
    weight = torch.randn(V, D, generator=gen)
    out = reference.embed_interleave(tokens, weight, 0.5)
    naive = torch.empty(B, L * C, D)
    for b in range(B):
        for l in range(L):
            for c in range(C):
                naive[b, l * C + c] = weight[tokens[b, l, c]] * 0.5
    assert torch.equal(out, naive)
    # backward of the reference: an index_add of scale * grad_out, checked in float64
    w = weight.double().requires_grad_()
    g = torch.randn(B, L * C, D, generator=gen, dtype=torch.float64)
    out64 = reference.embed_interleave(tokens, w, 0.5, torch.float64)
    out64.backward(g)
    expected = torch.zeros(V, D, dtype=torch.float64).index_add_(0, tokens.reshape(-1), 0.5 * g.reshape(-1, D))
    assert torch.allclose(w.grad, expected, rtol=1e-6, atol=1e-6)


def test_reference_bf16_grad_accumulates_in_fp32():
    """300 unit updates of one bf16 row: summed in bf16 they would stall at 256."""
    tokens = torch.zeros(1, 150, 2, dtype=torch.int64)
    weight = torch.zeros(2, 4, dtype=torch.bfloat16, requires_grad=True)
    reference.embed_interleave(tokens, weight).sum().backward()
    assert weight.grad.dtype == torch.bfloat16
    assert torch.equal(weight.grad[0], torch.full((4,), 300.0, dtype=torch.bfloat16))
    assert torch.equal(weight.grad[1], torch.zeros(4, dtype=torch.bfloat16))


def test_reference_backend_on_cpu():
    gen = torch.Generator().manual_seed(21)
    tokens = torch.randint(0, 9, (2, 4, 2), generator=gen)[:, :3]
    weight = torch.randn(9, 6, generator=gen)
    out = embed_interleave(tokens, weight, 2.0, out_dtype=torch.bfloat16, backend="reference")
    assert out.shape == (2, 6, 6) and out.dtype == torch.bfloat16
    assert torch.equal(out, (weight[tokens.reshape(2, 6)] * 2.0).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_reference_takes_every_token_dtype(dtype):
    """uint8 tokens are indices, not a boolean mask; int8/int16 index too."""
    tokens = torch.tensor([[[0, 1], [2, 1]]], dtype=dtype)
    weight = torch.arange(12.0).view(3, 4)
    out = embed_interleave(tokens, weight, backend="reference")
    assert torch.equal(out, weight[tokens.reshape(1, 4).long()])


# ------------------------------------------------------------------------------------------------
# GPU only: the anchor size
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gpu_anchor_size(out_dtype):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(22)
    B, L, C, V, D = 16, 64000, 2, 256, 64
    batch = torch.randint(0, V, (B, L + 1, C), generator=gen).to(dev)
    tokens = batch[:, :L]
    weight = torch.randn(V, D, generator=gen).to(dev)
    out = embed_interleave(tokens, weight, 8.0, out_dtype=out_dtype)
    assert torch.equal(out, reference.embed_interleave(tokens, weight, 8.0, out_dtype))
    grad_out = torch.randn(B, L * C, D, device=dev).to(out_dtype)
    expected, mag = reference_grad(tokens, weight, 8.0, out_dtype, grad_out)
    g_fast = run_bwd(tokens, weight, 8.0, out_dtype, False, grad_out)
    assert_grad_close(g_fast, expected, mag, torch.float32)
    g_det = run_bwd(tokens, weight, 8.0, out_dtype, True, grad_out)
    assert_grad_close(g_det, expected, mag, torch.float32)
    assert torch.equal(g_det, run_bwd(tokens, weight, 8.0, out_dtype, True, grad_out))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_gpu_large_vocab(deterministic):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(23)
    B, L, C, V, D = 4, 100000, 2, 65536, 64
    tokens = torch.randint(0, V, (B, L, C), generator=gen).to(dev)
    tokens[:, : L // 4] = 32768                       # digital silence: one very hot token
    weight = torch.randn(V, D, generator=gen).to(dev)
    out = embed_interleave(tokens, weight, out_dtype=torch.bfloat16)
    assert torch.equal(out, reference.embed_interleave(tokens, weight, 1.0, torch.bfloat16))
    grad_out = torch.randn(B, L * C, D, device=dev).to(torch.bfloat16)
    expected, mag = reference_grad(tokens, weight, 1.0, torch.bfloat16, grad_out)
    grad = run_bwd(tokens, weight, 1.0, torch.bfloat16, deterministic, grad_out)
    assert_grad_close(grad, expected, mag, torch.float32)
    if deterministic:
        assert torch.equal(grad, run_bwd(tokens, weight, 1.0, torch.bfloat16, True, grad_out))


@pytest.mark.gpu
def test_gpu_bf16_weight_anchor():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(24)
    B, L, C, V, D = 4, 16000, 2, 256, 64
    tokens = torch.randint(0, V, (B, L, C), generator=gen).to(dev)
    weight = torch.randn(V, D, generator=gen).to(torch.bfloat16).to(dev)
    out = embed_interleave(tokens, weight, 0.3)
    assert torch.equal(out, reference.embed_interleave(tokens, weight, 0.3))
    grad_out = torch.randn(B, L * C, D, device=dev).to(torch.bfloat16)
    expected, mag = reference_grad(tokens, weight, 0.3, None, grad_out)
    for det in (False, True):
        assert_grad_close(run_bwd(tokens, weight, 0.3, None, det, grad_out), expected, mag, torch.bfloat16)
