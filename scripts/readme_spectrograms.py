"""The README's two pictures: the quickstart's sample beside the music it was trained on.

    bash scripts/quickstart.sh                    # writes runs/quickstart/{checkpoint.pt,samples/}
    python scripts/readme_spectrograms.py [--run runs/quickstart] [--out docs]

Writes OUT/quickstart-sample.png (the first sample in RUN/samples) and OUT/quickstart-data.png
(the first 2 s of clip 0 of the built-in music, at the model's rate, written through the
model's own quantiser, as the model saw it in training), each with its musicality score.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/quickstart", help="the quickstart's run folder")
    p.add_argument("--out", default="docs", help="where the PNGs go")
    args = p.parse_args(argv)

    from sashimi import checkpoint
    from sashimi.data import SyntheticStereoMusic
    from sashimi.musicality import musicality, read
    from sashimi.spectrogram import require_matplotlib, write_png
    require_matplotlib()
    run = Path(args.run)
    wavs = sorted((run / "samples").glob("*.wav"))
    if not wavs:
        sys.exit(f"error: no WAV in {run / 'samples'}: run bash scripts/quickstart.sh first")
    model, _ = checkpoint.load_model(run / "checkpoint.pt")
    cfg = model.cfg
    sample, sr = read(wavs[0])
    if sr != cfg.sample_rate:
        sys.exit(f"error: {wavs[0]} is at {sr} Hz, the checkpoint's model at {cfg.sample_rate} Hz")
    q = cfg.quantizer
    clip = SyntheticStereoMusic(sr, seconds_per_clip=4.0, seed=0).clip(0)
    data = q.decode(q.encode(clip)).double().numpy()[:sample.shape[0]]
    out = Path(args.out)
    for name, audio, title in (
            ("quickstart-data.png", data, f"the training music (built-in, clip 0), {sr} Hz {cfg.bits}-bit {cfg.quantization}"),
            ("quickstart-sample.png", sample, f"the quickstart's sample ({wavs[0].name})")):
        path = write_png(out / name, audio, sr, title)
        m = musicality(audio, sr)
        print(f"{path}: musicality {m.score:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
