"""Results written as they come: OUT/gpu_check.json (everything), OUT/summary.txt (short text),
OUT/bench.json (pytest-benchmark format, for bench.report and bench.compare).

One writer at a time by construction: the orchestrator waits for each stage's process, and a
stage's process is the only writer while it runs. Each write replaces the file atomically
(write beside it, then rename), so a call killed at its limit leaves the last complete file.
"""
from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = 1
RESULT, SUMMARY, BENCH, LOG, PROFILE = "gpu_check.json", "summary.txt", "bench.json", "log.txt", "profile.txt"
OUT_FILES = (RESULT, SUMMARY, BENCH, LOG, PROFILE)   # the device returns at most 8 files from $OUT

# anchors.md: measured on an H100 (80GB HBM3), 2026-11-25; design.md's targets
ANCHOR_NOTE = ("anchors: the public S4/SaShiMi measured on an H100 80GB HBM3 (shared/anchors.md, "
               "2026-11-25), not on this device")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(x):
    """JSON-safe: NaN / inf become None (json.dumps would write invalid JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def load(out: Path) -> dict:
    path = Path(out) / RESULT
    if path.exists():
        return json.loads(path.read_text())
    return {}


def update(out: Path, fn) -> dict:
    """Load OUT/gpu_check.json, apply fn(data) in place, write it and summary.txt back."""
    out = Path(out)
    data = load(out)
    fn(data)
    data["updated_utc"] = now_utc()
    _atomic_write(out / RESULT, json.dumps(_clean(data), indent=1))
    _atomic_write(out / SUMMARY, render_summary(data))
    return data


def put(out: Path, section: str, key: str | None, value) -> None:
    """data[section][key] = value (data[section] = value when key is None)."""
    def fn(d):
        if key is None:
            d[section] = value
        else:
            d.setdefault(section, {})[key] = value
    update(out, fn)


# --------------------------------------------------------------------------------------------
# bench.json: pytest-benchmark's format
# --------------------------------------------------------------------------------------------
def stats_from_ms(times_ms: list[float]) -> dict:
    """pytest-benchmark's stats block (seconds) from a list of per-call times in ms."""
    xs = sorted(t * 1e-3 for t in times_ms)
    n = len(xs)
    if n == 0:
        return {}
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0

    def q(p):
        pos = p * (n - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    q1, q3 = q(0.25), q(0.75)
    return dict(min=xs[0], max=xs[-1], mean=mean, stddev=math.sqrt(var), rounds=n, median=q(0.5),
                iqr=q3 - q1, q1=q1, q3=q3, iqr_outliers=0, stddev_outliers=0, outliers="0;0",
                ld15iqr=xs[0], hd15iqr=xs[-1], ops=1.0 / mean if mean > 0 else 0.0,
                total=sum(xs), iterations=1)


def bench_entry(fullname: str, group: str, extra_info: dict, times_ms: list[float]) -> dict:
    name = fullname.split("::", 1)[-1]
    param = name[name.index("[") + 1:-1] if "[" in name else None
    return dict(group=group, name=name, fullname=fullname, params=None, param=param,
                extra_info=extra_info, options=dict(timer="do_bench" if extra_info.get("gpu_name") else "perf_counter"),
                stats=stats_from_ms(times_ms))


def add_bench(out: Path, entries: list[dict], machine_info: dict | None = None,
              commit_info: dict | None = None) -> None:
    """Append benchmarks to OUT/bench.json (created with machine/commit info on first use);
    an entry with a fullname already there replaces it (bench.compare refuses duplicates)."""
    path = Path(out) / BENCH
    run = json.loads(path.read_text()) if path.exists() else {}
    if not run:
        run = dict(machine_info=machine_info or {}, commit_info=commit_info or {}, benchmarks=[],
                   datetime=now_utc(), version=_pytest_benchmark_version())
    elif machine_info:
        for k, v in machine_info.items():
            run.setdefault("machine_info", {}).setdefault(k, v)
    names = {e["fullname"] for e in entries}
    run["benchmarks"] = [b for b in run.get("benchmarks", []) if b.get("fullname") not in names] + entries
    _atomic_write(path, json.dumps(_clean(run), indent=1))


def merge_pytest_json(out: Path, path: Path) -> int:
    """Fold one `pytest --benchmark-json` file into OUT/bench.json; returns its benchmark count."""
    run = json.loads(Path(path).read_text())
    benches = run.get("benchmarks", [])
    add_bench(out, benches, machine_info=run.get("machine_info"), commit_info=run.get("commit_info"))
    return len(benches)


def _pytest_benchmark_version() -> str:
    try:
        from importlib.metadata import version
        return version("pytest-benchmark")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------
# summary.txt
# --------------------------------------------------------------------------------------------
def _f(x, fmt="{:.3g}", none="-"):
    return none if x is None else fmt.format(x)


def _big(x):
    if x is None:
        return "-"
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x:,.0f}"


def _not_ok(r: dict) -> str:
    """The summary line of a figure that was not measured (skipped, failed, timed out)."""
    return f"  {r.get('label', '?')}: {r.get('status')} {r.get('reason', '')}".rstrip()


def _met(ok):
    return "" if ok is None else (" [meets target]" if ok else " [MISSES target]")


