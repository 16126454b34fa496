"""One-file checkpoints: format version, full config, weights, optimiser, step, RNG states.

Written atomically (a temp file in the same folder, fsync, os.replace), so a crash mid-write
never leaves a truncated checkpoint behind. Loading a file of another format, another
version, or a corrupt file is a `CheckpointError` with one clear line, never a traceback.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "sashimi-triton-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with the reason in one line."""


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, payload: dict) -> Path:
    """Atomically write payload (plus format and version) to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, format=FORMAT, format_version=FORMAT_VERSION)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save`, or raise CheckpointError saying why it can't be used."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path / 'checkpoint.pt'})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated, not a torch file, unpickling error...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'corrupt file'}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sashimi-triton checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this sashimi-triton "
                              f"reads version {FORMAT_VERSION}")
    return payload
