"""kernels.embed_frames: the joint per-frame embedding (the `frames` stereo layout's encoder).

Oracle: kernels.reference.embed_frames (forward: bitwise equal in fp32; backward: its autograd
on an fp32 copy of the tables, i.e. fp32 accumulation rounded once to the weight's dtype). The
backward is embed_interleave's, per channel: these tests check the wiring (channel views,
stacking, masking of bad frames, the custom ops), not that kernel again in depth.
Interpreter-marked tests run the Triton code (CUDA, or CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kernels import reference
from kernels.embed_frames import embed_frames
from kernels.embed_interleave import embed_interleave
from tests.strategies import dims, seeds
from tests.test_embed_interleave import (assert_fwd_equal, assert_grad_close, float_dtypes, layouts,
                                         make_tokens, scales, vocab)

EF = importlib.import_module("kernels.embed_frames")   # the module (kernels.embed_frames is the function)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_weight(C, V, D, dtype, gen, device):
    return torch.randn(C, V, D, generator=gen).to(dtype).to(device)


def reference_grad(tokens, weight, scale, out_dtype, grad_out):
    """(fp32 grad of the reference, fp32 bound scale: sum of |scale * grad_out| per table row)."""
    w32 = weight.detach().float().requires_grad_()
    out = reference.embed_frames(tokens, w32, scale, out_dtype)
    out.backward(grad_out)
    B, L, C = tokens.shape
    g = grad_out.reshape(B * L, -1).float().abs() * abs(scale)
    mag = torch.zeros_like(w32)
    for c in range(C):
        mag[c].index_add_(0, tokens[..., c].reshape(B * L).long(), g)
    return w32.grad, mag


def run_bwd(tokens, weight, scale, out_dtype, deterministic, grad_out, check=True):
    w = weight.detach().clone().requires_grad_()
    out = embed_frames(tokens, w, scale, out_dtype=out_dtype, deterministic=deterministic,
                       check=check, backend="triton")
    (grad,) = torch.autograd.grad(out, w, grad_out)
    return grad


def token_dtype_fits(dtype, V):
    """The largest vocabulary a token dtype holds (make_tokens casts the drawn values)."""
    return V <= {torch.int8: 128, torch.uint8: 256, torch.int16: 32768}.get(dtype, 2**31)


# ------------------------------------------------------------------------------------------------
# anchor cases (Triton path)
# ------------------------------------------------------------------------------------------------

ANCHORS = [
    # B, L, C, V, D, token dtype, weight dtype, out dtype, layout
    pytest.param(1, 1, 1, 1, 1, torch.int64, torch.float32, None, "contiguous", id="B1-L1-C1-V1-D1-i64-fp32"),
    pytest.param(2, 17, 2, 256, 64, torch.int64, torch.float32, None, "slice", id="B2-L17-C2-V256-D64-i64-fp32-slice"),
    pytest.param(2, 16, 2, 256, 64, torch.uint8, torch.bfloat16, None, "permuted", id="B2-L16-C2-V256-D64-u8-bf16-perm"),
    pytest.param(3, 15, 3, 5, 17, torch.int8, torch.float32, torch.bfloat16, "contiguous", id="B3-L15-C3-V5-D17-i8-fp32to-bf16"),
    pytest.param(1, 33, 2, 300, 70, torch.int16, torch.bfloat16, torch.float32, "step", id="B1-L33-C2-V300-D70-i16-bf16to-fp32-step"),
    pytest.param(2, 31, 3, 17, 33, torch.int32, torch.float32, None, "slice", id="B2-L31-C3-V17-D33-i32-fp32-slice"),
    pytest.param(1, 7, 2, 65536, 3, torch.int64, torch.float32, None, "contiguous", id="B1-L7-C2-V65536-D3-i64-fp32"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,L,C,V,D,tok_dtype,w_dtype,out_dtype,layout", ANCHORS)
def test_embed_frames_fwd(triton_device, nan_poison, B, L, C, V, D, tok_dtype, w_dtype, out_dtype, layout):
    gen = torch.Generator().manual_seed(3000 + B * L * C + V + D)
    tokens = make_tokens(B, L, C, V, layout=layout, dtype=tok_dtype, gen=gen, device=triton_device)
    weight = make_weight(C, V, D, w_dtype, gen, triton_device)
    out = embed_frames(tokens, weight, 1.7, out_dtype=out_dtype, backend="triton")
    assert out.shape == (B, L, D)
    assert_fwd_equal(out, reference.embed_frames(tokens, weight, 1.7, out_dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("B,L,C,V,D,tok_dtype,w_dtype,out_dtype,layout", ANCHORS)
def test_embed_frames_bwd(triton_device, nan_poison, B, L, C, V, D, tok_dtype, w_dtype, out_dtype, layout,
                          deterministic):
    gen = torch.Generator().manual_seed(4000 + B * L * C + V + D)
    tokens = make_tokens(B, L, C, V, layout=layout, dtype=tok_dtype, gen=gen, device=triton_device)
    weight = make_weight(C, V, D, w_dtype, gen, triton_device)
    od = w_dtype if out_dtype is None else out_dtype
    grad_out = torch.randn(B, L, D, generator=gen).to(od).to(triton_device)
    grad = run_bwd(tokens, weight, -0.75, out_dtype, deterministic, grad_out)
    expected, mag = reference_grad(tokens, weight, -0.75, out_dtype, grad_out)
    assert_grad_close(grad, expected, mag, w_dtype)


# ------------------------------------------------------------------------------------------------
# properties (hypothesis)
# ------------------------------------------------------------------------------------------------

# the device fixtures are session constants: nothing to reset between examples
fixture_ok = settings(suppress_health_check=list(settings().suppress_health_check)
                      + [HealthCheck.function_scoped_fixture],
                      max_examples=max(25, settings().max_examples))
token_dtypes = st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])


@pytest.mark.interpreter
@fixture_ok
@given(B=st.integers(1, 3), L=dims(24), C=st.integers(1, 3), V=vocab, D=dims(70), scale=scales,
       tok_dtype=token_dtypes, w_dtype=float_dtypes,
       out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]), layout=layouts, seed=seeds)
@example(B=1, L=1, C=1, V=1, D=1, scale=1.0, tok_dtype=torch.int64, w_dtype=torch.float32,
         out_dtype=None, layout="contiguous", seed=0)
@example(B=3, L=17, C=3, V=255, D=65, scale=-1.0, tok_dtype=torch.uint8, w_dtype=torch.float32,
         out_dtype=torch.float32, layout="step", seed=5)
def test_embed_frames_fwd_properties(triton_device, B, L, C, V, D, scale, tok_dtype, w_dtype, out_dtype,
                                     layout, seed):
    # the interpreter rounds fp32 -> bf16 subnormals wrongly (embed_interleave's forward too; the
    # fp32 sum before that cast is bitwise exact): no subnormal bf16 outputs on the CPU
    bf16_out = (out_dtype or w_dtype) == torch.bfloat16
    assume(triton_device.type == "cuda" or not bf16_out or scale == 0 or abs(scale) >= 2.0**-60)
    V = V if token_dtype_fits(tok_dtype, V) else 100
    gen = torch.Generator().manual_seed(seed)
    tokens = make_tokens(B, L, C, V, layout=layout, dtype=tok_dtype, gen=gen, device=triton_device)
    weight = make_weight(C, V, D, w_dtype, gen, triton_device)
    out = embed_frames(tokens, weight, scale, out_dtype=out_dtype, backend="triton")
    assert out.shape == (B, L, D)
    assert_fwd_equal(out, reference.embed_frames(tokens, weight, scale, out_dtype))


@pytest.mark.interpreter
@fixture_ok
@given(B=st.integers(1, 3), L=dims(20), C=st.integers(1, 3), V=vocab, D=dims(40), scale=scales,
       w_dtype=float_dtypes, out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
       layout=layouts, deterministic=st.booleans(), skew=st.booleans(), check=st.booleans(), seed=seeds)
@example(B=3, L=20, C=2, V=256, D=64, scale=1.0, w_dtype=torch.float32, out_dtype=None,
         layout="slice", deterministic=False, skew=True, check=True, seed=1)
def test_embed_frames_bwd_properties(triton_device, B, L, C, V, D, scale, w_dtype, out_dtype, layout,
                                     deterministic, skew, check, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = make_tokens(B, L, C, V, layout=layout, gen=gen, device=triton_device, skew=skew)
    weight = make_weight(C, V, D, w_dtype, gen, triton_device)
    od = w_dtype if out_dtype is None else out_dtype
    grad_out = torch.randn(B, L, D, generator=gen).to(od).to(triton_device)
    grad = run_bwd(tokens, weight, scale, out_dtype, deterministic, grad_out, check=check)
    expected, mag = reference_grad(tokens, weight, scale, out_dtype, grad_out)
    assert_grad_close(grad, expected, mag, w_dtype)


# ------------------------------------------------------------------------------------------------
# determinism, strides, large vocabulary, out-of-range tokens, semantics
# ------------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("V", [256, 2000], ids=["onehot-V256", "sorted-V2000"])
def test_deterministic_is_bitwise_reproducible(triton_device, V):
    gen = torch.Generator().manual_seed(31)
    B, L, C, D = 2, 100, 2, 16                        # 200 frames per channel: several row partitions
    tokens = make_tokens(B, L, C, V, layout="slice", gen=gen, device=triton_device)
    tokens[:, : L // 2, 1] = 3                        # a hot token in channel 1 only
    weight = make_weight(C, V, D, torch.float32, gen, triton_device)
    grad_out = torch.randn(B, L, D, generator=gen).to(triton_device)
    g1 = run_bwd(tokens, weight, 0.3, None, True, grad_out)
    g2 = run_bwd(tokens, weight, 0.3, None, True, grad_out)
    assert torch.equal(g1, g2)
    expected, mag = reference_grad(tokens, weight, 0.3, None, grad_out)
    assert_grad_close(g1, expected, mag, torch.float32)
    assert g1[1, 3].abs().sum() > g1[0, 3].abs().sum()   # the tables are not mixed up


@pytest.mark.interpreter
def test_strided_weight_and_grad_out(triton_device, nan_poison):
    """A (C, V, D) table with permuted storage; grad_out every other column of a wider tensor."""
    gen = torch.Generator().manual_seed(32)
    C, V, D, B, L = 2, 40, 24, 2, 11
    weight = torch.randn(D, V, C, generator=gen).to(triton_device).permute(2, 1, 0)
    assert weight.shape == (C, V, D) and not weight.is_contiguous()
    tokens = make_tokens(B, L, C, V, layout="permuted", gen=gen, device=triton_device)
    out = embed_frames(tokens, weight, 0.5, backend="triton")
    assert_fwd_equal(out, reference.embed_frames(tokens, weight, 0.5))
    wide = torch.randn(B, L, 2 * D, generator=gen).to(triton_device)
    grad_out = wide[..., ::2]
    for det in (False, True):
        for mask in (False, True):
            grad = EF.embed_frames_bwd(grad_out, tokens, V, torch.float32, 2.0, det, mask)
            expected, mag = reference_grad(tokens, weight, 2.0, None, grad_out.contiguous())
            assert_grad_close(grad, expected, mag, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_large_vocab_16bit(triton_device, nan_poison, deterministic):
    """V = 65536 (16-bit audio): embed_interleave's backward without a one-hot, per channel."""
    gen = torch.Generator().manual_seed(33)
    B, L, C, D, V = 1, 6, 2, 16, 65536
    tokens = make_tokens(B, L, C, V, gen=gen, device=triton_device)
    tokens[0, 0, :] = V - 1                           # both channels of frame 0 hit their last row
    tokens[0, 3, 1] = V - 1
    weight = make_weight(C, V, D, torch.float32, gen, triton_device)
    out = embed_frames(tokens, weight, 3.0, backend="triton")
    assert_fwd_equal(out, reference.embed_frames(tokens, weight, 3.0))
    grad_out = torch.randn(B, L, D, generator=gen).to(triton_device)
    grad = run_bwd(tokens, weight, 3.0, None, deterministic, grad_out)
    expected, mag = reference_grad(tokens, weight, 3.0, None, grad_out)
    assert_grad_close(grad, expected, mag, torch.float32)
    assert grad[0, V - 1].abs().sum() > 0 and grad[1, V - 1].abs().sum() > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("channel", [0, 1])
