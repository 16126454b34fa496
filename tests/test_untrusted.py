"""Untrusted inputs cost no more than their own size, and bad results are never written.

- Hostile checkpoints (a zero-stride view, a terabyte view, deep nesting, a tree of repeated
  references, a compressed-entry bomb, the pre-zip format) are refused in one line by a
  subprocess under a memory cap (resource.setrlimit), for each command that reads one.
- Non-regular files (a FIFO, /dev/zero, a folder) are refused for every path input.
- Checkpoints whose finite weights compute NaN: generate and evaluate refuse, write nothing.
- Every ModelConfig field is validated (a table of invalid values); a state_dict that does not
  fit names its keys.
- Outputs go through atomic_output: a full disk, a read-only file system (tmpfs mounts, skipped
  where the test cannot mount), a parent that is a file, a target that is a folder: one line,
  nothing left behind.
- Data: all-NaN audio is one line; a float file beyond full scale is clipped with a warning.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi import checkpoint
from sashimi.cli import UserError, atomic_output, regular_file
from sashimi.model import PRESETS, ModelConfig

REPO = Path(__file__).resolve().parents[1]
FAST = ["--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--val-every", "1000", "--device", "cpu",
        "--val-crops", "8"]
CAP_EXTRA = 1 << 30   # the child may grow by 1 GiB past what torch's import took


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from sashimi.train import main as train_main
    out = tmp_path_factory.mktemp("untrusted") / "run"
    assert train_main(["--stereo", "--steps", "2", *FAST, "--out", str(out)]) == 0
    return out


CHILD = """
import contextlib, io, json, resource, sys, traceback
import torch
vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + CAP, vm + CAP))
results = []
for module, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = __import__(module, fromlist=['main']).main(argv)
        except BaseException:
            rc = -1
            traceback.print_exc()
    results.append((rc, err.getvalue()))
