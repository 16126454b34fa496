"""One-file checkpoints: format version, full config, weights, optimiser, step, RNG states.

Safe to load from anyone: the file is a `torch.save` dict of tensors and plain data only
(numbers, strings, lists, dicts; RNG states are stored as tensors and lists, never as
pickled objects) and is read with `torch.load(weights_only=True)`, which refuses any other
Python object, so loading a checkpoint cannot run code.

Damage is detected: a SHA-256 over every tensor's bytes, dtype and shape and every other
value (in key order) is stored beside them and checked on load; a checkpoint whose content
does not match is refused with one line naming the file.

Written atomically (a temp file in the same folder, fsync, os.replace), so a crash mid-write
never leaves a truncated checkpoint behind; `save(..., keep_previous=True)` first moves the
existing file to `<name>.prev.pt`, so one damaged or diverged checkpoint never loses a run.
Loading a file of another format, another version, or a damaged file is a `CheckpointError`
with one clear line, never a traceback.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from sashimi.cli import UserError

FORMAT = "sashimi-triton-checkpoint"
FORMAT_VERSION = 2
# Version 1 (2026-11) pickled numpy RNG state and had no content hash. It still loads safely
# (weights_only, with numpy's array reconstruction allow-listed), unverified.
READABLE_VERSIONS = (1, 2)


class CheckpointError(UserError):
    """A checkpoint that cannot be used, with the reason in one line (a user mistake: every
    command reports it as one line and exit code 2, with no wrapper of its own)."""


# ------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain lists (no pickled objects)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=dict(version=version, state=list(internal), gauss=gauss),
                 numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    else:  # format version 1: the tuple itself
        random.setstate(py)
    if isinstance(npy, dict):
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- the content hash

def _feed(h, obj, path: str) -> None:
    """Hash obj canonically: tensors by dtype, shape and bytes; containers in key order."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{path}:tensor:{obj.dtype}:{tuple(obj.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())   # the buffer itself: no copy
    elif isinstance(obj, dict):
        h.update(f"{path}:dict:{len(obj)};".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, obj[key], f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{path}:{type(obj).__name__}:{len(obj)};".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{path}[{i}]")
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{path}:{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint entry {path} is a {type(obj).__name__}: only tensors and plain "
                        f"data (numbers, strings, lists, dicts) can be saved")


def content_hash(payload: dict) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"}, "")
    return h.hexdigest()


# ------------------------------------------------------------------------------ save / load

def previous_path(path: str | os.PathLike) -> Path:
    """Where `save(keep_previous=True)` keeps the checkpoint it replaces: checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(path: str | os.PathLike, payload: dict, keep_previous: bool = False) -> Path:
    """Atomically write payload (plus format, version and content hash) to path. With
    keep_previous, an existing file at path becomes `previous_path(path)` first."""
    from sashimi.cli import atomic_output
    path = Path(path)
    payload = dict(payload, format=FORMAT, format_version=FORMAT_VERSION)
    payload["sha256"] = content_hash(payload)
    with atomic_output(path) as tmp:
        with open(tmp, "wb", buffering=0) as raw:
            out = _WriteErrors(raw)
            try:
                torch.save(payload, out)
            except RuntimeError:
                if out.error is not None:   # torch reports a failed write (a full disk...) as a
                    raise out.error from None   # RuntimeError: the OSError says why, in one line
                raise
        if keep_previous and path.exists():
            # a second name for the current file (a copy where links are not supported), so that
            # `path` itself is never missing: the rename below replaces it in one step
            with atomic_output(previous_path(path)) as keep:
                os.unlink(keep)
                try:
                    os.link(path, keep)
                except OSError:
                    shutil.copyfile(path, keep)
    return path


class _WriteErrors(io.RawIOBase):
    """A file that remembers the OSError of a failed write (torch.save hides it)."""

    def __init__(self, raw):
        super().__init__()
        self.raw, self.error = raw, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = exc
            raise


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete the temp files of `name` left by writes that were killed (call with the run locked)."""
    removed = []
    for tmp in Path(folder).glob(f".{name}.*.tmp*"):   # atomic_output's `.<name>.<random>.tmp<suffix>`
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


