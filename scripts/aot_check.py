#!/usr/bin/env python
"""Ahead-of-time check of every Triton kernel in kernels/ for the H100 (sm_90), without a GPU.

What it does:
  1. Calls the real host launchers (kernels.<op>.<op>_fwd / _bwd ...) on `meta` tensors (no
     memory, no device) at the paper / anchor sizes, with Triton's launch entry points patched
     to RECORD each launch (kernel, positional args, constexpr kwargs, grid) instead of running
     it. The few device queries of the launchers (SM count, fast-rcp switch, "is this CUDA")
     are patched to answer as an H100 (132 SMs) would.
  2. For every recorded launch and EVERY config of the kernel's autotune list (the Autotuner's
     `.configs`, TRITON_INTERPRET unset, so all of them; plain @triton.jit kernels: the launch's
     own options), applies the @triton.heuristics, specialises the arguments exactly as the
     Triton runtime does (int32/int64, divisibility by 16, ==1 constants, do_not_specialize),
     compiles for GPUTarget("cuda", 90, 32) with triton.compile(ASTSource(...)) and reads the
     ptxas -v report (registers, spill bytes, stack) and Triton's shared-memory need. No driver
     is needed: ptxas ships in the Triton wheel (triton/backends/nvidia/bin/ptxas, CUDA 12.8),
     and Triton's own cubin step runs it with -v (knobs.nvidia.dump_ptxas_log).
  3. Evaluates the launch grid of each config and checks the CUDA limits (axis 0 < 2^31,
     axes 1 and 2 <= 65535).

Failures (exit status 1): a compile error, shared memory > 232448 bytes (the H100 opt-in
maximum per block), more than 1024 threads, a kernel that needs a global scratch allocator,
or a grid over the limits. Spills are reported (SPILL) but do not fail the run unless
--max-spill is given.

Usage:
    .venv/bin/python scripts/aot_check.py [--jobs 2] [--only cauchy,tier_step] [--csv out.csv]
                                          [--max-spill BYTES] [--cache-dir DIR] [-v]
The configs the launchers' early pruners would drop at that size are still compiled and marked
`pruned` (they run at other sizes). Runtime: ~minutes on 2 cores (every compile runs ptxas).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # every config, GPU code paths (before importing triton)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
MAX_SHARED = 232448          # H100: max dynamic shared memory per block (opt-in), bytes
MAX_THREADS = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)


def _ops() -> tuple[str, ...]:
    from kernels.ops import OPS  # the one list of ops
    return tuple(OPS)


def mod(name: str):
    # kernels/__init__ rebinds kernels.<op> to the public function: fetch the module itself
    return importlib.import_module(f"kernels.{name}")


# ----------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------

@dataclass
class Launch:
    scenario: str
    kernel: object            # Autotuner or JITFunction (whatever the launcher indexed)
    args: tuple
    kwargs: dict
    grid: object


_RECORDED: list[Launch] = []
_SCENARIO = [""]


def _record_autotuner(self, *args, grid=None, warmup=False, **kwargs):
    _RECORDED.append(Launch(_SCENARIO[0], self, args, dict(kwargs), grid))


def _record_jit(self, *args, grid=None, warmup=False, **kwargs):
    _RECORDED.append(Launch(_SCENARIO[0], self, args, dict(kwargs), grid))


@contextlib.contextmanager
def recording(ops):
    """Patch Triton's launch entry points and the launchers' device queries (H100 answers)."""
    patches = [(Autotuner, "run", _record_autotuner), (JITFunction, "run", _record_jit)]
    cuda0 = torch.device("cuda", 0)
    if "cauchy" in ops:
        patches.append((mod("cauchy"), "_fast_rcp", lambda device: True))
    if "vandermonde" in ops:
        v = mod("vandermonde")
        plan = v._plan
        patches += [(v, "_sm_count", lambda index: H100_SMS),
                    (v, "_plan", lambda B, L, device: plan(B, L, cuda0)),
                    (v, "_precision", lambda device: "tf32x3")]
    if {"embed_interleave", "embed_frames"} & set(ops):   # embed_frames' backward is embed_interleave's
        e = mod("embed_interleave")
        fast = e._fast_programs
        patches += [(e, "_sm_count", lambda index: H100_SMS),
                    (e, "_fast_programs", lambda device, *a: fast(cuda0, *a))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


# Scenarios: the launchers called at the paper / anchor sizes (meta tensors: nothing allocated),
# declared once per op in the registry (kernels.ops.OPS[op].compile_cases)

def scenarios(op: str):
    from kernels.ops import OPS
    return OPS[op].compile_cases()


# ----------------------------------------------------------------------------------------------
# Expanding launches into (config, compile job)
# ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    op: str
    scenario: str
    kernel: str
    config: str
    pruned: bool
    grid: tuple | None
    grid_error: str
    key: str
    jit: JITFunction = field(repr=False, default=None)
    call_kwargs: dict = field(repr=False, default=None)
    args: tuple = field(repr=False, default=None)


def _chain(kernel):
    """(autotuner or None, [heuristics...], jit function)."""
    tuner, heur = None, []
    k = kernel
    if isinstance(k, Autotuner):
        tuner, k = k, k.fn
    while isinstance(k, Heuristics):
        heur.append(k)
        k = k.fn
    assert isinstance(k, JITFunction), type(k)
    return tuner, heur, k


_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _config_label(kw: dict, opts: dict) -> str:
    s = ",".join(f"{k}={v}" for k, v in kw.items())
    o = f"w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)}"
    if opts.get("maxnreg"):
        o += f" r{opts['maxnreg']}"
    return f"{s} {o}".strip()


def _same_config(a, b) -> bool:
    return a.all_kwargs() == b.all_kwargs()


def _eval_grid(grid, nargs: dict):
    try:
        g = grid(nargs) if callable(grid) else grid
        g = tuple(int(x) for x in g)
        g = g + (1,) * (3 - len(g))
        bad = [f"axis {i} = {n} > {MAX_GRID[i]}" for i, n in enumerate(g) if n > MAX_GRID[i] or n < 0]
        return g, "; ".join(bad)
    except Exception as e:  # pragma: no cover - reported in the table
        return None, f"grid: {type(e).__name__}: {e}"


def expand(launch: Launch, op: str) -> list[Job]:
    tuner, heur, jit = _chain(launch.kernel)
    nargs = dict(zip(jit.arg_names, launch.args))
    if tuner is not None:
        configs = list(tuner.configs)
        kept = configs
        if tuner.early_config_prune:
            kept = tuner.early_config_prune(configs, nargs, **launch.kwargs)
        items = []
        for cfg in configs:
            items.append((cfg, not any(_same_config(cfg, k) for k in kept)))
        # a pruner may rewrite configs (embed's clamp): compile the rewritten ones too
        for k in kept:
            if not any(_same_config(k, c) for c in configs):
                items.append((k, False))
    else:
        items = [(None, False)]
    jobs = []
    for cfg, pruned in items:
        kw = dict(launch.kwargs)
        cfg_kw = cfg.all_kwargs() if cfg is not None else {}
        kw.update(cfg_kw)
        for h in reversed(heur):  # outermost first, as at run time
            for name, fn in h.values.items():
                kw[name] = fn({**nargs, **kw})
        shown = {k: v for k, v in (cfg.kwargs.items() if cfg is not None else ())}
        if cfg is None:
            opts = {k: launch.kwargs[k] for k in _OPTION_KEYS if k in launch.kwargs}
            label = "fixed " + _config_label({}, opts)
        else:
            opts = {k: v for k, v in cfg_kw.items() if k in _OPTION_KEYS}
            label = _config_label(shown, opts)
        grid, gerr = _eval_grid(launch.grid, {**nargs, **kw})
        jobs.append(Job(op, launch.scenario, jit.fn.__name__, label, pruned, grid, gerr, "",
                        jit, kw, launch.args))
    return jobs


_BACKEND = None
_BINDERS: dict = {}


def _specialise(job: Job):
    """What JITFunction.run does before compiling: bind, specialise, pack (options, signature,
    constexprs, attrs) for the sm_90 backend."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(TARGET)
    jit = job.jit
    binder = _BINDERS.get(id(jit))
    if binder is None:
        binder = _BINDERS[id(jit)] = create_function_from_signature(jit.signature, jit.params, _BACKEND)
    kw = dict(job.call_kwargs)
    kw.setdefault("debug", False)
    kw["instrumentation_mode"] = ""
    bound, spec, options = binder(*job.args, **kw)
    return jit._pack_args(_BACKEND, kw, bound, spec, options)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "smem_static": re.compile(r"(\d+) bytes smem"),
}


