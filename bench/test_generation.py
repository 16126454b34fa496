"""Generation throughput: the SaShiMi model as a recurrence, one interleaved token per step.

One timed call runs STEPS_PER_CALL model steps the way `sashimi.generate.generate_audio` does:
`out = model.step(token, state, t)` (through `_step`), `token, logp = model.head.sample(out)`, the log-likelihood
accumulated, on the GPU, state carried over from call to call (the generation simply goes on).
The model is the paper preset at random init (throughput does not depend on the weights),
`setup_step()` done once, `default_state(batch)`; fp32, kernel_backend="auto".
STEPS_PER_CALL (32) is a multiple of the pooling factor (16) times the channels, so every call
runs each tier its fair share of steps, and every call does the same work.

Batch 1, 16 and 256, mono, stereo (interleaved) and stereo-frames (the frames layout: one
backbone step and two head samples per frame, issue 14); --bench-size small: the tiny preset,
batch 1.

Providers (the RUNNERS table): "modules" (the eager PyTorch step, module by module), "eager"
(a Python loop over model.step, each tier one fused kernels.tier_step launch), "graphs"
(sashimi.generate's CUDA-graph sampler: one graph replay per step).

extra_info (besides bench._common.run's, whose ms_* are per call of STEPS_PER_CALL steps):
  steps_per_s    backbone steps per second, per stream: interleaved tokens (what design.md's
                 32,000 target is: 16 kHz stereo in real time), or frames for stereo-frames
  samples_per_s  audio frames per second over the whole batch = batch x steps_per_s / steps
                 per frame (2 interleaved stereo, 1 mono or frames): anchors.md's "samples/s"
  us_per_step, realtime_factor (frames/s per stream / sample rate)
  anchor_samples_per_s  the public SaShiMi ("diagonal" recurrence, mono, paper config): 248 at
                 batch 1, 3,318 at 16, 44,404 at 256; recorded for the mono paper cases only
  target_steps_per_s (batch 1: 32,000) and target_samples_per_s (batch 256: 2,000,000)

The helpers `_step` (model.step with or without the step index t) and `make_generation_loop`
are shared with profiles/torch_profile.py.
"""
from __future__ import annotations

import gc

import pytest
import torch

from bench._common import run
from kernels.profiling import nvtx_range
from sashimi.model import PRESETS, ModelConfig, SaShiMi
from sashimi.quantize import Quantizer

OP = "generation"
BATCHES = (1, 16, 256)
CHANNELS = {"mono": 1, "stereo": 2, "stereo-frames": 2}
LAYOUTS = {"stereo-frames": "frames"}          # the others: interleave
STEPS_PER_CALL = 32   # two cycles of the pooled tiers in stereo; few enough that do_bench gets
                      # several samples of an eager call (~1 ms/step would be 32 ms a call)
SMALL_PRESET = "tiny"
ANCHOR_SAMPLES_PER_S = {1: 248.0, 16: 3318.0, 256: 44404.0}     # anchors.md, mono
TARGET_STEPS_PER_S = {1: 32000.0}                                # design.md
TARGET_SAMPLES_PER_S = {256: 2.0e6}                              # design.md


