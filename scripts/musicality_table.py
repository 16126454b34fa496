"""QUALITY.md's musicality tables: the built-in music, the controls, real music, WAVs.

    python scripts/musicality_table.py [--rates 16000 8000] [--music DIR] [--wav FILE ...]

Data: the 16 clips (4 s) the quickstart trains on (SyntheticStereoMusic, seed 0), through the
8-bit mu-law quantiser, per channel. Controls: `sashimi.musicality.controls`, through the same
quantiser. --music: 30 s (from 0:30, or the whole file when shorter) of every audio file under
DIR, at 16 kHz, unquantised. --wav: files as they are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def row(name, result) -> str:
    ch = result.channels
    f = lambda key: " / ".join(f"{getattr(c, key):.2f}" for c in ch)
    return f"| {name} | **{result.score:.3f}** | {f('lines')} | {f('changes_per_s')} | {f('spread')} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=int, nargs="*", default=[16000, 8000])
    p.add_argument("--music", default=None)
    p.add_argument("--wav", nargs="*", default=[])
    args = p.parse_args(argv)
    from sashimi import musicality as M
    from sashimi.data import SyntheticStereoMusic
    from sashimi.quantize import Quantizer
    q = Quantizer("mu-law", 8)
    quantised = lambda x: q.decode(q.encode(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32))).double().numpy()
    print("| audio | score | lines | changes/s | spread |\n|---|---|---|---|---|")
    for sr in args.rates:
        music = SyntheticStereoMusic(sr, seconds_per_clip=4.0, seed=0)
        res = [M.musicality(quantised(music.clip(i).numpy()), sr) for i in range(len(music))]
        per_ch = np.array([[c.score, c.lines, c.changes_per_s, c.spread] for r in res for c in r.channels])
        lo, med, hi = per_ch.min(0), np.median(per_ch, 0), per_ch.max(0)
        print(f"| built-in music, {sr} Hz, 16 clips x 2 channels: min / median / max | "
              f"**{lo[0]:.2f} / {med[0]:.2f} / {hi[0]:.2f}** | {lo[1]:.2f} / {med[1]:.2f} / {hi[1]:.2f} | "
              f"{lo[2]:.2f} / {med[2]:.2f} / {hi[2]:.2f} | {lo[3]:.2f} / {med[3]:.2f} / {hi[3]:.2f} |")
        for name, x in M.controls(sr).items():
            print(row(f"{name}, {sr} Hz", M.musicality(quantised(x), sr)))
    if args.music:
        from sashimi.data import AUDIO_SUFFIXES, audio_info, model_frames, read_audio
        files = sorted(f for f in Path(args.music).rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        scores = []
        for f in files:
            total = model_frames(*audio_info(f)[:2], 16000)
            start = 30 * 16000 if total >= 60 * 16000 else 0
            x = read_audio(f, 16000, 2, start, min(30 * 16000, total - start)).numpy()
            if x.shape[0] < 16000:
                continue
            r = M.musicality(x, 16000)
            scores.append(r.score)
            print(row(f"{f.name} ({x.shape[0] / 16000:.0f} s)", r))
        if scores:
            s = np.array(scores)
            print(f"| real music: {len(s)} files, min / median / max | **{s.min():.2f} / {np.median(s):.2f} / "
                  f"{s.max():.2f}** ({(s >= M.PASS_SCORE).sum()} of {len(s)} pass) | | | |")
    for f in args.wav:
        audio, sr = M.read(f)
        print(row(f"{f} ({sr} Hz)", M.musicality(audio, sr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
