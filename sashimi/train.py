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
import contextlib
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

from kernels.profiling import nvtx_range
from kernels.reference import check_tokens
from sashimi import checkpoint, cli
from sashimi.cli import (UserError, atomic_output, check_at_most, check_fits, check_out_dir, command, cores,
                         one_line, resolve_device, write_error)
from sashimi.checkpoint import CheckpointError
from sashimi.layouts import LAYOUTS
from sashimi.model import PRESETS, ModelConfig, SaShiMi, count_parameters
from sashimi.heads import HEADS
from sashimi.predictors import PREDICTORS
from sashimi.s4 import S4Layer

CHECKPOINT_NAME = "checkpoint.pt"
DIVERGED_FACTOR = 1.5  # a loss above 1.5x a uniform guess's bits/sample counts as diverged


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
    deterministic: bool = False
    val_data: str | None = None   # a held-out folder: validation from it, training on all of `data`
    val_crops: int = 256          # fixed validation crops (see AudioCrops: 16 read 0.05 bits off)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
# The flags that set a ModelConfig / TrainConfig field of the same name (with --stereo setting
# channels): read in one place each (model_flags, train_config_from_args), so a new flag is a
# parser line plus its name here.
MODEL_FLAGS = ("ssm", "bits", "quantization", "head", "n_mixtures", "tie_weights", "sample_rate",
               "seq_len", "stereo_layout", "value_input", "predictor")
TRAIN_FLAGS = ("data", "steps", "batch_size", "lr", "precision", "seed", "num_workers", "val_every",
               "checkpoint_every", "sample_every", "sample_seconds", "compile", "deterministic",
               "val_data", "val_crops")


