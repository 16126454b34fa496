"""Checkpoints are safe to load from anyone and damage never goes unnoticed: no code runs from a
forged pickle, a flipped byte is caught by the SHA-256, the previous checkpoint survives a
damaged latest one, format version 1 still loads safely, and generate refuses diverged weights."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sashimi import checkpoint
from sashimi.generate import main as generate_main
from sashimi.train import main as train_main

FAST = ["--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--val-every", "1000", "--device", "cpu"]


class _Marker:
    """Unpickling this runs `open(path, "w")`: what an attacker's __reduce__ would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert train_main(["--stereo", "--steps", "2", "--checkpoint-every", "1", *FAST, "--out", str(out)]) == 0
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_round_trip_is_plain_data_and_hashed(run_dir):
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    assert payload["format_version"] == checkpoint.FORMAT_VERSION
    assert payload["sha256"] == checkpoint.content_hash(payload)
    # the file itself loads with torch's own safe loader: no pickled objects in it
    raw = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert raw["step"] == 2 and isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)
    # RNG states round-trip exactly
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("command", ["train", "generate"])
def test_code_in_a_checkpoint_never_runs(tmp_path, capsys, command):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    forged = dict(format=checkpoint.FORMAT, format_version=checkpoint.FORMAT_VERSION, step=1,
                  model={}, model_config={}, payload=_Marker(marker))
    torch.save(forged, out / "checkpoint.pt")
    if command == "train":
        rc = train_main(["--steps", "3", *FAST, "--out", str(out), "--resume"])
    else:
        rc = generate_main(["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "refusing to load" in line and str(out / "checkpoint.pt") in line
    assert not marker.exists()


def test_damage_is_detected_and_the_previous_checkpoint_is_used(run_dir, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    ckpt = out / "checkpoint.pt"
    assert checkpoint.previous_path(ckpt).exists()
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 2000):  # 2,000 damaged bytes in the middle
        data[i] ^= 0x5A
    ckpt.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="damaged|cannot read"):
        checkpoint.load(ckpt)
    # generate refuses it in one line
    assert generate_main(["--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    assert str(ckpt) in _one_line_error(capsys)
    # resume falls back to checkpoint.prev.pt, says so, and moves the damaged one aside
    assert train_main(["--stereo", "--steps", "3", *FAST, "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "resuming from" in said and "checkpoint.prev.pt" in said and "unusable" in said
    assert (out / "checkpoint.damaged.pt").exists()
    assert checkpoint.load(ckpt)["step"] == 3
    assert checkpoint.load(checkpoint.previous_path(ckpt))["step"] == 2  # from step 1 on: 2, 3


def test_a_changed_value_fails_the_hash(run_dir, tmp_path):
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    payload["model"][next(iter(payload["model"]))].view(-1)[0] += 1.0
    torch.save(payload, tmp_path / "c.pt")  # keeps the old sha256
    with pytest.raises(checkpoint.CheckpointError, match="does not match the SHA-256"):
        checkpoint.load(tmp_path / "c.pt")
    payload["sha256"] = checkpoint.content_hash(payload)
    torch.save(payload, tmp_path / "c.pt")
    checkpoint.load(tmp_path / "c.pt")


def test_format_version_1_still_loads_safely(run_dir, tmp_path):
    """Version 1 pickled numpy RNG state and had no hash: it loads (weights_only, numpy arrays
    allow-listed), and its RNG state still restores."""
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    del payload["sha256"]
    payload["format_version"] = 1
    payload["rng"] = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    torch.save(payload, tmp_path / "v1.pt")
    loaded = checkpoint.load(tmp_path / "v1.pt")
    checkpoint.set_rng_state(loaded["rng"])
    assert loaded["step"] == 2


@pytest.mark.parametrize("version", ["1", 2.0, True, None, 99])
def test_other_format_versions_are_refused_by_type_too(run_dir, tmp_path, version):
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    payload["format_version"] = version
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(checkpoint.CheckpointError, match="format version") as info:
        checkpoint.load(tmp_path / "c.pt")
    assert repr(version) in str(info.value)


def test_generate_refuses_non_finite_weights(run_dir, tmp_path, capsys):
    payload = checkpoint.load(run_dir / "checkpoint.pt")
    name = next(k for k, v in payload["model"].items() if v.is_floating_point())
    payload["model"][name].view(-1)[0] = float("nan")
    checkpoint.save(tmp_path / "c.pt", {k: v for k, v in payload.items()
                                        if k not in ("format", "format_version", "sha256")})
    assert generate_main(["--checkpoint", str(tmp_path / "c.pt"), "--device", "cpu",
                          "--out", str(tmp_path / "wavs")]) == 2
    assert "non-finite weights" in _one_line_error(capsys)
    assert not list((tmp_path / "wavs").glob("*.wav"))


def test_save_is_atomic_and_keeps_the_previous(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, dict(step=1), keep_previous=True)
    checkpoint.save(path, dict(step=2), keep_previous=True)
    assert checkpoint.load(path)["step"] == 2
    assert checkpoint.load(checkpoint.previous_path(path))["step"] == 1
    assert not list(tmp_path.glob(".*.tmp*"))
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(TypeError, match="plain data"):
        checkpoint.save(path, dict(step=3, bad=object()))
    assert checkpoint.load(path)["step"] == 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