@pytest.mark.parametrize("bad", [-1, "V"], ids=["negative", "eqV"])
def test_out_of_range_raises(triton_device, bad, channel):
    V = 256
    tokens = torch.zeros(1, 4, 2, dtype=torch.int64, device=triton_device)
    tokens[0, 2, channel] = V if bad == "V" else bad
    weight = torch.randn(2, V, 4, device=triton_device)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="outside") as info:
            embed_frames(tokens, weight, backend=backend)
        message = str(info.value)
        assert "\n" not in message and message.startswith("embed_frames:")
        assert f"[0, {V})" in message


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("V", [40, 3000], ids=["onehot", "large-V"])
def test_check_false_gives_nan_frames(triton_device, nan_poison, V, deterministic):
    """check=False: no error; a frame with a bad token in any channel is NaN, valid frames are
    exact, and a bad frame adds nothing to any table's gradient (even with a NaN upstream
    gradient there, and even to the channels whose token was valid)."""
    gen = torch.Generator().manual_seed(35)
    B, L, C, D = 2, 5, 3, 8
    tokens = make_tokens(B, L, C, V, gen=gen, device=triton_device)
    tokens[0, 1, 0] = -5
    tokens[1, 4, 1] = V
    tokens[1, 0, 2] = 2**40                           # would wrap to a valid int32 index
    weight = make_weight(C, V, D, torch.float32, gen, triton_device).requires_grad_()
    out = embed_frames(tokens, weight, 2.0, check=False, deterministic=deterministic, backend="triton")
    bad = ((tokens < 0) | (tokens >= V)).any(dim=-1)  # (B, L)
    assert int(bad.sum()) == 3
    assert torch.isnan(out[bad]).all()
    safe = tokens.clamp(0, V - 1)
    expected = reference.embed_frames(safe, weight.detach(), 2.0)
    assert torch.equal(out[~bad], expected[~bad])
    grad_out = torch.randn(B, L, D, generator=gen).to(triton_device)
    grad_out[bad] = float("nan")
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    g_clean = grad_out.clone()
    g_clean[bad] = 0.0
    expected_grad, mag = reference_grad(safe, weight, 2.0, None, g_clean)
    assert_grad_close(grad, expected_grad, mag, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape,V,D", [((0, 5, 2), 4, 3), ((2, 0, 2), 4, 3), ((2, 3, 2), 4, 0),
                                       ((2, 3, 1), 0, 3)], ids=["B0", "L0", "D0", "V0-unchecked"])
