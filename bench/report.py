"""Regenerate the measured part of BENCHMARKS.md from one pytest-benchmark run.

    pytest bench --benchmark-only --benchmark-json run.json      # on the GPU
    python -m bench.report [run.json] [--out BENCHMARKS.md] [--plots-dir bench/plots]

It writes only between the markers `<!-- bench.report:begin -->` and `<!-- bench.report:end -->`
of the output file (a file without them gets them appended, a missing file is created), so the
hand-written sections and the static gate's table (scripts/aot_check.py) survive. Measured: the
device, versions, date and, per benchmark, the do_bench median (extra_info ms_p50, p20-p80).
Fixed: the anchors, targets and H100 ceilings (bench/anchors.json) and the floors table. Without
a run: the floors table alone. Plots (kernel time vs L, generation throughput vs batch) need
matplotlib, else they are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
from bench.compare import median_ms  # noqa: E402
from kernels.ops import OPS  # noqa: E402

A = json.loads((Path(__file__).with_name("anchors.json")).read_text())
# (op, direction, B, L) -> {anchor_ms, naive_ms, target_ms}; N = 32 pairs
KERNEL_ANCHORS = {(op, d, OPS[op].bench[name]["B"], OPS[op].bench[name]["L"]): fig
                  for op, shapes in A["kernels"].items() for name, dirs in shapes.items() for d, fig in dirs.items()}
EMBED = A["embed_interleave"]
GEN_ANCHOR_SAMPLES = {int(b): x for b, x in A["generation"]["anchor_samples_per_s"].items()}
GEN_TARGET_SAMPLES = {int(b): x for b, x in A["generation"]["target_samples_per_s"].items()}
DATA_TARGET_TOKENS = A["data"]["target_tokens_per_s"]
H = A["h100"]
CEILINGS = (f"H100 ceilings (bench/anchors.json): fp32 {H['fp32_flops'] / 1e12:g} TFLOP/s, device copy "
            f"{H['bytes_per_s'] / 1e12:g} TB/s (bytes read + written).")


def floors() -> str:
    """The floors table (work counted and floor computed from the H100's ceilings before any
    measurement), with the targets and public anchors of bench/anchors.json."""
    k = lambda op, d: KERNEL_ANCHORS[(op, d, 1024, 16384)]  # noqa: E731
    t, g = A["train"], A["generation"]
    rows = [
        ("cauchy fwd", "B=1024, N/2=32, L=16384", "537 M conjugate-pair terms; the pair folded into one fraction "
         "(a z - b)/(z^2 - c z + d): ~13 fp32 FMA-class instructions + 1 reciprocal per term", "~0.2-0.27 ms",
         f"<= {k('cauchy', 'fwd')['target_ms']:g} ms", f"{k('cauchy', 'fwd')['anchor_ms']:g} ms"),
        ("cauchy fwd+bwd", "same", "backward: two complex reciprocals and their squares per term (~2x forward)",
         "~0.6-0.8 ms", f"<= {k('cauchy', 'fwdbwd')['target_ms']:g} ms", f"{k('cauchy', 'fwdbwd')['anchor_ms']:g} ms"),
        ("vandermonde fwd", "B=1024, N/2=32, L=16384", "537 M terms; exp once per block, then one complex "
         "multiply-add (~6 instructions) per term", "~0.1 ms", f"<= {k('vandermonde', 'fwd')['target_ms']:g} ms",
         f"{k('vandermonde', 'fwd')['anchor_ms']:g} ms"),
        ("vandermonde fwd+bwd", "same", "backward: two sums over l per (b, n) (grad v, grad x)", "~0.3 ms",
         f"<= {k('vandermonde', 'fwdbwd')['target_ms']:g} ms", f"{k('vandermonde', 'fwdbwd')['anchor_ms']:g} ms"),
        ("embed_interleave fwd", "B=16, L=64000, C=2, D=64, bf16 out", "2.048 M rows x (8 B token + 128 B row "
         "written); the 256-row table stays in L2", "93 us (fp32 out: 180 us)",
         f">= {EMBED['target_fwd_fraction_of_floor']:.0%} of copy bandwidth", "PyTorch view + embedding"),
        ("embed_interleave bwd", "same, fp32 grad in", "2.048 M rows x (256 B read + 8 B token)", "180 us",
         f">= {EMBED['target_bwd_speedup_vs_torch']:g}x faster than `nn.Embedding` backward", "PyTorch embedding backward"),
        ("training step", "paper, mono B=8 x L=16384", "dense layers ~1.2 MFLOP/token forward (tiers of H = 64, 128, "
         "256 at L, L/4, L/16), x3 with backward: 0.47 TFLOP/step", "~9 ms fp32 (14 M tokens/s)",
         f">= {t['target_tokens_per_s'] / 1e6:.1f} M tokens/s, <= {t['target_peak_gib']:g} GiB",
         f"{t['anchor_tokens_per_s'] / 1e6:.2f} M tokens/s, {t['anchor_peak_gib']} GiB"),
        ("generation step", "paper, batch 1", f"0.8 MB of weights per tier-0 step (L2-resident); launch-bound: "
         f"{H['graph_kernel_us']} us per kernel in a CUDA graph", "~31 us/step budget = ~25 kernels or one "
         "persistent kernel", f">= {g['target_steps_per_s']['1']:,.0f} steps/s",
         f"{g['anchor_samples_per_s']['1']:,.0f} samples/s"),
        ("generation step", "paper, batch 256", "0.3 GFLOP per step", "~6 us compute; budget 128 us/step",
         f">= {g['target_samples_per_s']['256']:,.0f} samples/s", f"{g['anchor_samples_per_s']['256']:,.0f} samples/s"),
    ]
    return "## Floors (before tuning)\n\n" + table(["op", "size", "work counted", "floor", "target",
                                                    "anchor (public S4/SaShiMi, H100)"], [list(r) for r in rows]) + "\n"


OP_ORDER = list(OPS)
DIRECTION_ORDER = ["fwd", "fwdbwd", "bwd"]
SPECIAL_OPS = ("train_step", "generation", "data")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def fmt_big(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x:,.0f}"


def fmt_shape(shape) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items()) if isinstance(shape, dict) else str(shape)


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
        return datetime.fromisoformat(str(stamp)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return str(stamp or "?")


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
    """(target text, met?) for the kernel targets of bench/anchors.json; ('', None) where none applies."""
    B, L = shape.get("B"), shape.get("L")
    t = KERNEL_ANCHORS.get((op, direction, B, L), {}).get("target_ms")
    if t and provider == "triton":
        return f"<= {t:g} ms", ms <= t
    if op == "embed_interleave" and all(shape.get(k) == v for k, v in EMBED["shape"].items()) and provider == "triton":
        frac, speedup = EMBED["target_fwd_fraction_of_floor"], EMBED["target_bwd_speedup_vs_torch"]
        if direction == "fwd" and dtype == "bf16":
            got = _num(info.get("fraction_of_floor"))
            return f">= {frac:.0%} of floor", None if got is None else got >= frac
        if direction == "bwd":
            torch_ms = median_ms(providers["torch"]) if "torch" in providers else None
            if torch_ms is None:
                return f">= {speedup:g}x torch", None
            return f">= {speedup:g}x torch ({torch_ms / ms:.1f}x)", torch_ms / ms >= speedup
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
                anchor_txt = f"S4 ext {anchor['anchor_ms']:g} ms" + (
                    f", naive {anchor['naive_ms']:g} ms" if anchor.get("naive_ms") else "")
                if ms:
                    vs_anchor = f"{anchor['anchor_ms'] / ms:.2f}x"
            target, met = _kernel_target(op, direction, shape, dtype, provider, ms, info, providers)
            rows.append([str(op), str(direction), fmt_shape(shape), str(dtype), provider,
                         fmt_ms(ms) + spread,
                         f"{fmt_ms(base_ms)}" + (f" ({base})" if base and base != "reference" else ""),
                         f"{base_ms / ms:.1f}x" if base_ms and ms else "-",
                         ", ".join(rates) or "-", f"{frac:.0%}" if frac is not None else "-",
                         anchor_txt, vs_anchor, target or "-", yes_no(met)])
    return rows


def _of(benches: list[dict], op: str) -> list[tuple[dict, dict]]:
    """(benchmark, its extra_info) of the benchmarks of one op."""
    return [(b, b["extra_info"]) for b in benches if (b.get("extra_info") or {}).get("op") == op]


def train_rows(benches: list[dict]) -> list[list[str]]:
    rows = []
    for b, info in _of(benches, "train_step"):
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
    for b, info in _of(benches, "generation"):
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
    for b, info in _of(benches, "data"):
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
def _log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _curves(ax, series: dict, **style) -> None:
    """One line per key of series (key -> [(x, y)]), labelled by style['label'](key)."""
    label = style.pop("label")
    for key, pts in sorted(series.items(), key=lambda kv: tuple(map(str, kv[0]))):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label(key), **style)


def make_plots(benches: list[dict], plots_dir: Path) -> list[tuple[str, Path]]:
    """Write the PNGs: kernel time vs L (with the anchors), generation samples/s vs batch (with
    the anchor and target); returns [(title, path)]. Needs matplotlib (the caller checks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots_dir.mkdir(parents=True, exist_ok=True)
    infos = [(b.get("extra_info") or {}, median_ms(b)) for b in benches]
    written, pages = [], []
    for op in ("cauchy", "vandermonde"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        mine = {d: {} for d in ("fwd", "fwdbwd")}
        for info, ms in infos:
            shape = info.get("shape") or {}
            if info.get("op") == op and info.get("direction") in mine and "L" in shape and ms:
                mine[info["direction"]].setdefault((info.get("provider"), shape.get("B")), []).append((shape["L"], ms))
        for ax, (direction, series) in zip(axes, mine.items()):
            _curves(ax, series, marker="o", label=lambda k: f"{k[0]} B={k[1]}")
            anchors: dict = {}
            for (a_op, a_dir, B, L), a_fig in KERNEL_ANCHORS.items():
                if (a_op, a_dir) == (op, direction):
                    anchors.setdefault((B,), []).append((L, a_fig["anchor_ms"]))
            _curves(ax, anchors, marker="x", linestyle=":", color="gray", label=lambda k: f"S4 CUDA ext B={k[0]} (anchor)")
            _log_axes(ax, "L", "ms (median)", f"{op} {direction}, N=32 pairs")
        pages.append((fig, any(mine.values()), f"{op}_time_vs_L.png", f"{op}: time vs L"))
    gen: dict = {}
    for info, _ in infos:
        if info.get("op") == "generation" and _num(info.get("samples_per_s")):
            key = (info.get("provider"), info.get("preset"), _channels_label(info.get("channels"), info.get("stereo_layout")))
            gen.setdefault(key, []).append((info.get("batch"), info["samples_per_s"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _curves(ax, gen, marker="o", label=lambda k: ", ".join(map(str, k)))
    _curves(ax, {("anchor",): list(GEN_ANCHOR_SAMPLES.items())}, marker="x", linestyle=":", color="gray",
            label=lambda k: "public SaShiMi, mono (anchor)")
    _curves(ax, {("target",): list(GEN_TARGET_SAMPLES.items())}, marker="*", linestyle="none", color="red", markersize=10,
            label=lambda k: "target")
    _log_axes(ax, "batch", "samples/s (frames/s over the batch)", "generation throughput, paper config")
    pages.append((fig, bool(gen), "generation_throughput.png", "generation throughput vs batch"))
    for fig, has_data, name, title in pages:
        if has_data:
            fig.tight_layout()
            fig.savefig(plots_dir / name, dpi=120)
            written.append((title, plots_dir / name))
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
        "the public S4 / SaShiMi measured on an H100, and the targets, from bench/anchors.json.",
        "",
        CEILINGS,
        "",
    ]
    missing = []
    sections = [
        ("Kernels", "kernels", kernel_rows(benches), ["op", "dir", "shape", "dtype", "provider", "median ms",
         "reference ms", "speed-up", "rate", "of floor", "anchor (public)", "vs S4 ext", "target", "met"],
         "speed-up: the matching reference's median over this provider's; of floor: the H100 floor time "
         "(FLOPs at its fp32 peak or bytes at its copy bandwidth, whichever is larger) over the median; vs S4 "
         "ext: the public CUDA extension's time over this provider's."),
        ("Training step (forward + backward + fused AdamW)", "training step", train_rows(benches),
         ["preset", "shape", "precision", "provider", "ms/step", "tokens/s", "peak GiB", "vs anchor",
          "anchor (public SaShiMi)", "target", "met"], ""),
        ("Generation (recurrent, one interleaved token per step)", "generation", generation_rows(benches),
         ["preset", "channels", "batch", "provider", "us/step", "steps/s", "samples/s", "real time",
          "anchor samples/s (public, mono)", "target", "met"],
         "steps/s: backbone steps per second per stream; samples/s: audio frames per second over the batch "
         "(an interleaved stereo frame is two steps); real time: frames/s per stream over the sample rate.")]
    for title, what, rows, header, note in sections:
        if not rows:
            missing.append(what)
        parts += [f"## {title}", "", table(header, rows) if rows else f"No {what} benchmark in this run.", ""] + \
            ([note, ""] if rows and note else [])
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
    parts += [floors()]
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
    p.add_argument("run", nargs="?", help="pytest-benchmark JSON (--benchmark-json) of one run "
                   "(none: the floors table alone)")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write")
    p.add_argument("--plots-dir", default="bench/plots", help="where the PNGs go (needs matplotlib)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run is None:
        write_section(Path(args.out), "bench.report", "No GPU measurement in this file yet: what follows "
                      "are floors computed from the H100's ceilings, not measurements.\n\n" + CEILINGS + "\n\n" + floors())
        print(f"wrote the floors table to {args.out}")
        return 0
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
