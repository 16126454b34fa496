"""What the command lines share: user mistakes are one line on stderr and exit code 2."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

import torch


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


def command(parse_args: Callable, run: Callable) -> Callable:
    """A command's `main(argv=None) -> exit code`: parse, run, report a UserError in one line."""
    return functools.partial(run_cli, parse_args, run)


def refuse_existing(path: Path, overwrite: bool) -> None:
    """An output file that exists is replaced only with --overwrite."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists (pass --overwrite to replace it)")


def run_cli(parse_args: Callable, run: Callable, argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """--device auto|cpu|cuda|cuda:N as a usable device, or a UserError saying why not."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: sashimi-triton runs on cpu or cuda")
    return device


def check_out_dir(out: Path) -> None:
    """--out must be a folder we can write: one line now, not a traceback after the work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create that folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: that folder is not writable")


def machine_memory(device: torch.device) -> int:
    """Total memory of the device (host RAM for cpu) in bytes; 0 when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