# numpy arrays in version-1 RNG states: data only, reconstructed without running code
def _numpy_safe_globals() -> list:
    names = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        names.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        names.append(np.core.multiarray._reconstruct)
    return names


# torch's advice on a refused file is to reload it with weights_only=False, which would run a
# hostile file's code: its lines never reach a message of ours
_TORCH_ADVICE = re.compile(r"weights_only|trust|can still be loaded|arbitrary code|safe_globals|\(\d\)", re.I)


def torch_reason(exc: BaseException) -> str:
    """The reason in torch.load's error, in one line, without its advice: the unpickler's own
    line ("WeightsUnpickler error: ..."), else the first line that is not advice."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
            if line and not _TORCH_ADVICE.search(line):
                return line
    return next((line for line in lines if not _TORCH_ADVICE.search(line)), type(exc).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Bounds on what an untrusted file may make us build before its content is checked
MAX_DEPTH = 32            # containers inside containers (ours nest 5 deep)
MAX_NODES_PER_BYTE = 1    # values visited, repeats included, per byte of file (ours: ~0.001)


def check_container(path: Path, size: int) -> None:
    """A checkpoint is a zip archive whose entries are stored uncompressed (as torch.save writes
    them): then every storage torch.load reads is a record no larger than the file, so nothing
    is allocated beyond the file's own size (a compressed entry could inflate a small file to
    gigabytes; the pre-zip torch format allocates whatever size it claims)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint "
                              f"(not a torch.save zip archive: {_first_line(exc)})") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint "
                              f"(compressed entry {packed[0]}; torch.save stores entries uncompressed)")
    if sum(e.file_size for e in entries) > size:
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint "
                              f"(its entries claim more bytes than the file holds)")


