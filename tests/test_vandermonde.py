"""kernels.vandermonde: the Triton log-Vandermonde (S4D) kernel against the complex128 reference.

Interpreter-marked tests run the Triton code (CUDA, or CPU under TRITON_INTERPRET=1); the rest
check the reference itself, the gradient formulas the kernel implements, the input checks and
the S4D input helper without running Triton.
"""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import assert_rel_close, rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import batch_shapes, dims, seeds

from kernels import reference
from kernels.ops import make_s4d_inputs
from kernels.vandermonde import vandermonde

vmod = sys.modules["kernels.vandermonde"]  # `kernels.vandermonde` the attribute is the function

FWD_TOL = 1e-5   # max abs error / max |out| against complex128
GRAD_TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def random_inputs(v_shape, x_shape, seed, device="cpu", decay=True):
    """Random complex64 v, x. x has Re(x) <= 0 (decaying, as in S4D; sometimes ~0) and O(1) Im."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(v_shape, dtype=torch.complex64, generator=g)
    re = -torch.rand(x_shape, generator=g) ** 2 * (0.3 if decay else 0.0)
    im = 2.0 * torch.randn(x_shape, generator=g)
    return v.to(device), torch.complex(re, im).to(device)


def ref128(v, x, L):
    return reference.vandermonde(v.detach().cpu(), x.detach().cpu(), L,
                                 compute_dtype=torch.complex128)


def ref_grads(v, x, L, g):
    """Autograd of the reference in complex128: (grad_v, grad_x) for loss = sum(out * g)."""
    v2 = v.detach().cpu().to(torch.complex128).requires_grad_()
    x2 = x.detach().cpu().to(torch.complex128).requires_grad_()
    out = reference.vandermonde(v2, x2, L)
    return torch.autograd.grad(out, (v2, x2), g.detach().cpu().to(torch.float64))


def check_fwd_bwd(v, x, L, seed=0, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    v = v.detach().requires_grad_()
    x = x.detach().requires_grad_()
    out = vandermonde(v, x, L, backend="triton")
    assert out.dtype == torch.float32
    assert_rel_close(out, ref128(v, x, L), fwd_tol, "out")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.device)
    gv, gx = torch.autograd.grad(out, (v, x), g)
    rgv, rgx = ref_grads(v, x, L, g)
    assert gv.shape == v.shape and gx.shape == x.shape
    assert_rel_close(gv, rgv, grad_tol, "grad_v")
    if L > 1:  # at L = 1 grad_x is exactly 0 (l = 0): checked separately
        assert_rel_close(gx, rgx, grad_tol, "grad_x")
    return out, gv, gx


# ----------------------------------------------------------------------------------------------
# The reference and the gradient formulas (no Triton)
# ----------------------------------------------------------------------------------------------
def test_reference_matches_naive_sum():
    v, x = random_inputs((2, 3), (2, 3), seed=1)
    v, x = v.to(torch.complex128), x.to(torch.complex128)
    L = 7
    naive = torch.zeros(2, L, dtype=torch.float64)
    for b in range(2):
        for l in range(L):
            naive[b, l] = 2 * sum(v[b, n] * torch.exp(x[b, n] * l) for n in range(3)).real
    assert_rel_close(reference.vandermonde(v, x, L), naive, 1e-12)


def test_grad_formulas_match_reference_autograd():
    """grad_v = 2 sum_l g conj(E), grad_x = 2 conj(v) sum_l g l conj(E) (what the kernel
    computes) equal autograd of the reference (complex convention)."""
    v, x = random_inputs((3, 5), (3, 5), seed=2)
    v, x = v.to(torch.complex128), x.to(torch.complex128)
    L = 37
    g = torch.randn(3, L, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rgv, rgx = ref_grads(v, x, L, g)
    ell = torch.arange(L, dtype=torch.float64)
    E = torch.exp(x.unsqueeze(-1) * ell)  # (3, 5, L)
    gv = 2 * (g.unsqueeze(1) * E.conj()).sum(-1)
    gx = 2 * v.conj() * (g.unsqueeze(1) * ell * E.conj()).sum(-1)
    assert_rel_close(gv, rgv, 1e-12, "grad_v")
    assert_rel_close(gx, rgx, 1e-12, "grad_x")


def test_reference_gradcheck():
    v, x = random_inputs((2, 3), (3,), seed=4)
    v = v.to(torch.complex128).requires_grad_()
    x = x.to(torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reference.vandermonde(a, b, 9), (v, x))


def test_make_s4d_inputs():
    for init in ("lin", "inv"):
        g = torch.Generator().manual_seed(0)
        v, x = make_s4d_inputs((3, 2), 8, init, generator=g)
        assert v.shape == x.shape == (3, 2, 8) and v.dtype == x.dtype == torch.complex64
        assert (x.real < 0).all() and torch.isfinite(torch.view_as_real(v)).all()
        dt = -2 * x.real[..., 0]  # Re(A) = -1/2
        assert ((dt > 0.9e-3) & (dt < 1.1e-1)).all()
        v2, x2 = make_s4d_inputs((3, 2), 8, init, generator=torch.Generator().manual_seed(0))
        assert torch.equal(v, v2) and torch.equal(x, x2)
    _, x = make_s4d_inputs(1, 4, "lin", generator=torch.Generator().manual_seed(0))
    dt = -2 * x.real[0, 0]
    assert torch.allclose(x.imag[0] / dt, torch.pi * torch.arange(4.0), rtol=1e-5)
    with pytest.raises(ValueError, match="init"):
        make_s4d_inputs(1, 4, "legs")


# ----------------------------------------------------------------------------------------------
# Input checks (raised before dispatch, so no Triton needed)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, L, match", [
    pytest.param(lambda: (torch.randn(2, 4), torch.randn(2, 4, dtype=torch.complex64)), 8,
                 "complex", id="real-v"),
    pytest.param(lambda: (torch.randn(2, 4, dtype=torch.complex64), torch.randn(2, 4)), 8,
                 "complex", id="real-x"),
    pytest.param(lambda: (torch.randn(2, 4, dtype=torch.complex64),
                          torch.randn(2, 5, dtype=torch.complex64)), 8, "same N", id="N-mismatch"),
    pytest.param(lambda: (torch.randn(2, 4, dtype=torch.complex64),
                          torch.randn(3, 4, dtype=torch.complex64)), 8, "broadcast", id="batch"),
    pytest.param(lambda: (torch.randn(2, 0, dtype=torch.complex64),
                          torch.randn(2, 0, dtype=torch.complex64)), 8, "N must be", id="N0"),
    pytest.param(lambda: (torch.tensor(1j, dtype=torch.complex64),
                          torch.tensor(1j, dtype=torch.complex64)), 8, r"\(\.\.\., N\)",
                 id="0-dim"),
    pytest.param(lambda: (torch.randn(4, dtype=torch.complex64),
                          torch.randn(4, dtype=torch.complex64)), 0, ">= 1", id="L0"),
    pytest.param(lambda: (torch.randn(4, dtype=torch.complex64),
                          torch.randn(4, dtype=torch.complex64)), -3, ">= 1", id="L-neg"),
    pytest.param(lambda: (torch.randn(4, dtype=torch.complex64),
                          torch.randn(4, dtype=torch.complex64)), 8.0, "int", id="L-float"),
    pytest.param(lambda: (torch.randn(4, dtype=torch.complex64),
                          torch.randn(4, dtype=torch.complex64)), True, "int", id="L-bool"),
    pytest.param(lambda: (torch.randn(4, dtype=torch.complex64),
                          torch.randn(4, dtype=torch.complex64)), "8", "int", id="L-str"),
    pytest.param(lambda: (torch.randn(4, dtype=torch.complex64),
                          torch.randn(4, dtype=torch.complex64, device="meta")), 8, "same device",
                 id="devices"),
])
def test_errors(make, L, match):
    v, x = make()
    with pytest.raises(ValueError, match=match):
        vandermonde(v, x, L)


def test_error_bad_backend():
    v = torch.randn(4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="backend"):
        vandermonde(v, v, 8, backend="cuda")


def test_numpy_int_L_and_reference_backend():
    import numpy as np
    v, x = random_inputs((4,), (4,), seed=5)
    out = vandermonde(v, x, np.int64(11), backend="reference")
    assert out.shape == (11,) and out.dtype == torch.float32
    assert_rel_close(out, ref128(v, x, 11), 1e-5)


# ----------------------------------------------------------------------------------------------
# The Triton path
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tdev(device):
    """triton_device for hypothesis tests (which refuse function-scoped fixtures)."""
    from kernels._utils import triton_can_run
    if not triton_can_run(device):
        pytest.skip(f"Triton cannot run on {device}: use a GPU or run pytest with "
                    f"TRITON_INTERPRET=1")
    return device


ANCHORS = [  # (v batch, x batch, N, L)
    pytest.param((), (), 1, 1, id="N1-L1"),
    pytest.param((), (), 1, 17, id="N1-L17"),
    pytest.param((3,), (3,), 2, 15, id="B3-N2-L15"),
    pytest.param((2,), (2,), 7, 16, id="B2-N7-L16"),
    pytest.param((1,), (1,), 15, 257, id="B1-N15-L257"),
    pytest.param((4,), (4,), 16, 31, id="B4-N16-L31"),
    pytest.param((2, 2), (2, 2), 17, 32, id="B2x2-N17-L32"),
    pytest.param((5,), (5,), 31, 33, id="B5-N31-L33"),
    pytest.param((3,), (3,), 32, 100, id="B3-N32-L100"),
    pytest.param((2,), (2,), 33, 255, id="B2-N33-L255"),
    pytest.param((1,), (1,), 40, 300, id="B1-N40-L300"),
    pytest.param((), (3,), 5, 64, id="bcast-v-N5-L64"),
    pytest.param((2, 1), (3,), 3, 65, id="bcast-2x3-N3-L65"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("v_batch, x_batch, N, L", ANCHORS)
def test_vandermonde_fwd_bwd(triton_device, v_batch, x_batch, N, L, nan_poison):
    v, x = random_inputs(v_batch + (N,), x_batch + (N,), seed=N * 1000 + L, device=triton_device)
    check_fwd_bwd(v, x, L, seed=N + L)


@pytest.mark.interpreter
@pytest.mark.parametrize("B, N, L", [
    pytest.param(1, 40, 2000, id="programs4-chunks2-nblocks2"),  # several programs per row
    pytest.param(2, 70, 700, id="fwd-nblocks2"),                  # N > 64: forward n-blocks
    pytest.param(6, 9, 1100, id="one-program-per-row"),           # direct gradients (FINAL)
])
def test_vandermonde_long_rows(triton_device, B, N, L, nan_poison):
    """Rows split over programs, several chunks per program, several n-blocks, both backward
    epilogues (partials + reduction, direct)."""
    P, span = vmod._plan(B, L, triton_device)
    if triton_device.type == "cpu":
        assert (P > 1) == (B < 4)
    v, x = random_inputs((B, N), (B, N), seed=B + N + L, device=triton_device)
    check_fwd_bwd(v, x, L, seed=7)


@pytest.mark.interpreter
def test_vandermonde_L1_grad_x_is_zero(triton_device):
    v, x = random_inputs((3, 5), (3, 5), seed=8, device=triton_device)
    x.requires_grad_()
    out = vandermonde(v, x, 1, backend="triton")
    assert_rel_close(out, ref128(v, x, 1), FWD_TOL)
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.interpreter
@pytest.mark.parametrize("init", ["lin", "inv"])
def test_vandermonde_s4d_inputs(triton_device, init):
    v, x = make_s4d_inputs((3,), 32, init, generator=torch.Generator().manual_seed(9),
                           device=triton_device)
    check_fwd_bwd(v, x, 600, seed=10)


@st.composite
def broadcast_pair(draw):
    """Two batch shapes that broadcast: a common shape, each with some dims set to 1 or dropped."""
    shape = draw(batch_shapes(max_dims=2, max_size=4))

    def variant():
        s = tuple(d if draw(st.booleans()) else 1 for d in shape)
        return s[draw(st.integers(0, len(s))):]
    return variant(), variant()


@pytest.mark.interpreter
@given(pair=broadcast_pair(), N=dims(40), L=dims(300), seed=seeds)
def test_vandermonde_property(tdev, pair, N, L, seed):
    """Forward and both gradients against complex128, any N, L, batch shapes and broadcasting."""
    v_batch, x_batch = pair
    v, x = random_inputs(v_batch + (N,), x_batch + (N,), seed=seed, device=tdev,
                         decay=seed % 4 != 0)
    out, _, _ = check_fwd_bwd(v, x, L, seed=seed)
    assert out.shape == torch.broadcast_shapes(v_batch, x_batch) + (L,)


@pytest.mark.interpreter
@given(N=dims(24), L=dims(200), seed=seeds)
def test_vandermonde_linear_in_v(tdev, N, L, seed):
    """vandermonde(a v1 + v2, x) = a vandermonde(v1, x) + vandermonde(v2, x) for real a."""
    v1, x = random_inputs((2, N), (2, N), seed=seed, device=tdev)
    v2, _ = random_inputs((2, N), (2, N), seed=seed + 1, device=tdev)
    lhs = vandermonde(0.5 * v1 + v2, x, L, backend="triton")
    rhs = 0.5 * vandermonde(v1, x, L, backend="triton") + vandermonde(v2, x, L, backend="triton")
    assert_rel_close(lhs, rhs, 3e-6)


@pytest.mark.interpreter
def test_vandermonde_strided_inputs(triton_device):
    """Non-contiguous v (a strided slice), x (transposed storage), conjugate views, and an
    expanded incoming gradient (stride 0)."""
    N, L = 6, 50
    vbig, xbig = random_inputs((3, 2 * N + 1), (N, 3), seed=11, device=triton_device)
    v = vbig[:, 1::2]
    x = xbig.t()  # (3, N), strides (1, 3)
    assert not v.is_contiguous() and not x.is_contiguous()
    check_fwd_bwd(v, x, L, seed=12)
    check_fwd_bwd(v.conj(), x.conj(), L, seed=13)
    # out.sum() backpropagates an expanded (stride-0) gradient
    v_ = v.detach().requires_grad_()
    x_ = x.detach().requires_grad_()
    gv, gx = torch.autograd.grad(vandermonde(v_, x_, L, backend="triton").sum(), (v_, x_))
    rgv, rgx = ref_grads(v, x, L, torch.ones(3, L))
    assert_rel_close(gv, rgv, GRAD_TOL, "grad_v")
    assert_rel_close(gx, rgx, GRAD_TOL, "grad_x")


@pytest.mark.interpreter
def test_vandermonde_many_broadcast_dims(triton_device):
    """Five batch dims that cannot be merged (the launcher materialises the O(B N) rows)."""
    v, x = random_inputs((2, 1, 2, 1, 2, 3), (1, 2, 1, 2, 1, 3), seed=14, device=triton_device)
    out, _, _ = check_fwd_bwd(v, x, 20, seed=15)
    assert out.shape == (2, 2, 2, 2, 2, 20)


@pytest.mark.interpreter
def test_vandermonde_empty_batch(triton_device):
    v = torch.zeros(0, 4, dtype=torch.complex64, device=triton_device, requires_grad=True)
    x = torch.zeros(3, 1, 4, dtype=torch.complex64, device=triton_device, requires_grad=True)
    out = vandermonde(v, x, 5, backend="triton")
    assert out.shape == (3, 0, 5)
    gv, gx = torch.autograd.grad(out.sum(), (v, x))
    assert gv.shape == v.shape and torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.interpreter
def test_vandermonde_deterministic(triton_device):
    v, x = random_inputs((2, 20), (2, 20), seed=16, device=triton_device)
    v.requires_grad_()
    x.requires_grad_()
    runs = []
    for _ in range(2):
        out = vandermonde(v, x, 900, backend="triton")
        runs.append((out, *torch.autograd.grad(out.square().sum(), (v, x))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_vandermonde_complex128_goes_to_reference(triton_device):
    v, x = random_inputs((2, 5), (2, 5), seed=17, device=triton_device)
    v, x = v.to(torch.complex128), x.to(torch.complex128)
    out = vandermonde(v, x, 30)  # auto: the reference, in double precision
    assert out.dtype == torch.float64
    assert_rel_close(out, ref128(v, x, 30), 1e-12)
    with pytest.raises(ValueError, match="complex64"):
        vandermonde(v, x, 30, backend="triton")


@pytest.mark.interpreter
def test_vandermonde_rejects_huge_L(triton_device):
    v = torch.zeros(1, dtype=torch.complex64, device=triton_device)
    with pytest.raises(ValueError, match="2\\^24"):
        vandermonde(v, v, 2 ** 24 + 1, backend="triton")


@pytest.mark.interpreter
def test_vandermonde_custom_ops_opcheck(triton_device):
    """Schema, fake (meta) implementations and autograd registration of the custom ops."""
    v, x = random_inputs((2, 5), (5,), seed=18, device=triton_device)
    v_r = torch.view_as_real(v).requires_grad_()
    x_r = torch.view_as_real(x).requires_grad_()
    torch.library.opcheck(torch.ops.sashimi_kernels.vandermonde_fwd.default, (v_r, x_r, 19))
    g = torch.randn(2, 19, device=triton_device)
    torch.library.opcheck(torch.ops.sashimi_kernels.vandermonde_bwd.default,
                          (g, v_r.detach(), x_r.detach(), 19))


@pytest.mark.interpreter
def test_vandermonde_torch_compile(triton_device):
    """torch.compile(fullgraph=True) traces a function calling the op (fake impls, autograd)."""
    def f(v, x):
        return (vandermonde(v, x, 40, backend="triton") * 1.5).sum(-1)

    v, x = random_inputs((3, 8), (8,), seed=19, device=triton_device)
    v.requires_grad_()
    x.requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(v, x)
    assert_rel_close(out, 1.5 * ref128(v, x, 40).sum(-1), FWD_TOL)
    gv, gx = torch.autograd.grad(out.sum(), (v, x))
    rgv, rgx = ref_grads(v, x, 40, torch.full((3, 40), 1.5))
    assert_rel_close(gv, rgv, GRAD_TOL, "grad_v")
    assert_rel_close(gx, rgx, GRAD_TOL, "grad_x")


# ----------------------------------------------------------------------------------------------
# GPU only: accuracy at the anchor lengths and the memory bound
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("init", ["lin", "inv"])
def test_vandermonde_accuracy_L65536(init):
    """Relative error <= 1e-5 against complex128 at L = 65536 (S4D inputs), forward and grads."""
    B, N, L = 16, 32, 65536
    v, x = make_s4d_inputs((B,), N, init, generator=torch.Generator().manual_seed(20),
                           device="cuda")
    v.requires_grad_()
    x.requires_grad_()
    out = vandermonde(v, x, L)
    g = torch.randn(B, L, generator=torch.Generator().manual_seed(21)).cuda()
    gv, gx = torch.autograd.grad(out, (v, x), g)
    for b in range(0, B, 4):  # the complex128 reference in slices (it materialises N x L)
        sl = slice(b, b + 4)
        ref = reference.vandermonde(v[sl].detach(), x[sl].detach(), L,
                                    compute_dtype=torch.complex128)
        assert rel_error(out[sl], ref) <= 1e-5
        v2 = v[sl].detach().to(torch.complex128).requires_grad_()
        x2 = x[sl].detach().to(torch.complex128).requires_grad_()
        rgv, rgx = torch.autograd.grad(reference.vandermonde(v2, x2, L), (v2, x2), g[sl].double())
        assert rel_error(gv[sl], rgv) <= 1e-4
        assert rel_error(gx[sl], rgx) <= 1e-4


@pytest.mark.gpu
def test_vandermonde_memory_is_O_B_N_plus_L():
    """Forward + backward at B = 1024, N = 32, L = 16384: peak extra memory a few (B, L) buffers,
    far below one (B, N, L) intermediate (2 GiB in fp32)."""
    B, N, L = 1024, 32, 16384
    v, x = make_s4d_inputs((B,), N, "lin", generator=torch.Generator().manual_seed(22),
                           device="cuda")
    v.requires_grad_()
    x.requires_grad_()
    g = torch.randn(B, L, device="cuda")
    vandermonde(v, x, L).backward(g)  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vandermonde(v, x, L).backward(g)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 3 * B * L * 4 + 64 * B * N * 8, f"peak extra memory {extra / 2**20:.1f} MiB"


@pytest.mark.gpu
@settings(max_examples=60)  # each new size class autotunes
@given(pair=broadcast_pair(), N=dims(70), L=dims(5000), seed=seeds)
def test_vandermonde_property_gpu(pair, N, L, seed):
    v_batch, x_batch = pair
    v, x = random_inputs(v_batch + (N,), x_batch + (N,), seed=seed, device="cuda")
    check_fwd_bwd(v, x, L, seed=seed, fwd_tol=2e-5)
