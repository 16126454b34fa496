"""`dplr_step`: one exact bilinear step of a DPLR state matrix A = Lambda - P Q^*, state in place.

Math (kernels.reference.dplr_step is the oracle; its docstring derives the factors). The full
state has 2N entries in conjugate pairs and only one of each pair is stored, so an inner product
over the full state of a conjugate-symmetric vector is Q^* x = 2 Re(sum_n conj(Q_n) x_n). Per batch
row b and channel h, with rank r (usually 1):

    a[k] = 2 Re(sum_n conj(Q[k, h, n]) x[b, h, n])                        k < r   (real)
    z    = dA x - sum_k P[k] a[k] + dB u
    b[k] = 2 Re(sum_n conj(W[k, h, n]) z[b, h, n])                        k < r   (real)
    x'   = z - sum_k P[k] b[k]                (stored back into state)
    y    = 2 Re(sum_n C x') + D u

This is x' = (2/dt - A)^-1 [(2/dt + A) x + 2 B u] with the inverse applied by Woodbury; dA, dB,
P (= E P_orig), Q, W are the per-(H, N) factors the model's setup_step precomputes once, so the
kernel does only the per-step work: no N x N matrix, no eigendecomposition.

Shapes: state complex (B, H, N); u real (B, H); dA, dB, C complex (H, N); D real (H,);
P, Q, W complex (r, H, N). Returns y: float32 (B, H).
Dtypes (Triton path): complex64 for state and every complex factor; u, D float32/float16/bfloat16
(computed in fp32). Inference only (with grad mode on, an input that requires grad is an error).

Kernel: as kernels.ssm_step (one program per block of BLOCK_H channels x ROWS batch rows, the
whole N in registers, complex tiles read through their real views), plus the rank-R loops
(R = r a constexpr, tl.static_range) with the two real reductions per k over N. The state is read
once and written once per row.

torch.library: `sashimi_kernels::dplr_step` (mutates_args=("state",)), complex tensors crossing
as torch.view_as_real planes, with a fake implementation. As kernels.ssm_step: in place on the
planes of a complex state in eager mode, through a copy of them under torch.compile (why: that
module's docstring), in place without a copy for a state carried as float32 planes (B, H, N, 2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import (choose_backend, configs, device_guard, nvtx_range, require_complex,
                            same_device)
from kernels.ssm_step import (STEP_CONFIGS, as_complex_state, batch_tier, call_in_place,
                              check_inference_only, check_step_inputs, check_triton_dtypes,
                              complex_strides, prune_step_configs)


@triton.autotune(
    configs=configs(STEP_CONFIGS),
    key=["H", "N", "B_TIER", "R"],
    prune_configs_by={"early_config_prune": prune_step_configs},
    restore_value=["state_ptr"],  # autotuning reruns the kernel: keep the in-place state intact
)
@triton.jit(do_not_specialize=["B", "H", "N", "B_TIER"])
def _dplr_step_fwd_kernel(
    state_ptr, u_ptr, dA_ptr, dB_ptr, C_ptr, D_ptr, P_ptr, Q_ptr, W_ptr, y_ptr,
    B, H, N, B_TIER,
    # strides of the complex tensors in complex elements (the real view's strides / 2)
    stride_state_b, stride_state_h, stride_state_n,
    stride_u_b, stride_u_h,
    stride_dA_h, stride_dA_n,
    stride_dB_h, stride_dB_n,
    stride_C_h, stride_C_n,
    stride_D_h,
    stride_P_r, stride_P_h, stride_P_n,
    stride_Q_r, stride_Q_h, stride_Q_n,
    stride_W_r, stride_W_h, stride_W_n,
    stride_y_b, stride_y_h,
    R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch rows on axis 0 (no 65535 limit on B)
    pid_h = tl.program_id(1).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, 2)  # re, im
    mask_h = offs_h < H
    mask_hn = (mask_h[:, None] & (offs_n < N)[None, :])[:, :, None]  # [BLOCK_H, BLOCK_N, 1]
    h3 = offs_h[:, None, None]
    n3 = offs_n[None, :, None]
    c3 = offs_c[None, None, :]

    # diagonal constants: loaded once, used for all ROWS batch rows of this program
    dA = tl.load(dA_ptr + (h3 * stride_dA_h + n3 * stride_dA_n) * 2 + c3, mask=mask_hn, other=0.0)
    dB = tl.load(dB_ptr + (h3 * stride_dB_h + n3 * stride_dB_n) * 2 + c3, mask=mask_hn, other=0.0)
    C = tl.load(C_ptr + (h3 * stride_C_h + n3 * stride_C_n) * 2 + c3, mask=mask_hn, other=0.0)
    ar, ai = tl.split(dA)
    br, bi = tl.split(dB)
    cr, ci = tl.split(C)
    d = tl.load(D_ptr + offs_h * stride_D_h, mask=mask_h, other=0.0).to(tl.float32)
    p_off = (h3 * stride_P_h + n3 * stride_P_n) * 2 + c3
    q_off = (h3 * stride_Q_h + n3 * stride_Q_n) * 2 + c3
    w_off = (h3 * stride_W_h + n3 * stride_W_n) * 2 + c3

    for i in range(ROWS):
        b = pid_b * ROWS + i
        row_ok = b < B
        u = tl.load(u_ptr + b * stride_u_b + offs_h * stride_u_h, mask=mask_h & row_ok,
                    other=0.0).to(tl.float32)
        x_ptrs = state_ptr + (b * stride_state_b + h3 * stride_state_h + n3 * stride_state_n) * 2 + c3
        x = tl.load(x_ptrs, mask=mask_hn & row_ok, other=0.0)
        xr, xi = tl.split(x)
        uu = u[:, None]
        zr = ar * xr - ai * xi + br * uu
        zi = ar * xi + ai * xr + bi * uu
        # z -= sum_k P[k] a[k],  a[k] = 2 Re(sum_n conj(Q[k]) x)   (every a[k] from the old x)
        for k in tl.static_range(R):
            qr, qi = tl.split(tl.load(Q_ptr + k * stride_Q_r * 2 + q_off, mask=mask_hn, other=0.0))
            pr, pi = tl.split(tl.load(P_ptr + k * stride_P_r * 2 + p_off, mask=mask_hn, other=0.0))
            a = (2.0 * tl.sum(qr * xr + qi * xi, axis=1))[:, None]
            zr -= pr * a
            zi -= pi * a
        # x' = z - sum_k P[k] b[k],  b[k] = 2 Re(sum_n conj(W[k]) z)   (every b[k] from z)
        nr = zr
        ni = zi
        for k in tl.static_range(R):
            wr, wi = tl.split(tl.load(W_ptr + k * stride_W_r * 2 + w_off, mask=mask_hn, other=0.0))
            pr, pi = tl.split(tl.load(P_ptr + k * stride_P_r * 2 + p_off, mask=mask_hn, other=0.0))
            bk = (2.0 * tl.sum(wr * zr + wi * zi, axis=1))[:, None]
            nr -= pr * bk
            ni -= pi * bk
        tl.store(x_ptrs, tl.join(nr, ni), mask=mask_hn & row_ok)
        y = 2.0 * tl.sum(cr * nr - ci * ni, axis=1) + d * u
        tl.store(y_ptr + b * stride_y_b + offs_h * stride_y_h, y, mask=mask_h & row_ok)


# ---------------------------------------------------------------------------------------------
# host side

def dplr_step_fwd(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, P: torch.Tensor, Q: torch.Tensor,
                  W: torch.Tensor) -> torch.Tensor:
    """Launch the step on real planes: state (B, H, N, 2) float32, updated in place; the complex
    factors as torch.view_as_real planes (..., 2). Returns y (B, H) fp32."""
    op = "dplr_step"
    B, H, N = state.shape[:3]
    R = P.shape[0]
    s_state = complex_strides(op, "state", state)
    s_dA = complex_strides(op, "dA", dA)
    s_dB = complex_strides(op, "dB", dB)
    s_C = complex_strides(op, "C", C)
    s_P = complex_strides(op, "P", P)
    s_Q = complex_strides(op, "Q", Q)
    s_W = complex_strides(op, "W", W)
    y = torch.empty((B, H), dtype=torch.float32, device=state.device)
    if B == 0 or H == 0:
        return y
    BLOCK_N = triton.next_power_of_2(max(N, 1))

    def grid(meta):
        return (triton.cdiv(B, meta["ROWS"]), triton.cdiv(H, meta["BLOCK_H"]))

    with nvtx_range("sashimi/dplr_step/fwd"), device_guard(state.device):
        _dplr_step_fwd_kernel[grid](
            state, u, dA, dB, C, D, P, Q, W, y,
            B, H, N, batch_tier(B),
            *s_state,
            u.stride(0), u.stride(1),
            *s_dA, *s_dB, *s_C,
            D.stride(0),
            *s_P, *s_Q, *s_W,
            y.stride(0), y.stride(1),
            R=R, BLOCK_N=BLOCK_N,
        )
    return y


@torch.library.custom_op("sashimi_kernels::dplr_step", mutates_args=("state",))
def _dplr_step_op(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, P: torch.Tensor, Q: torch.Tensor,
                  W: torch.Tensor) -> torch.Tensor:
    """Complex tensors as torch.view_as_real planes (..., 2) float32; state updated in place."""
    return dplr_step_fwd(state, u, dA, dB, C, D, P, Q, W)


@_dplr_step_op.register_fake
def _dplr_step_fake(state, u, dA, dB, C, D, P, Q, W):
    return u.new_empty(state.shape[:2], dtype=torch.float32)


def dplr_step(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, W: torch.Tensor,
              backend: str = "auto") -> torch.Tensor:
    """One exact DPLR bilinear step; updates `state` in place and returns y.

    state: complex (B, H, N), or its float planes (B, H, N, 2), updated in place (it keeps its
    data_ptr); u: real (B, H);
    dA, dB, C: complex (H, N); D: real (H,); P, Q, W: complex (r, H, N), r >= 1, the factors of
    kernels.reference.dplr_step's docstring (P already multiplied by E, W = M Q). Any strides
    (state must not be expanded). Returns y: float32 (B, H) on the Triton path.
    backend: "auto" | "triton" | "reference" (kernels.reference.dplr_step). Inference only.
    """
    op = "dplr_step"
    xc = as_complex_state(op, state)
    B, H, N = check_step_inputs(op, xc, u, dA, dB, C, D)
    require_complex(op, P=P, Q=Q, W=W)
    for name, t in (("P", P), ("Q", Q), ("W", W)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (H, N):
            raise ValueError(f"{op}: {name} must be (r, H, N) with (H, N) = {(H, N)} to match state, "
                             f"got {tuple(t.shape)}")
    ranks = {"P": P.shape[0], "Q": Q.shape[0], "W": W.shape[0]}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"{op}: P, Q and W must share the rank r, got "
                         + ", ".join(f"{k}: r={v}" for k, v in ranks.items()))
    if P.shape[0] < 1:
        raise ValueError(f"{op}: the low rank r must be >= 1, got r={P.shape[0]}")
    device = same_device(op, state=state, u=u, dA=dA, dB=dB, C=C, D=D, P=P, Q=Q, W=W)
    check_inference_only(op, state=state, u=u, dA=dA, dB=dB, C=C, D=D, P=P, Q=Q, W=W)
    path = choose_backend(op, backend, device)
    if path == "reference":
        return reference.dplr_step(xc, u, dA, dB, C, D, P, Q, W)
    check_triton_dtypes(op, dict(state=xc, dA=dA, dB=dB, C=C, P=P, Q=Q, W=W), dict(u=u, D=D))
    vr = torch.view_as_real
    return call_in_place(_dplr_step_op, state, u, vr(dA), vr(dB), vr(C), D, vr(P), vr(Q), vr(W))