def test_empty_shapes(triton_device, shape, V, D):
    tokens = torch.zeros(shape, dtype=torch.int64, device=triton_device)
    C = shape[-1]
    weight = torch.randn(C, V, D, device=triton_device, requires_grad=True)
    check = V > 0                                     # V = 0: every token is out of range
    for det in (False, True):
        out = embed_frames(tokens, weight, deterministic=det, check=check, backend="triton")
        assert out.shape == (shape[0], shape[1], D)
        assert V > 0 or torch.isnan(out).all()
        (grad,) = torch.autograd.grad(out, weight, torch.ones_like(out))
        assert grad.shape == (C, V, D) and not grad.any()


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_mono_equals_embed_interleave(triton_device, nan_poison, deterministic):
    """C = 1: one position per sample either way, so the two ops are the same op."""
    gen = torch.Generator().manual_seed(36)
    B, L, V, D = 3, 19, 256, 32
    tokens = make_tokens(B, L, 1, V, layout="slice", gen=gen, device=triton_device)
    table = torch.randn(V, D, generator=gen).to(triton_device)
    out_f = embed_frames(tokens, table[None], 4.0, backend="triton")
    out_i = embed_interleave(tokens, table, 4.0, backend="triton")
    assert torch.equal(out_f, out_i)
    grad_out = torch.randn(B, L, D, generator=gen).to(triton_device)
    w_f = table[None].clone().requires_grad_()
    w_i = table.clone().requires_grad_()
    (g_f,) = torch.autograd.grad(embed_frames(tokens, w_f, 4.0, deterministic=deterministic,
                                              backend="triton"), w_f, grad_out)
    (g_i,) = torch.autograd.grad(embed_interleave(tokens, w_i, 4.0, deterministic=deterministic,
                                                  backend="triton"), w_i, grad_out)
    if deterministic:
        assert torch.equal(g_f[0], g_i)
    else:   # fp32 atomics: the order of the adds (and so the last bits) may differ on a GPU
        torch.testing.assert_close(g_f[0], g_i, rtol=1e-6, atol=1e-6)
    assert g_i.abs().sum() > 0


