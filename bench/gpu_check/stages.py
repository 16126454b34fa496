"""The stages that run in their own process (the orchestrator, bench/gpu_check/run.py, starts
them with a time box and kills them at its end):

    python -m bench.gpu_check.stages facts|headline|profile --out DIR --deadline EPOCH [--dry-run]

Each figure is written to OUT/gpu_check.json (and OUT/bench.json for timings) as soon as it is
measured. --dry-run: CPU, Triton under TRITON_INTERPRET=1 (set by the orchestrator before any
import), tiny sizes, every figure computed by the same code with the same result fields.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench._common import make_train_step
from bench.gpu_check import ids, record
from bench.gpu_check.ids import GEN_BATCHES, KERNEL_SIZE, N_PAIRS, TRAIN_SHAPES

ROOT = Path(__file__).resolve().parents[2]
DRY_KERNEL = dict(B=4, N=2, L=32)
# anchors.md (public S4 CUDA extension, H100) and design.md's targets, ms
KERNEL_ANCHOR_MS = {("cauchy", "fwd"): 0.724, ("cauchy", "fwdbwd"): 2.49,
                    ("vandermonde", "fwd"): 0.487, ("vandermonde", "fwdbwd"): 1.39}
KERNEL_TARGET_MS = {("cauchy", "fwd"): 0.25, ("cauchy", "fwdbwd"): 1.0,
                    ("vandermonde", "fwd"): 0.15, ("vandermonde", "fwdbwd"): 0.6}
# work counted as bench/test_cauchy.py and bench/test_vandermonde.py count it
CAUCHY_FLOPS_PER_TERM = {"fwd": 14, "fwdbwd": 42}
VANDERMONDE_FLOPS_PER_TERM = {"fwd": 7, "fwdbwd": 21}
DRY_TRAIN_SHAPES = {"mono": (2, 64, 1), "stereo": (1, 64, 2)}
TRAIN_ANCHOR = dict(tokens_per_s=1.00e6, peak_gib=8.36)             # public SaShiMi, mono, H100
TRAIN_TARGET = dict(tokens_per_s=3.0e6, peak_gib=6.0)
DRY_GEN_BATCHES = (1, 2)
GEN_ANCHOR_SAMPLES = {1: 248.0, 256: 44404.0}                       # public SaShiMi, mono, H100
GEN_TARGET_STEPS, GEN_TARGET_SAMPLES = {1: 32000.0}, {256: 2.0e6}
RECURRENCE_STEPS, DRY_RECURRENCE_STEPS = 512, 32
RECURRENCE_TOL = 1e-4
# sub-budgets of the headline stage, seconds on the GPU (scaled to the stage's box); the
# compiled training steps get whatever is left
HEADLINE_PLAN = (("kernels", 60), ("train", 50), ("generation", 45), ("recurrence", 25), ("train_compile", 60))


class Ctx:
    def __init__(self, out: Path, dry: bool, deadline: float):
        self.out, self.dry, self.deadline = out, dry, deadline
        self.cuda = (not dry) and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.gpu_name = torch.cuda.get_device_name() if self.cuda else "dry-run-cpu"

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def time_ms(ctx: Ctx, fn, rep_ms: int) -> list[float]:
    """Per-call times in ms: triton.testing.do_bench (CUDA events, L2 flushed between calls,
    warm-up 50 ms) on the GPU; a short perf_counter loop on CPU. fn has run once before."""
    if ctx.cuda:
        import triton.testing
        times = triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="all")
        return [float(t) for t in times]
    times = []
    end = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 2 or (time.perf_counter() < end and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantiles(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    p50, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return dict(ms_p50=p50, ms_p20=p20, ms_p80=p80, ms_min=min(times), ms_max=max(times), samples=len(times))


def _versions() -> dict:
    import triton
    return dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version())


def machine_info(ctx: Ctx) -> dict:
    v = _versions()
    return dict(gpu_name=ctx.gpu_name, torch=v["torch"], triton=v["triton"], node=platform.node(),
                machine=platform.machine(), python_version=v["python"],
                python_implementation=platform.python_implementation(),
                cpu=dict(brand_raw=_cpu_name(), count=os.cpu_count()))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _info(ctx: Ctx, **kw) -> dict:
    """extra_info keys that bench/_common.run records, for bench.report and bench.compare."""
    v = _versions()
    return dict(gpu_name=ctx.gpu_name, torch=v["torch"], triton=v["triton"],
                git_sha=os.environ.get("GPU_CHECK_SHA", "unknown"), source="bench.gpu_check", **kw)


def _first_call(ctx: Ctx, fn) -> float:
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - t0


def _record_figure(ctx: Ctx, section: str, key: str, rec: dict, bench: tuple | None = None) -> None:
    def fn(d):
        d.setdefault("headline", {}).setdefault(section, {})[key] = rec
    record.update(ctx.out, fn)
    if bench is not None:
        fullname, group, times = bench
        info = {k: v for k, v in rec.items() if k not in ("status", "reason", "label", "fullname")}
        record.add_bench(ctx.out, [record.bench_entry(fullname, group, _info(ctx, **info), times)],
                         machine_info=machine_info(ctx),
                         commit_info=dict(id=os.environ.get("GPU_CHECK_SHA", "unknown"), dirty=None))
    print(f"[headline] {section}/{key}: {rec.get('status')} "
          + (f"{rec.get('ms_p50', 0):.4g} ms" if rec.get("ms_p50") is not None else rec.get("reason", "")), flush=True)


def _skip(ctx, section, key, label, reason, fields):
    rec = dict.fromkeys(fields)
    rec.update(status="skipped", reason=reason, label=label)
    _record_figure(ctx, section, key, rec)


def _error(ctx, section, key, label, exc, fields):
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
    rec = dict.fromkeys(fields)
    rec.update(status="error", reason=msg, label=label)
    _record_figure(ctx, section, key, rec)
    import traceback
    traceback.print_exc()
    ctx.free()


# --------------------------------------------------------------------------------------------
# stage 1: device facts, ceilings, wheels' imports, selftest
# --------------------------------------------------------------------------------------------
def _nvidia_smi() -> dict:
    fields = ("name,driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,"
              "memory.total,power.limit,temperature.gpu,pstate")
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        vals = [v.strip() for v in r.stdout.strip().splitlines()[0].split(",")]
        return dict(zip(fields.split(","), vals))
    except Exception as exc:  # no GPU (dry run) or no nvidia-smi
        return dict(error=f"nvidia-smi: {type(exc).__name__}: {exc}"[:200])


def _packages() -> dict:
    """Version and location of each package the session needs (the wheels' ones first)."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist, mod in (("soundfile", "soundfile"), ("nvtx", "nvtx"), ("constriction", "constriction"),
                      ("hypothesis", "hypothesis"),
                      ("pytest-benchmark", "pytest_benchmark"), ("pytest", "pytest"), ("tqdm", "tqdm"),
                      ("numpy", "numpy"), ("torchaudio", "torchaudio"), ("matplotlib", "matplotlib")):
        try:
            m = import_module(mod)
            try:
                ver = version(dist)
            except PackageNotFoundError:
                ver = getattr(m, "__version__", "?")
            out[dist] = dict(version=ver, path=str(Path(m.__file__).parent))
        except Exception as exc:
            out[dist] = dict(version=None, error=f"{type(exc).__name__}: {exc}"[:200])
    return out


