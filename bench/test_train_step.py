"""End-to-end training step of the SaShiMi model: forward + backward + fused AdamW.

One timed call is one optimiser step exactly as `sashimi.train` takes it: the loss
(`LossOf(model)`, mean NLL in bits over every interleaved target) under
`torch.autocast(bfloat16)` when the precision is bf16, backward, gradient clipping at 1.0,
`torch.optim.AdamW(param_groups(model, lr, weight_decay), fused=True)` (S4's parameter
groups), `zero_grad(set_to_none=True)` and the log_dt clamp. The batch is random tokens
already on the GPU: the data pipeline is timed separately (bench/test_data.py).

Shapes: the paper preset (d_model 64, 8 layers, pool [4, 4], d_state 64: 5,447,680
parameters), mono B=8 x L=16384 (the anchor: public SaShiMi 1.00 M tokens/s, 8.36 GiB peak,
anchors.md) and stereo B=4 x L=16384 x C=2 (the same number of tokens per step; no public
anchor, target: the mono tokens/s); --bench-size small: the tiny preset, B=8 x L=1024 and
B=4 x L=1024 x 2. Precision fp32 and bf16 (autocast for the dense layers; the SSM stays fp32).

Providers:
  triton     kernel_backend="auto": the Triton kernels (on CUDA)
  reference  kernel_backend="reference": the plain-PyTorch kernel references (tiny preset only:
             the reference Cauchy materialises (4 H, N, L) complex tensors per layer)

extra_info (besides bench._common.run's): tokens_per_s = B L C / median step time (the
do_bench median), peak_gib = torch.cuda.max_memory_allocated() over one step after
reset_peak_memory_stats() (weights, optimiser state, activations and gradients included), the
anchor and the target (design.md: >= 3.0 M tokens/s, <= 6 GiB) side by side, and whether
they are met. The targets only apply to the paper preset.

The workload builder `make_train_step` is shared with profiles/torch_profile.py.
"""
from __future__ import annotations

import gc

import pytest
import torch

from bench import _common
from bench._common import run
from sashimi.model import PRESETS, count_parameters

OP = "train_step"
# name -> (preset, B, L, C)
SHAPES = {
    "paper-mono-B8-L16384": ("paper", 8, 16384, 1),
    "paper-stereo-B4-L16384-C2": ("paper", 4, 16384, 2),
    "tiny-mono-B8-L1024": ("tiny", 8, 1024, 1),             # --bench-size small
    "tiny-stereo-B4-L1024-C2": ("tiny", 4, 1024, 2),        # --bench-size small
}
SMALL_PRESET = "tiny"
PRECISIONS = ("fp32", "bf16")
PROVIDERS = {"triton": "auto", "reference": "reference"}   # provider -> kernel_backend

# anchors.md (public SaShiMi, H100, best of three runs) and design.md's targets
ANCHOR_TOKENS_PER_S = 1.00e6      # mono B=8 x L=16384 (131.6 ms/step)
ANCHOR_PEAK_GIB = 8.36
TARGET_TOKENS_PER_S = 3.0e6       # mono and stereo alike
TARGET_PEAK_GIB = 6.0


def make_train_step(preset: str, batch_size: int, seq_len: int, channels: int, precision: str,
                    kernel_backend: str, device, seed: int = 0, lr: float | None = None):
    """bench._common.make_train_step for a preset and a kernel backend: (step, model, tokens_per_step)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return _common.make_train_step(dict(PRESETS[preset], kernel_backend=kernel_backend), batch_size, seq_len,
                                   channels, precision, device, seed=seed, lr=lr)


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _params():
    out = []
    for name, (preset, *_rest) in SHAPES.items():
        for precision in PRECISIONS:
            for provider in PROVIDERS:
                out.append(pytest.param(provider, name, precision, id=f"{provider}-{name}-{precision}"))
    return out


@pytest.mark.parametrize("provider,shape_name,precision", _params())
def test_bench_train_step_fwdbwd(benchmark, bench_size, provider, shape_name, precision):
    preset, B, L, C = SHAPES[shape_name]
    if (preset == SMALL_PRESET) != (bench_size == "small"):
        pytest.skip(f"{shape_name} is not in the {bench_size!r} bench size")
    if provider == "reference" and preset != SMALL_PRESET:
        pytest.skip("the reference kernels run at the tiny preset only (at the paper preset the "
                    "reference Cauchy materialises (4 H, N, L) complex tensors in every layer)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")

    _free_cuda()
    step, model, tokens = make_train_step(preset, B, L, C, precision, PROVIDERS[provider], "cuda")
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
        tokens_per_s = tokens / (p50 * 1e-3)
        paper = preset == "paper"
        anchor = paper and C == 1
        benchmark.group = f"{OP}-{preset}-B{B}-L{L}-C{C}-{precision}"
        benchmark.extra_info.update(
            preset=preset, kernel_backend=PROVIDERS[provider], parameters=count_parameters(model),
            tokens_per_step=tokens, ms_per_step=p50, tokens_per_s=tokens_per_s, peak_gib=peak_gib,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            anchor_tokens_per_s=ANCHOR_TOKENS_PER_S if anchor else None,
            anchor_peak_gib=ANCHOR_PEAK_GIB if anchor else None,
            target_tokens_per_s=TARGET_TOKENS_PER_S if paper else None,
            target_peak_gib=TARGET_PEAK_GIB if paper else None,
            meets_target=(tokens_per_s >= TARGET_TOKENS_PER_S and peak_gib <= TARGET_PEAK_GIB)
            if paper else None,
        )
    finally:
        del step, model
        _free_cuda()
