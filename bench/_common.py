"""What the benchmarks, `bench.gpu_check` and profiles/ share: the fixed figures (anchors.json),
do_bench timing recorded into pytest-benchmark, and the workloads (kernel inputs, a training
step as sashimi.train takes it, generation as sashimi.generate steps).

Each benchmark times the same callable twice: `triton.testing.do_bench` (CUDA-event medians,
p20/p80, recorded in extra_info) and pytest-benchmark's own rounds (wall clock, ending in a
synchronize), so the table and the JSON agree on what was measured.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

# the public S4/SaShiMi on an H100, the H100's ceilings and this package's targets: one copy
ANCHORS = json.loads((Path(__file__).with_name("anchors.json")).read_text())
H100_FP32_FLOPS = ANCHORS["h100"]["fp32_flops"]
H100_BYTES_PER_S = ANCHORS["h100"]["bytes_per_s"]
N_PAIRS = 32                                    # N/2 conjugate pairs at every anchor size


def kernel_anchor(op: str, shape_name: str, direction: str) -> dict:
    """{anchor_ms, naive_ms, target_ms} (those known) of a kernel at a bench shape, else {}."""
    return ANCHORS["kernels"].get(op, {}).get(shape_name, {}).get(direction, {})


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run(benchmark, fn, *, op: str, direction: str, provider: str, shape: dict, dtype: str,
        flops: float | None = None, nbytes: float | None = None, flops_floor: bool = True,
        rounds: int = 20, rep_ms: int = 300) -> float:
    """Time `fn` (a GPU callable) and record it. Returns the do_bench median in ms.
    flops_floor=False: the FLOPs give a rate but no floor (tensor-core work). rep_ms: do_bench's
    measuring time; raise it for long calls so the median has enough samples."""
    import triton
    import triton.testing

    fn()  # compile, autotune
    torch.cuda.synchronize()
    p50, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    benchmark.group = f"{op}-{direction}-" + "-".join(f"{k}{v}" for k, v in shape.items())
    benchmark.extra_info.update(
        op=op, direction=direction, provider=provider, shape=shape, dtype=dtype,
        gpu_name=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        git_sha=git_sha(), ms_p20=p20, ms_p50=p50, ms_p80=p80,
        **rates(p50, flops, nbytes, flops_floor))

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    return p50


def rates(ms: float, flops: float | None, nbytes: float | None, flops_floor: bool = True) -> dict:
    """gflops, gbps, and the H100 floor (FLOPs at its fp32 peak or bytes at its copy bandwidth,
    whichever is longer) with the fraction of it that `ms` reaches."""
    s, out, floor_s = ms * 1e-3, {}, 0.0
    if flops is not None:
        out["gflops"] = flops / s / 1e9
        floor_s = flops / H100_FP32_FLOPS if flops_floor else 0.0
    if nbytes is not None:
        out["gbps"] = nbytes / s / 1e9
        floor_s = max(floor_s, nbytes / H100_BYTES_PER_S)
    if floor_s:
        out.update(floor_ms=floor_s * 1e3, fraction_of_floor=floor_s / s)
    return out


def capture_graph(fn, repeats: int, warmup: int = 3):
    """A CUDA graph of `repeats` calls of fn, after `warmup` calls on a side stream (they
    compile and autotune, which must not happen inside a capture). Replay with .replay()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    torch.cuda.synchronize()
    return graph


def run_step(benchmark, one_step, provider: str, *, nbytes: int, kernel: str, graph_steps: int = 100,
             **kw) -> float:
    """Time a recurrent step: one eager call per timed run, or (provider "*_graph") graph_steps
    steps captured in one CUDA graph, one replay per run (what generation sees). Records
    us_per_step and, for the Triton providers, the autotuner's choice for `kernel` (its name in
    kernels/). Returns us per step."""
    import sys
    steps = graph_steps if provider.endswith("_graph") else 1
    fn = capture_graph(one_step, steps).replay if steps > 1 else one_step
    p50 = run(benchmark, fn, provider=provider, nbytes=steps * nbytes, **kw)
    if steps > 1:
        benchmark.extra_info["steps_per_replay"] = steps
        benchmark.group += f"-graph{steps}"
    if provider.startswith("triton"):
        tuned = [getattr(m, kernel) for n, m in list(sys.modules.items())
                 if n.startswith("kernels.") and hasattr(m, kernel)]
        benchmark.extra_info["best_config"] = str(getattr(tuned[0], "best_config", None)) if tuned else None
    benchmark.extra_info["us_per_step"] = p50 * 1e3 / steps
    return p50 * 1e3 / steps


