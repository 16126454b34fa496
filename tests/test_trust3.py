"""What a user can do wrong or a machine can do to a run, as a table: each parametrized case id
below is one row of docs/reliability.md's guarantees (`pytest tests/test_trust3.py -v` prints
the table). Every mistake is one line and exit code 2, nothing is left on disk for a refused
run, and no signal, worker death or lying file loses or silently changes a run.

- preemption of the whole process group (SIGTERM to every process, data-loader workers too),
  with 0, 1 and 2 workers, in each phase of a step; a worker killed outright;
- files whose header over-states their length (Ogg Vorbis, FLAC): read to where they end;
- files at 1, 4, 100 and 8,000 Hz under a memory cap, for train, evaluate and generate --prompt;
- resume with a corrupted optimiser or schedule state;
- symlink loops; typo'd flags for each console script; help defaults; warnings as one line;
- refused runs leave --out as it was; refusals never forward torch's weights_only advice.
"""
from __future__ import annotations

import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi import checkpoint
from sashimi.data import AudioCrops, MIN_FILE_RATE, audio_info, read_audio, train_batches
from sashimi.quantize import Quantizer
from sashimi.train import PAUSE_ENV
from test_signals import PHASES, printed_step, wait_for_pause
from test_untrusted import _with_pickle, capped_many

REPO = Path(__file__).resolve().parents[1]
FAST = ["--seq-len", "64", "--batch-size", "2", "--device", "cpu", "--val-crops", "8"]
COMMANDS = ("train", "generate", "evaluate", "compress", "decompress", "convert")


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    e.pop("TRITON_INTERPRET", None)
    return e


