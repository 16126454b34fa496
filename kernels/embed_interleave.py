"""Fused embedding lookup + stereo interleave: the SaShiMi encoder's first op.

Math (shape letters: B batch, L time steps, C channels, V vocabulary, D embedding width):

    out[b, l*C + c, :] = scale * weight[tokens[b, l, c], :]        out: (B, L*C, D)

so the channels come out interleaved L, R, L, R, ... (C = 1, mono, is the same op). Flattening
(b, l*C + c) gives the row index r = b*L*C + l*C + c in [0, R), R = B*L*C, i.e. the row order of
`tokens.reshape(B*L*C)`; tokens may have any strides (the trainer passes `batch[:, :L]`, a
non-contiguous view) and are never copied by the forward.

Backward (tokens get no gradient):

    grad_weight[v, :] = scale * sum_{r : token[r] == v} grad_out[r, :]

Dtype policy: tokens int8/uint8/int16/int32/int64; weight float32 or bfloat16; out_dtype float32
or bfloat16 (default weight.dtype). The forward forms `weight * scale` in fp32 and rounds once to
out_dtype (kernels.reference.embed_interleave does exactly this, so fp32 output is bitwise equal
to it). The backward accumulates in fp32 and rounds once to weight.dtype. `scale` is a Python
number; the kernels take it as an fp32 scalar (as torch does when it multiplies an fp32 tensor).

Backward strategies (R rows of width D; contention: V = 256 rows receive ~2M updates at the
anchor size B=16, L=64000, C=2, D=64):

* V <= ONEHOT_MAX_V (1024): each program owns a contiguous range of row tiles (BLOCK_T rows) and a
  (BLOCK_V x BLOCK_D) block of the gradient, held in an fp32 register accumulator. Per tile it
  builds the one-hot matrix [v == token[t]] (BLOCK_V x BLOCK_T, exact in bf16) and does
  `acc += one_hot @ grad_tile` on the tensor cores. A bf16 grad_out is used as is (every product
  is exact, the MMA accumulates in fp32); an fp32 grad_out is split exactly into three bf16
  parts (hi + mid + lo == g, 8 + 8 + 8 significand bits) and does three MMAs, so no gradient is
  rounded to bf16 or tf32. Then either
    - fast mode (deterministic=False): the program atomically adds its partial into an fp32
      (V, D) buffer: only (programs x V x D) atomics, ~2 x SMs programs in all; the order of
      those adds varies, so the last bits of the gradient vary run to run. Block sizes
      (BLOCK_T, BLOCK_V, BLOCK_D, warps, stages) are autotuned per (V, D);
    - deterministic mode: the program stores its partial into a (P, V, D) fp32 buffer
      (P = min(row tiles, 256): a fixed row partition and a fixed kernel config, independent of
      the SM count and of autotuning) which a second kernel sums in a fixed order: bitwise
      identical results run to run (on the same GPU model and Triton version).
* V > ONEHOT_MAX_V (16-bit audio, V = 65536), where the one-hot is too large:
    - fast mode: per-row fp32 atomics (`atomic_add` of the scaled grad row at token*D). With a
      large vocabulary the updates spread over many rows, so contention is low; a clip that is
      mostly one token (digital silence) serialises on that row (a known limit of this mode);
    - deterministic mode: sort the R tokens once (torch.sort, stable), cut each token's segment
      into pieces of at most SEGMENT_ROWS rows (so one hot token cannot serialise the kernel),
      sum each piece in one program, then sum each token's pieces in order.

Out-of-range tokens: `check=True` (default) does one host-side aminmax check
(kernels.reference.check_tokens: a host sync) and raises ValueError on CPU and CUDA alike. The
check runs inside the custom op's implementation, so it also holds inside a torch.compile'd graph
(the op is opaque to the compiler). `check=False` skips it (no sync: for CUDA-graph capture during
generation); the kernels still never read out of bounds: such a row of `out` comes out NaN and
the row contributes nothing to grad_weight.

Interpreter notes (TRITON_INTERPRET=1 on CPU, how CI runs this file): with numpy 2.4 the
interpreter cannot use a tensor as a `range()` bound, casts bool -> bf16 bitwise, and multiplies
bf16 dot operands as raw uint16. So every loop with a run-time bound has a `while` twin selected
by the INTERPRET constexpr (GPU builds keep the pipelined `for`), the one-hot is built through
fp32, and under INTERPRET the (exact) bf16 operands are multiplied in fp32.

Reference: kernels.reference.embed_interleave (plain indexing; its autograd is the oracle of the
backward).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import (choose_backend, configs, device_guard, gpu_for, interpreting, nvtx_range,
                            same_device)

OP = "embed_interleave"

ONEHOT_MAX_V = 1024          # above this V the backward uses atomics / sort + segments
DET_PROGRAMS = 256           # row partition of the deterministic one-hot backward
DET_BLOCK_T = 64             # fixed tile of the deterministic one-hot backward
DET_NUM_WARPS = 8
SEGMENT_ROWS = 4096          # longest run of one token summed by one program (large-V deterministic)
REDUCE_BLOCK_P = 16
REDUCE_BLOCK_N = 128

TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 2**31 - 1         # row indices are int32 inside the kernels (addresses are int64)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.autotune(
    configs=configs([
        triton.Config({"BLOCK_R": 64}, num_warps=4),
        triton.Config({"BLOCK_R": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 128}, num_warps=4),
        triton.Config({"BLOCK_R": 128}, num_warps=8),
        triton.Config({"BLOCK_R": 256}, num_warps=8),
    ]),
    key=["D", "BLOCK_D"],
)
@triton.jit(do_not_specialize=["LC", "C", "V"])
def _embed_interleave_fwd_kernel(
    tok_ptr, w_ptr, out_ptr,
    LC, C, V, D, scale,
    stride_tok_b, stride_tok_l, stride_tok_c,
    stride_w_v, stride_w_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * cdiv(L*C, BLOCK_R), cdiv(D, BLOCK_D)); a program writes BLOCK_R rows of one batch.
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    n_jb = tl.cdiv(LC, BLOCK_R)
    b = pid // n_jb                                  # one scalar division per program
    jb = pid - b * n_jb
    j = (jb * BLOCK_R).to(tl.int32) + tl.arange(0, BLOCK_R)   # position in the L*C axis
    row_mask = j < LC
    ll = j // C
    cc = j - ll * C
    tok = tl.load(tok_ptr + b * stride_tok_b + ll.to(tl.int64) * stride_tok_l + cc.to(tl.int64) * stride_tok_c,
                  mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (tok >= 0) & (tok < V)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    w = tl.load(w_ptr + tok[:, None] * stride_w_v + d[None, :] * stride_w_d,
                mask=valid[:, None] & d_mask[None, :], other=float("nan"))
    out = (w.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    rows = b * LC + j.to(tl.int64)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _dot_bf16(a, b, acc, INTERPRET: tl.constexpr):
    # acc += a @ b for bf16 a, b with fp32 accumulation. The interpreter's dot multiplies the
    # raw uint16 storage of bf16 tensors, so there the (exact) fp32 values are multiplied.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _row_tokens(r, R, LC, C, V, tok_ptr, stride_tok_b, stride_tok_l, stride_tok_c):
    """Rows r of the (B, L*C) output: (batch bb, position jj, token (int64, -1 past R), valid:
    inside R and the token in [0, V))."""
    r_mask = r < R
    bb = r // LC
    jj = r - bb * LC
    ll = jj // C
    cc = jj - ll * C
    tok = tl.load(tok_ptr + bb.to(tl.int64) * stride_tok_b + ll.to(tl.int64) * stride_tok_l
                  + cc.to(tl.int64) * stride_tok_c, mask=r_mask, other=-1).to(tl.int64)
    return bb, jj, tok, r_mask & (tok >= 0) & (tok < V)


@triton.jit
def _onehot_tile(acc, t, tok_ptr, g_ptr, R, LC, C, V, v, d, d_mask,
                 stride_tok_b, stride_tok_l, stride_tok_c, stride_g_b, stride_g_j, stride_g_d,
                 INTERPRET: tl.constexpr, BLOCK_T: tl.constexpr):
    # acc[v, d] += sum over the rows t*BLOCK_T + [0, BLOCK_T) of [token == v] * g[row, d]
    r = t * BLOCK_T + tl.arange(0, BLOCK_T)
    bb, jj, tok, valid = _row_tokens(r, R, LC, C, V, tok_ptr, stride_tok_b, stride_tok_l, stride_tok_c)
    tok32 = tl.where(valid, tok, -1).to(tl.int32)
    # rows with an invalid token load zeros: a NaN there must not reach 0 * NaN in the MMA
    g = tl.load(g_ptr + bb.to(tl.int64)[:, None] * stride_g_b + jj.to(tl.int64)[:, None] * stride_g_j
                + d[None, :] * stride_g_d, mask=valid[:, None] & d_mask[None, :], other=0.0)
    # (BLOCK_V, BLOCK_T), exact in bf16 (via fp32: the interpreter casts bool -> bf16 bitwise)
    one_hot = tl.where(v[:, None] == tok32[None, :], 1.0, 0.0).to(tl.bfloat16)
    if g_ptr.dtype.element_ty == tl.bfloat16:
        acc = _dot_bf16(one_hot, g, acc, INTERPRET)
    else:
        # exact split of fp32 into three bf16 parts: every one-hot product stays exact
        g = g.to(tl.float32)
        g_hi = g.to(tl.bfloat16)
        rest = g - g_hi.to(tl.float32)
        g_mid = rest.to(tl.bfloat16)
        g_lo = (rest - g_mid.to(tl.float32)).to(tl.bfloat16)
        acc = _dot_bf16(one_hot, g_hi, acc, INTERPRET)
        acc = _dot_bf16(one_hot, g_mid, acc, INTERPRET)
        acc = _dot_bf16(one_hot, g_lo, acc, INTERPRET)
    return acc


@triton.jit(do_not_specialize=["R", "LC", "C", "V", "PER_SM"])
def _embed_interleave_bwd_kernel(
    tok_ptr, g_ptr, part_ptr,
    R, LC, C, V, D, scale,
    stride_tok_b, stride_tok_l, stride_tok_c,
    stride_g_b, stride_g_j, stride_g_d,
    ATOMIC: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PER_SM=1,   # programs per SM, read by the launcher's grid only: a runtime argument, never
                # specialised, so configs that differ only in it share one compile
):
    # One-hot backward (V <= ONEHOT_MAX_V). grid: (P, cdiv(V, BLOCK_V), cdiv(D, BLOCK_D)).
    # Program p sums row tiles [p*n/P, (p+1)*n/P) into acc[v, d] = sum_t [tok_t == v] g[t, d].
    # ATOMIC: atomically add scale*acc into the fp32 (V, D) buffer part_ptr;
    # else store acc (unscaled) at part_ptr[p] of a (P, V, D) fp32 buffer.
    pid_p = tl.program_id(0).to(tl.int64)
    n_p = tl.num_programs(0).to(tl.int64)
    pid_v = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_tiles = tl.cdiv(R, BLOCK_T).to(tl.int64)
    t_begin = (pid_p * n_tiles // n_p).to(tl.int32)
    t_end = ((pid_p + 1) * n_tiles // n_p).to(tl.int32)

    v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    v_mask = v < V
    d_mask = d < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    if INTERPRET:   # the interpreter (numpy 2.4) cannot take tensor loop bounds in range()
        t = t_begin
        while t < t_end:
            acc = _onehot_tile(acc, t, tok_ptr, g_ptr, R, LC, C, V, v, d, d_mask,
                               stride_tok_b, stride_tok_l, stride_tok_c, stride_g_b, stride_g_j, stride_g_d,
                               INTERPRET, BLOCK_T)
            t += 1
    else:
        for t in range(t_begin, t_end):
            acc = _onehot_tile(acc, t, tok_ptr, g_ptr, R, LC, C, V, v, d, d_mask,
                               stride_tok_b, stride_tok_l, stride_tok_c, stride_g_b, stride_g_j, stride_g_d,
                               INTERPRET, BLOCK_T)
    mask = v_mask[:, None] & d_mask[None, :]
    offs = v.to(tl.int64)[:, None] * D + d[None, :]
    if ATOMIC:
        tl.atomic_add(part_ptr + offs, acc * scale, mask=mask, sem="relaxed")
    else:
        tl.store(part_ptr + pid_p * V * D + offs, acc, mask=mask)


def _clamp_bwd_configs(configs_, named_args, **kwargs):
    """Shrink each config's BLOCK_V / BLOCK_D to what V and D need (>= 16 for tl.dot), deduplicated."""
    V, D = named_args["V"], named_args["D"]
    seen, out = set(), []
    for cfg in configs_:
        kw = dict(cfg.kwargs)
        kw["BLOCK_V"] = _block(V, 16, kw["BLOCK_V"])
        kw["BLOCK_D"] = _block(D, 16, kw["BLOCK_D"])
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