def make_model(preset: str, channels: int, device, seed: int = 0,
               kernel_backend: str | None = None, stereo_layout: str = "interleave") -> SaShiMi:
    """A random-init model in eval mode, ready to step (kernel_backend default: 'auto' on
    CUDA, 'reference' on CPU, as sashimi.generate loads a checkpoint)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    if kernel_backend is None:
        kernel_backend = "auto" if device.type == "cuda" else "reference"
    cfg = ModelConfig(**dict(PRESETS[preset], channels=channels, kernel_backend=kernel_backend,
                             stereo_layout=stereo_layout))
    model = SaShiMi(cfg).to(device).eval()
    model.setup_step()
    return model


def make_generation_loop(model: SaShiMi, batch: int, steps: int, seed: int = 0):
    """A callable that runs `steps` more generation steps (model step + sampling), as
    generate_audio does, carrying token, state and step index over between calls."""
    device = model.embedding.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    state = model.default_state(batch)
    zero = Quantizer(model.cfg.quantization, model.cfg.bits).zero_token     # silence
    k = model.cfg.step_tokens
    shape = (batch, k) if k > 1 else (batch,)   # a frame, or a token
    carry = dict(token=torch.full(shape, zero, dtype=torch.long, device=device), t=0)
    loglik = torch.zeros(batch, dtype=torch.float64, device=device)

    @torch.no_grad()
    def loop():
        token, t = carry["token"], carry["t"]
        for _ in range(steps):
            with nvtx_range("sashimi/generate/step"):
                out = model.step(token, state, t)
                token, logp = model.sample_next(out, generator=gen)
                token = token.view(shape)
                loglik.add_(logp.double())
            t += 1
        carry["token"], carry["t"] = token, t
        return token

    return loop


def _modules_runner(model: SaShiMi, batch: int):
    """The eager PyTorch step, module by module (no fused tier kernel): the baseline."""
    model.setup_step(fused=False)
    return make_generation_loop(model, batch, STEPS_PER_CALL)


def _eager_runner(model: SaShiMi, batch: int):
    """Eager Python loop, each tier one kernels.tier_step launch."""
    model.setup_step()
    return make_generation_loop(model, batch, STEPS_PER_CALL)


def _graphs_runner(model: SaShiMi, batch: int):
    """sashimi.generate's CUDA-graph path: one replayed graph per step (16 phase variants),
    sampling and the likelihood on the GPU, no host sync."""
    from sashimi.generate import StepSampler, capture_step_graphs, run_steps
    model.setup_step()
    device = model.embedding.weight.device
    n = 1 << 20                                     # position buffer; wraps around (see below)
    tokens = torch.zeros(batch, n * model.cfg.step_tokens, dtype=torch.long, device=device)
    loglik = torch.zeros(batch, dtype=torch.float64, device=device)
    sampler = StepSampler(model, model.default_state(batch), tokens, loglik, 0,
                          generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():        # tier_step is inference-only: capture outside autograd
        graphs = capture_step_graphs(sampler)
    carry = dict(t=0)

    def loop():
        t = carry["t"]
        if t + STEPS_PER_CALL >= n:                 # keep the device-side write index in range
            sampler.pos.zero_()
        run_steps(sampler, t, t + STEPS_PER_CALL, graphs)
        carry["t"] = t + STEPS_PER_CALL
    return loop


RUNNERS = {"modules": _modules_runner, "eager": _eager_runner, "graphs": _graphs_runner}


def _params():
    out = []
    for preset in ("paper", SMALL_PRESET):
        for ch in CHANNELS:
            for B in BATCHES:
                if preset == SMALL_PRESET and B != 1:
                    continue
                for provider in RUNNERS:
                    out.append(pytest.param(provider, preset, ch, B, id=f"{provider}-{preset}-{ch}-B{B}"))
    return out


@pytest.mark.parametrize("provider,preset,channels,batch", _params())
def test_bench_generation_fwd(benchmark, bench_size, provider, preset, channels, batch):
    if (preset == SMALL_PRESET) != (bench_size == "small"):
        pytest.skip(f"preset {preset} is not in the {bench_size!r} bench size")
    C = CHANNELS[channels]
    layout = LAYOUTS.get(channels, "interleave")
    gc.collect()
    torch.cuda.empty_cache()
    model = make_model(preset, C, "cuda", stereo_layout=layout)
    fn = RUNNERS[provider](model, batch)
    shape = dict(B=batch, C=C) if layout == "interleave" else dict(B=batch, C=C, layout=layout)
    p50 = run(benchmark, fn, op=OP, direction="fwd", provider=provider,
              shape=shape, dtype="fp32", rounds=10, rep_ms=2000)
    steps_per_s = STEPS_PER_CALL / (p50 * 1e-3)
    per_frame = C // model.cfg.step_tokens          # backbone steps per audio frame
    samples_per_s = batch * steps_per_s / per_frame
    paper = preset == "paper"
    benchmark.group = f"{OP}-{preset}-B{batch}-C{C}"
    benchmark.extra_info.update(
        preset=preset, batch=batch, channels=C, stereo_layout=layout, steps_per_call=STEPS_PER_CALL,
        steps_per_s=steps_per_s, samples_per_s=samples_per_s, us_per_step=p50 * 1e3 / STEPS_PER_CALL,
        realtime_factor=steps_per_s / per_frame / model.cfg.sample_rate,
        anchor_samples_per_s=ANCHOR_SAMPLES_PER_S.get(batch) if paper and C == 1 else None,
        target_steps_per_s=TARGET_STEPS_PER_S.get(batch) if paper and layout == "interleave" else None,
        target_samples_per_s=TARGET_SAMPLES_PER_S.get(batch) if paper else None,
    )


@pytest.mark.parametrize("channels", list(CHANNELS))
def test_bench_prefill_2s_prompt(benchmark, bench_size, channels):
    """Prefill of a 2-second prompt (paper config, 16 kHz): the state after 32,000 x C tokens
    computed in parallel (sashimi.prefill), against the 32,000 x C steps it replaces."""
    from sashimi.prefill import prefill
    preset = SMALL_PRESET if bench_size == "small" else "paper"
    C = CHANNELS[channels]
    model = make_model(preset, C, "cuda", stereo_layout=LAYOUTS.get(channels, "interleave"))
    frames = 2 * model.cfg.sample_rate
    T = frames * C
    shape = (1, frames, C) if model.cfg.step_tokens > 1 else (1, T)
    prompt = torch.randint(0, model.cfg.levels, shape, device="cuda")
    with torch.no_grad():
        p50 = run(benchmark, lambda: prefill(model, prompt), op="prefill", direction="fwd",
                  provider="prefill", shape=dict(T=T, C=C), dtype="fp32", rounds=5, rep_ms=2000)
    benchmark.extra_info.update(preset=preset, prompt_tokens=T, tokens_per_s=T / (p50 * 1e-3))
