"""The stages that run in their own process (bench/gpu_check/run.py starts each with a time box
and kills it at its end):

    python -m bench.gpu_check.stages NAME --out DIR --deadline EPOCH [--dry-run]

Each figure goes to OUT/gpu_check.json (timings also to OUT/bench.json) as soon as it is
measured. --dry-run: CPU, Triton under TRITON_INTERPRET=1 (set by the orchestrator), tiny sizes,
the same code and result fields. A new stage is a function `stage_<name>(ctx) -> exit code` listed
in PY_STAGES, plus its time box in run.BOXES.
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
import traceback
from pathlib import Path

import torch

from bench._common import (ANCHORS, GENERATION_RUNNERS, N_PAIRS, kernel_anchor, make_model, make_sampler_loop,
                           make_train_step, pair_case, rates)
from bench.gpu_check import ids, record

ROOT = Path(__file__).resolve().parents[2]
DRY_KERNEL = dict(B=4, N=2, L=32)
DRY_TRAIN_SHAPES = {"mono": (2, 64, 1), "stereo": (1, 64, 2)}
DRY_GEN_BATCHES = (1, 2)
DRY_COMPILED = (("stereo", "bf16"),)   # the rehearsal compiles one of the four (a trace: ~10 s on 2 cores)
RECURRENCE_STEPS, DRY_RECURRENCE_STEPS = 512, 32
STEPS_PER_CALL = 32                    # generation steps per timed call, as bench/test_generation.py
# sub-budgets of the headline stage, seconds on the GPU (scaled to its box); the last gets the rest
HEADLINE_PLAN = (("kernels", 60), ("train", 50), ("generation", 45), ("recurrence", 25), ("train_compile", 60))
TIMING = ("ms_p50", "ms_p20", "ms_p80", "ms_min", "ms_max", "samples", "first_call_s")
KERNEL_FIELDS = ("fullname", "op", "direction", "provider", "shape", "dtype", *TIMING, "gflops", "gbps",
                 "floor_ms", "fraction_of_floor", "anchor_ms", "target_ms", "meets_target", "peak_gib")
TRAIN_FIELDS = ("fullname", "op", "direction", "provider", "shape", "dtype", "preset", "compiled",
                "compile_backend", *TIMING, "tokens_per_step", "tokens_per_s", "ms_per_step", "peak_gib",
                "parameters", "anchor_tokens_per_s", "anchor_peak_gib", "target_tokens_per_s", "target_peak_gib",
                "meets_target")
GEN_FIELDS = ("fullname", "op", "direction", "provider", "shape", "dtype", "preset", "batch", "channels",
              "steps_per_call", *TIMING, "steps_per_s", "samples_per_s", "us_per_step", "realtime_factor",
              "anchor_samples_per_s", "target_steps_per_s", "target_samples_per_s", "meets_target")
REC_FIELDS = ("preset", "channels", "ssm", "steps", "batch", "rel_err", "tolerance", "meets_target",
              "public_diagonal_rel_err", "seconds")


class Ctx:
    def __init__(self, out: Path, dry: bool, deadline: float):
        self.out, self.dry, self.deadline = out, dry, deadline
        self.cuda = (not dry) and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.gpu_name = torch.cuda.get_device_name() if self.cuda else "dry-run-cpu"
        self.preset = "tiny" if dry else "paper"

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def time_ms(ctx: Ctx, fn, rep_ms: int) -> list[float]:
    """Per-call times in ms: triton.testing.do_bench (CUDA events, L2 flushed between calls) on
    the GPU; a short perf_counter loop on CPU. fn has run once before."""
    if ctx.cuda:
        import triton.testing
        return [float(t) for t in triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="all")]
    times, end = [], time.perf_counter() + rep_ms * 1e-3
    while len(times) < 2 or (time.perf_counter() < end and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def timed(ctx: Ctx, fn, rep_ms: int, first: float | None = None) -> tuple[dict, list[float]]:
    """(quantiles + first_call_s, the times): fn's first call (compile, autotune) timed unless
    given, then its per-call times."""
    if first is None:
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        first = time.perf_counter() - t0
    times = time_ms(ctx, fn, rep_ms if ctx.cuda else 0)
    t = torch.tensor(times, dtype=torch.float64)
    p50, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return dict(ms_p50=p50, ms_p20=p20, ms_p80=p80, ms_min=min(times), ms_max=max(times), samples=len(times),
                first_call_s=first), times


def _versions() -> dict:
    import triton
    return dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version())


def _cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def figure(ctx: Ctx, section: str, key: str, label: str, fields: tuple, deadline: float, measure,
           skip: str | None = None, top: str = "headline") -> None:
    """One figure, gpu_check.json's [top][section][key]: measure() -> (record, (fullname, group,
    times) or None), written as it comes; skipped (with `skip` or past the deadline) or an error,
    recorded with every field; a timing also goes to bench.json."""
    bench = None
    if skip or time.time() > deadline:
        rec = dict(dict.fromkeys(fields), status="skipped", label=label,
                   reason=skip or f"headline time box ({section}) spent")
    else:
        try:
            ctx.free()
            rec, bench = measure()
            rec = dict(rec, status="ok", label=label)
        except Exception as exc:  # noqa: BLE001 - recorded, the stage goes on
            traceback.print_exc()
            rec = dict(dict.fromkeys(fields), status="error", label=label,
                       reason=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
        ctx.free()
    record.update(ctx.out, lambda d: d.setdefault(top, {}).setdefault(section, {}).__setitem__(key, rec))
    if bench is not None:
        fullname, group, times = bench
        v = _versions()
        info = dict({k: x for k, x in rec.items() if k not in ("status", "reason", "label", "fullname")},
                    gpu_name=ctx.gpu_name, torch=v["torch"], triton=v["triton"], source="bench.gpu_check",
                    git_sha=os.environ.get("GPU_CHECK_SHA", "unknown"))
        record.add_bench(ctx.out, [record.bench_entry(fullname, group, info, times)],
                         machine_info=dict(gpu_name=ctx.gpu_name, torch=v["torch"], triton=v["triton"],
                                           node=platform.node(), python_version=v["python"],
                                           cpu=dict(brand_raw=_cpu_name(), count=os.cpu_count())),
                         commit_info=dict(id=os.environ.get("GPU_CHECK_SHA", "unknown"), dirty=None))
    print(f"[{top}] {section}/{key}: {rec['status']} {rec.get('ms_p50') or rec.get('reason') or ''}", flush=True)


# --------------------------------------------------------------------------------------------
# facts: device, versions, packages, copy / matmul ceilings, the self-test
# --------------------------------------------------------------------------------------------
def _nvidia_smi() -> dict:
    fields = "name,driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,memory.total,power.limit," \
             "temperature.gpu,pstate"
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return dict(zip(fields.split(","), (v.strip() for v in r.stdout.strip().splitlines()[0].split(","))))
    except Exception as exc:  # no GPU (dry run) or no nvidia-smi
        return dict(error=f"nvidia-smi: {type(exc).__name__}: {exc}"[:200])


def _packages() -> dict:
    """Version and location of each package the session needs (the carried wheels' first)."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("soundfile", "nvtx", "constriction", "hypothesis", "pytest-benchmark", "pytest", "tqdm", "numpy",
                 "soxr", "matplotlib"):
        try:
            m = import_module(dist.replace("-", "_"))
            try:
                ver = version(dist)
            except PackageNotFoundError:   # importable without metadata: its own version
                ver = getattr(m, "__version__", "?")
            out[dist] = dict(version=ver, path=str(Path(m.__file__).parent))
        except Exception as exc:
            out[dist] = dict(version=None, error=f"{type(exc).__name__}: {exc}"[:200])
    return out


