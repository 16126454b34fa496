"""Write a folder of 'real-ish' stereo music for the measurements in QUALITY.md (not committed).

Different from the built-in `SyntheticStereoMusic` on purpose: plucked strings (Karplus-Strong,
so the timbre decays and brightens/darkens per note as a real string does), a sine-ish bass, a
kick drum, a stereo room (a few early reflections per channel and a feedback-delay tail),
random stereo placement per note, 44.1 kHz 16-bit FLAC, like a small real recording folder.

    python scripts/realish_music.py OUT_DIR [--files 12] [--seconds 8] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf


def pluck(f0: float, dur: float, sr: int, rng, bright: float) -> np.ndarray:
    n = int(dur * sr)
    period = max(2, int(round(sr / f0)))
    buf = rng.uniform(-1, 1, period)
    # brighter/darker pick: a one-pole low-pass on the initial excitation
    for i in range(1, period):
        buf[i] = bright * buf[i] + (1 - bright) * buf[i - 1]
    out = np.empty(n)
    decay = 0.996 + 0.003 * rng.random()
    for i in range(n):
        j = i % period
        out[i] = buf[j]
        buf[j] = decay * 0.5 * (buf[j] + buf[(j + 1) % period])
    return out * np.exp(-np.arange(n) / (sr * rng.uniform(0.4, 1.5)))


def song(sr: int, seconds: float, rng) -> np.ndarray:
    n = int(seconds * sr)
    x = np.zeros((n + sr, 2))
    beat = 60.0 / rng.uniform(70, 130)
    root = rng.integers(40, 52)
    scale = np.array([0, 2, 3, 5, 7, 8, 10] if rng.random() < 0.5 else [0, 2, 4, 5, 7, 9, 11])
    hz = lambda m: 440.0 * 2 ** ((m - 69) / 12)
    t = 0.0
    while t < seconds:                                   # plucked melody and arpeggios
        deg = rng.integers(0, 14)
        midi = root + 12 + scale[deg % 7] + 12 * (deg // 7)
        s = pluck(hz(midi), rng.uniform(0.3, 1.2), sr, rng, rng.uniform(0.3, 0.9)) * rng.uniform(0.2, 0.5)
        pan = rng.uniform(0.1, 0.9)
        a = int(t * sr)
        x[a:a + len(s), 0] += np.cos(pan * np.pi / 2) * s[: len(x) - a]
        x[a:a + len(s), 1] += np.sin(pan * np.pi / 2) * s[: len(x) - a]
        t += beat * rng.choice([0.25, 0.5, 0.5, 1.0])
    t = 0.0
    while t < seconds:                                   # bass on the beat, kick every other
        f = hz(root - 12 + scale[rng.integers(0, 7)] * (rng.random() < 0.6))
        m = int(beat * sr)
        tt = np.arange(m) / sr
        b = 0.35 * np.tanh(1.5 * np.sin(2 * np.pi * f * tt)) * np.exp(-tt / 0.4)
        a = int(t * sr)
        x[a:a + m] += b[: len(x) - a, None] * [0.9, 1.0]
        if rng.random() < 0.5:
            k = 0.6 * np.sin(2 * np.pi * (50 + 90 * np.exp(-tt / 0.03)) * tt) * np.exp(-tt / 0.12)
            x[a:a + m] += k[: len(x) - a, None]
        t += beat
    wet = np.zeros_like(x)                               # a small stereo room
    for ch in (0, 1):
        for d, g in zip(rng.uniform(0.005, 0.04, 5), rng.uniform(0.1, 0.3, 5)):
            k = int(d * sr)
            wet[k:, ch] += g * x[:-k, 1 - ch if rng.random() < 0.5 else ch]
        delay, fb = int(rng.uniform(0.05, 0.09) * sr), 0.4
        for i in range(delay, len(x), delay):
            wet[i:, ch] += fb ** (i // delay) * 0.25 * x[: len(x) - i, ch]
    y = (x + wet)[:n] + 1e-4 * rng.standard_normal((n, 2))
    return 0.8 * y / np.abs(y).max()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--files", type=int, default=12)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=44100)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(a.files):
        rng = np.random.default_rng([a.seed, i])
        sf.write(str(out / f"song{i:02d}.flac"), song(a.sample_rate, a.seconds, rng), a.sample_rate, subtype="PCM_16")
    print(f"wrote {a.files} files of {a.seconds} s to {out}")


if __name__ == "__main__":
    main()
