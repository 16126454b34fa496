"""The recurrent-step kernel family: `ssm_step` is `dplr_step` with rank R = 0.

One @triton.jit kernel (`_step_fwd_kernel`, R a constexpr) runs both public ops; its state update
is `kernels._jit.step_tile`, which `kernels.tier_step` runs too. Also here: the autotune configs
and the one batch-rows pruner of the step kernels (tier_step's too), and the host-side checks and
in-place call the public step ops share. Why a complex state goes through a copy of its planes
under torch.compile: kernels/ssm_step.py's docstring.

Kernel: one program per (block of BLOCK_H channels, ROWS batch rows). The whole N lives in
registers (BLOCK_N = next power of two >= N, masked); complex tensors are read through their
torch.view_as_real planes as [BLOCK_H, BLOCK_N, 2] tiles and split into real and imaginary parts.
The per-channel constants are loaded once per program and reused for its ROWS batch rows; per row
the kernel reads the state once and writes it once. Autotuned over BLOCK_H, ROWS and num_warps
(key: H, N, the batch's power-of-two tier, R), with restore_value on the state so tuning runs
leave it as it was; tune (call once) before capturing a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._jit import load_pairs, step_tile
from kernels._utils import configs, device_guard, require_complex
from kernels.profiling import nvtx_range

_REAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# BLOCK_H channels x ROWS batch rows per program. The first one is what the interpreter runs (few,
# fat programs: cheap there) and is valid for any size.
STEP_CONFIGS = [
    triton.Config({"BLOCK_H": bh, "ROWS": rows}, num_warps=w)
    for bh, rows, w in [(16, 1, 4), (1, 1, 1), (2, 1, 1), (4, 1, 1), (4, 1, 2), (8, 1, 2), (8, 1, 4),
                        (32, 1, 4), (4, 4, 2), (8, 4, 4), (16, 4, 4), (8, 16, 4), (16, 16, 8)]
]


def prune_rows(configs_, named_args, **kwargs):
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
    key=["H", "N", "B_TIER", "R"],
    prune_configs_by={"early_config_prune": prune_rows},
    restore_value=["state_ptr"],  # autotuning reruns the kernel: keep the in-place state intact
)
@triton.jit(do_not_specialize=["B", "H", "N", "B_TIER"])
def _step_fwd_kernel(
    state_ptr, u_ptr, dA_ptr, dB_ptr, C_ptr, D_ptr, P_ptr, Q_ptr, W_ptr, y_ptr,
    B, H, N, B_TIER,
    # strides of the complex tensors in complex elements (the real view's strides / 2)
    stride_state_b, stride_state_h, stride_state_n,
    stride_u_b, stride_u_h,
    stride_dA_h, stride_dA_n,
    stride_dB_h, stride_dB_n,
    stride_C_h, stride_C_n,
    stride_D_h,
    stride_pqw_r, stride_pqw_h, stride_pqw_n,
    stride_y_b, stride_y_h,
    R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # batch rows on axis 0 (no 65535 limit on B)
    pid_h = tl.program_id(1).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < H
    mask_hn = (mask_h[:, None] & (offs_n < N)[None, :])[:, :, None]  # [BLOCK_H, BLOCK_N, 1]
    h3 = offs_h[:, None, None]
    n3 = offs_n[None, :, None]
    c3 = tl.arange(0, 2)[None, None, :]  # re, im

    # per-channel constants: loaded once, used for all ROWS batch rows of this program
    ar, ai = load_pairs(dA_ptr, (h3 * stride_dA_h + n3 * stride_dA_n) * 2 + c3, mask_hn)
    br, bi = load_pairs(dB_ptr, (h3 * stride_dB_h + n3 * stride_dB_n) * 2 + c3, mask_hn)
    cr, ci = load_pairs(C_ptr, (h3 * stride_C_h + n3 * stride_C_n) * 2 + c3, mask_hn)
    d = tl.load(D_ptr + offs_h * stride_D_h, mask=mask_h, other=0.0).to(tl.float32)
    pqw_off = (h3 * stride_pqw_h + n3 * stride_pqw_n) * 2 + c3

    for i in range(ROWS):
        b = pid_b * ROWS + i
        # the row's bound through tl.where, not `&`: triton 3.9's interpreter refuses a block
        # mask combined with a scalar condition (`mask_h & row_ok`)
        row_ok = b < B
        mask_hb = tl.where(row_ok, mask_h, False)
        mask_hnb = tl.where(row_ok, mask_hn, False)
        u = tl.load(u_ptr + b * stride_u_b + offs_h * stride_u_h, mask=mask_hb,
                    other=0.0).to(tl.float32)
        x_offs = (b * stride_state_b + h3 * stride_state_h + n3 * stride_state_n) * 2 + c3
        xr, xi = load_pairs(state_ptr, x_offs, mask_hnb)
        nr, ni = step_tile(xr, xi, u[:, None], ar, ai, br, bi, P_ptr, Q_ptr, W_ptr, pqw_off,
                           stride_pqw_r * 2, mask_hn, R)
        tl.store(state_ptr + x_offs, tl.join(nr, ni), mask=mask_hnb)
        y = 2.0 * tl.sum(cr * nr - ci * ni, axis=1) + d * u
        tl.store(y_ptr + b * stride_y_b + offs_h * stride_y_h, y, mask=mask_hb)


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


def step_fwd(op: str, state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, P: torch.Tensor | None = None,
             Q: torch.Tensor | None = None, W: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the step on real planes: state (B, H, N, 2) float32, updated in place; dA, dB, C
    (H, N, 2); P, Q, W (r, H, N, 2) with the same strides, or None (the diagonal step).
    Returns y (B, H) fp32."""
    B, H, N = state.shape[:3]
    s_state = complex_strides(op, "state", state)
    s_dA, s_dB, s_C = (complex_strides(op, n, t) for n, t in (("dA", dA), ("dB", dB), ("C", C)))
    R = 0 if P is None else P.shape[0]
    if R:
        for name, t in (("P", P), ("Q", Q), ("W", W)):
            complex_strides(op, name, t)
        if not Q.stride() == P.stride() == W.stride():  # the kernel indexes the three alike
            P, Q, W = P.contiguous(), Q.contiguous(), W.contiguous()
        s_pqw = complex_strides(op, "P", P)
    else:
        P = Q = W = dA  # never read: the R == 0 branch is compiled out
        s_pqw = (0, 0, 0)
    y = torch.empty((B, H), dtype=torch.float32, device=state.device)
    if B == 0 or H == 0:
        return y
    BLOCK_N = triton.next_power_of_2(max(N, 1))

    def grid(meta):
        return (triton.cdiv(B, meta["ROWS"]), triton.cdiv(H, meta["BLOCK_H"]))

    with nvtx_range(f"sashimi/{op}/fwd"), device_guard(state.device):
        _step_fwd_kernel[grid](
            state, u, dA, dB, C, D, P, Q, W, y,
            B, H, N, batch_tier(B),
            *s_state,
            u.stride(0), u.stride(1),
            *s_dA, *s_dB, *s_C,
            D.stride(0),
            *s_pqw,
            y.stride(0), y.stride(1),
            R=R, BLOCK_N=BLOCK_N,
        )
    return y