@pytest.mark.interpreter
def test_autograd_and_dtypes(triton_device):
    gen = torch.Generator().manual_seed(37)
    tokens = make_tokens(1, 4, 2, 10, gen=gen, device=triton_device)
    weight = make_weight(2, 10, 8, torch.bfloat16, gen, triton_device)
    out = embed_frames(tokens, weight, backend="triton")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 8) and not out.requires_grad
    out = embed_frames(tokens, weight.requires_grad_(), out_dtype=torch.float32, backend="triton")
    assert out.dtype == torch.float32 and out.requires_grad
    out.sum().backward()                              # grad_out: an expanded (stride 0) tensor
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.shape == (2, 10, 8)
    for c in range(2):
        counts = torch.bincount(tokens[..., c].reshape(-1), minlength=10).to(torch.bfloat16)
        assert torch.equal(weight.grad[c], counts[:, None].expand(10, 8))


@pytest.mark.interpreter
def test_torch_compile_fullgraph(triton_device):
    gen = torch.Generator().manual_seed(38)
    B, L, C, V, D = 2, 6, 2, 12, 8
    batch = make_tokens(B, L, C, V, layout="slice", gen=gen, device=triton_device)
    weight = make_weight(C, V, D, torch.float32, gen, triton_device).requires_grad_()
    proj = torch.randn(D, generator=gen).to(triton_device)

    def fn(tokens, w):
        x = embed_frames(tokens, w, 2.0, out_dtype=torch.float32, backend="triton")
        return (torch.tanh(x) @ proj).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(batch, weight)
    (grad,) = torch.autograd.grad(loss, weight)
    loss_ref = fn(batch, weight)
    (grad_ref,) = torch.autograd.grad(loss_ref, weight)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)
    bad = batch.clone()
    bad[0, 0, 1] = V                                   # the check runs inside the opaque op
    with pytest.raises(ValueError, match="outside"):
        compiled(bad, weight)


