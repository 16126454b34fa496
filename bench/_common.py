"""What every benchmark shares: the H100 floor, do_bench quantiles, pytest-benchmark wiring.

Each benchmark times the same callable twice: `triton.testing.do_bench` (CUDA-event medians,
p20/p80, recorded in extra_info) and pytest-benchmark's own rounds (wall clock, ending in a
synchronize), so the table and the JSON agree on what was measured.
"""
from __future__ import annotations

import subprocess

import torch

# The H100's measured ceilings (shared/anchors.md, 2026-11-25).
H100_FP32_FLOPS = 51.6e12
H100_BYTES_PER_S = 3.0e12


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def run(benchmark, fn, *, op: str, direction: str, provider: str, shape: dict, dtype: str,
        flops: float | None = None, nbytes: float | None = None, rounds: int = 20,
        rep_ms: int = 300) -> float:
    """Time `fn` (a GPU callable) and record it. Returns the do_bench median in ms.
    rep_ms: do_bench's measuring time; raise it for long calls (a training step) so the
    median has enough samples for the regression gate."""
    import triton
    import triton.testing

    fn()  # compile, autotune
    torch.cuda.synchronize()
    p50, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    shape_str = "-".join(f"{k}{v}" for k, v in shape.items())
    benchmark.group = f"{op}-{direction}-{shape_str}"
    seconds = p50 * 1e-3
    info = dict(op=op, direction=direction, provider=provider, shape=shape, dtype=dtype,
                gpu_name=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, git_sha=git_sha(),
                ms_p20=p20, ms_p50=p50, ms_p80=p80)
    floor_s = 0.0
    if flops is not None:
        info["gflops"] = flops / seconds / 1e9
        floor_s = max(floor_s, flops / H100_FP32_FLOPS)
    if nbytes is not None:
        info["gbps"] = nbytes / seconds / 1e9
        floor_s = max(floor_s, nbytes / H100_BYTES_PER_S)
    if floor_s:
        info["floor_ms"] = floor_s * 1e3
        info["fraction_of_floor"] = floor_s / seconds
    benchmark.extra_info.update(info)

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    return p50


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


def make_train_step(cfg_kw: dict, batch_size: int, seq_len: int, channels: int, precision: str,
                    device, compile_backend: str | None = None, seed: int = 0, lr: float | None = None):
    """One optimiser step as sashimi.train takes it (timed by bench/test_train_step.py and
    bench.gpu_check): the loss under
    bf16 autocast when asked, backward, clip 1.0, fused AdamW over S4's parameter groups,
    zero_grad, the log_dt clamp; with compile_backend, the loss module under torch.compile as
    `sashimi.train --compile` does. Returns (step, model, tokens per step)."""
    from sashimi.model import ModelConfig, SaShiMi
    from sashimi.train import LossOf, TrainConfig, param_groups
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = ModelConfig(**dict(cfg_kw, seq_len=seq_len, channels=channels))
    model = SaShiMi(cfg).to(device).train()
    tc = TrainConfig()
    lr = tc.lr if lr is None else lr
    optimizer = torch.optim.AdamW(param_groups(model, lr, tc.weight_decay), lr=lr,
                                  fused=device.type == "cuda")
    loss_of = LossOf(model)
    if compile_backend:
        loss_of = torch.compile(loss_of, backend=compile_backend)
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, cfg.levels, (batch_size, seq_len + 1, channels), generator=g).to(device)
    clamped = [m for m in model.modules() if hasattr(m, "clamp_")]
    bf16 = precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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
