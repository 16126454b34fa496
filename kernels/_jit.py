"""The @triton.jit helpers more than one kernel uses (device side; kernels._utils is the host side).

- `load_pairs`: a complex tile read through its torch.view_as_real planes, split into (re, im).
- `step_tile`: the S4 recurrent state update of a [channels, N] tile, diagonal (R = 0) or DPLR
  of rank R (the Woodbury form of kernels.reference.dplr_step); the one copy of the step math,
  used by kernels._step (ssm_step, dplr_step) and kernels.tier_step.
- `gelu` (exact, erf), `layer_norm` (row-wise, affine), `row_offset` (an output row's offset in a
  tensor of up to three broadcast batch dims).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_pairs(ptr, offs, mask):
    """(re, im) of the complex tile at real-plane offsets `offs` (..., 2), 0 where masked."""
    return tl.split(tl.load(ptr + offs, mask=mask, other=0.0))


@triton.jit
def step_tile(xr, xi, uu, ar, ai, br, bi, P_ptr, Q_ptr, W_ptr, pqw_off, rank_stride, mask,
              R: tl.constexpr):
    """One S4 step of the state tile x = xr + i xi [channels, N] with input uu [channels, 1]:

        z  = dA x + dB u                                     (R = 0: the diagonal step, x' = z)
        z -= sum_k P[k] a[k],  a[k] = 2 Re(sum_n conj(Q[k]) x)   (every a[k] from the old x)
        x' = z - sum_k P[k] b[k],  b[k] = 2 Re(sum_n conj(W[k]) z)   (every b[k] from z)

    P, Q, W: rank-k tiles at real-plane offsets pqw_off + k * rank_stride (same layout for the
    three). Returns x' as (re, im)."""
    zr = ar * xr - ai * xi + br * uu
    zi = ar * xi + ai * xr + bi * uu
    if R == 0:
        return zr, zi
    else:
        zr, zi = _low_rank_sub(zr, zi, xr, xi, Q_ptr, P_ptr, pqw_off, rank_stride, mask, R)
        return _low_rank_sub(zr, zi, zr, zi, W_ptr, P_ptr, pqw_off, rank_stride, mask, R)


@triton.jit
def _low_rank_sub(zr, zi, xr, xi, V_ptr, P_ptr, off, rank_stride, mask, R: tl.constexpr):
    """z - sum_k P[k] c[k], c[k] = 2 Re(sum_n conj(V[k]) x): every c[k] from the x given."""
    for k in tl.static_range(R):
        vr, vi = load_pairs(V_ptr + k * rank_stride, off, mask)
        pr, pi = load_pairs(P_ptr + k * rank_stride, off, mask)
        c = (2.0 * tl.sum(vr * xr + vi * xi, axis=1))[:, None]
        zr -= pr * c
        zi -= pi * c
    return zr, zi


@triton.jit
def gelu(y):
    """Exact (erf) GELU."""
    return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))


@triton.jit
def layer_norm(x, w_ptr, b_ptr, offs_h, mask_h, H, eps):
    """Row-wise LayerNorm of x [ROWS, BLOCK_H] (padding lanes hold 0) with affine (w, b)."""
    w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / H
    xc = tl.where(mask_h[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def row_offset(rows, S1, S2, stride_0, stride_1, stride_2):
    """Offset of output row(s) `rows` (int64) in a tensor with batch dims (S0, S1, S2) and the
    given strides (0 where broadcast)."""
    i2 = rows % S2
    rest = rows // S2
    return (rest // S1) * stride_0 + (rest % S1) * stride_1 + i2 * stride_2