def one_line(r, expected: str, prefix: str = "error: ") -> None:
    """Exit code 2 and stderr exactly one line, `prefix...expected...`."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.args, r.returncode, r.stderr[-3000:])
    assert lines[0].startswith(prefix) and expected in lines[0], (r.args, r.stderr[-3000:])


def main_of(module: str, *args) -> subprocess.CompletedProcess:
    """`module.main(args)` in this process (no interpreter start-up): its exit code and stderr."""
    import contextlib
    import io
    from importlib import import_module
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = import_module(f"sashimi.{module}").main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return subprocess.CompletedProcess([module, *args], rc, "", err.getvalue())


def cli(module: str, *args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"sashimi.{module}", *map(str, args)], capture_output=True,
                          text=True, env=env(), cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step mono run (its checkpoint feeds generate, evaluate and the resume cases)."""
    out = tmp_path_factory.mktemp("trust3") / "run"
    r = cli("train", *FAST, "--num-workers", "0", "--steps", "2", "--val-every", "1000", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ------------------------------------------------------------------- preemption of a group

def start_in_own_group(out: Path, pause: str, flags: list[str], workers: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sashimi.train", "--stereo", *FAST, "--steps", "50",
                             "--num-workers", str(workers), *flags, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env(**{PAUSE_ENV: pause, "PYTHONWARNINGS": "ignore"}), start_new_session=True)


GROUP = [(workers, *phase) for workers in (0, 1, 2) for phase in PHASES]


@pytest.mark.parametrize("workers,pause,flags,sig,expected", GROUP,
                         ids=[f"sigterm-group-{w}-workers-{p[0]}" for w, *p in GROUP])
def test_preempting_the_whole_process_group_keeps_the_last_completed_step(tmp_path, workers, pause, flags,
                                                                            sig, expected):
    """SLURM and `timeout` signal every process of the job: the data-loader workers ignore it,
    the trainer writes the last completed step and exits 128 + signal."""
    out = tmp_path / "run"
    proc = start_in_own_group(out, pause, flags, workers)
    wait_for_pause(proc, pause)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert "restarting the data loader" not in stderr, stderr[-3000:]       # no worker died of it
    on_disk = checkpoint.load(out / "checkpoint.pt")["step"]
    assert on_disk == expected and printed_step(stdout) == on_disk, (stdout, stderr[-2000:])


def _synthetic_crops() -> AudioCrops:
    return AudioCrops(None, sample_rate=16000, channels=2, crop_frames=64, quantizer=Quantizer())


STOPS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("sig", STOPS, ids=[f"worker-ignores-{s.name}" for s in STOPS])
def test_a_data_loader_worker_ignores_the_stop_signals(sig):
    it = train_batches(_synthetic_crops(), batch_size=2, num_workers=1)
    next(it)
    worker = it._workers[0]
    os.kill(worker.pid, sig)
    time.sleep(0.5)
    assert worker.is_alive()
    next(it)                           # and it still serves batches
    it._shutdown_workers()


def test_a_killed_worker_restarts_the_loader_at_the_same_step():
    from sashimi.train import Batches
    data = _synthetic_crops()
    made = []

    def make(start):
        made.append(start)
        return train_batches(data, batch_size=2, start_step=start, num_workers=1)

    batches = Batches(make, 0)
    first = batches.next(0)
    worker = batches.it._workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    second = batches.next(1)           # the iterator notices the dead worker: a new loader at step 1
    expected = list(train_batches(data, batch_size=2, start_step=0, num_workers=0).__iter__().__next__()
                    for _ in range(1))[0]
    assert torch.equal(first, expected)
    assert torch.equal(second, next(train_batches(data, batch_size=2, start_step=1, num_workers=0)))
    assert made == [0, 1]


class _Dying(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGKILL)


def test_workers_that_keep_dying_stop_the_run_and_keep_the_last_step(tmp_path, monkeypatch, capsys):
    from sashimi import train
    from sashimi.train import Batches, LoaderFailed
    monkeypatch.setattr(Batches, "MAX_RESTARTS", 1)   # each death takes the loader's 5 s liveness check
    batches = Batches(lambda start: train_batches(_Dying(), batch_size=1, start_step=start, num_workers=1), 0)
    with pytest.raises(LoaderFailed, match="failed 2 times"):
        batches.next(0)
    # in the loop: the last completed step is saved, one error line, exit 1
    real_next = Batches.next

    def next_or_fail(self, step):
        if step == 3:
            raise LoaderFailed("the data loader failed 4 times (DataLoader worker (pid 1) exited unexpectedly)")
        return real_next(self, step)
    monkeypatch.setattr(Batches, "next", next_or_fail)
    out = tmp_path / "run"
    rc = train.main(["--stereo", *FAST, "--num-workers", "0", "--steps", "10", "--val-every", "1000",
                     "--checkpoint-every", "1000", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "error: the data loader failed 4 times" in err and "step 3 is on disk" in err, err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 3


# ---------------------------------------------------------------- files that lie about length

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def _ogg_crc(data: bytes) -> int:
    c = 0
    for b in data:
        c = ((c << 8) ^ _CRC[((c >> 24) ^ b) & 0xFF]) & 0xFFFFFFFF
    return c


def overstate_ogg(path: Path, extra: int) -> None:
    """Raise the granule position (the frame count) of the final Ogg page by `extra`, with its
    CRC redone: libsndfile then reports `extra` more frames than decode (a Vorbis end-trim)."""
    raw = bytearray(path.read_bytes())
    i = raw.rfind(b"OggS")
    size = 27 + raw[i + 26] + sum(raw[i + 27:i + 27 + raw[i + 26]])
    struct.pack_into("<q", raw, i + 6, struct.unpack_from("<q", raw, i + 6)[0] + extra)
    struct.pack_into("<I", raw, i + 22, 0)
    struct.pack_into("<I", raw, i + 22, _ogg_crc(bytes(raw[i:i + size])))
    path.write_bytes(bytes(raw))


def overstate_flac(path: Path, extra: int) -> None:
    """Raise STREAMINFO's total sample count (its low 36 bits at byte 18) by `extra`."""
    raw = bytearray(path.read_bytes())
    v = int.from_bytes(raw[18:26], "big")
    mask = (1 << 36) - 1
    raw[18:26] = ((v & ~mask) | ((v & mask) + extra)).to_bytes(8, "big")
    path.write_bytes(bytes(raw))


LIARS = [("ogg", overstate_ogg, 5806), ("flac", overstate_flac, 5806), ("flac", overstate_flac, 10 ** 9)]


@pytest.mark.parametrize("fmt,overstate,extra", LIARS, ids=[f"{f}-header-claims-{e}-more" for f, _, e in LIARS])
def test_a_file_whose_header_overstates_its_length_is_read_to_where_it_ends(tmp_path, fmt, overstate, extra):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (44100 * 2, 2)).astype(np.float32)
    honest, liar = tmp_path / f"honest.{fmt}", tmp_path / f"liar.{fmt}"
    sf.write(honest, x, 44100)
    sf.write(liar, x, 44100)
    overstate(liar, extra)
    with sf.SoundFile(liar) as f:
        assert f.frames > audio_info(honest)[0]            # the header lies
    with pytest.warns(UserWarning) as caught:
        n = audio_info(liar)[0]
    said = [str(w.message) for w in caught if "liar" in str(w.message)]
    assert len(said) == 1 and re.search(r"liar\.\w+: the header says [\d,]+ frames but [\d,]+ decode "
                                        r"\([\d,]+ fewer", said[0]), said
    # Vorbis: the writer's end-trim (a few frames) is gone with the edited page; FLAC: exact
    assert n == audio_info(honest)[0] if fmt == "flac" else 0 <= n - audio_info(honest)[0] < 2048
    whole = read_audio(liar, 16000, 2)
    assert whole.shape[0] == n * 16000 // 44100
    m = min(whole.shape[0], read_audio(honest, 16000, 2).shape[0]) - 2000   # away from the end filters
    assert torch.allclose(whole[:m], read_audio(honest, 16000, 2)[:m], atol=1e-6)
    tail = read_audio(liar, 16000, 2, whole.shape[0] - 300, 300)            # a crop at the real end
    assert torch.allclose(tail, whole[-300:], atol=1e-6)
    crops = AudioCrops(tmp_path, sample_rate=16000, channels=2, crop_frames=256, quantizer=Quantizer())
    assert [p.name for p in crops.files] == sorted([honest.name, liar.name])   # nothing skipped


# ------------------------------------------------------------- sample rates and memory

RATES = [1, 4, 100, 8000]


@pytest.fixture(scope="module")
def rate_files(tmp_path_factory) -> dict[int, Path]:
    """A 60-frame WAV at each rate (a few hundred bytes), and 0.2 s at 8 kHz (long enough to train)."""
    root = tmp_path_factory.mktemp("rates")
    files = {}
    for rate in RATES:
        folder = root / f"{rate}hz"
        folder.mkdir()
        frames = rate // 5 if rate >= MIN_FILE_RATE else 60
        x = 0.3 * np.sin(np.arange(frames) / 3.0).astype(np.float32)
        sf.write(folder / f"a{rate}.wav", np.stack([x, x], 1), rate, subtype="PCM_16")
        files[rate] = folder / f"a{rate}.wav"
    return files


@pytest.mark.parametrize("rate", RATES, ids=[f"{r}hz" for r in RATES])
def test_file_rates_under_a_memory_cap(tmp_path, run_dir, rate_files, rate):
    """train --data, evaluate --data and generate --prompt with a file at `rate`, each in a
    process capped at 1 GiB above torch's import: below 1 kHz one line, else they run."""
    f = rate_files[rate]
    calls = [("sashimi.train", ["--data", str(f.parent), *FAST, "--num-workers", "0", "--steps", "1",
                                "--val-every", "1000", "--out", str(tmp_path / "t")]),
             ("sashimi.evaluate", ["--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(f), "--device",
                                   "cpu", "--out", str(tmp_path / "e"), "--quiet"]),
             ("sashimi.generate", ["--checkpoint", str(run_dir / "checkpoint.pt"), "--prompt", str(f),
                                   "--seconds", "0.25", "--device", "cpu", "--out", str(tmp_path / "g")])]
    for (module, argv), (rc, err) in zip(calls, capped_many(calls)):
        if rate < MIN_FILE_RATE:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert rc == 2 and "Traceback" not in err and len(errors) == 1, (module, err[-3000:])
            assert f"sample rate {rate} Hz is outside 1,000 to 768,000 Hz" in errors[0], (module, err)
            assert not (tmp_path / module[-1]).exists() or module != "sashimi.train"
        else:
            assert rc == 0, (module, err[-3000:])
    if rate < MIN_FILE_RATE:
        assert not (tmp_path / "t").exists() and not (tmp_path / "g").exists()


# ------------------------------------------------------------ resume validates its state

def _forged_run(run_dir: Path, out: Path, edit) -> Path:
    out.mkdir()
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    edit(payload)
    payload.pop("sha256", None)
    checkpoint.save(out / "checkpoint.pt", payload)
    return out


def _group(key, value):
    return lambda p: p["optimizer"]["param_groups"][0].__setitem__(key, value)


def _first_state(key, value):
    def edit(p):
        state = p["optimizer"]["state"]
        entry = state[min(state)]
        entry[key] = value(entry[key]) if callable(value) else value
    return edit


def _train_config(key, value):
    return lambda p: p["train_config"].__setitem__(key, value)


CORRUPT = [
    ("lr-negative", _group("lr", -1.0), "lr -1.0"),
    ("lr-nan", _group("lr", math.nan), "lr nan"),
    ("base-lr-zero", _group("base_lr", 0.0), "base_lr 0.0"),
    ("eps-zero", _group("eps", 0.0), "eps"),
    ("weight-decay-negative", _group("weight_decay", -0.1), "weight_decay"),
    ("betas-out-of-range", _group("betas", (1.5, 0.999)), "betas"),
    ("betas-not-a-pair", _group("betas", 0.9), "betas"),
    ("amsgrad", _group("amsgrad", True), "amsgrad"),
    ("params-missing", _group("params", [0]), "parameters"),
    ("groups-missing", lambda p: p["optimizer"]["param_groups"].pop(), "parameter groups"),
    ("not-an-optimizer", lambda p: p.__setitem__("optimizer", [1, 2]), "not an optimiser state"),
    ("step-nan", _first_state("step", torch.tensor(math.nan)), "step"),
    ("step-negative", _first_state("step", torch.tensor(-3.0)), "step"),
    ("moment-shape", _first_state("exp_avg", lambda t: torch.zeros(t.numel() + 1)), "exp_avg"),
    ("moment-nan", _first_state("exp_avg", lambda t: torch.full_like(t, math.nan)), "non-finite"),
    ("second-moment-negative", _first_state("exp_avg_sq", lambda t: -torch.ones_like(t)), "negative"),
    ("state-of-no-parameter", lambda p: p["optimizer"]["state"].__setitem__(9999, {}), "no group holds"),
    ("schedule-lr-negative", _train_config("lr", -4e-3), "lr=-0.004"),
    ("schedule-warmup-negative", _train_config("warmup_steps", -5), "warmup_steps=-5"),
    ("schedule-grad-clip-negative", _train_config("grad_clip", -1.0), "grad_clip"),
]


@pytest.mark.parametrize("edit,expected", [c[1:] for c in CORRUPT], ids=[f"resume-{c[0]}" for c in CORRUPT])
def test_resume_refuses_a_corrupted_optimiser_or_schedule_in_one_line(tmp_path, run_dir, edit, expected):
    out = _forged_run(run_dir, tmp_path / "run", edit)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = main_of("train", *FAST, "--num-workers", "0", "--steps", "4", "--out", out, "--resume")
    one_line(r, expected)
    assert "unusable" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before   # the folder as it was


# ------------------------------------------------------------------------ symlink loops

LOOPS = [("train-data", "train", ["--data", "{loop}", "--out", "{tmp}/o"], "--data"),
         ("train-val-data", "train", ["--data", "{music}", "--val-data", "{loop}", "--out", "{tmp}/o"], "--val-data"),
         ("evaluate-data", "evaluate", ["--checkpoint", "{ckpt}", "--data", "{loop}", "--out", "{tmp}/o"], "--data"),
         ("generate-prompt", "generate", ["--checkpoint", "{ckpt}", "--prompt", "{loop}", "--out", "{tmp}/o"],
          "--prompt"),
         ("convert-input", "convert", ["--from", "s4", "{loop}", "{tmp}/o/x.pt", "--dt-transform", "exp"], "loop"),
         ("train-out", "train", ["--out", "{loop}"], "--out")]


@pytest.mark.parametrize("command,argv,expected", [c[1:] for c in LOOPS], ids=[f"symlink-loop-{c[0]}" for c in LOOPS])
def test_a_symlink_loop_is_one_line(tmp_path, run_dir, command, argv, expected):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "music").mkdir()
    sf.write(tmp_path / "music" / "a.wav", np.zeros((16000, 2), np.float32), 16000)
    args = [a.format(loop=loop, tmp=tmp_path, ckpt=run_dir / "checkpoint.pt", music=tmp_path / "music")
            for a in argv]
    r = main_of(command, *args, *(["--device", "cpu"] if command in ("train", "evaluate", "generate") else []))
    one_line(r, "")
    assert expected in r.stderr or "symbolic links" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ the one argument parser

TYPOS = {"train": ("--stero", "--stereo"), "generate": ("--temprature", "--temperature"),
         "evaluate": ("--by-positon", "--by-position"), "compress": ("--chunk-secnds", "--chunk-seconds"),
         "decompress": ("--overwirte", "--overwrite"), "convert": ("--dt-transfrom", "--dt-transform")}


def _script(command: str) -> Path:
    path = Path(sys.executable).parent / f"sashimi-{command}"
    if not path.exists():
        pytest.skip(f"{path.name} is not installed beside {sys.executable} (pip install -e . creates it)")
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=[f"typo-{c}-console-script" for c in COMMANDS])
def test_a_typod_flag_is_one_line_naming_the_console_script(tmp_path, command):
    typo, meant = TYPOS[command]
    r = subprocess.run([str(_script(command)), typo, "1"], capture_output=True, text=True, env=env(),
                       cwd=tmp_path, timeout=120)
    one_line(r, f"unknown flag {typo} (did you mean {meant}?)", prefix=f"sashimi-{command}: error: ")


