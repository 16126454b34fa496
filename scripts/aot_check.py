#!/usr/bin/env python
"""Ahead-of-time check of every Triton kernel in kernels/ for the H100 (sm_90), without a GPU.

1. The launch configurations come from the op registry: `kernels.ops.launch_configs(op)` calls
   the host launchers at the op's compile cases on meta tensors, planned for an H100 (132 SMs),
   and lists every (launch, autotune config), the configs the early pruners drop at that size
   included (marked `pruned`: they run at other sizes).
2. Each one is specialised by Triton's own launch path (its `jit_cache_hook` reports the
   signature, constants and attributes instead of compiling) under a stand-in sm_90 driver, then
   compiled with `triton.compile`; ptxas -v reports registers, spills and stack, Triton the
   shared memory, and nvdisasm (both ship in the Triton wheel) the SASS of the hot loop.
3. Each compile's figures are kept in .cache/aot_check/<hash of the kernels' sources, this
   script and the Triton version>/ (git-ignored): a re-run compiles only what changed. Not
   with --cache-dir (that fills Triton's own cache, so everything compiles) nor
   --update-baseline.
4. Fails (exit 1) on a compile error, shared memory > 232448 B, > 1024 threads, a global
   scratch need, a grid over the CUDA limits, or the static gate: a new spill, or a hot loop
   more than 10% longer per unit of work than bench/baselines/sm90_static.json.

    python scripts/aot_check.py [--jobs 2] [--only cauchy,tier_step] [--csv out.csv]
        [--max-spill BYTES] [--cache-dir DIR] [--results-cache DIR | --no-results-cache]
        [--update-baseline --reason "..."]
        [--benchmarks-md BENCHMARKS.md] [-v]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

os.environ.pop("TRITON_INTERPRET", None)  # every config, GPU code paths (before importing triton)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402,F401  (kernels needs it first)
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448          # H100: max dynamic shared memory per block (opt-in), bytes
MAX_THREADS = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
BASELINE = os.path.join(_ROOT, "bench", "baselines", "sm90_static.json")
TOLERANCE = 0.10             # more hot-loop instructions per unit of work than this fails
H200_SMS, H200_CLOCK_HZ, ISSUE_PER_SM = 132, 1.98e9, 4   # 4 schedulers x 1 warp-instruction/clock
PROGRESS_S = 30              # a progress line at least this often while compiling


class _SM90:
    """The driver Triton's launch path asks for device, stream and target: an sm_90 stand-in."""
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


@contextlib.contextmanager
def _sm90(hook=None):
    saved = knobs.runtime.jit_cache_hook
    driver.set_active(_SM90())
    knobs.runtime.jit_cache_hook = hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = saved
        with contextlib.suppress(RuntimeError):   # no GPU driver here: the stand-in stays
            driver.reset_active()


def specialise(v) -> str:
    """Triton's specialisation of a launch configuration for sm_90 (its JSON
    `specialization_data`: signature, constants, attributes, options), by its own launch path."""
    got = []

    def hook(*, compile, **_):
        got.append(compile["specialization_data"])
        return True   # do not compile here

    with _sm90(hook):
        v.runner.run(*v.args, grid=None, warmup=True, **v.kwargs)
    return got[0]


def constexprs(spec: str) -> dict:
    """name -> value of the specialisation's constants and options (what the hot-loop
    declarations read: block sizes, num_warps)."""
    d = json.loads(spec)
    names = list(d["signature"])
    out = {names[k[0]]: v for k, v in zip(d["constant_keys"], d["constant_vals"]) if len(k) == 1}
    return dict(out, num_warps=d["options"]["num_warps"])


