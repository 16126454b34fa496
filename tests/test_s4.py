"""The S4 layer: both convolution kernels are the impulse response of the discretised
recurrence (computed densely in complex128), and the recurrent step reproduces the layer."""
from __future__ import annotations

import math

import pytest
import torch

from sashimi.s4 import S4Layer, hippo_legs_dplr

from conftest import assert_rel_close


def dense_impulse_response(layer: S4Layer, L: int) -> torch.Tensor:
    """K_l = C A_bar^l B_bar on the full 2N state, complex128, from the definitions."""
    dt = layer._dt().detach().double()
    lam = layer._Lambda().detach().to(torch.complex128)
    B = torch.view_as_complex(layer.B.detach()).to(torch.complex128)
    C = torch.view_as_complex(layer.C.detach()).to(torch.complex128)
    H, N = lam.shape
    out = torch.empty(H, L, dtype=torch.float64)
    for h in range(H):
        lam_f = torch.cat([lam[h], lam[h].conj()])
        b_f = torch.cat([B[h], B[h].conj()])
        c_f = torch.cat([C[h], C[h].conj()])
        if layer.ssm == "diag":  # ZOH
            A_bar = torch.diag(torch.exp(dt[h] * lam_f))
            B_bar = (torch.exp(dt[h] * lam_f) - 1) / lam_f * b_f
        else:  # bilinear, A = Lambda - P P^*, and C~ = C (I - A_bar^L) undone
            P = torch.view_as_complex(layer.P.detach())[0, h].to(torch.complex128)
            p_f = torch.cat([P, P.conj()])
            A = torch.diag(lam_f) - torch.outer(p_f, p_f.conj())
            eye = torch.eye(2 * N, dtype=torch.complex128)
            A_bar = torch.linalg.solve(eye - dt[h] / 2 * A, eye + dt[h] / 2 * A)
            B_bar = torch.linalg.solve(eye - dt[h] / 2 * A, dt[h] * b_f)
            c_f = torch.linalg.solve((eye - torch.linalg.matrix_power(A_bar, layer.l_max)).T, c_f)
        x = B_bar
        for l in range(L):
            out[h, l] = (c_f @ x).real
            x = A_bar @ x
    return out


@pytest.mark.parametrize("ssm,init", [("dplr", None), ("diag", "lin"), ("diag", "inv")])
@pytest.mark.parametrize("L", [64, 90])  # even and odd: DPLR's Nyquist node is special
def test_kernel_is_the_impulse_response(ssm, init, L):
    torch.manual_seed(1)
    layer = S4Layer(3, 8, l_max=L, ssm=ssm, init=init, kernel_backend="reference")
    K = layer.kernel(L).detach()
    assert_rel_close(K, dense_impulse_response(layer, L), 1e-4, f"{ssm} kernel")


def test_hippo_legs_dplr_reconstructs_legs():
    N = 8
    Lambda, P, B = hippo_legs_dplr(N)
    assert torch.all(Lambda.imag > 0) and torch.allclose(Lambda.real, torch.full((N // 2,), -0.5, dtype=torch.float64))
    # the DPLR matrix (full 2N-pair form) has the eigenvalues of HiPPO-LegS
    n = torch.arange(N, dtype=torch.float64)
    A = -(torch.sqrt(2 * n[:, None] + 1) * torch.sqrt(2 * n[None, :] + 1)).tril(-1) - torch.diag(n + 1)
    lam_f = torch.cat([Lambda, Lambda.conj()])
    p_f = torch.cat([P, P.conj()])
    A_dplr = torch.diag(lam_f) - torch.outer(p_f, p_f.conj())
    ev1 = torch.linalg.eigvals(A).to(torch.complex128)
    ev2 = torch.linalg.eigvals(A_dplr)
    key = lambda e: sorted(e.tolist(), key=lambda z: (round(z.real, 6), round(z.imag, 6)))
    for a, b in zip(key(ev1), key(ev2)):
        assert abs(a - b) < 1e-8


@pytest.mark.parametrize("ssm", ["dplr", "diag"])
def test_step_reproduces_forward(ssm):
    torch.manual_seed(2)
    layer = S4Layer(5, 8, l_max=96, ssm=ssm, kernel_backend="reference").eval()
    x = torch.randn(2, 96, 5)
    with torch.no_grad():
        y = layer(x)
        layer.setup_step()
        state = layer.default_state(2)
        ys = torch.stack([layer.step(x[:, t], state) for t in range(96)], 1)
    assert_rel_close(ys, y, 1e-4, "step vs forward")


def test_log_dt_clamped_and_lr_hints():
    layer = S4Layer(4, 8, l_max=32, kernel_backend="reference")
    with torch.no_grad():
        layer.log_dt.fill_(50.0)
    layer.clamp_()
    assert layer.log_dt.max().item() == pytest.approx(math.log(0.1), rel=1e-6)
    hinted = {n for n, p in layer.named_parameters() if hasattr(p, "_optim")}
    assert hinted == {"log_dt", "A_real_log", "A_imag", "B", "P"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="ssm"):
        S4Layer(4, 8, ssm="nope")
    with pytest.raises(ValueError, match="d_state"):
        S4Layer(4, 7)
    layer = S4Layer(4, 8, l_max=16, kernel_backend="reference")
    with pytest.raises(ValueError, match="l_max"):
        layer(torch.randn(1, 17, 4))
    with pytest.raises(RuntimeError, match="setup_step"):
        layer.step(torch.randn(1, 4), layer.default_state(1))


@pytest.mark.interpreter
@pytest.mark.parametrize("ssm", ["dplr", "diag"])
def test_layer_on_triton_path_matches_reference(ssm, triton_device):
    torch.manual_seed(3)
    layer = S4Layer(3, 6, l_max=24, ssm=ssm, kernel_backend="reference")
    x = torch.randn(1, 24, 3, requires_grad=True)
    y_ref = layer(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, layer.C, layer.log_dt])
    layer.kernel_backend = "triton"
    y = layer(x)
    g = torch.autograd.grad(y.square().sum(), [x, layer.C, layer.log_dt])
    assert_rel_close(y, y_ref, 1e-4, "forward")
    for name, a, b in zip(["x", "C", "log_dt"], g, g_ref):
        assert_rel_close(a, b, 1e-3, f"grad {name}")