def _ceilings(ctx: Ctx) -> dict:
    """Device copy bandwidth (bytes read + written) and fp32 matmul rate, measured here (the
    floors in BENCHMARKS.md are the H100's)."""
    n, m = ((1 << 28), 8192) if ctx.cuda else ((1 << 20), 256)
    x, y = torch.empty(n, device=ctx.device), torch.empty(n, device=ctx.device)
    copy = timed(ctx, lambda: y.copy_(x), 200, first=0.0)[0]["ms_p50"]
    a, b = torch.randn(m, m, device=ctx.device), torch.randn(m, m, device=ctx.device)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        mm = timed(ctx, lambda: a @ b, 200, first=0.0)[0]["ms_p50"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return dict(copy_gbps=2 * n * 4 / (copy * 1e-3) / 1e9, copy_bytes=2 * n * 4, copy_ms_p50=copy,
                fp32_tflops=2 * m ** 3 / (mm * 1e-3) / 1e12, matmul_n=m, matmul_ms_p50=mm)


# On the GPU each autotuned kernel is held to its first config, as the interpreter does: the
# self-test's odd shapes are their own specialisations, and tuning every config there would
# compile each kernel's whole list (~75 s of ptxas on one core).
SELFTEST_FIRST_CONFIG = """
import runpy
from triton.runtime.autotuner import Autotuner
_prune = Autotuner.prune_configs
Autotuner.prune_configs = lambda self, kwargs: _prune(self, kwargs)[:1]
runpy.run_module("kernels.selftest", run_name="__main__", alter_sys=True)
"""
_ROW = re.compile(r"^(\S+)\s+(.+?)\s+(\S+)\s+(\S+)\s+(pass|FAIL)\s+(\S+)(.*)$")


def parse_selftest(text: str) -> list[dict]:
    num = lambda s: float(s) if s not in ("nan", "inf") else None  # noqa: E731
    return [dict(op=m.group(1), path=m.group(2).strip(), max_rel_err=num(m.group(3)), tol=num(m.group(4)),
                 result=m.group(5), ms=num(m.group(6)), note=m.group(7).strip() or None)
            for m in map(_ROW.match, (ln.strip() for ln in text.splitlines())) if m and m.group(1) != "op"]


def stage_facts(ctx: Ctx) -> int:
    dev = dict(name=ctx.gpu_name, type=ctx.device.type, sms=None, memory_gib=None, capability=None,
               cpu=_cpu_name(), cpu_count=os.cpu_count(), host=platform.node(), nvidia_smi=_nvidia_smi())
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        dev.update(sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                   l2_mib=getattr(p, "L2_cache_size", 0) / 2**20)
    versions = dict(_versions(), packages=_packages())
    missing = [k for k, v in versions["packages"].items() if v["version"] is None and k != "matplotlib"]
    record.update(ctx.out, lambda d: d.update(device=dev, versions=versions))
    try:
        ceilings = _ceilings(ctx)
    except Exception as exc:  # noqa: BLE001
        ceilings = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    record.put(ctx.out, "ceilings", None, ceilings)
    print(f"[facts] {dev['name']}, missing packages: {missing or 'none'}, ceilings {ceilings}", flush=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "kernels.selftest"] if ctx.dry else [sys.executable, "-c", SELFTEST_FIRST_CONFIG]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, ctx.left() - 2), cwd=ROOT)
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    print(text, flush=True)
    rows = parse_selftest(text)
    sf = dict(rc=rc, rows=rows, path=rows[0]["path"] if rows else None, command=" ".join(cmd[:3]),
              autotune="the first config of each kernel", wall_s=record.elapsed(t0),
              all_pass=rc == 0 and bool(rows) and all(x["result"] == "pass" for x in rows))
    record.put(ctx.out, "selftest", None, sf)
    return 0 if sf["all_pass"] and not missing else 1