def check_structure(payload, size: int, path) -> None:
    """Walk what torch.load built (iteratively) before anything hashes or copies it: nesting at
    most MAX_DEPTH deep, at most MAX_NODES_PER_BYTE * size values visited (repeated references
    could otherwise make a tiny file a huge tree), and tensors that are plain views: no tensor
    holds more elements than its storage has bytes for (a zero-stride view of one number can
    claim terabytes), and the distinct views together hold no more bytes than the file."""
    budget = max(100_000, MAX_NODES_PER_BYTE * size)
    views: set = set()
    total = 0
    stack = [(payload, 0)]
    visited = 0
    while stack:
        obj, depth = stack.pop()
        visited += 1
        if visited > budget:
            raise CheckpointError(f"refusing {path}: it holds more values than its size allows (repeated references)")
        if depth > MAX_DEPTH:
            raise CheckpointError(f"refusing {path}: containers nested deeper than {MAX_DEPTH}")
        if torch.is_tensor(obj):
            nbytes = obj.numel() * obj.element_size()
            room = obj.untyped_storage().nbytes() - obj.storage_offset() * obj.element_size()
            if nbytes > room:
                raise CheckpointError(f"refusing {path}: a tensor of shape {tuple(obj.shape)} and strides "
                                      f"{obj.stride()} claims more elements than its storage holds (not a plain view)")
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
            if key not in views:
                views.add(key)
                total += nbytes
                if total > size:
                    raise CheckpointError(f"refusing {path}: its tensors claim more bytes than the file holds")
        elif isinstance(obj, dict):
            stack.extend((v, depth + 1) for kv in obj.items() for v in kv)
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, depth + 1) for v in obj)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by `save`, or raise CheckpointError saying why it can't be used.
    Never unpickles anything but tensors and plain data; bounds what it builds by the file's
    size before touching it (check_container, check_structure); checks the content hash."""
    from sashimi.cli import UserError, regular_file
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file (e.g. {path / 'checkpoint.pt'})")
    try:
        path = regular_file(path, "checkpoint")   # a FIFO or a device would block or never end
    except UserError as exc:
        raise CheckpointError(str(exc)) from None
    size = path.stat().st_size
    check_container(path, size)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names a refused object ("Unsupported global: GLOBAL os.system ...", "Can only
        # build Tensor ... or types allowlisted ..."); anything else (an unknown opcode, a
        # truncated stream) is damage
        if any(word in str(exc) for word in ("GLOBAL", "allowlisted", "add_safe_globals")):
            raise CheckpointError(f"refusing to load {path}: it holds Python objects other than tensors "
                                  f"and plain data, which could run code when loaded (not loaded)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint "
                              f"({torch_reason(exc)})") from None
    except Exception as exc:  # truncated, not a torch file, zip damage...
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint "
                              f"({type(exc).__name__}: {torch_reason(exc)})") from None
    check_structure(payload, size, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sashimi-triton checkpoint")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this sashimi-triton "
                              f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2:
        stored = payload.get("sha256")
        try:
            actual = content_hash(payload)
        except TypeError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if not isinstance(stored, str) or stored != actual:
            raise CheckpointError(f"{path} is damaged: its content does not match the SHA-256 stored in it "
                                  f"(try {previous_path(path).name} if it exists)")
    return payload


def check_finite_weights(state_dict: dict, path) -> None:
    """CheckpointError if any floating-point weight is NaN or infinite."""
    bad = [k for k, v in state_dict.items()
           if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): the run it came from diverged")


def state_dict_mismatch(expected: dict, given: dict, shown: int = 3) -> str | None:
    """What keeps `given` weights from loading where `expected` ones are (a state_dict of the
    model, possibly on the meta device): the first missing, unexpected and mis-shaped keys."""
    def first(keys):
        return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k} {tuple(given[k].shape) if torch.is_tensor(given[k]) else type(given[k]).__name__} "
                 f"(model: {tuple(v.shape)})" for k, v in expected.items()
                 if k in given and (not torch.is_tensor(given[k]) or given[k].shape != v.shape)]
    parts = [f"{what} {first(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    return "; ".join(parts) or None


def load_model(path, device="cpu"):
    """(model, payload): the checkpoint's SaShiMi on `device` in eval mode (reference kernels on
    CPU, Triton on CUDA), or CheckpointError with one line (bad config, no or non-finite
    weights, weights that do not fit the config: the first keys that differ are named). The
    config's model is first built on the meta device (no memory) and compared with the weights
    in the file, so a config that does not fit them never allocates anything."""
    import dataclasses

    from sashimi.model import ModelConfig, SaShiMi
    payload = load(path)
    config = payload.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds no model config")
    weights = payload.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds no model weights")
    device = torch.device(device)
    try:
        cfg = ModelConfig.from_dict(config)
        cfg = dataclasses.replace(cfg, kernel_backend="reference" if device.type == "cpu" else "auto")
        # a lower bound of the config's weights (embedding, each S4 layer's C and output mix at
        # the top tier), checked first: a huge config costs nothing, not even a meta build
        least = cfg.levels * cfg.d_model + cfg.n_layers * (2 * cfg.d_model ** 2 + cfg.d_state * cfg.d_model)
        given = sum(v.numel() for v in weights.values() if torch.is_tensor(v))
        if least > given:
            raise CheckpointError(f"{path}: weights do not fit the model config: it needs at least {least:,} "
                                  f"weights, the file holds {given:,}")
        with torch.device("meta"):
            shapes = SaShiMi(cfg).state_dict()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: unusable model config: {_first_line(exc)}") from None
    mismatch = state_dict_mismatch(shapes, weights)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not fit the model config: {mismatch}")
    check_finite_weights(weights, path)
    try:
        model = SaShiMi(cfg)
        model.load_state_dict(weights)
        model = model.to(device)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model config: {_first_line(exc)}") from None
    return model.eval(), payload
