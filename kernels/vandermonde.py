"""Log-Vandermonde (S4D) kernel on Triton.

    out[..., l] = 2 Re( sum_n v[..., n] exp(x[..., n] l) ),   l = 0 .. L-1

Shape letters: N state entries (one of each conjugate pair), L output length, B the number of
output batch rows (the broadcast of the leading dims of v and x, flattened). v and x broadcast
against each other over their leading dims without being materialised: each is indexed
through its own strides (stride 0 where broadcast). The matching oracle is
`kernels.reference.vandermonde`.

dtype policy: v, x complex64 -> out float32, fp32 arithmetic throughout. complex128 inputs are
routed to the reference (which computes and returns in double precision): backend="auto" does
it silently, backend="triton" raises a ValueError (cast to complex64 to use the kernel).

Gradients (PyTorch's complex convention, grad = dLoss/dRe + i dLoss/dIm; g = dLoss/dout, real):
    grad_v[n] = 2 sum_l g_l conj(exp(x_n l))
    grad_x[n] = 2 conj(v_n) sum_l g_l l conj(exp(x_n l))
summed over the broadcast dims back to the shapes of v and x. Double backward is not supported.

Algorithm: the sum is a small GEMM per row. A program owns one output row b and a contiguous
range of positions (SPAN, chosen by the launcher so that B x cdiv(L, SPAN) programs fill the
GPU), walked in chunks of BLOCK_C x BLOCK_J positions l = c0 + c BLOCK_J + j. With
exp(x l) = exp(x (c0 + c BLOCK_J)) exp(x j):

    out[c, j] = Re( sum_n A[c, n] T[n, j] ),  A[c, n] = 2 v_n exp(x_n (c0 + c BLOCK_J)),
                                              T[n, j] = exp(x_n j)
              = (Re A) @ (Re T) - (Im A) @ (Im T)

T is computed once per program (per n-block), A once per chunk: BLOCK_C + BLOCK_J exact
exponentials per BLOCK_C x BLOCK_J x N terms, and no power recurrence (nothing drifts). The two
real GEMMs run on tensor cores as "tf32x3": each fp32 operand is split into a tf32 high part
and a remainder, and lo*hi + hi*lo + hi*hi are accumulated in fp32 (the dropped lo*lo and the
hardware's truncation of lo cost ~2^-21 relative per product: fp32-level accuracy, where plain
tf32 would give ~1e-3). The backward is the same with the roles turned around: per chunk
H0 = g @ conj(T)^T and H1 = (g l) @ conj(T)^T (tensor cores again), then
G0 += sum_c conj(A')[c] H0[c] and G1 += sum_c conj(A')[c] H1[c] elementwise, with
A'[c, n] = exp(x_n (c0 + c BLOCK_J)); grad_v = 2 G0, grad_x = 2 conj(v) G1 after summing over
the programs of a row (directly when one program covers the row, else (B, P, N) partials and a
small reduction kernel, in a fixed order: deterministic). N is walked in n-blocks of
BLOCK_N <= 64 (forward) / 32 (backward), padded to >= 16 for the tensor cores. Memory: the
output (B, L) and O(B P N) partials; never a (B, N, L) intermediate. GPUs without tf32 tensor
cores (before sm_80) run the same GEMMs as fp32 FMAs ("ieee").

Accuracy. Every exponential is an anchor computed directly: the phase Im(x) l is formed as an
exact two-product (fma) and reduced modulo 2 pi with a two-constant Cody-Waite step, so the
reduced argument is exact to ~1e-7 rad for |Im(x)| l up to ~1e6 rad; sin/cos/exp of it use the
fast hardware approximations (absolute error ~5e-7). So each term carries a relative error of
~1e-6 at most, and the result (max abs error / max |out|, against complex128 on the same
complex64 inputs) stays around 1e-6, <= 1e-5 up to L = 65536 for S4D-Lin / S4D-Inv inputs
(`kernels.ops.make_s4d_inputs`; the GPU test checks it). Not covered: sums whose terms do not decay while
|Im(x)| l grows past ~1e6 rad (the reduction then loses bits; such a sum is ill-conditioned
in its fp32 inputs anyway: x itself is only known to 6e-8 relative), Re(x) > 0 large enough to
overflow fp32, and L > 2^24 (positions must be exact in fp32: rejected with a ValueError).
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._jit import row_offset as _row_offset
from kernels._utils import (check_pair_inputs, choose_backend, configs, device_guard, gpu_for, interpreting,
                            same_device)
from kernels.ops import make_s4d_inputs  # noqa: F401  (re-exported; the factory lives in the registry)
from kernels.profiling import nvtx_range

__all__ = ["vandermonde", "vandermonde_fwd", "vandermonde_bwd"]

_OP = "vandermonde"
_MAX_L = 2 ** 24  # positions l are converted to fp32: exact below 2^24

# Two-constant Cody-Waite split of 2 pi: HI is 2 pi rounded to fp32, LO = 2 pi - HI.
_TWO_PI_HI = tl.constexpr(6.2831854820251465)
_TWO_PI_LO = tl.constexpr(2 * math.pi - 6.2831854820251465)
_TWO_PI = tl.constexpr(2 * math.pi)
_INV_TWO_PI = tl.constexpr(1 / (2 * math.pi))

# ----------------------------------------------------------------------------------------------
# Elementary helpers. On a GPU: exact fma and the fast hardware sin/cos (on arguments already
# reduced to about [-pi, pi]). Under the interpreter (numpy: no libdevice, and an fma that
# rounds twice) the same math, the exact parts emulated in float64.
# ----------------------------------------------------------------------------------------------
if interpreting():

    @triton.jit
    def _sin_fast(a):
        return tl.sin(a)

    @triton.jit
    def _cos_fast(a):
        return tl.cos(a)

    @triton.jit
    def _two_prod_lo(a, b, p):
        """a * b - p exactly (p = fl(a * b)): the low part of the product."""
        return (a.to(tl.float64) * b.to(tl.float64) - p.to(tl.float64)).to(tl.float32)

    @triton.jit
    def _reduce_phase(p, e):
        """(p + e) mod 2 pi in about [-pi, pi]."""
        k = tl.floor(p * _INV_TWO_PI + 0.5)
        return (p.to(tl.float64) - k.to(tl.float64) * _TWO_PI).to(tl.float32) + e

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _sin_fast(a):
        return libdevice.fast_sinf(a)

    @triton.jit
    def _cos_fast(a):
        return libdevice.fast_cosf(a)

    @triton.jit
    def _two_prod_lo(a, b, p):
        """a * b - p exactly (p = fl(a * b)): the low part of the product."""
        return tl.fma(a, b, -p)

    @triton.jit
    def _reduce_phase(p, e):
        """(p + e) mod 2 pi in about [-pi, pi] (fma keeps k * 2 pi exact enough for k < 2^20)."""
        k = tl.floor(p * _INV_TWO_PI + 0.5)
        nk = -k
        r = tl.fma(nk, tl.zeros_like(p) + _TWO_PI_HI, p)
        r = tl.fma(nk, tl.zeros_like(p) + _TWO_PI_LO, r)
        return r + e


@triton.jit
def _load_n(ptrs, mask, EVEN_N: tl.constexpr):
    """Load along n; padded entries read 0 (no mask at all when N is a multiple of BLOCK_N)."""
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _exp_anchor(xr, xi, lf):
    """exp((xr + i xi) * lf), broadcast to a 2-D tile; lf holds exact (integer) positions."""
    xi, lf = tl.broadcast(xi, lf)
    xr = tl.broadcast_to(xr, xi.shape)
    p = xi * lf
    e = _two_prod_lo(xi, lf, p)
    r = _reduce_phase(p, e)
    mag = tl.exp(xr * lf)
    return mag * _cos_fast(r), mag * _sin_fast(r)


@triton.jit
def _split_tf32(a):
    """a = hi + lo with hi exactly representable in tf32 (round to nearest, ties away)."""
    bits = a.to(tl.int32, bitcast=True)
    hi = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # keep 10 mantissa bits
    return hi, a - hi


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. "tf32x3": three tensor-core passes on split operands,
    a_lo b_hi + a_hi b_lo + a_hi b_hi (the dropped a_lo b_lo is ~2^-22 relative, and the
    hardware's truncation of lo another ~2^-21): fp32-level accuracy. "ieee": fp32 FMAs."""
    if PRECISION == "tf32x3":
        a_hi, a_lo = _split_tf32(a)
        b_hi, b_lo = _split_tf32(b)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _row_span(v_ptr, x_ptr, pid_b, D1, D2, SPAN, L, stride_v_b0, stride_v_b1, stride_v_b2,
              stride_x_b0, stride_x_b1, stride_x_b2):
    """Row pid_b's v and x (broadcast strides) and this program's range [start, end) of positions
    (int32: L <= 2^24; only the row base pointers need int64)."""
    v_row = v_ptr + _row_offset(pid_b, D1, D2, stride_v_b0, stride_v_b1, stride_v_b2)
    x_row = x_ptr + _row_offset(pid_b, D1, D2, stride_x_b0, stride_x_b1, stride_x_b2)
    start = tl.program_id(1) * SPAN
    return v_row, x_row, start, tl.minimum(start + SPAN, L)