def _ceilings(ctx: Ctx) -> dict:
    """Device copy bandwidth (bytes read + written) and fp32 matmul rate, measured here: what
    fraction_of_floor means on this device (the floors in BENCHMARKS.md are the H100's)."""
    n = (1 << 28) if ctx.cuda else (1 << 20)               # 1 GiB fp32 on the GPU
    x = torch.empty(n, device=ctx.device)
    y = torch.empty_like(x)
    copy = quantiles(time_ms(ctx, lambda: y.copy_(x), 200))
    del x, y
    m = 8192 if ctx.cuda else 256
    a = torch.randn(m, m, device=ctx.device)
    b = torch.randn(m, m, device=ctx.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        mm = quantiles(time_ms(ctx, lambda: a @ b, 200))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del a, b
    ctx.free()
    return dict(copy_gbps=2 * n * 4 / (copy["ms_p50"] * 1e-3) / 1e9, copy_bytes=2 * n * 4, copy_ms_p50=copy["ms_p50"],
                fp32_tflops=2 * m ** 3 / (mm["ms_p50"] * 1e-3) / 1e12, matmul_n=m, matmul_ms_p50=mm["ms_p50"])


# `python -m kernels.selftest` on the GPU with each autotuned kernel held to its first config,
# as the interpreter does (kernels._utils.configs): the self-test's odd shapes are their own
# specialisations, and tuning every config there would compile each kernel's whole list
# (~75 s of ptxas on one core, measured for sm_90 on the 2-core CI machine: ~3x that).
SELFTEST_FIRST_CONFIG = """
import runpy
from triton.runtime.autotuner import Autotuner
_prune = Autotuner.prune_configs
Autotuner.prune_configs = lambda self, kwargs: _prune(self, kwargs)[:1]
runpy.run_module("kernels.selftest", run_name="__main__", alter_sys=True)
"""

_ROW = re.compile(r"^(\S+)\s+(.+?)\s+(\S+)\s+(\S+)\s+(pass|FAIL)\s+(\S+)(.*)$")


def parse_selftest(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if not m or m.group(1) == "op":
            continue
        num = lambda s: float(s) if s not in ("nan", "inf") else None  # noqa: E731
        rows.append(dict(op=m.group(1), path=m.group(2).strip(), max_rel_err=num(m.group(3)),
                         tol=num(m.group(4)), result=m.group(5), ms=num(m.group(6)),
                         note=m.group(7).strip() or None))
    return rows


def stage_facts(ctx: Ctx) -> int:
    dev = dict(name=ctx.gpu_name, type=ctx.device.type, sms=None, memory_gib=None, capability=None,
               l2_mib=None, nvidia_smi=None, cpu=_cpu_name(), cpu_count=os.cpu_count(), host=platform.node())
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        dev.update(sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30,
                   capability=f"{p.major}.{p.minor}", l2_mib=getattr(p, "L2_cache_size", 0) / 2**20,
                   sm_clock_mhz=getattr(p, "clock_rate", 0) / 1e3,
                   memory_clock_mhz=getattr(p, "memory_clock_rate", 0) / 1e3,
                   memory_bus_bits=getattr(p, "memory_bus_width", None))
    dev["nvidia_smi"] = _nvidia_smi()
    versions = _versions()
    versions["packages"] = _packages()
    missing = [k for k, v in versions["packages"].items() if v.get("version") is None and k != "matplotlib"]
    record.update(ctx.out, lambda d: d.update(device=dev, versions=versions))
    print(f"[facts] {dev['name']}, torch {versions['torch']}, triton {versions['triton']}; "
          f"missing packages: {missing or 'none'}", flush=True)
    try:
        ceilings = _ceilings(ctx)
    except Exception as exc:
        ceilings = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    record.put(ctx.out, "ceilings", None, ceilings)
    print(f"[facts] ceilings {ceilings}", flush=True)

    t0 = time.time()
    try:
        cmd = [sys.executable, "-m", "kernels.selftest"] if ctx.dry else \
            [sys.executable, "-c", SELFTEST_FIRST_CONFIG]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, ctx.left() - 2), cwd=ROOT)
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = "timeout"
    print(text, flush=True)
    rows = parse_selftest(text)
    path = rows[0]["path"] if rows else None
    sf = dict(rc=rc, rows=rows, path=path, command=" ".join(cmd[:3]),
              autotune="every config (interpreter: the first)" if ctx.dry else
              "each kernel's first config (the full autotuning runs in the headline and tests stages)", all_pass=rc == 0 and len(rows) > 0 and all(x["result"] == "pass" for x in rows),
              wall_s=record.elapsed(t0))
    record.put(ctx.out, "selftest", None, sf)
    return 0 if sf["all_pass"] and not missing else 1


