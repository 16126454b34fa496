"""Score audio with a trained SaShiMi as generation sees it: `python -m sashimi.evaluate`.

    python -m sashimi.evaluate --checkpoint RUN/checkpoint.pt --data DIR [--by-position]

NLL in bits per sample, overall and per channel (L / R, or mono), over whole files or long
excerpts of a folder of audio (`--data synthetic`: fresh clips of the built-in synthetic music,
unseen in training). Each excerpt is scored as ONE continuous sequence through the model's
exact recurrence, computed in parallel by `sashimi.prefill.prefill` (the state generation
runs on), starting, like an unconditional sample, from one frame of silence: every frame of
the excerpt is a target, the first one predicted from that silence.

`--by-position` also scores the same audio in fresh windows of the training length (the
excerpt tiled into windows of `seq_len` frames, each from a zero state: the condition the
model was trained in) and reports both by position, so the difference at a position is what
the long context does to the prediction there (length generalisation: ~0 when the model
generalises beyond its window; large and positive when it does not). It writes
`nll_by_position.csv`, a table on stdout and `nll_by_position.png` into `--out` (default:
`<checkpoint folder>/eval`); every run writes `summary.json` there.

Errors (a missing checkpoint or folder, no usable audio) are one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sashimi import checkpoint, cli
from sashimi.cli import (UserError, atomic_output, check_at_most, check_fits, check_out_dir, command,
                         refuse_existing, resolve_device)
from sashimi.model import LN2, ModelConfig, SaShiMi
from sashimi.s4 import S4Layer
from sashimi.session import Session

SYNTHETIC_SEED = 7_000_003   # the evaluation clips of `--data synthetic` (training uses seeds 0..)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Excerpt:
    name: str
    audio: torch.Tensor       # float32 (frames, C) at the model's rate


def synthetic_excerpts(cfg: ModelConfig, count: int, seconds: float) -> list[Excerpt]:
    """`count` clips of the built-in synthetic music, from a seed no training run uses."""
    from sashimi.data import SyntheticStereoMusic
    music = SyntheticStereoMusic(cfg.sample_rate, seconds_per_clip=seconds, clips=count, seed=SYNTHETIC_SEED)
    out = []
    for i in range(count):
        clip = music.clip(i)
        if cfg.channels == 1:
            clip = clip.mean(dim=1, keepdim=True)
        out.append(Excerpt(f"synthetic:{i}", clip))
    return out


def folder_excerpts(root: str, cfg: ModelConfig, seconds: float | None, offset: float,
                    per_file: int, min_frames: int) -> list[Excerpt]:
    """Excerpts of every audio file under `root`: `per_file` of `seconds` each, evenly spaced from
    `offset` (seconds=None: the whole file from `offset`). Unreadable and too-short files are
    skipped with one warning naming them."""
    from sashimi.data import AUDIO_SUFFIXES, DataError, audio_info, model_frames, read_audio
    path = Path(root)
    if not path.exists():
        raise UserError(f"--data: {root} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                 if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise UserError(f"--data: no audio files (.wav, .flac, .ogg) under {root}")
    sr = cfg.sample_rate
    excerpts, skipped = [], []
    for f in files:
        name = f.name if path.is_file() else f.relative_to(path).as_posix()
        try:
            n_file, rate, _ = audio_info(f)
            total = model_frames(n_file, rate, sr)
            first = int(round(offset * sr))
            avail = total - first
            want = avail if seconds is None else min(avail, int(round(seconds * sr)))
            if want < min_frames:
                skipped.append(f"{name} (too short: {max(avail, 0)} frames after the offset)")
                continue
            room = avail - want
            starts = [first + (room * k // max(1, per_file - 1) if per_file > 1 else 0) for k in range(per_file)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the mono-in-stereo note: the data module's own
                for k, s in enumerate(sorted(set(starts))):
                    audio = read_audio(f, sr, cfg.channels, s, want)
                    excerpts.append(Excerpt(name if per_file == 1 else f"{name}@{s / sr:.2f}s", audio))
        except DataError as exc:
            skipped.append(f"{name} ({' '.join(str(exc).split())})")
    listed = "; ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    if not excerpts:   # one line: the error says why each file was skipped
        raise UserError(f"--data: no usable audio under {root} (every file was unreadable or shorter "
                        f"than {min_frames} frames at {sr} Hz): {listed}")
    if skipped:
        print(f"warning: skipped {len(skipped)} of {len(files)} files: {listed}", file=sys.stderr)
    return excerpts


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def score_continuous(model: SaShiMi, tokens: torch.Tensor, block: int = 128) -> torch.Tensor:
    """NLL in bits of every token of `tokens` (B, T, C), scored as one sequence per row through
    the exact recurrence (prefill) after one frame of silence. Returns (B, T, C) float64."""
    B, T, C = tokens.shape
    if any(m.step_factors() is None for m in model.modules() if isinstance(m, S4Layer)):
        model.setup_step()            # (evaluate() sets it up once; call again after weight changes)
    session = Session(model, B, tokens.device, setup=False)
    frames = torch.cat([session.silence()[:, None], session.to_model(tokens.long())], 1)
    # the layout's positions; the outputs after the silent frame's last position on predict
    # the excerpt
    k = session.k
    positions = session.positions(frames)
    out = session.prefill(positions[:, :-1], return_all=True, block=block)
    seq = positions.view(B, -1, k)
    skip = C // k - 1
    nll = -model.log_prob_next(out[:, skip:], seq[:, skip + 1:]) / LN2
    return nll.double().reshape(B, T, C)


@torch.no_grad()
def score_windows(model: SaShiMi, tokens: torch.Tensor, window: int, block: int = 128,
                  max_batch: int = 64) -> torch.Tensor:
    """The same targets as `score_continuous`, but each run of `window` frames scored from a zero
    state (after one silent frame), as in training: no context beyond the window."""
    B, T, C = tokens.shape
    n = math.ceil(T / window)
    pad = n * window - T
    x = torch.nn.functional.pad(tokens, (0, 0, 0, pad)).reshape(B * n, window, C)
    parts = [score_continuous(model, x[i:i + max_batch], block) for i in range(0, B * n, max_batch)]
    return torch.cat(parts).view(B, n * window, C)[:, :T]


def position_bins(frames: int, window: int, sr: int, n_fine: int = 64) -> tuple[list, list]:
    """(table bins, plot bins) as (start, end) frame ranges. Table: the first window, then
    doubling multiples of it (1-2x, 2-4x, ...), then the last second when the excerpt is >= 2 s
    long. Plot: about n_fine equal bins, each a whole number of windows or a fraction of one."""
    table, a, b = [(0, min(window, frames))], window, 2 * window
    while a < frames:
        table.append((a, min(b, frames)))
        a, b = b, 2 * b
    if frames >= 2 * sr:
        table.append((frames - sr, frames))
    width = max(1, frames // n_fine)
    fine = [(s, min(s + width, frames)) for s in range(0, frames, width)]
    return table, fine


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def evaluate(model: SaShiMi, excerpts: list[Excerpt], by_position: bool, block: int = 128,
             progress: bool = True) -> dict:
    """Score every excerpt; returns per-excerpt and by-position results (numpy arrays)."""
    cfg = model.cfg
    quantizer = cfg.quantizer
    device = model.embedding.weight.device
    model.setup_step()
    cont, wind = [], []
    t0 = time.perf_counter()
    for i, ex in enumerate(excerpts):
        tok = quantizer.encode(ex.audio.to(device)).unsqueeze(0)
        cont.append(score_continuous(model, tok, block)[0].cpu().numpy())
        if by_position:
            wind.append(score_windows(model, tok, cfg.seq_len, block)[0].cpu().numpy())
        if progress:
            print(f"\r  scored {i + 1}/{len(excerpts)} excerpts ({time.perf_counter() - t0:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return dict(continuous=cont, windows=wind if by_position else None)


def channel_names(cfg: ModelConfig) -> list[str]:
    """The channels the model predicts (its layout's: L, R; M, S; mono)."""
    return cfg.layout.channel_names


def summarise(cfg: ModelConfig, excerpts: list[Excerpt], scores: dict) -> dict:
    """Overall and per-channel means (over all samples) and their standard errors (over
    excerpts), and the NLL by position."""
    C, sr, W = cfg.channels, cfg.sample_rate, cfg.seq_len
    names = channel_names(cfg)
    cont = scores["continuous"]
    per_excerpt = np.array([c.mean() for c in cont])
    weights = np.array([c.shape[0] for c in cont], dtype=np.float64)
    allc = np.concatenate(cont, 0)                       # (sum T, C)
    n = len(cont)
    se = float(per_excerpt.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    summary = dict(
        checkpoint_config=cfg.to_dict(), excerpts=n, frames=int(weights.sum()),
        seconds=float(weights.sum() / sr), bits=float(allc.mean()), bits_se=se,
        per_channel={nm: float(allc[:, c].mean()) for c, nm in enumerate(names)},
        per_channel_se={nm: (float(np.array([x[:, c].mean() for x in cont]).std(ddof=1) / math.sqrt(n))
                             if n > 1 else float("nan")) for c, nm in enumerate(names)},
        training_window_frames=W,
        per_excerpt={ex.name: float(v) for ex, v in zip(excerpts, per_excerpt)},
    )
    wind = scores.get("windows")
    if wind is not None:
        T = max(c.shape[0] for c in cont)
        table, fine = position_bins(T, W, sr)

        def rows(bins):
            out = []
            for a, b in bins:
                cs = [c[a:b] for c in cont if c.shape[0] > a]
                ws = [w[a:b] for w in wind if w.shape[0] > a]
                cc, ww = np.concatenate(cs, 0), np.concatenate(ws, 0)
                row = dict(start_s=a / sr, end_s=b / sr, continuous=_mean(cc), windows=_mean(ww),
                           gap=_mean(cc) - _mean(ww), samples=int(cc.size))
                for c, nm in enumerate(names):
                    row[f"continuous_{nm}"] = _mean(cc[:, c])
                    row[f"windows_{nm}"] = _mean(ww[:, c])
                out.append(row)
            return out

        summary["by_position"] = rows(table)
        summary["by_position_fine"] = rows(fine)
        allw = np.concatenate(wind, 0)
        summary["windows_bits"] = float(allw.mean())
        first = np.concatenate([c[:W] for c in cont], 0)
        summary["in_window_bits"] = float(first.mean())
        if T >= 2 * sr:
            last = np.concatenate([c[-sr:] for c in cont if c.shape[0] >= 2 * sr], 0)
            lastw = np.concatenate([w[-sr:] for w in wind if w.shape[0] >= 2 * sr], 0)
            summary["last_second_bits"] = float(last.mean())
            summary["last_second_windows_bits"] = float(lastw.mean())
            summary["last_second_gap"] = float(last.mean() - lastw.mean())
    return summary


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def format_table(summary: dict, names: list[str]) -> str:
    head = f"{'position (s)':>15} {'continuous':>10} {'windows':>8} {'gap':>7} " + \
           " ".join(f"{'cont ' + nm:>7}" for nm in names)
    lines = [head]
    for r in summary["by_position"]:
        span = f"{r['start_s']:.3f}-{r['end_s']:.3f}"
        lines.append(f"{span:>15} {r['continuous']:>10.3f} {r['windows']:>8.3f} {r['gap']:>+7.3f} "
                     + " ".join(f"{r['continuous_' + nm]:>7.3f}" for nm in names))
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], overwrite: bool = True) -> None:
    import csv
    with atomic_output(path, overwrite) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path: Path, summary: dict, names: list[str], title: str, overwrite: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["by_position_fine"]
    x = [(r["start_s"] + r["end_s"]) / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(x, [r["continuous"] for r in rows], "-", color="C0", lw=2, label="continuous (what generation sees)")
    ax.plot(x, [r["windows"] for r in rows], "-", color="C2", lw=2, label="fresh training-length windows")
    if len(names) == 2:
        for nm, style in zip(names, (":", "--")):
            ax.plot(x, [r[f"continuous_{nm}"] for r in rows], style, color="C0", lw=1, label=f"continuous, {nm}")
    W = summary["training_window_frames"] / summary["checkpoint_config"]["sample_rate"]
    ax.axvline(W, color="k", lw=0.8, ls="--", label=f"training window ({W * 1000:.0f} ms)")
    ax.set_xlabel("position in the excerpt (s)")
    ax.set_ylabel("NLL (bits / sample)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path, overwrite) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("sashimi.evaluate", __doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by sashimi.train")
    p.add_argument("--data", default="synthetic",
                   help="folder (or file) of WAV/FLAC/OGG audio, or 'synthetic': fresh clips of the built-in music")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="excerpt length in seconds (0: whole files); shorter files are scored whole")
    p.add_argument("--offset", type=float, default=0.0, help="where excerpts start in each file (seconds)")
    p.add_argument("--excerpts-per-file", type=int, default=1, help="excerpts per file, evenly spaced")
    p.add_argument("--clips", type=int, default=8, help="with --data synthetic: how many clips")
    p.add_argument("--by-position", action="store_true",
                   help="NLL by position, continuous vs fresh training-length windows (table, CSV, PNG)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--block", type=int, default=128, help="prefill block size")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    return p.parse_args(argv)