# ----------------------------------------------------------------------------------------------
# Forward: per (row, chunk of BLOCK_C x BLOCK_J positions l = c0 + c BLOCK_J + j)
#   out[c, j] = Re(sum_n A[c, n] T[n, j]),  A[c, n] = 2 v_n exp(x_n (c0 + c BLOCK_J)),
#   T[n, j] = exp(x_n j)  ->  out = Re(A) @ Re(T) - Im(A) @ Im(T): two real GEMMs.
# ----------------------------------------------------------------------------------------------
# The first config is the interpreter's (small, valid for any size); on a GPU all are tried
# (each compiles without register spills for sm_90 at BLOCK_N = 16 and 32; at 64 the largest
# spill a few bytes; checked with cuobjdump -res-usage).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_C": 16, "BLOCK_J": 16}, num_warps=1),
    triton.Config({"BLOCK_C": 64, "BLOCK_J": 64}, num_warps=4),
    triton.Config({"BLOCK_C": 64, "BLOCK_J": 128}, num_warps=4),
    triton.Config({"BLOCK_C": 128, "BLOCK_J": 64}, num_warps=8),
    triton.Config({"BLOCK_C": 128, "BLOCK_J": 128}, num_warps=8),
]


def _prune(configs_, named_args, **kwargs):
    """Drop configs whose chunk (BLOCK_C x BLOCK_J positions) dwarfs a program's range."""
    limit = max(4096, 2 * named_args["SPAN"])
    kept = [c for c in configs_ if c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_J"] <= limit]
    return kept or configs_[:1]


@triton.autotune(configs=configs(_FWD_CONFIGS), key=["SIZE_KEY"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
                    "SINGLE_N": lambda args: args["N"] <= args["BLOCK_N"]})
@triton.jit(do_not_specialize=["B", "N", "L", "SPAN", "D1", "D2", "SIZE_KEY"])
def _vandermonde_fwd_kernel(
    v_ptr, x_ptr, out_ptr,
    B, N, L, SPAN, D1, D2, SIZE_KEY,
    stride_v_b0, stride_v_b1, stride_v_b2, stride_v_n,
    stride_x_b0, stride_x_b1, stride_x_b2, stride_x_n,
    stride_out_b, stride_out_l,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_N: tl.constexpr, SINGLE_N: tl.constexpr,
):
    # v_ptr, x_ptr: real views (..., N, 2) of complex64 tensors (re at +0, im at +1).
    pid_b = tl.program_id(0).to(tl.int64)
    v_row, x_row, start, end = _row_span(v_ptr, x_ptr, pid_b, D1, D2, SPAN, L, stride_v_b0, stride_v_b1,
                                         stride_v_b2, stride_x_b0, stride_x_b1, stride_x_b2)
    out_row = out_ptr + pid_b * stride_out_b
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_J)
    jf = offs_j.to(tl.float32)

    # T[n, j] = exp(x_n j) for the first n-block: reused by every chunk when N <= BLOCK_N.
    mask_n = offs_n < N
    xr = _load_n(x_row + offs_n * stride_x_n, mask_n, EVEN_N)
    xi = _load_n(x_row + offs_n * stride_x_n + 1, mask_n, EVEN_N)
    tr, ti = _exp_anchor(xr[:, None], xi[:, None], jf[None, :])

    c0 = start
    while c0 < end:
        lc = (c0 + offs_c * BLOCK_J).to(tl.float32)  # the anchor position of each row c
        acc = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
        n0 = 0
        while n0 < N:
            n = n0 + offs_n
            mask_n = n < N
            # padded n: x = 0, v = 0 -> A = 0, T = 1: zero terms
            xr = _load_n(x_row + n * stride_x_n, mask_n, EVEN_N)
            xi = _load_n(x_row + n * stride_x_n + 1, mask_n, EVEN_N)
            if not SINGLE_N:
                tr, ti = _exp_anchor(xr[:, None], xi[:, None], jf[None, :])
            vr = 2.0 * _load_n(v_row + n * stride_v_n, mask_n, EVEN_N)
            vi = 2.0 * _load_n(v_row + n * stride_v_n + 1, mask_n, EVEN_N)
            er, ei = _exp_anchor(xr[None, :], xi[None, :], lc[:, None])
            ar = vr[None, :] * er - vi[None, :] * ei
            ai = vr[None, :] * ei + vi[None, :] * er
            acc = _dot(ar, tr, acc, PRECISION)
            acc = _dot(-ai, ti, acc, PRECISION)
            n0 += BLOCK_N
        l = c0 + offs_c[:, None] * BLOCK_J + offs_j[None, :]
        tl.store(out_row + l * stride_out_l, acc, mask=l < end)
        c0 += BLOCK_C * BLOCK_J