# BLOCK_V = 256 keeps the whole V = 256 table in one accumulator, so grad_out is read once;
# BLOCK_D = 32 halves the accumulator (more programs, fewer registers) at the cost of reading
# the tokens twice. PER_SM: programs per SM in all (the launcher's row partition; fewer programs,
# fewer atomics at the end). The first config is the interpreter's (valid for any V, D: masked).
_embed_interleave_bwd_kernel_tuned = triton.autotune(
    configs=configs([
        triton.Config({"BLOCK_T": 64, "BLOCK_V": 256, "BLOCK_D": 64, "PER_SM": 2}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64, "BLOCK_V": 256, "BLOCK_D": 64, "PER_SM": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 32, "BLOCK_V": 256, "BLOCK_D": 64, "PER_SM": 1}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_T": 128, "BLOCK_V": 256, "BLOCK_D": 64, "PER_SM": 1}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_T": 64, "BLOCK_V": 256, "BLOCK_D": 32, "PER_SM": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64, "BLOCK_V": 256, "BLOCK_D": 32, "PER_SM": 2}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 128, "BLOCK_V": 256, "BLOCK_D": 32, "PER_SM": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_D": 64, "PER_SM": 2}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_D": 64, "PER_SM": 1}, num_warps=8, num_stages=3),
    ]),
    key=["V", "D"],
    prune_configs_by={"early_config_prune": _clamp_bwd_configs},
    reset_to_zero=["part_ptr"],     # the atomic buffer is accumulated into while autotuning
)(_embed_interleave_bwd_kernel)


