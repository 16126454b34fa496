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
META = torch.device("meta")

OPS = ("cauchy", "vandermonde", "embed_interleave", "ssm_step", "dplr_step", "tier_step")


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
    if "embed_interleave" in ops:
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


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


# ----------------------------------------------------------------------------------------------
# Scenarios: the launchers called at the paper / anchor sizes (meta tensors: nothing allocated)
# ----------------------------------------------------------------------------------------------

def scenarios_cauchy():
    c = mod("cauchy")
    N = 32
    for name, vshape, wshape, nodes in [
        ("bench 1024x32, L=16384", (1024, N), (1024, N), 16384 // 2 + 1),
        ("anchor 1024x32, L=65536", (1024, N), (1024, N), 65536 // 2 + 1),
        ("S4 dplr v(4,256,32) w(256,32), L=16384", (4, 256, N), (256, N), 16384 // 2),
    ]:
        v, w, z = meta(*vshape, 2), meta(*wshape, 2), meta(nodes, 2)
        batch = torch.broadcast_shapes(vshape[:-1], wshape[:-1])
        yield f"cauchy fwd {name}", lambda v=v, z=z, w=w: c.cauchy_fwd(v, z, w)
        g = meta(*batch, nodes, 2)
        yield f"cauchy bwd {name}", lambda g=g, v=v, z=z, w=w: c.cauchy_bwd(g, v, z, w)


def scenarios_vandermonde():
    vm = mod("vandermonde")
    # paper / anchor sizes, then N that is not a multiple of the n-block (EVEN_N = False), wider
    # than one n-block (SINGLE_N = False) and the widest block (64), as the GPU tests use them
    for B, N, L in [(1024, 32, 16384), (1024, 32, 65536), (64, 32, 16384), (256, 32, 16384),
                    (16, 17, 5000), (16, 64, 65536), (16, 100, 4096)]:
        v, x = meta(B, N, 2), meta(B, N, 2)
        yield f"vandermonde fwd B={B} N={N} L={L}", lambda v=v, x=x, L=L: vm.vandermonde_fwd(v, x, L)
        g = meta(B, L)
        yield f"vandermonde bwd B={B} N={N} L={L}", lambda g=g, v=v, x=x, L=L: vm.vandermonde_bwd(g, v, x, L)


def scenarios_embed():
    e = mod("embed_interleave")
    B, L, C, D = 16, 64000, 2, 64
    tokens = meta(B, L + 1, C, dtype=torch.int64)[:, :L]   # the trainer's batch[:, :L] view
    for V in (256, 65536):
        for wdt in (torch.float32, torch.bfloat16):
            w = meta(V, D, dtype=wdt)
            for odt in (torch.float32, torch.bfloat16):
                yield (f"embed fwd V={V} w={str(wdt)[6:]} out={str(odt)[6:]}",
                       lambda w=w, odt=odt: e.embed_interleave_fwd(tokens, w, 8.0, odt))
            for gdt in (torch.float32, torch.bfloat16):
                g = meta(B, L * C, D, dtype=gdt)
                for det in (False, True):
                    yield (f"embed bwd V={V} w={str(wdt)[6:]} grad={str(gdt)[6:]} det={det}",
                           lambda g=g, V=V, wdt=wdt, det=det:
                           e.embed_interleave_bwd(g, tokens, V, wdt, 8.0, det))
    # the other token dtypes the public API takes (uint8 needs other=-1 to fit the dtype)
    w, g = meta(256, D), meta(B, L * C, D, dtype=torch.bfloat16)
    for tdt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        tok = meta(B, L, C, dtype=tdt)
        yield (f"embed fwd V=256 tokens={str(tdt)[6:]}",
               lambda tok=tok: e.embed_interleave_fwd(tok, w, 8.0, torch.bfloat16))
        for V in (256, 65536):
            for det in (False, True):
                yield (f"embed bwd V={V} tokens={str(tdt)[6:]} det={det}",
                       lambda tok=tok, V=V, det=det: e.embed_interleave_bwd(g, tok, V, torch.float32, 8.0, det))


def scenarios_ssm_step():
    s = mod("ssm_step")
    H, N = 256, 32
    for B in (1, 256, 1024):
        yield (f"ssm_step B={B} H={H} N={N}",
               lambda B=B: s.ssm_step_fwd(meta(B, H, N, 2), meta(B, H), meta(H, N, 2), meta(H, N, 2),
                                          meta(H, N, 2), meta(H)))


def scenarios_dplr_step():
    d = mod("dplr_step")
    N = 32
    for B, H, r in [(1, 256, 1), (256, 256, 1), (1024, 256, 1), (2, 64, 2)]:  # r = 2: a GPU test
        yield (f"dplr_step B={B} H={H} N={N} r={r}",
               lambda B=B, H=H, r=r: d.dplr_step_fwd(meta(B, H, N, 2), meta(B, H), meta(H, N, 2), meta(H, N, 2),
                                           meta(H, N, 2), meta(H), meta(r, H, N, 2), meta(r, H, N, 2),
                                           meta(r, H, N, 2)))


def scenarios_tier_step():
    t = mod("tier_step")
    N, NL, r = 32, 8, 1
    for H in (64, 128, 256):
        F = 2 * H
        for ssm in ("dplr", "diag"):
            for ff in (True, False):
                for B in (1, 256):
                    def call(H=H, F=F, ssm=ssm, ff=ff, B=B):
                        pqw = [meta(NL, r, H, N, 2) for _ in range(3)] if ssm == "dplr" else [None] * 3
                        ffw = ([meta(NL, H), meta(NL, H), meta(NL, F, H), meta(NL, F), meta(NL, H, F),
                                meta(NL, H)] if ff else [None] * 6)
                        return t.tier_step_fwd(meta(NL, B, H, N, 2), meta(B, H), meta(NL, H), meta(NL, H),
                                               meta(NL, H, N, 2), meta(NL, H, N, 2), meta(NL, H, N, 2),
                                               meta(NL, H), *pqw, meta(NL, 2 * H, H), meta(NL, 2 * H), *ffw)
                    yield f"tier_step H={H} N={N} F={F if ff else 0} n=8 {ssm} ff={ff} B={B}", call
    # bf16 weights (the docstring's bandwidth option): the widest tier, dplr, with FF
    H, F, B, bf = 256, 512, 1, torch.bfloat16
    yield (f"tier_step H={H} N={N} F={F} n=8 dplr ff=True B={B} bf16 weights",
           lambda: t.tier_step_fwd(meta(NL, B, H, N, 2), meta(B, H), meta(NL, H, dtype=bf), meta(NL, H, dtype=bf),
                                   meta(NL, H, N, 2), meta(NL, H, N, 2), meta(NL, H, N, 2), meta(NL, H, dtype=bf),
                                   *[meta(NL, r, H, N, 2) for _ in range(3)],
                                   meta(NL, 2 * H, H, dtype=bf), meta(NL, 2 * H, dtype=bf),
                                   meta(NL, H, dtype=bf), meta(NL, H, dtype=bf), meta(NL, F, H, dtype=bf),
                                   meta(NL, F, dtype=bf), meta(NL, H, F, dtype=bf), meta(NL, H, dtype=bf)))


SCENARIOS = {
    "cauchy": scenarios_cauchy, "vandermonde": scenarios_vandermonde,
    "embed_interleave": scenarios_embed, "ssm_step": scenarios_ssm_step,
    "dplr_step": scenarios_dplr_step, "tier_step": scenarios_tier_step,
}


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


def compile_job(job: Job) -> dict:
    """Compile one (kernel, config) for sm_90; returns the metrics (runs in a worker process)."""
    res = dict(status="ok", error="", regs=None, spill_st=None, spill_ld=None, stack=None,
               shared=None, threads=None, scratch=0, seconds=0.0)
    t0 = time.time()
    try:
        options, signature, constexprs, attrs = _specialise(job)
        buf = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True   # a cache hit would skip ptxas and its report
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(job.jit, signature, constexprs, attrs), target=TARGET,
                               options=options.__dict__)
        log = buf.getvalue()
        md = k.metadata
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
    a = ap.parse_args(argv)

    ops = [o for o in (a.only.split(",") if a.only else OPS) if o]
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r} (choose from {', '.join(OPS)})")
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
            for name, call in SCENARIOS[op]():
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
    print(f"{len(launches)} launches recorded from {sum(1 for op in ops for _ in SCENARIOS[op]())} "
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
                                  trace=r.get("trace", ""))
        else:
            row["scenarios"].append(job.scenario)
            row["pruned_everywhere"] = row["pruned_everywhere"] and job.pruned
            if job.grid and (row["grid"] is None or job.grid > row["grid"]):
                row["grid"] = job.grid
            if status != "ok" and row["status"] == "ok":
                row["status"], row["error"] = status, err
    hdr = (f"{'case (first scenario, +more)':<50}{'kernel':<37}{'config':<56}{'status':<7}{'regs':>5}"
           f"{'spill':>7}{'stack':>6}{'smem':>8} {'max grid':<16} note")
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
              f"{_n(row['regs']):>5}{_n(spill):>7}{_n(row['stack']):>6}{_n(row['shared']):>8} {grid:<16} {note}")
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
                        "stack", "shared", "threads", "max_grid", "pruned_everywhere", "error", "scenarios"])
            for row in rows.values():
                w.writerow([row["op"], row["kernel"], row["config"], row["status"], row["regs"],
                            row["spill_st"], row["spill_ld"], row["stack"], row["shared"], row["threads"],
                            row["grid"], row["pruned_everywhere"], row["error"], " | ".join(row["scenarios"])])
    return 1 if failures else 0


def _n(x):
    return "-" if x is None else str(x)


if __name__ == "__main__":
    sys.exit(main())
