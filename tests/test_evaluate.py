"""`python -m sashimi.evaluate`: the continuous score is the token-by-token recurrence (what
generation sees), fresh-window scoring is the training condition, and the command writes its
table, CSV, PNG and summary from a folder of real audio files; errors are one line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.evaluate import main as evaluate_main, position_bins, score_continuous, score_windows
from sashimi.model import LN2, ModelConfig, SaShiMi
from sashimi.quantize import Quantizer


def _model(C=2, ssm="dplr", head="categorical", seq_len=32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=8, n_layers=1, pool=(2, 2), expand=2, ff=1, d_state=4, ssm=ssm, head=head,
                      n_mixtures=3, channels=C, seq_len=seq_len, sample_rate=8000, kernel_backend="reference")
    return SaShiMi(cfg).eval()


def _tokens(model, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)[:, None] / 8000
    audio = 0.5 * torch.sin(2 * math.pi * 330 * t + torch.tensor([0.0, 0.7])[: model.cfg.channels])
    audio = audio + 0.02 * torch.randn(T, model.cfg.channels, generator=g)
    return Quantizer(model.cfg.quantization, model.cfg.bits).encode(audio).unsqueeze(0)


@pytest.mark.parametrize("C,ssm,head", [(2, "dplr", "categorical"), (1, "diag", "dml")])
def test_continuous_score_is_the_recurrence(C, ssm, head):
    """Every token's NLL equals stepping the model token by token from one frame of silence."""
    model = _model(C, ssm, head)
    tok = _tokens(model, 45)                               # beyond seq_len, not a multiple of the pool
    got = score_continuous(model, tok, block=8)[0]         # (T, C)
    model.setup_step()
    zero = Quantizer(model.cfg.quantization, model.cfg.bits).zero_token
    seq = torch.cat([torch.full((C,), zero), tok[0].reshape(-1)])
    state = model.default_state(1)
    want = []
    with torch.no_grad():
        for t in range(seq.numel() - 1):
            out = model.step(seq[t:t + 1], state, t)
            if t >= C - 1:
                want.append(-model.head.log_prob(out, seq[t + 1:t + 2]).item() / LN2)
    want = torch.tensor(want, dtype=torch.float64).view(-1, C)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()


def test_windows_are_the_training_condition():
    """Within the first window both scores agree; a window as long as the excerpt is the
    continuous score; and in-window both equal the training forward (the convolution)."""
    model = _model(2, seq_len=16)
    tok = _tokens(model, 40)
    cont = score_continuous(model, tok)
    assert torch.allclose(score_windows(model, tok, 64), cont, atol=1e-6)
    win = score_windows(model, tok, 16)
    assert torch.allclose(win[:, :16], cont[:, :16], atol=1e-6)
    # window 2 restarts at frame 16: its first frame equals the first frame of a fresh excerpt
    assert torch.allclose(win[:, 16:32], score_continuous(model, tok[:, 16:32]), atol=1e-6)
    # the convolution on [silence, frames 0..15] predicts interleaved tokens 1..32 of that sequence
    zero = Quantizer(model.cfg.quantization, model.cfg.bits).zero_token
    batch = torch.cat([torch.full((1, 1, 2), zero), tok[:, :16]], 1)   # (1, 17, 2)
    with torch.no_grad():
        conv = model.nll_bits(batch)[0]                                # targets 1..32
    assert torch.allclose(conv[1:].double(), cont[0].reshape(-1)[:31], atol=1e-3)


def test_position_bins():
    table, fine = position_bins(40000, 1024, 16000)
    assert table[0] == (0, 1024) and table[1] == (1024, 2048) and table[2] == (2048, 4096)
    assert table[-1] == (40000 - 16000, 40000) and table[-2][1] == 40000
    assert fine[0][0] == 0 and fine[-1][1] == 40000 and len(fine) >= 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from sashimi.train import main as train_main
    out = tmp_path_factory.mktemp("ev") / "run"
    rc = train_main(["--stereo", "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0",
                     "--out", str(out), "--device", "cpu", "--sample-rate", "8000", "--val-every", "100",
                     "--val-crops", "4"])
    assert rc == 0
    return out / "checkpoint.pt"