# --------------------------------------------------------------------------------------------
# headline: kernels, training step (eager, compiled), generation, recurrence vs convolution
# --------------------------------------------------------------------------------------------
def headline_kernels(ctx: Ctx, deadline: float) -> None:
    B, N, L = (DRY_KERNEL[k] for k in "BNL") if ctx.dry else (ids.KERNEL_SIZE["B"], N_PAIRS, ids.KERNEL_SIZE["L"])
    mem = torch.cuda.get_device_properties(0).total_memory if ctx.cuda else 2**34
    for direction in ("fwd", "fwdbwd"):          # a short time box still gets both ops' forwards
        for op in ("cauchy", "vandermonde"):
            for provider in ("triton", "reference"):
                fullname = f"bench/gpu_check::dry_{op}_{direction}[{provider}-B{B}-L{L}]" if ctx.dry else \
                    ids.kernel_id(op, direction, provider)
                need = (3 if direction == "fwd" else 6) * B * N * L * 8

                def measure(op=op, direction=direction, provider=provider, fullname=fullname):
                    fn, work = pair_case(op, direction, provider, B, L, ctx.device, N)
                    ctx.reset_peak()
                    q, times = timed(ctx, fn, 300)
                    a = {} if ctx.dry else kernel_anchor(op, f"B{B}-L{L}", direction)
                    target = a.get("target_ms") if provider == "triton" else None
                    return dict(fullname=fullname, op=op, direction=direction, provider=provider,
                                shape=dict(B=B, N=N, L=L), dtype="complex64", **q, **rates(q["ms_p50"], **work),
                                anchor_ms=a.get("anchor_ms"), target_ms=target, peak_gib=ctx.peak_gib(),
                                meets_target=q["ms_p50"] <= target if target else None), \
                        (fullname, f"{op}-{direction}-B{B}-N{N}-L{L}", times)
                skip = f"the reference would materialise ~{need / 2**30:.0f} GiB" \
                    if provider == "reference" and need > 0.45 * mem else None
                figure(ctx, "kernels", f"{op}-{direction}-{provider}", f"{op} {direction} B={B} N/2={N} L={L} "
                       f"{provider}", KERNEL_FIELDS, deadline, measure, skip)


