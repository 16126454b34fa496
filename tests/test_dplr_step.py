"""kernels.dplr_step: the exact DPLR bilinear step (in place) against kernels.reference.dplr_step,
and the reference itself against a dense complex128 bilinear step on the full 2N state.

The step constants come from a real DPLR setup built here (Lambda, P, Q, B, C, dt) with the
formulas of the reference docstring, so the Woodbury algebra is exercised as the model uses it.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import reference
from kernels._utils import interpreting
from conftest import assert_rel_close
from strategies import dims, seeds
import step_helpers
from step_helpers import C128, F64, TOL, check_in_place, lower


def dplr_system(H, N, r, seed, q_equals_p=False):
    """A stable continuous DPLR system in complex128: A = Lambda - P Q^* over the full 2N state,
    shaped like S4's normal-plus-low-rank HiPPO: Lambda_n = -1/2 + i pi n, Q = P + delta with
    ||P[k]|| = sqrt(N) per channel (so the low-rank part is as large as the diagonal one) and
    ||delta[k]|| = 0.2 / (r sqrt(N)). Then A + A^* <= -1 + 2 ||P~ delta~^*|| <= -0.2 (P P^* is
    positive semidefinite): every eigenvalue of A has a negative real part and the bilinear
    step is a contraction."""
    g = torch.Generator().manual_seed(seed)
    dt = 0.01 + 0.09 * torch.rand(H, 1, generator=g, dtype=F64)
    lam = torch.complex(-0.5 * torch.ones(H, N, dtype=F64),
                        math.pi * torch.arange(N, dtype=F64).expand(H, N))

    def low_rank(norm):
        X = torch.randn(r, H, N, generator=g, dtype=C128)
        return X / X.abs().pow(2).sum(-1, keepdim=True).sqrt() * norm

    P = low_rank(math.sqrt(N))
    Q = P.clone() if q_equals_p else P + low_rank(0.2 / (r * math.sqrt(N)))
    Bc = torch.randn(H, N, generator=g, dtype=C128)
    C = torch.randn(H, N, generator=g, dtype=C128)
    D = torch.randn(H, generator=g, dtype=F64)
    return dict(dt=dt, lam=lam, P=P, Q=Q, B=Bc, C=C, D=D), g


def step_factors(sys_):
    """The per-(H, N) factors of kernels.reference.dplr_step's docstring (complex128), by
    kernels.reference.dplr_step_factors (the derivation the model's setup_step uses too)."""
    f = reference.dplr_step_factors(sys_["dt"], sys_["lam"], sys_["B"], sys_["P"], sys_["Q"])
    return dict(f, C=sys_["C"], D=sys_["D"])


def make_dplr(B, H, N, r, seed, device, steps=1, u_dtype=torch.float32, q_equals_p=False):
    sys_, g = dplr_system(H, N, r, seed, q_equals_p)
    consts = step_factors(sys_)
    state = torch.randn(B, H, N, generator=g, dtype=C128)
    us = torch.randn(steps, B, H, generator=g, dtype=F64)
    consts = lower(consts, device)
    return state.to(torch.complex64).to(device), us.to(u_dtype).to(device), consts


reference_steps = functools.partial(step_helpers.reference_steps, reference.dplr_step)
triton_steps = functools.partial(step_helpers.triton_steps, kernels.dplr_step)


def check_steps(B, H, N, r, seed, device, steps=1, u_dtype=torch.float32, q_equals_p=False,
                tol=TOL):
    state, us, consts = make_dplr(B, H, N, r, seed, device, steps, u_dtype, q_equals_p)
    check_in_place(kernels.dplr_step, reference.dplr_step, state, us, consts, tol)


ANCHORS = [
    pytest.param(1, 1, 1, 1, id="B1-H1-N1-r1"),
    pytest.param(1, 2, 3, 2, id="B1-H2-N3-r2"),
    pytest.param(2, 3, 5, 1, id="B2-H3-N5-r1"),
    pytest.param(1, 16, 32, 1, id="B1-H16-N32-r1"),
    pytest.param(3, 15, 16, 2, id="B3-H15-N16-r2"),
    pytest.param(2, 17, 17, 3, id="B2-H17-N17-r3"),
    pytest.param(1, 31, 33, 1, id="B1-H31-N33-r1"),
    pytest.param(2, 33, 31, 2, id="B2-H33-N31-r2"),
    pytest.param(5, 7, 64, 3, id="B5-H7-N64-r3"),
    pytest.param(4, 64, 32, 1, id="B4-H64-N32-r1"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,H,N,r", ANCHORS)
def test_dplr_step_fwd(B, H, N, r, triton_device):
    check_steps(B, H, N, r, seed=B * 1000 + H * 10 + N + r, device=triton_device)


@pytest.mark.interpreter
@pytest.mark.parametrize("B,H,N,r,q_equals_p", [
    pytest.param(2, 5, 7, 2, False, id="B2-H5-N7-r2"),
    pytest.param(1, 17, 32, 1, True, id="B1-H17-N32-r1-QeqP"),
])
def test_dplr_step_many_steps(B, H, N, r, q_equals_p, triton_device, nan_poison):
    """20 steps in a row, fresh random u each step; every y is compared, and the final state."""
    check_steps(B, H, N, r, seed=7, device=triton_device, steps=20, q_equals_p=q_equals_p)


@pytest.mark.interpreter
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 5), H=dims(40), N=dims(40), r=st.integers(1, 3), steps=st.integers(1, 4),
       q_equals_p=st.booleans(), seed=seeds)
def test_dplr_step_properties(B, H, N, r, steps, q_equals_p, seed, triton_device):
    check_steps(B, H, N, r, seed, triton_device, steps=steps, q_equals_p=q_equals_p)


@pytest.mark.interpreter
def test_dplr_step_zero_low_rank_is_diagonal(triton_device):
    """With P = 0 the step is the diagonal one: dplr_step == ssm_step on the same dA, dB, C, D."""
    state, us, c = make_dplr(2, 9, 11, 2, 40, triton_device, steps=3)
    c["P"] = torch.zeros_like(c["P"])
    s2 = state.clone()
    for u in us:
        y = kernels.dplr_step(state, u, **c, backend="triton")
        y2 = kernels.ssm_step(s2, u, c["dA"], c["dB"], c["C"], c["D"], backend="triton")
        assert_rel_close(y, y2, 1e-6, "y")
    assert_rel_close(state, s2, 1e-6, "state")


@pytest.mark.interpreter
@pytest.mark.parametrize("u_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dplr_step_low_precision_u(u_dtype, triton_device):
    """u in bf16/fp16 is read and computed in fp32: the same answer as the fp32 upcast of u."""
    check_steps(2, 5, 9, 2, seed=3, device=triton_device, steps=3, u_dtype=u_dtype)


@pytest.mark.interpreter
def test_dplr_step_strided(triton_device):
    """Non-contiguous everything: state a slice of a bigger buffer (updated there, the rest
    untouched), u a strided slice, P / Q / W slices and permutations, C a slice, D strided."""
    B, H, N, r = 3, 6, 5, 2
    state, us, c = make_dplr(B, H, N, r, 11, triton_device, steps=3)
    g = torch.Generator().manual_seed(12)
    big, view, u_view = step_helpers.bigger_buffers(state, us, g)
    P_big = torch.randn(2 * r, H, N, generator=g, dtype=torch.complex64).to(triton_device)
    P_big[1::2] = c["P"]
    Q_perm = c["Q"].permute(1, 2, 0).contiguous().permute(2, 0, 1)   # (r, H, N), r innermost
    W_big = torch.randn(r, H, 2 * N, generator=g, dtype=torch.complex64).to(triton_device)
    W_big[..., ::2] = c["W"]
    C_t = c["C"].t().contiguous().t()
    D_big = torch.randn(2 * H, generator=g).to(triton_device)
    D_big[::2] = c["D"]
    strided = dict(dA=c["dA"], dB=c["dB"], C=C_t, D=D_big[::2], P=P_big[1::2], Q=Q_perm,
                   W=W_big[..., ::2])
    assert not any(strided[k].is_contiguous() for k in ("C", "D", "P", "Q", "W"))
    step_helpers.check_strided(kernels.dplr_step, reference.dplr_step, state, us, c, big, view, u_view, strided)


@pytest.mark.interpreter
def test_dplr_step_real_planes_state(triton_device):
    """A state carried as float32 planes (B, H, N, 2) is updated in place, as the complex one."""
    state, us, c = make_dplr(3, 5, 7, 1, 31, triton_device, steps=3)
    step_helpers.check_planes_state(kernels.dplr_step, reference.dplr_step, state, us, c)


@pytest.mark.interpreter
def test_dplr_step_no_grad_parameters(triton_device):
    """Under torch.inference_mode a parameter that requires grad is fine."""
    state, us, c = make_dplr(2, 3, 4, 1, 5, triton_device)
    step_helpers.check_parameter_without_grad_mode(kernels.dplr_step, reference.dplr_step, state, us, c,
                                                   torch.inference_mode)


def two_steps(state, u0, u1, dA, dB, C, D, P, Q, W):
    y0 = kernels.dplr_step(state, u0, dA, dB, C, D, P, Q, W, backend="triton")
    y1 = kernels.dplr_step(state, u1, dA, dB, C, D, P, Q, W, backend="triton")
    return torch.stack([y0, y1])


@pytest.mark.interpreter
@pytest.mark.parametrize("planes", [False, True], ids=["complex-state", "planes-state"])
def test_dplr_step_compile(planes, triton_device):
    """torch.compile(fullgraph=True) traces two steps through the custom op (fake impl, mutation)."""
    state, us, c = make_dplr(2, 5, 6, 2, 21, triton_device, steps=2)
    step_helpers.check_compiled(two_steps, reference.dplr_step, state, us, c, planes)


@pytest.mark.interpreter
def test_dplr_step_opcheck(triton_device):
    """torch.library.opcheck: schema (declared mutation), fake tensor, AOT dispatch."""
    state, us, c = make_dplr(2, 3, 5, 2, 8, triton_device)
    vr = torch.view_as_real
    args = (vr(state), us[0], vr(c["dA"]), vr(c["dB"]), vr(c["C"]), c["D"],
            vr(c["P"]), vr(c["Q"]), vr(c["W"]))
    torch.library.opcheck(torch.ops.sashimi_kernels.dplr_step.default, args)


@pytest.mark.interpreter
def test_dplr_step_triton_dtypes(triton_device):
    state, us, c = make_dplr(1, 2, 3, 1, 0, triton_device)
    with pytest.raises(ValueError, match="complex64"):
        kernels.dplr_step(state, us[0], **{**c, "W": c["W"].to(C128)}, backend="triton")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.dplr_step(state, us[0], **{**c, "D": c["D"].double()}, backend="triton")


# ------------------------------------------------------------------------------------------
# no Triton below: the reference against the dense bilinear step, dispatch, errors


@pytest.mark.parametrize("B,H,N,r,q_equals_p", [
    pytest.param(1, 1, 1, 1, True, id="B1-H1-N1-r1-QeqP"),
    pytest.param(2, 3, 5, 1, True, id="B2-H3-N5-r1-QeqP"),
    pytest.param(2, 2, 6, 2, False, id="B2-H2-N6-r2"),
    pytest.param(1, 2, 7, 3, False, id="B1-H2-N7-r3"),
])
def test_dplr_reference_matches_dense_bilinear(B, H, N, r, q_equals_p):
    """The Woodbury step of kernels.reference.dplr_step == the dense complex128 bilinear step on
    the full 2N state: A = diag(Lambda, conj Lambda) - [P; conj P][Q; conj Q]^H,
    x' = solve(2/dt I - A, (2/dt I + A) x + 2 B u), y = 2 Re(C x') + D u, for 4 steps."""
    sys_, g = dplr_system(H, N, r, seed=100 + N, q_equals_p=q_equals_p)
    factors = step_factors(sys_)
    x0 = torch.randn(B, H, N, generator=g, dtype=C128)
    us = torch.randn(4, B, H, generator=g, dtype=F64)

    state = x0.clone()
    ys = torch.stack([reference.dplr_step(state, u, **factors) for u in us])

    I2 = torch.eye(2 * N, dtype=C128)
    for h in range(H):
        dt = sys_["dt"][h, 0].item()
        lam = torch.cat([sys_["lam"][h], sys_["lam"][h].conj()])
        Pf = torch.cat([sys_["P"][:, h], sys_["P"][:, h].conj()], dim=-1).T   # (2N, r)
        Qf = torch.cat([sys_["Q"][:, h], sys_["Q"][:, h].conj()], dim=-1).T
        A = torch.diag(lam) - Pf @ Qf.conj().T
        Bf = torch.cat([sys_["B"][h], sys_["B"][h].conj()])
        Cf = torch.cat([sys_["C"][h], sys_["C"][h].conj()])
        for b in range(B):
            x = torch.cat([x0[b, h], x0[b, h].conj()])
            for t in range(len(us)):
                u = us[t, b, h].item()
                x = torch.linalg.solve(2 / dt * I2 - A, (2 / dt * I2 + A) @ x + 2 * Bf * u)
                assert (x[N:] - x[:N].conj()).abs().max() < 1e-12  # stays conjugate-symmetric
                y = (Cf @ x).real.item() + sys_["D"][h].item() * u
                assert abs(ys[t, b, h].item() - y) <= 1e-11 * max(1.0, abs(y))
            err = (state[b, h] - x[:N]).abs().max() / x[:N].abs().max()
            assert err < 1e-12, f"state (b={b}, h={h}): relative error {err:.2e}"


def test_dplr_reference_low_rank_matters():
    """Guard against a vacuous dense check: the low-rank part changes the step noticeably."""
    sys_, g = dplr_system(3, 8, 2, seed=5)
    f = step_factors(sys_)
    x = torch.randn(2, 3, 8, generator=g, dtype=C128)
    u = torch.randn(2, 3, generator=g, dtype=F64)
    s1, s2 = x.clone(), x.clone()
    reference.dplr_step(s1, u, **f)
    reference.dplr_step(s2, u, **{**f, "P": torch.zeros_like(f["P"])})
    assert (s1 - s2).abs().max() > 0.1 * s1.abs().max()


def test_dplr_step_reference_backend(device):
    state, us, c = make_dplr(2, 3, 4, 2, 2, device)
    step_helpers.check_dispatch(kernels.dplr_step, reference.dplr_step, state, us, c, "reference")


@pytest.mark.filterwarnings("ignore:dplr_step. no GPU")
def test_dplr_step_auto_falls_back_on_cpu():
    if interpreting():
        pytest.skip("under TRITON_INTERPRET=1 'auto' runs Triton on CPU")
    state, us, c = make_dplr(1, 2, 3, 1, 4, "cpu")
    step_helpers.check_dispatch(kernels.dplr_step, reference.dplr_step, state, us, c, "auto")


def _errors_case():
    state, us, c = make_dplr(2, 3, 4, 2, 0, "cpu")
    return state, us[0], c


@pytest.mark.parametrize("mutate,match", [
    pytest.param(lambda s, u, c: (s[0], u, c), "state must be \\(B, H, N\\)", id="state-rank"),
    pytest.param(lambda s, u, c: (s.abs(), u, c), "planes", id="state-real"),
    pytest.param(lambda s, u, c: (s, u[:1], c), "u must be \\(B, H\\)", id="u-shape"),
    pytest.param(lambda s, u, c: (s, u, {**c, "dA": c["dA"][:, :3]}), "dA must be \\(H, N\\)",
                 id="dA-N-mismatch"),
    pytest.param(lambda s, u, c: (s, u, {**c, "P": c["P"][:, :, :3]}), "P must be \\(r, H, N\\)",
                 id="P-N-mismatch"),
    pytest.param(lambda s, u, c: (s, u, {**c, "Q": c["Q"][:, :2]}), "Q must be \\(r, H, N\\)",
                 id="Q-H-mismatch"),
    pytest.param(lambda s, u, c: (s, u, {**c, "W": c["W"][0]}), "W must be \\(r, H, N\\)",
                 id="W-rank2"),
    pytest.param(lambda s, u, c: (s, u, {**c, "W": c["W"][:1]}), "share the rank r",
                 id="r-mismatch"),
    pytest.param(lambda s, u, c: (s, u, {k: (v[:0] if k in ("P", "Q", "W") else v) for k, v in c.items()}),
                 "r must be >= 1", id="r0"),
    pytest.param(lambda s, u, c: (s, u, {**c, "P": c["P"].real}), "P must be complex",
                 id="P-real"),
    pytest.param(lambda s, u, c: (s, u, {**c, "D": c["D"][:2]}), "D must be \\(H,\\)",
                 id="D-shape"),
    pytest.param(lambda s, u, c: (s[:1].expand(2, -1, -1), u, c), "expanded", id="state-expanded"),
    pytest.param(lambda s, u, c: (s, u, {**c, "Q": c["Q"].to("meta")}), "same device",
                 id="devices"),
])
def test_dplr_step_errors(mutate, match):
    state, u, c = mutate(*_errors_case())
    with pytest.raises(ValueError, match=match):
        kernels.dplr_step(state, u, **c, backend="reference")


@pytest.mark.parametrize("name", ["state", "u", "dA", "dB", "C", "D", "P", "Q", "W"])
def test_dplr_step_requires_grad_raises(name):
    step_helpers.check_requires_grad_raises(kernels.dplr_step, *_errors_case(), name)


# ------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 256])
def test_dplr_step_gpu_paper_sizes(B):
    """H = 256, N = 32, r = 1 (the widest tier), 200 steps: y and the state at fp32 accuracy."""
    check_steps(B, 256, 32, 1, seed=B, device=torch.device("cuda"), steps=200, q_equals_p=True,
                tol=3e-5)


@pytest.mark.gpu
def test_dplr_step_gpu_long_run():
    """2048 steps in a row (r = 2): the fp32 recurrence stays within 1e-4 of complex128."""
    check_steps(2, 64, 32, 2, seed=77, device=torch.device("cuda"), steps=2048, tol=1e-4)


@pytest.mark.gpu
def test_dplr_step_gpu_cuda_graph():
    """One step captured in a CUDA graph (after the autotuning warm-up), replayed 10 times."""
    state, us, c = make_dplr(4, 256, 32, 1, 9, torch.device("cuda"), steps=10, q_equals_p=True)
    step_helpers.check_cuda_graph(kernels.dplr_step, reference.dplr_step, state, us, c)