def _write_music(folder):
    """Small real audio files of several kinds: stereo 44.1 kHz FLAC, mono 22.05 kHz WAV, and a
    corrupt and a too-short file (skipped with a warning)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, rate, ch, sec in (("a/stereo.flac", 44100, 2, 0.4), ("mono.wav", 22050, 1, 0.3)):
        t = np.arange(int(rate * sec)) / rate
        x = 0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-3 * t) + 0.01 * rng.standard_normal(t.size)
        x = np.stack([x, np.roll(x, 20) * 0.7], 1) if ch == 2 else x
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / name), x, rate)
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    sf.write(str(folder / "short.wav"), np.zeros(1), 8000)


def test_command_on_a_folder(ckpt, tmp_path, capsys):
    data = tmp_path / "music"
    _write_music(data)
    out = tmp_path / "eval"
    rc = evaluate_main(["--checkpoint", str(ckpt), "--data", str(data), "--seconds", "0", "--by-position",
                        "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "broken.wav" in printed.err and "short.wav" in printed.err      # the skip warning
    assert "continuous" in printed.out and "gap" in printed.out
    s = json.loads((out / "summary.json").read_text())
    assert s["excerpts"] == 2 and set(s["per_channel"]) == {"L", "R"}
    assert abs(s["seconds"] - 0.7) < 0.01
    assert 0 < s["bits"] < 9 and math.isfinite(s["bits_se"])
    assert s["by_position"][0]["gap"] == pytest.approx(0.0, abs=1e-6)
    rows = (out / "nll_by_position.csv").read_text().splitlines()
    assert rows[0].startswith("start_s,end_s,continuous,windows,gap") and len(rows) > 10
    assert (out / "nll_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_on_synthetic_music(ckpt, tmp_path, capsys):
    rc = evaluate_main(["--checkpoint", str(ckpt), "--clips", "2", "--seconds", "0.1", "--out", str(tmp_path),
                        "--quiet"])
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["excerpts"] == 2 and "by_position" not in s
    # a second run into the same folder is refused (one line) unless --overwrite
    before = (tmp_path / "summary.json").read_bytes()
    capsys.readouterr()
    rc = evaluate_main(["--checkpoint", str(ckpt), "--clips", "1", "--seconds", "0.1", "--out", str(tmp_path),
                        "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "summary.json").read_bytes() == before
    assert evaluate_main(["--checkpoint", str(ckpt), "--clips", "1", "--seconds", "0.1", "--out", str(tmp_path),
                          "--quiet", "--overwrite"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["excerpts"] == 1


def test_errors_are_one_line(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no audio here")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "not found"),
        (["--checkpoint", str(ckpt), "--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--checkpoint", str(ckpt), "--data", str(empty)], "no audio files"),
        (["--checkpoint", str(ckpt), "--seconds", "-1"], "--seconds"),
    ]
    for argv, needle in cases:
        assert evaluate_main(argv + ["--out", str(tmp_path / "o"), "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.startswith("error:") and err.count("\n") == 1, err


def test_dt_per_length_bounds_each_tiers_memory():
    """dt_per_length = c: every tier's dt_min is c / (its training length), so the slowest mode
    decays within the window (what lets the recurrence run far beyond it); 0 keeps the old range."""
    from sashimi.model import PRESETS, tier_dt_range
    from sashimi.s4 import S4Layer
    cfg = ModelConfig(**dict(PRESETS["tiny"], channels=2, dt_per_length=8.0, kernel_backend="reference"))
    model = SaShiMi(cfg)
    for layer in (m for m in model.modules() if isinstance(m, S4Layer)):
        lo, hi = (math.exp(v) for v in layer.log_dt_range)
        assert lo == pytest.approx(max(cfg.dt_min, 8.0 / layer.l_max)) and hi >= 10 * lo * 0.999
        assert layer._dt().min().item() >= lo * 0.999
    assert tier_dt_range(dataclasses_replace(cfg, dt_per_length=0.0), 128) == (cfg.dt_min, cfg.dt_max)
    old = cfg.to_dict()
    del old["dt_per_length"]                          # a checkpoint from before the field
    assert ModelConfig.from_dict(old).dt_per_length == 0.0


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)
