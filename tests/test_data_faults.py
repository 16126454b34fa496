"""A bad region in a data file never stops a run: crops that fail to decode or hold NaN/inf are
replaced deterministically (so resume stays exact) and named in a warning; symlinked folders
are followed (loops end); unreadable folders are named; scan warnings come once."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi import checkpoint
from sashimi.data import AudioCrops
from sashimi.quantize import Quantizer
from sashimi.train import main as train_main

RATE = 16000
FAST = ["--seq-len", "256", "--batch-size", "8", "--num-workers", "0", "--val-every", "1000",
        "--device", "cpu", "--sample-rate", str(RATE), "--deterministic"]


def _music(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    tone = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, 3)) / 3
    return (0.4 * np.stack([tone, np.roll(tone, 7)], 1) + 0.01 * rng.standard_normal((t.size, 2))).astype(np.float32)


def _corrupt_middle(path: Path, count: int = 3000) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] = 0xAA
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged_folder(tmp_path) -> Path:
    """Four 2 s stereo files: one clean, one with a NaN block and one with an inf block over most of
    the file (float WAV), one FLAC whose middle is overwritten."""
    root = tmp_path / "audio"
    root.mkdir()
    sf.write(str(root / "clean.wav"), _music(2.0, 0), RATE, subtype="PCM_16")
    for name, value, seed in (("nan.wav", np.nan, 1), ("inf.wav", np.inf, 2)):
        x = _music(2.0, seed)
        x[int(0.2 * RATE):int(1.6 * RATE), 0] = value
        sf.write(str(root / name), x, RATE, subtype="FLOAT")
    sf.write(str(root / "broken.flac"), _music(2.0, 3), RATE)
    _corrupt_middle(root / "broken.flac")
    return root


def test_bad_crops_are_replaced_and_named(damaged_folder):
    ds = AudioCrops(damaged_folder, sample_rate=RATE, channels=2, crop_frames=257,
                    quantizer=Quantizer("mu-law", 8), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crops = [ds[i] for i in range(60)]
    said = " ".join(str(w.message) for w in caught)
    for name in ("nan.wav", "inf.wav", "broken.flac"):
        assert name in said, said
    assert "clean.wav" not in said
    assert "NaN/infinite" in said and "replaced by another crop" in said
    # every crop is a full, in-range crop, and replacing is a function of (seed, index) only
    assert all(c.shape == (257, 2) and 0 <= c.min() and c.max() < 256 for c in crops)
    again = AudioCrops(damaged_folder, sample_rate=RATE, channels=2, crop_frames=257,
                       quantizer=Quantizer("mu-law", 8), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(torch.equal(again[i], crops[i]) for i in (59, 3, 17))


def test_training_runs_through_bad_files_and_resumes_exactly(damaged_folder, tmp_path):
    import shutil
    args = ["--stereo", "--data", str(damaged_folder), *FAST, "--steps", "6", "--checkpoint-every", "3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    with pytest.warns(UserWarning) as caught:
        assert train_main([*args, "--out", str(full)]) == 0
    said = " ".join(str(w.message) for w in caught)
    assert all(name in said for name in ("nan.wav", "inf.wav", "broken.flac")), said
    # the run as it was at step 3 (its checkpoint.prev.pt), resumed past the bad crops
    cut.mkdir()
    shutil.copy(full / "checkpoint.prev.pt", cut / "checkpoint.pt")
    assert checkpoint.load(cut / "checkpoint.pt")["step"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main([*args, "--out", str(cut), "--resume"]) == 0
    a, b = checkpoint.load(full / "checkpoint.pt")["model"], checkpoint.load(cut / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())


def test_a_file_that_vanishes_is_dropped(tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    for i in range(2):
        sf.write(str(root / f"f{i}.wav"), _music(1.0, i), RATE, subtype="PCM_16")
    ds = AudioCrops(root, sample_rate=RATE, channels=2, crop_frames=257, quantizer=Quantizer("mu-law", 8))
    (root / "f1.wav").write_bytes(b"no longer audio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(30):
            ds[i]
    dropped = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert len(dropped) == 1 and "f1.wav" in dropped[0]


def test_symlinked_folders_are_followed_and_loops_end(tmp_path):
    real = tmp_path / "real" / "deep"
    real.mkdir(parents=True)
    sf.write(str(real / "a.flac"), _music(1.0, 0), RATE)
    data = tmp_path / "data"
    data.mkdir()
    (data / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (real / "loop").symlink_to(tmp_path / "real", target_is_directory=True)   # a cycle
    (data / "again").symlink_to(tmp_path / "real", target_is_directory=True)  # an alias
    ds = AudioCrops(data, sample_rate=RATE, channels=2, crop_frames=257, quantizer=Quantizer("mu-law", 8))
    assert len(ds.files) == 1 and ds.files[0].name == "a.flac"


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    # the tests run as root, for whom chmod 000 reads anyway: make the listing fail as it would
    data = tmp_path / "data"
    (data / "locked").mkdir(parents=True)
    sf.write(str(data / "a.wav"), _music(1.0, 0), RATE, subtype="PCM_16")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match=r"unreadable folder.*locked.*Permission denied"):
        AudioCrops(data, sample_rate=RATE, channels=2, crop_frames=257, quantizer=Quantizer("mu-law", 8))


def test_scan_warnings_come_once_for_both_splits(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sf.write(str(data / "a.wav"), _music(1.0, 0), RATE, subtype="PCM_16")
    (data / "junk.wav").write_bytes(b"not audio")
    kw = dict(sample_rate=RATE, channels=2, crop_frames=257, quantizer=Quantizer("mu-law", 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AudioCrops(data, split="train", **kw)
        AudioCrops(data, split="valid", **kw)
    skips = [w for w in caught if "skipped 1 of 2 files" in str(w.message)]
    assert len(skips) == 1
