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

Kernel: kernels._step._step_fwd_kernel with R = r (a constexpr; R = 0 is ssm_step): one program
per block of BLOCK_H channels x ROWS batch rows, the whole N in registers, complex tiles read
through their real views, the rank-R loops (tl.static_range) of kernels._jit.step_tile with the
two real reductions per k over N. The state is read once and written once per row.

torch.library: `sashimi_kernels::dplr_step` (mutates_args=("state",)), complex tensors crossing
as torch.view_as_real planes, with a fake implementation. As kernels.ssm_step: in place on the
planes of a complex state in eager mode, through a copy of them under torch.compile (why: that
module's docstring), in place without a copy for a state carried as float32 planes (B, H, N, 2).
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels._step import (as_complex_state, call_in_place, check_inference_only,
                           check_step_inputs, check_triton_dtypes, step_fwd)
from kernels._utils import choose_backend, require_complex, same_device


def dplr_step_fwd(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, P: torch.Tensor, Q: torch.Tensor,
                  W: torch.Tensor) -> torch.Tensor:
    """Launch the step on real planes: state (B, H, N, 2) float32, updated in place; the complex
    factors as torch.view_as_real planes (..., 2). Returns y (B, H) fp32."""
    return step_fwd("dplr_step", state, u, dA, dB, C, D, P, Q, W)


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
