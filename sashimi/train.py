"""Train SaShiMi on raw audio, mono or stereo: `python -m sashimi.train --stereo`.

With no --data folder it trains on the built-in synthetic stereo music, so it runs anywhere.
Progress bar (loss, bits/sample, tokens/s), validation NLL in bits per sample overall and per
channel, a CSV log, atomic checkpoints every --checkpoint-every steps and at the end,
`--resume` that continues exactly where the run stopped (the data of step s is a function of
(seed, s)), a clean stop on a non-finite loss (the last good checkpoint is kept) and on
Ctrl-C (a checkpoint is written). Under `torchrun --nproc_per_node=N` it trains with
DistributedDataParallel (nccl on GPUs, gloo on CPU); only rank 0 writes.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kernels._utils import nvtx_range
from kernels.reference import check_tokens
from sashimi import checkpoint
from sashimi.cli import UserError, run_cli
from sashimi.checkpoint import CheckpointError
from sashimi.model import PRESETS, ModelConfig, SaShiMi, count_parameters
from sashimi.quantize import Quantizer
from sashimi.s4 import S4Layer

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: str | None = None
    steps: int = 2000
    batch_size: int = 8
    lr: float = 4e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 2
    val_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 10
    sample_every: int = 0
    sample_seconds: float = 1.0
    compile: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
MODEL_FLAGS = ("ssm", "bits", "quantization", "head", "seq_len", "sample_rate", "n_mixtures",
               "tie_weights", "channels", "d_model", "n_layers", "d_state")


def parse_args(argv=None) -> argparse.Namespace:
    # flag defaults are None ("not given", see check_resume_flags); help texts state the real ones
    p = argparse.ArgumentParser(prog="python -m sashimi.train", description=__doc__.split("\n\n")[0])
    # None defaults: "not given", so --resume can tell a flag that contradicts the checkpoint
    p.add_argument("--stereo", action="store_true", default=None, help="two channels, interleaved L R L R")
    p.add_argument("--data", help="folder of WAV/FLAC/OGG files (searched recursively); default: built-in synthetic stereo music")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model size (default: tiny)")
    p.add_argument("--ssm", choices=("dplr", "diag"), default=None, help="S4 (DPLR, default) or S4D (diagonal)")
    p.add_argument("--bits", type=int, choices=(8, 16), default=None, help="quantisation bits (default 8)")
    p.add_argument("--quantization", choices=("mu-law", "linear"), default=None, help="default mu-law")
    p.add_argument("--head", choices=("categorical", "dml"), default=None, help="default categorical")
    p.add_argument("--n-mixtures", type=int, default=None, help="DML mixtures (default 10)")
    p.add_argument("--tie-weights", action="store_true", default=None, help="tie the categorical head to the embedding")
    p.add_argument("--sample-rate", type=int, default=None, help="model sample rate in Hz (default 16000)")
    p.add_argument("--seq-len", type=int, default=None, help="frames per training example (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step per process (default 8)")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (default 2000)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (S4's A, B, P, dt use 1e-3)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="bf16: autocast for dense layers, SSM in fp32")
    p.add_argument("--out", default="runs/sashimi", help="run folder: checkpoint, CSV log, samples (default runs/sashimi)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 2)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 250)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default 250)")
    p.add_argument("--sample-every", type=int, default=None, help="write a short sample every N steps (0: never)")
    p.add_argument("--sample-seconds", type=float, default=None, help="length of those samples (default 1.0)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step (GPU)")
    return p.parse_args(argv)


def model_config_from_args(args) -> ModelConfig:
    preset = dict(PRESETS[args.preset or "tiny"])
    given = dict(ssm=args.ssm, bits=args.bits, quantization=args.quantization, head=args.head,
                 n_mixtures=args.n_mixtures, tie_weights=args.tie_weights, sample_rate=args.sample_rate,
                 seq_len=args.seq_len, channels=2 if args.stereo else None)
    preset.update({k: v for k, v in given.items() if v is not None})
    try:
        return ModelConfig(**preset)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def train_config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    cfg = base or TrainConfig()
    given = dict(data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 precision=args.precision, seed=args.seed, num_workers=args.num_workers,
                 val_every=args.val_every, checkpoint_every=args.checkpoint_every,
                 sample_every=args.sample_every, sample_seconds=args.sample_seconds, compile=args.compile)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg


def check_resume_flags(args, saved: ModelConfig) -> None:
    """Flags that would change the model must agree with the checkpoint's config."""
    wanted = model_config_from_args(args)
    explicit = {"ssm": args.ssm, "bits": args.bits, "quantization": args.quantization, "head": args.head,
                "n_mixtures": args.n_mixtures, "tie_weights": args.tie_weights,
                "sample_rate": args.sample_rate, "seq_len": args.seq_len,
                "channels": 2 if args.stereo else None}
    if args.preset is not None:
        explicit.update({k: getattr(wanted, k) for k in PRESETS[args.preset]})
    diffs = [f"{k}={v!r} (checkpoint: {getattr(saved, k)!r})" for k, v in explicit.items()
             if v is not None and getattr(saved, k) != v]
    if diffs:
        raise UserError("--resume: these flags differ from the checkpoint's model config: " + ", ".join(diffs))


