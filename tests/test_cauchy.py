"""kernels.cauchy: the S4 Cauchy sum over conjugate pairs, forward and gradients.

Oracle: kernels.reference.cauchy in complex128 (forward: relative error, max abs error / max abs
value, <= 1e-5; gradients of v and w against its autograd: <= 1e-4). Interpreter-marked tests
run the Triton code (CUDA, or CPU under TRITON_INTERPRET=1); the others check the reference,
the gradient formulas the kernel implements, the input helper and the errors.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernels import reference
from kernels.cauchy import cauchy
from kernels.ops import s4_like_inputs
from conftest import assert_rel_close, rel_error
from strategies import batch_shapes, dims, seeds

CA = importlib.import_module("kernels.cauchy")  # the module (kernels.cauchy is the function)

FWD_TOL = 1e-5
GRAD_TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _cn(shape, gen, dtype=torch.float64):
    return torch.complex(torch.randn(shape, generator=gen, dtype=dtype),
                         torch.randn(shape, generator=gen, dtype=dtype))


def make_inputs(v_batch, w_batch, N, L, gen, device, *, z_kind="axis"):
    """complex64 v (*v_batch, N), z (L,), w (*w_batch, N), well conditioned: Re(w) <= -0.1 and
    z in the closed right half-plane ("axis": on the imaginary axis, as in S4; "plane": off it),
    so |z - w| >= 0.1 and fp32 can meet the tolerances."""
    v = _cn((*v_batch, N), gen)
    w = _cn((*w_batch, N), gen)
    w = torch.complex(-(0.1 + w.real.abs()), 3 * w.imag)
    y = 4 * torch.randn(L, generator=gen, dtype=torch.float64)
    x = torch.zeros(L, dtype=torch.float64) if z_kind == "axis" else \
        torch.rand(L, generator=gen, dtype=torch.float64) * 2
    z = torch.complex(x, y)
    return tuple(t.to(torch.complex64).to(device) for t in (v, z, w))


def ref_fwd_bwd(v, z, w, G):
    """Reference output and (grad_v, grad_w) in complex128 for the incoming gradient G."""
    v64 = v.detach().to(torch.complex128).requires_grad_(True)
    w64 = w.detach().to(torch.complex128).requires_grad_(True)
    out = reference.cauchy(v64, z.detach().to(torch.complex128), w64)
    gv, gw = torch.autograd.grad(out, (v64, w64), G.to(torch.complex128))
    return out.detach(), gv, gw


def check_against_reference(v, z, w, gen, *, backend="triton", fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    """Run the op (forward + backward for a random G) and compare with the complex128 oracle."""
    v = v.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = cauchy(v, z, w, backend=backend)
    assert out.dtype == torch.complex64
    G = _cn(out.shape, gen, torch.float32).to(out.device)
    gv, gw = torch.autograd.grad(out, (v, w), G)
    ref, rgv, rgw = ref_fwd_bwd(v, z, w, G)
    assert_rel_close(out, ref, fwd_tol, "out")
    assert_rel_close(gv, rgv, grad_tol, "grad_v")
    assert_rel_close(gw, rgw, grad_tol, "grad_w")
    return out, gv, gw


@st.composite
def broadcast_pair(draw, max_dims=2, max_size=4):
    """(v_batch, w_batch) that broadcast: drop leading dims and set dims to 1 on either side."""
    out = draw(batch_shapes(max_dims=max_dims, max_size=max_size))

    def side():
        keep = draw(st.integers(0, len(out)))
        shape = list(out[len(out) - keep:])
        for i in range(len(shape)):
            if draw(st.booleans()) and draw(st.booleans()):
                shape[i] = 1
        return tuple(shape)

    return side(), side()


# ------------------------------------------------------------------------------------------------
# the reference, the formulas, the helper (no Triton)
# ------------------------------------------------------------------------------------------------

def test_reference_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    v, z, w = (_cn(s, g) for s in ((2, 3), (5,), (2, 3)))
    out = reference.cauchy(v, z, w)
    naive = torch.zeros(2, 5, dtype=torch.complex128)
    for b in range(2):
        for n in range(3):
            for l in range(5):
                naive[b, l] += v[b, n] / (z[l] - w[b, n]) + v[b, n].conj() / (z[l] - w[b, n].conj())
    assert rel_error(out, naive) < 1e-13


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(2)
    v = _cn((2, 3), g).requires_grad_(True)
    w = (_cn((3,), g) - 2).requires_grad_(True)
    z = _cn((4,), g)
    assert torch.autograd.gradcheck(lambda v, w: reference.cauchy(v, z, w), (v, w))


def test_gradient_formulas_match_autograd():
    """The sums the backward kernel computes: grad_v = conj(T1), grad_w = conj(v T2), with
    T1 = sum_l (alpha - beta w) / E, T2 = sum_l (gamma - 2 alpha w + beta w^2) / E^2,
    E = (z - w)(conj z - w), alpha = 2 Re(G z), beta = 2 Re G, gamma = 2 Re(G z^2);
    and the forward's pair fraction (a z - b) / ((z - w)(z - conj w))."""
    g = torch.Generator().manual_seed(3)
    v, w, z, G = _cn((3, 5), g), _cn((3, 5), g), _cn((7,), g), _cn((3, 7), g)
    out, rgv, rgw = ref_fwd_bwd(v, z, w, G)
    vv, ww, Gl = v[..., None], w[..., None], G[:, None, :]
    alpha, beta, gamma = 2 * (Gl * z).real, 2 * Gl.real, 2 * (Gl * z * z).real
    E = (z - ww) * (z.conj() - ww)
    T1 = ((alpha - beta * ww) / E).sum(-1)
    T2 = ((gamma - 2 * alpha * ww + beta * ww ** 2) / E ** 2).sum(-1)
    assert rel_error(T1.conj(), rgv) < 1e-12
    assert rel_error((v * T2).conj(), rgw) < 1e-12
    pair = ((2 * vv.real * (z - ww.real) - 2 * vv.imag * ww.imag) / ((z - ww) * (z - ww.conj())))
    assert rel_error(pair.sum(-2), out) < 1e-12


