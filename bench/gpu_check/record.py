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

ANCHORS = json.loads((Path(__file__).resolve().parents[1] / "anchors.json").read_text())
ANCHOR_NOTE = "anchors: the public S4/SaShiMi measured on an H100 80GB HBM3 (bench/anchors.json), not on this device"


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
    update(out, lambda d: d.__setitem__(section, value) if key is None else
           d.setdefault(section, {}).__setitem__(key, value))


# --------------------------------------------------------------------------------------------
# bench.json: pytest-benchmark's format
# --------------------------------------------------------------------------------------------
def stats_from_ms(times_ms: list[float]) -> dict:
    """pytest-benchmark's stats block (seconds) from a list of per-call times in ms."""
    import statistics
    xs = sorted(t * 1e-3 for t in times_ms)
    if not xs:
        return {}
    q1, median, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    mean = statistics.fmean(xs)
    return dict(min=xs[0], max=xs[-1], mean=mean, stddev=statistics.stdev(xs) if len(xs) > 1 else 0.0,
                rounds=len(xs), median=median, iqr=q3 - q1, q1=q1, q3=q3, iqr_outliers=0, stddev_outliers=0,
                outliers="0;0", ld15iqr=xs[0], hd15iqr=xs[-1], ops=1.0 / mean if mean > 0 else 0.0,
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
def _f(x, fmt="{:.3g}"):
    return "-" if x is None else fmt.format(x)


def _figures(title: str, figs: dict, line) -> list[str]:
    """A section of figures: `line(r)` for the measured ones, the status and reason otherwise."""
    return [title] + [f"  {r.get('label', '?')}: " + (line(r) + ("" if r.get("meets_target") is None else
                      " [meets target]" if r["meets_target"] else " [MISSES target]") if r.get("status") == "ok"
                      else f"{r.get('status')} {r.get('reason', '')}".rstrip()) for r in figs.values()] if figs else []


def render_summary(d: dict) -> str:
    dev, ver, h, t, b = (d.get(k) or {} for k in ("device", "versions", "headline", "tests", "bench"))
    c, tr, gen = d.get("ceilings") or {}, ANCHORS["train"], ANCHORS["generation"]
    lines = [f"bench.gpu_check{' --dry-run (CPU rehearsal: no figure here is a GPU measurement)' if d.get('dry_run') else ''}",
             f"device: {dev.get('name', '?')} ({dev.get('sms') or '-'} SMs, {_f(dev.get('memory_gib'), '{:.0f}')} GiB, "
             f"capability {dev.get('capability') or '-'}), torch {ver.get('torch', '?')}, triton {ver.get('triton', '?')}, "
             f"python {ver.get('python', '?')}, started {d.get('started_utc', '?')}, git {d.get('git_sha', '?')}",
             ANCHOR_NOTE, ""]
    if c:
        lines.append(f"ceilings here: copy {_f(c.get('copy_gbps'), '{:,.0f}')} GB/s, fp32 matmul "
                     f"{_f(c.get('fp32_tflops'), '{:.1f}')} TFLOP/s (H100: {ANCHORS['h100']['bytes_per_s'] / 1e9:,.0f} GB/s, "
                     f"{ANCHORS['h100']['fp32_flops'] / 1e12:.1f} TFLOP/s)")
    lines.append("stages:")
    lines += [f"  {n:<9} {st.get('status', '?'):<8} {_f(st.get('wall_s'), '{:.1f}'):>6} s (box {_f(st.get('box_s'), '{:.0f}')} s)"
              + (f"  {st['note']}" if st.get("note") else "") for n, st in (d.get("stages") or {}).items()]
    if sf := d.get("selftest"):
        bad = [r["op"] for r in sf.get("rows", []) if r.get("result") != "pass"]
        lines.append(f"selftest: {'all ops pass' if sf.get('all_pass') else 'FAILED ' + ', '.join(bad)} "
                     f"({len(sf.get('rows', []))} ops, path {sf.get('path', '?')})")
    spread = lambda r: f"{_f(r.get('ms_p50'))} ({_f(r.get('ms_p20'))}-{_f(r.get('ms_p80'))})"  # noqa: E731
    lines += _figures("kernels (median ms, p20-p80; anchor = S4 CUDA ext on H100):", h.get("kernels"), lambda r: spread(r)
                      + (f", anchor {r['anchor_ms']:g}" if r.get("anchor_ms") else "")
                      + (f", target <= {r['target_ms']:g}" if r.get("target_ms") else ""))
    lines += _figures(f"training step (tokens/s, peak GiB; anchor {tr['anchor_tokens_per_s'] / 1e6:.2f} M tokens/s, "
                      f"{tr['anchor_peak_gib']} GiB on H100):", {**(h.get("train") or {}), **{
                          f"c{k}": v for k, v in (h.get("train_compile") or {}).items()}}, lambda r:
                      f"{_f(r.get('tokens_per_s'), '{:,.0f}')} tokens/s, {_f(r.get('peak_gib'), '{:.2f}')} GiB, "
                      f"{spread(r)} ms/step, first call {_f(r.get('first_call_s'), '{:.1f}')} s")
    lines += _figures("generation (steps/s per stream; samples/s over the batch):", h.get("generation"), lambda r:
                      f"{_f(r.get('steps_per_s'), '{:,.0f}')} steps/s, {_f(r.get('samples_per_s'), '{:,.0f}')} samples/s, "
                      f"{_f(r.get('us_per_step'), '{:.1f}')} us/step" + (
                          f", anchor {r['anchor_samples_per_s']:,.0f} samples/s" if r.get("anchor_samples_per_s") else ""))
    lines += _figures(f"recurrence vs convolution (relative error; target <= {ANCHORS['recurrence']['target_rel_err']:g}, "
                      f"public 'diagonal': {ANCHORS['recurrence']['anchor_diagonal_rel_err']:g}):", h.get("recurrence"),
                      lambda r: f"{_f(r.get('rel_err'), '{:.2e}')}")
    lines += _figures("codec (16-bit stereo 44.1 kHz; encode / decode samples/s):", (d.get("codec") or {}).get("round_trip"),
                      lambda r: f"{_f(r.get('encode_samples_per_s'), '{:,.0f}')} / {_f(r.get('decode_samples_per_s'), '{:,.0f}')}"
                      f", {r.get('chunks')} chunks, round trip {'exact' if r.get('round_trip') else 'FAILED'}")
    if t:
        lines.append(f"tests ({t.get('selection', '?')}): {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                     f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped of {t.get('selected', '?')} selected"
                     f" ({t.get('collected')} collected)" + ("" if t.get("finished") else "  [did not finish]"))
        lines += [f"  FAIL {f.get('nodeid')}: {f.get('message', '')[:160]}" for f in (t.get("failures") or [])[:10]]
    if b.get("files"):
        lines.append("rest of the benchmarks: " + ", ".join(f"{k} {v.get('status')} ({v.get('benchmarks')})"
                                                             for k, v in b["files"].items()))
        if b.get("missing_ids"):
            lines.append(f"  headline ids not found in bench/: {b['missing_ids']}")
    lines += [f"profile {n}: {r.get('status')}  " + " | ".join(r.get("summary", [])[:3])
              for n, r in (d.get("profile") or {}).items()]
    if d.get("finished_utc"):
        lines.append(f"finished {d['finished_utc']} after {_f(d.get('wall_s'), '{:.0f}')} s "
                     f"(budget {_f(d.get('budget_s'), '{:.0f}')} s): exit {d.get('exit_code')}")
    return "\n".join(lines) + "\n"


def elapsed(t0: float) -> float:
    return round(time.time() - t0, 2)
