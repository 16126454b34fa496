"""Plain-PyTorch oracles of every op: clear rather than fast, differentiable by autograd.

They are the reference path (the CPU fallback of `sashimi/`), the oracle of the tests and the
baseline of the benchmarks. Each takes the arguments of the public op (minus `backend`) plus
`compute_dtype`: tests pass complex128 / float64 to get a high-precision answer.

Conjugate-pair convention (the S4 one): a state of size 2N with conjugate pairs stores one of
each pair, so v, w, x, C, ... have N entries and sums over the full state are written
`f(v) + f(conj(v))` or `2 Re(...)`. Gradients follow PyTorch's complex convention
(grad = dL/dRe + i dL/dIm), which autograd gives for these functions directly.
"""
from __future__ import annotations

import torch


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[..., l] = sum_n v[..., n] / (z[l] - w[..., n]) + conj(v[..., n]) / (z[l] - conj(w[..., n])).

    v, w: complex (..., N), broadcast against each other; z: complex (L,). Returns (..., L).
    Materialises (..., N, L): fine for an oracle, not for a 8-second clip.
    """
    v, z, w = (_cast(t, compute_dtype) for t in (v, z, w))
    v, w = v.unsqueeze(-1), w.unsqueeze(-1)
    return (v / (z - w) + v.conj() / (z - w.conj())).sum(dim=-2)


def vandermonde(v: torch.Tensor, x: torch.Tensor, L: int,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[..., l] = 2 Re(sum_n v[..., n] exp(x[..., n] l)), l = 0..L-1 (S4D log-Vandermonde).

    v, x: complex (..., N), broadcast against each other. Returns real (..., L).
    """
    v, x = _cast(v, compute_dtype), _cast(x, compute_dtype)
    ell = torch.arange(L, device=x.device, dtype=x.real.dtype)
    powers = torch.exp(x.unsqueeze(-1) * ell)  # (..., N, L)
    return 2 * (v.unsqueeze(-1) * powers).sum(dim=-2).real


def check_tokens(tokens: torch.Tensor, num_embeddings: int, op: str = "embed_interleave") -> None:
    """Raise a clear ValueError for a token outside [0, V) (one host sync)."""
    if tokens.numel() == 0:
        return
    lo, hi = torch.aminmax(tokens)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: token {bad} is outside [0, {num_embeddings}) "
                         f"(tokens range over [{lo}, {hi}])")