def test_asymptotic_expansion():
    """Nodes with |z| > 1e8 use sum_k s_k / z^(k+1), s_k = sum_n 2 Re(v w^k), k <= 3."""
    g = torch.Generator().manual_seed(4)
    v, w = _cn((4,), g), _cn((4,), g)
    z = torch.tensor([1e8j, -3e8 + 2e9j, 1e12 + 0j], dtype=torch.complex128)
    s = [(2 * (v * w ** k).real).sum() for k in range(4)]
    series = sum(s[k] / z ** (k + 1) for k in range(4))
    assert rel_error(series, reference.cauchy(v, z, w)) < 1e-14


def test_s4_like_inputs():
    g = torch.Generator().manual_seed(5)
    v, z, w = s4_like_inputs(3, 8, 64, sums=4, generator=g)
    assert v.shape == (4, 3, 8) and w.shape == (3, 8) and z.shape == (33,)
    assert v.dtype == z.dtype == w.dtype == torch.complex64
    assert z[:-1].real.abs().max() < 1e-6 and z[0] == 0
    assert z.imag[-1].abs() > 1e15  # the Nyquist node, Omega = -1 up to rounding
    dt = -2 * w.real[:, 0]
    assert ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    assert torch.allclose(w.imag / dt[:, None], math.pi * torch.arange(8.0).expand(3, 8), rtol=1e-5)
    v2, _, w2 = s4_like_inputs(3, 8, 64, generator=g)
    assert v2.shape == (3, 8) and w2.shape == (3, 8)


def _inputs(**shapes):
    return lambda: {k: torch.zeros(s, dtype=torch.complex64) for k, s in shapes.items()}


