"""What the command lines share: user mistakes are one line on stderr and exit code 2."""
from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import stat
import sys
import tempfile
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
        check_common_flags(args)
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


SEED_MAX = 2 ** 32 - 1   # numpy's and every data generator's seed range


def check_common_flags(args) -> None:
    """What holds for every flag of every command, checked once here before any work: a float
    is finite (NaN and inf are never meant), a string (a path, a name) is not empty ('' would
    silently mean the current folder), a seed is in [0, SEED_MAX]."""
    for name, value in sorted(vars(args).items()):
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value!r}")
        if isinstance(value, str) and value == "":
            raise UserError(f"{flag} must not be empty")
        if name == "seed" and value is not None and not 0 <= value <= SEED_MAX:
            raise UserError(f"{flag} must be in [0, {SEED_MAX}], got {value}")


def check_at_most(flag: str, value, most) -> None:
    """A flag's upper bound (one line): what no machine runs in a useful time or memory."""
    if value is not None and value > most:
        raise UserError(f"{flag} must be <= {most:,}, got {value:,}")


def check_fits(parts: dict[str, float], device: torch.device, what: str) -> None:
    """The one memory check: refuse a run whose estimated need (the sum of `parts`, bytes, each
    named by the flags that set it) exceeds the device's memory, naming the largest part."""
    need, have = sum(parts.values()), machine_memory(device)
    if have and need > have:
        biggest = max(parts, key=parts.get)
        raise UserError(f"{what} needs at least {need / 2**30:,.1f} GiB (mostly {biggest}: "
                        f"{parts[biggest] / 2**30:,.1f} GiB); {device.type} memory here is {have / 2**30:,.1f} GiB")


def cores() -> int:
    """CPU cores this process may use (its affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


# ------------------------------------------------------------------ untrusted inputs, outputs

def regular_file(path, what: str) -> Path:
    """`path` as a Path when it names a regular file (symlinks followed), else a one-line
    UserError: an empty path, a missing file, a folder, or a FIFO / device / socket (which would
    block or never end when read) are refused before anything opens them."""
    if path is None or str(path) == "":
        raise UserError(f"{what}: the path is empty")
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise UserError(f"{what} {path} is {kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path}: permission denied")
    return path


_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EFBIG: "the file is too large for this file system",
}


def write_error(path, exc: OSError) -> UserError:
    """An OSError met while writing `path` as a one-line UserError saying why."""
    why = _WRITE_ERRORS.get(exc.errno, exc.strerror or str(exc))
    return UserError(f"cannot write {path}: {why}")


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = True):
    """Write `path` all or nothing: yields a temp path in the same folder; when the block ends
    without an exception the temp is fsynced and renamed over `path` (os.replace, atomic), so a
    reader never sees a half-written file. On any exception (Ctrl-C included) the temp is
    removed. A missing parent folder is created. Disk full, read-only, permission, a parent that
    is a file, a target that is a folder: one-line UserErrors.
    overwrite=False: the last step is an exclusive link (never replaces a file that appeared
    meanwhile, e.g. another run's): a UserError saying so if `path` exists by then."""
    if path is None or str(path) == "":
        raise UserError("an output path is empty")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    tmp = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # same extension, so writers that pick the format from it still do
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; outputs are for sharing
        except FileExistsError:
            raise write_error(path, OSError(errno.ENOTDIR, "not a folder")) from None
        except OSError as exc:
            raise write_error(path, exc) from None
        yield Path(tmp)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                _link_exclusive(tmp, path)
        except FileExistsError:
            raise UserError(f"{path} appeared while this ran (another writer?): not replaced; pass "
                            f"--overwrite to replace it") from None
        except OSError as exc:
            raise write_error(path, exc) from None
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRORS:   # not about writing this file: the writer's own error
            raise
        raise write_error(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _link_exclusive(tmp: str, path: Path) -> None:
    """Move `tmp` to `path` unless `path` exists (FileExistsError): a hard link is atomic and
    never replaces; where the file system has no hard links, an O_EXCL create claims the name
    first (a rival's exclusive create then fails)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse fsync on a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