@pytest.mark.interpreter
def test_opcheck(triton_device):
    gen = torch.Generator().manual_seed(39)
    tokens = make_tokens(2, 3, 2, 7, layout="slice", gen=gen, device=triton_device)
    weight = make_weight(2, 7, 5, torch.float32, gen, triton_device).requires_grad_()
    torch.library.opcheck(torch.ops.sashimi_kernels.embed_frames_fwd.default,
                          (tokens, weight, 1.5, torch.float32, False, True))
    grad_out = torch.randn(2, 3, 5, generator=gen).to(triton_device)
    torch.library.opcheck(torch.ops.sashimi_kernels.embed_frames_bwd.default,
                          (grad_out, tokens, 7, torch.float32, 1.5, True, True))


# ------------------------------------------------------------------------------------------------
# no Triton: errors raised before dispatch, the reference
# ------------------------------------------------------------------------------------------------

_TOK = torch.zeros(1, 2, 2, dtype=torch.int64)


@pytest.mark.parametrize("tokens,weight,kwargs,match", [
    pytest.param(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 4, 2), {}, "3-D", id="tokens-2d"),
    pytest.param(torch.zeros(1, 2, 2), torch.zeros(2, 4, 2), {}, "integer", id="tokens-float"),
    pytest.param(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(2, 4, 2), {}, "integer", id="tokens-bool"),
    pytest.param(torch.zeros(1, 2, 0, dtype=torch.int64), torch.zeros(0, 4, 2), {}, "C >= 1", id="no-channels"),
    pytest.param(_TOK, torch.zeros(4, 2), {}, r"3-D \(C, V, D\) with C = 2", id="weight-2d"),
    pytest.param(_TOK, torch.zeros(2, 4, 2, 1), {}, r"3-D \(C, V, D\)", id="weight-4d"),
    pytest.param(_TOK, torch.zeros(3, 4, 2), {}, r"C = 2 \(the tokens' channels\), got shape \(3, 4, 2\)",
                 id="weight-C-mismatch"),
    pytest.param(_TOK, torch.zeros(2, 4, 2, dtype=torch.float16), {}, "float32 or bfloat16", id="weight-fp16"),
    pytest.param(_TOK, torch.zeros(2, 4, 2, dtype=torch.float64), {}, "float32 or bfloat16", id="weight-fp64"),
    pytest.param(_TOK, torch.zeros(2, 4, 2), {"out_dtype": torch.float16}, "out_dtype", id="out-fp16"),
    pytest.param(_TOK, torch.zeros(2, 4, 2), {"out_dtype": "bf16"}, "out_dtype", id="out-str"),
    pytest.param(_TOK, torch.zeros(2, 4, 2), {"scale": torch.tensor(2.0)}, "scale", id="scale-tensor"),
    pytest.param(_TOK, torch.zeros(2, 4, 2), {"backend": "cuda"}, "backend", id="bad-backend"),
    pytest.param(_TOK, torch.zeros(2, 4, 2, device="meta"), {}, "same device", id="devices"),
    pytest.param(torch.full((1, 2, 2), 4, dtype=torch.int64), torch.zeros(2, 4, 2), {"backend": "reference"},
                 "outside", id="reference-eqV"),
])
def test_errors(tokens, weight, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        embed_frames(tokens, weight, **kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("embed_frames:")


def test_bwd_launcher_rejects_a_wrong_grad_out():
    tokens = torch.zeros(2, 3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="grad_out"):
        EF.embed_frames_bwd(torch.zeros(2, 6, 4), tokens, 5, torch.float32)


def test_reference_matches_naive_loop():
    gen = torch.Generator().manual_seed(40)
    B, L, C, V, D = 2, 5, 3, 11, 4
    tokens = torch.randint(0, V, (B, L, C), generator=gen)
    weight = torch.randn(C, V, D, generator=gen)
    out = reference.embed_frames(tokens, weight, 0.5)
    naive = torch.empty(B, L, D)
    for b in range(B):
        for l in range(L):
            acc = weight[0, tokens[b, l, 0]].clone()
            for c in range(1, C):
                acc = acc + weight[c, tokens[b, l, c]]
            naive[b, l] = acc * 0.5
    assert torch.equal(out, naive)
    # backward of the reference: a per-channel index_add of scale * grad_out, checked in float64
    w = weight.double().requires_grad_()
    g = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    reference.embed_frames(tokens, w, 0.5, torch.float64).backward(g)
    for c in range(C):
        expected = torch.zeros(V, D, dtype=torch.float64).index_add_(0, tokens[..., c].reshape(-1),
                                                                     0.5 * g.reshape(-1, D))
        assert torch.allclose(w.grad[c], expected, rtol=1e-6, atol=1e-6)


def test_reference_backend_on_cpu():
    gen = torch.Generator().manual_seed(41)
    tokens = torch.randint(0, 9, (2, 4, 2), generator=gen)[:, :3]
    weight = torch.randn(2, 9, 6, generator=gen)
    out = embed_frames(tokens, weight, 2.0, out_dtype=torch.bfloat16, backend="reference")
    assert out.shape == (2, 3, 6) and out.dtype == torch.bfloat16
    assert torch.equal(out, ((weight[0][tokens[..., 0]] + weight[1][tokens[..., 1]]) * 2.0).to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# GPU only: the bench size (the interleave anchor's audio, one position per frame)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gpu_anchor_size(out_dtype):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(42)
    B, L, C, V, D = 16, 32000, 2, 256, 64
    batch = torch.randint(0, V, (B, L + 1, C), generator=gen).to(dev)
    tokens = batch[:, :L]
    weight = torch.randn(C, V, D, generator=gen).to(dev)
    out = embed_frames(tokens, weight, 8.0, out_dtype=out_dtype)
    assert torch.equal(out, reference.embed_frames(tokens, weight, 8.0, out_dtype))
    grad_out = torch.randn(B, L, D, device=dev).to(out_dtype)
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
    gen = torch.Generator().manual_seed(43)
    B, L, C, V, D = 4, 50000, 2, 65536, 64
    tokens = torch.randint(0, V, (B, L, C), generator=gen).to(dev)
    tokens[:, : L // 4] = 32768                       # digital silence: one very hot token per channel
    weight = torch.randn(C, V, D, generator=gen).to(torch.bfloat16).to(dev)
    out = embed_frames(tokens, weight, 0.3)
    assert torch.equal(out, reference.embed_frames(tokens, weight, 0.3))
    grad_out = torch.randn(B, L, D, device=dev).to(torch.bfloat16)
    expected, mag = reference_grad(tokens, weight, 0.3, None, grad_out)
    grad = run_bwd(tokens, weight, 0.3, None, deterministic, grad_out)
    assert_grad_close(grad, expected, mag, torch.bfloat16)
    if deterministic:
        assert torch.equal(grad, run_bwd(tokens, weight, 0.3, None, True, grad_out))
