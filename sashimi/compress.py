"""`python -m sashimi.compress --checkpoint C IN OUT.sash`: lossless coding with a trained SaShiMi
(see sashimi.codec). IN may be a folder: every WAV/FLAC/OGG in it is coded into OUT (a folder)."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from sashimi.cli import UserError, command, refuse_existing
from sashimi.codec import compress


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sashimi.compress", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the model (a checkpoint of sashimi.train)")
    p.add_argument("input", help="an audio file at the model's rate and channel count, or a folder of them")
    p.add_argument("output", help="the .sash file (a folder when the input is one)")
    p.add_argument("--chunk-seconds", type=float, default=1.0,
                   help="independent streams of this length (coded as one batch; damage loses one chunk)")
    p.add_argument("--report", help="write the per-file figures to this .json or .csv")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(args) -> int:
    from sashimi.data import AUDIO_SUFFIXES
    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"no audio files (.wav, .flac, .ogg) in {src}")
        jobs = [(f, dst / f.relative_to(src).with_suffix(".sash")) for f in files]
    else:
        jobs = [(src, dst)]
    if args.report and Path(args.report).suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--report must end in .json or .csv, got {args.report}")
    for _, out in jobs:
        refuse_existing(out, args.overwrite)
        if out.parent.exists() and not out.parent.is_dir():
            raise UserError(f"{out.parent} is a file, not a folder")
    reports = []
    for f, out in jobs:
        out.parent.mkdir(parents=True, exist_ok=True)
        reports.append(compress(args.checkpoint, f, out, args.chunk_seconds, progress=not args.quiet))
    if args.report:
        path = Path(args.report)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(reports, indent=2))
        else:
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, [k for k in reports[0] if k != "nll_bits_per_sample_per_channel"],
                                        extrasaction="ignore")
                writer.writeheader()
                writer.writerows(reports)
    return 0


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
