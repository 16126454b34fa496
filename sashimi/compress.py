"""`python -m sashimi.compress --checkpoint C IN OUT.sash`: lossless coding with a trained SaShiMi
(see sashimi.codec). IN may be a folder: every WAV/FLAC/OGG in it is coded into OUT (a folder)."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from sashimi import cli
from sashimi.cli import UserError, command, refuse_existing
from sashimi.codec import atomic_write, compress_files, writable_path


def parse_args(argv=None):
    p = cli.parser("sashimi.compress", __doc__)
    p.add_argument("--checkpoint", required=True, help="the model (a checkpoint of sashimi.train)")
    p.add_argument("input", help="an audio file at the model's rate and channel count, or a folder of them")
    p.add_argument("output", help="the .sash file (a folder when the input is one)")
    p.add_argument("--chunk-seconds", type=float, default=None,
                   help="independent contexts of this length, coded in batches (shorter: a wider, faster "
                        "batch; longer: more context, smaller files); default: chosen from the file's length "
                        "and --jobs (chunks of >= 1024 frames, >= 1 s for a model on the cascade predictor, which "
                        "restarts with each chunk; batches of up to 2048 chunks)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: decompress must use the same kind of device")
    p.add_argument("--report", help="write the per-file figures to this .json or .csv")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes coding groups of chunks side by side (default: the cores)")
    p.add_argument("--no-flac", action="store_true",
                   help="with --report: leave out FLAC's size of each file (the comparison is only made "
                        "for a report)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(args) -> int:
    from sashimi.cli import cores
    from sashimi.codec import run_interruptible
    from sashimi.data import AUDIO_SUFFIXES
    src, dst = Path(args.input), Path(args.output)
    jobs = cores() if args.jobs is None else args.jobs
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"no audio files (.wav, .flac, .ogg) in {src}")
        pairs = [(f, dst / f.relative_to(src).with_suffix(".sash")) for f in files]
    else:
        pairs = [(src, dst)]
    if args.report and Path(args.report).suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--report must end in .json or .csv, got {args.report}")
    for _, out in pairs:
        refuse_existing(out, args.overwrite)
        writable_path(out)
    if args.report:
        refuse_existing(Path(args.report), args.overwrite)
        writable_path(Path(args.report))
    flac = bool(args.report) and not args.no_flac

    def code() -> int:
        from sashimi.codec import load_model
        loaded = load_model(args.checkpoint, args.device)   # once for every file
        reports = compress_files(args.checkpoint, pairs, args.chunk_seconds, progress=not args.quiet,
                                 loaded=loaded, jobs=jobs, overwrite=args.overwrite, flac=flac)
        if args.report:
            atomic_write(Path(args.report), _report_bytes(reports, Path(args.report).suffix.lower()), args.overwrite)
        if len(reports) > 1:
            samples = sum(r["frames"] * r["channels"] for r in reports)
            ours = sum(8 * r["bytes"] for r in reports) / samples
            line = f"{len(reports)} files: {ours:.3f} bits/sample"
            if flac:
                theirs = sum(8 * r["flac_bytes"] for r in reports) / samples
                line += f", {reports[0]['flac']} {theirs:.3f} ({ours / theirs:.3f}x of it)"
            print(line)
        return 0
    return run_interruptible("compress", code)


def _report_bytes(reports: list[dict], suffix: str) -> bytes:
    if suffix == ".json":
        return json.dumps(reports, indent=2).encode()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, [k for k in reports[0] if k != "nll_bits_per_sample_per_channel"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(reports)
    return buf.getvalue().encode()


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
