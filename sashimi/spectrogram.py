"""Spectrogram pictures of audio: one panel per channel, PNG. Needs matplotlib (the `plots` extra).

    python -m sashimi.spectrogram IN.wav [IN2.wav ...] [--out DIR]   # a PNG beside each file (or in DIR)

The short-time spectra are those the musicality measure reads (64 ms Hann frames, hop 16 ms),
in dB, the 80 dB below the loudest bin shown; held notes are horizontal lines (a note's
harmonics stacked above it), noise is a smear. The title carries the musicality score.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install 'sashimi-triton[plots]' (or: pip install matplotlib)"
RANGE_DB = 80.0
F_MAX = 4000.0          # the common band of 8 and 16 kHz models; most of a note's harmonics


def require_matplotlib() -> None:
    """A one-line UserError when matplotlib is missing: raised before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from sashimi.cli import UserError
        raise UserError(f"spectrograms need matplotlib: {INSTALL_HINT}") from None


def spectrogram_db(x: np.ndarray, sr: int) -> tuple[np.ndarray, float, float]:
    """(dB (bins, frames), seconds per hop, Hz per bin) of one channel."""
    from sashimi.musicality import _frames
    frames, n_fft, hop = _frames(np.asarray(x, dtype=np.float64), sr)
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2 if frames.size else np.zeros((1, n_fft // 2 + 1))
    return 10 * np.log10(spec.T + 1e-12), hop / sr, sr / n_fft


def write_png(path, audio, sr: int, title: str = "", score: bool = True) -> Path:
    """A spectrogram of float audio (frames,) or (frames, C) at `sr` Hz, one panel per channel,
    written atomically to `path`. The title gets the musicality score unless score=False."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sashimi.cli import atomic_output
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    names = ["L", "R"] if a.shape[1] == 2 else [f"ch {c}" for c in range(a.shape[1])]
    if score:
        from sashimi.musicality import PASS_SCORE, musicality
        m = musicality(a, sr)
        title = f"{title}  musicality {m.score:.2f} ({'notes' if m.score >= PASS_SCORE else 'no notes'})".strip()
    specs = [spectrogram_db(a[:, c], sr) for c in range(a.shape[1])]
    top = max(s[0].max() for s in specs)
    fig, axes = plt.subplots(a.shape[1], 1, figsize=(6.4, 1.7 + 1.5 * a.shape[1]), dpi=80,
                             sharex=True, squeeze=False)
    for ax, name, (db, dt, df) in zip(axes[:, 0], names, specs):
        f_max = min(F_MAX, sr / 2)
        rows = int(f_max / df) + 1
        ax.imshow(db[:rows], origin="lower", aspect="auto", cmap="magma", vmin=top - RANGE_DB, vmax=top,
                  extent=(0, db.shape[1] * dt, 0, rows * df / 1000), interpolation="nearest")
        ax.set_ylabel(f"{name}: kHz")
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sashimi.spectrogram", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="audio files (WAV, FLAC, OGG)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside each file)")
    p.add_argument("--seconds", type=float, default=0.0, help="only the first S seconds (0: all)")
    return p.parse_args(argv)


def run(args) -> int:
    from sashimi.cli import UserError, check_out_dir
    from sashimi.musicality import read
    require_matplotlib()
    if args.seconds < 0:
        raise UserError(f"--seconds must be >= 0, got {args.seconds}")
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out)
    for f in args.files:
        audio, sr = read(f)
        if args.seconds:
            audio = audio[:int(round(args.seconds * sr))]
        target = (out / Path(f).name if out else Path(f)).with_suffix(".png")
        print(write_png(target, audio, sr, Path(f).name))
    return 0


def main(argv=None) -> int:
    from sashimi.cli import command
    return command(parse_args, run)(argv)


if __name__ == "__main__":
    sys.exit(main())
