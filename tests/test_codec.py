"""`sashimi.compress` / `sashimi.decompress`: bit-exact round trips (mono and stereo, 8-bit mu-law
categorical and 16-bit linear DML models), odd lengths, 1 frame, silence, a full-scale square
wave; damaged or mismatched inputs are one line and a non-zero exit, never wrong audio."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.codec import read_container, restored_pcm16
from sashimi.compress import main as compress_main
from sashimi.decompress import main as decompress_main
from sashimi.quantize import Quantizer
from sashimi.train import main as train_main

RATE = 8000
TRAIN = ["--steps", "2", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--val-every", "1000",
         "--device", "cpu", "--sample-rate", str(RATE)]
CHUNK = ["--chunk-seconds", str(100 / RATE), "--quiet"]   # 100-frame chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("codec")
    out = {}
    for name, flags in (("stereo-mulaw8", ["--stereo"]),
                        ("frames-mulaw8", ["--stereo", "--stereo-layout", "frames"]),
                        ("mono-linear16", ["--bits", "16", "--quantization", "linear", "--head", "dml"])):
        assert train_main([*TRAIN, *flags, "--out", str(root / name)]) == 0
        out[name] = root / name / "checkpoint.pt"
    return out


def _music(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / RATE
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(frames)
    return np.stack([x, np.roll(x, 3)][:channels], 1)


def _round_trip(tmp_path, ckpt, audio: np.ndarray, subtype="PCM_16", name="in.wav"):
    src = tmp_path / name
    sf.write(str(src), audio, RATE, subtype=subtype)
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "x.sash"), *CHUNK,
                          "--report", str(tmp_path / "r.json")]) == 0
    assert decompress_main(["--checkpoint", str(ckpt), str(tmp_path / "x.sash"), str(tmp_path / "out.wav"),
                            "--quiet"]) == 0
    return src, tmp_path / "out.wav"


@pytest.mark.parametrize("frames", [301, 1, 100])
def test_16_bit_linear_is_bit_exact(tmp_path, models, frames):
    src, out = _round_trip(tmp_path, models["mono-linear16"], _music(frames, 1))
    a = sf.read(str(src), dtype="int16")[0]
    b = sf.read(str(out), dtype="int16")[0]
    assert np.array_equal(a, b)
    assert src.read_bytes() == out.read_bytes()  # `cmp` equal


@pytest.mark.parametrize("kind", ["silence", "square"])
def test_16_bit_edge_signals(tmp_path, models, kind):
    n = 131
    pcm = np.zeros((n, 1), dtype=np.int16) if kind == "silence" else \
        np.where((np.arange(n) // 20) % 2 == 0, 32767, -32768).astype(np.int16)[:, None]
    src = tmp_path / "in.wav"
    sf.write(str(src), pcm, RATE, subtype="PCM_16")
    assert compress_main(["--checkpoint", str(models["mono-linear16"]), str(src), str(tmp_path / "x.sash"), *CHUNK]) == 0
    assert decompress_main(["--checkpoint", str(models["mono-linear16"]), str(tmp_path / "x.sash"),
                            str(tmp_path / "out.wav"), "--quiet"]) == 0
    assert np.array_equal(sf.read(str(tmp_path / "out.wav"), dtype="int16")[0][:, None], pcm)


@pytest.mark.parametrize("name", ["stereo-mulaw8", "frames-mulaw8"])
def test_stereo_mu_law_restores_the_quantised_input(tmp_path, models, capsys, name):
    audio = _music(233, 2)
    src, out = _round_trip(tmp_path, models[name], audio, subtype="FLOAT")
    assert "restores those samples exactly" in capsys.readouterr().out
    x = torch.from_numpy(sf.read(str(src), dtype="float32", always_2d=True)[0])
    q = Quantizer("mu-law", 8)
    expected = restored_pcm16(q, q.encode(x))
    assert np.array_equal(sf.read(str(out), dtype="int16", always_2d=True)[0], expected)


@pytest.mark.parametrize("name", ["stereo-mulaw8", "frames-mulaw8"])
def test_report_is_close_to_the_model_nll(tmp_path, models, name):
    import json
    _round_trip(tmp_path, models[name], _music(800, 2))
    r = json.loads((tmp_path / "r.json").read_text())[0]
    chunks = 8
    samples = 800 * 2
    # the range coder's payload is the model's NLL plus at most a few words per chunk
    assert r["payload_bits_per_sample"] <= r["nll_bits_per_sample"] * 1.01 + chunks * 64 / samples
    assert len(r["nll_bits_per_sample_per_channel"]) == 2 and r["flac_bytes"] > 0
    # the codec's per-channel NLL is the model's own (evaluate's exact recurrence), to fp32
    from sashimi import checkpoint
    from sashimi.evaluate import score_continuous
    model = checkpoint.load_model(models[name], "cpu")[0].eval()
    x = torch.from_numpy(sf.read(str(tmp_path / "in.wav"), dtype="float32", always_2d=True)[0])
    tokens = Quantizer(model.cfg.quantization, model.cfg.bits).encode(x)
    per_chunk = [score_continuous(model, tokens[i:i + 100][None])[0] for i in range(0, 800, 100)]
    want = torch.cat(per_chunk).mean(0)
    got = torch.tensor(r["nll_bits_per_sample_per_channel"], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-3), (got, want)


def _one_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_damage_and_mismatches_are_one_line(tmp_path, models, capsys):
    src, out = _round_trip(tmp_path, models["stereo-mulaw8"], _music(250, 2))
    sash = tmp_path / "x.sash"
    good = sash.read_bytes()
    header, _ = read_container(sash)
    body = len(good) - sum(c["bytes"] for c in header["streams"])
    cases = {"header": 20, "chunk": body + 3}
    for what, offset in cases.items():
        bad = bytearray(good)
        bad[offset] ^= 0xFF
        (tmp_path / "bad.sash").write_bytes(bytes(bad))
        rc = decompress_main(["--checkpoint", str(models["stereo-mulaw8"]), str(tmp_path / "bad.sash"),
                              str(tmp_path / f"{what}.wav"), "--quiet"])
        err = _one_line(capsys, rc)
        assert ("header" in err) if what == "header" else ("stream 1 of " in err and "is damaged" in err)
        assert not (tmp_path / f"{what}.wav").exists()
    # another model
    rc = decompress_main(["--checkpoint", str(models["mono-linear16"]), str(sash), str(tmp_path / "w.wav"), "--quiet"])
    assert "another model" in _one_line(capsys, rc) and not (tmp_path / "w.wav").exists()
    # another rate, another channel count: refused up front, nothing written
    sf.write(str(tmp_path / "44k.wav"), _music(100, 2), 44100)
    rc = compress_main(["--checkpoint", str(models["stereo-mulaw8"]), str(tmp_path / "44k.wav"),
                        str(tmp_path / "y.sash"), "--quiet"])
    assert "does not resample" in _one_line(capsys, rc) and not (tmp_path / "y.sash").exists()
    sf.write(str(tmp_path / "mono.wav"), _music(100, 1), RATE)
    rc = compress_main(["--checkpoint", str(models["stereo-mulaw8"]), str(tmp_path / "mono.wav"),
                        str(tmp_path / "z.sash"), "--quiet"])
    assert "channel" in _one_line(capsys, rc)
