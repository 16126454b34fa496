"""`generate --spectrogram`: a PNG beside each WAV, or (no matplotlib) one line saying how to get
it, before any work; `python -m sashimi.spectrogram` on files."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf

from sashimi.generate import main as generate_main
from sashimi.spectrogram import INSTALL_HINT, main as spectrogram_main
from sashimi.train import main as train_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "run"
    assert train_main(["--stereo", "--steps", "1", "--seq-len", "128", "--batch-size", "2", "--num-workers", "0",
                       "--val-crops", "1", "--out", str(out), "--device", "cpu", "--sample-rate", "8000"]) == 0
    return out / "checkpoint.pt"


@pytest.mark.slow
def test_generate_writes_a_png_beside_each_wav(ckpt, tmp_path, capsys):
    assert generate_main(["--checkpoint", str(ckpt), "--seconds", "0.2", "--batch", "2", "--keep", "all",
                          "--out", str(tmp_path), "--device", "cpu", "--spectrogram"]) == 0
    wavs = sorted(tmp_path.glob("*.wav"))
    assert len(wavs) == 2
    for w in wavs:
        png = w.with_suffix(".png")
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert str(png) in capsys.readouterr().out or png.exists()


@pytest.mark.slow
def test_without_matplotlib_one_line_and_no_work(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    assert generate_main(["--checkpoint", str(ckpt), "--seconds", "0.2", "--out", str(tmp_path),
                          "--device", "cpu", "--spectrogram"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL_HINT in err[0]
    assert not list(tmp_path.glob("*"))


def test_spectrogram_command(tmp_path, capsys):
    sr = 8000
    t = np.arange(sr) / sr
    sf.write(tmp_path / "tone.wav", np.stack([np.sin(2 * np.pi * 440 * t), np.zeros(sr)], 1) * 0.5, sr)
    assert spectrogram_main([str(tmp_path / "tone.wav"), "--out", str(tmp_path / "pics")]) == 0
    assert (tmp_path / "pics" / "tone.png").read_bytes()[:8] == PNG_MAGIC
    assert spectrogram_main([str(tmp_path / "missing.wav")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
