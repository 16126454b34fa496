"""`python -m sashimi.generate`: real WAV files from a tiny checkpoint, prompts, ranking by
likelihood, and one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.generate import choose, generate_audio, load_model, main as generate_main
from sashimi.quantize import Quantizer
from sashimi.train import main as train_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stereo_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    rc = train_main(["--stereo", "--steps", "3", "--seq-len", "128", "--batch-size", "4", "--num-workers", "0",
                     "--out", str(out), "--device", "cpu", "--sample-rate", "8000"])
    assert rc == 0
    return out / "checkpoint.pt"


def test_generates_stereo_wav(stereo_ckpt, tmp_path, capsys):
    rc = generate_main(["--checkpoint", str(stereo_ckpt), "--seconds", "0.05", "--batch", "3",
                        "--keep", "all", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    files = sorted(tmp_path.glob("*.wav"))
    assert len(files) == 3
    printed = capsys.readouterr().out
    for f in files:
        info = sf.info(str(f))
        assert info.channels == 2 and info.samplerate == 8000 and info.frames == 400
        assert info.subtype == "PCM_16"
        audio, _ = sf.read(str(f))
        assert np.abs(audio).max() > 1e-3, "silent"
        assert np.unique(audio).size > 10, "constant"
        assert str(f) in printed and "log-likelihood" in printed


def test_keep_best_and_middle(stereo_ckpt, tmp_path):
    for keep in ("best", "middle"):
        out = tmp_path / keep
        assert generate_main(["--checkpoint", str(stereo_ckpt), "--seconds", "0.01", "--batch", "3",
                              "--keep", keep, "--out", str(out), "--device", "cpu"]) == 0
        assert len(list(out.glob("*.wav"))) == 1
    ll = torch.tensor([-5.0, -1.0, -3.0])
    assert choose(ll, "best") == [1] and choose(ll, "middle") == [2] and choose(ll, "all") == [1, 2, 0]


def test_prompt_is_continued(stereo_ckpt, tmp_path):
    """A mono 44.1 kHz prompt for the stereo 8 kHz model: resampled, duplicated, kept at the start."""
    rate = 44100
    t = np.arange(int(0.02 * rate)) / rate
    prompt = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(str(tmp_path / "prompt.wav"), prompt, rate, subtype="PCM_16")
    model = load_model(stereo_ckpt, "cpu")
    q = Quantizer(model.cfg.quantization, model.cfg.bits)
    from sashimi.data import read_audio
    with pytest.warns(UserWarning):
        p = read_audio(tmp_path / "prompt.wav", model.cfg.sample_rate, 2)
    audio, ll = generate_audio(model, frames=p.shape[0] + 40, batch=2, quantizer=q, prompt=p, progress=False)
    assert audio.shape == (2, p.shape[0] + 40, 2)
    expected = q.decode(q.encode(p))
    assert torch.equal(audio[0, : p.shape[0]], expected) and torch.equal(audio[1, : p.shape[0]], expected)
    assert torch.isfinite(ll).all() and (ll < 0).all()
    # the same through the command line
    rc = generate_main(["--checkpoint", str(stereo_ckpt), "--prompt", str(tmp_path / "prompt.wav"),
                        "--seconds", "0.03", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 0


def test_generation_is_seeded(stereo_ckpt):
    model = load_model(stereo_ckpt, "cpu")
    q = Quantizer(model.cfg.quantization, model.cfg.bits)
    a, la = generate_audio(model, 30, 2, q, seed=5, progress=False)
    b, lb = generate_audio(model, 30, 2, q, seed=5, progress=False)
    c, _ = generate_audio(model, 30, 2, q, seed=6, progress=False)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)


def test_errors_are_one_line(stereo_ckpt, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "not found"),
        (["--checkpoint", str(stereo_ckpt), "--prompt", str(tmp_path / "nope.wav")], "nope.wav"),
        (["--checkpoint", str(stereo_ckpt), "--seconds", "0"], "--seconds"),
        (["--checkpoint", str(stereo_ckpt), "--top-p", "1.5"], "--top-p"),
    ]
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00" * 100)
    cases.append((["--checkpoint", str(bad)], "cannot read checkpoint"))
    long_prompt = tmp_path / "long.wav"
    sf.write(str(long_prompt), np.zeros((8000, 2)) + 0.1, 8000)
    cases.append((["--checkpoint", str(stereo_ckpt), "--prompt", str(long_prompt), "--seconds", "0.5"], "longer than"))
    for argv, needle in cases:
        assert generate_main(argv + ["--device", "cpu", "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.startswith("error:") and err.count("\n") == 1, err