@pytest.mark.parametrize("command", COMMANDS, ids=[f"typo-{c}-python-m" for c in COMMANDS])
def test_a_typod_flag_is_one_line_naming_python_m(tmp_path, command):
    typo, meant = TYPOS[command]
    r = main_of(command, typo)
    one_line(r, f"unknown flag {typo} (did you mean {meant}?)", prefix=f"python -m sashimi.{command}: error: ")


@pytest.mark.parametrize("command", COMMANDS, ids=[f"help-{c}-each-default-once" for c in COMMANDS])
def test_help_states_each_default_at_most_once(capsys, command):
    from importlib import import_module
    with pytest.raises(SystemExit):
        import_module(f"sashimi.{command}").parse_args(["--help"])
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out)
    for entry in entries[1:]:
        assert len(re.findall(r"default", entry, re.I)) <= 1, (command, entry)


def test_help_texts_say_the_true_defaults(capsys):
    from sashimi import compress, generate, train
    texts = {}
    for module in (train, generate, compress):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        texts[module.__name__] = " ".join(capsys.readouterr().out.split())
    assert "(default: 1.0)" in texts["sashimi.generate"].split("--temperature")[2][:200]
    assert "tiny: diag" in texts["sashimi.train"].split("--ssm")[2][:200]


def test_warnings_are_one_line_of_ours(tmp_path):
    """A Python warning (here: a file whose header over-states its length) prints as
    `warning: ...`: no file path of ours, no category, no echoed source line."""
    music = tmp_path / "music"
    music.mkdir()
    x = np.random.default_rng(1).uniform(-0.3, 0.3, (16000 * 2, 2)).astype(np.float32)
    sf.write(music / "liar.flac", x, 16000)
    overstate_flac(music / "liar.flac", 5000)
    r = cli("train", "--data", music, *FAST, "--num-workers", "0", "--steps", "1", "--val-every", "1000",
            "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "liar.flac" in line]
    assert said and all(line.startswith("warning: ") for line in said), r.stderr[-3000:]
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr and ".py:" not in r.stderr


# ------------------------------------------------------------- nothing on disk if refused

REFUSED = [("new-nested-out", "{tmp}/a/b/run"), ("existing-empty-out", "{tmp}/empty")]


@pytest.mark.parametrize("out", [c[1] for c in REFUSED], ids=[f"refused-run-{c[0]}" for c in REFUSED])
def test_a_refused_run_leaves_the_output_folder_as_it_was(tmp_path, out):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not audio")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    out = out.format(tmp=tmp_path)
    # refused by the data, by a flag that depends on the config, by the memory check
    for argv in (["--data", tmp_path / "notes.txt"], ["--val-data", tmp_path / "empty"],
                 ["--batch-size", "100000000"]):
        r = main_of("train", *FAST, *argv, "--num-workers", "0", "--out", out)
        one_line(r, "")                 # a text file as --data: one line, no Python warning before it
        assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before, (argv, r.stderr)


# ------------------------------------------------------------------ messages are ours

def _hostile_pickles(tmp_path: Path) -> dict[str, Path]:
    import pickle
    return {
        "build-on-a-list": _with_pickle(tmp_path / "b.pt", b"\x80\x02]}b."),                 # BUILD: no GLOBAL
        "newobj-of-a-list": _with_pickle(tmp_path / "n.pt", b"\x80\x02c__builtin__\nlist\n)\x81."),
        "slice": _with_pickle(tmp_path / "s.pt", pickle.dumps(slice(1, 2), protocol=2)),
        "unknown-opcode": _with_pickle(tmp_path / "u.pt", b"\x80\x02\xff."),
    }


@pytest.mark.parametrize("case", ["build-on-a-list", "newobj-of-a-list", "slice", "unknown-opcode"],
                         ids=lambda c: f"no-weights-only-advice-{c}")
def test_a_refused_checkpoint_never_repeats_torchs_unsafe_advice(tmp_path, case):
    path = _hostile_pickles(tmp_path)[case]
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(path)
    message = str(err.value)
    assert "weights_only" not in message and "trust" not in message.lower() and "\n" not in message, message
    r = main_of("convert", "--from", "s4", path, tmp_path / "x.pt", "--dt-transform", "exp")
    one_line(r, "")
    assert "weights_only" not in r.stderr and "trust the source" not in r.stderr, r.stderr