def _c(*shape, dtype=torch.complex64):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("make, match", [
    pytest.param(_inputs(v=(3, 4), z=(5,), w=(3, 5)), "same N", id="N-mismatch"),
    pytest.param(_inputs(v=(2, 4), z=(5,), w=(3, 4)), "do not broadcast", id="batch-mismatch"),
    pytest.param(_inputs(v=(3, 4), z=(5, 1), w=(3, 4)), "z must be 1-D", id="z-2d"),
    pytest.param(_inputs(v=(3, 4), z=(), w=(3, 4)), "z must be 1-D", id="z-0d"),
    pytest.param(_inputs(v=(3, 4), z=(0,), w=(3, 4)), "at least one node", id="L0"),
    pytest.param(_inputs(v=(3, 0), z=(5,), w=(3, 0)), "N must be >= 1", id="N0"),
    pytest.param(_inputs(v=(), z=(5,), w=(4,)), r"\(\.\.\., N\)", id="v-0d"),
    pytest.param(lambda: dict(v=torch.zeros(3, 4), z=_c(5), w=_c(3, 4)), "v must be complex",
                 id="v-real"),
    pytest.param(lambda: dict(v=_c(3, 4), z=torch.zeros(5), w=_c(3, 4)), "z must be complex",
                 id="z-real"),
    pytest.param(lambda: dict(v=_c(3, 4), z=_c(5), w=[0.0] * 4), "w must be a tensor", id="w-list"),
    pytest.param(lambda: dict(v=_c(3, 4, dtype=torch.complex32), z=_c(5, dtype=torch.complex32),
                              w=_c(3, 4, dtype=torch.complex32)), "complex64 or complex128",
                 id="chalf", marks=pytest.mark.filterwarnings("ignore:ComplexHalf")),
])
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        cauchy(**make())


def test_error_devices():
    v = torch.zeros(3, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="same device"):
        cauchy(v, torch.zeros(5, dtype=torch.complex64, device="meta"), v)


def test_error_backend():
    v = torch.zeros(3, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="backend"):
        cauchy(v, torch.zeros(5, dtype=torch.complex64), v, backend="cuda")


def test_reference_backend_is_the_reference():
    g = torch.Generator().manual_seed(6)
    v, z, w = make_inputs((2,), (2,), 3, 9, g, "cpu")
    assert torch.equal(cauchy(v, z, w, backend="reference"), reference.cauchy(v, z, w))


def test_batch_layout_coalesces_without_copies():
    """S4's v (4, H, N) against w (H, N): two kernel dims, w with stride 0 on the first."""
    v = torch.view_as_real(torch.zeros(4, 6, 5, dtype=torch.complex64))
    w = torch.view_as_real(torch.zeros(6, 5, dtype=torch.complex64))
    outer, sizes, sv, sw = CA._batch_layout((4, 6), v, w)
    assert outer == [(0, 0, 0)] and sizes == (1, 4, 6)
    assert sv == (0, 60, 10) and sw == (0, 0, 10)
    # both contiguous over the same batch: one merged dim
    _, sizes, sv, sw = CA._batch_layout((4, 6), v, torch.view_as_real(torch.zeros(4, 6, 5, dtype=torch.complex64)))
    assert sizes == (1, 1, 24) and sv == (0, 0, 10) and sw == (0, 0, 10)
    # four alternating broadcast dims: one leading dim left to the host loop
    v4 = torch.view_as_real(torch.zeros(2, 1, 3, 1, 5, dtype=torch.complex64))
    w4 = torch.view_as_real(torch.zeros(1, 2, 1, 3, 5, dtype=torch.complex64))
    outer, sizes, sv, sw = CA._batch_layout((2, 2, 3, 3), v4, w4)
    assert sizes == (2, 3, 3) and len(outer) == 2 and outer[1] == (30, 0, 18)


# ------------------------------------------------------------------------------------------------
# the Triton path
# ------------------------------------------------------------------------------------------------