print(json.dumps(results))
"""


def capped_many(calls: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
    """Run each (module, argv) through module.main in one subprocess whose address space is
    capped at its size after importing torch + CAP_EXTRA; (exit code, stderr) of each."""
    import json
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", CHILD.replace("CAP", str(CAP_EXTRA)), json.dumps(calls)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return [tuple(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]


def capped(command: list[str], module: str) -> subprocess.CompletedProcess:
    rc, err = capped_many([(module, command)])[0]
    return subprocess.CompletedProcess(command, rc, "", err)


def one_line(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode == 2, (r.args, r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], (r.args, r.stderr[-3000:])


# ------------------------------------------------------------------------- hostile checkpoints

def _forge(run_dir: Path, out: Path, edit, hashed: bool = True) -> Path:
    """The run's checkpoint edited by edit(payload), its hash recomputed (or not: views that
    claim terabytes cannot be hashed here either, and are refused before any hash)."""
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    edit(payload)
    payload.pop("sha256", None)
    payload["sha256"] = checkpoint.content_hash(payload) if hashed else "0" * 64
    torch.save(payload, out)
    return out


def _with_pickle(path: Path, pickled: bytes) -> Path:
    """A torch.save file whose pickle is replaced by `pickled`."""
    torch.save({"a": 1}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries[next(n for n in entries if n.endswith("data.pkl"))] = pickled
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def _write_deep(path: Path, depth: int = 200_000) -> Path:
    return _with_pickle(path, b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")


def _write_repeated(path: Path, levels: int = 30) -> Path:
    """A tree of 2**30 values in a few hundred bytes: each list holds the one below twice."""
    # 1, then per level: memo it, push it twice, make a pair
    return _with_pickle(path, b"\x80\x02K\x01" + b"q\x00h\x00h\x00\x86" * levels + b".")


def _write_bomb(run_dir: Path, path: Path, inflated: int = 1536 << 20) -> Path:
    """A checkpoint whose one storage is a deflated zip entry inflating to 1.5 GiB (7 MB on disk):
    torch.load would inflate it; it is refused from the zip directory alone."""
    torch.save({"format": checkpoint.FORMAT, "format_version": 2, "w": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    storage = next(n for n in entries if "/data/" in n)
    entries[pkl] = entries[pkl].replace(b"K\x01t", b"J" + (inflated // 4).to_bytes(4, "little") + b"t")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, data in entries.items():
            if name != storage:
                z.writestr(name, data, compress_type=zipfile.ZIP_STORED)
                continue
            with z.open(name, "w", force_zip64=True) as f:
                chunk = bytes(1 << 24)
                for _ in range(inflated // len(chunk)):
                    f.write(chunk)
    return path


HOSTILE = [
    # (id, make(run_dir, tmp) -> path, expected part of the one line)
    ("zero-stride-20000x20000", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model"].update(
        {"embedding.weight": torch.zeros(1).expand(20000, 20000)}), hashed=False), "not a plain view"),
    ("terabyte-view", lambda r, t: _forge(r, t / "c.pt", lambda p: p.update(
        big=torch.zeros(1).expand(1 << 20, 1 << 20)), hashed=False), "not a plain view"),
    ("nested-200000-deep", lambda r, t: _write_deep(t / "c.pt"), "nested deeper"),
    ("2**30-repeated-references", lambda r, t: _write_repeated(t / "c.pt"), "repeated references"),
    ("compressed-bomb", lambda r, t: _write_bomb(r, t / "c.pt"), "compressed entry"),
    ("pre-zip-format", lambda r, t: (torch.save({"a": 1}, t / "c.pt", _use_new_zipfile_serialization=False),
                                     t / "c.pt")[1], "not a torch.save zip archive"),
    ("weights-of-another-config", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model_config"].update(d_model=48)),
     "weights do not fit the model config: mis-shaped"),
    ("weights-missing-a-key", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model"].pop("embedding.weight")),
     "missing embedding.weight"),
    ("config-of-a-huge-model", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model_config"].update(
        d_model=8192, n_layers=1024, d_state=4096)), "needs at least"),
    ("config-a-law", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model_config"].update(quantization="a-law")),
     "quantization must be one of"),
    ("config-nan-dt", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model_config"].update(dt_min=float("nan"))),
     "dt_min must be a finite number"),
    ("config-seq-len-2**31", lambda r, t: _forge(r, t / "c.pt", lambda p: p["model_config"].update(seq_len=2**31)),
     "seq_len must be an integer"),
]


@pytest.fixture(scope="module")
def hostile_results(run_dir, tmp_path_factory) -> dict:
    """Every HOSTILE checkpoint given to generate, all in one memory-capped subprocess."""
    calls, names = [], []
    for name, make, _ in HOSTILE:
        tmp = tmp_path_factory.mktemp(name.replace("*", "^"))
        path = make(run_dir, tmp)
        calls.append(("sashimi.generate", ["--checkpoint", str(path), "--device", "cpu", "--seconds", "0.01",
                                           "--out", str(tmp / "wavs")]))
        names.append((name, tmp))
    return {name: (result, tmp) for (name, tmp), result in zip(names, capped_many(calls))}


@pytest.mark.parametrize("row", HOSTILE, ids=[r[0] for r in HOSTILE])
def test_hostile_checkpoints_are_refused_under_a_memory_cap(hostile_results, row):
    name, _, expected = row
    (rc, err), tmp = hostile_results[name]
    one_line(subprocess.CompletedProcess([], rc, "", err), expected)
    assert not (tmp / "wavs").exists() or not list((tmp / "wavs").iterdir())


def test_hostile_checkpoints_are_refused_by_every_reader(run_dir, tmp_path):
    path = _forge(run_dir, tmp_path / "c.pt", lambda p: p["model"].update(
        {"embedding.weight": torch.zeros(1).expand(20000, 20000)}), hashed=False)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.link(path, resumed / "checkpoint.pt")
    results = capped_many([
        ("sashimi.evaluate", ["--checkpoint", str(path), "--device", "cpu", "--seconds", "0.1", "--clips", "1",
                              "--out", str(tmp_path / "eval")]),
        ("sashimi.train", ["--stereo", "--steps", "4", *FAST, "--out", str(resumed), "--resume"]),
        ("sashimi.convert", ["--from", "s4", str(path), str(tmp_path / "conv.pt"), "--dt-transform", "exp"])])
    for rc, err in results:
        one_line(subprocess.CompletedProcess([], rc, "", err), "not a plain view")


# ----------------------------------------------------------------------- non-regular files

def _fifo(tmp: Path) -> Path:
    path = tmp / "fifo"
    os.mkfifo(path)
    return path


NON_REGULAR = [
    # (id, argv from (run_dir, tmp), module, expected)
    ("generate-checkpoint-fifo", lambda r, t: ["--checkpoint", str(_fifo(t)), "--device", "cpu"], "sashimi.generate",
     "is a FIFO"),
    ("generate-checkpoint-dev-zero", lambda r, t: ["--checkpoint", "/dev/zero", "--device", "cpu"], "sashimi.generate",
     "is a device"),
    ("generate-prompt-fifo", lambda r, t: ["--checkpoint", str(r / "checkpoint.pt"), "--prompt", str(_fifo(t)),
                                           "--device", "cpu"], "sashimi.generate", "is a FIFO"),
    ("generate-prompt-folder", lambda r, t: ["--checkpoint", str(r / "checkpoint.pt"), "--prompt", str(t),
                                             "--device", "cpu"], "sashimi.generate", "is a folder"),
    ("evaluate-checkpoint-fifo", lambda r, t: ["--checkpoint", str(_fifo(t)), "--device", "cpu"], "sashimi.evaluate",
     "is a FIFO"),
    ("convert-input-fifo", lambda r, t: ["--from", "s4", str(_fifo(t)), str(t / "o.pt"), "--dt-transform", "exp"],
     "sashimi.convert", "is a FIFO"),
    ("convert-input-dev-zero", lambda r, t: ["--from", "s4", "/dev/zero", str(t / "o.pt"), "--dt-transform", "exp"],
     "sashimi.convert", "is a device"),
]


def test_non_regular_files_are_refused(run_dir, tmp_path):
    calls = []
    for i, (name, argv, module, _) in enumerate(NON_REGULAR):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        calls.append((module, argv(run_dir, tmp)))
    for (name, _, _, expected), (rc, err) in zip(NON_REGULAR, capped_many(calls)):
        one_line(subprocess.CompletedProcess([name], rc, "", err), expected)


def test_train_resume_from_a_fifo_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "checkpoint.pt")
    one_line(capped(["--steps", "2", *FAST, "--out", str(out), "--resume"], "sashimi.train"), "is a FIFO")


@pytest.mark.parametrize("path,expected", [("", "empty"), ("/nonexistent/x", "not found"), ("/dev/zero", "device"),
                                           ("/", "folder")])
def test_regular_file(path, expected):
    with pytest.raises(UserError, match=expected):
        regular_file(path, "input")


# -------------------------------------------------------------------- non-finite results

def _nan_producing(run_dir: Path, tmp: Path) -> Path:
    """Finite but huge weights: the head's logits overflow to inf - inf = NaN."""
    def edit(p):
        for k, v in p["model"].items():
            if k.startswith("head") and v.is_floating_point():
                p["model"][k] = torch.full_like(v, 3e38) * torch.sign(torch.randn_like(v))
    return _forge(run_dir, tmp / "nan.pt", edit)


