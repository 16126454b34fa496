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

Kernel: one program per (block of BLOCK_H channels, ROWS batch rows). The whole N lives in
registers (BLOCK_N = next power of two >= N, masked); complex tensors are read through their
torch.view_as_real planes as [BLOCK_H, BLOCK_N, 2] tiles (contiguous re/im pairs) and split into
real and imaginary parts. The per-channel constants are loaded once per program and reused for
its ROWS batch rows. The state update, the reduction over N and the stores are all in one pass:
per row the kernel reads the state once and writes it once. Autotuned over BLOCK_H, ROWS and
num_warps (key: H, N, the batch's power-of-two tier, dtypes), with restore_value on the state so
tuning runs leave it as it was; tune (call once) before capturing a CUDA graph.

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
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import (choose_backend, configs, device_guard, nvtx_range, require_complex,
                            same_device)

_REAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Autotune configs for both step kernels. BLOCK_H channels x ROWS batch rows per program. The
# first one is what the interpreter runs (few, fat programs: cheap there) and is valid for any size.
STEP_CONFIGS = [
    triton.Config({"BLOCK_H": 16, "ROWS": 1}, num_warps=4),
    triton.Config({"BLOCK_H": 1, "ROWS": 1}, num_warps=1),
    triton.Config({"BLOCK_H": 2, "ROWS": 1}, num_warps=1),
    triton.Config({"BLOCK_H": 4, "ROWS": 1}, num_warps=1),
    triton.Config({"BLOCK_H": 4, "ROWS": 1}, num_warps=2),
    triton.Config({"BLOCK_H": 8, "ROWS": 1}, num_warps=2),
    triton.Config({"BLOCK_H": 8, "ROWS": 1}, num_warps=4),
    triton.Config({"BLOCK_H": 32, "ROWS": 1}, num_warps=4),
    triton.Config({"BLOCK_H": 4, "ROWS": 4}, num_warps=2),
    triton.Config({"BLOCK_H": 8, "ROWS": 4}, num_warps=4),
    triton.Config({"BLOCK_H": 16, "ROWS": 4}, num_warps=4),
    triton.Config({"BLOCK_H": 8, "ROWS": 16}, num_warps=4),
    triton.Config({"BLOCK_H": 16, "ROWS": 16}, num_warps=8),
]


def prune_step_configs(configs_, named_args, **kwargs):
    """Drop configs with more batch rows per program than there are rows (they only idle)."""
    B = named_args["B"]
    kept = [c for c in configs_ if c.kwargs["ROWS"] == 1 or c.kwargs["ROWS"] <= B]
    return kept or configs_[:1]


def batch_tier(B: int) -> int:
    """The autotune key for the batch: the next power of two (a new B in the same tier re-uses
    the tuned config)."""
    return triton.next_power_of_2(max(int(B), 1))


@triton.autotune(
    configs=configs(STEP_CONFIGS),
    key=["H", "N", "B_TIER"],
    prune_configs_by={"early_config_prune": prune_step_configs},
    restore_value=["state_ptr"],  # autotuning reruns the kernel: keep the in-place state intact
)
@triton.jit(do_not_specialize=["B", "H", "N", "B_TIER"])
def _ssm_step_fwd_kernel(
    state_ptr, u_ptr, dA_ptr, dB_ptr, C_ptr, D_ptr, y_ptr,
    B, H, N, B_TIER,
    # strides of the complex tensors in complex elements (the real view's strides / 2)
    stride_state_b, stride_state_h, stride_state_n,
    stride_u_b, stride_u_h,
    stride_dA_h, stride_dA_n,
    stride_dB_h, stride_dB_n,
    stride_C_h, stride_C_n,
    stride_D_h,
    stride_y_b, stride_y_h,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
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

    # per-channel constants: loaded once, used for all ROWS batch rows of this program
    dA = tl.load(dA_ptr + (h3 * stride_dA_h + n3 * stride_dA_n) * 2 + c3, mask=mask_hn, other=0.0)
    dB = tl.load(dB_ptr + (h3 * stride_dB_h + n3 * stride_dB_n) * 2 + c3, mask=mask_hn, other=0.0)
    C = tl.load(C_ptr + (h3 * stride_C_h + n3 * stride_C_n) * 2 + c3, mask=mask_hn, other=0.0)
    ar, ai = tl.split(dA)
    br, bi = tl.split(dB)
    cr, ci = tl.split(C)
    d = tl.load(D_ptr + offs_h * stride_D_h, mask=mask_h, other=0.0).to(tl.float32)

    for i in range(ROWS):
        b = pid_b * ROWS + i
        row_ok = b < B
        u = tl.load(u_ptr + b * stride_u_b + offs_h * stride_u_h, mask=mask_h & row_ok,
                    other=0.0).to(tl.float32)
        x_ptrs = state_ptr + (b * stride_state_b + h3 * stride_state_h + n3 * stride_state_n) * 2 + c3
        x = tl.load(x_ptrs, mask=mask_hn & row_ok, other=0.0)
        xr, xi = tl.split(x)
        uu = u[:, None]
        nr = ar * xr - ai * xi + br * uu
        ni = ar * xi + ai * xr + bi * uu
        tl.store(x_ptrs, tl.join(nr, ni), mask=mask_hn & row_ok)
        y = 2.0 * tl.sum(cr * nr - ci * ni, axis=1) + d * u
        tl.store(y_ptr + b * stride_y_b + offs_h * stride_y_h, y, mask=mask_h & row_ok)


# ---------------------------------------------------------------------------------------------
# host side

def complex_strides(op: str, name: str, t: torch.Tensor) -> tuple[int, ...]:
    """Strides, in complex elements, of a complex tensor given as its real view (..., 2)."""
    if t.shape[-1] != 2 or t.stride(-1) != 1 or any(s % 2 for s in t.stride()[:-1]):
        raise ValueError(f"{op}: {name} must be the torch.view_as_real view of a complex tensor "
                         f"(last dim 2, stride 1), got shape {tuple(t.shape)}, stride {t.stride()}")
    if t.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be complex64 (float32 planes), got {t.dtype} planes")
    return tuple(s // 2 for s in t.stride()[:-1])


def ssm_step_fwd(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Launch the step on real planes: state (B, H, N, 2) float32, updated in place; dA, dB, C
    (H, N, 2). Returns y (B, H) fp32."""
    op = "ssm_step"
    B, H, N = state.shape[:3]
    s_state = complex_strides(op, "state", state)
    s_dA = complex_strides(op, "dA", dA)
    s_dB = complex_strides(op, "dB", dB)
    s_C = complex_strides(op, "C", C)
    y = torch.empty((B, H), dtype=torch.float32, device=state.device)
    if B == 0 or H == 0:
        return y
    BLOCK_N = triton.next_power_of_2(max(N, 1))

    def grid(meta):
        return (triton.cdiv(B, meta["ROWS"]), triton.cdiv(H, meta["BLOCK_H"]))

    with nvtx_range("sashimi/ssm_step/fwd"), device_guard(state.device):
        _ssm_step_fwd_kernel[grid](
            state, u, dA, dB, C, D, y,
            B, H, N, batch_tier(B),
            *s_state,
            u.stride(0), u.stride(1),
            *s_dA, *s_dB, *s_C,
            D.stride(0),
            y.stride(0), y.stride(1),
            BLOCK_N=BLOCK_N,
        )
    return y


@torch.library.custom_op("sashimi_kernels::ssm_step", mutates_args=("state",))
def _ssm_step_op(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """state, dA, dB, C: torch.view_as_real planes (..., 2) float32; state updated in place."""
    return ssm_step_fwd(state, u, dA, dB, C, D)


@_ssm_step_op.register_fake
def _ssm_step_fake(state, u, dA, dB, C, D):
    return u.new_empty(state.shape[:2], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# input checks and the in-place call, shared with kernels.dplr_step

def as_complex_state(op: str, state) -> torch.Tensor:
    """The complex view of `state`: itself if complex, view_as_complex of real planes (B, H, N, 2)."""
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        if state.dim() != 4 or state.shape[-1] != 2:
            raise ValueError(f"{op}: a real state must be the planes (B, H, N, 2) of a complex state "
                             f"(torch.view_as_real layout), got shape {tuple(state.shape)}")
        if state.stride(-1) != 1 or any(s % 2 for s in state.stride()[:-1]):
            raise ValueError(f"{op}: real state planes need stride 1 on the last dim and even strides "
                             f"elsewhere, got stride {state.stride()}")
        return torch.view_as_complex(state)
    require_complex(op, state=state)
    return state


def check_inference_only(op: str, **tensors: torch.Tensor) -> None:
    """With grad mode on, any input that requires grad is an error: the step has no backward."""
    if not torch.is_grad_enabled():
        return
    needy = [name for name, t in tensors.items() if t.requires_grad]
    if needy:
        raise ValueError(
            f"{op} is inference only: {', '.join(needy)} require(s) grad. Call it under "
            f"torch.no_grad() / torch.inference_mode(), or pass detached tensors")


def check_step_inputs(op: str, state, u, dA, dB, C, D) -> tuple[int, int, int]:
    """Shapes and kinds common to ssm_step and dplr_step (state: the complex view); returns
    (B, H, N)."""
    require_complex(op, state=state, dA=dA, dB=dB, C=C)
    for name, t in (("u", u), ("D", D)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a real floating tensor, got {t.dtype}")
    if state.dim() != 3:
        raise ValueError(f"{op}: state must be (B, H, N), got shape {tuple(state.shape)}")
    B, H, N = state.shape
    if tuple(u.shape) != (B, H):
        raise ValueError(f"{op}: u must be (B, H) = {(B, H)} to match state, got {tuple(u.shape)}")
    for name, t in (("dA", dA), ("dB", dB), ("C", C)):
        if tuple(t.shape) != (H, N):
            raise ValueError(f"{op}: {name} must be (H, N) = {(H, N)} to match state, "
                             f"got {tuple(t.shape)}")
    if tuple(D.shape) != (H,):
        raise ValueError(f"{op}: D must be (H,) = {(H,)} to match state, got {tuple(D.shape)}")
    if any(st == 0 and sz > 1 for st, sz in zip(state.stride(), state.shape)):
        raise ValueError(f"{op}: state is updated in place and must not be an expanded tensor "
                         f"(stride {state.stride()})")
    return B, H, N


def check_triton_dtypes(op: str, complex_tensors: dict, real_tensors: dict) -> None:
    for name, t in complex_tensors.items():
        if t.dtype != torch.complex64:
            raise ValueError(f"{op}: the Triton path needs {name} in complex64, got {t.dtype} "
                             f"(backend='reference' takes complex128)")
    for name, t in real_tensors.items():
        if t.dtype not in _REAL_DTYPES:
            raise ValueError(f"{op}: the Triton path needs {name} in float32, float16 or bfloat16, "
                             f"got {t.dtype} (backend='reference' takes float64)")


def call_in_place(custom_op, state: torch.Tensor, *args) -> torch.Tensor:
    """Run a state-mutating custom op on the real planes of `state` (module docstring: why a
    complex state is copied while torch.compile traces)."""
    if not state.is_complex():
        return custom_op(state, *args)
    if torch.compiler.is_compiling():
        planes = torch.view_as_real(state).clone()
        y = custom_op(planes, *args)
        state.copy_(torch.view_as_complex(planes))
        return y
    return custom_op(torch.view_as_real(state), *args)


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