def as_complex_state(op: str, state, dims: int = 3) -> torch.Tensor:
    """The complex view of `state`: itself if complex, view_as_complex of real planes (..., 2)
    with `dims` leading dims."""
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"{op}: state must be a tensor, got {type(state).__name__}")
    if state.is_floating_point():
        names = "(B, H, N, 2)" if dims == 3 else "(n_layers, B, H, N, 2)"
        if state.dim() != dims + 1 or state.shape[-1] != 2:
            raise ValueError(f"{op}: a real state must be the planes {names} of a complex state "
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


def check_not_expanded(op: str, state: torch.Tensor) -> None:
    if any(st == 0 and sz > 1 for st, sz in zip(state.stride(), state.shape)):
        raise ValueError(f"{op}: state is updated in place and must not be an expanded tensor "
                         f"(stride {state.stride()})")


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
    check_not_expanded(op, state)
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
    """Run a state-mutating custom op on the real planes of `state` (kernels/ssm_step.py's
    docstring: why a complex state is copied while torch.compile traces)."""
    if not state.is_complex():
        return custom_op(state, *args)
    if torch.compiler.is_compiling():
        planes = torch.view_as_real(state).clone()
        y = custom_op(planes, *args)
        state.copy_(torch.view_as_complex(planes))
        return y
    return custom_op(torch.view_as_real(state), *args)
