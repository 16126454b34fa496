"""`python -m sashimi.decompress --checkpoint C IN.sash RESTORED.wav`: undo sashimi.compress,
bit-exact (see sashimi.codec)."""
from __future__ import annotations

import sys
from pathlib import Path

from sashimi import cli
from sashimi.cli import command, refuse_existing
from sashimi.codec import decompress


def parse_args(argv=None):
    p = cli.parser("sashimi.decompress", __doc__)
    p.add_argument("--checkpoint", required=True, help="the model the file was compressed with")
    p.add_argument("input", help="a .sash file")
    p.add_argument("output", help="the restored 16-bit PCM WAV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="the kind of device the file was compressed on (cpu or cuda)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes decoding groups of chunks side by side (default: the cores)")
    return p.parse_args(argv)


def run(args) -> int:
    from sashimi.cli import UserError, cores
    from sashimi.codec import run_interruptible
    out = Path(args.output)
    refuse_existing(out, args.overwrite)
    jobs = cores() if args.jobs is None else args.jobs
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")

    def decode() -> int:
        decompress(args.checkpoint, args.input, out, progress=not args.quiet, device=args.device, jobs=jobs,
                   overwrite=args.overwrite)
        return 0
    return run_interruptible("decompress", decode)


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