# ----------------------------------------------------------------------------------------------
# kernels: the S4 Cauchy and Vandermonde sums on S4's own inputs
# ----------------------------------------------------------------------------------------------
def pair_case(op: str, direction: str, provider: str, B: int, L: int, device, N: int = N_PAIRS):
    """(fn, work) for kernels.cauchy or kernels.vandermonde at B rows, N pairs, L nodes: forward
    (no grad) or forward + backward (autograd.grad of both inputs); work: run()'s flops, nbytes,
    flops_floor. Cauchy: B = 4 Woodbury sums x H channels against w = dt Lambda (H, N), the first
    L rfft nodes of a length-2L sequence; Vandermonde: S4D-Lin (v, x)."""
    import kernels
    from kernels.ops import OPS, make_s4d_inputs, s4_like_inputs
    g, grad = torch.Generator().manual_seed(0), direction == "fwdbwd"
    flops, nbytes = OPS[op].work(dict(B=B, N=N, L=L), direction)
    if op == "cauchy":
        v, z, w = s4_like_inputs(B // 4, N, 2 * L, sums=4, generator=g, device=device)
        args, wrt, G = (v, z[:L].contiguous(), w), (v, w), (4, B // 4, L, torch.complex64)
    else:
        v, x = make_s4d_inputs((B,), N, "lin", generator=g, device=device)
        args, wrt, G = (v, x, L), (v, x), (B, L, torch.float32)
    fn_op = getattr(kernels, op)
    if grad:
        for t in wrt:
            t.requires_grad_(True)
        gout = torch.randn(G[:-1], dtype=G[-1], device=device)
        return (lambda: torch.autograd.grad(fn_op(*args, backend=provider), wrt, gout)), \
            dict(flops=flops, nbytes=nbytes, flops_floor=op == "cauchy")

    def fwd():
        with torch.no_grad():
            return fn_op(*args, backend=provider)
    return fwd, dict(flops=flops, nbytes=nbytes, flops_floor=op == "cauchy")


def bench_pair(benchmark, bench_size: str, op: str, provider: str, shape_name: str, direction: str,
               reference_limit: float = 20 * 2**30) -> None:
    """One benchmark of bench/test_cauchy.py or bench/test_vandermonde.py: the registry's bench
    shape (its last one is --bench-size small); the reference, which materialises (B, N, L)
    complex64 (~3 buffers forward, ~6 with the backward), skipped above reference_limit bytes."""
    import pytest

    from kernels.ops import OPS
    shapes = OPS[op].bench
    if (bench_size == "small") != (shape_name == list(shapes)[-1]):
        pytest.skip(f"{shape_name} is not in the {bench_size!r} bench size")
    B, L = shapes[shape_name]["B"], shapes[shape_name]["L"]
    need = (3 if direction == "fwd" else 6) * B * N_PAIRS * L * 8
    if provider == "reference" and need > reference_limit:
        pytest.skip(f"the reference would materialise ~{need / 2**30:.0f} GiB of (B, N, L) complex64")
    fn, work = pair_case(op, direction, provider, B, L, "cuda")
    run(benchmark, fn, op=op, direction=direction, provider=provider, shape=dict(B=B, N=N_PAIRS, L=L),
        dtype="complex64", **work)


# ----------------------------------------------------------------------------------------------
# the model: a training step, generation
# ----------------------------------------------------------------------------------------------
def make_train_step(cfg_kw: dict | str, batch_size: int, seq_len: int, channels: int, precision: str,
                    device, compile_backend: str | None = None, seed: int = 0, lr: float | None = None,
                    kernel_backend: str | None = None):
    """One optimiser step as sashimi.train takes it: the loss under bf16 autocast when asked,
    backward, clip, fused AdamW over S4's parameter groups, zero_grad, the log_dt clamp; with
    compile_backend, the loss module under torch.compile as `sashimi.train --compile` does.
    cfg_kw: ModelConfig fields, or a preset name (then kernel_backend applies). Returns (step,
    model, tokens per step)."""
    from sashimi.model import PRESETS, ModelConfig, SaShiMi
    from sashimi.train import LossOf, TrainConfig, param_groups
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if isinstance(cfg_kw, str):
        cfg_kw = dict(PRESETS[cfg_kw], kernel_backend=kernel_backend or "auto")
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = ModelConfig(**dict(cfg_kw, seq_len=seq_len, channels=channels))
    model = SaShiMi(cfg).to(device).train()
    tc = TrainConfig()
    lr = tc.lr if lr is None else lr
    optimizer = torch.optim.AdamW(param_groups(model, lr, tc.weight_decay), lr=lr, fused=device.type == "cuda")
    loss_of = LossOf(model)
    if compile_backend:
        loss_of = torch.compile(loss_of, backend=compile_backend)
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, cfg.levels, (batch_size, seq_len + 1, channels), generator=g).to(device)
    clamped = [m for m in model.modules() if hasattr(m, "clamp_")]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(batch).float().mean()
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for m in clamped:
            m.clamp_()
        return loss.detach()

    return step, model, batch_size * seq_len * channels


def make_model(preset: str, channels: int, device, seed: int = 0, kernel_backend: str | None = None,
               stereo_layout: str = "interleave"):
    """A random-init model in eval mode, ready to step (kernel_backend default: 'auto' on CUDA,
    'reference' on CPU, as sashimi.generate loads a checkpoint)."""
    from sashimi.model import PRESETS, ModelConfig, SaShiMi
    device = torch.device(device)
    torch.manual_seed(seed)
    backend = kernel_backend or ("auto" if device.type == "cuda" else "reference")
    cfg = ModelConfig(**dict(PRESETS[preset], channels=channels, kernel_backend=backend,
                             stereo_layout=stereo_layout))
    model = SaShiMi(cfg).to(device).eval()
    model.setup_step()
    return model


def make_generation_loop(model, batch: int, steps: int, seed: int = 0, fused: bool = True):
    """A callable running `steps` more generation steps (model step + sampling) as generate_audio
    does, carrying token, state and step index over between calls; fused=False: the eager
    PyTorch step module by module, else one kernels.tier_step launch per tier."""
    from kernels.profiling import nvtx_range
    from sashimi.session import Session
    model.setup_step(fused=fused)
    session = Session(model, batch, setup=False)
    gen = torch.Generator(device=session.device).manual_seed(seed)
    first = session.first_position()              # silence, as the model sees it (mid/side too)
    carry = dict(token=first)
    loglik = torch.zeros(batch, dtype=torch.float64, device=session.device)

    @torch.no_grad()
    def loop():
        token = carry["token"]
        for _ in range(steps):
            with nvtx_range("sashimi/generate/step"):
                token, logp = model.sample_next(session.step(token), generator=gen)
                token = token.view(first.shape)
                loglik.add_(logp.double())
        carry["token"] = token
        return token

    return loop


def make_sampler_loop(model, batch: int, steps: int, graphs: bool = True):
    """sashimi.generate's step sampler (sampling and likelihood on the device, no host sync):
    one replayed CUDA graph per step (graphs=True), or the same sampler stepped eagerly."""
    from sashimi.generate import StepSampler, capture_step_graphs, run_steps
    from sashimi.session import Session
    model.setup_step()
    device = model.embedding.weight.device
    n = 1 << 16                                     # position buffer; wraps around (see below)
    tokens = torch.zeros(batch, n * model.cfg.step_tokens, dtype=torch.long, device=device)
    loglik = torch.zeros(batch, dtype=torch.float64, device=device)
    sampler = StepSampler(Session(model, batch, setup=False), tokens, loglik, 0,
                          generator=torch.Generator(device=device).manual_seed(0))
    sampler.cur.copy_(sampler.session.first_position().view(sampler.cur.shape))    # from silence
    with torch.no_grad():        # tier_step is inference-only: capture outside autograd
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


# generation providers: the eager PyTorch step module by module (the baseline), a Python loop
# over model.step with one fused tier_step launch per tier, sashimi.generate's CUDA graphs
GENERATION_RUNNERS = {
    "modules": lambda model, batch, steps: make_generation_loop(model, batch, steps, fused=False),
    "eager": lambda model, batch, steps: make_generation_loop(model, batch, steps),
    "graphs": lambda model, batch, steps: make_sampler_loop(model, batch, steps, graphs=True),
}
