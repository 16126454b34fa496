"""The benchmark regression gate: compare a pytest-benchmark run against a saved baseline.

    python -m bench.compare RUN.json [--baseline bench/baselines/<gpu>.json] [--threshold 0.10]
    python -m bench.compare RUN.json --save-baseline      # make RUN.json the baseline

Benchmarks are matched by name (pytest's fullname without the folder pytest ran from); the time
compared is the do_bench median extra_info["ms_p50"] (else pytest-benchmark's stats.median).
Exit 0: nothing more than --threshold slower (new and missing benchmarks are listed, never
fail); 1: some are (printed again as a second table); 2: nothing compared (unreadable file, two
GPU models, no baseline for this GPU yet: the message says how to save one). The default baseline
is bench/baselines/<slug of the GPU name>.json; a run on another GPU model is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

BASELINE_DIR = Path(__file__).resolve().parent / "baselines"
DEFAULT_THRESHOLD = 0.10

OK, SLOWER, FASTER, NEW, MISSING = "ok", "SLOWER", "faster", "new", "missing"


class CompareError(Exception):
    """Nothing can be compared (exit status 2); the message says why and what to do."""


@dataclass
class Row:
    name: str
    baseline_ms: float | None
    run_ms: float | None
    verdict: str

    @property
    def ratio(self) -> float | None:
        return self.run_ms / self.baseline_ms if self.run_ms is not None and (self.baseline_ms or 0) > 0 else None


# --------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------
def load_run(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: not a readable pytest-benchmark JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise CompareError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list); "
                           f"write one with `pytest bench --benchmark-only --benchmark-json {path.name}`")
    return data


def gpu_name(run: dict, source: str = "run") -> str | None:
    """The run's GPU model: machine_info["gpu_name"], else the benchmarks' extra_info["gpu_name"]
    (CPU-only benchmarks, like the data pipeline's, carry none). Several models in one run: error."""
    name = (run.get("machine_info") or {}).get("gpu_name")
    if name:
        return str(name)
    names = Counter(str(b["extra_info"]["gpu_name"]) for b in run["benchmarks"]
                    if (b.get("extra_info") or {}).get("gpu_name"))
    if len(names) > 1:
        listing = ", ".join(f"{n!r} ({c} benchmarks)" for n, c in names.most_common())
        raise CompareError(f"the {source} mixes benchmarks from several GPU models: {listing}")
    return next(iter(names), None)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the baseline's file name)."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-gpu"


def default_baseline_path(name: str) -> Path:
    return BASELINE_DIR / f"{slug(name)}.json"


def _shown(path: Path) -> str:
    """The path relative to the working directory when it lies below it."""
    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd().resolve())) if p.is_relative_to(Path.cwd().resolve()) else str(path)


def bench_key(bench: dict) -> str:
    """fullname without the directories before the file ('bench/test_x.py::t[p]' and
    'test_x.py::t[p]' are the same benchmark, whichever folder pytest was started from)."""
    full = bench.get("fullname") or bench.get("name") or "?"
    file_part, sep, rest = full.partition("::")
    return file_part.replace("\\", "/").rsplit("/", 1)[-1] + sep + rest


def median_ms(bench: dict) -> float | None:
    """The do_bench median extra_info['ms_p50'] when present, else stats.median (seconds) in ms."""
    for value, scale in (((bench.get("extra_info") or {}).get("ms_p50"), 1.0),
                         ((bench.get("stats") or {}).get("median"), 1e3)):
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return float(value) * scale
    return None


def _index(run: dict, source: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for bench in run["benchmarks"]:
        key = bench_key(bench)
        if key in out:
            raise CompareError(f"the {source} holds the benchmark {key} twice")
        out[key] = bench
    return out


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------
def compare(baseline: dict, run: dict, threshold: float = DEFAULT_THRESHOLD,
            min_delta_ms: float = 0.0, exclude: tuple[str, ...] = ()) -> list[Row]:
    """One row per benchmark of either file, in the baseline's order, then the new ones.

    SLOWER: run median > (1 + threshold) x baseline median, and slower by more than min_delta_ms:
    pytest-benchmark's own checks (--benchmark-compare-fail=median:<threshold>% and
    median:<min_delta>), applied to the do_bench medians of two saved runs (pytest-benchmark
    compares only during a run, and only its own wall-clock stats).
    faster: run median < (1 - threshold) x baseline median (informational: refresh the baseline).
    """
    from pytest_benchmark.utils import DifferenceRegressionCheck, PercentageRegressionCheck

    slower = PercentageRegressionCheck("median", threshold * 100)
    by_more = DifferenceRegressionCheck("median", min_delta_ms)
    base, new = _index(baseline, "baseline"), _index(run, "run")
    if exclude:
        keep = lambda key: not any(x in key for x in exclude)  # noqa: E731
        base = {k: v for k, v in base.items() if keep(k)}
        new = {k: v for k, v in new.items() if keep(k)}
    rows = []
    for key, b in base.items():
        b_ms = median_ms(b)
        if key not in new:
            rows.append(Row(key, b_ms, None, MISSING))
            continue
        r_ms = median_ms(new[key])
        if b_ms is None or r_ms is None:
            rows.append(Row(key, b_ms, r_ms, NEW if b_ms is None else MISSING))
            continue
        now, then = {"median": r_ms}, {"median": b_ms}
        verdict = SLOWER if slower.fails(now, then) and by_more.fails(now, then) else \
            FASTER if r_ms / b_ms < 1.0 - threshold else OK
        rows.append(Row(key, b_ms, r_ms, verdict))
    rows += [Row(key, None, median_ms(r), NEW) for key, r in new.items() if key not in base]
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("benchmark", "baseline ms", "run ms", "ratio", "verdict")
    ms = lambda x: "-" if x is None else f"{x:.4g}" if x < 1000 else f"{x:.1f}"  # noqa: E731
    cells = [(r.name, ms(r.baseline_ms), ms(r.run_ms),
              "-" if r.ratio is None else f"{r.ratio:.3f}", r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    line = lambda c: "  ".join(  # noqa: E731  (name left-aligned, numbers right-aligned)
        (v.ljust(w) if i in (0, 4) else v.rjust(w)) for i, (v, w) in enumerate(zip(c, widths))).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(c) for c in cells])


def _versions(run: dict) -> dict[str, str]:
    for b in run["benchmarks"]:
        info = b.get("extra_info") or {}
        if "torch" in info:
            return {k: str(info[k]) for k in ("torch", "triton", "git_sha") if k in info}
    return {}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare",
                                description="Fail when a benchmark got slower than its baseline "
                                            "(same GPU model only).")
    p.add_argument("run", help="pytest-benchmark JSON of this run (--benchmark-json)")
    p.add_argument("--baseline", help="baseline JSON (default: bench/baselines/<gpu slug>.json)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="fail when a median is more than this fraction slower (default 0.10)")
    p.add_argument("--min-delta-ms", type=float, default=0.0,
                   help="ignore slow-downs smaller than this many ms (timer noise on tiny "
                        "benchmarks; default 0)")
    p.add_argument("--exclude", action="append", default=[], metavar="SUBSTRING",
                   help="leave out benchmarks whose name contains SUBSTRING (repeatable), e.g. "
                        "test_data.py (host-bound, noisy)")
    p.add_argument("--save-baseline", action="store_true",
                   help="copy RUN to the baseline path (replacing it) instead of comparing")
    args = p.parse_args(argv)
    if not args.threshold >= 0:
        p.error("--threshold must be >= 0")
    return args


def main(argv=None) -> int:
    try:
        return _main(parse_args(argv))
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    run = load_run(args.run)
    if not run["benchmarks"]:
        raise CompareError(f"{args.run} holds no benchmarks (without a GPU every benchmark is "
                           f"skipped; run `pytest bench --benchmark-only` on the GPU)")
    run_gpu = gpu_name(run)
    if args.baseline:
        baseline_path = Path(args.baseline)
    elif run_gpu:
        baseline_path = default_baseline_path(run_gpu)
    else:
        raise CompareError(f"{args.run} names no GPU (no machine_info or extra_info 'gpu_name'), "
                           f"so there is no default baseline: pass --baseline PATH")

    if args.save_baseline:
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.run, baseline_path)
        print(f"saved {args.run} as the baseline {_shown(baseline_path)} "
              f"({len(run['benchmarks'])} benchmarks, GPU {run_gpu or 'unknown'})")
        return 0

    if not baseline_path.exists():
        raise CompareError(
            f"no baseline {_shown(baseline_path)} for GPU {run_gpu or 'unknown'} yet. Check this run is "
            f"sound, then make it the baseline: python -m bench.compare {args.run} --save-baseline"
            + (f" --baseline {baseline_path}" if args.baseline else ""))
    baseline = load_run(baseline_path)
    base_gpu = gpu_name(baseline, "baseline")
    if run_gpu and base_gpu and run_gpu != base_gpu:
        raise CompareError(f"refusing to compare runs from different GPU models: the run is on "
                           f"{run_gpu!r}, the baseline {_shown(baseline_path)} on {base_gpu!r}")
    if not (run_gpu and base_gpu):
        print(f"warning: the GPU model of the {'run' if not run_gpu else 'baseline'} is unknown; "
              f"comparing anyway", file=sys.stderr)

    rows = compare(baseline, run, args.threshold, args.min_delta_ms, tuple(args.exclude))
    vb, vr = _versions(baseline), _versions(run)
    print(f"run {args.run} vs baseline {_shown(baseline_path)} on {run_gpu or base_gpu or 'unknown GPU'}, "
          f"threshold {args.threshold:.0%}")
    if vb and vr and vb != vr:
        print("note: versions differ: baseline " + ", ".join(f"{k} {v}" for k, v in vb.items())
              + "; run " + ", ".join(f"{k} {v}" for k, v in vr.items()))
    print(format_table(rows))
    counts = Counter(r.verdict for r in rows)
    print("summary: " + ", ".join(f"{counts[v]} {v}" for v in (OK, SLOWER, FASTER, NEW, MISSING)
                                  if counts[v]))
    if counts[NEW] or counts[MISSING]:
        print("new/missing benchmarks do not fail the gate; refresh the baseline "
              "(--save-baseline) once the change is accepted")
    offenders = [r for r in rows if r.verdict == SLOWER]
    if offenders:
        print(f"\nFAIL: {len(offenders)} benchmark(s) more than {args.threshold:.0%} slower "
              f"than the baseline:")
        print(format_table(offenders))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
