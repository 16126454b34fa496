"""scripts/quickstart.sh: every exit tells the truth. A re-run with other data trains a new run
(its own folder) or stops with one line and exit code 2; a WAV always comes from the model that
invocation trained; a plain re-run is a note, not an error; --help is the script's own.

The script runs here with the test's Python (SASHIMI_PY: no set-up) and a few very short steps.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sashimi import checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--steps", "2", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
         "--val-crops", "1"]


def _music(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rate = 16000
    t = np.arange(rate) / rate
    x = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, 3)) / 4
    sf.write(str(folder / "a.wav"), np.stack([x, 0.5 * x], 1).astype(np.float32), rate, subtype="PCM_16")
    return folder


def quickstart(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, SASHIMI_PY=sys.executable, SECONDS_OUT="0.01", RUNS=str(tmp_path / "runs"),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)


def run_folder(r: subprocess.CompletedProcess) -> Path:
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"\(run folder (.+)\)$", r.stdout.strip().splitlines()[-1])
    assert m, r.stdout[-2000:]
    return Path(m.group(1))


def trained_on(folder: Path) -> Path:
    return Path(checkpoint.load(folder / "checkpoint.pt")["train_config"]["data"]).resolve()


def wavs(folder: Path) -> set[Path]:
    return set((folder / "samples").glob("*.wav"))


def test_other_data_is_a_new_run_and_a_plain_rerun_is_a_note(tmp_path):
    a, b = _music(tmp_path / "a", 0), _music(tmp_path / "b", 1)
    first = quickstart(tmp_path, "--data", a, *QUICK)
    run_a = run_folder(first)
    assert trained_on(run_a) == a.resolve() and len(wavs(run_a)) == 1

    # the README's own pattern: the same script again with other data
    second = quickstart(tmp_path, "--data", b, *QUICK)
    run_b = run_folder(second)
    assert run_b != run_a and trained_on(run_b) == b.resolve() and len(wavs(run_b)) == 1
    assert trained_on(run_a) == a.resolve() and len(wavs(run_a)) == 1   # the first run is untouched

    # a plain re-run: a note, the same model, one more WAV
    again = quickstart(tmp_path, "--data", a, *QUICK)
    assert run_folder(again) == run_a
    assert f"{run_a} already trained to step 2; generating" in again.stdout
    assert "error:" not in again.stdout + again.stderr
    assert len(wavs(run_a)) == 2


def test_a_run_folder_trained_on_other_data_is_refused(tmp_path):
    a, b = _music(tmp_path / "a", 0), _music(tmp_path / "b", 1)
    out = tmp_path / "mine"
    run_folder(quickstart(tmp_path, "--data", a, *QUICK, "--out", out))
    before = (out / "checkpoint.pt").read_bytes()
    r = quickstart(tmp_path, "--data", b, *QUICK, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "trained with other flags" in errors[0], r.stderr
    assert len(wavs(out)) == 1 and (out / "checkpoint.pt").read_bytes() == before


def test_help_is_the_scripts_own(tmp_path):
    r = quickstart(tmp_path, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: bash scripts/quickstart.sh")
    assert "Run folders" in r.stdout and "sashimi.train --help" in r.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [["--out"]], ids=["out-without-folder"])
def test_own_flag_mistakes_are_one_line(tmp_path, args):
    r = quickstart(tmp_path, *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr
