"""The musicality measure separates the built-in music from noise and from a held tone.

The data: the clips the quickstart trains on (SyntheticStereoMusic, seed 0, 4 s), written
through its 8-bit mu-law quantiser, at 16 and 8 kHz. The controls, through the same quantiser:
white, pink, low-pass and narrow band-pass noise, a single sustained sine and a held harmonic
tone. Measured (QUALITY.md): every data channel scores 0.5-1.0, every control <= 0.11; the pass
rule (score >= PASS_SCORE = 0.25) sits between them, each side at least 0.14 away.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi import musicality as M
from sashimi.data import SyntheticStereoMusic
from sashimi.quantize import Quantizer

DATA_FLOOR = 0.45        # every data clip scores at least this (measured minimum 0.50)
CONTROL_CEILING = 0.12   # every control at most this (measured maximum 0.11)


def quantised(x: np.ndarray) -> np.ndarray:
    q = Quantizer("mu-law", 8)
    return q.decode(q.encode(torch.from_numpy(np.ascontiguousarray(x)).float())).double().numpy()


def noise_controls(sr: int) -> dict[str, np.ndarray]:
    return {k: quantised(v) for k, v in M.controls(sr).items()}


@pytest.mark.parametrize("sr", [16000, 8000])
def test_the_data_passes_and_every_control_fails_far_from_it(sr):
    music = SyntheticStereoMusic(sr, seconds_per_clip=4.0, seed=0)
    data = [M.musicality(quantised(music.clip(i).numpy()), sr) for i in range(len(music))]
    scores = [c.score for r in data for c in r.channels]
    assert min(scores) >= DATA_FLOOR, scores
    assert all(M.passes(r) for r in data)
    for name, x in noise_controls(sr).items():
        r = M.musicality(x, sr)
        assert r.score <= CONTROL_CEILING, (name, r)
        assert not M.passes(r), name
    assert CONTROL_CEILING < M.PASS_SCORE < DATA_FLOOR


def test_the_parts_say_why_a_control_fails():
    sr = 16000
    c = noise_controls(sr)
    white = M.musicality(c["white noise"], sr).channels[0]
    sine = M.musicality(c["sine, 440 Hz"], sr).channels[0]
    assert white.lines == 0.0                     # noise: no sustained line
    assert sine.lines == 1.0 and sine.changes_per_s < 0.5   # a held tone: a line, no changes
    silence = M.musicality(np.zeros(sr), sr)
    assert silence.score == 0.0 and silence.channels[0].active_s == 0.0


def test_the_score_is_the_least_musical_channels():
    """A stereo file with music in L and noise in R does not pass."""
    sr = 16000
    clip = quantised(SyntheticStereoMusic(sr, seconds_per_clip=4.0, seed=0).clip(3).numpy())
    mixed = np.stack([clip[:, 0], noise_controls(sr)["low-pass noise, 400 Hz"]], 1)
    r = M.musicality(mixed, sr)
    assert r.channels[0].score >= DATA_FLOOR and r.channels[1].score <= CONTROL_CEILING
    assert r.score == r.channels[1].score and not M.passes(r)


def test_command_line(tmp_path, capsys):
    sr = 16000
    clip = quantised(SyntheticStereoMusic(sr, seconds_per_clip=4.0, seed=0).clip(0).numpy())
    sf.write(tmp_path / "music.wav", clip, sr, subtype="PCM_16")
    sf.write(tmp_path / "noise.wav", noise_controls(sr)["pink noise"], sr, subtype="PCM_16")
    assert M.main([str(tmp_path / "music.wav"), str(tmp_path / "noise.wav")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "(notes;" in out[0] and "(no notes;" in out[1]
    assert M.main([str(tmp_path / "missing.wav")]) == 2
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    assert M.main([str(tmp_path / "bad.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