@triton.autotune(
    configs=configs([
        triton.Config({"BLOCK_T": 64}, num_warps=4),
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 128}, num_warps=8),
    ]),
    key=["D", "BLOCK_D"],
    reset_to_zero=["acc_ptr"],
)
@triton.jit(do_not_specialize=["R", "LC", "C", "V"])
def _embed_interleave_bwd_atomic_kernel(
    tok_ptr, g_ptr, acc_ptr,
    R, LC, C, V, D, scale,
    stride_tok_b, stride_tok_l, stride_tok_c,
    stride_g_b, stride_g_j, stride_g_d,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Large-V fast backward: per-row fp32 atomics into acc (V, D). grid: (cdiv(R, BLOCK_T), cdiv(D, BLOCK_D)).
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    bb, jj, tok, valid = _row_tokens(r, R, LC, C, V, tok_ptr, stride_tok_b, stride_tok_l, stride_tok_c)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d < D)[None, :]
    g = tl.load(g_ptr + bb.to(tl.int64)[:, None] * stride_g_b + jj.to(tl.int64)[:, None] * stride_g_j
                + d[None, :] * stride_g_d, mask=mask, other=0.0)
    tl.atomic_add(acc_ptr + tok[:, None] * D + d[None, :], g.to(tl.float32) * scale, mask=mask, sem="relaxed")


