"""The S4 Cauchy kernel on Triton.

    out[..., l] = sum_n v[..., n] / (z[l] - w[..., n]) + conj(v[..., n]) / (z[l] - conj(w[..., n]))

Shapes: v, w complex (..., N), one of each conjugate pair stored (the S4 convention); their
leading dims broadcast against each other and are never materialised (S4 calls it with v
(4, H, N) against w (H, N)): the kernels index v and w through their own strides, stride 0
where broadcast. z: complex (L,). Output complex (batch..., L), batch = broadcast of the leading
dims. B below is the number of output rows (the product of the batch dims). Any N >= 1, L >= 1.

Math. Each conjugate pair is one fraction,

    v/(z - w) + conj(v)/(z - conj(w)) = (a z - b) / D,   D = (z - w)(z - conj(w)),
    a = 2 Re v,  a z - b = 2 [Re(v) (z - Re w) - Im(v) Im(w)],

so each (n, l) term costs one complex division: one reciprocal of |D|^2 (rcp.approx on CUDA)
and ~16 fp32 instructions. D is formed as p^2 - q1 q2 + 2 i p y with p = x - Re w,
q1 = y - Im w, q2 = y + Im w (z = x + iy): every rounding error is a few ulps of |D|, so the
sum stays accurate at the nodes that sit on a pole (the "hoisted" form z^2 - 2 Re(w) z + |w|^2
saves 3 instructions but loses ~2 pi n ulps there: 8.6e-6 relative error at S4-like inputs with
N = 32 against 5e-7 for this form, measured in float32 emulation). Nodes with |z| > 1e8 (the
S4 Nyquist node z = 2(1 - Omega)/(1 + Omega) at Omega = -1 is ~1e7..1e16) would overflow |D|^2
(~|z|^4); there the kernels switch, per node, to the expansion
sum_n v/(z-w) + c.c. = sum_k s_k / z^(k+1), s_k = sum_n 2 Re(v w^k), k = 0..3, whose truncation
error is (|w| / |z|)^4 relative. |w| must stay well below 1e8.

Gradients (PyTorch's convention, grad = dL/dRe + i dL/dIm; G = the incoming gradient of out):

    grad_v[n] = conj(T1[n]),  grad_w[n] = conj(v[n] T2[n]),
    T1[n] = sum_l conj(G_l)/(z_l - w_n) + G_l/(conj(z_l) - w_n) = sum_l (alpha_l - beta_l w_n) / E
    T2[n] = dT1/dw = sum_l (gamma_l - 2 alpha_l w_n + beta_l w_n^2) / E^2,
    E = (z_l - w_n)(conj(z_l) - w_n),  alpha = 2 Re(G z), beta = 2 Re(G), gamma = 2 Re(G z^2),

one reciprocal per term again (~28 fp32 instructions for both sums). The backward kernel owns
(one output row, one chunk of L, a block of n), accumulates over its chunk in registers and
writes (B, chunks, N) partials that the host sums (deterministic: no atomics); the gradient of
a broadcast input is then summed over its broadcast dims (O(B N)). z gets no gradient. Memory:
O(B (N + L)) forward and backward; nothing of size B N L exists.

dtype policy: the Triton path computes in fp32 (complex64) and accumulates in fp32. complex128
inputs run the reference (backend="auto") to keep their precision; backend="triton" refuses
them. Conjugate convention: the one of kernels.reference.cauchy, the oracle of this op.

`kernels.ops.s4_like_inputs` makes the inputs S4 feeds it (self-test, tests and benchmarks).
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._jit import row_offset as _row_offset
from kernels._utils import (check_pair_inputs, choose_backend, configs, device_guard, gpu_for, interpreting,
                            require_complex, same_device)
from kernels.ops import s4_like_inputs  # noqa: F401  (re-exported; the factory lives in the registry)
from kernels.profiling import nvtx_range

__all__ = ["cauchy", "cauchy_fwd", "cauchy_bwd"]

_MAX_DIMS = 3  # batch dims the kernels decompose a row index into (after coalescing)


# ----------------------------------------------------------------------------------------------
# Autotuning: the first config of each list is the one the interpreter runs (valid for any size)
# ----------------------------------------------------------------------------------------------

def _fwd_config(block_b, block_l, warps, maxnreg=None):
    return triton.Config({"BLOCK_B": block_b, "BLOCK_L": block_l}, num_warps=warps, num_stages=1,
                         maxnreg=maxnreg)


def _bwd_config(block_n, block_l, warps):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_L": block_l}, num_warps=warps, num_stages=1)


# The interpreter pays ~0.2 ms per op whatever the tile, so its configs (first in each list) are
# big tiles: 16 rows x 512 nodes, 64 pairs x 512 nodes. Valid for any size, but they would spill
# on a GPU, where the pruners drop them.
_FWD_INTERP = _fwd_config(16, 512, 4)
_BWD_INTERP = _bwd_config(64, 512, 8)

# GPU: nodes per thread = BLOCK_B * BLOCK_L / (32 * warps); 16 amortise the per-pair loads best.
# ptxas gives 16 nodes/thread ~230 registers (2 blocks of 4 warps per SM); capped at 128 the loop
# still does not spill (checked on sm_90 SASS), for twice the occupancy.
_FWD_CONFIGS = [_FWD_INTERP] + [
    _fwd_config(b, l, w, maxnreg=r)
    for b, l, w, r in [(1, 2048, 4, 128), (1, 2048, 4, None), (1, 1024, 4, None), (1, 1024, 2, 128),
                       (1, 1024, 2, None), (1, 4096, 8, 128), (1, 4096, 8, None), (1, 2048, 8, None),
                       (2, 1024, 4, None), (1, 512, 4, None), (1, 512, 2, None), (1, 256, 2, None),
                       (1, 128, 4, None)]
]

# GPU: a thread holds 8-16 pairs x 1 node of the (BLOCK_N, BLOCK_L) tile (Triton's default
# layout), so the per-node work (loads, G z, G z^2) is shared by its pairs.
_BWD_CONFIGS = [_BWD_INTERP] + [
    _bwd_config(n, l, w)
    for n, l, w in [(32, 32, 2), (32, 64, 4), (16, 64, 2), (16, 128, 4), (32, 128, 8), (32, 32, 4),
                    (16, 32, 2), (8, 128, 4), (64, 64, 8)]
]


def _prune_fwd(configs_, named_args, **kwargs):
    B, L = named_args["B"], named_args["L"]
    keep = [c for c in configs_
            if (c is not _FWD_INTERP or interpreting())
            and c.kwargs["BLOCK_L"] <= max(128, triton.next_power_of_2(L))
            and c.kwargs["BLOCK_B"] <= triton.next_power_of_2(B)]
    return keep or configs_[:1]


def _prune_bwd(configs_, named_args, **kwargs):
    N, L = named_args["N"], named_args["L"]
    keep = [c for c in configs_
            if (c is not _BWD_INTERP or interpreting())
            and c.kwargs["BLOCK_N"] <= max(8, triton.next_power_of_2(N))
            and c.kwargs["BLOCK_L"] <= max(32, triton.next_power_of_2(L))]
    return keep or configs_[:1]


_SIZE_ARGS = ["B", "N", "L", "S1", "S2"]
_STRIDES = [f"stride_{t}_{d}" for t in "vw" for d in ("0", "1", "2", "n")] + ["stride_z_l"]

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rcp(x, FAST_RCP: tl.constexpr):
    """1/x: one MUFU.RCP on NVIDIA GPUs (rel. error 2^-23); a plain division elsewhere."""
    if FAST_RCP:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _nodes(z_ptr, offs_l, mask_l, stride_z_l):
    """The nodes z = x + iy of a block (0 where masked) and which are huge (|z| > 1e8)."""
    x = tl.load(z_ptr + offs_l * stride_z_l, mask=mask_l, other=0.0)
    y = tl.load(z_ptr + offs_l * stride_z_l + 1, mask=mask_l, other=0.0)
    return x, y, tl.maximum(tl.abs(x), tl.abs(y)) > 1e8


@triton.jit
def _nodes_grad(z_ptr, g_row, l0, l_end, stride_z_l, stride_g_l, BLOCK_L: tl.constexpr):
    """The block of nodes [l0, l0 + BLOCK_L) (masked at l_end): (mask, x, y, huge as _nodes) and
    the incoming gradient G = g_r + i g_i at them."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    mask_l = offs_l < l_end
    x, y, huge = _nodes(z_ptr, offs_l, mask_l, stride_z_l)
    g_r = tl.load(g_row + offs_l * stride_g_l, mask=mask_l, other=0.0)
    g_i = tl.load(g_row + offs_l * stride_g_l + 1, mask=mask_l, other=0.0)
    return mask_l, x, y, huge, g_r, g_i