# --------------------------------------------------------------------------------------------
# pieces of the loop
# --------------------------------------------------------------------------------------------
def resolve_device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r}") from None


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """S4's groups: SSM parameters (dt, A, B, P) at their own lr without weight decay."""
    groups: dict[tuple, list] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        hint = getattr(p, "_optim", None)
        key = (hint["lr"], hint["weight_decay"]) if hint else (lr, weight_decay if p.dim() >= 2 else 0.0)
        groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr=k[0], weight_decay=k[1], base_lr=k[0]) for k, ps in groups.items()]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% (a function of the step, so resume is exact)."""
    warmup = min(cfg.warmup_steps, max(1, cfg.steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class LossOf(nn.Module):
    """The model's per-target NLL as a forward(), so DDP sees (and syncs) the training pass."""

    def __init__(self, model: SaShiMi):
        super().__init__()
        self.model = model

    def forward(self, batch):
        # the trainer checks the token range on the CPU batch (no host sync on the GPU)
        return self.model.nll_bits(batch, check_tokens=False)


@torch.no_grad()
def validate(model: SaShiMi, batches, device, precision: str, distributed: bool) -> dict:
    """Mean NLL in bits per sample, overall and per channel, over the fixed validation crops."""
    model.eval()
    C = model.cfg.channels
    sums = torch.zeros(C + 1, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            nll = model.nll_bits(batch).float()
        for c, part in enumerate(SaShiMi.per_channel(nll, C)):
            sums[c] += part.sum().double()
        sums[C] += nll.numel()
    if distributed:
        dist.all_reduce(sums)
    model.train()
    count = sums[C].item()
    per = [(sums[c] / (count / C)).item() for c in range(C)] if count else [float("nan")] * C
    result = {"val_bits": sum(per) / C}
    names = ["L", "R"] if C == 2 else ["mono"]
    for name, v in zip(names, per):
        result[f"val_bits_{name}"] = v
    return result


class StopFlag:
    """First Ctrl-C: finish the step, write a checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        if threading_main():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run(args) -> int:
    from sashimi.data import AudioCrops, DataError, train_batches, valid_batches

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    device = resolve_device(args.device, local_rank if distributed else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per rank; kernels launch on the current device
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = rank == 0
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT_NAME

    saved = None
    if args.resume:
        try:
            saved = checkpoint.load(ckpt_path)
            model_cfg = ModelConfig.from_dict(saved["model_config"])
        except (CheckpointError, ValueError, TypeError) as exc:
            raise UserError(f"--resume: {exc}") from None
        check_resume_flags(args, model_cfg)
        train_cfg = train_config_from_args(args, TrainConfig(**saved["train_config"]))
    else:
        if ckpt_path.exists():
            raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        model_cfg = model_config_from_args(args)
        train_cfg = train_config_from_args(args)
    model_cfg = dataclasses.replace(model_cfg, kernel_backend="reference" if device.type == "cpu" else "auto")

    torch.manual_seed(train_cfg.seed)
    quantizer = Quantizer(model_cfg.quantization, model_cfg.bits)
    try:
        crops = dict(sample_rate=model_cfg.sample_rate, channels=model_cfg.channels,
                     crop_frames=model_cfg.seq_len + 1, quantizer=quantizer, seed=train_cfg.seed)
        train_set = AudioCrops(train_cfg.data, split="train", **crops)
        valid_set = AudioCrops(train_cfg.data, split="valid", **crops)
    except DataError as exc:
        raise UserError(str(exc)) from None

    model = SaShiMi(model_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.lr, train_cfg.weight_decay),
                                  lr=train_cfg.lr, fused=device.type == "cuda")
    start_step = 0
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"--resume: the checkpoint's weights do not fit this model: "
                            f"{str(exc).splitlines()[0]}") from None
        start_step = saved["step"]
        checkpoint.set_rng_state(saved["rng"])
    s4_layers = [m for m in model.modules() if isinstance(m, S4Layer)]
    loss_of: nn.Module = LossOf(model)
    if distributed:
        loss_of = nn.parallel.DistributedDataParallel(
            loss_of, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(loss_of) if train_cfg.compile else loss_of

    if main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"SaShiMi {'stereo' if model_cfg.channels == 2 else 'mono'}, ssm={model_cfg.ssm}, "
              f"{model_cfg.bits}-bit {model_cfg.quantization}, head={model_cfg.head}, "
              f"{count_parameters(model):,} parameters, {model_cfg.sample_rate} Hz, "
              f"{model_cfg.seq_len} frames x {model_cfg.channels} ch, batch {train_cfg.batch_size} x {world}, "
              f"device {device}" + (f", resuming at step {start_step}" if start_step else ""))

    def save(step: int) -> Path:
        return checkpoint.save(ckpt_path, dict(
            model_config=dataclasses.replace(model_cfg, kernel_backend="auto").to_dict(),
            train_config=train_cfg.to_dict(), model=model.state_dict(), optimizer=optimizer.state_dict(),
            step=step, rng=checkpoint.rng_state(), data_position=dict(step=step, seed=train_cfg.seed, world_size=world),
            tokens_seen=step * train_cfg.batch_size * world * model_cfg.l_max))

    batches = train_batches(train_set, batch_size=train_cfg.batch_size, start_step=start_step, rank=rank,
                            world_size=world, num_workers=train_cfg.num_workers,
                            pin_memory=device.type == "cuda")
    val_data = valid_batches(valid_set, batch_size=train_cfg.batch_size)
    # shard validation crops across ranks (the sums are all-reduced)
    has_val = len(val_data) > 0  # the same on every rank (validate() all-reduces)
    val_data = val_data[rank::world] if distributed else val_data
    if main and not has_val:
        print("note: no validation audio (too few or too short files); validation is skipped")
    log_path = out / "log.csv"
    fields = ["step", "elapsed_s", "train_bits", "tokens_per_s", "lr", "val_bits"] + \
             (["val_bits_L", "val_bits_R"] if model_cfg.channels == 2 else ["val_bits_mono"])
    if main and not (args.resume and log_path.exists()):
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()

    def log_row(row: dict) -> None:
        if main:
            with open(log_path, "a", newline="") as f:
                csv.DictWriter(f, fields, extrasaction="ignore").writerow(row)

    from tqdm.auto import tqdm
    bar = tqdm(total=train_cfg.steps, initial=start_step, disable=not main, unit="step",
               dynamic_ncols=True, mininterval=0.5)
    tokens_per_step = train_cfg.batch_size * world * model_cfg.l_max
    log_every = 1 if device.type == "cpu" else train_cfg.log_every
    t0 = time.perf_counter()
    window_t, window_steps = time.perf_counter(), 0
    loss_acc = torch.zeros((), device=device)
    step = start_step
    status = 0
    model.train()
    with StopFlag() as stop:
        while step < train_cfg.steps:
            with nvtx_range("sashimi/train/data"):
                batch = next(batches)
                check_tokens(batch, model_cfg.levels, "training data")
                batch = batch.to(device, non_blocking=True)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, train_cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_cfg.precision == "bf16"):
                with nvtx_range("sashimi/train/forward"):
                    loss = step_fn(batch).float().mean()
            with nvtx_range("sashimi/train/backward"):
                loss.backward()
            if train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            with nvtx_range("sashimi/train/optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for layer in s4_layers:
                    layer.clamp_()
            loss_acc += loss.detach()
            step += 1
            window_steps += 1
            last = step == train_cfg.steps or stop.stop
            ckpt_due = step % train_cfg.checkpoint_every == 0 or last
            val_due = step % train_cfg.val_every == 0 or last
            # the loss is checked (one host sync) before anything is validated or saved
            if step % log_every == 0 or ckpt_due or val_due:
                mean_loss = (loss_acc / window_steps).item()  # one host sync per log interval
                if not math.isfinite(mean_loss):
                    bar.close()
                    print(f"stopping: non-finite training loss ({mean_loss}) at step {step}; "
                          f"the last good checkpoint is kept at {ckpt_path if ckpt_path.exists() else '(none yet)'}",
                          file=sys.stderr)
                    status = 3
                    break
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / (now - window_t)
                bar.set_postfix(loss=f"{mean_loss:.3f}", bits=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}")
                bar.update(window_steps)
                log_row(dict(step=step, elapsed_s=f"{now - t0:.1f}", train_bits=f"{mean_loss:.4f}",
                             tokens_per_s=f"{tps:.0f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}"))
                loss_acc.zero_()
                window_t, window_steps = now, 0
            if val_due and has_val:
                val = validate(model, val_data, device, train_cfg.precision, distributed)
                if main:
                    bar.write(f"step {step}: validation " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
                    log_row(dict(step=step, elapsed_s=f"{time.perf_counter() - t0:.1f}", **{k: f"{v:.4f}" for k, v in val.items()}))
            if main and ckpt_due:
                save(step)
            if main and train_cfg.sample_every and (step % train_cfg.sample_every == 0):
                write_training_sample(model, out, step, train_cfg.sample_seconds, quantizer, bar)
            if stop.stop:
                status = 130
                break
    bar.close()
    if distributed:
        same = ranks_agree(model)
        if main:
            print(f"DDP: parameters {'identical' if same else 'DIFFER'} on all {world} ranks")
        dist.destroy_process_group()
        if not same:
            status = status or 4
    if main and status in (0, 130):
        print(f"checkpoint: {ckpt_path} (step {step})")
        print(f"log: {log_path}")
    return status


def ranks_agree(model: nn.Module) -> bool:
    """Every rank holds bitwise the same parameters (a cheap end-of-run DDP sanity check)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    probe = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device,
                                                          dtype=torch.float64)).sum()])
    gathered = [torch.zeros_like(probe) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def write_training_sample(model: SaShiMi, out: Path, step: int, seconds: float, quantizer, bar) -> None:
    """A short unconditional sample from the current weights (--sample-every)."""
    try:
        from sashimi.generate import generate_audio, write_wav
    except ImportError:  # generation not available in this build
        return
    was_training = model.training
    model.eval()
    audio, _ = generate_audio(model, frames=int(seconds * model.cfg.sample_rate), batch=1,
                              quantizer=quantizer, progress=False)
    path = write_wav(out / "samples" / f"step{step:07d}.wav", audio[0], model.cfg.sample_rate)
    bar.write(f"step {step}: sample {path}")
    model.train(was_training)


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
