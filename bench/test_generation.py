"""Generation throughput: the SaShiMi model as a recurrence, and prefill of a prompt.

One timed call runs STEPS_PER_CALL model steps the way sashimi.generate does (step, sample, the
log-likelihood accumulated on the device, state carried over from call to call), paper preset at
random init, fp32, kernel_backend="auto"; 32 steps is a multiple of the pooling (16) times the
channels, so every call does the same work. Batch 1, 16, 256; mono, stereo (interleaved) and
stereo-frames (one backbone step and two head samples per frame); --bench-size small: tiny, B=1.
Providers: bench._common.GENERATION_RUNNERS ("modules", "eager", "graphs").

extra_info: steps_per_s (backbone steps per second per stream), samples_per_s (audio frames per
second over the batch), us_per_step, realtime_factor, and the anchor and targets of
bench/anchors.json (the anchor for the mono paper cases only).
"""
from __future__ import annotations

import gc

import pytest
import torch

from bench._common import ANCHORS, GENERATION_RUNNERS, make_model, run

OP = "generation"
BATCHES = (1, 16, 256)
CHANNELS = {"mono": 1, "stereo": 2, "stereo-frames": 2}
LAYOUTS = {"stereo-frames": "frames"}          # the others: interleave
STEPS_PER_CALL = 32
SMALL_PRESET = "tiny"
GEN = ANCHORS["generation"]


def _params():
    return [pytest.param(provider, preset, ch, B, id=f"{provider}-{preset}-{ch}-B{B}")
            for preset in ("paper", SMALL_PRESET) for ch in CHANNELS for B in BATCHES
            if preset != SMALL_PRESET or B == 1 for provider in GENERATION_RUNNERS]


@pytest.mark.parametrize("provider,preset,channels,batch", _params())
def test_bench_generation_fwd(benchmark, bench_size, provider, preset, channels, batch):
    if (preset == SMALL_PRESET) != (bench_size == "small"):
        pytest.skip(f"preset {preset} is not in the {bench_size!r} bench size")
    C, layout = CHANNELS[channels], LAYOUTS.get(channels, "interleave")
    gc.collect()
    torch.cuda.empty_cache()
    model = make_model(preset, C, "cuda", stereo_layout=layout)
    fn = GENERATION_RUNNERS[provider](model, batch, STEPS_PER_CALL)
    shape = dict(B=batch, C=C) if layout == "interleave" else dict(B=batch, C=C, layout=layout)
    p50 = run(benchmark, fn, op=OP, direction="fwd", provider=provider, shape=shape, dtype="fp32",
              rounds=10, rep_ms=2000)
    steps_per_s = STEPS_PER_CALL / (p50 * 1e-3)
    per_frame = C // model.cfg.step_tokens          # backbone steps per audio frame
    samples_per_s = batch * steps_per_s / per_frame
    paper, b = preset == "paper", str(batch)
    benchmark.group = f"{OP}-{preset}-B{batch}-C{C}"
    benchmark.extra_info.update(
        preset=preset, batch=batch, channels=C, stereo_layout=layout, steps_per_call=STEPS_PER_CALL,
        steps_per_s=steps_per_s, samples_per_s=samples_per_s, us_per_step=p50 * 1e3 / STEPS_PER_CALL,
        realtime_factor=steps_per_s / per_frame / model.cfg.sample_rate,
        anchor_samples_per_s=GEN["anchor_samples_per_s"].get(b) if paper and C == 1 else None,
        target_steps_per_s=GEN["target_steps_per_s"].get(b) if paper and layout == "interleave" else None,
        target_samples_per_s=GEN["target_samples_per_s"].get(b) if paper else None)


@pytest.mark.parametrize("channels", list(CHANNELS))
def test_bench_prefill_2s_prompt(benchmark, bench_size, channels):
    """Prefill of a 2-second prompt (16 kHz): the state after 32,000 x C tokens computed in
    parallel (sashimi.prefill), against the 32,000 x C steps it replaces."""
    from sashimi.prefill import prefill
    preset = SMALL_PRESET if bench_size == "small" else "paper"
    C = CHANNELS[channels]
    model = make_model(preset, C, "cuda", stereo_layout=LAYOUTS.get(channels, "interleave"))
    frames = 2 * model.cfg.sample_rate
    T = frames * C
    prompt = torch.randint(0, model.cfg.levels, (1, frames, C) if model.cfg.frames else (1, T), device="cuda")
    with torch.no_grad():
        p50 = run(benchmark, lambda: prefill(model, prompt), op="prefill", direction="fwd",
                  provider="prefill", shape=dict(T=T, C=C), dtype="fp32", rounds=5, rep_ms=2000)
    benchmark.extra_info.update(preset=preset, prompt_tokens=T, tokens_per_s=T / (p50 * 1e-3))
