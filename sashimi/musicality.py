"""Does audio sound like music: held notes that change, or noise? numpy only; ~0.04 CPU-s per s.

Spectral flatness and centroid cannot tell low-pass noise from music (a low-pass noise has the
flatness and centroid of a bass line). This measure looks for what noise does not have:

1. **Sustained spectral lines.** Short-time spectra (64 ms Hann frames, hop 16 ms, the same at
   every sample rate); in each frame the local maxima at least `PEAK_DB` above the median of
   their spectral neighbourhood (+-250 Hz), between 50 Hz and 5 kHz, their frequency refined by
   parabolic interpolation, and within `RANGE_DB` of the frame's strongest. A peak continues
   the nearest peak of the previous frame within `GLIDE_HZ` (a held note's vibrato moves a
   partial by less; the random peaks of noise, even of a narrow band of it, jump further). A
   chain of >= 100 ms is a sustained line.
2. **Notes that change.** A note change is the start of a sustained line whose pitch (in
   semitones) no sustained line held during the `NEW_PITCH_S` before it; starts within 50 ms
   of each other are one change (a note's harmonics start together).

Per channel (of the active frames: within 40 dB of the clip's loud frames):
- `lines`: the fraction of active frames holding at least one sustained line;
- `changes_per_s`: note changes per second of active audio;
- `spread`: the fraction of active 0.5 s windows holding at least one note change (changes
  throughout, not one burst);
- `score` = lines^2 x spread x min(1, changes_per_s / CHANGES_FULL): 0 for noise (no lines),
  ~0 for a held tone (no changes); lines counts twice because notes must be held most of the
  time (a very narrow band of noise is a line that keeps breaking). The built-in music scores
  0.5-1 (QUALITY.md).

`passes(result)` is the pass rule: `score >= PASS_SCORE`, placed between the data and the
controls (tests/test_musicality.py holds both and the margins).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

FRAME_S = 0.064          # analysis frame (a power of two of samples at or above it)
HOP_FRACTION = 4         # hop = frame / 4 (16 ms)
F_LO, F_HI = 50.0, 5000.0
MEDIAN_HZ = 250.0        # half-width of the neighbourhood a peak must stand above
PEAK_DB = 10.0           # how far above it
RANGE_DB = 30.0          # and at most this far below the frame's strongest peak (quantisation
                         # distortion lies further down and comes and goes)
GLIDE_HZ = 5.0           # the most a line's frequency may move per hop (16 ms)
SUSTAIN_S = 0.100        # a line is sustained from this long
NEW_PITCH_S = 0.200      # a change is a pitch no line held during this long before it
GROUP_S = 0.050          # line starts this close are one change
WINDOW_S = 0.5           # the spread's windows
ACTIVE_DB = 40.0         # frames quieter than the loud ones by more are silence
CHANGES_FULL = 1.0       # changes per second that count fully in the score
PASS_SCORE = 0.25        # the pass rule (tests/test_musicality.py: data and controls)


@dataclasses.dataclass
class ChannelResult:
    lines: float            # fraction of active frames with a sustained line
    changes_per_s: float    # note changes per active second
    spread: float           # fraction of active 0.5 s windows with a note change
    score: float
    active_s: float         # seconds of non-silent audio

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Result:
    channels: list[ChannelResult]

    @property
    def score(self) -> float:
        """The least musical channel's score: every channel must carry notes."""
        return min(c.score for c in self.channels) if self.channels else 0.0

    def as_dict(self) -> dict:
        return dict(score=self.score, passes=passes(self), channels=[c.as_dict() for c in self.channels])


def passes(result: Result) -> bool:
    return result.score >= PASS_SCORE


def _frames(x: np.ndarray, sr: int) -> tuple[np.ndarray, int, int]:
    n_fft = 1 << max(6, math.ceil(math.log2(FRAME_S * sr)))
    hop = n_fft // HOP_FRACTION
    if x.size < n_fft:
        return np.zeros((0, n_fft)), n_fft, hop
    idx = np.arange(0, x.size - n_fft + 1, hop)
    return np.lib.stride_tricks.sliding_window_view(x, n_fft)[idx], n_fft, hop


