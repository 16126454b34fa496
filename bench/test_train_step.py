"""End-to-end training step of the SaShiMi model: forward + backward + fused AdamW.

One timed call is one optimiser step exactly as sashimi.train takes it (bench._common.
make_train_step); the batch is random tokens already on the GPU (the data pipeline is timed by
bench/test_data.py). Shapes: the paper preset (5,447,680 parameters), mono B=8 x L=16384 (the
public anchor) and stereo B=4 x L=16384 x C=2 (the same tokens per step); --bench-size small:
the tiny preset at L=1024. fp32 and bf16 (autocast for the dense layers; the SSM stays fp32).
Providers: triton (kernel_backend="auto") and reference (tiny preset only: the reference Cauchy
materialises (4 H, N, L) complex tensors per layer).

extra_info: tokens_per_s (B L C over the do_bench median), peak_gib (max_memory_allocated over
one step: weights, optimiser state, activations, gradients), the anchor and target of
bench/anchors.json (paper preset) and whether the target is met.
"""
from __future__ import annotations

import gc

import pytest
import torch

from bench._common import ANCHORS, make_train_step, run
from sashimi.model import count_parameters

OP = "train_step"
SHAPES = {   # name -> (preset, B, L, C)
    "paper-mono-B8-L16384": ("paper", 8, 16384, 1),
    "paper-stereo-B4-L16384-C2": ("paper", 4, 16384, 2),
    "tiny-mono-B8-L1024": ("tiny", 8, 1024, 1),
    "tiny-stereo-B4-L1024-C2": ("tiny", 4, 1024, 2),
}
SMALL_PRESET = "tiny"
PROVIDERS = {"triton": "auto", "reference": "reference"}   # provider -> kernel_backend
TRAIN = ANCHORS["train"]


@pytest.mark.parametrize("provider,shape_name,precision", [
    pytest.param(p, n, prec, id=f"{p}-{n}-{prec}") for n in SHAPES for prec in ("fp32", "bf16") for p in PROVIDERS])
def test_bench_train_step_fwdbwd(benchmark, bench_size, provider, shape_name, precision):
    preset, B, L, C = SHAPES[shape_name]
    if (preset == SMALL_PRESET) != (bench_size == "small"):
        pytest.skip(f"{shape_name} is not in the {bench_size!r} bench size")
    if provider == "reference" and preset != SMALL_PRESET:
        pytest.skip("the reference kernels run at the tiny preset only")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    gc.collect()
    torch.cuda.empty_cache()
    step, model, tokens = make_train_step(preset, B, L, C, precision, "cuda", kernel_backend=PROVIDERS[provider])
    try:
        for _ in range(2):   # compile / autotune every kernel, allocate the optimiser state
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        p50 = run(benchmark, step, op=OP, direction="fwdbwd", provider=provider,
                  shape=dict(B=B, L=L, C=C), dtype=precision, rounds=10, rep_ms=2000)
        tps = tokens / (p50 * 1e-3)
        paper = preset == "paper"
        benchmark.group = f"{OP}-{preset}-B{B}-L{L}-C{C}-{precision}"
        benchmark.extra_info.update(
            preset=preset, kernel_backend=PROVIDERS[provider], parameters=count_parameters(model),
            tokens_per_step=tokens, ms_per_step=p50, tokens_per_s=tps, peak_gib=peak_gib,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            anchor_tokens_per_s=TRAIN["anchor_tokens_per_s"] if paper and C == 1 else None,
            anchor_peak_gib=TRAIN["anchor_peak_gib"] if paper and C == 1 else None,
            target_tokens_per_s=TRAIN["target_tokens_per_s"] if paper else None,
            target_peak_gib=TRAIN["target_peak_gib"] if paper else None,
            meets_target=(tps >= TRAIN["target_tokens_per_s"] and peak_gib <= TRAIN["target_peak_gib"])
            if paper else None)
    finally:
        del step, model
        gc.collect()
        torch.cuda.empty_cache()