MAX_SECONDS = 24 * 3600       # an excerpt longer than a day is a typo
MAX_EXCERPTS = 100_000


def check_args(args) -> None:
    """Flags a user can get wrong: one line each (NaN, inf and '' are refused by run_cli)."""
    if args.seconds < 0 or args.offset < 0 or args.excerpts_per_file < 1 or args.clips < 1 or args.block < 1:
        raise UserError("--seconds and --offset must be >= 0, --excerpts-per-file, --clips and --block >= 1")
    if args.data == "synthetic" and args.seconds == 0:
        raise UserError("--data synthetic needs --seconds > 0")
    check_at_most("--seconds", args.seconds, MAX_SECONDS)
    check_at_most("--offset", args.offset, MAX_SECONDS)
    check_at_most("--excerpts-per-file", args.excerpts_per_file, MAX_EXCERPTS)
    check_at_most("--clips", args.clips, MAX_EXCERPTS)
    check_at_most("--block", args.block, 1 << 16)


def check_eval_fits(args, cfg: ModelConfig, device: torch.device) -> None:
    """Excerpts are held as audio, tokens and per-sample scores (16 bytes a sample, twice that
    --by-position): at least --clips (synthetic) or --excerpts-per-file (one file) of them."""
    count = args.clips if args.data == "synthetic" else args.excerpts_per_file
    per_sample = 16 * (2 if args.by_position else 1) * cfg.channels
    check_fits({"excerpts (--seconds x --clips / --excerpts-per-file)":
                count * args.seconds * cfg.sample_rate * per_sample}, device, "this evaluation")