ANCHORS = [
    # v batch, w batch, N, L
    pytest.param((), (), 1, 1, id="N1-L1"),
    pytest.param((3,), (3,), 2, 16, id="B3-N2-L16"),
    pytest.param((2,), (2,), 3, 15, id="B2-N3-L15"),
    pytest.param((5,), (5,), 7, 17, id="B5-N7-L17"),
    pytest.param((1,), (1,), 16, 31, id="B1-N16-L31"),
    pytest.param((4,), (4,), 17, 32, id="B4-N17-L32"),
    pytest.param((2, 3), (3,), 31, 33, id="K2-H3-N31-L33-bcast-w"),
    pytest.param((3,), (2, 3), 32, 63, id="H3-K2-N32-L63-bcast-v"),
    pytest.param((17,), (17,), 33, 65, id="B17-N33-L65"),
    pytest.param((4, 1), (1, 5), 5, 257, id="outer-4x5-N5-L257"),
    pytest.param((2, 1, 3, 1), (1, 2, 1, 3), 3, 7, id="four-dims-host-loop"),
    pytest.param((), (6,), 4, 97, id="v-shared-N4-L97"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("v_batch, w_batch, N, L", ANCHORS)
def test_cauchy_anchor(triton_device, nan_poison, v_batch, w_batch, N, L):
    g = torch.Generator().manual_seed(N * 1000 + L)
    v, z, w = make_inputs(v_batch, w_batch, N, L, g, triton_device,
                          z_kind="plane" if L % 2 else "axis")
    out, gv, gw = check_against_reference(v, z, w, g)
    assert out.shape == (*torch.broadcast_shapes(v_batch, w_batch), L)
    assert gv.shape == v.shape and gw.shape == w.shape


@pytest.mark.interpreter
@given(pair=broadcast_pair(), N=dims(40), L=dims(300), seed=seeds,
       z_kind=st.sampled_from(["axis", "plane"]))
@example(pair=((4, 4), (4,)), N=40, L=300, seed=0, z_kind="axis")
@example(pair=((), (3, 1)), N=1, L=1, seed=1, z_kind="plane")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cauchy_matches_reference(triton_device, pair, N, L, seed, z_kind):
    g = torch.Generator().manual_seed(seed)
    v, z, w = make_inputs(*pair, N, L, g, triton_device, z_kind=z_kind)
    check_against_reference(v, z, w, g)


@pytest.mark.interpreter
def test_cauchy_s4_like(triton_device):
    """S4's call: four Woodbury sums v (4, H, N) against w = dt Lambda (H, N), N = 32 pairs, the
    rfft nodes of a length-512 sequence (the Nyquist node, |z| ~ 3e16, included)."""
    g = torch.Generator().manual_seed(7)
    v, z, w = s4_like_inputs(3, 32, 512, sums=4, generator=g, device=triton_device)
    out, _, _ = check_against_reference(v, z, w, g)
    ref = reference.cauchy(v.to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128))
    # the Nyquist node on its own scale (~1e-16): the asymptotic path
    assert rel_error(out[..., -1], ref[..., -1]) < 1e-5


@pytest.mark.interpreter
def test_cauchy_huge_nodes(triton_device):
    """Nodes far out (|z| from 1e7 to 1e30) next to ordinary ones: each on its own scale."""
    g = torch.Generator().manual_seed(8)
    v, z, w = make_inputs((3,), (3,), 6, 8, g, triton_device)
    far = torch.tensor([3e7j, 2e8 + 1e8j, -1e9j, 1e12, 4e16j, -2e20 + 1e19j, 1e30j, 5e8],
                       dtype=torch.complex64, device=triton_device)
    z = torch.cat([z, far])
    v.requires_grad_(True)
    w.requires_grad_(True)
    out = cauchy(v, z, w, backend="triton")
    G = _cn(out.shape, g, torch.float32).to(triton_device)
    G[:, 8:] *= 1e6  # S4 scales its far nodes back up: their gradient is large
    gv, gw = torch.autograd.grad(out, (v, w), G)
    ref, rgv, rgw = ref_fwd_bwd(v, z, w, G)
    for j in range(8, 16):
        assert rel_error(out[:, j], ref[:, j]) < 1e-5, f"node {z[j]}"
    assert_rel_close(out, ref, FWD_TOL)
    assert_rel_close(gv, rgv, GRAD_TOL, "grad_v")
    assert_rel_close(gw, rgw, GRAD_TOL, "grad_w")


@pytest.mark.interpreter
def test_cauchy_asymptotic_path(triton_device):
    """Only far nodes, with |w| / |z| up to ~1e-2 so every term of the expansion (forward
    s_0..s_3, backward P_1..P_5) shows above fp32 rounding: each node to 1e-6, and the
    gradients, which come from these nodes alone, to 1e-5."""
    g = torch.Generator().manual_seed(18)
    N = 5
    w = 5e5 * torch.complex(-0.2 - torch.rand(2, N, generator=g), 2 * torch.randn(2, N, generator=g))
    v = _cn((2, N), g, torch.float32)
    z = torch.tensor([1.2e8 + 0j, -3e8j, 2e8 + 2e8j, 7e8j, 2e9 - 1e9j, 1e12j], dtype=torch.complex64)
    v, z, w = (t.to(torch.complex64).to(triton_device) for t in (v, z, w))
    v.requires_grad_(True)
    w.requires_grad_(True)
    out = cauchy(v, z, w, backend="triton")
    G = _cn(out.shape, g, torch.float32).to(triton_device)
    gv, gw = torch.autograd.grad(out, (v, w), G)
    ref, rgv, rgw = ref_fwd_bwd(v, z, w, G)
    for j in range(z.shape[0]):
        assert rel_error(out[:, j], ref[:, j]) < 1e-6, f"node {z[j]}"
    assert_rel_close(gv, rgv, 1e-5, "grad_v")
    assert_rel_close(gw, rgw, 1e-5, "grad_w")


@pytest.mark.interpreter
def test_cauchy_backward_chunks(triton_device, nan_poison, monkeypatch):
    """The backward splits L into chunks whose partials the host sums; force more chunks than
    there are blocks, so some are empty (and must write zeros)."""
    g = torch.Generator().manual_seed(9)
    v, z, w = make_inputs((2,), (2,), 5, 1100, g, triton_device)
    monkeypatch.setattr(CA, "_n_chunks", lambda rows, L: 5)
    check_against_reference(v, z, w, g)


@pytest.mark.interpreter
def test_cauchy_strided_inputs(triton_device):
    """Non-contiguous v (transposed, stepped), z (stepped), w (a lazy conj view), and a
    gradient with stride 0 (from .sum())."""
    g = torch.Generator().manual_seed(10)
    v, z, w = make_inputs((6,), (6,), 10, 40, g, triton_device)
    v_t = v.t().contiguous().t()                    # (6, 10) with strides (1, 6)
    v_s = torch.stack([v, v], -1).flatten(-2)[:, ::2]  # stride 2 along N
    z_s = torch.stack([z, z], -1).flatten()[::2]
    w_c = w.conj().resolve_conj().conj()            # conj bit set
    assert not v_t.is_contiguous() and v_s.stride(-1) == 2 and z_s.stride(0) == 2 and w_c.is_conj()
    ref = reference.cauchy(v.to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128))
    for vv, zz, ww in [(v_t, z, w), (v_s, z_s, w), (v, z, w_c)]:
        assert_rel_close(cauchy(vv, zz, ww, backend="triton"), ref, FWD_TOL)
    # stride-0 incoming gradient
    vg = v.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    cauchy(vg, z, wg, backend="triton").real.sum().backward()
    _, rgv, rgw = ref_fwd_bwd(v, z, w, torch.ones(6, 40, dtype=torch.complex64))
    assert_rel_close(vg.grad, rgv, GRAD_TOL, "grad_v")
    assert_rel_close(wg.grad, rgw, GRAD_TOL, "grad_w")


