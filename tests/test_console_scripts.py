"""The console scripts that `pip install` puts beside the interpreter (sashimi-train, -generate,
-evaluate, -compress, -decompress, -convert) run the same main() as `python -m sashimi.<cmd>`:
one success each, and one user mistake each (exit code 2, one `error:` line, no traceback).

They exist only in an installed environment (`pip install -e .` or `pip install .`), so these
tests look for them next to sys.executable and skip, saying so, where they are missing.
"""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

COMMANDS = ("train", "generate", "evaluate", "compress", "decompress", "convert")
BIN = Path(sys.executable).parent
RATE = 16000  # sashimi-train's default sample rate
TRAIN = ["--steps", "1", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--val-every", "1000",
         "--device", "cpu"]


def script(command: str) -> Path:
    path = BIN / f"sashimi-{command}"
    if not path.exists():
        pytest.skip(f"{path.name} is not installed beside {sys.executable} (pip install -e . creates it)")
    return path


def run(command: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(script(command)), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, stdin=subprocess.DEVNULL)


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-2000:]


def one_line_mistake(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], r.stderr[-2000:]


def test_each_script_is_the_module_main():
    installed = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("sashimi-")}
    if not installed:
        pytest.skip("sashimi-triton is not installed in this environment (pip install -e .)")
    assert installed == {f"sashimi-{c}": f"sashimi.{c}:main" for c in COMMANDS}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 1-step mono run made by sashimi-train: its success case."""
    out = tmp_path_factory.mktemp("scripts") / "run"
    ok(run("train", *TRAIN, "--out", out))
    assert (out / "checkpoint.pt").is_file()
    return out


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    """0.05 s of 16-bit mono audio at the model's rate."""
    path = tmp_path_factory.mktemp("scripts_audio") / "in.wav"
    t = np.arange(RATE // 20) / RATE
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 220 * t), RATE, subtype="PCM_16")
    return path


def test_train(run_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_mistake(run("train", *TRAIN, "--out", a_file), "is a file")


def test_generate(run_dir, tmp_path):
    ckpt = run_dir / "checkpoint.pt"
    ok(run("generate", "--checkpoint", ckpt, "--seconds", "0.005", "--device", "cpu", "--out", tmp_path / "wavs"))
    assert len(list((tmp_path / "wavs").glob("*.wav"))) == 1
    one_line_mistake(run("generate", "--checkpoint", tmp_path / "nope.pt", "--device", "cpu",
                         "--out", tmp_path / "more"), "not found")


def test_evaluate(run_dir, tmp_path):
    ckpt = run_dir / "checkpoint.pt"
    ok(run("evaluate", "--checkpoint", ckpt, "--clips", "1", "--seconds", "0.05", "--device", "cpu",
           "--out", tmp_path / "eval", "--quiet"))
    assert (tmp_path / "eval" / "summary.json").is_file()
    one_line_mistake(run("evaluate", "--checkpoint", ckpt, "--data", tmp_path / "missing", "--device", "cpu",
                         "--out", tmp_path / "eval2", "--quiet"), "does not exist")


def test_compress_and_decompress(run_dir, wav, tmp_path):
    ckpt = run_dir / "checkpoint.pt"
    sash, restored = tmp_path / "x.sash", tmp_path / "restored.wav"
    ok(run("compress", "--checkpoint", ckpt, wav, sash, "--quiet"))
    assert sash.stat().st_size > 0
    one_line_mistake(run("compress", "--checkpoint", ckpt, wav, tmp_path / "y.sash", "--report", tmp_path / "r.txt"),
                     "--report must end in .json or .csv")
    ok(run("decompress", "--checkpoint", ckpt, sash, restored, "--quiet"))
    assert sf.info(str(restored)).frames == sf.info(str(wav)).frames
    one_line_mistake(run("decompress", "--checkpoint", ckpt, sash, restored, "--quiet"), "exists")


def test_convert(tmp_path):
    from test_convert import FIXTURES  # the public checkpoints that test_convert checks the mapping on
    out = tmp_path / "converted.pt"
    ok(run("convert", "--from", "s4", FIXTURES / "standalone.pt", out, "--dt-transform", "exp"))
    assert out.is_file()
    one_line_mistake(run("convert", "--from", "s4", tmp_path / "public.pt", out, "--dt-transform", "exp"), "exists")
