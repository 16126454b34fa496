"""`ssm_step`: one recurrent step of a diagonal state-space model (S4D, ZOH), state updated in place.

Math (kernels.reference.ssm_step is the oracle), per batch row b and channel h:

    state[b, h, n] <- dA[h, n] * state[b, h, n] + dB[h, n] * u[b, h]
    y[b, h]         = 2 Re(sum_n C[h, n] * state[b, h, n]) + D[h] * u[b, h]

Shapes: B batch rows, H channels, N state entries (one of each conjugate pair: the full state has
2N entries and the conjugate half is implied, hence the 2 Re(...)). state: complex (B, H, N), or
its real planes (B, H, N, 2) (the torch.view_as_real layout, see below); u: real (B, H);
dA, dB, C: complex (H, N); D: real (H,). Returns y: float32 (B, H).

Dtypes (Triton path): state, dA, dB, C complex64 (state planes float32); u and D float32,
float16 or bfloat16 (loaded and computed in fp32); y float32. The reference path also takes
complex128 / float64. No conjugation anywhere: C multiplies the state as stored.

Inference only: the step is for generation, one token at a time. With grad mode enabled, an
input that requires grad is an error (there is no backward); under torch.no_grad() or
torch.inference_mode() parameters may be passed as they are.

Kernel: kernels._step._step_fwd_kernel with rank R = 0 (the step-kernel family: dplr_step is
the same kernel with R >= 1, tier_step runs the same state-update tile, kernels._jit.step_tile).
One program per (block of BLOCK_H channels, ROWS batch rows), the whole N in registers; per row
the kernel reads the state once and writes it once (kernels/_step.py has the details).

torch.library: `sashimi_kernels::ssm_step` (mutates_args=("state",)), every complex tensor crossing
as its torch.view_as_real planes, with a fake implementation, so a generation step can be traced by
torch.compile(fullgraph=True) and captured in a CUDA graph. In eager mode the op mutates
view_as_real(state) in place (no copy). Under torch.compile a complex state goes through a copy:
torch 2.11's auto_functionalize regenerates a mutated view of a graph input with as_strided on its
base, which breaks when the view changes the dtype (view_as_real of a complex input fails with
"setStorage: ... out of bounds"), and Inductor cannot re-inplace a custom op that mutates a
complex input ("auto_functionalized_v2 was not removed"). So, while compiling, the step runs on
a clone of the real planes and copies them back (one extra read + write of the state). A model
that wants compiled steps without that copy carries its state as float32 planes (B, H, N, 2):
the op then mutates them directly, compiled or not.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels._step import (as_complex_state, call_in_place, check_inference_only,
                           check_step_inputs, check_triton_dtypes, step_fwd)
from kernels._utils import choose_backend, same_device


def ssm_step_fwd(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Launch the step on real planes: state (B, H, N, 2) float32, updated in place; dA, dB, C
    (H, N, 2). Returns y (B, H) fp32."""
    return step_fwd("ssm_step", state, u, dA, dB, C, D)


@torch.library.custom_op("sashimi_kernels::ssm_step", mutates_args=("state",))
def _ssm_step_op(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """state, dA, dB, C: torch.view_as_real planes (..., 2) float32; state updated in place."""
    return ssm_step_fwd(state, u, dA, dB, C, D)


@_ssm_step_op.register_fake
def _ssm_step_fake(state, u, dA, dB, C, D):
    return u.new_empty(state.shape[:2], dtype=torch.float32)


def ssm_step(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """One diagonal recurrent step; updates `state` in place and returns y.

    state: complex (B, H, N), or its float planes (B, H, N, 2), updated in place (it keeps its
    data_ptr); u: real (B, H); dA, dB, C: complex (H, N); D: real (H,). Any strides (state must
    not be expanded).

        state <- dA * state + dB * u[..., None];   y = 2 Re(sum_n C * state) + D * u

    Returns y: float32 (B, H) on the Triton path (the reference path returns the promoted dtype).
    backend: "auto" (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; else the reference),
    "triton" or "reference" (kernels.reference.ssm_step). Inference only (see the module doc).
    """
    op = "ssm_step"
    xc = as_complex_state(op, state)
    check_step_inputs(op, xc, u, dA, dB, C, D)
    device = same_device(op, state=state, u=u, dA=dA, dB=dB, C=C, D=D)
    check_inference_only(op, state=state, u=u, dA=dA, dB=dB, C=C, D=D)
    path = choose_backend(op, backend, device)
    if path == "reference":
        return reference.ssm_step(xc, u, dA, dB, C, D)
    check_triton_dtypes(op, dict(state=xc, dA=dA, dB=dB, C=C), dict(u=u, D=D))
    vr = torch.view_as_real
    return call_in_place(_ssm_step_op, state, u, vr(dA), vr(dB), vr(C), D)
