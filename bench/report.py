"""Regenerate the measured part of BENCHMARKS.md from one pytest-benchmark run.

    pytest bench --benchmark-only --benchmark-json run.json      # on the GPU
    python -m bench.report run.json [--out BENCHMARKS.md] [--plots-dir bench/plots]

It writes only between the markers `<!-- bench.report:begin -->` and `<!-- bench.report:end -->`
of the output file, so the hand-written sections around them (and the static gate's table, which
scripts/aot_check.py writes between its own markers) survive; a file without the markers gets
the generated part appended inside a new pair, a missing file is created.

Everything measured comes from run.json: the device, versions and date, and per benchmark the
do_bench median (extra_info ms_p50, p20-p80) that bench/_common.run records. What is not
measured is fixed here: the anchors (the public S4 / SaShiMi on an H100, /work/shared
anchors.md), the targets (design.md) and the floors table (the static part of BENCHMARKS.md,
computed from the H100's ceilings before any measurement).

Sections: kernels (one row per op, direction, shape, dtype and non-reference provider: median,
the matching reference's median, speed-up, GFLOP/s or GB/s, fraction of the floor, anchor,
target), the training step (tokens/s, peak GiB), generation (steps/s, samples/s), the data
pipeline, then the floors. Plots (kernel time vs L for cauchy and vandermonde with the anchors,
generation throughput vs batch) are written when matplotlib is installed, else skipped with a
note.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path

# --------------------------------------------------------------------------------------------
# fixed figures: anchors.md (H100 80GB HBM3, torch 2.11.0+cu130, 2026-11-25) and design.md
# --------------------------------------------------------------------------------------------
# The kernel anchors and targets are declared once, in the op registry (kernels/ops.py).
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
from kernels.ops import OPS  # noqa: E402

# (op, direction, B, L) -> (S4 CUDA extension ms, naive PyTorch ms or None); N = 32 pairs
KERNEL_ANCHORS = {(op, d, spec.bench[name]["B"], spec.bench[name]["L"]): (ms, spec.naive_anchors.get((d, name)))
                  for op, spec in OPS.items() for (d, name), ms in spec.anchors.items()}
# (op, direction, B, L) -> target ms (design.md), for the triton provider
KERNEL_TARGET_MS = {(op, d, spec.bench[name]["B"], spec.bench[name]["L"]): ms
                    for op, spec in OPS.items() for (d, name), ms in spec.targets.items()}
EMBED_ANCHOR_SHAPE = dict(B=16, L=64000, C=2, D=64)      # design.md's embed_interleave targets
EMBED_FWD_FRACTION = 0.8                                  # >= 80% of copy bandwidth (bf16)
EMBED_BWD_SPEEDUP = 5.0                                   # >= 5x nn.Embedding's backward

TRAIN_ANCHOR = dict(tokens_per_s=1.00e6, peak_gib=8.36)   # public SaShiMi, mono B=8 x 16384
TRAIN_TARGET = dict(tokens_per_s=3.0e6, peak_gib=6.0)
GEN_ANCHOR_SAMPLES = {1: 248.0, 16: 3318.0, 256: 44404.0}  # public, "diagonal", mono
GEN_TARGET_STEPS = {1: 32000.0}                           # 16 kHz stereo in real time
GEN_TARGET_SAMPLES = {256: 2.0e6}
DATA_TARGET_TOKENS = 30e6

CEILINGS = ("H100 ceilings (shared/anchors.md, measured 2026-11-25): fp32 51.6 TFLOP/s "
            "(25.8 T FMA/s), device copy 3.0 TB/s (bytes read + written).")

# The floors table of BENCHMARKS.md (written before any GPU measurement): kept as it is.
FLOORS = """\
## Floors (before tuning)