@triton.jit
def _load_pair(p):
    """(re, im) of the complex element at p (real view)."""
    return tl.load(p), tl.load(p + 1)


@triton.jit
def _cmul(ar, ai, br, bi):
    """(a b) for complex a = ar + i ai, b = br + i bi."""
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _inv_z(x, y):
    """1/z for any finite z with |z| >= ~1e-8, scaled so |z|^2 neither overflows nor underflows."""
    xs = x * 5.421010862427522e-20
    ys = y * 5.421010862427522e-20
    m = 5.421010862427522e-20 / tl.maximum(xs * xs + ys * ys, 1e-37)
    return xs * m, -ys * m


@triton.autotune(configs=configs(_FWD_CONFIGS), key=["B_KEY", "L_KEY"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=_SIZE_ARGS + ["B_KEY", "L_KEY"] + _STRIDES
            + ["v_ptr", "z_ptr", "w_ptr"])
def _cauchy_fwd_kernel(
    v_ptr, z_ptr, w_ptr, out_ptr,
    B, N, L, S1, S2, B_KEY, L_KEY,
    stride_v_0, stride_v_1, stride_v_2, stride_v_n,
    stride_w_0, stride_w_1, stride_w_2, stride_w_n,
    stride_z_l,
    stride_out_b,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, FAST_RCP: tl.constexpr,
):
    """Program (block of BLOCK_B rows, block of BLOCK_L nodes); loops over the N pairs.

    Real views: the imaginary part of every complex element sits 1 after its real part; out is
    (B, L, 2) with row stride stride_out_b and node stride 2.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_lblocks = tl.cdiv(L, BLOCK_L)
    pid_b = pid // n_lblocks
    pid_l = pid % n_lblocks

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    mask_b = rows < B
    rows_in = tl.minimum(rows, B - 1)  # rows past B recompute row B-1 (unmasked loads), unstored
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    mask_l = offs_l < L

    x, y, huge = _nodes(z_ptr, offs_l, mask_l, stride_z_l)
    park = huge | (~mask_l)
    # direct path: D = p^2 - q1 q2 + 2 i p y, p = x - Re w, q1,2 = y -+ Im w. Parked lanes (masked,
    # or on the asymptotic path) sit at a far, finite z.
    xd = tl.where(park, 1e9, x)[None, :]
    yd = tl.where(park, 0.0, y)[None, :]
    y2 = tl.where(park, 0.0, 2.0 * y)[None, :]

    v_p = v_ptr + _row_offset(rows_in, S1, S2, stride_v_0, stride_v_1, stride_v_2)
    w_p = w_ptr + _row_offset(rows_in, S1, S2, stride_w_0, stride_w_1, stride_w_2)
    acc_r = tl.zeros([BLOCK_B, BLOCK_L], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_B, BLOCK_L], dtype=tl.float32)
    n = tl.zeros((), dtype=tl.int32)
    while n < N:  # (a while loop: the interpreter cannot take range() of a runtime int)
        vr, vi = _load_pair(v_p)
        wr, wi = _load_pair(w_p)
        e = (vi * wi)[:, None]
        vr = vr[:, None]
        wr = wr[:, None]
        wi = wi[:, None]
        p = xd - wr
        q1 = yd - wi
        q2 = yd + wi
        d_r = p * p - q1 * q2          # D = (z - w)(z - conj w) = d_r + i d_i
        d_i = p * y2
        num_r = vr * p - e             # (a z - b) / 2 = Re(v) (z - Re w) - Im(v) Im(w)
        num_i = vr * yd
        r = _rcp(d_r * d_r + d_i * d_i, FAST_RCP)
        acc_r += (num_r * d_r + num_i * d_i) * r
        acc_i += (num_i * d_r - num_r * d_i) * r
        v_p += stride_v_n
        w_p += stride_w_n
        n += 1
    out_r = acc_r + acc_r
    out_i = acc_i + acc_i

    n_huge = tl.sum((huge & mask_l).to(tl.int32), axis=0)
    if n_huge > 0:  # rare: a node with |z| > 1e8 in this block (the S4 Nyquist node)
        # (z reloaded: keeping x, y live across the loop above costs registers)
        x, y, huge = _nodes(z_ptr, offs_l, mask_l, stride_z_l)
        s0 = tl.zeros([BLOCK_B], dtype=tl.float32)
        s1 = tl.zeros([BLOCK_B], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_B], dtype=tl.float32)
        s3 = tl.zeros([BLOCK_B], dtype=tl.float32)
        v_p = v_ptr + _row_offset(rows_in, S1, S2, stride_v_0, stride_v_1, stride_v_2)
        w_p = w_ptr + _row_offset(rows_in, S1, S2, stride_w_0, stride_w_1, stride_w_2)
        n = tl.zeros((), dtype=tl.int32)
        while n < N:  # s_k = sum_n Re(v w^k)  (halved)
            vr, vi = _load_pair(v_p)
            wr, wi = _load_pair(w_p)
            s0 += vr
            tr, ti = _cmul(vr, vi, wr, wi)
            s1 += tr
            tr, ti = _cmul(tr, ti, wr, wi)
            s2 += tr
            s3 += tr * wr - ti * wi
            v_p += stride_v_n
            w_p += stride_w_n
            n += 1
        u_r, u_i = _inv_z(x, y)
        u_r = u_r[None, :]
        u_i = u_i[None, :]
        # 2 u (s0 + u (s1 + u (s2 + u s3)))
        h_r = 2.0 * s2[:, None] + 2.0 * s3[:, None] * u_r
        h_i = 2.0 * s3[:, None] * u_i
        h_r, h_i = 2.0 * s1[:, None] + h_r * u_r - h_i * u_i, h_r * u_i + h_i * u_r
        h_r, h_i = 2.0 * s0[:, None] + h_r * u_r - h_i * u_i, h_r * u_i + h_i * u_r
        h_r, h_i = _cmul(h_r, h_i, u_r, u_i)
        out_r = tl.where(huge[None, :], h_r, out_r)
        out_i = tl.where(huge[None, :], h_i, out_i)

    out_offs = rows[:, None] * stride_out_b + offs_l[None, :] * 2
    mask = mask_b[:, None] & mask_l[None, :]
    out = tl.join(out_r, out_i)  # (BLOCK_B, BLOCK_L, 2): re, im side by side
    tl.store(out_ptr + out_offs[:, :, None] + tl.arange(0, 2)[None, None, :], out,
             mask=mask[:, :, None])


@triton.autotune(configs=configs(_BWD_CONFIGS), key=["N_KEY", "L_KEY"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=_SIZE_ARGS + ["n_chunks", "N_KEY", "L_KEY"] + _STRIDES
            + ["stride_g_b", "stride_g_l", "g_ptr", "v_ptr", "z_ptr", "w_ptr"])
def _cauchy_bwd_kernel(
    g_ptr, v_ptr, z_ptr, w_ptr, gv_ptr, gw_ptr,
    B, N, L, S1, S2, n_chunks, N_KEY, L_KEY,
    stride_g_b, stride_g_l,
    stride_v_0, stride_v_1, stride_v_2, stride_v_n,
    stride_w_0, stride_w_1, stride_w_2, stride_w_n,
    stride_z_l,
    stride_p_b, stride_p_c, stride_p_n,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, FAST_RCP: tl.constexpr,
):
    """Program (one output row, one chunk of L, BLOCK_N pairs): partial grad_v, grad_w."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    row = pid // n_chunks
    chunk = pid % n_chunks

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_row = w_ptr + _row_offset(row, S1, S2, stride_w_0, stride_w_1, stride_w_2)
    wr = tl.load(w_row + offs_n * stride_w_n, mask=mask_n, other=0.0)
    wi = tl.load(w_row + offs_n * stride_w_n + 1, mask=mask_n, other=1e9)
    wr_c = wr[:, None]
    wi_c = wi[:, None]
    wi2_c = (wi + wi)[:, None]
    w2r_c = (wr * wr - wi * wi)[:, None]   # w^2
    w2i_c = (2.0 * wr * wi)[:, None]

    per = tl.cdiv(tl.cdiv(L, BLOCK_L), n_chunks) * BLOCK_L  # nodes per chunk
    l_start = chunk * per
    l_end = tl.minimum(l_start + per, L)
    g_row = g_ptr + row * stride_g_b

    acc1_r = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    acc1_i = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    acc2_r = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    acc2_i = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    n_huge = tl.zeros([BLOCK_L], dtype=tl.int32)
    l0 = l_start
    while l0 < l_end:
        mask_l, x, y, huge, g_r, g_i = _nodes_grad(z_ptr, g_row, l0, l_end, stride_z_l, stride_g_l,
                                                   BLOCK_L)
        n_huge += (huge & mask_l).to(tl.int32)
        # parked lanes (masked, or on the asymptotic path): G = 0 at a far, finite z, so their
        # terms are exactly 0
        park = huge | (~mask_l)
        x = tl.where(park, 1e9, x)
        y = tl.where(park, 0.0, y)
        g_r = tl.where(huge, 0.0, g_r)
        g_i = tl.where(huge, 0.0, g_i)
        alpha = g_r * x - g_i * y                              # Re(G z)       (halved)
        gamma = g_r * (x * x - y * y) - g_i * (2.0 * x * y)    # Re(G z^2)     (halved)
        alpha_m2 = (-2.0 * alpha)[None, :]
        alpha = alpha[None, :]
        beta = g_r[None, :]                                    # Re(G)         (halved)
        beta_m = -beta
        gamma = gamma[None, :]
        xb = x[None, :]
        yb = y[None, :]

        p = xb - wr_c
        q1 = yb - wi_c
        q2 = yb + wi_c
        e_r = p * p + q1 * q2          # E = (z - w)(conj z - w) = e_r - i e_i
        e_i = p * wi2_c
        r = _rcp(e_r * e_r + e_i * e_i, FAST_RCP)
        f_r = e_r * r                  # F = 1/E = f_r + i f_i
        f_i = e_i * r
        # (each accumulation is two statements so that both compile to FMAs)
        n1_r = beta_m * wr_c + alpha   # alpha - beta w
        n1_i = beta_m * wi_c
        acc1_r += n1_r * f_r
        acc1_r -= n1_i * f_i
        acc1_i += n1_r * f_i
        acc1_i += n1_i * f_r
        f2_r = f_r * f_r - f_i * f_i   # F^2
        f2_i = (f_r + f_r) * f_i
        n2_r = alpha_m2 * wr_c + (beta * w2r_c + gamma)   # gamma - 2 alpha w + beta w^2
        n2_i = alpha_m2 * wi_c + beta * w2i_c
        acc2_r += n2_r * f2_r
        acc2_r -= n2_i * f2_i
        acc2_i += n2_r * f2_i
        acc2_i += n2_i * f2_r
        l0 += BLOCK_L

    t1_r = tl.sum(acc1_r, axis=1)
    t1_i = tl.sum(acc1_i, axis=1)
    t2_r = tl.sum(acc2_r, axis=1)
    t2_i = tl.sum(acc2_i, axis=1)

    if tl.sum(n_huge, axis=0) > 0:  # rare: nodes with |z| > 1e8 in this chunk
        # T1 += sum_k w^k P_{k+1}, T2 += sum_k k w^(k-1) P_{k+1}, P_k = sum_l Re(G conj(1/z)^k)
        pv1 = tl.zeros([BLOCK_L], dtype=tl.float32)
        pv2 = tl.zeros([BLOCK_L], dtype=tl.float32)
        pv3 = tl.zeros([BLOCK_L], dtype=tl.float32)
        pv4 = tl.zeros([BLOCK_L], dtype=tl.float32)
        pv5 = tl.zeros([BLOCK_L], dtype=tl.float32)
        l0 = l_start
        while l0 < l_end:
            mask_l, x, y, huge, g_r, g_i = _nodes_grad(z_ptr, g_row, l0, l_end, stride_z_l,
                                                       stride_g_l, BLOCK_L)
            take = huge & mask_l
            u_r, u_i = _inv_z(x, y)
            u_i = -u_i                  # conj(1/z)
            h_r, h_i = _cmul(g_r, g_i, u_r, u_i)
            pv1 += tl.where(take, h_r, 0.0)
            h_r, h_i = _cmul(h_r, h_i, u_r, u_i)
            pv2 += tl.where(take, h_r, 0.0)
            h_r, h_i = _cmul(h_r, h_i, u_r, u_i)
            pv3 += tl.where(take, h_r, 0.0)
            h_r, h_i = _cmul(h_r, h_i, u_r, u_i)
            pv4 += tl.where(take, h_r, 0.0)
            h_r = h_r * u_r - h_i * u_i
            pv5 += tl.where(take, h_r, 0.0)
            l0 += BLOCK_L
        p1 = tl.sum(pv1, axis=0)
        p2 = tl.sum(pv2, axis=0)
        p3 = tl.sum(pv3, axis=0)
        p4 = tl.sum(pv4, axis=0)
        p5 = tl.sum(pv5, axis=0)
        # Horner in w: T1 += p1 + w (p2 + w (p3 + w (p4 + w p5)))
        a_r = p4 + wr * p5
        a_i = wi * p5
        a_r, a_i = p3 + wr * a_r - wi * a_i, wr * a_i + wi * a_r
        a_r, a_i = p2 + wr * a_r - wi * a_i, wr * a_i + wi * a_r
        a_r, a_i = p1 + wr * a_r - wi * a_i, wr * a_i + wi * a_r
        t1_r += a_r
        t1_i += a_i
        # T2 += p2 + w (2 p3 + w (3 p4 + w 4 p5))
        b_r = 3.0 * p4 + wr * (4.0 * p5)
        b_i = wi * (4.0 * p5)
        b_r, b_i = 2.0 * p3 + wr * b_r - wi * b_i, wr * b_i + wi * b_r
        b_r, b_i = p2 + wr * b_r - wi * b_i, wr * b_i + wi * b_r
        t2_r += b_r
        t2_i += b_i

    # grad_v = conj(2 T1), grad_w = conj(v 2 T2)
    v_row = v_ptr + _row_offset(row, S1, S2, stride_v_0, stride_v_1, stride_v_2)
    vr = tl.load(v_row + offs_n * stride_v_n, mask=mask_n, other=0.0)
    vi = tl.load(v_row + offs_n * stride_v_n + 1, mask=mask_n, other=0.0)
    part = row * stride_p_b + chunk * stride_p_c + offs_n * stride_p_n
    tl.store(gv_ptr + part, 2.0 * t1_r, mask=mask_n)
    tl.store(gv_ptr + part + 1, -2.0 * t1_i, mask=mask_n)
    tl.store(gw_ptr + part, 2.0 * (vr * t2_r - vi * t2_i), mask=mask_n)
    tl.store(gw_ptr + part + 1, -2.0 * (vr * t2_i + vi * t2_r), mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Host launchers (real views: v, w (..., N, 2), z (L, 2), out (..., L, 2))
# ----------------------------------------------------------------------------------------------



def _fast_rcp(device: torch.device) -> bool:
    gpu = gpu_for(device)
    return gpu is not None and not gpu.hip


def _key(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


def _batch_layout(batch: tuple, v_r: torch.Tensor, w_r: torch.Tensor):
    """Decompose the broadcast batch of v and w for the kernels.

    Returns (outer, inner): inner = (S0, S1, S2, v_strides(3), w_strides(3)), the last (at most)
    three batch dims after dropping size-1 dims and merging dims that are contiguous in both v
    and w (stride 0 where broadcast); outer = [(v_offset, w_offset, row_offset)] over the
    remaining leading dims (one launch each; empty outer means a single launch at offset 0).
    Nothing is copied: the strides are those of v.expand(batch) and w.expand(batch).
    """
    k = len(batch)
    vs = v_r.expand(*batch, *v_r.shape[-2:]).stride()[:k]
    ws = w_r.expand(*batch, *w_r.shape[-2:]).stride()[:k]
    dims = []  # (size, v_stride, w_stride), outermost first
    for size, sv, sw in zip(batch, vs, ws):
        if size == 1:
            continue
        if dims and dims[-1][1] == sv * size and dims[-1][2] == sw * size:
            dims[-1] = (dims[-1][0] * size, sv, sw)
        else:
            dims.append((size, sv, sw))
    inner, outer_dims = dims[-_MAX_DIMS:], dims[:-_MAX_DIMS]
    inner = [(1, 0, 0)] * (_MAX_DIMS - len(inner)) + inner
    rows_inner = math.prod(d[0] for d in inner)
    outer = []
    for idx in itertools.product(*(range(d[0]) for d in outer_dims)):
        v_off = sum(i * d[1] for i, d in zip(idx, outer_dims))
        w_off = sum(i * d[2] for i, d in zip(idx, outer_dims))
        flat = 0
        for i, d in zip(idx, outer_dims):
            flat = flat * d[0] + i
        outer.append((v_off, w_off, flat * rows_inner))
    sizes = tuple(d[0] for d in inner)
    return outer or [(0, 0, 0)], sizes, tuple(d[1] for d in inner), tuple(d[2] for d in inner)


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's data pointer moved `offset` elements on (the kernels only take the pointer)."""
    if offset == 0:
        return t
    return t.as_strided((1,), (1,), t.storage_offset() + offset)


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """A real view (..., 2) whose (re, im) pairs are adjacent, as the kernels read them (any
    other strides are fine, 0 included); copies only when the last stride is not 1."""
    if t.dtype != torch.float32 or t.shape[-1] != 2:
        raise ValueError(f"cauchy: expected the float32 real view (..., 2) of a complex64 "
                         f"tensor, got {t.dtype} {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def cauchy_fwd(v_r: torch.Tensor, z_r: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel. v_r, w_r: fp32 (..., N, 2); z_r: fp32 (L, 2). Returns fp32
    (batch..., L, 2), batch = broadcast of the leading dims of v and w."""
    v_r, z_r, w_r = _pairs(v_r), _pairs(z_r), _pairs(w_r)
    batch = tuple(torch.broadcast_shapes(v_r.shape[:-2], w_r.shape[:-2]))
    N, L = v_r.shape[-2], z_r.shape[0]
    out = torch.empty(*batch, L, 2, dtype=torch.float32, device=v_r.device)
    B = math.prod(batch)
    if B == 0 or L == 0:
        return out
    out2 = out.view(B, L, 2)
    outer, (S0, S1, S2), sv, sw = _batch_layout(batch, v_r, w_r)
    rows = S0 * S1 * S2
    fast = _fast_rcp(v_r.device)
    with nvtx_range("sashimi/cauchy/fwd"), device_guard(v_r.device):
        for v_off, w_off, row_off in outer:
            o = out2[row_off:row_off + rows]

            def grid(meta):
                return (triton.cdiv(rows, meta["BLOCK_B"]) * triton.cdiv(L, meta["BLOCK_L"]),)

            _cauchy_fwd_kernel[grid](
                _offset_view(v_r, v_off), z_r, _offset_view(w_r, w_off), o,
                rows, N, L, S1, S2, _key(rows, 4096), _key(L, 65536),
                *sv, v_r.stride(-2),
                *sw, w_r.stride(-2),
                z_r.stride(0),
                o.stride(0),
                FAST_RCP=fast,
            )
    return out


def _n_chunks(rows: int, L: int) -> int:
    """L chunks per row in the backward: enough programs to fill a GPU (~2048 (row, chunk)
    programs), each chunk at least 512 nodes (partials: B * chunks * N * 16 bytes)."""
    target = 4 if interpreting() else 2048
    return max(1, min(triton.cdiv(L, 512), triton.cdiv(target, rows)))


def cauchy_bwd(grad_r: torch.Tensor, v_r: torch.Tensor, z_r: torch.Tensor,
               w_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. grad_r: fp32 (batch..., L, 2), the real view of the complex
    gradient of out. Returns the real views of (grad_v, grad_w), shaped like v_r and w_r."""
    grad_r, v_r, z_r, w_r = _pairs(grad_r), _pairs(v_r), _pairs(z_r), _pairs(w_r)
    batch = tuple(torch.broadcast_shapes(v_r.shape[:-2], w_r.shape[:-2]))
    N, L = v_r.shape[-2], z_r.shape[0]
    B = math.prod(batch)
    if B == 0 or L == 0:
        return torch.zeros_like(v_r), torch.zeros_like(w_r)
    g = _pairs(grad_r.reshape(B, L, 2))  # a view unless autograd handed us an odd layout
    outer, (S0, S1, S2), sv, sw = _batch_layout(batch, v_r, w_r)
    rows = S0 * S1 * S2
    n_chunks = _n_chunks(rows, L)
    gv_part = torch.empty(B, n_chunks, N, 2, dtype=torch.float32, device=v_r.device)
    gw_part = torch.empty(B, n_chunks, N, 2, dtype=torch.float32, device=v_r.device)
    fast = _fast_rcp(v_r.device)
    with nvtx_range("sashimi/cauchy/bwd"), device_guard(v_r.device):
        for v_off, w_off, row_off in outer:
            gvp = gv_part[row_off:row_off + rows]
            gwp = gw_part[row_off:row_off + rows]
            gg = g[row_off:row_off + rows]

            def grid(meta):
                return (rows * n_chunks, triton.cdiv(N, meta["BLOCK_N"]))

            _cauchy_bwd_kernel[grid](
                gg, _offset_view(v_r, v_off), z_r, _offset_view(w_r, w_off), gvp, gwp,
                rows, N, L, S1, S2, n_chunks, _key(N, 64), _key(L, 65536),
                gg.stride(0), gg.stride(1),
                *sv, v_r.stride(-2),
                *sw, w_r.stride(-2),
                z_r.stride(0),
                gvp.stride(0), gvp.stride(1), gvp.stride(2),
                FAST_RCP=fast,
            )
        gv = gv_part[:, 0] if n_chunks == 1 else gv_part.sum(1)
        gw = gw_part[:, 0] if n_chunks == 1 else gw_part.sum(1)
        gv = gv.reshape(*batch, N, 2).sum_to_size(v_r.shape)
        gw = gw.reshape(*batch, N, 2).sum_to_size(w_r.shape)
    return gv.contiguous(), gw.contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library registration: real tensors across the boundary
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("sashimi_kernels::cauchy_fwd", mutates_args=())
def _cauchy_fwd_op(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return cauchy_fwd(v, z, w)


@_cauchy_fwd_op.register_fake
def _(v, z, w):
    batch = torch.broadcast_shapes(v.shape[:-2], w.shape[:-2])
    return v.new_empty((*batch, z.shape[0], 2))


@torch.library.custom_op("sashimi_kernels::cauchy_bwd", mutates_args=())
def _cauchy_bwd_op(grad: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                   w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cauchy_bwd(grad, v, z, w)


@_cauchy_bwd_op.register_fake
def _(grad, v, z, w):
    return torch.empty_like(v, memory_format=torch.contiguous_format), \
        torch.empty_like(w, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    v, z, w = inputs
    ctx.save_for_backward(v, z, w)


def _backward(ctx, grad):
    v, z, w = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None
    grad_v, grad_w = _cauchy_bwd_op(grad, v, z, w)
    return (grad_v if ctx.needs_input_grad[0] else None, None,
            grad_w if ctx.needs_input_grad[2] else None)


_cauchy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _check(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    require_complex("cauchy", v=v, z=z, w=w)
    if z.dim() != 1:
        raise ValueError(f"cauchy: z must be 1-D (L,), got shape {tuple(z.shape)}")
    if z.shape[0] < 1:
        raise ValueError("cauchy: z must hold at least one node (L >= 1)")
    check_pair_inputs("cauchy", ("v", "w"), v, w)
    dtype = torch.promote_types(torch.promote_types(v.dtype, z.dtype), w.dtype)
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"cauchy: complex64 or complex128 inputs expected, got {dtype}")
    return dtype


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
           backend: str = "auto") -> torch.Tensor:
    """S4 Cauchy sum over conjugate pairs: complex (batch..., L).

    out[..., l] = sum_n v[..., n] / (z[l] - w[..., n]) + conj(v[..., n]) / (z[l] - conj(w[..., n]))

    v, w: complex (..., N), leading dims broadcast (not materialised); z: complex (L,).
    Differentiable in v and w (z gets no gradient on the Triton path). backend: "auto" (Triton
    on CUDA, or on CPU under TRITON_INTERPRET=1; the reference otherwise, and for complex128),
    "triton" (complex64 only) or "reference" (kernels.reference.cauchy).

    Example: S4's four Woodbury sums in one call, v (4, H, N) against w (H, N):
        k = cauchy(v, z, w)   # (4, H, L)
    """
    dtype = _check(v, z, w)
    device = same_device("cauchy", v=v, z=z, w=w)
    path = choose_backend("cauchy", backend, device)
    if path == "triton" and dtype != torch.complex64:
        if backend == "triton":
            raise ValueError("cauchy: the Triton path computes in complex64; got complex128 "
                             "inputs (cast them, or use backend='reference' / 'auto')")
        path = "reference"
    if path == "reference":
        return reference.cauchy(v, z, w)
    v_r, z_r, w_r = (torch.view_as_real(t.resolve_conj()) for t in (v, z, w))
    return torch.view_as_complex(_cauchy_fwd_op(v_r, z_r, w_r))