# ----------------------------------------------------------------------------------------------
# Backward: with l = lc + j, lc = c0 + c BLOCK_J, conj(E_n(l)) = conj(A'[c, n]) conj(T[j, n]):
#   G0[n] = sum_l g_l conj(E_n(l))   = sum_c conj(A'[c, n]) H0[c, n],  H0 = g @ conj(T)
#   G1[n] = sum_l g_l l conj(E_n(l)) = sum_c conj(A'[c, n]) H1[c, n],  H1 = (g l) @ conj(T)
#   (four real GEMMs per chunk, BLOCK_C x BLOCK_J x BLOCK_N each; g l is exact enough in fp32).
# ----------------------------------------------------------------------------------------------
# BLOCK_N is tuned here too: 16 halves the registers (more programs per SM) at the price of
# reading g once per n-block. The first config (interpreter) walks N in blocks of 16.
_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_C": c, "BLOCK_J": j}, num_warps=w)
    for n, c, j, w in [(16, 16, 16, 1), (32, 64, 32, 4), (32, 128, 32, 8), (16, 64, 32, 4),
                       (16, 128, 32, 8)]
]


def _prune_bwd(configs_, named_args, **kwargs):
    """As _prune, and no n-block wider than N needs (rounded up to 16)."""
    widest = max(16, triton.next_power_of_2(named_args["N"]))
    kept = [c for c in _prune(configs_, named_args) if c.kwargs["BLOCK_N"] <= widest]
    return kept or configs_[:1]


