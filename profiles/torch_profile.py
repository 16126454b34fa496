"""torch.profiler fallback (no nsys needed): a few training or generation steps, CPU or CUDA.

    python profiles/torch_profile.py train    [--preset paper] [--stereo] [--device cuda] ...
    python profiles/torch_profile.py generate [--preset paper] [--batch-size 1] [--device cuda] ...

The workloads are the benchmarks' own (bench/_common.py), so the profile explains the benchmark's
number; random init. Writes under --out (default runs/torch_profile/) <name>_trace.json (Chrome
trace: chrome://tracing or ui.perfetto.dev) and <name>_table.txt (key_averages, by CUDA time, CPU
time on CPU), and prints the table with wall time per step and, on CUDA, kernels launched and GPU
busy time per step (the public SaShiMi's figures: bench/anchors.json). A step is one optimiser step or --tokens-per-step tokens; --warmup steps run
unrecorded. Default preset: paper on CUDA, tiny on CPU (with the reference kernels).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # run as a script: make `bench` (a repo folder) importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, schedule  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python profiles/torch_profile.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("train", "generate"))
    p.add_argument("--preset", choices=("tiny", "paper"), default=None,
                   help="model size (default: paper on CUDA, tiny on CPU)")
    p.add_argument("--stereo", action="store_true", help="two interleaved channels")
    p.add_argument("--batch-size", type=int, default=None,
                   help="train: default 8 (CUDA) / 2 (CPU); generate: default 1")
    p.add_argument("--seq-len", type=int, default=None, help="train: frames per example (default: the preset's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="train only")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=1, help="steps run before recording")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="generate: interleaved tokens per profiled step (default 16 x channels: "
                        "one full cycle of the pooled tiers)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--kernel-backend", default=None, choices=("auto", "triton", "reference"),
                   help="default: auto on CUDA, reference on CPU (as sashimi.train)")
    p.add_argument("--out", default="runs/torch_profile", help="folder for the trace and the table")
    p.add_argument("--row-limit", type=int, default=30, help="rows of the printed table")
    p.add_argument("--sort-by", default=None,
                   help="key_averages sort key (default: device_time_total on CUDA, "
                        "cpu_time_total on CPU)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def build_workload(args, device: torch.device):
    """(callable running one profiled step, description)."""
    from sashimi.model import PRESETS

    preset = args.preset or ("paper" if device.type == "cuda" else "tiny")
    C = 2 if args.stereo else 1
    backend = args.kernel_backend or ("auto" if device.type == "cuda" else "reference")
    if args.mode == "train":
        from bench._common import make_train_step

        B = args.batch_size or (8 if device.type == "cuda" else 2)
        L = args.seq_len or PRESETS[preset]["seq_len"]
        step, _model, tokens = make_train_step(preset, B, L, C, args.precision, device, kernel_backend=backend)
        name = f"train_{preset}_{'stereo' if C == 2 else 'mono'}_B{B}_L{L}_{args.precision}"
        return step, name, f"{tokens:,} tokens per step"

    from bench._common import make_generation_loop, make_model

    B = args.batch_size or 1
    tokens = args.tokens_per_step or 16 * C
    model = make_model(preset, C, device, kernel_backend=backend)
    loop = make_generation_loop(model, B, tokens)
    name = f"generate_{preset}_{'stereo' if C == 2 else 'mono'}_B{B}"
    return loop, name, f"{tokens} interleaved tokens x batch {B} per step"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = _device(args.device)
    fn, name, what = build_workload(args, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    wall = []
    with profile(activities=activities,
                 schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)) as prof:
        for i in range(args.warmup + args.steps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= args.warmup:
                wall.append(time.perf_counter() - t0)
            prof.step()

    trace = out / f"{name}_trace.json"
    prof.export_chrome_trace(str(trace))
    sort_by = args.sort_by or ("device_time_total" if device.type == "cuda" else "cpu_time_total")
    table = prof.key_averages().table(sort_by=sort_by, row_limit=args.row_limit)
    summary = [f"{args.mode}: {name} on {device}"
               + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
               + f", {what}; {args.steps} profiled steps after {args.warmup} warm-up",
               f"wall time per step: {1e3 * sum(wall) / len(wall):.2f} ms (median "
               f"{1e3 * sorted(wall)[len(wall) // 2]:.2f} ms; the profiler adds overhead)"]
    if device.type == "cuda":
        gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in gpu)
        summary.append(f"GPU: {len(gpu) / args.steps:,.0f} kernels/copies per step, busy "
                       f"{busy_us / 1e3 / args.steps:.2f} ms per step")
    text = "\n".join(summary) + f"\n\nsorted by {sort_by}\n" + table + "\n"
    (out / f"{name}_table.txt").write_text(text)
    print(text)
    print(f"Chrome trace: {trace}\ntable: {out / f'{name}_table.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