# ----------------------------------------------------------------------------------------------
# SASS: the hot loop of a compiled kernel (nvdisasm ships in the Triton wheel)
# ----------------------------------------------------------------------------------------------

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRA = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin (nvdisasm -c: code only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


def sass_loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(instructions, innermost loops): a loop is the span from a label to a later branch back
    to it (several back branches to one label: one loop, to the last); innermost: contains no
    other loop; in address order. NOPs are dropped (padding, not work)."""
    instrs: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _SASS_INSTR.match(line)
        if m and not m.group(1).startswith("NOP"):
            instrs.append(m.group(1))
    ends: dict[int, int] = {}
    for i, text in enumerate(instrs):
        m = _SASS_BRA.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            start = labels[m.group(1)]
            ends[start] = max(ends.get(start, i), i)
    loops = sorted(ends.items())
    inner = [(a, b) for a, b in loops
             if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    return instrs, inner


def hot_loop_metrics(sass: str, kernel: str, kw: dict) -> dict:
    """Instructions of the kernel's hot loop (kernels.ops HotLoop: which loop, what one iteration
    does) per unit of work per thread. Undeclared kernels: the first innermost loop, per
    iteration."""
    from kernels.ops import hot_loop, units_per_thread
    instrs, inner = sass_loops(sass)
    decl = hot_loop(kernel)
    which = 0 if decl is None else decl.loop
    whole = which is None or which >= len(inner)
    if whole:
        n, where = len(instrs), "kernel"
    else:
        a, b = inner[which]
        n, where = b - a + 1, f"loop {which + 1}/{len(inner)}"
    unit, per_thread = units_per_thread(kernel, kw, whole)
    return dict(loop_instrs=n, loop=where, unit=unit, per_unit=round(n / per_thread, 3),
                sass_instrs=len(instrs))


def compile_job(job: Job) -> dict:
    """Compile one (kernel, config) for sm_90; returns the metrics (runs in a worker process)."""
    res = dict(status="ok", error="", regs=None, spill_st=None, spill_ld=None, stack=None,
               shared=None, threads=None, scratch=0, seconds=0.0, loop_instrs=None, loop="",
               unit="", per_unit=None, sass_instrs=None)
    t0 = time.time()
    try:
        options, signature, constexprs, attrs = _specialise(job)
        buf = io.StringIO()
        saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True   # a cache hit would skip ptxas and its report
        try:
            with contextlib.redirect_stdout(buf):
                k = triton.compile(ASTSource(job.jit, signature, constexprs, attrs), target=TARGET,
                                   options=options.__dict__)
        finally:  # (restored: tests/test_static_gate.py compiles in a pytest process)
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        log = buf.getvalue()
        md = k.metadata
        res.update(hot_loop_metrics(disassemble(k.asm["cubin"]), job.kernel, job.call_kwargs))
        res["shared"] = md.shared
        res["threads"] = md.num_warps * 32
        res["scratch"] = (getattr(md, "global_scratch_size", 0) or 0) + (getattr(md, "profile_scratch_size", 0) or 0)
        for name, rx in _PTXAS_RE.items():
            m = rx.search(log)
            res[name] = int(m.group(1)) if m else None
        if res["regs"] is None:  # fallback: the .reg declarations of the PTX (virtual, upper bound)
            res["regs"] = sum(int(n) for n in re.findall(r"\.reg \.\S+ \s*%\w+<(\d+)>", k.asm["ptx"]))
            res["error"] = "no ptxas report: regs = PTX virtual registers"
        problems = []
        if md.shared > MAX_SHARED:
            problems.append(f"shared memory {md.shared} B > {MAX_SHARED} B")
        if res["threads"] > MAX_THREADS:
            problems.append(f"{res['threads']} threads > {MAX_THREADS}")
        if res["scratch"]:
            problems.append(f"needs {res['scratch']} B of global scratch (triton.set_allocator)")
        if problems:
            res["status"] = "FAIL"
            res["error"] = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - every failure goes in the table
        res["status"] = "ERROR"
        msg = f"{type(e).__name__}: {e}".strip()
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        first = lines[0] if lines else type(e).__name__
        carets = [i for i, ln in enumerate(lines) if set(ln) == {"^"}]
        if carets:  # Triton CompilationError: "at L:C:", source excerpt, "^", then the message
            i = carets[-1]
            where = re.match(r"\w+: at (\d+:\d+)", lines[0])
            tail = " ".join(lines[i + 1:]) or lines[-1]
            first = f"{type(e).__name__} at {where.group(1) if where else '?'} ({lines[i - 1][:60]}): {tail}"
        else:
            for ln in lines:
                if re.search(r"error|Error|assert|out of|exceed", ln):
                    first = ln
                    break
        res["error"] = first[:300]
        res["trace"] = "".join(traceback.format_exception(e))[-4000:]
    res["seconds"] = time.time() - t0
    return res


_JOBS: list[Job] = []


def _worker(i: int) -> tuple[int, dict]:
    return i, compile_job(_JOBS[i])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--csv", default="", help="also write the full table here")
    ap.add_argument("--max-spill", type=int, default=-1,
                    help="fail a config that spills more than this many bytes (default: report only)")
    ap.add_argument("--cache-dir", default="",
                    help="Triton cache dir to fill (e.g. to carry compiled sm_90 kernels to the GPU "
                         "machine as TRITON_CACHE_DIR); default: a temporary dir")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the traceback of errors")
    ap.add_argument("--baseline", default=BASELINE,
                    help="the static gate's baseline (default: bench/baselines/sm90_static.json)")
    ap.add_argument("--update-baseline", action="store_true",
                    help="write the baseline from this run (for the ops checked) instead of comparing")
    ap.add_argument("--reason", default="", help="why the baseline changes (stored in it)")
    ap.add_argument("--markdown", default="", help="write the static table (markdown) here")
    ap.add_argument("--benchmarks-md", default="",
                    help="write the static table between the static-gate markers of this file "
                         "(BENCHMARKS.md)")
    a = ap.parse_args(argv)

    known = _ops()
    ops = [o for o in (a.only.split(",") if a.only else known) if o]
    for o in ops:
        if o not in known:
            ap.error(f"unknown op {o!r} (choose from {', '.join(known)})")
    if a.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(a.cache_dir)
        return _main(a, ops)
    tmp = tempfile.mkdtemp(prefix="aot_check_cache_")   # ~0.6 MB per compile: removed at the end
    os.environ["TRITON_CACHE_DIR"] = tmp
    try:
        return _main(a, ops)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(a, ops) -> int:

    import kernels  # noqa: F401  (registers the ops; TRITON_INTERPRET is unset: all configs)
    from kernels._utils import interpreting
    assert not interpreting()

    # 1. record the launches
    launches: list[tuple[str, Launch]] = []
    scenario_errors = []
    with recording(ops), torch.no_grad():
        for op in ops:
            for name, call in scenarios(op):
                _SCENARIO[0] = name
                n0 = len(_RECORDED)
                try:
                    call()
                except Exception as e:  # noqa: BLE001
                    scenario_errors.append((op, name, f"launcher raised {type(e).__name__}: {e}"))
                launches += [(op, rec) for rec in _RECORDED[n0:]]

    # 2. expand into jobs, dedupe identical compiles (same kernel, signature, constexprs, options)
    all_jobs: list[Job] = []
    for op, launch in launches:
        all_jobs += expand(launch, op)
    unique: dict[str, int] = {}
    for job in all_jobs:
        try:
            options, signature, constexprs, attrs = _specialise(job)
            job.key = repr((job.kernel, sorted(signature.items()), sorted(constexprs.items()),
                            sorted((k, str(v)) for k, v in attrs.items()),
                            sorted((k, str(v)) for k, v in options.__dict__.items())))
        except Exception as e:  # noqa: BLE001 - compile_job reports it
            job.key = f"unspecialisable:{id(job)}:{e}"
        if job.key not in unique:
            unique[job.key] = len(_JOBS)
            _JOBS.append(job)
    print(f"{len(launches)} launches recorded from {sum(1 for op in ops for _ in scenarios(op))} "
          f"scenarios -> {len(all_jobs)} (launch, config) pairs, {len(_JOBS)} distinct compiles "
          f"for sm_90 ({a.jobs} workers)", flush=True)

    # 3. compile
    t0 = time.time()
    results: dict[int, dict] = {}
    if a.jobs > 1:
        with ProcessPoolExecutor(max_workers=a.jobs) as ex:
            for n, (i, r) in enumerate(ex.map(_worker, range(len(_JOBS))), 1):
                results[i] = r
                if n % 20 == 0:
                    print(f"  ... {n}/{len(_JOBS)} compiled ({time.time() - t0:.0f} s)", flush=True)
    else:
        for i in range(len(_JOBS)):
            results[i] = compile_job(_JOBS[i])
    print(f"compiled in {time.time() - t0:.0f} s\n")

    # 4. the table: one row per (op, kernel, config) (scenarios folded; grid = the largest seen)
    rows = {}
    failures = 0
    spill_rows = 0
    for job in all_jobs:
        r = results[unique[job.key]]
        status, err = r["status"], r["error"]
        if job.grid_error:
            status = "FAIL" if status == "ok" else status
            err = (err + "; " if err else "") + f"{job.scenario}: {job.grid_error}"
        spill = (r["spill_st"] or 0) + (r["spill_ld"] or 0)
        if status == "ok" and a.max_spill >= 0 and spill > a.max_spill:
            status, err = "FAIL", f"spills {spill} B > --max-spill {a.max_spill}"
        rk = (job.op, job.kernel, job.config, r["regs"], r["shared"], job.key)
        row = rows.get(rk)
        if row is None:
            row = rows[rk] = dict(op=job.op, kernel=job.kernel, config=job.config, status=status,
                                  regs=r["regs"], spill_st=r["spill_st"], spill_ld=r["spill_ld"],
                                  stack=r["stack"], shared=r["shared"], threads=r["threads"],
                                  pruned_everywhere=job.pruned, grid=job.grid, error=err,
                                  scenarios=[job.scenario], seconds=r["seconds"],
                                  trace=r.get("trace", ""), loop_instrs=r["loop_instrs"],
                                  loop=r["loop"], unit=r["unit"], per_unit=r["per_unit"])
        else:
            row["scenarios"].append(job.scenario)
            row["pruned_everywhere"] = row["pruned_everywhere"] and job.pruned
            if job.grid and (row["grid"] is None or job.grid > row["grid"]):
                row["grid"] = job.grid
            if status != "ok" and row["status"] == "ok":
                row["status"], row["error"] = status, err
    hdr = (f"{'case (first scenario, +more)':<50}{'kernel':<37}{'config':<56}{'status':<7}{'regs':>5}"
           f"{'spill':>7}{'stack':>6}{'smem':>8}{'hot':>6}{'/unit':>9} {'max grid':<16} note")
    print(hdr)
    print("-" * len(hdr))
    for row in rows.values():
        spill = None if row["spill_st"] is None else row["spill_st"] + (row["spill_ld"] or 0)
        st = row["status"]
        if st == "ok" and spill:
            st = "SPILL"
            spill_rows += 1
        if row["status"] != "ok":
            failures += 1
        note = row["error"]
        if row["pruned_everywhere"]:
            note = ("pruned at these sizes; " + note).rstrip("; ")
        grid = "x".join(str(x) for x in row["grid"]) if row["grid"] else "-"
        case = row["scenarios"][0]
        more = len(set(row["scenarios"])) - 1
        case = (case[:44] + (f" +{more}" if more else ""))[:49]
        print(f"{case:<50}{row['kernel'][:36]:<37}{row['config'][:55]:<56}{st:<7}"
              f"{_n(row['regs']):>5}{_n(spill):>7}{_n(row['stack']):>6}{_n(row['shared']):>8}"
              f"{_n(row['loop_instrs']):>6}{_n(row['per_unit']):>9} {grid:<16} {note}")
        if a.verbose and row["trace"]:
            print(row["trace"])
    for op, name, err in scenario_errors:
        failures += 1
        print(f"{name[:49]:<50}{'(launcher)':<37}{'':<56}{'ERROR':<7}{'':>5}{'':>7}{'':>6}{'':>8} {'-':<16} {err}")

    n_rows = len(rows)
    n_pairs = len({(r["kernel"], r["config"]) for r in rows.values()})
    n_bad_pairs = len({(r["kernel"], r["config"]) for r in rows.values() if r["status"] != "ok"})
    print(f"\n{n_pairs} kernel/config pairs ({n_bad_pairs} failing), compiled as {n_rows} "
          f"(kernel, config, argument specialisation) variants ({len(_JOBS)} distinct compiles): "
          f"{n_rows - (failures - len(scenario_errors))} ok, {failures - len(scenario_errors)} failed, "
          f"{spill_rows} spill; "
          f"{len(scenario_errors)} launcher errors "
          f"(registers/spills: ptxas -v for sm_90a; smem: Triton's dynamic shared memory, "
          f"limit {MAX_SHARED} B)")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["op", "kernel", "config", "status", "regs", "spill_stores", "spill_loads",
                        "stack", "shared", "threads", "max_grid", "pruned_everywhere", "error",
                        "hot_loop", "hot_loop_instrs", "unit", "instrs_per_unit", "scenarios"])
            for row in rows.values():
                w.writerow([row["op"], row["kernel"], row["config"], row["status"], row["regs"],
                            row["spill_st"], row["spill_ld"], row["stack"], row["shared"], row["threads"],
                            row["grid"], row["pruned_everywhere"], row["error"], row["loop"],
                            row["loop_instrs"], row["unit"], row["per_unit"], " | ".join(row["scenarios"])])

    # 5. the static regression gate: spills and hot-loop instructions per unit vs the baseline
    current = static_records(rows.values())
    gate_failures = static_gate(a, ops, current)
    return 1 if failures or gate_failures else 0


# ----------------------------------------------------------------------------------------------
# The static regression gate (no GPU): bench/baselines/sm90_static.json
# ----------------------------------------------------------------------------------------------

BASELINE = os.path.join(_ROOT, "bench", "baselines", "sm90_static.json")
TOLERANCE = 0.10            # more hot-loop instructions per unit of work than this fails
H200_SMS, H200_CLOCK_HZ, ISSUE_PER_SM = 132, 1.98e9, 4   # 4 schedulers x 1 warp-instruction/clock


def record_key(row: dict) -> str:
    """A stable name for one compiled variant: kernel, config, first scenario."""
    return f"{row['kernel']} | {row['config']} | {row['scenarios'][0]}"


def static_records(rows) -> dict:
    """key -> the figures the gate compares (and BENCHMARKS.md shows)."""
    out = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        out[record_key(row)] = dict(
            op=row["op"], kernel=row["kernel"], regs=row["regs"],
            spill=(row["spill_st"] or 0) + (row["spill_ld"] or 0), smem=row["shared"],
            loop=row["loop"], loop_instrs=row["loop_instrs"], unit=row["unit"],
            per_unit=row["per_unit"], pruned=row["pruned_everywhere"])
    return out


def compare(baseline: dict, current: dict, tol: float = TOLERANCE,
            instructions: bool = True) -> tuple[list[str], list[str]]:
    """(failures, notes) of `current` against `baseline` (both key -> record). A failure: a
    variant that spills where its baseline did not (or a new variant that spills), or more than
    `tol` more hot-loop instructions per unit of work than its baseline."""
    failures, notes = [], []
    for key, cur in current.items():
        base = baseline.get(key)
        if base is None:
            if cur["spill"]:
                failures.append(f"{key}: spills {cur['spill']} B (new, not in the baseline)")
            else:
                notes.append(f"{key}: new (not in the baseline)")
            continue
        if cur["spill"] and not base.get("spill"):
            failures.append(f"{key}: spills {cur['spill']} B (baseline: no spill)")
        b, c = base.get("per_unit"), cur.get("per_unit")
        if instructions and b and c:
            if c > b * (1 + tol):
                failures.append(f"{key}: hot loop {c:g} instructions per {cur['unit']} > baseline "
                                f"{b:g} + {tol:.0%}")
            elif c < b * (1 - tol):
                notes.append(f"{key}: hot loop {c:g} instructions per {cur['unit']} (baseline {b:g}):"
                             f" faster, update the baseline")
    return failures, notes


def load_baseline(path: str) -> dict | None:
    import json
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_baseline(path: str, current: dict, reason: str, old: dict | None, ops) -> None:
    import datetime
    import json
    records = dict((old or {}).get("records", {}))
    records = {k: v for k, v in records.items() if v["op"] not in ops}   # the ops checked: replaced
    records.update(current)
    data = dict(target="sm_90 (ptxas and nvdisasm of the Triton wheel)", triton=triton.__version__,
                updated=datetime.date.today().isoformat(), reason=reason,
                tolerance=TOLERANCE, records=dict(sorted(records.items())))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def static_gate(a, ops, current: dict) -> int:
    """Compare with (or update) the baseline, print the result and the floor table; returns the
    number of failures."""
    base = load_baseline(a.baseline)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(floor_table(current))
    if a.benchmarks_md:
        from bench.report import write_section
        write_section(a.benchmarks_md, "static-gate", floor_table(current))
    if a.update_baseline:
        if not a.reason:
            print("static gate: --update-baseline needs --reason (it is stored with the baseline)")
            return 1
        write_baseline(a.baseline, current, a.reason, base, ops)
        print(f"static gate: baseline {os.path.relpath(a.baseline, _ROOT)} updated "
              f"({len(current)} variants): {a.reason}")
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
    print(f"static gate: {len(current)} variants against the baseline: {len(failures)} regressions "
          f"(a new spill, or > {TOLERANCE:.0%} more hot-loop instructions per unit of work); "
          f"intended? rerun with --update-baseline --reason '...' and commit "
          f"{os.path.relpath(a.baseline, _ROOT)}" if failures else
          f"static gate: {len(current)} variants against the baseline: no new spill, no hot loop "
          f"more than {TOLERANCE:.0%} longer per unit of work")
    return len(failures)


def implied_ms(units: float, per_unit: float) -> float:
    """Issue-bound time at the H200's SM count and boost clock: units x per_unit thread
    instructions = /32 warp instructions over 132 SMs x 4 schedulers x 1.98 GHz. A FLOOR
    ESTIMATE (no latency, no memory, one instruction per scheduler per clock), not a measurement."""
    return units * per_unit / 32 / (H200_SMS * ISSUE_PER_SM * H200_CLOCK_HZ) * 1e3


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
        cfg = "-" if b is None else b["key"].split(" | ")[1]
        lines.append(f"| `{k}` | {len(rs)} | {max(r['regs'] or 0 for r in rs)} | "
                     f"{sum(1 for r in rs if r['spill'])} | {max(r['smem'] or 0 for r in rs)} | "
                     f"{b['loop'] if b else '-'} | {per} | {cfg} |")
    lines += ["", "Implied time at the H200 (132 SMs, 1.98 GHz, 4 warp instructions per SM per clock): "
              "**a floor estimate from instruction counts, not a measurement** (it ignores latency, "
              "memory and the slower MUFU pipe).", "",
              "| op | direction | size | kernels | implied floor (ms) | target (ms) | anchor (ms, H100) |",
              "|---|---|---|---|---|---|---|"]
    for spec in OPS.values():
        for (direction, shape_name), target in spec.targets.items():
            shape = spec.bench[shape_name]
            units = shape["B"] * shape["N"] * shape["L"]
            names = [f"_{spec.name}_fwd_kernel"] + ([f"_{spec.name}_bwd_kernel"] if direction == "fwdbwd" else [])
            if not all(n in best for n in names):
                continue
            ms = sum(implied_ms(units, best[n]["per_unit"]) for n in names)
            lines.append(f"| {spec.name} | {direction} | {shape_name} (N={shape['N']}) | "
                         f"{' + '.join(f'`{n}`' for n in names)} | {ms:.3f} | {target} | "
                         f"{spec.anchors.get((direction, shape_name), '-')} |")
    return "\n".join(lines) + "\n"


def _n(x):
    return "-" if x is None else str(x)


if __name__ == "__main__":
    sys.exit(main())