def _peaks(power_db: np.ndarray, lo: int, hi: int, half: int) -> list[np.ndarray]:
    """Per frame, the refined bin positions of the peaks that stand PEAK_DB above their
    neighbourhood's median, between bins lo and hi."""
    T, F = power_db.shape
    padded = np.pad(power_db, ((0, 0), (half, half)), mode="edge")
    # the median of +-half bins around each bin, frame by frame (chunks bound the memory)
    med = np.empty_like(power_db)
    for a in range(0, T, 256):
        win = np.lib.stride_tricks.sliding_window_view(padded[a:a + 256], 2 * half + 1, axis=1)
        med[a:a + 256] = np.median(win, axis=-1)
    c = power_db[:, 1:-1]
    is_peak = (c > power_db[:, :-2]) & (c >= power_db[:, 2:]) & (c - med[:, 1:-1] >= PEAK_DB)
    is_peak[:, :max(0, lo - 1)] = False
    is_peak[:, max(0, hi - 1):] = False
    out = []
    for t in range(T):
        k = np.nonzero(is_peak[t])[0] + 1
        if k.size:
            k = k[power_db[t, k] >= power_db[t, k].max() - RANGE_DB]
        a, b, g = power_db[t, k - 1], power_db[t, k], power_db[t, k + 1]
        denom = a - 2 * b + g
        delta = np.where(denom < 0, 0.5 * (a - g) / np.where(denom < 0, denom, -1.0), 0.0)
        out.append(k + np.clip(delta, -0.5, 0.5))
    return out