@triton.jit
def _segment_tile(acc, pos, end, perm_ptr, g_ptr, LC, d, d_mask, stride_g_b, stride_g_j, stride_g_d,
                  BLOCK_T: tl.constexpr):
    q = pos + tl.arange(0, BLOCK_T)
    q_mask = q < end
    r = tl.load(perm_ptr + q, mask=q_mask, other=0)
    bb = r // LC
    jj = r - bb * LC
    g = tl.load(g_ptr + bb[:, None] * stride_g_b + jj[:, None] * stride_g_j + d[None, :] * stride_g_d,
                mask=q_mask[:, None] & d_mask[None, :], other=0.0)
    return acc + tl.sum(g.to(tl.float32), axis=0)


@triton.jit(do_not_specialize=["LC"])
def _embed_interleave_bwd_segment_kernel(
    perm_ptr, start_ptr, end_ptr, g_ptr, part_ptr,
    LC, D,
    stride_g_b, stride_g_j, stride_g_d,
    INTERPRET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Large-V deterministic backward, pass 1: piece p sums grad rows perm[start[p]:end[p]]
    # (all of one token) in a fixed order into part[p, :]. grid: (pieces, cdiv(D, BLOCK_D)).
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = tl.load(start_ptr + pid)
    end = tl.load(end_ptr + pid)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if INTERPRET:
        pos = start
        while pos < end:
            acc = _segment_tile(acc, pos, end, perm_ptr, g_ptr, LC, d, d_mask,
                                stride_g_b, stride_g_j, stride_g_d, BLOCK_T)
            pos += BLOCK_T
    else:
        for pos in range(start, end, BLOCK_T):
            acc = _segment_tile(acc, pos, end, perm_ptr, g_ptr, LC, d, d_mask,
                                stride_g_b, stride_g_j, stride_g_d, BLOCK_T)
    tl.store(part_ptr + pid * D + d, acc, mask=d_mask)


@triton.jit
def _segsum_step(acc, k, part_ptr, first, count, D, d, d_mask):
    sel = k < count
    return acc + tl.load(part_ptr + (first + k)[:, None] * D + d[None, :],
                         mask=sel[:, None] & d_mask[None, :], other=0.0)


@triton.jit(do_not_specialize=["V"])
def _embed_interleave_bwd_segsum_kernel(
    part_ptr, first_ptr, count_ptr, out_ptr,
    V, D, scale,
    INTERPRET: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Large-V deterministic backward, pass 2: out[v] = scale * sum_k part[first[v] + k], k < count[v],
    # in order. grid: (cdiv(V, BLOCK_V), cdiv(D, BLOCK_D)).
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    v_mask = v < V
    d_mask = d < D
    first = tl.load(first_ptr + v, mask=v_mask, other=0)
    count = tl.load(count_ptr + v, mask=v_mask, other=0)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    k_end = tl.max(count, axis=0)
    if INTERPRET:
        k = k_end * 0
        while k < k_end:
            acc = _segsum_step(acc, k, part_ptr, first, count, D, d, d_mask)
            k += 1
    else:
        for k in range(0, k_end):
            acc = _segsum_step(acc, k, part_ptr, first, count, D, d, d_mask)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + v.to(tl.int64)[:, None] * D + d[None, :], out, mask=v_mask[:, None] & d_mask[None, :])


@triton.jit
def _reduce_step(acc, p0, part_ptr, N, P, i, i_mask, BLOCK_P: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK_P)
    tile = tl.load(part_ptr + p.to(tl.int64)[:, None] * N + i[None, :],
                   mask=(p < P)[:, None] & i_mask[None, :], other=0.0)
    return acc + tl.sum(tile, axis=0)


@triton.jit(do_not_specialize=["N", "P"])
def _embed_interleave_reduce_kernel(
    part_ptr, out_ptr, N, P, scale,
    INTERPRET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[i] = scale * sum_p part[p, i] (fixed order), rounded once to out's dtype. grid: cdiv(N, BLOCK_N).
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = i < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if INTERPRET:
        p0 = P * 0
        while p0 < P:
            acc = _reduce_step(acc, p0, part_ptr, N, P, i, i_mask, BLOCK_P)
            p0 += BLOCK_P
    else:
        for p0 in range(0, P, BLOCK_P):
            acc = _reduce_step(acc, p0, part_ptr, N, P, i, i_mask, BLOCK_P)
    tl.store(out_ptr + i, (acc * scale).to(out_ptr.dtype.element_ty), mask=i_mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _fast_programs(device: torch.device, n_tiles: int, other_programs: int, per_sm: int) -> int:
    """Row partitions of the fast one-hot backward: about per_sm programs per SM in all."""
    gpu = gpu_for(device)
    if gpu is not None:
        return max(1, min(n_tiles, triton.cdiv(per_sm * gpu.sms, other_programs)))
    return max(1, min(n_tiles, 4))   # the interpreter: few programs, each with several tiles


def embed_interleave_fwd(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch the forward kernel: (B, L, C) tokens (any strides), (V, D) weight -> (B, L*C, D)."""
    B, L, C = tokens.shape
    V, D = weight.shape
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    out = torch.empty((B, L * C, D), device=weight.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    BLOCK_D = _block(D, 16, 128)
    grid = lambda meta: (B * triton.cdiv(L * C, meta["BLOCK_R"]), triton.cdiv(D, BLOCK_D))  # noqa: E731
    with nvtx_range("sashimi/embed_interleave/fwd"), device_guard(weight.device):
        _embed_interleave_fwd_kernel[grid](
            tokens, weight, out,
            L * C, C, V, D, float(scale),
            tokens.stride(0), tokens.stride(1), tokens.stride(2),
            weight.stride(0), weight.stride(1),
            BLOCK_D=BLOCK_D,
        )
    return out


def embed_interleave_bwd(grad_out: torch.Tensor, tokens: torch.Tensor, num_embeddings: int,
                         weight_dtype: torch.dtype, scale: float = 1.0,
                         deterministic: bool = False) -> torch.Tensor:
    """Launch the backward: grad_out (B, L*C, D) -> grad_weight (V, D) in weight_dtype."""
    B, L, C = tokens.shape
    V, D = num_embeddings, grad_out.shape[-1]
    R = B * L * C
    if grad_out.shape != (B, L * C, D) or grad_out.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{OP}: grad_out must be float32/bfloat16 of shape {(B, L * C, D)}, "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)}")
    device = grad_out.device
    if R == 0 or V == 0 or D == 0:
        return torch.zeros((V, D), device=device, dtype=weight_dtype)
    LC = L * C
    scale = float(scale)
    tok_strides = (tokens.stride(0), tokens.stride(1), tokens.stride(2))
    g_strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    with nvtx_range("sashimi/embed_interleave/bwd"), device_guard(device):
        if V <= ONEHOT_MAX_V:
            if not deterministic:
                acc = torch.zeros((V, D), device=device, dtype=torch.float32)

                def grid(meta):
                    n_vb, n_db = triton.cdiv(V, meta["BLOCK_V"]), triton.cdiv(D, meta["BLOCK_D"])
                    P = _fast_programs(device, triton.cdiv(R, meta["BLOCK_T"]), n_vb * n_db, meta["PER_SM"])
                    return (P, n_vb, n_db)

                kernel, blocks = _embed_interleave_bwd_kernel_tuned, {}
                if interpreting():   # one config and no autotuner pruning there: clamp it here
                    cfg = _clamp_bwd_configs(kernel.configs, {"V": V, "D": D})[0]
                    kernel, blocks = _embed_interleave_bwd_kernel, cfg.all_kwargs()
                kernel[grid](
                    tokens, grad_out, acc, R, LC, C, V, D, scale, *tok_strides, *g_strides,
                    ATOMIC=True, INTERPRET=interpreting(), **blocks,
                )
                return _finish(acc, weight_dtype)
            BLOCK_V = _block(V, 16, 256)
            BLOCK_D = _block(D, 16, 64)
            n_vb, n_db = triton.cdiv(V, BLOCK_V), triton.cdiv(D, BLOCK_D)
            # deterministic: fixed partition and config, then a fixed-order sum
            P = min(triton.cdiv(R, DET_BLOCK_T), DET_PROGRAMS)
            part = torch.empty((P, V, D), device=device, dtype=torch.float32)
            _embed_interleave_bwd_kernel[(P, n_vb, n_db)](
                tokens, grad_out, part, R, LC, C, V, D, scale, *tok_strides, *g_strides,
                ATOMIC=False, INTERPRET=interpreting(), BLOCK_T=DET_BLOCK_T, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
                num_warps=DET_NUM_WARPS, num_stages=3,
            )
            return _reduce(part, P, V * D, scale, weight_dtype)

        BLOCK_D = _block(D, 16, 64)
        if not deterministic:
            acc = torch.zeros((V, D), device=device, dtype=torch.float32)
            grid = lambda meta: (triton.cdiv(R, meta["BLOCK_T"]), triton.cdiv(D, BLOCK_D))  # noqa: E731
            _embed_interleave_bwd_atomic_kernel[grid](
                tokens, grad_out, acc, R, LC, C, V, D, scale, *tok_strides, *g_strides,
                BLOCK_D=BLOCK_D,
            )
            return _finish(acc, weight_dtype)
        return _bwd_sorted(grad_out, tokens, V, D, R, LC, scale, weight_dtype, BLOCK_D)


def _finish(acc: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """The atomic buffer is already scaled: fp32 weight takes it as is, bf16 rounds it once."""
    if weight_dtype == torch.float32:
        return acc
    return _reduce(acc, 1, acc.numel(), 1.0, weight_dtype)


def _reduce(part: torch.Tensor, P: int, N: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(part.shape[-2:], device=part.device, dtype=dtype)
    block_n = 1024 if interpreting() else REDUCE_BLOCK_N     # the interpreter pays per program
    _embed_interleave_reduce_kernel[(triton.cdiv(N, block_n),)](
        part, out, N, P, scale, INTERPRET=interpreting(), BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=block_n, num_warps=4,
    )
    return out


def _bwd_sorted(grad_out, tokens, V, D, R, LC, scale, weight_dtype, BLOCK_D):
    """Large-V deterministic backward: stable sort, pieces of <= SEGMENT_ROWS rows, two passes."""
    device = grad_out.device
    flat = tokens.reshape(R).to(torch.int64)               # row order r = b*L*C + l*C + c
    sorted_tok, perm = torch.sort(flat, stable=True)
    bounds = torch.searchsorted(sorted_tok, torch.arange(V + 1, device=device, dtype=torch.int64))
    counts = bounds[1:] - bounds[:-1]                      # out-of-range tokens fall outside [0, V)
    n_pieces = (counts + SEGMENT_ROWS - 1) // SEGMENT_ROWS
    cum = torch.cumsum(n_pieces, 0)
    first = cum - n_pieces
    P_max = min(V, R) + triton.cdiv(R, SEGMENT_ROWS)       # an upper bound: no host sync
    p = torch.arange(P_max, device=device, dtype=torch.int64)
    piece_v = torch.searchsorted(cum, p, right=True)       # == V for unused pieces
    pv = piece_v.clamp(max=V - 1)
    start = bounds[pv] + (p - first[pv]) * SEGMENT_ROWS
    end = torch.minimum(start + SEGMENT_ROWS, bounds[pv + 1])
    end = torch.where(piece_v < V, end, start)
    part = torch.empty((P_max, D), device=device, dtype=torch.float32)
    _embed_interleave_bwd_segment_kernel[(P_max, triton.cdiv(D, BLOCK_D))](
        perm, start, end, grad_out, part, LC, D,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        INTERPRET=interpreting(), BLOCK_T=64, BLOCK_D=BLOCK_D, num_warps=4,
    )
    out = torch.empty((V, D), device=device, dtype=weight_dtype)
    BLOCK_V = 1024 if interpreting() else 64
    _embed_interleave_bwd_segsum_kernel[(triton.cdiv(V, BLOCK_V), triton.cdiv(D, BLOCK_D))](
        part, first, n_pieces, out, V, D, scale, INTERPRET=interpreting(), BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------------
# torch.library registration (what lets torch.compile(fullgraph=True) trace a caller)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("sashimi_kernels::embed_interleave_fwd", mutates_args=())
def _embed_interleave_fwd_op(tokens: torch.Tensor, weight: torch.Tensor, scale: float,
                             out_dtype: torch.dtype, deterministic: bool, check: bool) -> torch.Tensor:
    if check:   # a host sync; runs at run time even inside a compiled graph (the op is opaque)
        reference.check_tokens(tokens, weight.shape[0], OP)
    return embed_interleave_fwd(tokens, weight, scale, out_dtype)


@_embed_interleave_fwd_op.register_fake
def _(tokens, weight, scale, out_dtype, deterministic, check):
    B, L, C = tokens.shape
    return weight.new_empty((B, L * C, weight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("sashimi_kernels::embed_interleave_bwd", mutates_args=())
def _embed_interleave_bwd_op(grad_out: torch.Tensor, tokens: torch.Tensor, num_embeddings: int,
                             weight_dtype: torch.dtype, scale: float, deterministic: bool) -> torch.Tensor:
    return embed_interleave_bwd(grad_out, tokens, num_embeddings, weight_dtype, scale, deterministic)


@_embed_interleave_bwd_op.register_fake
def _(grad_out, tokens, num_embeddings, weight_dtype, scale, deterministic):
    return grad_out.new_empty((num_embeddings, grad_out.shape[-1]), dtype=weight_dtype)


def _setup_context(ctx, inputs, output):
    tokens, weight, scale, out_dtype, deterministic, check = inputs
    ctx.save_for_backward(tokens)
    ctx.num_embeddings = weight.shape[0]
    ctx.weight_dtype = weight.dtype
    ctx.scale = scale
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):
    (tokens,) = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = _embed_interleave_bwd_op(grad_out, tokens, ctx.num_embeddings, ctx.weight_dtype,
                                               ctx.scale, ctx.deterministic)
    return None, grad_weight, None, None, None, None


_embed_interleave_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def embed_interleave(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0,
                     out_dtype: torch.dtype | None = None, deterministic: bool = False,
                     check: bool = True, backend: str = "auto") -> torch.Tensor:
    """Embedding lookup with the channels interleaved: (B, L, C) tokens -> (B, L*C, D).

    out[b, l*C + c] = scale * weight[tokens[b, l, c]] (L, R, L, R, ...; C = 1 is mono).

    Args:
        tokens: integer tensor (B, L, C) (int64, int32, int16, int8, uint8), any strides.
        weight: (V, D) float32 or bfloat16 table; receives the gradient.
        scale: a Python number folded into forward and backward (e.g. sqrt(D)).
        out_dtype: float32 or bfloat16 (default weight.dtype); weight * scale is formed in fp32
            and rounded once.
        deterministic: backward summed in a fixed order (bitwise identical run to run) instead
            of with fp32 atomics.
        check: raise ValueError for a token outside [0, V) (one host sync). With check=False
            (e.g. under CUDA-graph capture) nothing is checked on the Triton path: such rows
            come out NaN and get no gradient; memory is never read out of bounds. The reference
            path always checks.
        backend: "auto" | "triton" | "reference" (kernels._utils.choose_backend).

    Example:
        >>> x = embed_interleave(batch[:, :L], table, scale=8.0, out_dtype=torch.bfloat16)
        >>> x.shape  # (B, L*C, D)
    """
    if not isinstance(tokens, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"{OP}: tokens and weight must be tensors")
    if tokens.dim() != 3:
        raise ValueError(f"{OP}: tokens must be 3-D (B, L, C), got shape {tuple(tokens.shape)}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{OP}: tokens must be an integer tensor (int64, int32, int16, int8, uint8), "
                         f"got {tokens.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{OP}: weight must be float32 or bfloat16, got {weight.dtype}")
    if out_dtype is None:
        out_dtype = weight.dtype
    if out_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{OP}: out_dtype must be torch.float32 or torch.bfloat16 (or None), got {out_dtype!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{OP}: scale must be a Python float, got {type(scale).__name__}")
    device = same_device(OP, tokens=tokens, weight=weight)
    B, L, C = tokens.shape
    if B * L * C > MAX_ROWS:
        raise ValueError(f"{OP}: B*L*C = {B * L * C} rows is more than {MAX_ROWS}")
    path = choose_backend(OP, backend, device)
    if path == "reference":
        return reference.embed_interleave(tokens, weight, float(scale), out_dtype)
    return _embed_interleave_fwd_op(tokens, weight, float(scale), out_dtype, bool(deterministic), bool(check))
