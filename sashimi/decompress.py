"""`python -m sashimi.decompress --checkpoint C IN.sash RESTORED.wav`: undo sashimi.compress,
bit-exact (see sashimi.codec)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sashimi.cli import UserError, run_cli
from sashimi.codec import decompress


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sashimi.decompress", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the model the file was compressed with")
    p.add_argument("input", help="a .sash file")
    p.add_argument("output", help="the restored 16-bit PCM WAV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="the kind of device the file was compressed on (cpu or cuda)")
    return p.parse_args(argv)


def run(args) -> int:
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists (pass --overwrite to replace it)")
    decompress(args.checkpoint, args.input, out, progress=not args.quiet, device=args.device)
    return 0


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
