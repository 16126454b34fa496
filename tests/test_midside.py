"""The mid/side stereo layout: M = floor((L+R)/2), S = L-R on 16-bit linear tokens. The map is
exactly invertible; the model trains (every parameter gets a gradient), its recurrence equals
its convolution, it generates, evaluates and round-trips bit-exactly through the codec."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.layouts.midside import LEVELS, SIDE_LEVELS
from sashimi.model import PRESETS, ModelConfig, SaShiMi

RATE = 8000


def midside_cfg(**kw) -> ModelConfig:
    base = dict(PRESETS["tiny"], d_model=16, seq_len=64, channels=2, stereo_layout="midside", bits=16,
                quantization="linear", head="dml", n_mixtures=4, kernel_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def test_mid_side_is_exactly_invertible():
    layout = midside_cfg().layout
    ends = torch.tensor([[0, 0], [65535, 65535], [0, 65535], [65535, 0], [32768, 32767], [1, 2], [2, 1]])
    tokens = torch.cat([ends, torch.randint(0, LEVELS, (5000, 2))])
    ms = layout.to_model(tokens)
    assert torch.equal(layout.from_model(ms), tokens)
    assert 0 <= ms[:, 0].min() and ms[:, 0].max() < LEVELS and 0 <= ms[:, 1].min() and ms[:, 1].max() < SIDE_LEVELS
    left, right = tokens[:, 0] - 32768, tokens[:, 1] - 32768       # signed samples
    assert torch.equal(ms[:, 0] - 32768, torch.div(left + right, 2, rounding_mode="floor"))
    assert torch.equal(ms[:, 1] - (LEVELS - 1), left - right)
    assert ms[2].tolist() == [32767, 0] and ms[3].tolist() == [32767, SIDE_LEVELS - 2]   # S = -65535, +65535


def test_config_errors():
    with pytest.raises(ValueError, match="16-bit linear"):
        midside_cfg(bits=8, quantization="mu-law")
    with pytest.raises(ValueError, match="DML head"):
        midside_cfg(head="categorical")
    with pytest.raises(ValueError, match="needs stereo"):
        midside_cfg(channels=1)
    assert ModelConfig.from_dict(midside_cfg().to_dict()) == midside_cfg()


def test_trains_and_the_side_has_its_own_grid():
    torch.manual_seed(0)
    m = SaShiMi(midside_cfg())
    assert m.side_head.levels == SIDE_LEVELS and m.head.levels == LEVELS
    assert m.layout.channel_names == ["M", "S"]
    batch = torch.randint(30000, 35000, (3, 65, 2))
    nll = m.nll_bits(batch)
    assert nll.shape == (3, 128) and torch.isfinite(nll).all()
    nll.mean().backward()
    for name, p in m.named_parameters():   # every parameter is trained, the S head included
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a few steps on one correlated batch lower the loss
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(32000, 33000, (4, 65, 1))
    batch = torch.cat([x, x + torch.randint(-3, 4, x.shape)], -1)
    first = None
    for _ in range(8):
        loss = m.nll_bits(batch).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


@pytest.mark.parametrize("value_input", [False, True])
def test_recurrence_reproduces_convolution(value_input):
    """Frame by frame through `step` (+ S given the true M) equals the training pass; prefill
    equals the steps (with value_input: the values as input, the means anchored per channel)."""
    from sashimi.prefill import prefill
    torch.manual_seed(1)
    m = SaShiMi(midside_cfg(value_input=value_input)).eval()
    if value_input:
        assert m.value_in.in_features == 2 and (m.embedding.weight == 0).all()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    batch = torch.randint(30000, 35000, (2, 65, 2))
    with torch.no_grad():
        conv = m.nll_bits(batch)
    m.setup_step()
    state = m.default_state(2)
    ms = m.layout.to_model(batch)
    with torch.no_grad():
        out = torch.stack([m.step(ms[:, t], state, t) for t in range(64)], 1)
        step = (-m.log_prob_next(out, ms[:, 1:]) / 0.6931471805599453).reshape(2, -1)
    # 16-bit bins are 3e-5 wide: the DML's fp32 CDF difference carries ~1e-3 bits of rounding
    assert torch.allclose(step, conv, rtol=0, atol=2e-2)
    _, par = prefill(m, ms[:, :64], return_all=True)
    assert torch.allclose(par, out, rtol=1e-4, atol=1e-4)
    # the two-stage sample's log-probability is the model's log p(M) + log p(S | M)
    tok, logp = m.sample_next(out[:, -1], generator=torch.Generator().manual_seed(0))
    assert tok.shape == (2, 2) and tok[:, 1].max() < SIDE_LEVELS
    assert torch.allclose(logp, m.log_prob_next(out[:, -1], tok).sum(-1), atol=1e-4)


def test_generates_and_scores():
    from sashimi.evaluate import score_continuous
    from sashimi.generate import generate_audio
    torch.manual_seed(2)
    m = SaShiMi(midside_cfg()).eval()
    q = m.cfg.quantizer
    prompt = torch.sin(torch.arange(20.0)[:, None] / 3 + torch.tensor([0.0, 0.2])) * 0.5
    audio, loglik = generate_audio(m, 48, 2, q, prompt=prompt, progress=False)
    assert audio.shape == (2, 48, 2) and torch.isfinite(audio).all() and torch.isfinite(loglik).all()
    assert torch.equal(q.encode(audio[0, :20]), q.encode(prompt))        # the prompt comes back exactly
    tokens = q.encode(audio[:1])
    nll = score_continuous(m, tokens)                                   # (1, 48, 2): M and S
    silence = torch.full((1, 1, 2), q.zero_token)
    with torch.no_grad():
        conv = m.nll_bits(torch.cat([silence, tokens], 1)).view(1, 48, 2)
    assert torch.allclose(nll.float(), conv, rtol=0, atol=2e-2)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    from sashimi.train import main as train_main
    out = tmp_path_factory.mktemp("midside") / "run"
    flags = ["--steps", "2", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--val-every", "1000",
             "--device", "cpu", "--sample-rate", str(RATE), "--stereo", "--stereo-layout", "midside",
             "--bits", "16", "--quantization", "linear", "--head", "dml", "--out", str(out)]
    assert train_main(flags) == 0
    assert "val_bits_M" in (out / "log.csv").read_text().splitlines()[0]
    return out / "checkpoint.pt"


def test_codec_round_trip_is_bit_exact(tmp_path, checkpoint_path):
    from sashimi.compress import main as compress_main
    from sashimi.decompress import main as decompress_main
    rng = np.random.default_rng(0)
    n = 41
    left = (8000 * np.sin(np.arange(n) / 5) + rng.integers(-50, 50, n)).astype(np.int16)
    pcm = np.stack([left, left // 2 + 7], 1)
    pcm[:3] = [[32767, -32768], [-32768, 32767], [-1, 0]]                # S at both ends of its grid
    src = tmp_path / "in.wav"
    sf.write(str(src), pcm, RATE, subtype="PCM_16")
    assert compress_main(["--checkpoint", str(checkpoint_path), str(src), str(tmp_path / "x.sash"),
                          "--chunk-seconds", str(20 / RATE), "--quiet", "--report", str(tmp_path / "r.json")]) == 0
    assert decompress_main(["--checkpoint", str(checkpoint_path), str(tmp_path / "x.sash"),
                            str(tmp_path / "out.wav"), "--quiet"]) == 0
    assert np.array_equal(sf.read(str(tmp_path / "out.wav"), dtype="int16")[0], pcm)
    report = json.loads((tmp_path / "r.json").read_text())[0]
    assert len(report["nll_bits_per_sample_per_channel"]) == 2


def test_evaluate_and_generate_commands(tmp_path, checkpoint_path):
    from sashimi.evaluate import main as evaluate_main
    from sashimi.generate import main as generate_main
    assert evaluate_main(["--checkpoint", str(checkpoint_path), "--data", "synthetic", "--clips", "2",
                          "--seconds", "0.02", "--out", str(tmp_path / "eval"), "--quiet", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["per_channel"]) == {"M", "S"} and np.isfinite(summary["bits"])
    assert generate_main(["--checkpoint", str(checkpoint_path), "--seconds", "0.01", "--out",
                          str(tmp_path / "gen"), "--device", "cpu"]) == 0
