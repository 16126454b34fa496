"""`tier_step`: one generation time step of a whole SaShiMi tier (n_layers x [S4 block, FF block])
in ONE kernel launch, the S4 states updated in place.

Math (kernels.reference.tier_step is the oracle), per batch row b, x (H,) the tier's input:

    for l in 0 .. n_layers-1:
        h = LayerNorm(x; s4_norm_w[l], s4_norm_b[l], eps=1e-5)
        y = S4 step of h with layer l's constants, reading/updating state[l]
              diag:  kernels.reference.ssm_step   (dA, dB, C, D)
              dplr:  kernels.reference.dplr_step  (dA, dB, C, D, P, Q, W; rank r >= 1)
        z = s4_out_w[l] @ gelu(y) + s4_out_b[l]            (2H,), exact erf GELU
        x = x + z[:H] * sigmoid(z[H:])                       (GLU)
        if the tier has FF blocks (ff_w1 given):
            h = LayerNorm(x; ff_norm_w[l], ff_norm_b[l], eps=1e-5)
            x = x + ff_w2[l] @ gelu(ff_w1[l] @ h + ff_b1[l]) + ff_b2[l]
    return x                                                 (the caller adds the tier's skip)

This is `for layer, s in zip(tier, states): x = layer.step(x, s)` of sashimi.model (Residual(S4Layer)
and Residual(FeedForward), eval mode) with the per-layer states stacked.

Shapes: n = n_layers, B batch rows, H channels, N state entries (one of each conjugate pair),
r low rank (dplr), F = ff * H hidden width. x: real (B, H); state: complex (n, B, H, N) (or its
float32 planes (n, B, H, N, 2)); params (stacked over layers, contiguous): s4_norm_w, s4_norm_b (n, H);
dA, dB, C complex (n, H, N); D (n, H); dplr: P, Q, W complex (n, r, H, N); s4_out_w (n, 2H, H),
s4_out_b (n, 2H); optionally ff_norm_w, ff_norm_b (n, H), ff_w1 (n, F, H), ff_b1 (n, F),
ff_w2 (n, H, F), ff_b2 (n, H). Returns float32 (B, H).

Dtypes (Triton path): state and the complex constants complex64; x and the real parameters
float32, bfloat16 or float16 (loaded and computed in fp32: bf16 matrices halve the bytes streamed
per step); the result float32. The reference path also takes complex128 / float64. Inference
only: with grad mode on, an input that requires grad is an error.

Kernel (latency-bound: at B = 1 the whole tier is one CTA). Grid (cdiv(B, ROWS),): one program per
ROWS batch rows (ROWS = 1 at small B; more rows share each weight tile at large B), looping over
the layers inside the kernel (a `while` loop: the interpreter cannot take range() of a runtime
int). x (ROWS, H) lives in registers across layers. Vectors whose next use needs them whole, in
another layout (LayerNorm output -> S4 step in channel blocks; S4 output -> matrix-vector product;
FF hidden), go through a per-row fp32 scratch buffer in global memory (L1/L2 resident), with
`tl.debug_barrier()` (bar.sync: CTA-wide, and it makes the CTA's global writes visible to its
own threads) between writing a vector and reading it back; regions are laid out so that no
region is rewritten before a barrier separates it from its last read:

    scratch row (4H + F floats): [0, H) LayerNorm output | [H, 2H) gelu(S4 y) | [2H, 3H) GLU output
                                 [3H, 4H) FF output      | [4H, 4H + F) FF hidden

Three barriers per S4 block, three per FF block. The S4 step processes BLOCK_HS channels at a time
with the whole N per channel in registers (as kernels.ssm_step / kernels.dplr_step: one read and
one write of the state). Matrix-vector products loop over blocks of output rows: a
[BLOCK_O, K] weight tile (the whole input width K in one tile, masked) times the input vector,
reduced over K in fp32; BLOCK_O comes from the TILE budget (elements per weight tile) by
@triton.heuristics. Weights stream from L2 every step. Every load and store is masked on every
dimension (H, N, F, r need not be powers of two). Autotuned over TILE, ROWS, BLOCK_HS, num_warps
(key: H, N, F, r, FF, batch tier), with restore_value on the state; tune (call once) before
capturing a CUDA graph.

torch.library: `sashimi_kernels::tier_step` (mutates_args=("state",)), complex tensors crossing as
torch.view_as_real planes, optional tensors for the dplr factors and the FF weights, with a fake
implementation. As kernels.ssm_step: in place on the planes of a complex state in eager mode,
through a copy of the planes under torch.compile (why: kernels/ssm_step.py's docstring), in place
without a copy for a state carried as float32 planes (n, B, H, N, 2).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._jit import gelu, layer_norm, load_pairs, step_tile
from kernels._step import (as_complex_state, batch_tier, call_in_place, check_inference_only,
                           check_not_expanded, complex_strides, prune_rows)
from kernels._utils import choose_backend, configs, device_guard, same_device
from kernels.profiling import nvtx_range

OP = "tier_step"
LN_EPS = tl.constexpr(1e-5)  # LayerNorm's eps (the reference's, sashimi's nn.LayerNorm default)

S4_KEYS = ("s4_norm_w", "s4_norm_b", "dA", "dB", "C", "D", "s4_out_w", "s4_out_b")
DPLR_KEYS = ("P", "Q", "W")
FF_KEYS = ("ff_norm_w", "ff_norm_b", "ff_w1", "ff_b1", "ff_w2", "ff_b2")
COMPLEX_KEYS = ("dA", "dB", "C", "P", "Q", "W")
_REAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# TILE: elements of one weight tile per matrix-vector iteration (x ROWS: the product's registers);
# BLOCK_HS: channels per S4-step block. The first config runs under the interpreter and is valid
# for any size. Big tiles keep more bytes in flight: at B = 1 the kernel is one CTA streaming the
# tier's weights from L2, so bytes in flight per CTA set the speed.
TIER_CONFIGS = [
    triton.Config({"TILE": tile, "ROWS": rows, "BLOCK_HS": bhs}, num_warps=w)
    for tile, rows, bhs, w in [(1024, 1, 16, 4), (4096, 1, 16, 4), (8192, 1, 32, 8), (16384, 1, 32, 8),
                               (16384, 1, 64, 16), (32768, 1, 64, 16), (16384, 2, 32, 8),
                               (16384, 4, 32, 8), (32768, 4, 32, 16), (32768, 8, 32, 16)]
]


def _block_o(tile: int, rows: int, block_k: int, block_out: int) -> int:
    """Output rows per weight tile: tile // (rows x K), at least 1, at most the (padded) outputs."""
    return max(1, min(block_out, tile // (rows * block_k)))


@triton.jit
def _rows_matvec(w, v, ROWS: tl.constexpr):
    """[ROWS, BO] = v [ROWS, BK] @ w[BO, BK]^T, reduced in fp32 over BK."""
    if ROWS == 1:
        return tl.sum(w * v, axis=1)[None, :]
    else:
        return tl.sum(v[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def _linear_tile(w_ptr, b_ptr, offs_o, mask_o, offs_k, mask_k, K, v, ROWS: tl.constexpr):
    """[ROWS, BO] = v @ W[offs_o, :K]^T + b[offs_o]: one [BO, K] tile of a row-major (out, K)
    weight (any dtype, computed in fp32), masked on both dims."""
    w = tl.load(w_ptr + offs_o[:, None] * K + offs_k[None, :],
                mask=mask_o[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    return _rows_matvec(w, v, ROWS) + tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _linear_rows(w_ptr, b_ptr, v, offs_k, mask_k, K, n_out, out_ptr, row_ok, ROWS: tl.constexpr,
                 BO: tl.constexpr, GELU: tl.constexpr):
    """out[:, :n_out] = act(v @ W^T + b), BO output rows per weight tile; out_ptr: [ROWS, 1]
    row bases (scratch)."""
    j0 = tl.zeros((), dtype=tl.int32)
    while j0 < n_out:
        offs_o = j0 + tl.arange(0, BO)
        mask_o = offs_o < n_out
        a = _linear_tile(w_ptr, b_ptr, offs_o, mask_o, offs_k, mask_k, K, v, ROWS)
        if GELU:
            a = gelu(a)
        tl.store(out_ptr + offs_o[None, :], a, mask=row_ok[:, None] & mask_o[None, :])
        j0 += BO


@triton.autotune(
    configs=configs(TIER_CONFIGS),
    key=["H", "N", "F", "B_TIER", "R", "HAS_FF"],
    prune_configs_by={"early_config_prune": prune_rows},
    restore_value=["state_ptr"],  # autotuning reruns the kernel: keep the in-place state intact
)
@triton.heuristics({
    "BHS": lambda a: min(a["BLOCK_HS"], a["BLOCK_H"]),
    # the GLU projection loads two tiles (the z[:H] and z[H:] rows) per iteration
    "BO_OUT": lambda a: _block_o(a["TILE"] // 2, a["ROWS"], a["BLOCK_H"], a["BLOCK_H"]),
    "BO_FF1": lambda a: _block_o(a["TILE"], a["ROWS"], a["BLOCK_H"], a["BLOCK_F"]),
    "BO_FF2": lambda a: _block_o(a["TILE"], a["ROWS"], a["BLOCK_F"], a["BLOCK_H"]),
})
@triton.jit(do_not_specialize=["B", "NL", "B_TIER"])
def _tier_step_fwd_kernel(
    x_ptr, out_ptr, scratch_ptr, state_ptr,
    s4nw_ptr, s4nb_ptr, dA_ptr, dB_ptr, C_ptr, D_ptr, P_ptr, Q_ptr, W_ptr,
    ow_ptr, ob_ptr, fnw_ptr, fnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    B, H, N, F, NL, B_TIER, SCR,
    stride_x_b, stride_x_h,
    # strides of the complex state (n, B, H, N) in complex elements (its real view's / 2)
    stride_s_l, stride_s_b, stride_s_h, stride_s_n,
    R: tl.constexpr, HAS_FF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    TILE: tl.constexpr, ROWS: tl.constexpr, BLOCK_HS: tl.constexpr,
    BHS: tl.constexpr, BO_OUT: tl.constexpr, BO_FF1: tl.constexpr, BO_FF2: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < B
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    m_rh = row_ok[:, None] & mask_h[None, :]
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    m_rf = row_ok[:, None] & mask_f[None, :]
    scr = scratch_ptr + rows[:, None] * SCR           # [ROWS, 1] row bases of the scratch buffer
    offs_n = tl.arange(0, BLOCK_N)
    n3 = offs_n[None, :, None]
    c3 = tl.arange(0, 2)[None, None, :]               # re, im

    x = tl.load(x_ptr + rows[:, None] * stride_x_b + offs_h[None, :] * stride_x_h,
                mask=m_rh, other=0.0).to(tl.float32)

    l = tl.zeros((), dtype=tl.int32)
    while l < NL:  # layers (a while loop: the interpreter cannot take range() of a runtime int)
        l64 = l.to(tl.int64)
        # ---------------- S4 residual block ----------------
        h = layer_norm(x, s4nw_ptr + l64 * H, s4nb_ptr + l64 * H, offs_h, mask_h, H, LN_EPS)
        tl.store(scr + offs_h[None, :], h, mask=m_rh)                         # region [0, H)
        tl.debug_barrier()

        # the S4 step, BHS channels at a time, the whole N per channel
        h0 = tl.zeros((), dtype=tl.int32)
        while h0 < H:
            offs_s = h0 + tl.arange(0, BHS)
            mask_s = offs_s < H
            mask_sn = (mask_s[:, None] & (offs_n < N)[None, :])[:, :, None]   # [BHS, BLOCK_N, 1]
            ch = l64 * H + offs_s                                             # channel in (n, H)
            c_off = (ch[:, None, None] * N + n3) * 2 + c3
            ar, ai = load_pairs(dA_ptr, c_off, mask_sn)
            br, bi = load_pairs(dB_ptr, c_off, mask_sn)
            cr, ci = load_pairs(C_ptr, c_off, mask_sn)
            pqw_off = (((l64 * R) * H + offs_s[:, None, None]) * N + n3) * 2 + c3   # rank 0 of layer l
            d = tl.load(D_ptr + ch, mask=mask_s, other=0.0).to(tl.float32)
            for i in tl.static_range(ROWS):
                row = pid * ROWS + i
                # the row's bound through tl.where, not `&`: triton 3.9's interpreter refuses a
                # block mask combined with a scalar condition (`mask_s & ok`)
                ok = row < B
                mask_sr = tl.where(ok, mask_s, False)
                mask_snr = tl.where(ok, mask_sn, False)
                srow = scratch_ptr + row * SCR
                u = tl.load(srow + offs_s, mask=mask_sr, other=0.0)
                s_ptrs = state_ptr + (l64 * stride_s_l + row * stride_s_b
                                      + offs_s[:, None, None] * stride_s_h + n3 * stride_s_n) * 2 + c3
                xr, xi = tl.split(tl.load(s_ptrs, mask=mask_snr, other=0.0))
                nr, ni = step_tile(xr, xi, u[:, None], ar, ai, br, bi, P_ptr, Q_ptr, W_ptr, pqw_off,
                                   H * N * 2, mask_sn, R)
                tl.store(s_ptrs, tl.join(nr, ni), mask=mask_snr)
                y = 2.0 * tl.sum(cr * nr - ci * ni, axis=1) + d * u
                tl.store(srow + H + offs_s, gelu(y), mask=mask_sr)           # region [H, 2H)
            h0 += BHS
        tl.debug_barrier()

        # z = W_out gelu(y) + b, GLU: the z[:H] and z[H:] rows of an output block together
        yv = tl.load(scr + H + offs_h[None, :], mask=m_rh, other=0.0)
        ow = ow_ptr + l64 * 2 * H * H
        ob = ob_ptr + l64 * 2 * H
        j0 = tl.zeros((), dtype=tl.int32)
        while j0 < H:
            offs_o = j0 + tl.arange(0, BO_OUT)
            mask_o = offs_o < H
            za = _linear_tile(ow, ob, offs_o, mask_o, offs_h, mask_h, H, yv, ROWS)
            zg = _linear_tile(ow + H * H, ob + H, offs_o, mask_o, offs_h, mask_h, H, yv, ROWS)
            tl.store(scr + 2 * H + offs_o[None, :], za * tl.sigmoid(zg),
                     mask=row_ok[:, None] & mask_o[None, :])                  # region [2H, 3H)
            j0 += BO_OUT
        tl.debug_barrier()
        x += tl.load(scr + 2 * H + offs_h[None, :], mask=m_rh, other=0.0)

        # ---------------- FF residual block ----------------
        if HAS_FF:
            h = layer_norm(x, fnw_ptr + l64 * H, fnb_ptr + l64 * H, offs_h, mask_h, H, LN_EPS)
            tl.store(scr + offs_h[None, :], h, mask=m_rh)                     # region [0, H)
            tl.debug_barrier()
            hv = tl.load(scr + offs_h[None, :], mask=m_rh, other=0.0)
            _linear_rows(w1_ptr + l64 * F * H, b1_ptr + l64 * F, hv, offs_h, mask_h, H, F,
                         scr + 4 * H, row_ok, ROWS, BO_FF1, True)            # region [4H, 4H + F)
            tl.debug_barrier()
            fv = tl.load(scr + 4 * H + offs_f[None, :], mask=m_rf, other=0.0)
            _linear_rows(w2_ptr + l64 * H * F, b2_ptr + l64 * H, fv, offs_f, mask_f, F, H,
                         scr + 3 * H, row_ok, ROWS, BO_FF2, False)           # region [3H, 4H)
            tl.debug_barrier()
            x += tl.load(scr + 3 * H + offs_h[None, :], mask=m_rh, other=0.0)
        l += 1

    tl.store(out_ptr + rows[:, None] * H + offs_h[None, :], x, mask=m_rh)


# ---------------------------------------------------------------------------------------------
# host side

def tier_step_fwd(state: torch.Tensor, x: torch.Tensor, s4_norm_w: torch.Tensor,
                  s4_norm_b: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None,
                  W: torch.Tensor | None, s4_out_w: torch.Tensor, s4_out_b: torch.Tensor,
                  ff_norm_w: torch.Tensor | None = None, ff_norm_b: torch.Tensor | None = None,
                  ff_w1: torch.Tensor | None = None, ff_b1: torch.Tensor | None = None,
                  ff_w2: torch.Tensor | None = None, ff_b2: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """Launch the tier step. state: real planes (n, B, H, N, 2) float32, any strides, updated in
    place; dA, dB, C (n, H, N, 2) and P, Q, W (n, r, H, N, 2): contiguous real planes; the real
    parameters contiguous. Returns (B, H) float32.
    config: a fixed {"TILE", "ROWS", "BLOCK_HS", "num_warps"} instead of the autotuner (tests)."""
    NL, B, H, N = state.shape[:4]
    s_state = complex_strides(OP, "state", state)
    for name, t in (("dA", dA), ("dB", dB), ("C", C), ("P", P), ("Q", Q), ("W", W)):
        if t is not None:
            complex_strides(OP, name, t)
    R = 0 if P is None else P.shape[1]
    has_ff = ff_w1 is not None
    F = ff_w1.shape[1] if has_ff else 0
    out = torch.empty((B, H), dtype=torch.float32, device=x.device)
    if B == 0:
        return out
    SCR = 4 * H + F
    scratch = torch.empty((B, SCR), dtype=torch.float32, device=x.device)
    BLOCK_H = triton.next_power_of_2(H)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_F = triton.next_power_of_2(max(F, 1))
    dummy = s4_norm_w  # never read: the R == 0 / HAS_FF == False branches are compiled out
    ff = (ff_norm_w, ff_norm_b, ff_w1, ff_b1, ff_w2, ff_b2) if has_ff else (dummy,) * 6
    args = (x, out, scratch, state,
            s4_norm_w, s4_norm_b, dA, dB, C, D,
            P if R else dummy, Q if R else dummy, W if R else dummy,
            s4_out_w, s4_out_b, *ff,
            B, H, N, F, NL, batch_tier(B), SCR,
            x.stride(0), x.stride(1), *s_state)
    meta = dict(R=R, HAS_FF=has_ff, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    with nvtx_range("sashimi/tier_step/fwd"), device_guard(x.device):
        if config is None:
            _tier_step_fwd_kernel[lambda m: (triton.cdiv(B, m["ROWS"]),)](*args, **meta)
        else:
            _tier_step_fwd_kernel.fn[(triton.cdiv(B, config["ROWS"]),)](*args, **meta, **config)
    return out


@torch.library.custom_op("sashimi_kernels::tier_step", mutates_args=("state",))
def _tier_step_op(state: torch.Tensor, x: torch.Tensor, s4_norm_w: torch.Tensor,
                  s4_norm_b: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None,
                  W: torch.Tensor | None, s4_out_w: torch.Tensor, s4_out_b: torch.Tensor,
                  ff_norm_w: torch.Tensor | None, ff_norm_b: torch.Tensor | None,
                  ff_w1: torch.Tensor | None, ff_b1: torch.Tensor | None,
                  ff_w2: torch.Tensor | None, ff_b2: torch.Tensor | None) -> torch.Tensor:
    """Complex tensors as torch.view_as_real planes (..., 2) float32; state updated in place."""
    return tier_step_fwd(state, x, s4_norm_w, s4_norm_b, dA, dB, C, D, P, Q, W, s4_out_w,
                         s4_out_b, ff_norm_w, ff_norm_b, ff_w1, ff_b1, ff_w2, ff_b2)


@_tier_step_op.register_fake
def _tier_step_fake(state, x, s4_norm_w, s4_norm_b, dA, dB, C, D, P, Q, W, s4_out_w, s4_out_b,
                    ff_norm_w, ff_norm_b, ff_w1, ff_b1, ff_w2, ff_b2):
    return x.new_empty((state.shape[1], state.shape[2]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# input checks

def check_tier_inputs(x, state, params, ssm) -> dict:
    """Validate everything; returns the params with None entries dropped. state: complex view."""
    if ssm not in ("diag", "dplr"):
        raise ValueError(f"{OP}: ssm must be 'diag' or 'dplr', got {ssm!r}")
    if not isinstance(params, Mapping):
        raise ValueError(f"{OP}: params must be a dict of tensors, got {type(params).__name__}")
    p = {k: v for k, v in params.items() if v is not None}
    known = set(S4_KEYS) | set(DPLR_KEYS) | set(FF_KEYS)
    unknown = sorted(set(p) - known)
    if unknown:
        raise ValueError(f"{OP}: unknown params {unknown} (expected {sorted(known)})")
    required = S4_KEYS + (DPLR_KEYS if ssm == "dplr" else ())
    missing = [k for k in required if k not in p]
    if missing:
        raise ValueError(f"{OP}: missing params {missing} for ssm={ssm!r}")
    if ssm == "diag":
        extra = [k for k in DPLR_KEYS if k in p]
        if extra:
            raise ValueError(f"{OP}: params {extra} are the dplr factors; ssm='diag' takes none")
    ff_given = [k for k in FF_KEYS if k in p]
    if ff_given and len(ff_given) != len(FF_KEYS):
        raise ValueError(f"{OP}: the FF block needs all of {list(FF_KEYS)}, missing "
                         f"{[k for k in FF_KEYS if k not in p]} (give all or none)")
    for k, v in p.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{OP}: params[{k!r}] must be a tensor, got {type(v).__name__}")
        if k in COMPLEX_KEYS:
            if not v.is_complex():
                raise ValueError(f"{OP}: params[{k!r}] must be complex (complex64 or complex128), "
                                 f"got {v.dtype}")
        elif not v.is_floating_point():
            raise ValueError(f"{OP}: params[{k!r}] must be a real floating tensor, got {v.dtype}")
        if not v.is_contiguous():
            raise ValueError(f"{OP}: params[{k!r}] must be contiguous (stack the layers' tensors), "
                             f"got stride {v.stride()} for shape {tuple(v.shape)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{OP}: x must be a real floating tensor (B, H), got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if state.dim() != 4:
        raise ValueError(f"{OP}: state must be (n_layers, B, H, N), got shape {tuple(state.shape)}")
    n, B, H, N = state.shape
    if n < 1 or H < 1 or N < 1:
        raise ValueError(f"{OP}: state (n_layers, B, H, N) = {tuple(state.shape)} needs n_layers, "
                         f"H and N >= 1")
    check_not_expanded(OP, state)
    if tuple(x.shape) != (B, H):
        raise ValueError(f"{OP}: x must be (B, H) = {(B, H)} to match state, got {tuple(x.shape)}")
    shapes = dict(s4_norm_w=(n, H), s4_norm_b=(n, H), dA=(n, H, N), dB=(n, H, N), C=(n, H, N),
                  D=(n, H), s4_out_w=(n, 2 * H, H), s4_out_b=(n, 2 * H))
    if ssm == "dplr":
        r = p["P"].shape[1] if p["P"].dim() == 4 else -1
        if r < 1:
            raise ValueError(f"{OP}: P must be (n_layers, r, H, N) with r >= 1 and (n_layers, H, N) "
                             f"= {(n, H, N)}, got {tuple(p['P'].shape)}")
        shapes.update(P=(n, r, H, N), Q=(n, r, H, N), W=(n, r, H, N))
    if ff_given:
        F = p["ff_w1"].shape[1] if p["ff_w1"].dim() == 3 else -1
        if F < 1:
            raise ValueError(f"{OP}: ff_w1 must be (n_layers, F, H) with F >= 1 and (n_layers, H) = "
                             f"{(n, H)}, got {tuple(p['ff_w1'].shape)}")
        shapes.update(ff_norm_w=(n, H), ff_norm_b=(n, H), ff_w1=(n, F, H), ff_b1=(n, F),
                      ff_w2=(n, H, F), ff_b2=(n, H))
    for k, shape in shapes.items():
        if tuple(p[k].shape) != shape:
            raise ValueError(f"{OP}: params[{k!r}] must be {shape} for (n_layers, B, H, N) = "
                             f"{(n, B, H, N)}, got {tuple(p[k].shape)}")
    return p


def tier_step(x: torch.Tensor, state: torch.Tensor, params: dict, ssm: str,
              backend: str = "auto") -> torch.Tensor:
    """One generation time step of a whole tier (n_layers x [S4 block, FF block]); the S4 states
    are updated in place. Returns the tier's output (B, H), without the tier's outer skip.

    x: real (B, H). state: complex (n_layers, B, H, N), or its float32 planes (n_layers, B, H, N, 2),
    any strides, updated in place (it keeps its data_ptr; layer l's state is state[l]).
    params: dict of stacked, contiguous tensors (module docstring; keys s4_norm_w, s4_norm_b, dA, dB,
    C, D, s4_out_w, s4_out_b; for ssm="dplr" also P, Q, W (n, r, H, N); the FF block's ff_norm_w,
    ff_norm_b, ff_w1, ff_b1, ff_w2, ff_b2 all or none; a None value counts as absent).
    ssm: "diag" (the kernels.ssm_step recurrence) or "dplr" (kernels.dplr_step).
    backend: "auto" | "triton" | "reference" (kernels.reference.tier_step). Inference only.
    Returns float32 (B, H) on the Triton path (the reference path: the promoted dtype).
    """
    xc = as_complex_state(OP, state, dims=4)
    p = check_tier_inputs(x, xc, params, ssm)
    device = same_device(OP, x=x, state=state, **p)
    check_inference_only(OP, x=x, state=state, **p)
    path = choose_backend(OP, backend, device)
    if path == "reference":
        return reference.tier_step(x, xc, p, ssm)
    if xc.dtype != torch.complex64:
        raise ValueError(f"{OP}: the Triton path needs state in complex64, got {xc.dtype} "
                         f"(backend='reference' takes complex128)")
    for k, v in p.items():
        if k in COMPLEX_KEYS and v.dtype != torch.complex64:
            raise ValueError(f"{OP}: the Triton path needs params[{k!r}] in complex64, got "
                             f"{v.dtype} (backend='reference' takes complex128)")
        if k not in COMPLEX_KEYS and v.dtype not in _REAL_DTYPES:
            raise ValueError(f"{OP}: the Triton path needs params[{k!r}] in float32, bfloat16 or "
                             f"float16, got {v.dtype} (backend='reference' takes float64)")
    if x.dtype not in _REAL_DTYPES:
        raise ValueError(f"{OP}: the Triton path needs x in float32, bfloat16 or float16, got "
                         f"{x.dtype} (backend='reference' takes float64)")
    vr = torch.view_as_real
    cplx = {k: vr(p[k]) if k in p else None for k in COMPLEX_KEYS}
    return call_in_place(
        _tier_step_op, state, x, p["s4_norm_w"], p["s4_norm_b"], cplx["dA"], cplx["dB"],
        cplx["C"], p["D"], cplx["P"], cplx["Q"], cplx["W"], p["s4_out_w"], p["s4_out_b"],
        p.get("ff_norm_w"), p.get("ff_norm_b"), p.get("ff_w1"), p.get("ff_b1"), p.get("ff_w2"),
        p.get("ff_b2"))
