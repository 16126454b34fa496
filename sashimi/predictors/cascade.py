"""The adaptive cascade: a backward-adaptive least-squares stage, then normalised LMS stages on
what it leaves (the design of OptimFROG, Sac and Monkey's Audio). No side information and no
training: it adapts to each passage from the samples already coded, so encoder and decoder
compute it alike.

Per channel c and frame t (PCM integers x):
1. Least squares (`LS_ORDER` of the channel's own past samples and `LS_ORDER` of the other
   channel's; the second channel of a frame also sees the first channel's *current* sample):
   the covariance of those inputs and their cross-covariance with the target, both forgetting
   with `LS_LAMBDA`, solved by Cholesky every `LS_SOLVE_EVERY` frames.
2. Sign-error NLMS stages (`NLMS_TAPS`): stage k predicts the residual that stage k-1 left from
   that residual's own past (rounded to integers, so that a stage's input energy is exact).
The prediction is the sum of the stages'. For the second channel of a stereo frame it is
`base + gain * x[t, 0]`: `gain` is the least-squares weight of the first channel's current
sample, so the prediction of R is known, as a function of L, before L is.

Bit-exact on every machine: float64 with no fused or reordered operations (numba without
fastmath; every reduction is written out in a fixed order: `_dot` keeps 4 partial sums),
integer inputs, and chunks independent of one another (one state per chunk; the batch is a
loop, so its width never changes a chunk's arithmetic). tests/test_cascade.py holds this
against thread counts, batch widths, step-by-step against whole-sequence runs, and CPU targets.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from sashimi.predictors.base import Predictor

# Chosen on training music (never on held-out files), docs/codec.md has the measurements.
# Changing any of these changes every prediction: a new set is a new predictor name.
LS_ORDER = 16                 # past samples of each channel in the least-squares stage
LS_LAMBDA = 0.996             # forgetting factor: a memory of ~250 frames (6 ms at 44.1 kHz)
LS_SOLVE_EVERY = 8            # frames between Cholesky solves (the covariance updates every frame)
LS_RIDGE = 1e-9               # regularisation, relative to the mean input power (+1 absolute):
#                               audio's covariance is ill-conditioned, 1e-3 cost 20% of the gain
NLMS_TAPS = (256, 32, 16)
NLMS_MU = (0.002, 0.001, 0.001)
NLMS_EPS = 1.0                # added to the input energy (PCM units squared)
MABS_RATE = 1.0 / 16          # the running mean |residual| (the heads' scale anchor) follows ~16 frames
MABS_START = 64.0             # ... from a quiet passage's (PCM units)
_NLMS_OFFSETS = np.cumsum((0,) + NLMS_TAPS)


@njit(cache=True, inline="always")
def _dot(a, b, n):
    """sum_i a[i] b[i] in one fixed order: 4 interleaved partial sums, then (s0 + s1) + (s2 + s3)."""
    s0 = s1 = s2 = s3 = 0.0
    i = 0
    while i + 4 <= n:
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        i += 4
    while i < n:
        s0 += a[i] * b[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True)
def _cholesky_solve(A, y, ridge, L, w):
    """w = (A + ridge I)^-1 y for symmetric A (n, n) by Cholesky into L; keeps w if not positive."""
    n = A.shape[0]
    for i in range(n):
        for j in range(i + 1):
            s = A[i, j] + (ridge if i == j else 0.0)
            for k in range(j):
                s -= L[i, k] * L[j, k]
            if i == j:
                if s <= 0.0:
                    return
                L[i, i] = np.sqrt(s)
            else:
                L[i, j] = s / L[j, j]
    z = np.empty(n)
    for i in range(n):
        s = y[i]
        for k in range(i):
            s -= L[i, k] * z[k]
        z[i] = s / L[i, i]
    for i in range(n - 1, -1, -1):
        s = z[i]
        for k in range(i + 1, n):
            s -= L[k, i] * w[k]
        w[i] = s / L[i, i]


@njit(cache=True)
def _frame(b, xt, hist, cov, xcov, w, u, chol, nbuf, npos, nw, nenergy, stage_pred, t_count, mabs,
           base_out, gain_out, scale_out, taps, offsets, mus):
    """Advance chunk b by one frame xt (C,) of PCM integers, then write the next frame's
    prediction of each channel: base_out[c], gain_out[c], and the running mean absolute
    residual scale_out[c] (see the module doc)."""
    C, P = hist.shape[1], hist.shape[2]
    n = u.shape[2]
    S = taps.shape[0]
    # -- learn from frame t: each channel's stages against its true sample --------------------
    for c in range(C):
        y = float(xt[c])
        if C == 2 and c == 1:
            u[b, 1, P] = float(xt[0])          # the current first-channel sample R was given
        uc = u[b, c]
        cv, xc = cov[b, c], xcov[b, c]
        for i in range(n):                   # forgetting covariance: lambda A + u u^T (lower half)
            ui = uc[i]
            for j in range(i + 1):
                cv[i, j] = LS_LAMBDA * cv[i, j] + ui * uc[j]
            xc[i] = LS_LAMBDA * xc[i] + ui * y
        # stage residuals: e_0 = x - ls (R's with its current-L term), e_k = e_{k-1} - nlms_k
        ls = stage_pred[b, c, 0]
        if C == 2 and c == 1:
            ls = ls + w[b, 1, P] * float(xt[0])
        e = y - ls
        for s in range(S):
            T_s, o = taps[s], offsets[s]
            pos = npos[b, c, s]
            ei = np.floor(e + 0.5)             # the stage's input: the residual it predicts, rounded
            err = e - stage_pred[b, c, s + 1]
            # sign-error NLMS: a transient's huge residual moves the weights no more than a small
            # one (the error itself, at a note's onset, sent them into a blow-up of ~300 frames)
            scale = mus[s] * (1.0 if err > 0.0 else -1.0 if err < 0.0 else 0.0) / np.sqrt(nenergy[b, c, s] + NLMS_EPS)
            wv = nw[b, c, o:o + T_s]
            h = nbuf[b, c, 2 * o + pos: 2 * o + pos + T_s]
            for k in range(T_s):
                wv[k] += scale * h[k]
            # push ei: the window is nbuf[pos-1 : pos-1+T] after the push (a doubled ring)
            old = nbuf[b, c, 2 * o + pos + T_s - 1]
            pos = pos - 1 if pos > 0 else T_s - 1
            nbuf[b, c, 2 * o + pos] = ei
            nbuf[b, c, 2 * o + pos + T_s] = ei
            npos[b, c, s] = pos
            nenergy[b, c, s] += ei * ei - old * old
            e = err
        mabs[b, c] += MABS_RATE * (abs(e) - mabs[b, c])
    t_count[b] += 1
    for c in range(C):                         # the channels' histories, newest first
        for k in range(P - 1, 0, -1):
            hist[b, c, k] = hist[b, c, k - 1]
        hist[b, c, 0] = float(xt[c])
    if t_count[b] % LS_SOLVE_EVERY == 0:
        for c in range(C):
            cv = cov[b, c]
            for i in range(n):
                for j in range(i):
                    cv[j, i] = cv[i, j]
            tr = 0.0
            for i in range(n):
                tr += cv[i, i]
            _cholesky_solve(cv, xcov[b, c], LS_RIDGE * tr / n + 1.0, chol, w[b, c])
    # -- predict frame t + 1 -------------------------------------------------------------------
    for c in range(C):
        uc = u[b, c]
        for k in range(P):
            uc[k] = hist[b, c, k]
        if C == 2:
            other = 1 - c
            if c == 0:                         # L: R's past
                for k in range(P):
                    uc[P + k] = hist[b, other, k]
            else:                              # R: L's current (set when known), then L's past
                uc[P] = 0.0
                for k in range(P - 1):
                    uc[P + 1 + k] = hist[b, other, k]
        ls = _dot(w[b, c], uc, n)
        stage_pred[b, c, 0] = ls
        total = ls
        for s in range(S):
            T_s, o = taps[s], offsets[s]
            p = _dot(nw[b, c, o:o + T_s], nbuf[b, c, 2 * o + npos[b, c, s]: 2 * o + npos[b, c, s] + T_s], T_s)
            stage_pred[b, c, s + 1] = p
            total += p
        base_out[c] = total
        gain_out[c] = w[b, c, P] if (C == 2 and c == 1) else 0.0
        scale_out[c] = mabs[b, c]


@njit(cache=True)
def _run(x, hist, cov, xcov, w, u, chol, nbuf, npos, nw, nenergy, stage_pred, t_count, mabs,
         base, gain, scale, taps, offsets, mus):
    """x (B, T, C) int32 -> base, gain, scale (B, T, C): the prediction of frame t + 1 after frame t."""
    B, T = x.shape[0], x.shape[1]
    for b in range(B):
        for t in range(T):
            _frame(b, x[b, t], hist, cov, xcov, w, u, chol, nbuf, npos, nw, nenergy, stage_pred,
                   t_count, mabs, base[b, t], gain[b, t], scale[b, t], taps, offsets, mus)


_STATE = ("hist", "cov", "xcov", "w", "u", "chol", "nbuf", "npos", "nw", "nenergy", "stage_pred", "t_count",
          "mabs")


def new_state(batch: int, channels: int) -> dict:
    """One cascade per chunk: a dict of CPU tensors, batch first (but the scratch `chol`), so that
    the model's state tools (clone, broadcast a prompt's state) handle it; numba sees them as
    numpy arrays without a copy."""
    P = LS_ORDER if channels == 2 else 2 * LS_ORDER   # mono: all of its inputs its own past
    n = P * channels
    S, total = len(NLMS_TAPS), int(_NLMS_OFFSETS[-1])
    f64, i64 = torch.float64, torch.int64
    z = torch.zeros
    return dict(hist=z(batch, channels, P, dtype=f64), cov=z(batch, channels, n, n, dtype=f64),
                xcov=z(batch, channels, n, dtype=f64), w=z(batch, channels, n, dtype=f64),
                u=z(batch, channels, n, dtype=f64), chol=z(n, n, dtype=f64),
                nbuf=z(batch, channels, 2 * total, dtype=f64), npos=z(batch, channels, S, dtype=i64),
                nw=z(batch, channels, total, dtype=f64), nenergy=z(batch, channels, S, dtype=f64),
                stage_pred=z(batch, channels, S + 1, dtype=f64), t_count=z(batch, dtype=i64),
                mabs=torch.full((batch, channels), MABS_START, dtype=f64))


_TAPS = np.array(NLMS_TAPS, dtype=np.int64)
_OFFSETS = np.array(_NLMS_OFFSETS[:-1], dtype=np.int64)
_MUS = np.array(NLMS_MU, dtype=np.float64)


def run(state: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advance each chunk's cascade through frames x (B, T, C) of PCM integers. Returns base,
    gain, mean_abs (B, T, C) float64: after frame t, the prediction of frame t + 1 is base for
    the first channel and base + gain * x[t + 1, 0] for the second (gain is 0 but for stereo
    R), and mean_abs the running mean absolute residual of the channel."""
    x = np.ascontiguousarray(x, dtype=np.int32)
    B, T, C = x.shape
    base, gain, mean_abs = np.empty((B, T, C)), np.empty((B, T, C)), np.empty((B, T, C))
    _run(x, *(state[k].numpy() for k in _STATE), base, gain, mean_abs, _TAPS, _OFFSETS, _MUS)
    return base, gain, mean_abs