def embed_interleave(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[b, l*C + c] = scale * weight[tokens[b, l, c]]: channels interleaved L, R, L, R.

    tokens: integer (B, L, C); weight: (V, D). Returns (B, L*C, D) in out_dtype (default:
    weight.dtype). The product is formed in fp32 and rounded once, as the kernel does. The rows
    are gathered from the table converted to that compute dtype, so the backward accumulates
    d weight in fp32 and rounds it once to weight.dtype, as the kernel does (gathering from a
    bf16 table directly would sum a bf16 table's gradient in bf16).
    """
    if tokens.dim() != 3:
        raise ValueError(f"embed_interleave: tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    check_tokens(tokens, weight.shape[0])
    B, L, C = tokens.shape
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    compute = torch.promote_types(weight.dtype, torch.float32)  # fp32 for fp32/bf16, fp64 stays
    # .long(): uint8 tokens would index as a boolean mask, int8/int16 not at all
    rows = weight.to(compute)[tokens.reshape(B, L * C).long()]  # reshape of (B, L, C) is the interleave
    return (rows * scale).to(out_dtype)


def embed_frames(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[b, l] = scale * sum_c weight[c, tokens[b, l, c]]: one position per frame (stereo `frames`).

    tokens: integer (B, L, C); weight: (C, V, D), one table per channel. Returns (B, L, D) in
    out_dtype (default weight.dtype). The rows are summed in channel order in the compute dtype
    (fp32 for fp32/bf16 tables), then scaled and rounded once, as the kernel does; the backward
    accumulates in that dtype and rounds once to weight.dtype.
    """
    if tokens.dim() != 3:
        raise ValueError(f"embed_frames: tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    if weight.dim() != 3 or weight.shape[0] != tokens.shape[-1]:
        raise ValueError(f"embed_frames: weight must be (C, V, D) with C = {tokens.shape[-1]} tables, "
                         f"got shape {tuple(weight.shape)}")
    check_tokens(tokens, weight.shape[1], "embed_frames")
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    idx = tokens.long()   # uint8 would index as a boolean mask; int8/int16 do not index at all
    rows = w[0][idx[..., 0]]
    for c in range(1, tokens.shape[-1]):
        rows = rows + w[c][idx[..., c]]
    return (rows * scale).to(out_dtype)


def ssm_step(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One diagonal (S4D, ZOH) recurrent step, updating `state` in place.

    state: complex (B, H, N); u: real (B, H); dA, dB, C: complex (H, N); D: real (H,).
    state <- dA * state + dB * u;  y = 2 Re(sum_n C * state) + D * u.  Returns y: real (B, H).
    """
    state.mul_(dA).add_(dB * u.unsqueeze(-1))
    return 2 * (C * state).sum(dim=-1).real + D * u


def _pair_inner(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q^* x over the full conjugate-paired state: 2 Re(sum_n conj(q_n) x_n).

    q: (r, H, N), x: (B, H, N) -> real (B, r, H).
    """
    return 2 * (q.conj().unsqueeze(0) * x.unsqueeze(1)).sum(dim=-1).real


def dplr_step(state: torch.Tensor, u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor, P: torch.Tensor, Q: torch.Tensor,
              W: torch.Tensor) -> torch.Tensor:
    """One exact bilinear step of a DPLR state matrix A = Lambda - P Q^*, updating `state` in place.

    x' = (2/dt - A)^-1 [(2/dt + A) x + 2 B u], with the inverse applied by Woodbury, so the step
    is diagonal products plus real rank-r inner products. With E = (2/dt - Lambda)^-1 (diagonal)
    and M = (I + Q^* E P)^-1 (real r x r per channel, (Q^* E P)[j, k] = 2 Re(sum_n conj(Q_j) E P_k)),
    setup precomputes

        dA = E (2/dt + Lambda),  dB = 2 E B,  P = E P_orig,  Q = Q_orig,
        W[k] = sum_j M[k, j] Q_orig[j]   (i.e. W^* = M Q^*; with Q, W stacked as (r, H, N): W = M Q),

    and the step is

        a  = Q^* x                 (real, rank r)
        z  = dA x - P a + dB u
        x' = z - P (W^* z)
        y  = 2 Re(sum_n C x') + D u

    state: complex (B, H, N); u: real (B, H); dA, dB, C: complex (H, N); D: real (H,);
    P, Q, W: complex (r, H, N). Returns y: real (B, H).
    """
    a = _pair_inner(Q, state)                                  # (B, r, H)
    z = dA * state - (P.unsqueeze(0) * a.unsqueeze(-1)).sum(1) + dB * u.unsqueeze(-1)
    b = _pair_inner(W, z)                                      # (B, r, H)
    state.copy_(z - (P.unsqueeze(0) * b.unsqueeze(-1)).sum(1))
    return 2 * (C * state).sum(dim=-1).real + D * u


def diag_step_factors(dt: torch.Tensor, Lam: torch.Tensor, B: torch.Tensor) -> dict:
    """The exact ZOH step factors of a diagonal SSM: dA = exp(dt Lambda), dB = (dA - 1) / Lambda B.

    dt: real, broadcastable against Lam (e.g. (..., H, 1)); Lam, B: complex (..., H, N).
    """
    dA = torch.exp(dt * Lam)
    return dict(dA=dA, dB=(dA - 1) / Lam * B)


def dplr_step_factors(dt: torch.Tensor, Lam: torch.Tensor, B: torch.Tensor, P: torch.Tensor,
                      Q: torch.Tensor | None = None) -> dict:
    """The per-(H, N) factors of `dplr_step` for A = Lambda - P Q^* (bilinear, dt per channel).

    dt: real, broadcastable against Lam (e.g. (..., H, 1)); Lam, B: complex (..., H, N);
    P, Q: complex (..., r, H, N) (Q defaults to P, the S4 case). With E = (2/dt - Lambda)^-1 and
    M = (I + Q^* E P)^-1 (real r x r per channel, (Q^* E P)[j, k] = 2 Re(sum_n conj(Q_j) E P_k)):
    dA = E (2/dt + Lambda), dB = 2 E B, P' = E P, Q' = Q, W[k] = sum_j M[k, j] Q[j].
    Returns dict(dA, dB, P, Q, W). The one derivation used by sashimi's S4Layer.setup_step, the
    self-test, the tests and the benchmarks.
    """
    Q = P if Q is None else Q
    E = 1 / (2 / dt - Lam)                                                # (..., H, N)
    EP = E.unsqueeze(-3) * P                                              # (..., r, H, N)
    G = 2 * torch.einsum("...jhn,...khn->...hjk", Q.conj(), EP).real      # (..., H, r, r)
    eye = torch.eye(P.shape[-3], dtype=G.dtype, device=G.device)
    M = torch.linalg.inv(eye + G)                                         # (..., H, r, r)
    W = torch.einsum("...hkj,...jhn->...khn", M.to(Q.dtype), Q)
    return dict(dA=E * (2 / dt + Lam), dB=2 * E * B, P=EP, Q=Q, W=W)


def tier_step(x: torch.Tensor, state: torch.Tensor, params: dict, ssm: str) -> torch.Tensor:
    """One generation time step of a whole tier of SaShiMi residual blocks, updating `state` in place.

    For l = 0 .. n_layers-1 (layer l's S4 state is the view state[l]):
        x = x + glu(s4_out_w[l] @ gelu(S4 step of LayerNorm(x; s4_norm_w[l], s4_norm_b[l])) + s4_out_b[l])
        if the tier has FF blocks (params has ff_w1):
            x = x + ff_w2[l] @ gelu(ff_w1[l] @ LayerNorm(x; ff_norm_w[l], ff_norm_b[l]) + ff_b1[l]) + ff_b2[l]
    with the S4 step `ssm_step` (ssm="diag": dA, dB, C, D) or `dplr_step` (ssm="dplr": also P, Q, W),
    LayerNorm eps 1e-5, exact (erf) GELU, glu over the last dim (z[:H] * sigmoid(z[H:])).

    x: real (B, H); state: complex (n_layers, B, H, N); params (stacked over layers): s4_norm_w,
    s4_norm_b (n, H); dA, dB, C complex (n, H, N); D (n, H); P, Q, W complex (n, r, H, N) for dplr;
    s4_out_w (n, 2H, H); s4_out_b (n, 2H); optionally ff_norm_w, ff_norm_b (n, H), ff_w1 (n, F, H),
    ff_b1 (n, F), ff_w2 (n, H, F), ff_b2 (n, H). Computed in float32 (float64 if x is float64 or the
    state complex128); complex params are cast to the state's dtype. Returns x (B, H) (without the
    tier's outer skip).
    """
    import torch.nn.functional as F

    real = torch.float64 if torch.float64 in (x.dtype, state.real.dtype) else torch.float32
    p = {k: v.to(state.dtype if v.is_complex() else real) for k, v in params.items() if v is not None}
    x = x.to(real)
    H = x.shape[-1]
    for l in range(state.shape[0]):
        h = F.layer_norm(x, (H,), p["s4_norm_w"][l], p["s4_norm_b"][l], eps=1e-5)
        if ssm == "diag":
            y = ssm_step(state[l], h, p["dA"][l], p["dB"][l], p["C"][l], p["D"][l])
        elif ssm == "dplr":
            y = dplr_step(state[l], h, p["dA"][l], p["dB"][l], p["C"][l], p["D"][l],
                          p["P"][l], p["Q"][l], p["W"][l])
        else:
            raise ValueError(f"tier_step: ssm must be 'diag' or 'dplr', got {ssm!r}")
        x = x + F.glu(F.linear(F.gelu(y), p["s4_out_w"][l], p["s4_out_b"][l]), dim=-1)
        if "ff_w1" in p:
            h = F.layer_norm(x, (H,), p["ff_norm_w"][l], p["ff_norm_b"][l], eps=1e-5)
            h = F.gelu(F.linear(h, p["ff_w1"][l], p["ff_b1"][l]))
            x = x + F.linear(h, p["ff_w2"][l], p["ff_b2"][l])
    return x