def render_summary(d: dict) -> str:
    dev = d.get("device") or {}
    ver = d.get("versions") or {}
    lines = [f"bench.gpu_check{' --dry-run (CPU rehearsal: no figure here is a GPU measurement)' if d.get('dry_run') else ''}",
             f"device: {dev.get('name', '?')} ({dev.get('sms') or '-'} SMs, {_f(dev.get('memory_gib'), '{:.0f}')} GiB, "
             f"capability {dev.get('capability') or '-'}), "
             f"torch {ver.get('torch', '?')}, triton {ver.get('triton', '?')}, python {ver.get('python', '?')}, "
             f"started {d.get('started_utc', '?')}, git {d.get('git_sha', '?')}",
             ANCHOR_NOTE, ""]
    ceil = d.get("ceilings") or {}
    if ceil:
        lines.append(f"ceilings here: copy {_f(ceil.get('copy_gbps'), '{:,.0f}')} GB/s, fp32 matmul "
                     f"{_f(ceil.get('fp32_tflops'), '{:.1f}')} TFLOP/s (H100 anchors: 3,000 GB/s, 51.6 TFLOP/s)")
    lines.append("stages:")
    for name, st in (d.get("stages") or {}).items():
        lines.append(f"  {name:<9} {st.get('status', '?'):<8} {_f(st.get('wall_s'), '{:.1f}'):>6} s"
                     f" (box {_f(st.get('box_s'), '{:.0f}')} s)" + (f"  {st['note']}" if st.get("note") else ""))
    sf = d.get("selftest") or {}
    if sf:
        bad = [r["op"] for r in sf.get("rows", []) if r.get("result") != "pass"]
        lines.append(f"selftest: {'all ops pass' if sf.get('all_pass') else 'FAILED ' + ', '.join(bad)} "
                     f"({len(sf.get('rows', []))} ops, path {sf.get('path', '?')})")
    h = d.get("headline") or {}
    if h.get("kernels"):
        lines.append("kernels (median ms, p20-p80; anchor = S4 CUDA ext on H100):")
        for r in h["kernels"].values():
            if r.get("status") != "ok":
                lines.append(_not_ok(r))
                continue
            lines.append(f"  {r['label']}: {_f(r.get('ms_p50'))} ({_f(r.get('ms_p20'))}-{_f(r.get('ms_p80'))})"
                         + (f", anchor {r['anchor_ms']:g}" if r.get("anchor_ms") else "")
                         + (f", target <= {r['target_ms']:g}" if r.get("target_ms") else "")
                         + _met(r.get("meets_target")))
    train = list((h.get("train") or {}).values()) + list((h.get("train_compile") or {}).values())
    if train:
        lines.append("training step (tokens/s, peak GiB; anchor 1.00 M tokens/s, 8.36 GiB on H100):")
        for r in train:
            if r.get("status") != "ok":
                lines.append(_not_ok(r))
                continue
            lines.append(f"  {r['label']}: {_big(r.get('tokens_per_s'))} tokens/s, {_f(r.get('peak_gib'), '{:.2f}')} GiB, "
                         f"{_f(r.get('ms_p50'))} ms/step ({_f(r.get('ms_p20'))}-{_f(r.get('ms_p80'))}), "
                         f"first call {_f(r.get('first_call_s'), '{:.1f}')} s" + _met(r.get("meets_target")))
    if h.get("generation"):
        lines.append("generation (steps/s per stream; samples/s over the batch):")
        for r in h["generation"].values():
            if r.get("status") != "ok":
                lines.append(_not_ok(r))
                continue
            lines.append(f"  {r['label']}: {_f(r.get('steps_per_s'), '{:,.0f}')} steps/s, "
                         f"{_f(r.get('samples_per_s'), '{:,.0f}')} samples/s, {_f(r.get('us_per_step'), '{:.1f}')} us/step"
                         + (f", anchor {r['anchor_samples_per_s']:,.0f} samples/s" if r.get("anchor_samples_per_s") else "")
                         + _met(r.get("meets_target")))
    if h.get("recurrence"):
        lines.append("recurrence vs convolution (relative error; target <= 1e-4, public 'diagonal': 1.8e-1):")
        for r in h["recurrence"].values():
            lines.append(f"  {r.get('label', '?')}: " + (f"{_f(r.get('rel_err'), '{:.2e}')}" + _met(r.get("meets_target"))
                                                         if r.get("status") == "ok" else f"{r.get('status')} {r.get('reason', '')}"))
    t = d.get("tests") or {}
    if t:
        lines.append(f"tests ({t.get('selection', '?')}): {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                     f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped of {t.get('selected', '?')} selected"
                     + (f" ({t['collected']} collected)" if t.get("collected") is not None else "")
                     + ("" if t.get("finished") else "  [did not finish]"))
        for f in (t.get("failures") or [])[:10]:
            lines.append(f"  FAIL {f.get('nodeid')}: {f.get('message', '')[:160]}")
    b = d.get("bench") or {}
    if b.get("files"):
        lines.append("rest of the benchmarks: " + ", ".join(
            f"{k} {v.get('status')}" + (f" ({v.get('benchmarks')})" if v.get("benchmarks") is not None else "")
            for k, v in b["files"].items()))
        if b.get("missing_ids"):
            lines.append(f"  headline ids not found in bench/: {b['missing_ids']}")
    p = d.get("profile") or {}
    for name, r in p.items():
        if isinstance(r, dict):
            lines.append(f"profile {name}: {r.get('status')}  " + " | ".join(r.get("summary", [])[:3]))
    if d.get("finished_utc"):
        lines.append(f"finished {d['finished_utc']} after {_f(d.get('wall_s'), '{:.0f}')} s "
                     f"(budget {_f(d.get('budget_s'), '{:.0f}')} s): exit {d.get('exit_code')}")
    return "\n".join(lines) + "\n"


def elapsed(t0: float) -> float:
    return round(time.time() - t0, 2)
