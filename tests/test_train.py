"""`python -m sashimi.train`: learning, exact resume, Ctrl-C, non-finite losses, DDP, real files,
and clear one-line errors."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sashimi import checkpoint
from sashimi.train import main as train_main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FAST = ["--seq-len", "128", "--batch-size", "4", "--num-workers", "0", "--val-every", "1000"]


def run_cli(*args, module="sashimi.train", timeout=300, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoint.pt")["model"]


def test_tiny_stereo_learns(tmp_path):
    """100 steps on the synthetic stereo music take the loss well below 8 bits (CPU, ~30 s)."""
    out = tmp_path / "run"
    rc = train_main(["--stereo", "--steps", "100", "--out", str(out), *FAST, "--batch-size", "16",
                     "--val-every", "100", "--device", "cpu"])
    assert rc == 0
    rows = read_log(out)
    train = [float(r["train_bits"]) for r in rows if r["train_bits"]]
    val = [r for r in rows if r["val_bits"]][-1]
    assert train[0] > 7.5
    assert np.mean(train[-10:]) < 6.6, train
    assert float(val["val_bits_L"]) < 7.0 and float(val["val_bits_R"]) < 7.0, val
    payload = checkpoint.load(out / "checkpoint.pt")
    assert payload["step"] == 100 and payload["model_config"]["channels"] == 2


def test_resume_after_ctrl_c_is_exact(tmp_path):
    """Interrupted (a real SIGINT) and resumed ends with the weights of an uninterrupted run."""
    args = ["--stereo", "--steps", "10", "--checkpoint-every", "100", *FAST, "--device", "cpu"]
    full = tmp_path / "full"
    assert run_cli(*args, "--out", full).returncode == 0

    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "sashimi.train", *args, "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (cut / "log.csv").exists() and len(read_log(cut)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode in (0, 130), err
    stopped_at = checkpoint.load(cut / "checkpoint.pt")["step"]
    if proc.returncode == 130:
        assert "interrupted" in err and stopped_at < 10
    resumed = run_cli(*args, "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _scale_losses_from_the_4th(monkeypatch, factor: float) -> None:
    """Every training loss from the 4th forward pass on is multiplied by `factor`."""
    from sashimi.model import SaShiMi
    real = SaShiMi.nll_bits
    calls = {"n": 0}

    def scaled(self, batch, **kw):
        calls["n"] += 1
        out = real(self, batch, **kw)
        return out * factor if calls["n"] >= 4 else out

    monkeypatch.setattr(SaShiMi, "nll_bits", scaled)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _scale_losses_from_the_4th(monkeypatch, float("nan"))
    out = tmp_path / "run"
    rc = train_main(["--stereo", "--steps", "8", "--checkpoint-every", "2", *FAST, "--out", str(out), "--device", "cpu"])
    assert rc == 3
    assert "non-finite training loss" in capsys.readouterr().err
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_resume_errors_are_one_line(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--steps", "2", *FAST, "--out", str(out), "--device", "cpu"]) == 0
    # a flag that contradicts the checkpoint
    r = run_cli("--steps", "3", *FAST, "--out", out, "--resume", "--stereo")
    assert r.returncode == 2 and "differ from the checkpoint" in r.stderr and "Traceback" not in r.stderr
    # a new run over an existing one
    r = run_cli("--steps", "3", *FAST, "--out", out)
    assert r.returncode == 2 and "--resume" in r.stderr
    # another format version
    payload = checkpoint.load(out / "checkpoint.pt")
    payload["format_version"] = 99
    torch.save(payload, out / "checkpoint.pt")
    r = run_cli("--steps", "3", *FAST, "--out", out, "--resume")
    assert r.returncode == 2 and "format version 99" in r.stderr and "Traceback" not in r.stderr
    # a corrupt file
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    r = run_cli("--steps", "3", *FAST, "--out", out, "--resume")
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_bad_data_folder_is_one_line(tmp_path):
    r = run_cli("--data", tmp_path / "nowhere", "--steps", "1", "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("--data", tmp_path / "empty", "--steps", "1", "--out", tmp_path / "run2")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def _write_music(path: Path, rate: int, seconds: float, channels: int, seed: int, **kw) -> None:
    import soundfile as sf
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    notes = sum(np.sin(2 * np.pi * f * t) * np.exp(-3 * (t % 0.5)) for f in rng.uniform(110, 880, 3))
    x = 0.25 * notes[:, None] * np.linspace(0.5, 1.0, channels)[None, :] + 0.01 * rng.standard_normal((t.size, channels))
    sf.write(str(path), x.astype(np.float32), rate, **kw)


def test_trains_on_real_format_files_in_stereo(tmp_path):
    data = tmp_path / "audio"
    (data / "sub").mkdir(parents=True)
    _write_music(data / "a.flac", 44100, 1.5, 2, 0)
    _write_music(data / "sub" / "b.ogg", 44100, 1.5, 2, 1, format="OGG", subtype="VORBIS")
    _write_music(data / "c.wav", 48000, 1.5, 1, 2, subtype="PCM_16")
    out = tmp_path / "run"
    rc = train_main(["--stereo", "--data", str(data), "--steps", "3", *FAST, "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 3


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun --nproc_per_node=2 on CPU: gloo DDP, sharded data, identical weights on both ranks."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    import socket
    with socket.socket() as sock:  # a free port on loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={port}",
                        "-m", "sashimi.train", "--stereo", "--steps", "3", *FAST, "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DDP: parameters identical on all 2 ranks" in r.stdout
    assert "batch 4 x 2" in r.stdout
    assert checkpoint.load(out / "checkpoint.pt")["data_position"]["world_size"] == 2


def test_sample_every_writes_wavs(tmp_path):
    import soundfile as sf
    out = tmp_path / "run"
    rc = train_main(["--stereo", "--steps", "4", *FAST, "--sample-every", "2", "--sample-seconds", "0.01",
                     "--sample-rate", "8000", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    wavs = sorted((out / "samples").glob("*.wav"))
    assert [w.name for w in wavs] == ["step0000002.wav", "step0000004.wav"]
    info = sf.info(str(wavs[0]))
    assert info.channels == 2 and info.samplerate == 8000 and info.frames == 80


def _wait_for_rows(proc, run_dir: Path, rows: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "log.csv").exists() and len(read_log(run_dir)) >= rows:
            return
        time.sleep(0.05)


def test_sigterm_finishes_the_step_and_checkpoints(tmp_path):
    """Preemption (SLURM, Kubernetes, `timeout`) sends SIGTERM: treated like the first Ctrl-C."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "sashimi.train", "--steps", "500", "--checkpoint-every", "1000",
                             *FAST, "--device", "cpu", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    _wait_for_rows(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received" in err
    saved = checkpoint.load(out / "checkpoint.pt")["step"]
    steps = [int(r["step"]) for r in read_log(out) if r["train_bits"]]
    assert 3 <= saved < 500 and steps[-1] == saved


def test_resume_rewrites_the_log_and_cleans_up(tmp_path):
    """A run killed after its last checkpoint logged steps it will redo: the log keeps each step
    once; a temp file from a killed checkpoint write is removed."""
    out = tmp_path / "run"
    args = ["--steps", "4", "--checkpoint-every", "2", *FAST, "--device", "cpu", "--out", str(out)]
    assert train_main(args) == 0
    # as if killed after step 4's log row but before its checkpoint: only step 2 is saved
    os.replace(out / "checkpoint.prev.pt", out / "checkpoint.pt")
    (out / ".checkpoint.pt.deadbeef.tmp").write_bytes(b"half a checkpoint")
    assert train_main(args + ["--resume"]) == 0
    steps = [int(r["step"]) for r in read_log(out) if r["train_bits"]]
    assert steps == [1, 2, 3, 4]
    assert not list(out.glob(".*.tmp"))


def test_resume_applies_and_reports_changed_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--steps", "4", *FAST, "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    # --lr equal to the S4 parameters' rate used to merge the optimiser groups
    assert train_main(["--steps", "6", "--lr", "1e-3", *FAST, "--device", "cpu", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "resuming at step 4: steps 4 -> 6; lr 0.004 -> 0.001; cosine schedule re-planned for 6 steps (was 4)" in said
    assert train_main(["--steps", "8", "--lr", "0.1", *FAST, "--device", "cpu", "--out", str(out), "--resume"]) == 0
    payload = checkpoint.load(out / "checkpoint.pt")
    assert payload["train_config"]["lr"] == 0.1 and payload["train_config"]["steps"] == 8
    assert [r["step"] for r in payload["resumes"]] == [4, 6]
    lr_rows = [float(r["lr"]) for r in read_log(out) if r["lr"]]
    assert lr_rows[-2] > 0.01  # the new rate is in use (step 7 of a cosine to 8 steps)


def test_divergence_keeps_the_checkpoint_from_before(tmp_path, monkeypatch, capsys):
    """A loss far above a uniform guess is divergence: stop, and keep the checkpoint from before."""
    _scale_losses_from_the_4th(monkeypatch, 1e3)
    out = tmp_path / "run"
    rc = train_main(["--steps", "8", "--checkpoint-every", "2", *FAST, "--out", str(out), "--device", "cpu"])
    assert rc == 3
    assert "diverged" in capsys.readouterr().err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2


def test_deterministic_runs_are_bitwise_equal(tmp_path):
    """--deterministic: two identical runs give bitwise the same weights (whatever the thread count)."""
    args = ["--stereo", "--steps", "3", *FAST, "--device", "cpu", "--deterministic"]
    assert train_main(args + ["--out", str(tmp_path / "a")]) == 0
    torch.set_num_threads(2)
    try:
        assert train_main(args + ["--out", str(tmp_path / "b")]) == 0
    finally:
        torch.set_num_threads(1)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frames_layout_learns_resumes_and_generates(tmp_path):
    """--stereo-layout frames: 100 steps learn, the layout is stored in the checkpoint, a resume
    continues it exactly, and generate writes its WAV."""
    import soundfile as sf
    from sashimi.generate import main as generate_main
    args = ["--stereo", "--stereo-layout", "frames", *FAST, "--batch-size", "16", "--val-every", "100",
            "--device", "cpu", "--deterministic"]
    out = tmp_path / "run"
    assert train_main([*args, "--steps", "100", "--checkpoint-every", "50", "--out", str(out)]) == 0
    rows = read_log(out)
    train = [float(r["train_bits"]) for r in rows if r["train_bits"]]
    val = [r for r in rows if r["val_bits"]][-1]
    # (at this tiny scale it learns a little slower per step than interleave, ~7.2 bits here;
    # per second of compute it is ahead: QUALITY.md)
    assert train[0] > 7.9 and np.mean(train[-10:]) < train[0] - 0.8, train
    assert float(val["val_bits_L"]) < 7.6 and float(val["val_bits_R"]) < 7.6, val
    # tokens_per_s counts audio samples (frames x 2), not backbone positions
    assert all(float(r["tokens_per_s"]) > 0 for r in rows if r["tokens_per_s"])
    payload = checkpoint.load(out / "checkpoint.pt")
    assert payload["model_config"]["stereo_layout"] == "frames"
    assert payload["tokens_seen"] == 100 * 16 * 128 * 2
    # resuming from its step-50 checkpoint (kept as checkpoint.prev.pt) ends bitwise equal
    # (deterministic mode)
    import shutil
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(out / "checkpoint.prev.pt", cut / "checkpoint.pt")
    shutil.copy(out / "log.csv", cut / "log.csv")
    assert checkpoint.load(cut / "checkpoint.pt")["step"] == 50
    assert train_main([*args, "--steps", "100", "--out", str(cut), "--resume"]) == 0
    a, b = weights(out), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wav = tmp_path / "gen"
    assert generate_main(["--checkpoint", str(out / "checkpoint.pt"), "--seconds", "0.05", "--out", str(wav),
                          "--device", "cpu"]) == 0
    files = sorted(wav.glob("*.wav"))
    x, rate = sf.read(str(files[0]))
    assert x.shape == (int(0.05 * 16000), 2) and rate == 16000 and np.abs(x).max() > 0