@triton.jit
def _store_grads(g0r, g0i, g1r, g1i, v_row, stride_v_n, gv_row, gx_row, n, mask_n):
    """grad_v = 2 G0, grad_x = 2 conj(v) G1 for one row (outputs: contiguous (N, 2))."""
    vr = tl.load(v_row + n * stride_v_n, mask=mask_n, other=0.0)
    vi = tl.load(v_row + n * stride_v_n + 1, mask=mask_n, other=0.0)
    tl.store(gv_row + 2 * n, 2.0 * g0r, mask=mask_n)
    tl.store(gv_row + 2 * n + 1, 2.0 * g0i, mask=mask_n)
    tl.store(gx_row + 2 * n, 2.0 * (vr * g1r + vi * g1i), mask=mask_n)
    tl.store(gx_row + 2 * n + 1, 2.0 * (vr * g1i - vi * g1r), mask=mask_n)


@triton.autotune(configs=configs(_BWD_CONFIGS), key=["SIZE_KEY"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["B", "N", "L", "SPAN", "D1", "D2", "SIZE_KEY"])
def _vandermonde_bwd_kernel(
    g_ptr, v_ptr, x_ptr, gv_ptr, gx_ptr, p0_ptr, p1_ptr,
    B, N, L, SPAN, D1, D2, SIZE_KEY,
    stride_g_b, stride_g_l,
    stride_v_b0, stride_v_b1, stride_v_b2, stride_v_n,
    stride_x_b0, stride_x_b1, stride_x_b2, stride_x_n,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr, FINAL: tl.constexpr, EVEN_N: tl.constexpr,
):
    # FINAL (one program per row): write grad_v, grad_x (B, N, 2) directly. Otherwise write the
    # partial sums G0, G1 of this program's range to p0, p1: (B, P, N, 2).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1).to(tl.int64)
    num_l = tl.num_programs(1).to(tl.int64)
    v_row, x_row, start, end = _row_span(v_ptr, x_ptr, pid_b, D1, D2, SPAN, L, stride_v_b0, stride_v_b1,
                                         stride_v_b2, stride_x_b0, stride_x_b1, stride_x_b2)
    g_row = g_ptr + pid_b * stride_g_b
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_J)
    jf = offs_j.to(tl.float32)

    n0 = 0
    while n0 < N:
        n = n0 + offs_n
        mask_n = n < N
        xr = _load_n(x_row + n * stride_x_n, mask_n, EVEN_N)
        xi = -_load_n(x_row + n * stride_x_n + 1, mask_n, EVEN_N)  # conj(x)
        # conj(T)[j, n] = exp(conj(x_n) j): (BLOCK_J, BLOCK_N), reused by every chunk
        tr, ti = _exp_anchor(xr[None, :], xi[None, :], jf[:, None])
        a0r = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        a0i = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        a1r = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        a1i = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        c0 = start
        while c0 < end:
            lc = c0 + offs_c * BLOCK_J
            er, ei = _exp_anchor(xr[None, :], xi[None, :], lc.to(tl.float32)[:, None])  # conj(A')
            # rows past the end have g = 0; keep a growing exp there from making inf * 0
            row_ok = (lc < end)[:, None]
            er = tl.where(row_ok, er, 0.0)
            ei = tl.where(row_ok, ei, 0.0)
            l = lc[:, None] + offs_j[None, :]
            g = tl.load(g_row + l * stride_g_l, mask=l < end, other=0.0)
            # G0 += conj(A') (g @ conj(T)),  G1 += conj(A') ((g l) @ conj(T))
            zero = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
            hr = _dot(g, tr, zero, PRECISION)
            hi = _dot(g, ti, zero, PRECISION)
            a0r += er * hr - ei * hi
            a0i += er * hi + ei * hr
            gl = g * l.to(tl.float32)
            hr = _dot(gl, tr, zero, PRECISION)
            hi = _dot(gl, ti, zero, PRECISION)
            a1r += er * hr - ei * hi
            a1i += er * hi + ei * hr
            c0 += BLOCK_C * BLOCK_J
        g0r = tl.sum(a0r, axis=0)
        g0i = tl.sum(a0i, axis=0)
        g1r = tl.sum(a1r, axis=0)
        g1i = tl.sum(a1i, axis=0)
        if FINAL:
            _store_grads(g0r, g0i, g1r, g1i, v_row, stride_v_n,
                         gv_ptr + pid_b * N * 2, gx_ptr + pid_b * N * 2, n, mask_n)
        else:
            base = ((pid_b * num_l + pid_l) * N + n) * 2
            tl.store(p0_ptr + base, g0r, mask=mask_n)
            tl.store(p0_ptr + base + 1, g0i, mask=mask_n)
            tl.store(p1_ptr + base, g1r, mask=mask_n)
            tl.store(p1_ptr + base + 1, g1i, mask=mask_n)
        n0 += BLOCK_N