def parse_args(argv=None) -> argparse.Namespace:
    # flag defaults are None ("not given", see check_resume_flags); help texts state the real ones
    p = cli.parser("sashimi.train", __doc__)
    # None defaults: "not given", so --resume can tell a flag that contradicts the checkpoint
    p.add_argument("--stereo", action="store_true", default=None, help="two channels (laid out as --stereo-layout says)")
    p.add_argument("--stereo-layout", choices=tuple(LAYOUTS), default=None,
                   help="stereo as one interleaved sequence L0 R0 L1 R1 ... (default); frames: one "
                        "position per frame, R predicted given L (half the positions); midside: frames of "
                        "M = floor((L+R)/2), S = L-R (16-bit linear, DML head) (docs/layouts.md)")
    p.add_argument("--data", help="folder of WAV/FLAC/OGG files (searched recursively); default: built-in synthetic stereo music")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model size (default: tiny)")
    p.add_argument("--ssm", choices=("dplr", "diag"), default=None,
                   help="S4 (dplr) or S4D (diag); default: the preset's (" + ", ".join(
                       f"{name}: {PRESETS[name].get('ssm', ModelConfig.ssm)}" for name in sorted(PRESETS)) + ")")
    p.add_argument("--bits", type=int, choices=(8, 16), default=None, help="quantisation bits (default 8)")
    p.add_argument("--quantization", choices=("mu-law", "linear"), default=None, help="default mu-law")
    p.add_argument("--head", choices=tuple(HEADS), default=None, help="default categorical")
    p.add_argument("--n-mixtures", type=int, default=None, help="DML mixtures (default 10)")
    p.add_argument("--tie-weights", action="store_true", default=None, help="tie the categorical head to the embedding")
    p.add_argument("--value-input", action=argparse.BooleanOptionalAction, default=None,
                   help="the sample values enter as numbers and the DML means are corrections to a "
                        "predictor's (default: on for --quantization linear, mono, frames or midside)")
    p.add_argument("--predictor", choices=tuple(PREDICTORS), default=None,
                   help="with value input: cascade (adaptive least squares + NLMS, the codec's; chosen at "
                        "16 bits) or fixed2 (2 x[t] - x[t-1]; chosen at 8 bits)")
    p.add_argument("--sample-rate", type=int, default=None, help="model sample rate in Hz (default 16000)")
    p.add_argument("--seq-len", type=int, default=None, help="frames per training example (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step per process (default 8)")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (default 2000)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {TrainConfig.lr:g}; S4's A, B, P, dt use 1e-3)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32 (default) or bf16: autocast for dense layers, SSM in fp32")
    p.add_argument("--out", default="runs/sashimi", help="run folder: checkpoint, CSV log, samples (default runs/sashimi)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers (default: on CPU, chosen with --threads to fit the cores; else 2)")
    p.add_argument("--val-data", default=None,
                   help="a held-out folder of audio to validate on (then all of --data trains)")
    p.add_argument("--val-crops", type=int, default=None,
                   help="validation crops (default 256; the mean is printed with its standard error)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores this process may use, less the data workers)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 250)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default 250)")
    p.add_argument("--sample-every", type=int, default=None, help="write a short sample every N steps (0: never)")
    p.add_argument("--sample-seconds", type=float, default=None, help="length of those samples (default 1.0)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step (GPU)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bitwise-repeatable runs: deterministic algorithms and one CPU thread (slower on CPU)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Numeric flags a user can get wrong: one line each, before any work is done."""
    def bad(flag, value, want):
        raise UserError(f"--{flag} must be {want}, got {value!r}")

    for flag, minimum in (("seq_len", 1), ("sample_rate", 1), ("n_mixtures", 1), ("steps", 1),
                          ("batch_size", 1), ("val_every", 1), ("checkpoint_every", 1),
                          ("seed", 0), ("num_workers", 0), ("sample_every", 0)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            bad(flag.replace("_", "-"), value, f">= {minimum}")
    for flag in ("lr", "sample_seconds"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            bad(flag.replace("_", "-"), value, "a finite number > 0")
    if args.threads is not None and args.threads < 1:
        bad("threads", args.threads, ">= 1")
    check_at_most("--threads", args.threads, cores())   # more threads than cores only slows down
    check_at_most("--num-workers", args.num_workers, MAX_NUM_WORKERS)
    check_at_most("--val-crops", args.val_crops, MAX_VAL_CROPS)
    if args.val_crops is not None and args.val_crops < 1:
        bad("val-crops", args.val_crops, ">= 1")


def check_train_flags(args, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Flags whose sense depends on the model config (known once a resumed run is read)."""
    if train_cfg.sample_every and train_cfg.sample_seconds * model_cfg.sample_rate < 1:
        raise UserError(f"--sample-seconds {train_cfg.sample_seconds} is less than one sample at "
                        f"{model_cfg.sample_rate} Hz")
    if train_cfg.val_data is not None and train_cfg.data is None:
        raise UserError("--val-data needs --data (the built-in synthetic music has its own held-out clips)")
    if train_cfg.val_data is not None and train_cfg.val_data == train_cfg.data:
        print(f"warning: --val-data is --data ({train_cfg.data}): validation then measures audio the model "
              f"trains on, not held-out audio", file=sys.stderr)


def model_flags(args) -> dict:
    """The model fields the command line sets (None: not given)."""
    return dict({k: getattr(args, k) for k in MODEL_FLAGS}, channels=2 if args.stereo else None)


def model_config_from_args(args) -> ModelConfig:
    preset = dict(PRESETS[args.preset or "tiny"])
    preset.update({k: v for k, v in model_flags(args).items() if v is not None})
    if args.value_input is None:   # on for linear audio wherever the layout takes values
        preset["value_input"] = preset.get("quantization") == "linear" and _takes_values(preset)
    if args.predictor is None and preset.get("value_input") and preset.get("bits") == 16:
        preset["predictor"] = "cascade"    # the adaptive predictor at CD depth (docs/codec.md)
    try:
        return ModelConfig(**preset)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _takes_values(fields: dict) -> bool:
    """Whether a model of these config fields can take value_input (ModelConfig says)."""
    try:
        ModelConfig(**dict(fields, value_input=True))
        return True
    except (ValueError, TypeError):
        return False


def train_config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    given = {k: getattr(args, k) for k in TRAIN_FLAGS}
    cfg = dataclasses.replace(base or TrainConfig(), **{k: v for k, v in given.items() if v is not None})
    # folders as absolute paths: --resume from another working folder compares the same audio
    return dataclasses.replace(cfg, data=resolved(cfg.data), val_data=resolved(cfg.val_data, "--val-data"))


def resolved(folder: str | None, flag: str = "--data") -> str | None:
    if folder is None:
        return None
    try:
        return str(Path(folder).expanduser().resolve())
    except (OSError, RuntimeError) as exc:   # a symlink loop (RuntimeError before Python 3.13)
        raise UserError(f"{flag} {folder}: cannot resolve that path ({one_line(exc)})") from None


def check_resume_flags(args, saved: ModelConfig) -> None:
    """Flags that would change the model must agree with the checkpoint's config."""
    explicit = model_flags(args)
    if args.preset is not None:   # the preset's values as a config holds them (tuples, floats)
        wanted = model_config_from_args(argparse.Namespace(**{**vars(args), "stereo": saved.channels == 2}))
        explicit.update({k: getattr(wanted, k) for k in PRESETS[args.preset]})
    diffs = [f"{k}={v!r} (checkpoint: {getattr(saved, k)!r})" for k, v in explicit.items()
             if v is not None and getattr(saved, k) != v]
    if diffs:
        raise UserError("--resume: these flags differ from the checkpoint's model config: " + ", ".join(diffs))


# What --resume does with each training flag. The data of step s is a function of (data, seed,
# batch size), so changing one would silently change what the rest of the run trains on:
# refused. Every other TrainConfig field is applied from the resumed step on and printed;
# the checkpoint then records the value in use (and `resumes` lists every change and when).
RESUME_REFUSED = ("data", "seed", "batch_size", "val_data")
REQUIRED_KEYS = ("model_config", "train_config", "model", "optimizer", "step", "rng")


def resume_plan(args, saved: dict, path) -> tuple[ModelConfig, TrainConfig, int, list[str]]:
    """(model config, train config to use, step, printed changes) for resuming from `saved`."""
    missing = [k for k in REQUIRED_KEYS if k not in saved]
    if missing:
        raise UserError(f"--resume: {path} has no {', '.join(missing)} (not written by sashimi.train)")
    step = saved["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"--resume: {path} has an invalid step {step!r}")
    try:
        model_cfg = ModelConfig.from_dict(saved["model_config"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"--resume: {path}: unusable model config: {exc}") from None
    check_resume_flags(args, model_cfg)
    stored = saved["train_config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(stored, dict):
        raise UserError(f"--resume: {path}: train_config is not a dict")
    unknown = sorted(set(stored) - known)
    if unknown:
        raise UserError(f"--resume: {path}: unknown train_config keys {unknown} (written by a newer version?)")
    wrong = [f"{f.name}={stored[f.name]!r}" for f in dataclasses.fields(TrainConfig) if f.name in stored
             and not _same_kind(stored[f.name], f.default)]
    if wrong:
        raise UserError(f"--resume: {path}: unusable train_config: {', '.join(wrong[:3])}")
    old = TrainConfig(**stored)
    problem = train_config_problem(old)
    if problem:
        raise UserError(f"--resume: {path}: unusable train_config: {problem}")
    old = dataclasses.replace(old, data=resolved(old.data), val_data=resolved(old.val_data, "--val-data"))
    new = train_config_from_args(args, old)
    refused = [f"--{k.replace('_', '-')} {getattr(new, k)!r} (the run used {getattr(old, k)!r})"
               for k in RESUME_REFUSED if getattr(new, k) != getattr(old, k)]
    if refused:
        raise UserError("--resume: every step's data depends on this, it cannot change mid-run: "
                        + ", ".join(refused) + "; start a new run (another --out) instead")
    if new.steps <= step:
        raise UserError(f"--resume: the run in {Path(path).parent} is already at step {step} "
                        f"(of {old.steps}); pass --steps N with N > {step} to train further")
    changes = []
    for f in dataclasses.fields(TrainConfig):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            changes.append(f"{f.name.replace('_', '-')} {a!r} -> {b!r}")
    if new.steps != old.steps:
        changes.append(f"cosine schedule re-planned for {new.steps} steps (was {old.steps})")
    return model_cfg, new, step, changes


STRICTLY_POSITIVE = ("lr", "sample_seconds")


def train_config_problem(cfg: TrainConfig) -> str | None:
    """What makes a stored TrainConfig unusable (a value out of the range its flag allows, see
    check_args), or None: a resumed schedule or optimiser never starts from a value no flag
    could set."""
    ranges = {
        "steps": (1, None), "batch_size": (1, None), "lr": (0, None), "weight_decay": (0, None),
        "warmup_steps": (0, None), "grad_clip": (0, None), "seed": (0, cli.SEED_MAX),
        "num_workers": (0, MAX_NUM_WORKERS), "val_every": (1, None), "checkpoint_every": (1, None),
        "log_every": (1, None), "sample_every": (0, None), "sample_seconds": (0, None),
        "val_crops": (1, MAX_VAL_CROPS),
    }
    for name, (least, most) in ranges.items():
        value = getattr(cfg, name)
        if name in STRICTLY_POSITIVE and not value > least:
            return f"{name}={value!r} must be > {least}"
        if value < least or (most is not None and value > most):
            return f"{name}={value!r} must be in [{least}, {most if most is not None else 'inf'}]"
    if cfg.precision not in ("fp32", "bf16"):
        return f"precision={cfg.precision!r} must be fp32 or bf16"
    return None


def _number(value) -> float | None:
    """A plain or 0-dim tensor number as a float, else None."""
    if torch.is_tensor(value):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


ADAMW_FLAGS = ("amsgrad", "maximize", "differentiable")   # change what a step computes: must agree


def optimizer_state_problem(saved, optimizer: torch.optim.Optimizer) -> str | None:
    """Why a saved AdamW state cannot be this run's, or None: its groups (as many as the
    model's, each with as many parameters) and their hyper-parameters (finite; lr and eps > 0,
    betas in [0, 1), weight decay >= 0), and per parameter a finite step count >= 0 and two
    finite moments of the parameter's shape (the second >= 0)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        return "not an optimiser state (no param_groups / state)"
    groups, fresh = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(fresh):
        return f"{len(groups)} parameter groups, the model has {len(fresh)}"
    params = {}
    for i, (group, current) in enumerate(zip(groups, fresh)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            return f"parameter group {i} is not a dict with params"
        if len(group["params"]) != len(current["params"]):
            return f"parameter group {i} holds {len(group['params'])} parameters, the model's {len(current['params'])}"
        for key, ok, want in (("lr", lambda v: v > 0, "> 0"), ("base_lr", lambda v: v > 0, "> 0"),
                              ("eps", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0")):
            if key not in group and key == "base_lr":
                continue
            v = _number(group.get(key))
            if v is None or not math.isfinite(v) or not ok(v):
                return f"parameter group {i}: {key} {group.get(key)!r} (must be a finite number {want})"
        betas = group.get("betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or \
                not all(_number(b) is not None and 0 <= _number(b) < 1 for b in betas):
            return f"parameter group {i}: betas {betas!r} (must be two numbers in [0, 1))"
        for flag in ADAMW_FLAGS:
            if group.get(flag, current.get(flag)) != current.get(flag):
                return f"parameter group {i}: {flag}={group.get(flag)!r} (this run's AdamW: {current.get(flag)!r})"
        for index, p in zip(group["params"], current["params"]):
            if isinstance(index, bool) or not isinstance(index, int):
                return f"parameter group {i}: parameter id {index!r} is not an integer"
            params[index] = p
    for index, entry in saved["state"].items():
        if index not in params:
            return f"state for parameter {index!r}, which no group holds"
        if not isinstance(entry, dict):
            return f"state of parameter {index} is not a dict"
        step = _number(entry.get("step"))
        if step is None or not math.isfinite(step) or step < 0:
            return f"parameter {index}: step {entry.get('step')!r} (must be a finite number >= 0)"
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry.get(key)
            if not torch.is_tensor(t) or not t.is_floating_point() or t.shape != params[index].shape:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                return f"parameter {index}: {key} {shape} (the parameter: {tuple(params[index].shape)})"
            if not torch.isfinite(t).all() or (key == "exp_avg_sq" and (t < 0).any()):
                return f"parameter {index}: {key} holds " + ("negative" if torch.isfinite(t).all() else "non-finite") \
                       + " values"
    return None


def _same_kind(value, default) -> bool:
    """A stored train_config value has the type of the field's default (None: a folder or None)."""
    if default is None:
        return value is None or isinstance(value, str)
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    return type(value) is type(default)


class RunLock:
    """An exclusive lock on a run folder (flock on `.lock`): a second run into the same --out is
    refused. The kernel drops the lock when the process dies, so a killed run leaves no stale lock."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd: int | None = None
        self.made = False   # whether this run created the lock file

    def __enter__(self):
        import fcntl
        self.made = not os.path.lexists(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"--out {self.path.parent}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise UserError(f"another training run (pid {holder}) is using {self.path.parent}; "
                            f"wait for it or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def discard(self, created: Path | None) -> None:
        """Undo what this run added to disk, for a run that ends refused: the lock file if it
        made it, and the folders it created if they are empty (a folder holding anything,
        such as a checkpoint, is kept with the lock file)."""
        if self.fd is None or not self.made:
            return
        folder = self.path.parent
        with contextlib.suppress(OSError):
            os.unlink(self.path)   # unlinked while held: no other run can hold it meanwhile
        if created is None:
            return
        for p in [folder, *folder.parents]:
            try:
                p.rmdir()          # only an empty folder goes
            except OSError:
                return
            if p == created:
                return

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


MAX_VAL_CROPS = 100_000
MAX_NUM_WORKERS = 64


def check_run_fits(cfg: ModelConfig, train: TrainConfig, device: torch.device) -> None:
    """The run's memory from its flags, refused in one line when it cannot fit (cli.check_fits).
    Lower bounds, never overestimates: the head's output and its gradient and one fp32
    activation and gradient per backbone layer (batch, seq-len, head size: levels or 3 x
    mixtures); the fixed validation crops' tokens; a training sample's tokens and audio; the
    weights, gradients and AdamW's two moments."""
    head = HEADS[cfg.head].output_size(cfg, cfg.levels)
    with torch.device("meta"):
        params = count_parameters(SaShiMi(dataclasses.replace(cfg, kernel_backend="reference")))
    sample = (train.sample_seconds * cfg.sample_rate * cfg.channels * 12) if train.sample_every else 0
    check_fits({
        "activations (--batch-size x --seq-len, --head / --n-mixtures)":
            train.batch_size * 4 * 2 * (cfg.samples * head + cfg.l_max * cfg.d_model * cfg.n_layers),
        "validation crops (--val-crops x --seq-len)": train.val_crops * (cfg.seq_len + 1) * cfg.channels * 8,
        "training samples (--sample-seconds x --sample-rate)": sample,
        "weights and optimiser state": params * 4 * 4,
    }, device, f"this run (batch {train.batch_size} x {cfg.samples} samples)")


def warn_big_softmax(cfg: ModelConfig) -> None:
    if cfg.bits == 16 and cfg.head == "categorical":
        params = cfg.levels * (cfg.d_model + 1) * (1 if cfg.tie_weights else 2)
        print(f"warning: --bits 16 with the categorical head is a {cfg.levels:,}-way softmax: ~{params / 1e6:.1f} M "
              f"head parameters and (batch x length x {cfg.levels:,}) logits per step; --head dml "
              f"(a discretised logistic mixture) is the usual choice at 16 bits", file=sys.stderr)


def trim_log(log_path: Path, step: int) -> None:
    """On resume, drop log rows past the checkpoint's step (the resumed run writes them again)."""
    if not log_path.exists():
        return
    with open(log_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) == len(rows):
        return
    with atomic_output(log_path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def load_for_resume(ckpt_path: Path, move_aside: bool = True):
    """The newest usable checkpoint of the run: checkpoint.pt, or checkpoint.prev.pt when the
    latest is missing, damaged or holds non-finite weights. Returns (payload, path, note)."""
    prev = checkpoint.previous_path(ckpt_path)
    problems = []
    for path in (ckpt_path, prev):
        if not path.exists():
            continue
        try:
            payload = checkpoint.load(path)
            if isinstance(payload.get("model"), dict):
                checkpoint.check_finite_weights(payload["model"], path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        note = f"resuming from {path}"
        if problems:
            note += f" (the latest was unusable: {problems[0]})"
            if ckpt_path.exists() and path != ckpt_path and move_aside:
                # so the next save does not keep the damaged file as checkpoint.prev.pt
                aside = ckpt_path.with_name(f"{ckpt_path.stem}.damaged{ckpt_path.suffix}")
                os.replace(ckpt_path, aside)
                note += f"; it is moved to {aside.name}"
        return payload, path, note
    if problems:
        raise UserError("--resume: no usable checkpoint: " + "; ".join(problems))
    raise UserError(f"--resume: no checkpoint in {ckpt_path.parent} (nothing to resume; drop --resume to start)")


# --------------------------------------------------------------------------------------------
# pieces of the loop
# --------------------------------------------------------------------------------------------
def cpu_plan(device: torch.device, synthetic: bool, workers: int | None, threads: int | None,
             world: int = 1, cores: int | None = None, load: float | None = None) -> tuple[int | None, int]:
    """(torch threads or None = leave as is, data workers) so that training does not
    oversubscribe the cores: on a busy CPU, more runnable threads than cores made every step
    4-7x slower. On CPU the cores this process may use (its affinity), shared by the
    `world` ranks on this machine, go to torch threads and data workers together: synthetic
    data needs no workers (its tokens are precomputed); files get one worker per 4 cores, at least
    one, at most two (each worker runs one thread). Threads also leave room for what already
    runs (the 1-minute load average): on a 2-core machine under a load of ~6, 12 tiny-preset
    steps took 5.9 s/step with 1 thread and 10.2 s/step with 2 (OpenMP threads spin waiting for
    a core). On CUDA: workers default to 2, threads are left alone.
    Explicit --threads / --num-workers (or OMP_NUM_THREADS for the threads) win."""
    if device.type != "cpu":
        return threads, 2 if workers is None else workers
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // max(1, world))
    if workers is None:
        workers = 0 if synthetic else min(2, max(1, cores // 4))
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):   # the user's OMP_NUM_THREADS stands
        if load is None:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        idle = int(cores * max(1, world) - load + 0.5) // max(1, world)
        threads = max(1, min(cores - workers, idle))
    return threads, workers


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """S4's groups: SSM parameters (dt, A, B, P) at their own lr without weight decay."""
    # keyed by kind, not by value, so the groups are the same whatever --lr is (resume can change it)
    groups: dict[tuple, list] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        hint = getattr(p, "_optim", None)
        key = ("ssm", hint["lr"], hint["weight_decay"]) if hint else \
              ("dense", lr, weight_decay if p.dim() >= 2 else 0.0)
        groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr=k[1], weight_decay=k[2], base_lr=k[1]) for k, ps in groups.items()]


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
def validate(model: SaShiMi, batches, device, precision: str, distributed: bool,
             stop: StopRequest | None = None, step: int = 0) -> dict | None:
    """Mean NLL in bits per sample, overall and per channel, over the fixed validation crops;
    None when a stop request came in meanwhile (not under DDP, where every rank must finish)."""
    model.eval()
    C = model.cfg.channels
    sums = torch.zeros(C + 3, dtype=torch.float64, device=device)  # per channel, count, crops, sum sq
    for i, batch in enumerate(batches):
        if i == min(1, len(batches) - 1):   # mid-validation when there are two batches or more
            pause_point("validation", step, stop)
        if stop is not None and stop.requested and not distributed:
            model.train()
            return None
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            nll = model.nll_bits(batch).float()
        for c, part in enumerate(model.layout.per_channel(nll)):
            sums[c] += part.sum().double()
        sums[C] += nll.numel()
        per_crop = nll.double().mean(1)
        sums[C + 1] += per_crop.numel()
        sums[C + 2] += (per_crop ** 2).sum()
    if distributed:
        dist.all_reduce(sums)
    model.train()
    count = sums[C].item()
    per = [(sums[c] / (count / C)).item() for c in range(C)] if count else [float("nan")] * C
    result = {"val_bits": sum(per) / C}
    n = sums[C + 1].item()
    if n > 1:   # standard error of the mean over crops (crops of one file are not independent)
        var = max(0.0, (sums[C + 2].item() - n * result["val_bits"] ** 2) / (n - 1))
        result["val_se"] = math.sqrt(var / n)
    for name, v in zip(model.layout.channel_names, per):
        result[f"val_bits_{name}"] = v
    return result


class StopRequest:
    """Ctrl-C, SIGTERM (what SLURM, Kubernetes and `timeout` send on preemption) or SIGHUP (a
    closed terminal), as a request
    the training loop acts on. The handler only records it: the loop polls `requested` between
    phases (data, step, validation, checkpoint, sample), abandons validation or a sample in
    progress, writes the checkpoint of the last completed step and exits 130 / 143 / 129. A second
    signal stops at once (KeyboardInterrupt); the run then says which checkpoint is on disk."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # data-loader workers ignore them

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading_main():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        name = "interrupted" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received"
        print(f"\n{name}: stopping after the current step and writing its checkpoint (send it again to "
              f"stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


PAUSE_ENV = "SASHIMI_TEST_PAUSE_AT"


def pause_point(phase: str, step: int, stop: StopRequest | None) -> None:
    """For the signal tests: with SASHIMI_TEST_PAUSE_AT=<phase>@<step>, wait here (up to 60 s)
    until a stop is requested, so that a test can deliver a real signal inside any phase;
    <phase>@<step>! waits on after it (for a second signal)."""
    wanted = os.environ.get(PAUSE_ENV, "")
    if wanted.rstrip("!") != f"{phase}@{step}" or stop is None:
        return
    print(f"paused in {phase} at step {step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 60
    while (wanted.endswith("!") or not stop.requested) and time.monotonic() < deadline:
        time.sleep(0.01)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run(args) -> int:
    check_args(args)
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
    created = first_missing(out) if main else None
    if main:
        check_out_dir(out)
    from sashimi.data import DataError
    with RunLock(out) if main else contextlib.nullcontext() as lock:
        try:
            return _run_locked(args, device, distributed, rank, world, main, out)
        except DataError as exc:   # e.g. data that is all NaN: every crop is unusable
            if lock is not None:
                lock.discard(created)
            raise UserError(data_error_line(exc)) from None
        except UserError:
            if lock is not None:   # a refused run leaves --out as it was
                lock.discard(created)
            raise


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what creating it would add)."""
    missing = None
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            break
        missing = p
    return missing


def data_error_line(exc: Exception) -> str:
    """A DataError's one line (re-raised from a DataLoader worker its text ends with it)."""
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return last.split("DataError: ", 1)[-1]


@dataclass
class Setup:
    """What a run starts from: its configs, the step it starts at and, when resuming, the
    checkpoint (the path it was read from, the flag changes it applies, the resumes so far)."""
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    start_step: int = 0
    saved: dict | None = None
    used_path: Path | None = None
    changes: list = dataclasses.field(default_factory=list)
    resumes: list = dataclasses.field(default_factory=list)


def plan_run(args, ckpt_path: Path, main: bool) -> Setup:
    """The configs of a new run from the flags, or of a resumed one from its checkpoint."""
    if args.resume:
        saved, used_path, note = load_for_resume(ckpt_path, move_aside=main)
        model_cfg, train_cfg, start_step, changes = resume_plan(args, saved, used_path)
        if main:
            print(note)
        return Setup(model_cfg, train_cfg, start_step, saved, used_path, changes,
                     [*saved.get("resumes", []), dict(step=start_step, changes=changes)])
    if ckpt_path.exists() or checkpoint.previous_path(ckpt_path).exists():
        raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    return Setup(model_config_from_args(args), train_config_from_args(args))


def make_deterministic(device: torch.device) -> None:
    """Bitwise-repeatable: deterministic kernels (the embedding's backward sums in a fixed
    order), cuBLAS's fixed workspace, and one CPU thread (OpenMP reductions vary with it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        torch.set_num_threads(1)


def datasets(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """(training crops, validation crops), the crops as the model's layout takes them."""
    from sashimi.data import AudioCrops, DataError
    try:
        crops = dict(sample_rate=model_cfg.sample_rate, channels=model_cfg.channels,
                     crop_frames=model_cfg.layout.crop_frames, quantizer=model_cfg.quantizer,
                     seed=train_cfg.seed)
        held_out = train_cfg.val_data is not None
        train_set = AudioCrops(train_cfg.data, split="train", whole=held_out, **crops)
        valid_set = AudioCrops(train_cfg.val_data if held_out else train_cfg.data, split="valid",
                               whole=held_out, valid_crops=train_cfg.val_crops, **crops)
    except DataError as exc:
        raise UserError(str(exc)) from None
    return train_set, valid_set


def build_model(setup: Setup, device: torch.device) -> tuple[SaShiMi, torch.optim.Optimizer]:
    """The model and its optimiser, restored from the checkpoint when resuming."""
    train_cfg, saved = setup.train_cfg, setup.saved
    model = SaShiMi(setup.model_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.lr, train_cfg.weight_decay),
                                  lr=train_cfg.lr, fused=device.type == "cuda")
    if saved is None:
        return model, optimizer
    mismatch = checkpoint.state_dict_mismatch(model.state_dict(), saved["model"]) \
        if isinstance(saved["model"], dict) else "no model weights"
    if mismatch:
        raise UserError(f"--resume: the checkpoint does not fit this model: {mismatch}")
    problem = optimizer_state_problem(saved["optimizer"], optimizer)
    if problem:
        raise UserError(f"--resume: {setup.used_path}: unusable optimiser state: {problem}")
    devices = [{k: g.get(k) for k in ("foreach", "fused", "capturable")} for g in optimizer.param_groups]
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        checkpoint.set_rng_state(saved["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"--resume: the checkpoint does not fit this model: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # the saved groups carry the old lr / weight decay, and the implementation of the device the
    # run was on (fused on CUDA): apply the current ones
    for group, fresh, device_flags in zip(optimizer.param_groups,
                                          param_groups(model, train_cfg.lr, train_cfg.weight_decay), devices):
        group["base_lr"], group["weight_decay"] = fresh["base_lr"], fresh["weight_decay"]
        group.update(device_flags)
    return model, optimizer


def describe(setup: Setup, model: SaShiMi, world: int, device: torch.device) -> str:
    cfg, train_cfg = setup.model_cfg, setup.train_cfg
    layout = f" ({cfg.stereo_layout})" if cfg.channels == 2 else ""
    return (f"SaShiMi {'stereo' if cfg.channels == 2 else 'mono'}{layout}, ssm={cfg.ssm}, "
            f"{cfg.bits}-bit {cfg.quantization}, head={cfg.head}, {count_parameters(model):,} parameters, "
            f"{cfg.sample_rate} Hz, {cfg.seq_len} frames x {cfg.channels} ch, "
            f"batch {train_cfg.batch_size} x {world}, device {device}")


class CsvLog:
    """log.csv of the run (rank 0 only): training rows and validation rows, appended row by row
    (a killed run keeps its rows). On resume the rows written after the checkpoint's step are
    dropped (the resumed run writes them again)."""

    def __init__(self, path: Path, cfg: ModelConfig, main: bool, resume_step: int | None):
        self.path, self.main = path, main
        self.fields = ["step", "elapsed_s", "train_bits", "tokens_per_s", "lr", "val_bits"] + \
                      [f"val_bits_{name}" for name in cfg.layout.channel_names]
        if main and resume_step is not None and path.exists():
            trim_log(path, resume_step)
        elif main:
            with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
                csv.DictWriter(f, self.fields).writeheader()

    def row(self, **row) -> None:
        if self.main:
            try:
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
            except OSError as exc:   # a full disk mid-run: one line; the last checkpoint stays
                raise write_error(self.path, exc) from None


@dataclass
class Run:
    """Everything the training loop touches."""
    setup: Setup
    model: SaShiMi
    optimizer: torch.optim.Optimizer
    step_fn: nn.Module
    device: torch.device
    out: Path
    main: bool
    distributed: bool
    world: int

    def __post_init__(self):
        self.s4_layers = [m for m in self.model.modules() if isinstance(m, S4Layer)]

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def save(self, step: int) -> Path:
        """Atomically; the one before stays as checkpoint.prev.pt: a damaged latest never loses the run."""
        cfg, train_cfg = self.setup.model_cfg, self.setup.train_cfg
        return checkpoint.save(self.ckpt_path, dict(
            model_config=dataclasses.replace(cfg, kernel_backend="auto").to_dict(),
            train_config=train_cfg.to_dict(), model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), step=step, rng=checkpoint.rng_state(),
            data_position=dict(step=step, seed=train_cfg.seed, world_size=self.world),
            tokens_seen=step * train_cfg.batch_size * self.world * cfg.samples, resumes=self.setup.resumes),
            keep_previous=True)

    def forward(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        """The training loss of `batch` at `step`'s learning rate (the graph kept for backward)."""
        train_cfg = self.setup.train_cfg
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, train_cfg)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=train_cfg.precision == "bf16"):
            with nvtx_range("sashimi/train/forward"):
                return self.step_fn(batch).float().mean()

    def update(self, loss: torch.Tensor) -> None:
        """Backward, gradient clipping, the optimiser step, S4's dt kept in range."""
        with nvtx_range("sashimi/train/backward"):
            loss.backward()
        if self.setup.train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.setup.train_cfg.grad_clip)
        with nvtx_range("sashimi/train/optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for layer in self.s4_layers:
                layer.clamp_()


def _run_locked(args, device, distributed, rank, world, main, out: Path) -> int:
    from sashimi.data import train_batches, valid_batches

    if main:
        checkpoint.remove_stale_temporaries(out, CHECKPOINT_NAME)
    setup = plan_run(args, out / CHECKPOINT_NAME, main)
    setup.model_cfg = dataclasses.replace(setup.model_cfg,
                                          kernel_backend="reference" if device.type == "cpu" else "auto")
    model_cfg, train_cfg = setup.model_cfg, setup.train_cfg
    if main:
        warn_big_softmax(model_cfg)
    check_train_flags(args, model_cfg, train_cfg)
    check_run_fits(model_cfg, train_cfg, device)
    if train_cfg.deterministic:
        make_deterministic(device)
    torch.manual_seed(train_cfg.seed)
    train_set, valid_set = datasets(model_cfg, train_cfg)
    model, optimizer = build_model(setup, device)
    loss_of: nn.Module = LossOf(model)
    if distributed:
        loss_of = nn.parallel.DistributedDataParallel(
            loss_of, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(setup, model, optimizer, torch.compile(loss_of) if train_cfg.compile else loss_of,
              device, out, main, distributed, world)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        print(describe(setup, model, world, device))
        if setup.saved is not None:
            print(f"resuming at step {setup.start_step}: "
                  + ("; ".join(setup.changes) if setup.changes else "no flag changed"))

    threads, workers = cpu_plan(device, train_cfg.data is None, args.num_workers, args.threads,
                                int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if threads is not None and not train_cfg.deterministic:
        torch.set_num_threads(threads)
    if main:
        print(f"threads: {torch.get_num_threads()} torch, {workers} data loader workers"
              + (f" ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores; "
                 "--threads / --num-workers override)" if device.type == "cpu" else ""))
    batches = Batches(lambda start: train_batches(
        train_set, batch_size=train_cfg.batch_size, start_step=start, rank=rank, world_size=world,
        num_workers=workers, pin_memory=device.type == "cuda"), setup.start_step)
    # validation needs no gradients: batches of up to 64k tokens (at least the training batch),
    # so that 256 crops are a few forward passes (each pass also builds every S4 kernel)
    val_batch = max(train_cfg.batch_size, min(64, 65536 // model_cfg.l_max))
    val_data = valid_batches(valid_set, batch_size=val_batch)
    has_val = len(val_data) > 0  # the same on every rank (validate() all-reduces)
    val_data = val_data[rank::world] if distributed else val_data   # shard (the sums are all-reduced)
    if main and not has_val:
        print("note: no validation audio (too few or too short files); validation is skipped")
    log = CsvLog(out / "log.csv", model_cfg, main, setup.start_step if args.resume else None)
    status, saved_step = train_loop(run, batches, val_data if has_val else None, log)
    if distributed:
        same = ranks_agree(model)
        if main:
            print(f"DDP: parameters {'identical' if same else 'DIFFER'} on all {world} ranks")
        dist.destroy_process_group()
        if not same:
            status = status or 4
    if main and status in (0, 129, 130, 143):
        print(f"checkpoint: {run.ckpt_path} (step {saved_step})" if saved_step is not None
              else "checkpoint: none written (no step completed)")
        print(f"log: {log.path}")
    return status


def train_loop(run: Run, batches, val_data, log: CsvLog) -> tuple[int, int | None]:
    """Train from the setup's start step to its last: log, validate, checkpoint and sample on
    their intervals; stop on divergence (status 3) or a stop request (StopRequest: the last
    completed step is saved, exit 130 / 143). Returns (status, the step of the checkpoint on disk)."""
    setup, device, main, distributed = run.setup, run.device, run.main, run.distributed
    model_cfg, train_cfg, model = setup.model_cfg, setup.train_cfg, run.model
    from tqdm.auto import tqdm
    bar = tqdm(total=train_cfg.steps, initial=setup.start_step, disable=not main, unit="step",
               dynamic_ncols=True, mininterval=0.5)
    tokens_per_step = train_cfg.batch_size * run.world * model_cfg.samples
    log_every = 1 if device.type == "cpu" else train_cfg.log_every
    t0 = window_t = time.perf_counter()
    window_steps = 0
    loss_acc = torch.zeros((), device=device)
    step = setup.start_step
    status = 0
    # the step of the checkpoint at ckpt_path, so that what is printed is what is on disk
    saved_step = setup.start_step if setup.saved is not None and setup.used_path == run.ckpt_path else None

    def save_now() -> None:
        nonlocal saved_step
        pause_point("checkpoint", step, stop)
        run.save(step)
        saved_step = step

    def stopping_now() -> bool:
        """The stop request as the loop acts on it: under DDP every rank must stop at the same
        step, so the ranks agree (an all-reduce) at each log step, where the host syncs anyway."""
        if not distributed:
            return stop.requested
        if step % log_every:
            return False
        flag = torch.tensor([int(stop.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    model.train()
    stopping = False
    with StopRequest() as stop:
        try:
            while step < train_cfg.steps and not stopping and not (stop.requested and not distributed):
                pause_point("data", step, stop)
                with nvtx_range("sashimi/train/data"):
                    batch = batches.next(step)
                    check_tokens(batch, model_cfg.levels, "training data")
                    batch = batch.to(device, non_blocking=True)
                if stop.requested and not distributed:
                    break
                loss = run.forward(batch, step)
                pause_point("step", step, stop)
                run.update(loss)
                loss_acc += loss.detach()
                step += 1
                window_steps += 1
                last = step == train_cfg.steps
                stopping = stopping_now()
                ckpt_due = step % train_cfg.checkpoint_every == 0 or last or stopping
                val_due = step % train_cfg.val_every == 0 or last
                # the loss is checked (one host sync) before anything is validated or saved
                if step % log_every == 0 or ckpt_due or val_due:
                    mean_loss = (loss_acc / window_steps).item()  # one host sync per log interval
                    diverged = diverged_reason(mean_loss, model_cfg, model if ckpt_due else None)
                    if diverged:
                        bar.close()
                        print(f"stopping: {diverged} at step {step}; the last checkpoint from before it is kept at "
                              f"{run.ckpt_path if run.ckpt_path.exists() else '(none yet)'}", file=sys.stderr)
                        status = 3
                        break
                    now = time.perf_counter()
                    tps = window_steps * tokens_per_step / (now - window_t)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", bits=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}")
                    bar.update(window_steps)
                    log.row(step=step, elapsed_s=f"{now - t0:.1f}", train_bits=f"{mean_loss:.4f}",
                            tokens_per_s=f"{tps:.0f}", lr=f"{run.optimizer.param_groups[0]['lr']:.3g}")
                    loss_acc.zero_()
                    window_t, window_steps = now, 0
                if val_due and val_data is not None and not stopping:
                    val = validate(model, val_data, device, train_cfg.precision, distributed, stop, step)
                    if main and val is not None:
                        bar.write(f"step {step}: validation " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
                        log.row(step=step, elapsed_s=f"{time.perf_counter() - t0:.1f}",
                                **{k: f"{v:.4f}" for k, v in val.items()})
                if main and (ckpt_due or stop.requested):   # a request after the step: saved now
                    save_now()
                if main and train_cfg.sample_every and step % train_cfg.sample_every == 0 and not stop.requested:
                    write_training_sample(model, run.out, step, train_cfg.sample_seconds, model_cfg.quantizer,
                                          bar, stop)
            if (stopping or stop.requested) and status == 0:
                # the safe point: whatever phase the signal hit, the last completed step is saved
                if main and saved_step != step:
                    save_now()
                status = stop.exit_code
        except LoaderFailed as exc:  # workers that keep dying: the last completed step is kept
            bar.close()
            if main and saved_step != step:
                save_now()
            print(f"error: {exc}; the checkpoint of step {saved_step} is on disk", file=sys.stderr)
            status = 1
        except UserError:           # e.g. a disk that fills: the one line starts on its own line
            bar.close()
            raise
        except KeyboardInterrupt:   # a second signal: stop at once and say what is on disk
            bar.close()
            saved_step = step_on_disk(run.ckpt_path) if main else None
            print(f"stopped at once during step {step + 1}", file=sys.stderr)
            status = stop.exit_code if stop.requested else 130
    bar.close()
    return status, saved_step


class LoaderFailed(Exception):
    """The data loader's workers died again and again (killed from outside, out of memory)."""


class Batches:
    """The training batches, step by step. A data-loader worker that dies anyway (the stop
    signals it ignores; SIGKILL, the OOM killer) is a data fault: the loader is restarted at the
    same step (a step's batch is a function of the step), at most MAX_RESTARTS times a run;
    then LoaderFailed, and the loop keeps the last completed step."""

    MAX_RESTARTS = 3

    def __init__(self, make, start_step: int):
        self.make, self.restarts = make, 0
        self.it = make(start_step)

    def next(self, step: int) -> torch.Tensor:
        while True:
            if self.it is None:
                self.it = self.make(step)
            try:
                return next(self.it)
            except RuntimeError as exc:
                if "DataLoader worker (pid" not in str(exc):   # a worker that died, not its error
                    raise
                self.it = None   # its remaining workers are shut down as it goes
                why = str(exc).strip().splitlines()[0]
                if self.restarts >= self.MAX_RESTARTS:
                    raise LoaderFailed(f"the data loader failed {self.restarts + 1} times ({why})") from None
                self.restarts += 1
                print(f"warning: {why}; restarting the data loader at step {step + 1}", file=sys.stderr, flush=True)


def step_on_disk(ckpt_path: Path) -> int | None:
    """The step of the checkpoint at ckpt_path, or None when there is none that loads."""
    try:
        step = checkpoint.load(ckpt_path).get("step")
    except CheckpointError:
        return None
    return step if isinstance(step, int) else None


def diverged_reason(mean_loss: float, cfg: ModelConfig, model: nn.Module | None) -> str | None:
    """Why training cannot go on, or None: a non-finite loss, a loss far above a uniform guess
    (cfg.bits bits/sample) or, before a checkpoint is written, non-finite weights."""
    if not math.isfinite(mean_loss):
        return f"non-finite training loss ({mean_loss})"
    if mean_loss > DIVERGED_FACTOR * cfg.bits:
        return (f"the training loss diverged ({mean_loss:.2f} bits/sample, a uniform guess is {cfg.bits}; "
                f"try a lower --lr)")
    if model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
        return "non-finite weights"
    return None


def ranks_agree(model: nn.Module) -> bool:
    """Every rank holds bitwise the same parameters (a cheap end-of-run DDP sanity check)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    probe = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device,
                                                          dtype=torch.float64)).sum()])
    gathered = [torch.zeros_like(probe) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def write_training_sample(model: SaShiMi, out: Path, step: int, seconds: float, quantizer, bar,
                          stop: StopRequest | None = None) -> None:
    """A short unconditional sample from the current weights (--sample-every); abandoned (no
    file) when a stop is requested meanwhile."""
    from sashimi.generate import GenerationStopped, generate_audio, write_wav
    was_training = model.training
    model.eval()
    try:
        pause_point("sample", step, stop)
        audio, _ = generate_audio(model, frames=max(1, round(seconds * model.cfg.sample_rate)), batch=1,
                                  quantizer=quantizer, progress=False,
                                  should_stop=None if stop is None else (lambda: stop.requested))
    except GenerationStopped:
        return
    finally:
        model.train(was_training)
    path = write_wav(out / "samples" / f"step{step:07d}.wav", audio[0], model.cfg.sample_rate)
    bar.write(f"step {step}: sample {path}")


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