| op | size | work counted | floor | target | anchor (public S4/SaShiMi, H100) |
|---|---|---|---|---|---|
| cauchy fwd | B=1024, N/2=32, L=16384 | 537 M conjugate-pair terms; the pair folded into one fraction (a z - b)/(z^2 - c z + d): ~13 fp32 FMA-class instructions + 1 reciprocal per term | ~0.2-0.27 ms | <= 0.25 ms | 0.724 ms |
| cauchy fwd+bwd | same | backward: two complex reciprocals and their squares per term (~2x forward) | ~0.6-0.8 ms | <= 1.0 ms | 2.49 ms |
| vandermonde fwd | B=1024, N/2=32, L=16384 | 537 M terms; exp once per block, then one complex multiply-add (~6 instructions) per term | ~0.1 ms | <= 0.15 ms | 0.487 ms |
| vandermonde fwd+bwd | same | backward: two sums over l per (b, n) (grad v, grad x) | ~0.3 ms | <= 0.6 ms | 1.39 ms |
| embed_interleave fwd | B=16, L=64000, C=2, D=64, bf16 out | 2.048 M rows x (8 B token + 128 B row written); the 256-row table stays in L2 | 93 us (fp32 out: 180 us) | >= 80% of copy bandwidth | PyTorch view + embedding |
| embed_interleave bwd | same, fp32 grad in | 2.048 M rows x (256 B read + 8 B token) | 180 us | >= 5x faster than `nn.Embedding` backward | PyTorch embedding backward |
| training step | paper, mono B=8 x L=16384 | dense layers ~1.2 MFLOP/token forward (tiers of H = 64, 128, 256 at L, L/4, L/16), x3 with backward: 0.47 TFLOP/step | ~9 ms fp32 (14 M tokens/s) | >= 3.0 M tokens/s, <= 6 GiB | 1.00 M tokens/s, 8.36 GiB |
| generation step | paper, batch 1 | 0.8 MB of weights per tier-0 step (L2-resident); launch-bound: 1.18 us per kernel in a CUDA graph | ~31 us/step budget = ~25 kernels or one persistent kernel | >= 32,000 steps/s | 248 samples/s |
| generation step | paper, batch 256 | 0.3 GFLOP per step | ~6 us compute; budget 128 us/step | >= 2,000,000 samples/s | 44,404 samples/s |
"""

OP_ORDER = list(OPS)
DIRECTION_ORDER = ["fwd", "fwdbwd", "bwd"]
SPECIAL_OPS = ("train_step", "generation", "data")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def median_ms(bench: dict) -> float | None:
    info = bench.get("extra_info") or {}
    ms = _num(info.get("ms_p50"))
    if ms is not None:
        return ms
    med = _num((bench.get("stats") or {}).get("median"))
    return None if med is None else med * 1e3


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.3g}" if ms < 10 else f"{ms:.1f}"
    return f"{ms:.3g}"


def fmt_big(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    return f"{x:,.0f}"


def fmt_shape(shape) -> str:
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return str(shape)


def yes_no(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _order(value: str, order: list[str]) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def _date(stamp) -> str:
    """pytest-benchmark's ISO datetime as '2026-11-25 12:34 UTC' (as given if unparsable)."""
    from datetime import datetime, timezone
    try:
        dt = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp or "?")
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M") + (" UTC" if dt.tzinfo is not None else "")