class Cascade(Predictor):
    """The adaptive cascade (this module's doc) as a model's predictor: PCM integers from the
    model's tokens (linear quantisation only), predictions back on the heads' grids."""
    name = "cascade"
    extra_inputs = 1          # each slot's residual against its prediction enters the embedding
    graph_safe = False        # numba on the CPU: a CUDA graph cannot hold it
    scales = True             # the running mean absolute residual anchors the heads' scales
    warmup_frames = 4096      # a training crop's history before its targets (~0.1 s at 44.1 kHz)
    min_chunk_seconds = 1.0   # restarts every 1 s cost 0.6% against one cascade per file, 23 ms ones 20%

    @classmethod
    def problems(cls, cfg) -> list[str]:
        if cfg.quantization != "linear":
            return ["predictor 'cascade' needs linear quantisation (--quantization linear)"]
        return []

    def new_state(self, batch: int, device=None) -> dict:
        return new_state(batch, self.layout.step_tokens)

    def run(self, state, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = positions.shape[-1]
        levels = [self.layout.levels(j) for j in range(S)]
        centre = torch.tensor([lv // 2 for lv in levels], dtype=torch.int64)
        pcm = (positions.detach().cpu().long() - centre).numpy()
        base, gain, mean_abs = run(state, pcm)
        # PCM -> the grid of [-1, 1]: token k sits at 2k / (levels - 1) - 1
        span = np.array([lv - 1 for lv in levels], dtype=np.float64)
        base = (2.0 * base + 1.0) / span
        gain = gain * (span[0] / span)
        log_scale = np.log(np.maximum(mean_abs, 0.25) * (2.0 / span))
        dev = positions.device
        return tuple(torch.from_numpy(a).float().to(dev, non_blocking=True) for a in (base, gain, log_scale))


def code_length_bits(x: np.ndarray, levels=(1 << 16,)) -> float:
    """The cascade alone as a coder: total -log2 P of PCM integers x (B, T, C) (chunks of
    frames, each started from one frame of silence as the codec does; `levels` per channel)
    under one discretised logistic at the cascade's prediction with the scale of its running
    mean |residual|: what a cascade model starts from before training (the DML head's initial
    output), so that a codec's report can show what the network adds."""
    x = np.asarray(x, dtype=np.int32)
    B, T, C = x.shape
    state = new_state(B, C)
    first = run(state, np.zeros((B, 1, C), np.int32))
    rest = run(state, x[:, :-1])
    base, gain, mean_abs = (np.concatenate([a, b], 1) for a, b in zip(first, rest))
    pred = base.copy()
    if C == 2:
        pred[..., 1] += gain[..., 1] * x[..., 0]
    s = np.maximum(mean_abs, 0.25) / (2.0 * np.log(2.0))      # the logistic of that mean |x|
    levels = np.broadcast_to(np.asarray(levels, dtype=np.int64), (C,))
    lo, hi = -(levels // 2), levels // 2 - 1

    def cdf(v):
        return 0.5 * (1.0 + np.tanh((v - pred) / (2.0 * s)))
    upper = np.where(x >= hi, 1.0, cdf(x + 0.5))
    lower = np.where(x <= lo, 0.0, cdf(x - 0.5))
    return float(-np.log2(np.maximum(upper - lower, 1e-300)).sum())