def check_finite_scores(excerpts: list, scores: dict) -> None:
    """A NaN or infinite NLL means the model computes non-finite probabilities: one line, no
    output, instead of "NLL nan" with exit 0."""
    for kind in ("continuous", "windows"):
        for ex, nll in zip(excerpts, scores.get(kind) or []):
            if not np.isfinite(nll).all():
                raise UserError(f"the model's NLL of {ex.name} is not finite ({kind} scoring): it computes "
                                f"non-finite probabilities (a diverged or damaged model); nothing written")


def run(args) -> int:
    check_args(args)
    device = resolve_device(args.device)
    model = checkpoint.load_model(args.checkpoint, device)[0]
    cfg = model.cfg
    check_eval_fits(args, cfg, device)
    if args.data == "synthetic":
        excerpts = synthetic_excerpts(cfg, args.clips, args.seconds)
    else:
        excerpts = folder_excerpts(args.data, cfg, args.seconds or None, args.offset,
                                   args.excerpts_per_file, min_frames=2)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    check_out_dir(out)
    outputs = ["summary.json"] + (["nll_by_position.csv", "nll_by_position.png"] if args.by_position else [])
    for name in outputs:
        refuse_existing(out / name, args.overwrite)
    t0 = time.perf_counter()
    scores = evaluate(model, excerpts, args.by_position, args.block, progress=not args.quiet)
    check_finite_scores(excerpts, scores)
    summary = summarise(cfg, excerpts, scores)
    summary["data"] = args.data
    summary["eval_seconds"] = time.perf_counter() - t0
    names = channel_names(cfg)
    print(f"{summary['excerpts']} excerpts, {summary['seconds']:.1f} s of audio, "
          f"training window {cfg.seq_len} frames ({cfg.seq_len / cfg.sample_rate * 1000:.0f} ms)")
    print(f"NLL {summary['bits']:.3f} bits/sample (s.e. {summary['bits_se']:.3f} over excerpts); "
          + ", ".join(f"{nm} {summary['per_channel'][nm]:.3f}" for nm in names))
    if args.by_position:
        print(format_table(summary, names))
        if "last_second_gap" in summary:
            print(f"in-window (first {cfg.seq_len} frames) {summary['in_window_bits']:.3f}; last second: "
                  f"continuous {summary['last_second_bits']:.3f} vs fresh windows "
                  f"{summary['last_second_windows_bits']:.3f} (gap {summary['last_second_gap']:+.3f})")
        write_csv(out / "nll_by_position.csv", summary["by_position_fine"], args.overwrite)
        try:
            plot(out / "nll_by_position.png", summary, names,
                 f"{Path(args.checkpoint).name}: {args.data} ({summary['excerpts']} excerpts)", args.overwrite)
            print(f"wrote {out / 'nll_by_position.csv'}, {out / 'nll_by_position.png'}")
        except ImportError:   # matplotlib comes with the [dev] extra (scripts/setup.sh installs it)
            print(f"wrote {out / 'nll_by_position.csv'}; no PNG: matplotlib is not installed "
                  f"(pip install matplotlib)", file=sys.stderr)
    with atomic_output(out / "summary.json", args.overwrite) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out / 'summary.json'}")
    return 0


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
