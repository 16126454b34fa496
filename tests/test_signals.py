"""Preemption never loses work and never lies: a real SIGTERM / SIGINT in each phase of a
training step (data, forward/backward, validation, checkpoint write, a --sample-every sample)
ends with exit 130 / 143, the checkpoint of the last completed step on disk, and the printed
step equal to the one on disk. The phases are reached deterministically through the test hook
SASHIMI_TEST_PAUSE_AT=<phase>@<step> (the loop waits there until the signal has arrived)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sashimi import checkpoint
from sashimi.train import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
FAST = ["--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--steps", "50",
        "--val-crops", "8"]

# (phase@step, extra flags, signal, checkpoint step expected on disk)
PHASES = [
    ("data@2", ["--val-every", "1000", "--checkpoint-every", "1000"], signal.SIGTERM, 2),
    ("step@2", ["--val-every", "1000", "--checkpoint-every", "1000"], signal.SIGTERM, 3),
    ("validation@2", ["--val-every", "2", "--checkpoint-every", "3"], signal.SIGTERM, 2),
    ("validation@3", ["--val-every", "3", "--checkpoint-every", "2"], signal.SIGINT, 3),
    ("checkpoint@2", ["--val-every", "1000", "--checkpoint-every", "2"], signal.SIGTERM, 2),
    ("sample@2", ["--val-every", "1000", "--checkpoint-every", "1000", "--sample-every", "2",
                  "--sample-seconds", "2"], signal.SIGTERM, 2),
]


def start(out: Path, pause: str, flags: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    env[PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "sashimi.train", "--stereo", *FAST, *flags, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def wait_for_pause(proc: subprocess.Popen, pause: str, timeout: float = 120) -> str:
    """Read stderr until the loop says it paused in the phase; returns what was read."""
    phase, step = pause.split("@")
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if f"paused in {phase} at step {step}" in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"never paused in {pause}: {''.join(seen)[-2000:]}")


def printed_step(stdout: str) -> int | None:
    found = re.findall(r"checkpoint: .*checkpoint\.pt \(step (\d+)\)", stdout)
    return int(found[-1]) if found else None


@pytest.mark.parametrize("pause,flags,sig,expected", PHASES, ids=[p[0] for p in PHASES])
def test_a_signal_in_any_phase_saves_the_last_completed_step(tmp_path, pause, flags, sig, expected):
    out = tmp_path / "run"
    proc = start(out, pause, flags)
    wait_for_pause(proc, pause)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    on_disk = checkpoint.load(out / "checkpoint.pt")["step"]
    assert on_disk == expected and printed_step(stdout) == on_disk, (stdout, stderr[-2000:])
    assert not list(out.glob(".*.tmp*"))                      # no temp file left behind
    samples = sorted(p.name for p in (out / "samples").glob("*")) if (out / "samples").exists() else []
    if pause.startswith("sample"):
        assert samples == [], samples                        # the abandoned sample left no file
    if pause != "validation@2":
        return
    # and the run resumes from there (one phase is enough: the checkpoint is the same kind)
    r = subprocess.run([sys.executable, "-m", "sashimi.train", "--stereo", *FAST, *flags, "--steps",
                        str(expected + 1), "--out", str(out), "--resume"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.load(out / "checkpoint.pt")["step"] == expected + 1


def test_a_second_signal_stops_at_once_and_says_what_is_on_disk(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "validation@3!", ["--val-every", "3", "--checkpoint-every", "2"])
    wait_for_pause(proc, "validation@3")
    proc.send_signal(signal.SIGTERM)
    while True:                      # the first one is handled before the second is sent
        line = proc.stderr.readline()
        assert line, "the run ended before it acknowledged the first signal"
        if "SIGTERM received" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped at once" in stderr
    on_disk = checkpoint.load(out / "checkpoint.pt")["step"]
    assert on_disk == 2 and printed_step(stdout) == 2, (stdout, stderr[-2000:])   # step 3 was never saved