def run_meta(run: dict) -> dict:
    """Device, versions, date and commit of a run."""
    mi = run.get("machine_info") or {}
    infos = [b.get("extra_info") or {} for b in run.get("benchmarks", [])]
    first = lambda key: next((i[key] for i in infos if i.get(key)), None)  # noqa: E731
    ci = run.get("commit_info") or {}
    sha = first("git_sha") or ci.get("id")
    if sha and ci.get("dirty"):
        sha += " (uncommitted changes)"
    return dict(gpu=mi.get("gpu_name") or first("gpu_name") or "unknown GPU",
                torch=first("torch") or "?", triton=first("triton") or "?",
                python=mi.get("python_version") or "?",
                cpu=(mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "?",
                date=_date(run.get("datetime")), sha=sha or "?",
                pytest_benchmark=str(run.get("version") or "?"))


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
def _kernel_key(info: dict) -> tuple:
    return (info.get("op"), info.get("direction"), json.dumps(info.get("shape"), sort_keys=False),
            info.get("dtype"))


def _baseline_provider(provider: str, providers: dict) -> str | None:
    """triton_graph -> reference_graph, other providers -> reference (when measured)."""
    if provider.startswith("triton"):
        twin = "reference" + provider[len("triton"):]
        if twin in providers:
            return twin
    return "reference" if "reference" in providers else None


def _kernel_target(op, direction, shape, dtype, provider, ms, info, providers) -> tuple[str, bool | None]:
    """(target text, met?) for the design.md kernel targets; ('', None) where none applies."""
    B, L = shape.get("B"), shape.get("L")
    if (op, direction, B, L) in KERNEL_TARGET_MS and provider == "triton":
        t = KERNEL_TARGET_MS[(op, direction, B, L)]
        return f"<= {t:g} ms", ms <= t
    anchor_shape = all(shape.get(k) == v for k, v in EMBED_ANCHOR_SHAPE.items())
    if op == "embed_interleave" and anchor_shape and provider == "triton":
        if direction == "fwd" and dtype == "bf16":
            frac = _num(info.get("fraction_of_floor"))
            return f">= {EMBED_FWD_FRACTION:.0%} of floor", None if frac is None else frac >= EMBED_FWD_FRACTION
        if direction == "bwd":
            torch_ms = median_ms(providers["torch"]) if "torch" in providers else None
            if torch_ms is None:
                return f">= {EMBED_BWD_SPEEDUP:g}x torch", None
            return f">= {EMBED_BWD_SPEEDUP:g}x torch ({torch_ms / ms:.1f}x)", torch_ms / ms >= EMBED_BWD_SPEEDUP
    return "", None


def kernel_rows(benches: list[dict]) -> list[list[str]]:
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("op") in SPECIAL_OPS or not info.get("op"):
            continue
        groups.setdefault(_kernel_key(info), {})[str(info.get("provider", "?"))] = b
    keys = sorted(groups, key=lambda k: (_order(str(k[0]), OP_ORDER), _order(str(k[1]), DIRECTION_ORDER)))
    rows = []
    for key in keys:
        op, direction, _, dtype = key
        providers = groups[key]
        for provider, b in providers.items():
            if provider.startswith("reference"):
                continue
            info = b.get("extra_info") or {}
            shape = info.get("shape") if isinstance(info.get("shape"), dict) else {}
            ms = median_ms(b)
            base = _baseline_provider(provider, providers)
            base_ms = median_ms(providers[base]) if base else None
            p20, p80 = _num(info.get("ms_p20")), _num(info.get("ms_p80"))
            spread = f" ({fmt_ms(p20)}-{fmt_ms(p80)})" if p20 is not None and p80 is not None else ""
            rates = []
            if _num(info.get("gflops")) is not None:
                rates.append(f"{info['gflops']:,.0f} GFLOP/s")
            if _num(info.get("gbps")) is not None:
                rates.append(f"{info['gbps']:,.0f} GB/s")
            if _num(info.get("us_per_step")) is not None:
                rates.append(f"{info['us_per_step']:.3g} us/step")
            frac = _num(info.get("fraction_of_floor"))
            anchor = KERNEL_ANCHORS.get((op, direction, shape.get("B"), shape.get("L")))
            anchor_txt, vs_anchor = "-", "-"
            if anchor:
                anchor_txt = f"S4 ext {anchor[0]:g} ms" + (f", naive {anchor[1]:g} ms" if anchor[1] else "")
                if ms:
                    vs_anchor = f"{anchor[0] / ms:.2f}x"
            target, met = _kernel_target(op, direction, shape, dtype, provider, ms, info, providers)
            rows.append([str(op), str(direction), fmt_shape(shape), str(dtype), provider,
                         fmt_ms(ms) + spread,
                         f"{fmt_ms(base_ms)}" + (f" ({base})" if base and base != "reference" else ""),
                         f"{base_ms / ms:.1f}x" if base_ms and ms else "-",
                         ", ".join(rates) or "-", f"{frac:.0%}" if frac is not None else "-",
                         anchor_txt, vs_anchor, target or "-", yes_no(met)])
    return rows


def train_rows(benches: list[dict]) -> list[list[str]]:
    rows = []
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("op") != "train_step":
            continue
        shape = info.get("shape") or {}
        ms = median_ms(b)
        tps = _num(info.get("tokens_per_s"))
        if tps is None and ms:
            tps = shape.get("B", 0) * shape.get("L", 0) * shape.get("C", 1) / (ms * 1e-3)
        peak = _num(info.get("peak_gib"))
        a_tps, a_peak = _num(info.get("anchor_tokens_per_s")), _num(info.get("anchor_peak_gib"))
        t_tps, t_peak = _num(info.get("target_tokens_per_s")), _num(info.get("target_peak_gib"))
        anchor = f"{fmt_big(a_tps)} tokens/s, {a_peak:g} GiB" if a_tps and a_peak else "-"
        target, met = "-", None
        if t_tps and t_peak:
            target = f">= {fmt_big(t_tps)} tokens/s, <= {t_peak:g} GiB"
            if tps is not None and peak is not None:
                met = tps >= t_tps and peak <= t_peak
        rows.append([str(info.get("preset", "?")),
                     f"B={shape.get('B')} x L={shape.get('L')} x C={shape.get('C')}",
                     str(info.get("dtype", "?")), str(info.get("provider", "?")), fmt_ms(ms),
                     fmt_big(tps), f"{peak:.2f}" if peak is not None else "-",
                     f"{tps / a_tps:.2f}x" if tps and a_tps else "-", anchor, target, yes_no(met)])
    return rows


def _channels_label(C, layout) -> str:
    if C != 2:
        return "mono"
    return "stereo-frames" if layout == "frames" else "stereo"


def generation_rows(benches: list[dict]) -> list[list[str]]:
    rows = []
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("op") != "generation":
            continue
        batch = info.get("batch") or (info.get("shape") or {}).get("B")
        C = info.get("channels") or (info.get("shape") or {}).get("C") or 1
        steps, samples = _num(info.get("steps_per_s")), _num(info.get("samples_per_s"))
        anchor = _num(info.get("anchor_samples_per_s"))
        t_steps, t_samples = _num(info.get("target_steps_per_s")), _num(info.get("target_samples_per_s"))
        targets, met = [], []
        if t_steps:
            targets.append(f">= {t_steps:,.0f} steps/s")
            met.append(steps is not None and steps >= t_steps)
        if t_samples:
            targets.append(f">= {t_samples:,.0f} samples/s")
            met.append(samples is not None and samples >= t_samples)
        rt = _num(info.get("realtime_factor"))
        rows.append([str(info.get("preset", "?")), _channels_label(C, info.get("stereo_layout")), str(batch),
                     str(info.get("provider", "?")),
                     f"{info['us_per_step']:.1f}" if _num(info.get("us_per_step")) else "-",
                     f"{steps:,.0f}" if steps else "-", f"{samples:,.0f}" if samples else "-",
                     f"{rt:.3g}x" if rt else "-",
                     f"{anchor:,.0f} ({samples / anchor:.1f}x)" if anchor and samples else "-",
                     "; ".join(targets) or "-", yes_no(all(met) if met else None)])
    return rows


def data_rows(benches: list[dict]) -> list[list[str]]:
    rows = []
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("op") != "data":
            continue
        shape = info.get("shape") or {}
        tps = _num(info.get("tokens_per_s"))
        rows.append([str(shape.get("format", "?")), f"{shape.get('file_rate', '?')} -> {shape.get('model_rate', '?')} Hz",
                     str(info.get("provider", "?")), str(info.get("cpu_count", "?")),
                     fmt_ms(_num(info.get("ms_per_batch"))), fmt_big(tps),
                     f"{tps / DATA_TARGET_TOKENS:.0%}" if tps else "-"])
    return rows


# --------------------------------------------------------------------------------------------
# plots (only with matplotlib)
# --------------------------------------------------------------------------------------------
def make_plots(benches: list[dict], plots_dir: Path) -> list[tuple[str, Path]]:
    """Write the PNGs; returns [(title, path)]. Needs matplotlib (the caller checks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in ("cauchy", "vandermonde"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        any_data = False
        for ax, direction in zip(axes, ("fwd", "fwdbwd")):
            series: dict[tuple, list] = {}
            for b in benches:
                info = b.get("extra_info") or {}
                shape = info.get("shape") or {}
                if info.get("op") != op or info.get("direction") != direction or "L" not in shape:
                    continue
                ms = median_ms(b)
                if ms:
                    series.setdefault((info.get("provider"), shape.get("B")), []).append((shape["L"], ms))
            for (provider, B), pts in sorted(series.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if provider == "triton" else "--", label=f"{provider} B={B}")
                any_data = True
            anchors: dict[int, list] = {}
            for (a_op, a_dir, B, L), (ext_ms, _naive) in KERNEL_ANCHORS.items():
                if a_op == op and a_dir == direction:
                    anchors.setdefault(B, []).append((L, ext_ms))
            for B, pts in sorted(anchors.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="x", linestyle=":",
                        color="gray", label=f"S4 CUDA ext B={B} (anchor)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("L")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{op} {direction}, N=32 pairs")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        if any_data:
            path = plots_dir / f"{op}_time_vs_L.png"
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            written.append((f"{op}: time vs L", path))
        plt.close(fig)

    series: dict[tuple, list] = {}
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("op") == "generation" and _num(info.get("samples_per_s")):
            key = (info.get("preset"), _channels_label(info.get("channels"), info.get("stereo_layout")),
                   info.get("provider"))
            series.setdefault(key, []).append((info.get("batch"), info["samples_per_s"]))
    if series:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (preset, channels, provider), pts in sorted(series.items(), key=lambda kv: tuple(map(str, kv[0]))):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{provider}, {preset}, {channels}")
        ab = sorted(GEN_ANCHOR_SAMPLES.items())
        ax.plot([a[0] for a in ab], [a[1] for a in ab], marker="x", linestyle=":", color="gray",
                label="public SaShiMi, mono (anchor)")
        tb = sorted(GEN_TARGET_SAMPLES.items())
        ax.plot([t[0] for t in tb], [t[1] for t in tb], marker="*", linestyle="none", color="red",
                markersize=10, label="target")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("samples/s (frames/s over the batch)")
        ax.set_title("generation throughput, paper config")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = plots_dir / "generation_throughput.png"
        fig.savefig(path, dpi=120)
        written.append(("generation throughput vs batch", path))
        plt.close(fig)
    return written


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# the document
# --------------------------------------------------------------------------------------------
def render(run: dict, source_name: str, plots: list[tuple[str, Path]], out_dir: Path) -> str:
    benches = run.get("benchmarks") or []
    meta = run_meta(run)
    parts = [
        "## Measured on the GPU",
        "",
        f"Measured on **{meta['gpu']}** ({meta['cpu']}), {meta['date']}: torch {meta['torch']}, "
        f"triton {meta['triton']}, Python {meta['python']}, pytest-benchmark "
        f"{meta['pytest_benchmark']}, commit {meta['sha']}.",
        "",
        f"Generated by `python -m bench.report {source_name}` from one run of "
        "`pytest bench --benchmark-only --benchmark-json ...`: edit bench/report.py, not this part. "
        "Times are `triton.testing.do_bench` medians (p20-p80 in brackets) in ms; anchors are "
        "the public S4 / SaShiMi measured on an H100 (shared/anchors.md), targets are design.md's.",
        "",
        CEILINGS,
        "",
    ]
    missing = []
    krows = kernel_rows(benches)
    parts += ["## Kernels", ""]
    if krows:
        parts += [table(["op", "dir", "shape", "dtype", "provider", "median ms", "reference ms",
                         "speed-up", "rate", "of floor", "anchor (public)", "vs S4 ext", "target", "met"],
                        krows), "",
                  "speed-up: the matching reference's median over this provider's; of floor: the "
                  "H100 floor time (FLOPs at 51.6 TFLOP/s or bytes at 3.0 TB/s, whichever is "
                  "larger) over the median; vs S4 ext: the public CUDA extension's time over this "
                  "provider's.", ""]
    else:
        missing.append("kernels")
        parts += ["No kernel benchmark in this run.", ""]
    trows = train_rows(benches)
    parts += ["## Training step (forward + backward + fused AdamW)", ""]
    if trows:
        parts += [table(["preset", "shape", "precision", "provider", "ms/step", "tokens/s",
                         "peak GiB", "vs anchor", "anchor (public SaShiMi)", "target", "met"], trows), ""]
    else:
        missing.append("training step")
        parts += ["No training-step benchmark in this run.", ""]
    grows = generation_rows(benches)
    parts += ["## Generation (recurrent, one interleaved token per step)", ""]
    if grows:
        parts += [table(["preset", "channels", "batch", "provider", "us/step", "steps/s",
                         "samples/s", "real time", "anchor samples/s (public, mono)", "target",
                         "met"], grows), "",
                  "steps/s: interleaved tokens per second per stream; samples/s: audio frames per "
                  "second over the batch (a stereo frame is two steps); real time: frames/s per "
                  "stream over the sample rate.", ""]
    else:
        missing.append("generation")
        parts += ["No generation benchmark in this run.", ""]
    drows = data_rows(benches)
    if drows:
        parts += ["## Data pipeline (host CPU)", "",
                  table(["format", "resampling", "workers", "cores", "ms/batch", "tokens/s",
                         f"of {DATA_TARGET_TOKENS / 1e6:.0f} M tokens/s target"], drows), ""]
    if plots:
        parts += ["## Plots", ""]
        for title, path in plots:
            rel = Path(os.path.relpath(path, out_dir)).as_posix()
            parts += [f"![{title}]({rel})", ""]
    parts += [FLOORS.rstrip("\n"), ""]
    if missing:
        parts += ["## Not in this run", "", ", ".join(missing) + ".", ""]
    return "\n".join(parts)


def marker(name: str, end: bool = False) -> str:
    return f"<!-- {name}:{'end' if end else 'begin'} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with what stands between the markers of `name` replaced by `body` (the markers
    appended, around `body`, when `text` has none)."""
    begin, end = marker(name), marker(name, end=True)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    return text[:i] + block + text[j + len(end):]


def write_section(path: Path, name: str, body: str) -> None:
    """Write `body` between the markers of `name` in the file at `path` (the rest is kept)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    path.write_text(replace_section(old, name, body))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="pytest-benchmark JSON (--benchmark-json) of one run")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write")
    p.add_argument("--plots-dir", default="bench/plots", help="where the PNGs go (needs matplotlib)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = json.loads(Path(args.run).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {args.run}: cannot read a pytest-benchmark JSON file ({exc})", file=sys.stderr)
        return 2
    if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list):
        print(f"error: {args.run}: not a pytest-benchmark JSON file (no 'benchmarks' list)", file=sys.stderr)
        return 2
    if not run["benchmarks"]:
        print(f"error: {args.run} holds no benchmarks (all skipped? they need a GPU)", file=sys.stderr)
        return 2
    out = Path(args.out)
    plots: list[tuple[str, Path]] = []
    if not args.no_plots:
        if have_matplotlib():
            plots = make_plots(run["benchmarks"], Path(args.plots_dir))
        else:
            print("note: matplotlib is not installed: no plots written (pip install matplotlib)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_section(out, "bench.report", render(run, Path(args.run).name, plots, out.parent))
    print(f"wrote {out} ({len(run['benchmarks'])} benchmarks" +
          (f", {len(plots)} plots in {args.plots_dir}" if plots else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
