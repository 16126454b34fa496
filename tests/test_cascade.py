"""The adaptive cascade predictor (sashimi/predictors/cascade.py): exact reproducibility (step by
step = whole sequence, batch width, thread counts, CPU targets), that it predicts (against FLAC's
fixed order 2, and no better than chance on noise), and a value-input model on it (training =
recurrence = prefill, codec round trip)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sashimi.predictors import PREDICTORS
from sashimi.predictors import cascade as cz

ROOT = Path(__file__).resolve().parents[1]


def music(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    """PCM int16-range test audio that a linear predictor can learn: a few decaying partials
    per note, notes changing every 0.1 s, R a delayed, scaled L plus its own partial."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / 44100.0
    x = np.zeros(frames)
    for start in range(0, frames, 4410):
        f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
        seg = slice(start, start + 4410)
        for k in range(1, 5):
            x[seg] += np.sin(2 * np.pi * f0 * k * t[seg] + rng.uniform(0, 6)) / k * np.exp(-3 * (t[seg] - t[start]))
    x = x * 6000 + rng.normal(0, 20, frames)
    if channels == 1:
        return np.round(x).astype(np.int32)[:, None]
    r = 0.7 * np.roll(x, 3) + 1500 * np.sin(2 * np.pi * 523.0 * t) + rng.normal(0, 20, frames)
    return np.round(np.stack([x, r], 1)).clip(-32768, 32767).astype(np.int32)


def whole(x: np.ndarray):
    """Run a batch (B, T, C) through a fresh cascade in one call."""
    return cz.run(cz.new_state(x.shape[0], x.shape[2]), x)


def residual(x, base, gain):
    """The cascade's residual of frames 1..T-1 (predicted after frames 0..T-2)."""
    pred = base[:, :-1].copy()
    if x.shape[2] == 2:
        pred[..., 1] += gain[:, :-1, 1] * x[:, 1:, 0]
    return x[:, 1:] - np.floor(pred + 0.5)


@pytest.mark.parametrize("channels", [1, 2])
def test_step_by_step_is_the_whole_sequence_bit_for_bit(channels):
    x = music(3000, channels)[None]
    whole_out = whole(x)
    state = cz.new_state(1, channels)
    steps = [cz.run(state, x[:, t:t + 1]) for t in range(x.shape[1])]
    for i, name in enumerate(("base", "gain", "mean_abs")):
        stepped = np.concatenate([s[i] for s in steps], 1)
        assert np.array_equal(stepped, whole_out[i]), name


def test_a_chunk_computes_the_same_in_any_batch():
    """The batch is a loop: a chunk's predictions do not depend on its neighbours or the width."""
    xs = np.stack([music(2000, 2, seed=s) for s in range(5)])
    together = whole(xs)
    for b in (0, 3):
        alone = whole(xs[b:b + 1])
        for a, t in zip(alone, together):
            assert np.array_equal(a[0], t[b])


def test_it_predicts_music_better_than_fixed_order_2_and_not_noise():
    """Negative controls: FLAC's fixed order 2 on the same music, and white noise (nothing to
    predict: the residual is no smaller than the signal). Each note starts with a jump: after
    its first 1,000 frames the cascade has adapted, and before that it must not blow up (the
    sign-error NLMS: with the error itself a note's onset left residuals of ~30,000 for 300
    frames)."""
    x = music(44100, 2)[None]
    cascade_res = np.abs(residual(x, *whole(x)[:2]))[0]          # frame t + 1 at row t
    order2 = np.abs(x[0, 2:] - (2 * x[0, 1:-1] - x[0, :-2]))     # frame t + 2 at row t
    for onset in range(4410, 44100, 4410):
        settled = slice(onset + 1000, onset + 4400)
        assert cascade_res[settled].mean() < 0.7 * order2[settled].mean(), onset
        for start in range(onset, onset + 1000, 100):
            assert cascade_res[start:start + 100].mean() < np.abs(x[0, start:start + 100]).mean(), start
    noise = np.random.default_rng(1).integers(-8000, 8000, (1, 20000, 2)).astype(np.int32)
    noise_res = residual(noise, *whole(noise)[:2])
    assert np.abs(noise_res[:, 2000:]).mean() > 0.95 * np.abs(noise[:, 2000:]).mean()


def test_its_running_scale_follows_the_residual():
    x = music(20000, 1)[None]
    base, gain, mean_abs = whole(x)
    res = np.abs(residual(x, base, gain))[0, 5000:, 0]
    assert 0.5 < mean_abs[0, 5000:-1, 0].mean() / res.mean() < 2.0


_DIGEST = """
import hashlib, sys, numpy as np
sys.path.insert(0, {root!r})
from tests.test_cascade import music, whole
out = whole(np.stack([music(3000, 2, seed=s) for s in range(3)]))
print(hashlib.sha256(b"".join(a.tobytes() for a in out)).hexdigest())
"""