def channel_musicality(x: np.ndarray, sr: int) -> ChannelResult:
    """The measure of one channel of float audio at `sr` Hz."""
    x = np.asarray(x, dtype=np.float64)
    frames, n_fft, hop = _frames(x - x.mean() if x.size else x, sr)
    if frames.shape[0] == 0:
        return ChannelResult(0.0, 0.0, 0.0, 0.0, 0.0)
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2
    energy = spec.sum(1)
    loud = np.percentile(energy, 95)
    active = energy > max(loud * 10 ** (-ACTIVE_DB / 10), 1e-20)
    if not active.any():
        return ChannelResult(0.0, 0.0, 0.0, 0.0, 0.0)
    power_db = 10 * np.log10(spec + loud * 1e-12 + 1e-30)
    bin_hz = sr / n_fft
    lo, hi = int(F_LO / bin_hz), min(int(F_HI / bin_hz), spec.shape[1] - 2)
    peaks = _peaks(power_db, lo, hi, max(2, int(round(MEDIAN_HZ / bin_hz))))
    for t in np.nonzero(~active)[0]:
        peaks[t] = peaks[t][:0]

    # chain peaks frame to frame: each peak takes the nearest previous peak within GLIDE_HZ
    glide = GLIDE_HZ / bin_hz * (hop / sr) / 0.016     # bins per hop, scaled to the actual hop
    T = len(peaks)
    chain_of = []                                       # per frame, the chain id of each peak
    start, length, freq_sum = [], [], []
    for t in range(T):
        f = peaks[t]
        ids = np.full(f.size, -1, dtype=np.int64)
        if t > 0 and f.size and peaks[t - 1].size:
            prev, prev_ids = peaks[t - 1], chain_of[t - 1]
            j = np.clip(np.searchsorted(prev, f), 1, prev.size) - 1
            j2 = np.minimum(j + 1, prev.size - 1)
            pick = np.where(np.abs(prev[j2] - f) < np.abs(prev[j] - f), j2, j)
            ok = np.abs(prev[pick] - f) <= glide
            taken = set()
            for i in np.nonzero(ok)[0]:
                if pick[i] not in taken:
                    taken.add(pick[i])
                    ids[i] = prev_ids[pick[i]]
        for i in np.nonzero(ids < 0)[0]:
            ids[i] = len(start)
            start.append(t)
            length.append(0)
            freq_sum.append(0.0)
        for i, c in enumerate(ids):
            length[c] += 1
            freq_sum[c] += f[i]
        chain_of.append(ids)

    min_len = 1 + math.ceil(SUSTAIN_S * sr / hop - 1e-9)
    length = np.array(length, dtype=np.int64)
    start = np.array(start, dtype=np.int64)
    sustained = length >= min_len
    held = np.zeros(T, dtype=bool)
    for c in np.nonzero(sustained)[0]:
        held[start[c]:start[c] + length[c]] = True
    n_active = int(active.sum())
    lines = float((held & active).sum() / n_active)

    # note changes: starts of sustained lines at a pitch no sustained line held just before
    semis = np.round(12 * np.log2(np.maximum(np.array(freq_sum) * bin_hz / np.maximum(length, 1), 1e-3) / 440.0))
    order = np.nonzero(sustained)[0]
    order = order[np.argsort(start[order], kind="stable")]
    lookback = int(round(NEW_PITCH_S * sr / hop))
    change_frames = []
    for c in order:
        s = start[c]
        before = order[(start[order] < s) & (start[order] + length[order] > s - lookback)]
        if not np.any(semis[before] == semis[c]):
            change_frames.append(s)
    events = []
    group = max(1, int(round(GROUP_S * sr / hop)))
    for s in sorted(change_frames):
        if not events or s - events[-1] > group:
            events.append(s)
    active_s = n_active * hop / sr
    changes_per_s = len(events) / active_s
    win = max(1, int(round(WINDOW_S * sr / hop)))
    n_win = math.ceil(T / win)
    win_active = np.array([active[w * win:(w + 1) * win].mean() >= 0.5 for w in range(n_win)])
    win_change = np.zeros(n_win, dtype=bool)
    for s in events:
        win_change[s // win] = True
    spread = float((win_change & win_active).sum() / max(1, win_active.sum()))
    score = lines ** 2 * spread * min(1.0, changes_per_s / CHANGES_FULL)
    return ChannelResult(lines, changes_per_s, spread, score, active_s)


def musicality(audio, sr: int) -> Result:
    """The measure of float audio (frames,) or (frames, channels) at `sr` Hz, per channel."""
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    return Result([channel_musicality(a[:, c], sr) for c in range(a.shape[1])])


def controls(sr: int, seconds: float = 4.0, seed: int = 1) -> dict[str, np.ndarray]:
    """What the measure must not pass, float mono at `sr` Hz (peak 0.3-0.6): white, pink,
    low-pass and band-pass noise (down to a 20 Hz band), a held sine and a held harmonic tone."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    w = rng.standard_normal(n)
    f = np.fft.rfftfreq(n, 1 / sr)

    def shaped(gain):
        y = np.fft.irfft(np.fft.rfft(w) * gain, n)
        return 0.3 * y / np.abs(y).max()

    def band(lo, hi):
        return shaped(((f >= lo) & (f <= hi)).astype(float))

    t = np.arange(n) / sr
    return {
        "white noise": 0.6 * w / np.abs(w).max(),
        "pink noise": shaped(np.where(f > 0, 1 / np.sqrt(np.maximum(f, 1e-9)), 0.0)),
        "low-pass noise, 400 Hz": band(0, 400),
        "low-pass noise, 1 kHz": band(0, 1000),
        "band-pass noise, 250-350 Hz": band(250, 350),
        "band-pass noise, 975-1025 Hz": band(975, 1025),
        "band-pass noise, 990-1010 Hz": band(990, 1010),
        "sine, 440 Hz": 0.5 * np.sin(2 * np.pi * 440 * t),
        "harmonic tone, 220 Hz x 1-6": 0.2 * sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 7)),
    }


def read(path) -> tuple[np.ndarray, int]:
    """(float64 (frames, channels), rate) of an audio file; UserError (one line) if unreadable."""
    import soundfile as sf
    from sashimi.cli import UserError, regular_file
    path = regular_file(path, "audio file")
    try:
        audio, sr = sf.read(str(path), dtype="float64", always_2d=True)
    except Exception as exc:
        raise UserError(f"{path}: unreadable audio file ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    if not np.isfinite(audio).all():
        raise UserError(f"{path}: holds NaN or infinite samples")
    return audio, int(sr)


def describe(result: Result) -> str:
    """One line: the score, the verdict, and each channel's parts."""
    verdict = "notes" if passes(result) else "no notes"
    parts = "; ".join(f"lines {c.lines:.2f}, {c.changes_per_s:.2f} changes/s, spread {c.spread:.2f}"
                      for c in result.channels)
    return f"musicality {result.score:.3f} ({verdict}; pass >= {PASS_SCORE}): {parts}"


def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m sashimi.musicality",
                                description="Score audio files: held notes that change (the built-in music "
                                            "scores 0.5-1), or noise (~0). " + __doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="audio files (WAV, FLAC, OGG), at any sample rate")
    p.add_argument("--json", action="store_true", help="one JSON object per file instead of a line")
    return p.parse_args(argv)


def run(args) -> int:
    import json
    for f in args.files:
        audio, sr = read(f)
        result = musicality(audio, sr)
        if args.json:
            print(json.dumps(dict(file=str(f), sample_rate=sr, **result.as_dict())))
        else:
            print(f"{f}: {describe(result)}")
    return 0


def main(argv=None) -> int:
    from sashimi.cli import command
    return command(parse_args, run)(argv)


if __name__ == "__main__":
    import sys
    sys.exit(main())