def _train_one(ctx: Ctx, ch: str, precision: str, compiled: bool, fullname: str):
    from sashimi.model import PRESETS, count_parameters
    B, L, C = (DRY_TRAIN_SHAPES if ctx.dry else ids.TRAIN_SHAPES)[ch]
    # the dry run: a one-layer tiny model on the reference kernels (the kernel figures and the
    # self-test run the Triton code under the interpreter; here it would take minutes)
    cfg = dict(PRESETS["tiny"], n_layers=1, kernel_backend="reference") if ctx.dry else \
        dict(PRESETS["paper"], kernel_backend="auto")
    backend = ("inductor" if ctx.cuda else "eager") if compiled else None
    step, model, tokens = make_train_step(cfg, B, L, C, precision, ctx.device, backend)
    try:
        t0 = time.perf_counter()
        for _ in range(2):      # compile / autotune every kernel, the optimiser state
            step()
        ctx.sync()
        first = time.perf_counter() - t0
        ctx.reset_peak()
        step()
        ctx.sync()
        peak = ctx.peak_gib()
        q, times = timed(ctx, step, 1000, first)
        tps, paper, T = tokens / (q["ms_p50"] * 1e-3), not ctx.dry, ANCHORS["train"]
        anchor = paper and C == 1
        return dict(fullname=fullname, op="train_step", direction="fwdbwd",
                    provider="triton+compile" if compiled else "triton", shape=dict(B=B, L=L, C=C), dtype=precision,
                    preset=ctx.preset, compiled=compiled, compile_backend=backend, **q, tokens_per_step=tokens,
                    tokens_per_s=tps, ms_per_step=q["ms_p50"], peak_gib=peak, parameters=count_parameters(model),
                    anchor_tokens_per_s=T["anchor_tokens_per_s"] if anchor else None,
                    anchor_peak_gib=T["anchor_peak_gib"] if anchor else None,
                    target_tokens_per_s=T["target_tokens_per_s"] if paper else None,
                    target_peak_gib=T["target_peak_gib"] if paper else None,
                    meets_target=(tps >= T["target_tokens_per_s"] and peak is not None
                                  and peak <= T["target_peak_gib"]) if paper else None), \
            (fullname, f"train_step-{ctx.preset}-B{B}-L{L}-C{C}-{precision}", times)
    finally:
        del step, model
        if compiled:
            torch._dynamo.reset()