def _digest(env_extra: dict) -> str:
    env = dict(os.environ, **env_extra)
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, "-c", _DIGEST.format(root=str(ROOT))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_same_bits_for_another_cpu_target_and_thread_count():
    """Compiled for this CPU and for a generic x86-64 (no AVX), and under other thread
    settings, the cascade gives the same bits: no fused or reordered float operations."""
    here = hashlib.sha256(b"".join(a.tobytes() for a in whole(np.stack([music(3000, 2, seed=s) for s in range(3)])))).hexdigest()
    assert _digest({"OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"}) == here
    if os.uname().machine == "x86_64":
        assert _digest({"NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": ""}) == here


def test_a_predictor_is_registered_by_name():
    assert PREDICTORS["cascade"] is cz.Cascade and cz.Cascade.name == "cascade"


# ------------------------------------------------------------------------------------ in a model
def cascade_model(layout: str = "frames", channels: int = 2):
    from sashimi.model import ModelConfig, SaShiMi
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=1, pool=(2,), expand=2, ff=1, d_state=8, ssm="diag", seq_len=64,
                      bits=16, quantization="linear", head="dml", n_mixtures=2, channels=channels,
                      stereo_layout=layout, value_input=True, predictor="cascade", sample_rate=44100,
                      kernel_backend="reference")
    return SaShiMi(cfg).eval()


@pytest.mark.parametrize("layout,channels", [("frames", 2), ("midside", 2), ("interleave", 1)])
def test_training_recurrence_and_prefill_agree(layout, channels):
    """The head outputs of the training forward (a crop: W frames that only the predictor runs
    through, then 64 targets), of the recurrent steps (the predictor's state advanced through
    the same W frames, the backbone's fresh), and of prefill through all frames against the
    steps through all frames, are one distribution (float32 noise)."""
    from sashimi.prefill import prefill
    model = cascade_model(layout, channels)
    W = model.layout.warmup_frames
    tokens = torch.from_numpy(music(W + 65, channels, seed=2) + 32768).long()[None]
    with torch.no_grad():
        model.setup_step()
        positions = model.layout.positions(model.layout.to_model(tokens))
        P = positions.shape[1]

        def stepped(state, first):
            outs = [model.step(positions[:, t], state, t - first) for t in range(first, P - 1)]
            return torch.stack([model.log_prob_next(o, positions[:, first + i + 1].reshape(1, -1))
                                for i, o in enumerate(outs)], 1)[:, -64:].reshape(1, -1)

        every = stepped(model.default_state(1), 0)
        _, pre = prefill(model, positions[:, :-1], return_all=True)
        prefilled = model.log_prob_next(pre[:, -64:], positions[:, -64:].reshape(1, 64, -1)).reshape(1, -1)
        warm = model.default_state(1)
        model.advance(positions[:, :W], warm)          # the predictor only, as training's warm-up
        crop = stepped(warm, W)
        trained = (-model.nll_bits(tokens) * np.log(2.0)).reshape(1, -1)
    assert torch.allclose(every, prefilled, rtol=1e-4, atol=1e-3)
    assert torch.allclose(crop, trained, rtol=1e-4, atol=3e-3)   # 16-bit bins: float32 sigmoid differences


def test_the_warm_up_runs_the_predictor_only():
    """A crop of W + L + 1 frames scores its last L targets with the cascade run from its first
    frame (what `crop_frames` asks the data for): not what the same L frames give alone."""
    model = cascade_model()
    W = model.layout.warmup_frames
    assert W > 0 and model.layout.crop_frames == W + model.cfg.seq_len + 1
    tokens = torch.from_numpy(music(W + 65, 2, seed=3) + 32768).long()[None]
    with torch.no_grad():
        nll = model.nll_bits(tokens)
        out_cold = model(tokens[:, -65:-1], next_left=tokens[:, -64:, 0])
        out_warm = model(tokens[:, :-1], next_left=tokens[:, -64:, 0], warmup=W)
    assert nll.shape == (1, 64 * 2) and torch.isfinite(nll).all()
    assert out_cold.shape == out_warm.shape and not torch.equal(out_cold, out_warm)


def test_a_cascade_model_codes_stereo_bit_exact(tmp_path):
    """The codec with a stereo frames model on the cascade (the 16-bit linear default): the
    decoded WAV is the input, byte for byte, also when the caller's thread count differs."""
    import soundfile as sf
    from sashimi.checkpoint import load_model
    from sashimi.compress import main as compress_main
    from sashimi.decompress import main as decompress_main
    from sashimi.train import main as train_main
    assert train_main(["--stereo", "--stereo-layout", "frames", "--bits", "16", "--quantization", "linear",
                       "--head", "dml", "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0",
                       "--val-every", "1000", "--device", "cpu", "--sample-rate", "8000", "--out", str(tmp_path / "m")]) == 0
    ckpt = tmp_path / "m" / "checkpoint.pt"
    model, _ = load_model(ckpt, torch.device("cpu"))
    assert model.cfg.predictor == "cascade" and model.cfg.value_input
    src = tmp_path / "in.wav"
    sf.write(str(src), music(8000 * 3 // 2, 2, seed=5).astype(np.int16), 8000, subtype="PCM_16")
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "x.sash"), "--chunk-seconds", "0.5",
                          "--quiet"]) == 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        assert decompress_main(["--checkpoint", str(ckpt), str(tmp_path / "x.sash"), str(tmp_path / "out.wav"),
                                "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "out.wav").read_bytes() == src.read_bytes()