def test_generate_and_evaluate_refuse_non_finite_results(run_dir, tmp_path):
    nan = _nan_producing(run_dir, tmp_path)
    generated, evaluated = capped_many([
        ("sashimi.generate", ["--checkpoint", str(nan), "--device", "cpu", "--seconds", "0.01",
                              "--out", str(tmp_path / "wavs")]),
        ("sashimi.evaluate", ["--checkpoint", str(nan), "--device", "cpu", "--seconds", "0.05", "--clips", "1",
                              "--quiet", "--out", str(tmp_path / "eval")])])
    one_line(subprocess.CompletedProcess(["generate"], *generated[:1], "", generated[1]), "non-finite probabilities")
    assert not list(tmp_path.rglob("*.wav"))
    one_line(subprocess.CompletedProcess(["evaluate"], *evaluated[:1], "", evaluated[1]), "is not finite")
    assert not (tmp_path / "eval" / "summary.json").exists()


# --------------------------------------------------------------------------- ModelConfig

INVALID_FIELDS = [
    ("quantization", "a-law"), ("dropout", 5.0), ("dropout", float("nan")), ("init", "unknown"), ("d_state", 7),
    ("d_state", 0), ("seq_len", 2 ** 31), ("seq_len", 0), ("d_model", 0), ("d_model", 1.5), ("n_layers", True),
    ("pool", (4, "x")), ("pool", (0,)), ("pool", (2,) * 9), ("expand", -1), ("ff", 65), ("ssm", "s5"),
    ("dt_min", float("nan")), ("dt_max", float("inf")), ("dt_min", 0.0), ("dt_per_length", -1.0), ("bits", 12),
    ("bits", True), ("channels", 3), ("channels", 2.0), ("sample_rate", 10 ** 9), ("sample_rate", 0),
    ("head", "softmax"), ("n_mixtures", 10 ** 6), ("tie_weights", 1), ("stereo_layout", "mid"),
    ("embed_init", "zeros"), ("kernel_backend", "cuda"),
]