def headline_train(ctx: Ctx, deadline: float, compiled: bool) -> None:
    section = "train_compile" if compiled else "train"
    estimate = [0.0]
    for ch in ("mono", "stereo"):
        for precision in ("fp32", "bf16"):
            B, L, C = (DRY_TRAIN_SHAPES if ctx.dry else ids.TRAIN_SHAPES)[ch]
            shape_id = ids.train_shape_id(ctx.preset, ch, B, L, C)
            fullname = f"bench/gpu_check::test_train_step_compiled[triton-{shape_id}-{precision}]" if compiled else \
                f"bench/gpu_check::dry_train_step[triton-{shape_id}-{precision}]" if ctx.dry else ids.train_id(ch, precision)
            left = deadline - time.time()
            skip = "dry run: one compiled variant rehearses the path" if compiled and ctx.dry and \
                (ch, precision) not in DRY_COMPILED else "no bf16 on this GPU" if precision == "bf16" and \
                ctx.cuda and not torch.cuda.is_bf16_supported() else \
                f"headline time box ({section}) spent: {left:.0f} s left, the last compile took " \
                f"{estimate[0] / 1.2:.0f} s" if compiled and 0 < left < estimate[0] else None

            def measure(ch=ch, precision=precision, fullname=fullname):
                rec, bench = _train_one(ctx, ch, precision, compiled, fullname)
                estimate[0] = 1.2 * rec["first_call_s"]
                return rec, bench
            figure(ctx, section, f"{ch}-{precision}", f"{ctx.preset} {ch} B={B} x L={L}" + (f" x {C}" if C == 2 else "")
                   + f" {precision} {'compiled' if compiled else 'eager'}", TRAIN_FIELDS, deadline, measure, skip)


def headline_generation(ctx: Ctx, deadline: float) -> None:
    G = ANCHORS["generation"]
    steps = 16 if ctx.dry else STEPS_PER_CALL
    for ch, C in (("mono", 1), ("stereo", 2)):
        for batch in (DRY_GEN_BATCHES if ctx.dry else ids.GEN_BATCHES):
            for provider in ("graphs", "eager"):
                fullname = f"bench/gpu_check::dry_generation[{provider}-{ctx.preset}-{ch}-B{batch}]" if ctx.dry \
                    else ids.generation_id(provider, ch, batch)

                def measure(C=C, batch=batch, provider=provider, fullname=fullname):
                    model = make_model(ctx.preset, C, ctx.device, kernel_backend="auto" if ctx.cuda else "reference")
                    fn = make_sampler_loop(model, batch, steps, graphs=ctx.cuda) if provider == "graphs" else \
                        GENERATION_RUNNERS["eager"](model, batch, steps)
                    q, times = timed(ctx, fn, 300)
                    sps = steps / (q["ms_p50"] * 1e-3)
                    samples, paper, b = batch * sps / C, not ctx.dry, str(batch)
                    t_steps = G["target_steps_per_s"].get(b) if paper else None
                    t_samples = G["target_samples_per_s"].get(b) if paper else None
                    met = [x for x in ((sps >= t_steps) if t_steps else None,
                                       (samples >= t_samples) if t_samples else None) if x is not None]
                    return dict(fullname=fullname, op="generation", direction="fwd", provider=provider,
                                shape=dict(B=batch, C=C), dtype="fp32", preset=ctx.preset, batch=batch, channels=C,
                                steps_per_call=steps, **q, steps_per_s=sps, samples_per_s=samples,
                                us_per_step=q["ms_p50"] * 1e3 / steps, realtime_factor=sps / C / model.cfg.sample_rate,
                                anchor_samples_per_s=G["anchor_samples_per_s"].get(b) if paper and C == 1 else None,
                                target_steps_per_s=t_steps, target_samples_per_s=t_samples,
                                meets_target=all(met) if met else None), \
                        (fullname, f"generation-{ctx.preset}-B{batch}-C{C}", times)
                label = f"{ctx.preset} {ch} batch {batch} {provider}" + (
                    " (dry run: the sampler stepped eagerly; CUDA graphs need a GPU)" if ctx.dry and provider == "graphs" else "")
                figure(ctx, "generation", f"{ch}-B{batch}-{provider}", label, GEN_FIELDS, deadline, measure)