# ----------------------------------------------------------------------------------------------
# SASS: the hot loop of a compiled kernel
# ----------------------------------------------------------------------------------------------
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRA = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")
_PTXAS = {"regs": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_st": r"(\d+) bytes spill stores", "spill_ld": r"(\d+) bytes spill loads"}


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout


def sass_loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(instructions, innermost loops): a loop spans a label to the last later branch back to it;
    innermost: contains no other loop; in address order. NOPs are dropped (padding, not work)."""
    instrs: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if m := _SASS_LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif (m := _SASS_INSTR.match(line)) and not m.group(1).startswith("NOP"):
            instrs.append(m.group(1))
    ends: dict[int, int] = {}
    for i, text in enumerate(instrs):
        m = _SASS_BRA.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            ends[labels[m.group(1)]] = max(ends.get(labels[m.group(1)], i), i)
    loops = sorted(ends.items())
    return instrs, [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]


def hot_loop_metrics(sass: str, kernel: str, kw: dict) -> dict:
    """Instructions of the kernel's declared hot loop (kernels.ops HotLoop) per unit of work per
    thread; undeclared kernels: the first innermost loop, per iteration."""
    from kernels.ops import hot_loop, units_per_thread
    instrs, inner = sass_loops(sass)
    decl = hot_loop(kernel)
    which = 0 if decl is None else decl.loop
    whole = which is None or which >= len(inner)
    n, where = (len(instrs), "kernel") if whole else (inner[which][1] - inner[which][0] + 1,
                                                       f"loop {which + 1}/{len(inner)}")
    unit, per_thread = units_per_thread(kernel, kw, whole)
    return dict(loop_instrs=n, loop=where, unit=unit, per_unit=round(n / per_thread, 3))


def _compile(jit, spec: str):
    """triton.compile of a specialisation (as JITFunction.preload reads it, without its cache)."""
    import triton.language as tl
    d = json.loads(spec)
    tup = lambda x: tuple(x) if isinstance(x, list) else x  # noqa: E731  (JSON made tuples lists)
    consts = {tuple(k): tl.dtype(v) if tl.dtype.is_dtype(v) else
              tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v
              for k, v in zip(d["constant_keys"], d["constant_vals"])}
    src = ASTSource(jit, {k: tup(v) for k, v in d["signature"].items()}, consts,
                    {tuple(k): v for k, v in zip(d["attrs_keys"], d["attrs_vals"])})
    return triton.compile(src, target=TARGET, options={k: tup(v) for k, v in d["options"].items()})


def _error_line(e: Exception) -> str:
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    carets = [i for i, ln in enumerate(lines) if set(ln) == {"^"}]
    if carets:  # Triton CompilationError: "at L:C:", source excerpt, "^", then the message
        i = carets[-1]
        return f"{lines[0][:80]} ({lines[i - 1][:60]}): {' '.join(lines[i + 1:]) or lines[-1]}"[:300]
    return next((ln for ln in lines if re.search(r"error|Error|assert|out of|exceed", ln)), lines[0])[:300]


def compile_variant(v, spec: str | None = None) -> dict:
    """Compile one launch configuration for sm_90; its metrics (runs in a worker process)."""
    res = dict(status="ok", error="", regs=None, spill_st=None, spill_ld=None, stack=None, shared=None,
               loop_instrs=None, loop="", unit="", per_unit=None)
    try:
        spec = spec or specialise(v)
        buf = io.StringIO()
        saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True   # a cache hit would skip ptxas and its report
        try:
            with contextlib.redirect_stdout(buf):
                k = _compile(v.jit, spec)
        finally:  # restored: tests/test_static_gate.py compiles in a pytest process
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        md = k.metadata
        res.update(hot_loop_metrics(disassemble(k.asm["cubin"]), v.kernel, constexprs(spec)))
        res["shared"] = md.shared
        for name, rx in _PTXAS.items():
            m = re.search(rx, buf.getvalue())
            res[name] = int(m.group(1)) if m else None
        scratch = (getattr(md, "global_scratch_size", 0) or 0) + (getattr(md, "profile_scratch_size", 0) or 0)
        problems = ([f"shared memory {md.shared} B > {MAX_SHARED} B"] if md.shared > MAX_SHARED else []) + \
            ([f"{md.num_warps * 32} threads > {MAX_THREADS}"] if md.num_warps * 32 > MAX_THREADS else []) + \
            ([f"needs {scratch} B of global scratch (triton.set_allocator)"] if scratch else [])
        if problems:
            res.update(status="FAIL", error="; ".join(problems))
    except Exception as e:  # noqa: BLE001 - every failure goes in the table
        res.update(status="ERROR", error=_error_line(e), trace="".join(traceback.format_exception(e))[-4000:])
    return res


_VARIANTS: list = []
_SPECS: list = []
_RESULTS_DIR = ""   # where a compile's result is kept by the hash of what determines it ("": nowhere)


def sources_hash() -> str:
    """What a compile's result depends on besides its specialisation: the kernels' sources (their
    helpers and the hot-loop declarations included), this script, and the Triton version."""
    h = hashlib.sha256(triton.__version__.encode())
    kernels_dir = os.path.join(_ROOT, "kernels")
    for path in sorted(os.path.join(kernels_dir, n) for n in os.listdir(kernels_dir) if n.endswith(".py")) + \
            [os.path.abspath(__file__)]:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()


def _worker(i: int) -> tuple[int, dict]:
    spec = _SPECS[i]
    path = ""
    if _RESULTS_DIR and spec is not None:
        path = os.path.join(_RESULTS_DIR, hashlib.sha256(spec.encode()).hexdigest() + ".json")
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                return i, json.load(f)
    res = compile_variant(_VARIANTS[i], spec)
    if path and res["status"] != "ERROR":   # errors are recompiled (and their trace shown) each time
        with contextlib.suppress(OSError):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(res, f)
            os.replace(tmp, path)
    return i, res


def _compile_all(variants, index, jobs: int, t0: float) -> dict[int, dict]:
    """Every distinct compile, `jobs` processes at a time; a line as each op completes (and one at
    least every PROGRESS_S seconds while compiles complete), so a long check is never silent."""
    of_op: dict[str, set[int]] = {}
    for v, i in zip(variants, index):
        of_op.setdefault(v.op, set()).add(i)
    left = {op: set(s) for op, s in of_op.items()}
    results: dict[int, dict] = {}
    last = time.time()

    def done(i: int, res: dict) -> None:
        nonlocal last
        results[i] = res
        for op in [op for op, s in left.items() if i in s]:
            left[op].discard(i)
            if not left[op]:
                failed = sum(results[j]["status"] != "ok" for j in of_op[op])
                print(f"  {op}: {len(of_op[op])} compiles done{f', {failed} failed' if failed else ''} "
                      f"({len(results)}/{len(_VARIANTS)} in all, {time.time() - t0:.0f} s)", flush=True)
                del left[op]
                last = time.time()
        if time.time() - last >= PROGRESS_S:
            print(f"  ... {len(results)}/{len(_VARIANTS)} compiled ({time.time() - t0:.0f} s)", flush=True)
            last = time.time()

    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for fut in as_completed([ex.submit(_worker, i) for i in range(len(_VARIANTS))]):
                done(*fut.result())
    else:
        for i in range(len(_VARIANTS)):
            done(*_worker(i))
    return results


# ----------------------------------------------------------------------------------------------
# the static regression gate: bench/baselines/sm90_static.json
# ----------------------------------------------------------------------------------------------
def static_records(rows) -> dict:
    """key (kernel | config | first case) -> the figures the gate compares (and BENCHMARKS.md shows)."""
    return {f"{r['kernel']} | {r['config']} | {r['scenarios'][0]}": dict(
        op=r["op"], kernel=r["kernel"], regs=r["regs"], spill=(r["spill_st"] or 0) + (r["spill_ld"] or 0),
        smem=r["shared"], loop=r["loop"], loop_instrs=r["loop_instrs"], unit=r["unit"],
        per_unit=r["per_unit"], pruned=r["pruned_everywhere"]) for r in rows if r["status"] == "ok"}


def compare(baseline: dict, current: dict, tol: float = TOLERANCE,
            instructions: bool = True) -> tuple[list[str], list[str]]:
    """(failures, notes): a failure is a variant that spills where its baseline did not (or a new
    one that spills), or more than `tol` more hot-loop instructions per unit than its baseline."""
    failures, notes = [], []
    for key, cur in current.items():
        base = baseline.get(key)
        if base is None:
            (failures if cur["spill"] else notes).append(
                f"{key}: spills {cur['spill']} B (new, not in the baseline)" if cur["spill"] else f"{key}: new")
            continue
        if cur["spill"] and not base.get("spill"):
            failures.append(f"{key}: spills {cur['spill']} B (baseline: no spill)")
        b, c = base.get("per_unit"), cur.get("per_unit")
        if instructions and b and c and c > b * (1 + tol):
            failures.append(f"{key}: hot loop {c:g} instructions per {cur['unit']} > baseline {b:g} + {tol:.0%}")
        elif instructions and b and c and c < b * (1 - tol):
            notes.append(f"{key}: hot loop {c:g} instructions per {cur['unit']} (baseline {b:g}): faster, "
                         f"update the baseline")
    return failures, notes


def static_gate(a, ops, current: dict) -> int:
    """Compare with (or update) the baseline; print the result. Returns the number of failures."""
    base = json.load(open(a.baseline)) if os.path.exists(a.baseline) else None
    if a.benchmarks_md:
        from bench.report import write_section
        write_section(a.benchmarks_md, "static-gate", floor_table(current))
    rel = os.path.relpath(a.baseline, _ROOT)
    if a.update_baseline:
        if not a.reason:
            print("static gate: --update-baseline needs --reason (it is stored with the baseline)")
            return 1
        records = {k: r for k, r in (base or {}).get("records", {}).items() if r["op"] not in ops}
        records.update(current)
        with open(a.baseline, "w") as f:
            json.dump(dict(target="sm_90 (ptxas and nvdisasm of the Triton wheel)", triton=triton.__version__,
                           updated=datetime.date.today().isoformat(), reason=a.reason, tolerance=TOLERANCE,
                           records=dict(sorted(records.items()))), f, indent=1)
            f.write("\n")
        print(f"static gate: baseline {rel} updated ({len(current)} variants): {a.reason}")
        return 0
    if base is None:
        print(f"static gate: no baseline at {a.baseline} (write one with --update-baseline --reason ...)")
        return 1
    same_tools = base.get("triton") == triton.__version__
    failures, notes = compare(base["records"], current, base.get("tolerance", TOLERANCE), same_tools)
    if not same_tools:
        notes.append(f"baseline from triton {base.get('triton')}, this is {triton.__version__}: "
                     f"instruction counts not compared (spills are)")
    for line in notes if a.verbose else [n for n in notes if "faster" in n or "triton" in n]:
        print(f"  note: {line}")
    for line in failures:
        print(f"  STATIC GATE: {line}")
    print(f"static gate: {len(current)} variants against the baseline: " + (
        f"{len(failures)} regressions (a new spill, or > {TOLERANCE:.0%} more hot-loop instructions per "
        f"unit of work); intended? rerun with --update-baseline --reason '...' and commit {rel}" if failures
        else f"no new spill, no hot loop more than {TOLERANCE:.0%} longer per unit of work"))
    return len(failures)


def floor_table(current: dict) -> str:
    """Markdown: per kernel, the leanest non-spilling config's hot loop; for the ops with targets,
    the implied H200 issue floor at the anchor size next to the target."""
    from kernels.ops import OPS
    best: dict[str, dict] = {}
    worst: dict[str, dict] = {}
    for key, r in current.items():
        k = r["kernel"]
        if r["per_unit"] is None:
            continue
        if not r["spill"] and not r["pruned"] and (k not in best or r["per_unit"] < best[k]["per_unit"]):
            best[k] = dict(r, key=key)
        if k not in worst or r["per_unit"] > worst[k]["per_unit"]:
            worst[k] = r
    lines = ["| kernel | variants | regs (max) | spilling variants | smem max (B) | hot loop | "
             "instructions per unit, leanest config (all configs) | leanest config |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted({r["kernel"] for r in current.values()}):
        rs = [r for r in current.values() if r["kernel"] == k]
        b = best.get(k)
        per = "-" if b is None else f"{b['per_unit']:g} per {b['unit']} ({b['per_unit']:g}..{worst[k]['per_unit']:g})"
        lines.append(f"| `{k}` | {len(rs)} | {max(r['regs'] or 0 for r in rs)} | "
                     f"{sum(1 for r in rs if r['spill'])} | {max(r['smem'] or 0 for r in rs)} | "
                     f"{b['loop'] if b else '-'} | {per} | {b['key'].split(' | ')[1] if b else '-'} |")
    lines += ["", "Implied time at the H200 (132 SMs, 1.98 GHz, 4 warp instructions per SM per clock): "
              "**a floor estimate from instruction counts, not a measurement** (it ignores latency, "
              "memory and the slower MUFU pipe).", "",
              "| op | direction | size | kernels | implied floor (ms) | target (ms) | anchor (ms, H100) |",
              "|---|---|---|---|---|---|---|"]
    anchors = json.load(open(os.path.join(_ROOT, "bench", "anchors.json")))["kernels"]
    for op, shapes in anchors.items():
        for shape_name, directions in shapes.items():
            for direction, fig in directions.items():
                shape = OPS[op].bench[shape_name]
                names = [f"_{op}_fwd_kernel"] + ([f"_{op}_bwd_kernel"] if direction == "fwdbwd" else [])
                if "target_ms" in fig and all(n in best for n in names):
                    ms = sum(shape["B"] * shape["N"] * shape["L"] * best[n]["per_unit"] / 32
                             / (H200_SMS * ISSUE_PER_SM * H200_CLOCK_HZ) * 1e3 for n in names)
                    lines.append(f"| {op} | {direction} | {shape_name} (N={shape['N']}) | "
                                 f"{' + '.join(f'`{n}`' for n in names)} | {ms:.3f} | {fig['target_ms']} | "
                                 f"{fig['anchor_ms']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from kernels.ops import OPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--csv", default="", help="also write the full table here")
    ap.add_argument("--max-spill", type=int, default=-1,
                    help="fail a config that spills more than this many bytes (default: report only)")
    ap.add_argument("--cache-dir", default="", help="Triton cache dir to fill (default: a temporary one)")
    ap.add_argument("--results-cache", default=os.path.join(_ROOT, ".cache", "aot_check"),
                    help="keep each compile's result here, keyed by the hash of the kernels' sources, this "
                         "script, the Triton version and the specialisation, and reuse it (default: %(default)s)")
    ap.add_argument("--no-results-cache", action="store_true", help="compile everything, keep nothing")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks and every note")
    ap.add_argument("--baseline", default=BASELINE, help="the static gate's baseline")
    ap.add_argument("--update-baseline", action="store_true",
                    help="write the baseline from this run (for the ops checked) instead of comparing")
    ap.add_argument("--reason", default="", help="why the baseline changes (stored in it)")
    ap.add_argument("--benchmarks-md", default="",
                    help="write the static table between the static-gate markers of this file")
    a = ap.parse_args(argv)
    ops = [o for o in (a.only.split(",") if a.only else OPS) if o]
    if bad := [o for o in ops if o not in OPS]:
        ap.error(f"unknown op(s) {bad} (choose from {', '.join(OPS)})")
    cache = os.path.abspath(a.cache_dir) if a.cache_dir else tempfile.mkdtemp(prefix="aot_check_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        return _main(a, ops)
    finally:
        if not a.cache_dir:      # ~0.6 MB per compile
            shutil.rmtree(cache, ignore_errors=True)


def _main(a, ops) -> int:
    global _RESULTS_DIR
    from kernels.ops import launch_configs
    # compiled afresh: a new baseline, and a Triton cache to fill (--cache-dir: every kernel in it)
    if not (a.no_results_cache or a.update_baseline or a.cache_dir):
        _RESULTS_DIR = os.path.join(os.path.abspath(a.results_cache), sources_hash()[:16])
        os.makedirs(_RESULTS_DIR, exist_ok=True)
    variants, errors = [], []
    for op in ops:
        try:
            variants += launch_configs(op)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{op}: a launcher raised {type(e).__name__}: {e}")
    # one compile per distinct specialisation (same kernel, signature, constants, options)
    unique: dict[str, int] = {}
    index = []
    for v in variants:
        try:
            key = specialise(v)
        except Exception as e:  # noqa: BLE001 - compile_variant reports it
            key = f"unspecialisable:{id(v)}:{e}"
        if key not in unique:
            unique[key] = len(_VARIANTS)
            _VARIANTS.append(v)
            _SPECS.append(None if key.startswith("unspecialisable:") else key)
        index.append(unique[key])
    cached = sum(1 for spec in _SPECS if _RESULTS_DIR and spec is not None and os.path.exists(
        os.path.join(_RESULTS_DIR, hashlib.sha256(spec.encode()).hexdigest() + ".json")))
    print(f"{len(variants)} launch configurations of {len(ops)} ops -> {len(_VARIANTS)} distinct compiles "
          f"for sm_90 ({a.jobs} workers" + (f"; {cached} already compiled from these sources, "
                                            f"{os.path.relpath(_RESULTS_DIR, _ROOT)}" if _RESULTS_DIR else "")
          + ")", flush=True)
    t0 = time.time()
    results = _compile_all(variants, index, a.jobs, t0)
    print(f"compiled in {time.time() - t0:.0f} s\n")

    # one row per (op, kernel, config, compiled variant), the cases folded (grid: the largest)
    rows: dict = {}
    for v, i in zip(variants, index):
        r = results[i]
        status, err = r["status"], r["error"]
        grid_bad = v.grid if isinstance(v.grid, str) else "; ".join(
            f"axis {d} = {n} > {MAX_GRID[d]}" for d, n in enumerate(v.grid) if not 0 <= n <= MAX_GRID[d])
        if grid_bad:
            status, err = "FAIL", (err + "; " if err else "") + f"{v.case}: {grid_bad}"
        spill = (r["spill_st"] or 0) + (r["spill_ld"] or 0)
        if status == "ok" and 0 <= a.max_spill < spill:
            status, err = "FAIL", f"spills {spill} B > --max-spill {a.max_spill}"
        row = rows.setdefault((v.op, v.kernel, v.config, i), dict(
            r, op=v.op, kernel=v.kernel, config=v.config, status=status, error=err, scenarios=[],
            pruned_everywhere=True, grid=None))
        row["scenarios"].append(v.case)
        row["pruned_everywhere"] &= v.pruned
        if not isinstance(v.grid, str) and (row["grid"] is None or v.grid > row["grid"]):
            row["grid"] = v.grid
        if status != "ok" and row["status"] == "ok":
            row["status"], row["error"] = status, err
    n = lambda x: "-" if x is None else str(x)  # noqa: E731
    hdr = (f"{'case (first, +more)':<50}{'kernel':<37}{'config':<56}{'status':<7}{'regs':>5}{'spill':>7}"
           f"{'stack':>6}{'smem':>8}{'hot':>6}{'/unit':>9} {'max grid':<16} note")
    print(hdr + "\n" + "-" * len(hdr))
    failures = spills = 0
    for row in rows.values():
        spill = None if row["spill_st"] is None else row["spill_st"] + (row["spill_ld"] or 0)
        st = "SPILL" if row["status"] == "ok" and spill else row["status"]
        spills += st == "SPILL"
        failures += row["status"] != "ok"
        note = ("pruned at these sizes; " if row["pruned_everywhere"] else "") + row["error"]
        more = len(set(row["scenarios"])) - 1
        case = (row["scenarios"][0][:44] + (f" +{more}" if more else ""))[:49]
        grid = "x".join(map(str, row["grid"])) if row["grid"] else "-"
        print(f"{case:<50}{row['kernel'][:36]:<37}{row['config'][:55]:<56}{st:<7}{n(row['regs']):>5}{n(spill):>7}"
              f"{n(row['stack']):>6}{n(row['shared']):>8}{n(row['loop_instrs']):>6}{n(row['per_unit']):>9} "
              f"{grid:<16} {note.rstrip('; ')}")
        if a.verbose and row.get("trace"):
            print(row["trace"])
    for line in errors:
        print(f"ERROR {line}")
    print(f"\n{len({(r['kernel'], r['config']) for r in rows.values()})} kernel/config pairs, compiled as "
          f"{len(rows)} variants ({len(_VARIANTS)} distinct compiles): {len(rows) - failures} ok, {failures} "
          f"failed, {spills} spill; {len(errors)} launcher errors (registers/spills: ptxas -v for sm_90a; "
          f"smem: Triton's dynamic shared memory, limit {MAX_SHARED} B)")
    if a.csv:
        cols = ("op", "kernel", "config", "status", "regs", "spill_st", "spill_ld", "stack", "shared", "grid",
                "pruned_everywhere", "error", "loop", "loop_instrs", "unit", "per_unit", "scenarios")
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows([[" | ".join(r[c]) if c == "scenarios" else r[c] for c in cols] for r in rows.values()])
    gate = static_gate(a, ops, static_records(rows.values()))
    return 1 if failures or errors or gate else 0


if __name__ == "__main__":
    sys.exit(main())