@pytest.mark.interpreter
def test_cauchy_empty_batch(triton_device):
    g = torch.Generator().manual_seed(19)
    v, z, w = make_inputs((0, 3), (3,), 4, 9, g, triton_device)
    v.requires_grad_(True)
    w.requires_grad_(True)
    out = cauchy(v, z, w, backend="triton")
    assert out.shape == (0, 3, 9)
    out.abs().sum().backward()
    assert v.grad.shape == v.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.interpreter
def test_cauchy_linear_in_v(triton_device):
    """A property of the kernel alone: out(a v1 + b v2) = a out(v1) + b out(v2) for real a, b
    (the op is real-linear in v, not complex-linear: conj(v) appears)."""
    g = torch.Generator().manual_seed(11)
    v1, z, w = make_inputs((3,), (3,), 9, 50, g, triton_device)
    v2 = make_inputs((3,), (3,), 9, 50, g, triton_device)[0]
    lhs = cauchy(0.7 * v1 - 1.3 * v2, z, w, backend="triton")
    rhs = 0.7 * cauchy(v1, z, w, backend="triton") - 1.3 * cauchy(v2, z, w, backend="triton")
    assert rel_error(lhs, rhs) < 1e-5
    assert rel_error(cauchy(1j * v1, z, w, backend="triton"), 1j * cauchy(v1, z, w, backend="triton")) > 1e-2