def headline_recurrence(ctx: Ctx, deadline: float) -> None:
    """Token-by-token steps (the fused tier_step kernel) against the convolutional forward (the
    Cauchy / Vandermonde kernels), random init, batch 2, fp32: max |diff| / max |conv|."""
    from sashimi.model import PRESETS, ModelConfig, SaShiMi
    total, R = DRY_RECURRENCE_STEPS if ctx.dry else RECURRENCE_STEPS, ANCHORS["recurrence"]
    for C in (1, 2):
        for ssm in ("dplr", "diag"):
            def measure(C=C, ssm=ssm):
                t0 = time.perf_counter()
                torch.manual_seed(2)
                frames = total // C   # the dry run: reference kernels (tier_step interpreted: ~100 s)
                cfg = ModelConfig(**dict(PRESETS[ctx.preset], seq_len=frames, channels=C, ssm=ssm,
                                         kernel_backend="reference" if ctx.dry else "auto"))
                m = SaShiMi(cfg).to(ctx.device).eval()
                tokens = torch.randint(0, cfg.levels, (2, frames, C), device=ctx.device)
                with torch.no_grad():
                    conv = m(tokens).double()
                    flat = tokens.reshape(2, -1)
                    m.setup_step()
                    state = m.default_state(2)
                    steps = torch.stack([m.step(flat[:, i], state, i) for i in range(flat.shape[1])], 1).double()
                err = ((steps - conv).abs().max() / conv.abs().max()).item()
                return dict(preset=ctx.preset, channels=C, ssm=ssm, steps=total, batch=2, rel_err=err,
                            tolerance=R["target_rel_err"], meets_target=err <= R["target_rel_err"],
                            public_diagonal_rel_err=R["anchor_diagonal_rel_err"],
                            seconds=time.perf_counter() - t0), None
            figure(ctx, "recurrence", f"{'mono' if C == 1 else 'stereo'}-{ssm}",
                   f"{ctx.preset} {'mono' if C == 1 else 'stereo'} {ssm}, {total} steps", REC_FIELDS, deadline, measure)


def autotune_report() -> dict:
    """Every autotuned kernel of kernels/: its configs, the config chosen per key, the time the
    last autotuning took (the data for a pre-tuned table)."""
    from triton.runtime.autotuner import Autotuner
    return {f"{name}.{attr}": dict(configs=len(obj.configs), chosen={str(k): str(v) for k, v in getattr(obj, "cache", {}).items()},
                                   last_bench_s=getattr(obj, "bench_time", None))
            for name, mod in sorted(sys.modules.items()) if name.startswith("kernels.") and mod
            for attr, obj in vars(mod).items() if isinstance(obj, Autotuner)}


def stage_headline(ctx: Ctx) -> int:
    scale = min(1.0, ctx.left() / sum(s for _, s in HEADLINE_PLAN))
    parts = {"kernels": headline_kernels, "generation": headline_generation, "recurrence": headline_recurrence,
             "train": lambda c, dl: headline_train(c, dl, False),
             "train_compile": lambda c, dl: headline_train(c, dl, True)}
    for i, (part, secs) in enumerate(HEADLINE_PLAN):
        t0 = time.time()
        deadline = ctx.deadline - 3 if i == len(HEADLINE_PLAN) - 1 else min(ctx.deadline - 3, t0 + secs * scale)
        parts[part](ctx, deadline)
        record.update(ctx.out, lambda d, part=part, t0=t0: d.setdefault("headline_parts", {}).update(
            {part: dict(wall_s=record.elapsed(t0), box_s=round(deadline - t0, 1))}))
    try:
        record.put(ctx.out, "autotune", None, autotune_report())
    except Exception as exc:  # noqa: BLE001
        record.put(ctx.out, "autotune", None, dict(error=str(exc)[:300]))
    bad = [f"{s}/{k}" for s, figs in record.load(ctx.out).get("headline", {}).items()
           for k, r in figs.items() if r.get("status") == "error"]
    print(f"[headline] errors: {bad}" if bad else "[headline] no errors", flush=True)
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# profile: torch.profiler tables of a training step and a generation step
# --------------------------------------------------------------------------------------------
def stage_profile(ctx: Ctx) -> int:
    import importlib.util
    import tempfile
    spec = importlib.util.spec_from_file_location("torch_profile", ROOT / "profiles" / "torch_profile.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_profile_"))
    dev = "cuda" if ctx.cuda else "cpu"
    steps = ["--steps", "1", "--warmup", "0"] if ctx.dry else ["--steps", "2", "--warmup", "1"]
    runs = {"train": ["train", "--device", dev, *steps,
                      *(["--preset", "tiny", "--seq-len", "64", "--batch-size", "1"] if ctx.dry else [])],
            "generate": ["generate", "--device", dev, *steps, *(["--preset", "tiny", "--tokens-per-step", "16"]
                                                              if ctx.dry else [])]}
    rc, texts = 0, []
    for name, argv in runs.items():
        t0, text, summary = time.time(), "", []
        if ctx.left() < 5:
            status = "skipped"
        else:
            try:
                status = "ok" if tp.main(argv + ["--out", str(work / name)]) == 0 else "failed"
                tables = sorted((work / name).glob("*_table.txt"))
                text = tables[0].read_text() if tables else ""
                summary = [ln for ln in text.split("\n\n")[0].splitlines() if ln.strip()]
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                status, text = "error", f"{type(exc).__name__}: {exc}"
                summary = [text[:300]]
            texts.append(f"===== {name}: python profiles/torch_profile.py {' '.join(argv)}\n{text}")
            (ctx.out / record.PROFILE).write_text("\n".join(texts))
        rc |= status != "ok"
        record.update(ctx.out, lambda d, r=dict(status=status, summary=summary, argv=argv, wall_s=record.elapsed(t0)),
                      name=name: d.setdefault("profile", {}).update({name: r}))
    return rc