@triton.jit(do_not_specialize=["N", "P", "D1", "D2"])
def _vandermonde_bwd_reduce_kernel(
    p0_ptr, p1_ptr, v_ptr, gv_ptr, gx_ptr,
    N, P, D1, D2,
    stride_v_b0, stride_v_b1, stride_v_b2, stride_v_n,
    BLOCK_N: tl.constexpr,
):
    # Sum the (B, P, N, 2) partials over P (fixed order: deterministic), then the gradients.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    g0r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g0i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g1r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g1i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    p = 0
    while p < P:
        base = ((pid_b * P + p) * N + n) * 2
        g0r += tl.load(p0_ptr + base, mask=mask_n, other=0.0)
        g0i += tl.load(p0_ptr + base + 1, mask=mask_n, other=0.0)
        g1r += tl.load(p1_ptr + base, mask=mask_n, other=0.0)
        g1i += tl.load(p1_ptr + base + 1, mask=mask_n, other=0.0)
        p += 1
    v_row = v_ptr + _row_offset(pid_b, D1, D2, stride_v_b0, stride_v_b1, stride_v_b2)
    _store_grads(g0r, g0i, g1r, g1i, v_row, stride_v_n,
                 gv_ptr + pid_b * N * 2, gx_ptr + pid_b * N * 2, n, mask_n)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _plan(B: int, L: int, device: torch.device) -> tuple[int, int]:
    """Split each row into P ranges of SPAN positions so that B * P programs fill the GPU.

    P is a power of two (so that SPAN stays a multiple of the chunk sizes when L is) and no
    more than L / `min_span`; SPAN is a multiple of `gran`. Returns (P, SPAN).
    """
    gpu = gpu_for(device)
    if gpu is not None:
        target, gran, min_span = 4 * gpu.sms, 1024, 4096
    else:  # interpreter: a few programs of a couple of (16 x 16) chunks each
        target, gran, min_span = 4, 256, 256
    P = min(triton.next_power_of_2(triton.cdiv(target, B)), max(1, L // min_span))
    span = triton.cdiv(triton.cdiv(L, P), gran) * gran
    return triton.cdiv(L, span), span


def _collapse_batch(shape: tuple[int, ...], strides: list[tuple[int, ...]]):
    """Merge the batch dims of `shape` (one stride tuple per tensor, broadcast dims stride 0)
    wherever every tensor allows it; drop size-1 dims. Returns (sizes, per-tensor strides)."""
    sizes: list[int] = []
    out: list[list[int]] = [[] for _ in strides]
    for d, size in enumerate(shape):
        if size == 1:
            continue
        if sizes and all(o[-1] == s[d] * size for o, s in zip(out, strides)):
            sizes[-1] *= size
            for o, s in zip(out, strides):
                o[-1] = s[d]
            continue
        sizes.append(size)
        for o, s in zip(out, strides):
            o.append(s[d])
    return sizes, [tuple(o) for o in out]


def _batch_layout(v_r: torch.Tensor, x_r: torch.Tensor):
    """Broadcast batch shape, the (up to 3) dims the kernels index, and v/x batch strides.

    v_r, x_r: real views (..., N, 2). Returns (batch_shape, B, (D0, D1, D2), v_r, x_r,
    v_strides, x_strides); v_r / x_r are materialised (O(B N)) only when the broadcast needs
    more than three strided dims.
    """
    batch = tuple(torch.broadcast_shapes(v_r.shape[:-2], x_r.shape[:-2]))
    B = math.prod(batch)
    ve = v_r.expand(batch + tuple(v_r.shape[-2:]))
    xe = x_r.expand(batch + tuple(x_r.shape[-2:]))
    sizes, (sv, sx) = _collapse_batch(batch, [ve.stride()[:-2], xe.stride()[:-2]])
    if len(sizes) > 3:  # rare: materialise the broadcast rows (O(B N) memory)
        ve = ve.reshape(B, *ve.shape[-2:])
        xe = xe.reshape(B, *xe.shape[-2:])
        sizes, (sv, sx) = [B], [ve.stride()[:1], xe.stride()[:1]]
    pad = 3 - len(sizes)
    dims = (1,) * pad + tuple(sizes)
    sv = (0,) * pad + tuple(sv)
    sx = (0,) * pad + tuple(sx)
    return batch, B, dims, ve, xe, sv, sx


def _check_real_views(v_r: torch.Tensor, x_r: torch.Tensor, L: int) -> None:
    for name, t in (("v", v_r), ("x", x_r)):
        if t.dtype != torch.float32 or t.dim() < 2 or t.shape[-1] != 2 or t.stride(-1) != 1:
            raise ValueError(f"{_OP}: {name} must be a real view (..., N, 2) of a complex64 "
                             f"tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if v_r.shape[-2] != x_r.shape[-2]:
        raise ValueError(f"{_OP}: v and x must have the same N, got {v_r.shape[-2]} and "
                         f"{x_r.shape[-2]}")
    if not 1 <= L <= _MAX_L:
        raise ValueError(f"{_OP}: L must be in [1, 2^24], got {L}")




def _size_key(B: int, N: int, span: int) -> int:
    """Autotuning key: the power-of-two classes of N (as the n-blocks see it), of the row count
    and of a program's range, so a new shape re-tunes only when it changes class (the kernels
    ignore this argument)."""
    return (_block_n(N, 1 << 20).bit_length() << 16) | (B.bit_length() << 8) | span.bit_length()


def _block_n(N: int, cap: int) -> int:
    """The GEMM's n extent: a power of two in [16, cap] (tl.dot needs 16)."""
    return max(16, min(cap, triton.next_power_of_2(N)))


def _precision(device: torch.device) -> str:
    """tf32x3 (three tensor-core passes on split operands: fp32-level accuracy) where the GPU
    has tf32 tensor cores, plain fp32 FMA on older GPUs. The interpreter runs the tf32x3 code
    (its dots are fp32 matmuls, so it checks the splitting)."""
    gpu = gpu_for(device)
    if gpu is not None and gpu.capability < (8, 0):
        return "ieee"
    return "tf32x3"


def vandermonde_fwd(v_r: torch.Tensor, x_r: torch.Tensor, L: int) -> torch.Tensor:
    """Launch the forward. v_r, x_r: real views (..., N, 2) of complex64. Returns float32
    (broadcast(...), L)."""
    _check_real_views(v_r, x_r, L)
    batch, B, (_, D1, D2), ve, xe, sv, sx = _batch_layout(v_r, x_r)
    N = v_r.shape[-2]
    out = torch.empty((B, L), dtype=torch.float32, device=v_r.device)
    if B == 0:
        return out.view(batch + (L,))
    P, span = _plan(B, L, v_r.device)
    with nvtx_range("sashimi/vandermonde/fwd"), device_guard(v_r.device):
        _vandermonde_fwd_kernel[(B, P)](
            ve, xe, out,
            B, N, L, span, D1, D2, _size_key(B, N, span),
            sv[0], sv[1], sv[2], ve.stride(-2),
            sx[0], sx[1], sx[2], xe.stride(-2),
            out.stride(0), out.stride(1),
            BLOCK_N=_block_n(N, 64), PRECISION=_precision(v_r.device),
        )
    return out.view(batch + (L,))


def vandermonde_bwd(grad: torch.Tensor, v_r: torch.Tensor, x_r: torch.Tensor, L: int):
    """Launch the backward. grad: real (batch..., L). Returns (grad_v_r, grad_x_r), real views of
    the complex gradients, with the shapes of v_r and x_r (summed over broadcast dims)."""
    _check_real_views(v_r, x_r, L)
    batch, B, (_, D1, D2), ve, xe, sv, sx = _batch_layout(v_r, x_r)
    N = v_r.shape[-2]
    if tuple(grad.shape) != batch + (L,):
        raise ValueError(f"{_OP}: grad must have shape {batch + (L,)}, got {tuple(grad.shape)}")
    dev = v_r.device
    gv = torch.empty((B, N, 2), dtype=torch.float32, device=dev)
    gx = torch.empty((B, N, 2), dtype=torch.float32, device=dev)
    if B > 0:
        g2 = grad.to(torch.float32).reshape(B, L)  # a view when the batch dims allow it
        if abs(g2.stride(1)) * L >= 2 ** 31:  # in-row offsets are int32
            g2 = g2.contiguous()
        P, span = _plan(B, L, dev)
        final = P == 1
        if final:
            p0 = p1 = gv  # unused
        else:
            p0 = torch.empty((B, P, N, 2), dtype=torch.float32, device=dev)
            p1 = torch.empty((B, P, N, 2), dtype=torch.float32, device=dev)
        with nvtx_range("sashimi/vandermonde/bwd"), device_guard(dev):
            _vandermonde_bwd_kernel[(B, P)](
                g2, ve, xe, gv, gx, p0, p1,
                B, N, L, span, D1, D2, _size_key(B, N, span),
                g2.stride(0), g2.stride(1),
                sv[0], sv[1], sv[2], ve.stride(-2),
                sx[0], sx[1], sx[2], xe.stride(-2),
                PRECISION=_precision(dev), FINAL=final,
            )
            if not final:
                block = _block_n(N, 64)
                _vandermonde_bwd_reduce_kernel[(B, triton.cdiv(N, block))](
                    p0, p1, ve, gv, gx,
                    N, P, D1, D2,
                    sv[0], sv[1], sv[2], ve.stride(-2),
                    BLOCK_N=block,
                )
    gv = gv.view(batch + (N, 2))
    gx = gx.view(batch + (N, 2))
    if gv.shape != v_r.shape:
        gv = gv.sum_to_size(v_r.shape)
    if gx.shape != x_r.shape:
        gx = gx.sum_to_size(x_r.shape)
    return gv.contiguous(), gx.contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library registration (complex tensors cross the boundary as view_as_real)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sashimi_kernels::vandermonde_fwd", mutates_args=())
def _fwd_op(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    return vandermonde_fwd(v, x, L)


@_fwd_op.register_fake
def _fwd_fake(v, x, L):
    batch = tuple(torch.broadcast_shapes(v.shape[:-2], x.shape[:-2]))
    return v.new_empty(batch + (L,))


@torch.library.custom_op("sashimi_kernels::vandermonde_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, v: torch.Tensor, x: torch.Tensor, L: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return vandermonde_bwd(grad, v, x, L)


@_bwd_op.register_fake
def _bwd_fake(grad, v, x, L):
    return v.new_empty(v.shape), x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    v, x, L = inputs
    ctx.save_for_backward(v, x)
    ctx.L = L


def _backward(ctx, grad):
    v, x = ctx.saved_tensors
    gv, gx = _bwd_op(grad, v, x, ctx.L)
    return (gv if ctx.needs_input_grad[0] else None,
            gx if ctx.needs_input_grad[1] else None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_L(L) -> int:
    if isinstance(L, bool) or isinstance(L, float):
        raise ValueError(f"{_OP}: L must be an int, got {type(L).__name__} {L!r}")
    try:
        L = operator.index(L)
    except TypeError:
        raise ValueError(f"{_OP}: L must be an int, got {type(L).__name__}") from None
    if L < 1:
        raise ValueError(f"{_OP}: L must be >= 1, got {L}")
    return L


def vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, backend: str = "auto") -> torch.Tensor:
    """The S4D log-Vandermonde kernel: out[..., l] = 2 Re(sum_n v[..., n] exp(x[..., n] l)).

    v, x: complex (..., N), one of each conjugate pair stored; their leading dims broadcast
    against each other (not materialised). L: int >= 1 (<= 2^24 on the Triton path).
    Returns real (broadcast(...), L): float32 for complex64 inputs. Differentiable in v and x.
    backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the reference; complex128
    always goes to the reference), "triton" (complex64 only) or "reference".
    """
    L = _check_L(L)
    check_pair_inputs(_OP, ("v", "x"), v, x)
    device = same_device(_OP, v=v, x=x)
    path = choose_backend(_OP, backend, device)
    if path == "triton" and (v.dtype != torch.complex64 or x.dtype != torch.complex64):
        if backend == "triton":
            raise ValueError(f"{_OP}: the Triton path takes complex64, got {v.dtype} and {x.dtype} "
                             f"(cast, or use backend='reference' for double precision)")
        path = "reference"
    if path == "reference":
        return reference.vandermonde(v, x, L)
    if L > _MAX_L:
        raise ValueError(f"{_OP}: L must be <= 2^24 on the Triton path, got {L}")
    v_r = torch.view_as_real(v.resolve_conj().resolve_neg())
    x_r = torch.view_as_real(x.resolve_conj().resolve_neg())
    return _fwd_op(v_r, x_r, L)