@pytest.mark.interpreter
def test_cauchy_gradient_flags(triton_device):
    """Only the inputs that require grad get one; z gets none on the Triton path."""
    g = torch.Generator().manual_seed(12)
    v, z, w = make_inputs((2,), (2,), 4, 20, g, triton_device)
    w.requires_grad_(True)
    z.requires_grad_(True)
    cauchy(v, z, w, backend="triton").abs().sum().backward()
    assert v.grad is None and z.grad is None and w.grad is not None


@pytest.mark.interpreter
def test_cauchy_complex128(triton_device):
    """auto keeps complex128 on the reference (exact); 'triton' refuses it."""
    g = torch.Generator().manual_seed(13)
    v, z, w = (t.to(torch.complex128) for t in make_inputs((2,), (2,), 3, 11, g, triton_device))
    assert torch.equal(cauchy(v, z, w), reference.cauchy(v, z, w))
    with pytest.raises(ValueError, match="complex64"):
        cauchy(v, z, w, backend="triton")


@pytest.mark.interpreter
def test_cauchy_torch_compile(triton_device):
    """fullgraph torch.compile through the custom op (fake impls, registered autograd)."""
    g = torch.Generator().manual_seed(14)
    v, z, w = make_inputs((2, 3), (3,), 5, 24, g, triton_device)

    def fn(v, z, w):
        k = cauchy(v, z, w, backend="triton")
        return (k[0] * k[1].conj()).real.sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ve, we = v.clone().requires_grad_(True), w.clone().requires_grad_(True)
    vc, wc = v.clone().requires_grad_(True), w.clone().requires_grad_(True)
    eager, got = fn(ve, z, we), compiled(vc, z, wc)
    assert_rel_close(got, eager, 1e-6)
    eager.sum().backward()
    got.sum().backward()
    assert_rel_close(vc.grad, ve.grad, 1e-6, "grad_v")
    assert_rel_close(wc.grad, we.grad, 1e-6, "grad_w")