# --------------------------------------------------------------------------------------------
# codec: encode and decode samples/s and the round trip, on the device
# --------------------------------------------------------------------------------------------
CODEC_FIELDS = ("preset", "device", "chunks", "encode_samples_per_s", "decode_samples_per_s", "bits_per_sample",
                "round_trip")


def stage_codec(ctx: Ctx) -> int:
    """sashimi.codec on the device: a random 16-bit linear DML stereo model (frames, value input) at
    44.1 kHz codes synthetic music in 1/32-s chunks (dry run: 1/64 s) as one batch; encode and
    decode timed, the decoded tokens compared with the input."""
    from sashimi import codec
    from sashimi.data import SyntheticStereoMusic
    from sashimi.model import PRESETS, ModelConfig, SaShiMi
    seconds = 0.1 if ctx.dry else 1.0
    for preset in ("tiny",) if ctx.dry else ("tiny", "paper"):
        def measure(preset=preset):
            torch.manual_seed(0)
            cfg = ModelConfig(**dict(PRESETS[preset], channels=2, stereo_layout="frames", bits=16, head="dml",
                                     quantization="linear", value_input=True, sample_rate=44100,
                                     kernel_backend="reference" if ctx.dry else "auto"))
            audio = SyntheticStereoMusic(cfg.sample_rate, seconds_per_clip=seconds, clips=1).clip(0)
            tokens = cfg.quantizer.encode(audio).to(torch.int32).numpy()
            chunks = codec.Chunking(tokens.shape[0], cfg.sample_rate // (64 if ctx.dry else 32))
            r = codec.measure_round_trip(SaShiMi(cfg).to(ctx.device).eval(), tokens, chunks, ctx.sync)
            return dict(preset=preset, device=str(ctx.device), chunks=chunks.count, **r), None
        figure(ctx, "round_trip", preset, f"codec {preset} stereo 44.1 kHz, {seconds} s", CODEC_FIELDS,
               ctx.deadline - 3, measure, top="codec")
    bad = [k for k, r in (record.load(ctx.out).get("codec") or {}).get("round_trip", {}).items()
           if r.get("status") == "error" or r.get("round_trip") is False]
    print(f"[codec] failed: {bad}" if bad else "[codec] round trips exact", flush=True)
    return 1 if bad else 0


PY_STAGES = {"facts": stage_facts, "headline": stage_headline, "codec": stage_codec, "profile": stage_profile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check.stages")
    p.add_argument("stage", choices=tuple(PY_STAGES))
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds: finish before")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.dry_run:
        torch.set_num_threads(1)
    return PY_STAGES[a.stage](Ctx(Path(a.out), a.dry_run, a.deadline))


if __name__ == "__main__":
    sys.exit(main())