# --------------------------------------------------------------------------------------------
# stage 2: headline figures
# --------------------------------------------------------------------------------------------
KERNEL_FIELDS = ("fullname", "op", "direction", "provider", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80",
                 "ms_min", "ms_max", "samples", "first_call_s", "gflops", "gbps", "floor_ms",
                 "fraction_of_floor", "anchor_ms", "target_ms", "meets_target", "peak_gib")


def _factory(name: str):
    """An input factory of kernels/ (kernels.ops since the op registry; the op module before)."""
    import importlib
    for modname in ("kernels.ops", "kernels.cauchy", "kernels.vandermonde"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"no input factory {name} in kernels.ops / kernels.cauchy / kernels.vandermonde")


def _kernel_case(ctx: Ctx, op: str, direction: str, provider: str, B: int, N: int, L: int):
    """(fn, flops, nbytes, reference buffers) for one kernel figure: the inputs bench/ uses."""
    import kernels
    g = torch.Generator().manual_seed(0)
    grad = direction == "fwdbwd"
    if op == "cauchy":
        s4_like_inputs = _factory("s4_like_inputs")
        v, z, w = s4_like_inputs(B // 4, N, 2 * L, sums=4, generator=g, device=ctx.device)
        z = z[:L].contiguous()
        v.requires_grad_(grad)
        w.requires_grad_(grad)
        flops = CAUCHY_FLOPS_PER_TERM[direction] * B * N * L
        nbytes = (16 if grad else 8) * B * L
        if grad:
            G = torch.randn(4, B // 4, L, dtype=torch.complex64, device=ctx.device)
            fn = lambda: torch.autograd.grad(kernels.cauchy(v, z, w, backend=provider), (v, w), G)  # noqa: E731
        else:
            def fn():
                with torch.no_grad():
                    return kernels.cauchy(v, z, w, backend=provider)
        return fn, flops, nbytes
    make_s4d_inputs = _factory("make_s4d_inputs")
    v, x = make_s4d_inputs((B,), N, "lin", generator=g, device=ctx.device)
    v.requires_grad_(grad)
    x.requires_grad_(grad)
    flops = VANDERMONDE_FLOPS_PER_TERM[direction] * B * N * L
    nbytes = (2 * B * L * 4 + 6 * B * N * 8) if grad else (B * L * 4 + 2 * B * N * 8)
    if grad:
        G = torch.randn(B, L, device=ctx.device)
        fn = lambda: torch.autograd.grad(kernels.vandermonde(v, x, L, backend=provider), (v, x), G)  # noqa: E731
    else:
        def fn():
            with torch.no_grad():
                return kernels.vandermonde(v, x, L, backend=provider)
    return fn, flops, nbytes


def headline_kernels(ctx: Ctx, deadline: float) -> None:
    from bench._common import H100_BYTES_PER_S, H100_FP32_FLOPS
    if ctx.dry:
        B, N, L = DRY_KERNEL["B"], DRY_KERNEL["N"], DRY_KERNEL["L"]
    else:
        B, N, L = KERNEL_SIZE["B"], N_PAIRS, KERNEL_SIZE["L"]
    mem = torch.cuda.get_device_properties(0).total_memory if ctx.cuda else 2**34
    for direction in ("fwd", "fwdbwd"):          # a short time box still gets both ops' forwards
        for op in ("cauchy", "vandermonde"):
            for provider in ("triton", "reference"):
                key = f"{op}-{direction}-{provider}"
                label = f"{op} {direction} B={B} N/2={N} L={L} {provider}"
                fullname = ids.kernel_id(op, direction, provider) if not ctx.dry else \
                    f"bench/gpu_check::dry_{op}_{direction}[{provider}-B{B}-L{L}]"
                if time.time() > deadline:
                    _skip(ctx, "kernels", key, label, "headline time box (kernels) spent", KERNEL_FIELDS)
                    continue
                need = (3 if direction == "fwd" else 6) * B * N * L * 8
                if provider == "reference" and need > 0.45 * mem:
                    _skip(ctx, "kernels", key, label, f"the reference would materialise ~{need / 2**30:.0f} GiB",
                          KERNEL_FIELDS)
                    continue
                try:
                    fn, flops, nbytes = _kernel_case(ctx, op, direction, provider, B, N, L)
                    if ctx.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    first = _first_call(ctx, fn)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None
                    times = time_ms(ctx, fn, 300 if ctx.cuda else 0)
                    q = quantiles(times)
                    s = q["ms_p50"] * 1e-3
                    floor_s = max(nbytes / H100_BYTES_PER_S, flops / H100_FP32_FLOPS if op == "cauchy" else 0.0)
                    target = KERNEL_TARGET_MS.get((op, direction)) if provider == "triton" else None
                    rec = dict(status="ok", label=label, fullname=fullname, op=op, direction=direction,
                               provider=provider, shape=dict(B=B, N=N, L=L), dtype="complex64", **q,
                               first_call_s=first, gflops=flops / s / 1e9, gbps=nbytes / s / 1e9,
                               floor_ms=floor_s * 1e3, fraction_of_floor=floor_s / s,
                               anchor_ms=KERNEL_ANCHOR_MS.get((op, direction)) if not ctx.dry else None,
                               target_ms=target if not ctx.dry else None,
                               meets_target=(q["ms_p50"] <= target) if (target and not ctx.dry) else None,
                               peak_gib=peak)
                    _record_figure(ctx, "kernels", key, rec,
                                   (fullname, f"{op}-{direction}-B{B}-N{N}-L{L}", times))
                    del fn
                    ctx.free()
                except Exception as exc:  # noqa: BLE001 - recorded, the stage goes on
                    _error(ctx, "kernels", key, label, exc, KERNEL_FIELDS)


TRAIN_FIELDS = ("fullname", "op", "direction", "provider", "shape", "dtype", "preset", "compiled",
                "compile_backend", "ms_p50", "ms_p20", "ms_p80", "ms_min", "ms_max", "samples", "first_call_s",
                "tokens_per_step", "tokens_per_s", "ms_per_step", "peak_gib", "parameters",
                "anchor_tokens_per_s", "anchor_peak_gib", "target_tokens_per_s", "target_peak_gib", "meets_target")


def _train_cfg(ctx: Ctx) -> tuple[str, dict]:
    from sashimi.model import PRESETS
    if ctx.dry:   # a smaller tiny model on the reference kernels (the kernel figures and the
        # selftest run the Triton code under the interpreter; here it would take minutes)
        return "tiny", dict(PRESETS["tiny"], n_layers=1, kernel_backend="reference")
    return "paper", dict(PRESETS["paper"], kernel_backend="auto")


def _train_one(ctx: Ctx, ch: str, precision: str, compiled: bool, section: str) -> float | None:
    from sashimi.model import count_parameters
    preset, cfg_kw = _train_cfg(ctx)
    B, L, C = (DRY_TRAIN_SHAPES if ctx.dry else TRAIN_SHAPES)[ch]
    key = f"{ch}-{precision}"
    shape_id = ids.train_shape_id(preset, ch, B, L, C)
    label = f"{preset} {ch} B={B} x L={L}" + (f" x {C}" if C == 2 else "") + f" {precision}" + \
        (" compiled" if compiled else " eager")
    backend = ("inductor" if ctx.cuda else "eager") if compiled else None
    if compiled:
        fullname = f"bench/gpu_check::test_train_step_compiled[triton-{shape_id}-{precision}]"
    elif ctx.dry:
        fullname = f"bench/gpu_check::dry_train_step[triton-{shape_id}-{precision}]"
    else:
        fullname = ids.train_id(ch, precision)
    if precision == "bf16" and ctx.cuda and not torch.cuda.is_bf16_supported():
        _skip(ctx, section, key, label, "no bf16 on this GPU", TRAIN_FIELDS)
        return None
    ctx.free()
    step, model, tokens = make_train_step(cfg_kw, B, L, C, precision, ctx.device, backend)
    try:
        t0 = time.perf_counter()
        for _ in range(2):      # compile / autotune every kernel, the optimiser state
            step()
        ctx.sync()
        first = time.perf_counter() - t0
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        ctx.sync()
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None
        times = time_ms(ctx, step, 1000 if ctx.cuda else 0)
        q = quantiles(times)
        tps = tokens / (q["ms_p50"] * 1e-3)
        paper = preset == "paper"
        anchor = paper and C == 1            # as bench/test_train_step.py records it
        rec = dict(status="ok", label=label, fullname=fullname, op="train_step", direction="fwdbwd",
                   provider="triton+compile" if compiled else "triton", shape=dict(B=B, L=L, C=C),
                   dtype=precision, preset=preset, compiled=compiled, compile_backend=backend, **q,
                   first_call_s=first, tokens_per_step=tokens, tokens_per_s=tps, ms_per_step=q["ms_p50"],
                   peak_gib=peak, parameters=count_parameters(model),
                   anchor_tokens_per_s=TRAIN_ANCHOR["tokens_per_s"] if anchor else None,
                   anchor_peak_gib=TRAIN_ANCHOR["peak_gib"] if anchor else None,
                   target_tokens_per_s=TRAIN_TARGET["tokens_per_s"] if paper else None,
                   target_peak_gib=TRAIN_TARGET["peak_gib"] if paper else None,
                   meets_target=(tps >= TRAIN_TARGET["tokens_per_s"] and peak is not None
                                 and peak <= TRAIN_TARGET["peak_gib"]) if paper else None)
        _record_figure(ctx, section, key, rec,
                       (fullname, f"train_step-{preset}-B{B}-L{L}-C{C}-{precision}", times))
        return first
    finally:
        del step, model
        if compiled:
            torch._dynamo.reset()
        ctx.free()


DRY_COMPILED = (("stereo", "bf16"),)   # the rehearsal compiles one of the four (autocast, stereo)


def headline_train(ctx: Ctx, deadline: float, compiled: bool) -> None:
    section = "train_compile" if compiled else "train"
    estimate = 0.0
    for ch in ("mono", "stereo"):
        for precision in ("fp32", "bf16"):
            key = f"{ch}-{precision}"
            label = f"{ch} {precision} {'compiled' if compiled else 'eager'}"
            if compiled and ctx.dry and (ch, precision) not in DRY_COMPILED:
                _skip(ctx, section, key, label, "dry run: one compiled variant rehearses the path "
                      "(a torch.compile trace costs ~10 s on 2 cores)", TRAIN_FIELDS)
                continue
            left = deadline - time.time()
            if left <= 0 or (compiled and left < estimate):
                _skip(ctx, section, key, label, f"headline time box ({section}) spent"
                      + (f": {left:.0f} s left, the last compile took {estimate / 1.2:.0f} s" if compiled and left > 0 else ""),
                      TRAIN_FIELDS)
                continue
            try:
                first = _train_one(ctx, ch, precision, compiled, section)
                if first:
                    estimate = 1.2 * first
            except Exception as exc:  # noqa: BLE001
                _error(ctx, section, key, label, exc, TRAIN_FIELDS)


GEN_FIELDS = ("fullname", "op", "direction", "provider", "shape", "dtype", "preset", "batch", "channels",
              "steps_per_call", "ms_p50", "ms_p20", "ms_p80", "ms_min", "ms_max", "samples", "first_call_s",
              "steps_per_s", "samples_per_s", "us_per_step", "realtime_factor", "anchor_samples_per_s",
              "target_steps_per_s", "target_samples_per_s", "meets_target")


def _sampler_runner(model, batch: int, steps: int, graphs: bool):
    """sashimi.generate's step sampler: CUDA graphs replayed (graphs=True, as bench/
    test_generation.py's "graphs" provider), or the same sampler stepped eagerly."""
    from sashimi.generate import StepSampler, capture_step_graphs, run_steps
    model.setup_step()
    device = model.embedding.weight.device
    n = 1 << 16
    tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
    loglik = torch.zeros(batch, dtype=torch.float64, device=device)
    sampler = StepSampler(model, model.default_state(batch), tokens, loglik, 0,
                          generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        captured = capture_step_graphs(sampler) if graphs else None
    carry = dict(t=0, written=0)

    @torch.no_grad()
    def loop():
        t = carry["t"]
        if carry["written"] + steps >= n:       # keep the device-side write index in range
            sampler.pos.zero_()
            carry["written"] = 0
        run_steps(sampler, t, t + steps, captured)
        carry["t"], carry["written"] = t + steps, carry["written"] + steps
    return loop


def headline_generation(ctx: Ctx, deadline: float) -> None:
    from bench.test_generation import STEPS_PER_CALL, make_model
    preset = "tiny" if ctx.dry else "paper"
    batches = DRY_GEN_BATCHES if ctx.dry else GEN_BATCHES
    steps = 16 if ctx.dry else STEPS_PER_CALL
    for ch, C in (("mono", 1), ("stereo", 2)):
        for batch in batches:
            for provider in ("graphs", "eager"):
                key = f"{ch}-B{batch}-{provider}"
                label = f"{preset} {ch} batch {batch} {provider}"
                if provider == "graphs" and ctx.dry:
                    label += " (dry run: the sampler stepped eagerly; CUDA graphs need a GPU)"
                fullname = (ids.generation_id(provider, ch, batch) if not ctx.dry else f"bench/gpu_check::dry_generation[{provider}-{preset}-{ch}-B{batch}]")
                if time.time() > deadline:
                    _skip(ctx, "generation", key, label, "headline time box (generation) spent", GEN_FIELDS)
                    continue
                try:
                    ctx.free()
                    model = make_model(preset, C, ctx.device, kernel_backend="auto" if ctx.cuda else "reference")
                    if provider == "graphs":
                        fn = _sampler_runner(model, batch, steps, graphs=ctx.cuda)
                    else:
                        from bench.test_generation import RUNNERS
                        model.setup_step()
                        fn = RUNNERS["eager"](model, batch) if not ctx.dry else _sampler_runner(model, batch, steps, False)
                    first = _first_call(ctx, fn)
                    times = time_ms(ctx, fn, 300 if ctx.cuda else 0)
                    q = quantiles(times)
                    sps = steps / (q["ms_p50"] * 1e-3)
                    samples = batch * sps / C
                    paper = preset == "paper"
                    t_steps = GEN_TARGET_STEPS.get(batch) if paper else None
                    t_samples = GEN_TARGET_SAMPLES.get(batch) if paper else None
                    met = [x for x in ((sps >= t_steps) if t_steps else None,
                                       (samples >= t_samples) if t_samples else None) if x is not None]
                    rec = dict(status="ok", label=label, fullname=fullname, op="generation", direction="fwd",
                               provider=provider, shape=dict(B=batch, C=C), dtype="fp32", preset=preset,
                               batch=batch, channels=C, steps_per_call=steps, **q, first_call_s=first,
                               steps_per_s=sps, samples_per_s=samples, us_per_step=q["ms_p50"] * 1e3 / steps,
                               realtime_factor=sps / C / model.cfg.sample_rate,
                               anchor_samples_per_s=GEN_ANCHOR_SAMPLES.get(batch) if paper and C == 1 else None,
                               target_steps_per_s=t_steps, target_samples_per_s=t_samples,
                               meets_target=all(met) if met else None)
                    _record_figure(ctx, "generation", key, rec,
                                   (fullname, f"generation-{preset}-B{batch}-C{C}", times))
                    del fn, model
                    ctx.free()
                except Exception as exc:  # noqa: BLE001
                    _error(ctx, "generation", key, label, exc, GEN_FIELDS)


REC_FIELDS = ("preset", "channels", "ssm", "steps", "batch", "rel_err", "tolerance", "meets_target",
              "public_diagonal_rel_err", "seconds")


def headline_recurrence(ctx: Ctx, deadline: float) -> None:
    """Token-by-token steps (the fused tier_step kernel) against the convolutional forward
    (the Cauchy / Vandermonde kernels), random init, batch 2, float32: max |diff| / max |conv|."""
    from sashimi.model import PRESETS, ModelConfig, SaShiMi
    preset = "tiny" if ctx.dry else "paper"
    total = DRY_RECURRENCE_STEPS if ctx.dry else RECURRENCE_STEPS
    for C in (1, 2):
        for ssm in ("dplr", "diag"):
            key = f"{'mono' if C == 1 else 'stereo'}-{ssm}"
            label = f"{preset} {'mono' if C == 1 else 'stereo'} {ssm}, {total} steps"
            if time.time() > deadline:
                _skip(ctx, "recurrence", key, label, "headline time box (recurrence) spent", REC_FIELDS)
                continue
            try:
                t0 = time.perf_counter()
                torch.manual_seed(2)
                frames = total // C
                # the dry run: reference kernels (tier_step under the interpreter: ~100 s)
                cfg = ModelConfig(**dict(PRESETS[preset], seq_len=frames, channels=C, ssm=ssm,
                                         kernel_backend="reference" if ctx.dry else "auto"))
                m = SaShiMi(cfg).to(ctx.device).eval()
                tokens = torch.randint(0, cfg.levels, (2, frames, C), device=ctx.device)
                with torch.no_grad():
                    conv = m(tokens)
                    flat = tokens.reshape(2, -1)
                    m.setup_step()
                    state = m.default_state(2)
                    steps = torch.stack([m.step(flat[:, i], state, i) for i in range(flat.shape[1])], 1)
                err = ((steps.double() - conv.double()).abs().max() / conv.double().abs().max()).item()
                rec = dict(status="ok", label=label, preset=preset, channels=C, ssm=ssm, steps=total, batch=2,
                           rel_err=err, tolerance=RECURRENCE_TOL, meets_target=err <= RECURRENCE_TOL,
                           public_diagonal_rel_err=0.18, seconds=time.perf_counter() - t0)
                _record_figure(ctx, "recurrence", key, rec)
                del m, conv, steps
                ctx.free()
            except Exception as exc:  # noqa: BLE001
                _error(ctx, "recurrence", key, label, exc, REC_FIELDS)


def autotune_report() -> dict:
    """Every autotuned kernel of kernels/: its configs, the config chosen per key, and the
    time the last autotuning took (the data for a pre-tuned table)."""
    from triton.runtime.autotuner import Autotuner
    out = {}
    for name, mod in sorted(sys.modules.items()):
        if not name.startswith("kernels.") or mod is None:
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                out[f"{name}.{attr}"] = dict(
                    configs=len(obj.configs),
                    chosen={str(k): str(v) for k, v in getattr(obj, "cache", {}).items()},
                    last_bench_s=getattr(obj, "bench_time", None))
    return out


def stage_headline(ctx: Ctx) -> int:
    box = ctx.left()
    scale = min(1.0, box / sum(s for _, s in HEADLINE_PLAN))
    runners = {"kernels": headline_kernels, "generation": headline_generation,
               "recurrence": headline_recurrence,
               "train": lambda c, dl: headline_train(c, dl, False),
               "train_compile": lambda c, dl: headline_train(c, dl, True)}
    for i, (part, secs) in enumerate(HEADLINE_PLAN):
        t0 = time.time()
        last = i == len(HEADLINE_PLAN) - 1
        deadline = ctx.deadline - 3 if last else min(ctx.deadline - 3, t0 + secs * scale)
        runners[part](ctx, deadline)
        record.update(ctx.out, lambda d, part=part, t0=t0: d.setdefault("headline_parts", {}).update(
            {part: dict(wall_s=record.elapsed(t0), box_s=round(deadline - t0, 1))}))
    try:
        record.put(ctx.out, "autotune", None, autotune_report())
    except Exception as exc:  # noqa: BLE001
        record.put(ctx.out, "autotune", None, dict(error=str(exc)[:300]))
    h = record.load(ctx.out).get("headline", {})
    bad = [f"{s}/{k}" for s, figs in h.items() for k, r in figs.items() if r.get("status") == "error"]
    if bad:
        print(f"[headline] errors: {bad}", flush=True)
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# stage 4a: torch.profiler summaries of a training step and a generation step
# --------------------------------------------------------------------------------------------
def stage_profile(ctx: Ctx) -> int:
    import importlib.util
    import tempfile
    spec = importlib.util.spec_from_file_location("torch_profile", ROOT / "profiles" / "torch_profile.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_profile_"))
    dev = "cuda" if ctx.cuda else "cpu"
    small = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "1"] if ctx.dry else []
    steps = ["--steps", "1", "--warmup", "0"] if ctx.dry else ["--steps", "2", "--warmup", "1"]
    runs = {"train": ["train", "--device", dev, *steps, *small],
            "generate": ["generate", "--device", dev, *steps,
                         *(["--preset", "tiny", "--tokens-per-step", "16"] if ctx.dry else [])]}
    rc = 0
    texts = []
    for name, argv in runs.items():
        t0 = time.time()
        if ctx.left() < 5:
            record.update(ctx.out, lambda d, name=name: d.setdefault("profile", {}).update(
                {name: dict(status="skipped", reason="time box", summary=[], argv=argv, wall_s=None)}))
            continue
        try:
            status = "ok" if tp.main(argv + ["--out", str(work / name)]) == 0 else "failed"
            tables = sorted((work / name).glob("*_table.txt"))
            text = tables[0].read_text() if tables else ""
            summary = [ln for ln in text.split("\n\n")[0].splitlines() if ln.strip()]
        except Exception as exc:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            status, text, summary = "error", f"{type(exc).__name__}: {exc}", [f"{type(exc).__name__}: {exc}"[:300]]
        rc |= status != "ok"
        texts.append(f"===== {name}: python profiles/torch_profile.py {' '.join(argv)}\n{text}")
        (ctx.out / record.PROFILE).write_text("\n".join(texts))
        record.update(ctx.out, lambda d, name=name, status=status, summary=summary, t0=t0: d.setdefault("profile", {}).update(
            {name: dict(status=status, summary=summary, argv=argv, wall_s=record.elapsed(t0))}))
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check.stages")
    p.add_argument("stage", choices=("facts", "headline", "profile"))
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds: finish before")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    ctx = Ctx(Path(a.out), a.dry_run, a.deadline)
    if a.dry_run:
        torch.set_num_threads(1)
    return {"facts": stage_facts, "headline": stage_headline, "profile": stage_profile}[a.stage](ctx)


if __name__ == "__main__":
    sys.exit(main())