@pytest.mark.parametrize("field,value", INVALID_FIELDS, ids=[f"{f}={v!r}" for f, v in INVALID_FIELDS])
def test_every_model_config_field_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**dict(PRESETS["tiny"], **{field: value}))


@pytest.mark.parametrize("kw,expected", [(dict(dt_min=0.5, dt_max=0.1), "dt_min"),
                                         (dict(ssm="diag", init="legs"), "does not fit ssm"),
                                         (dict(head="dml", tie_weights=True), "categorical head"),
                                         (dict(stereo_layout="frames"), "needs stereo")])
def test_model_config_fields_are_checked_together(kw, expected):
    with pytest.raises(ValueError, match=expected):
        ModelConfig(**dict(PRESETS["tiny"], **kw))


# ------------------------------------------------------------------------------ outputs

def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_text("all")
    assert target.read_text() == "all" and list(tmp_path.iterdir()) == [target]
    (tmp_path / "file").write_text("x")
    for bad, expected in ((tmp_path / "file" / "out.csv", "is a file"), (tmp_path, "is a folder")):
        with pytest.raises(UserError, match=expected):
            with atomic_output(bad) as tmp:
                tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out.csv"]


def _tmpfs(tmp_path: Path, size: str):
    """A tmpfs of `size` (needs mount rights: skipped where the test has none)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'mount failed'})")
    return mnt


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = _tmpfs(tmp_path, "256k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_training_into_a_disk_that_fills_is_one_line_and_keeps_its_checkpoint(tmp_path, capsys):
    """The tiny model's checkpoint is ~4.6 MB: the first fits a 7 MiB disk, the next one's temp
    file does not. One line, exit 2, the step-1 checkpoint intact, no temp file."""
    from sashimi.train import main as train_main
    mnt = _tmpfs(tmp_path, "7m")
    try:
        rc = train_main(["--stereo", "--steps", "3", *FAST, "--checkpoint-every", "1", "--out", str(mnt / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: cannot write {mnt / 'run' / 'checkpoint.pt'}: the disk is full"], err
        assert checkpoint.load(mnt / "run" / "checkpoint.pt")["step"] == 1
        assert not list((mnt / "run").glob(".*.tmp*"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(small_tmpfs):
    with pytest.raises(UserError, match="the disk is full"):
        with atomic_output(small_tmpfs / "big.bin") as tmp:
            tmp.write_bytes(bytes(1 << 20))
    assert list(small_tmpfs.iterdir()) == []


def _fill(folder: Path) -> None:
    """Write until the file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_generate_into_a_full_disk_is_one_line(run_dir, small_tmpfs):
    (small_tmpfs / "wavs").mkdir()
    _fill(small_tmpfs)
    r = capped(["--checkpoint", str(run_dir / "checkpoint.pt"), "--device", "cpu", "--seconds", "0.01",
                "--out", str(small_tmpfs / "wavs")], "sashimi.generate")
    one_line(r, "the disk is full")
    assert not list((small_tmpfs / "wavs").iterdir())


def test_a_checkpoint_into_a_full_disk_is_one_line_and_keeps_the_previous(small_tmpfs):
    path = small_tmpfs / "checkpoint.pt"
    checkpoint.save(path, dict(step=1), keep_previous=True)
    with pytest.raises(UserError, match="the disk is full"):
        checkpoint.save(path, dict(step=2, w=torch.zeros(1 << 20)), keep_previous=True)
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["checkpoint.pt"]


def test_a_read_only_file_system_is_one_line(small_tmpfs):
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({r.stderr.decode().strip()})")
    with pytest.raises(UserError, match="read-only"):
        with atomic_output(small_tmpfs / "out.wav") as tmp:
            tmp.write_bytes(b"x")


# --------------------------------------------------------------------------------- data

def test_all_nan_data_is_one_line(tmp_path):
    data = tmp_path / "audio"
    data.mkdir()
    for i in range(3):
        sf.write(str(data / f"nan{i}.wav"), np.full((16000, 2), np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    r = capped(["--stereo", "--data", str(data), "--steps", "2", *FAST, "--out", str(tmp_path / "run")],
               "sashimi.train")
    one_line(r, "unusable")


def test_float_audio_beyond_full_scale_is_clipped_with_a_warning(tmp_path):
    from sashimi.data import read_audio
    path = tmp_path / "loud.wav"
    sf.write(str(path), (10 * np.sin(np.arange(1600) / 5)).astype(np.float32), 16000, subtype="FLOAT")
    with pytest.warns(UserWarning, match="loud.wav: samples beyond full scale"):
        read_audio(path, 16000, 1)