@pytest.mark.interpreter
def test_cauchy_opcheck(triton_device):
    """torch.library's own checks of the registration (schema, fake impl, autograd)."""
    g = torch.Generator().manual_seed(15)
    v, z, w = make_inputs((2,), (2,), 3, 10, g, triton_device)
    args = [torch.view_as_real(t) for t in (v, z, w)]
    args[0].requires_grad_(True)
    args[2].requires_grad_(True)
    torch.library.opcheck(torch.ops.sashimi_kernels.cauchy_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    grad = torch.view_as_real(_cn((2, 10), g, torch.float32)).to(triton_device)
    torch.library.opcheck(torch.ops.sashimi_kernels.cauchy_bwd.default,
                          [grad] + [a.detach() for a in args],
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------

def _chunked_reference(v, z, w, G=None, chunk=2048):
    """complex128 reference (and its v, w gradients for G) computed over chunks of z, so the
    (B, N, L) intermediate never exceeds B N chunk."""
    v64 = v.detach().to(torch.complex128).requires_grad_(G is not None)
    w64 = w.detach().to(torch.complex128).requires_grad_(G is not None)
    z64 = z.to(torch.complex128)
    outs, gv, gw = [], 0, 0
    for s in range(0, z.shape[0], chunk):
        o = reference.cauchy(v64, z64[s:s + chunk], w64)
        if G is not None:
            a, b = torch.autograd.grad(o, (v64, w64), G[..., s:s + chunk].to(torch.complex128))
            gv, gw = gv + a, gw + b
        outs.append(o.detach())
    return torch.cat(outs, -1), gv, gw


@pytest.mark.gpu
@pytest.mark.parametrize("dt_min, dt_max", [(1e-3, 1e-1), (1e-3, 1.1e-3), (0.09, 0.1)])
def test_cauchy_accuracy_L65536(dt_min, dt_max):
    """The accuracy bar: <= 1e-5 relative to complex128 for S4-like inputs up to L = 65536
    (65537 nodes: a length-131072 sequence), N = 32 pairs, gradients <= 1e-4."""
    g = torch.Generator().manual_seed(16)
    v, z, w = s4_like_inputs(8, 32, 2 * 65536, sums=4, dt_min=dt_min, dt_max=dt_max, generator=g,
                             device="cuda")
    assert z.shape[0] == 65537
    v.requires_grad_(True)
    w.requires_grad_(True)
    out = cauchy(v, z, w, backend="triton")
    G = _cn(out.shape, g, torch.float32).to("cuda")
    gv, gw = torch.autograd.grad(out, (v, w), G)
    ref, rgv, rgw = _chunked_reference(v, z, w, G)
    assert_rel_close(out, ref, FWD_TOL)
    for r in range(8):  # every channel on its own scale too
        assert rel_error(out[:, r], ref[:, r]) <= FWD_TOL
    assert_rel_close(gv, rgv, GRAD_TOL, "grad_v")
    assert_rel_close(gw, rgw, GRAD_TOL, "grad_w")


@pytest.mark.gpu
def test_cauchy_broadcast_memory():
    """v (4, H, N) against w (H, N) at B = 4 H = 1024, L = 16384: forward + backward stay within
    a few output-sized buffers, O(B (N + L)); a (B, N, L) intermediate would be 4.3 GB."""
    H, N, L = 256, 32, 16384
    g = torch.Generator().manual_seed(17)
    v, z, w = s4_like_inputs(H, N, 2 * (L - 1), sums=4, generator=g, device="cuda")
    assert z.shape[0] == L
    v.requires_grad_(True)
    w.requires_grad_(True)
    G = _cn((4, H, L), g, torch.float32).to("cuda")
    out = cauchy(v, z, w, backend="triton")           # compile and autotune first
    torch.autograd.grad(out, (v, w), G)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = cauchy(v, z, w, backend="triton")
    gv, gw = torch.autograd.grad(out, (v, w), G)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_bytes = 4 * H * L * 8
    assert extra <= 2 * out_bytes + 64 * 4 * H * N * 16, f"{extra / 2**20:.0f} MiB"
    assert gv.shape == v.shape and gw.shape == w.shape


@pytest.mark.gpu
@pytest.mark.parametrize("B, L", [(1, 1), (3, 100000), (70000, 3), (1024, 16384)])
def test_cauchy_gpu_shapes(B, L):
    """Extreme shapes on the GPU: one row, very long rows, very many rows, the anchor."""
    g = torch.Generator().manual_seed(B + L)
    v, z, w = make_inputs((B,), (B,), 32, L, g, "cuda")
    v.requires_grad_(True)
    w.requires_grad_(True)
    out = cauchy(v, z, w, backend="triton")
    G = _cn(out.shape, g, torch.float32).to("cuda")
    gv, gw = torch.autograd.grad(out, (v, w), G)
    ref, rgv, rgw = _chunked_reference(v, z, w, G, chunk=max(1, 2**27 // (B * 32)))
    assert_rel_close(out, ref, FWD_TOL)
    assert_rel_close(gv, rgv, GRAD_TOL, "grad_v")
    assert_rel_close(gw, rgw, GRAD_TOL, "grad_w")
