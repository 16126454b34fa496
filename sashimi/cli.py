"""What the command lines share: user mistakes are one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import functools
import math
import os
import stat
import sys
import tempfile
import warnings
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
    with one_line_warnings():
        args = parse_args(argv)
        try:
            check_common_flags(args)
            return run(args)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2


def one_line(text) -> str:
    """`text` (an exception's message, say) on one line."""
    return " ".join(str(text).split()) or type(text).__name__


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {one_line(message)}\n"


@contextlib.contextmanager
def one_line_warnings():
    """Python warnings as one line of ours, `warning: ...`: no file path, no echoed source line
    (a data-loader worker forked meanwhile inherits it). Only the format changes, so filters
    and recording (warnings.catch_warnings, pytest) work as before."""
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


# ------------------------------------------------------------------------- the argument parser

def program_name(module: str, argv=None) -> str:
    """The program as the user invoked it: the console script's name (`sashimi-train`), or
    `python -m sashimi.train` (also when called from Python with an explicit argv)."""
    invoked = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else ""
    if not invoked or invoked.endswith(".py") or invoked in ("-c", "-m"):
        return f"python -m {module}"
    return invoked


class HelpFormatter(argparse.HelpFormatter):
    """Each true default once: "(default: X)" is added to a flag's help only where the help does
    not state its default already and the default is a value (not None, "not given")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                or "default" in text.lower() or action.option_strings == []
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse, with every mistake one line naming the program as invoked, and an unknown flag
    answered with the closest declared one ("did you mean --stereo?")."""

    def __init__(self, module: str, description: str | None = None, **kwargs):
        super().__init__(prog=f"python -m {module}", description=description,
                         formatter_class=HelpFormatter, **kwargs)
        self.module = module

    def parse_args(self, args=None, namespace=None):
        self.prog = program_name(self.module, args)
        words = list(sys.argv[1:] if args is None else args)
        declared = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        # an unknown flag first: it explains a "required" or "expected one argument" error after it
        words = words[:words.index("--")] if "--" in words else words
        unknown = [w for w in words if w.startswith("--") and not any(
            d.startswith(w.split("=", 1)[0]) for d in declared)]
        if unknown:
            self.error(self._unknown(unknown))
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown(extras))
        return parsed

    def _unknown(self, extras: list[str]) -> str:
        flag = next((e for e in extras if e.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {extras[0]!r}"
        name = flag.split("=", 1)[0]
        declared = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(name, declared, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else f" (see {self.prog} --help)"
        return f"unknown flag {name}{hint}"

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def parser(module: str, doc: str | None) -> Parser:
    """The argument parser of a command (`module`, e.g. "sashimi.train"): its description is the
    first paragraph of the module's docstring."""
    return Parser(module, (doc or "").split("\n\n")[0] or None)


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
