"""`python -m sashimi.generate`: real WAV files from a tiny checkpoint, prompts, ranking by
likelihood, and one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.checkpoint import load_model
from sashimi.generate import choose, generate_audio, main as generate_main
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
    model = load_model(stereo_ckpt, "cpu")[0]
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
    model = load_model(stereo_ckpt, "cpu")[0]
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


# --------------------------------------------------------------------------------------------
# the graph-style step (run eagerly here), prefill in generate_audio, the CUDA graphs (GPU)
# --------------------------------------------------------------------------------------------
from sashimi.generate import StepSampler, run_steps  # noqa: E402
from sashimi.session import Session, broadcast_state as _broadcast_state, map_state as _map_state  # noqa: E402
from sashimi.model import PRESETS, ModelConfig, SaShiMi  # noqa: E402
from sashimi.prefill import prefill  # noqa: E402


def _tiny_model(head="categorical", C=2, ssm="dplr", device="cpu", seed=0, layout="interleave"):
    torch.manual_seed(seed)
    backend = "reference" if device == "cpu" else "auto"
    cfg = ModelConfig(**dict(PRESETS["tiny"], seq_len=64, channels=C, head=head, ssm=ssm,
                             kernel_backend=backend, sample_rate=8000, stereo_layout=layout))
    return SaShiMi(cfg).to(device).eval()


def _simple_loop(model, state, first_out, prompt_len, n_total, temperature, top_p, seed):
    """The plain reference: model.step + head.sample, token by token, host-side indexing."""
    B = first_out.shape[0]
    gen = torch.Generator(device=first_out.device).manual_seed(seed)
    toks = torch.zeros(B, n_total, dtype=torch.long, device=first_out.device)
    ll = torch.zeros(B, dtype=torch.float64, device=first_out.device)
    tok, logp = model.head.sample(first_out, temperature, top_p, generator=gen)
    toks[:, prompt_len] = tok
    ll += logp.double()
    for t in range(prompt_len, n_total - 1):
        out = model.step(toks[:, t], state, t)
        tok, logp = model.head.sample(out, temperature, top_p, generator=gen)
        toks[:, t + 1] = tok
        ll += logp.double()
    return toks, ll


@pytest.mark.parametrize("head,top_p", [("categorical", 0.9), ("categorical", 1.0), ("dml", 1.0)])
def test_graph_style_step_equals_simple_loop(head, top_p):
    """StepSampler (device-side position, in-place buffers: what a CUDA graph captures), run
    eagerly, gives exactly the tokens and log-likelihoods of the plain loop for the same seed."""
    m = _tiny_model(head)
    m.setup_step()
    prompt = torch.randint(0, 256, (1, 21))
    n_total, B = 21 + 70, 3
    with torch.no_grad():
        state, out = prefill(m, prompt)
        state = _broadcast_state(state, m.default_state(B))
        out = out.expand(B, -1).contiguous()
        ref_state = _map_state(torch.clone, state)
        ref_toks, ref_ll = _simple_loop(m, ref_state, out, 21, n_total, 0.8, top_p, seed=3)

        tokens = torch.zeros(B, n_total, dtype=torch.long)
        loglik = torch.zeros(B, dtype=torch.float64)
        session = Session(m, B, setup=False)
        session.state = state
        sampler = StepSampler(session, tokens, loglik, 21, 0.8, top_p, torch.Generator().manual_seed(3))
        sampler.sample(out)
        run_steps(sampler, 21, n_total - 1)
    assert torch.equal(tokens[:, 21:], ref_toks[:, 21:])
    assert torch.equal(loglik, ref_ll)
    assert sampler.pos.item() == n_total
    assert len(set(tokens[:, 21:].flatten().tolist())) > 5  # not a constant


@pytest.mark.parametrize("with_prompt", [False, True])
def test_generate_audio_is_prefill_plus_the_loop(with_prompt):
    """generate_audio = prefill of the prompt (or of the silent start frame) + the plain loop."""
    m = _tiny_model("dml", C=2, ssm="diag")
    q = Quantizer(m.cfg.quantization, m.cfg.bits)
    C, B, frames = 2, 2, 40
    p = 0.3 * torch.sin(torch.arange(13 * C, dtype=torch.float32)).view(13, C) if with_prompt else None
    audio, ll = generate_audio(m, frames, B, q, temperature=0.9, prompt=p, seed=4, progress=False)
    start = q.encode(p).reshape(1, -1) if with_prompt else torch.full((1, C), q.zero_token)
    n_prompt = start.shape[1]
    n_total = frames * C + (0 if with_prompt else C)
    m.setup_step()
    with torch.no_grad():
        state, out = prefill(m, start)
        state = _broadcast_state(state, m.default_state(B))
        toks, ref_ll = _simple_loop(m, state, out.expand(B, -1).contiguous(), n_prompt, n_total, 0.9, 1.0, 4)
    toks[:, :n_prompt] = start
    if not with_prompt:
        toks = toks[:, C:]
    expected = q.decode(toks.view(B, -1, C)).float()
    assert audio.shape == (B, frames, C)
    assert torch.equal(audio, expected)
    assert torch.allclose(ll, ref_ll / np.log(2), rtol=0, atol=1e-9)
    # stepping through the prompt instead of prefilling it: the same state up to rounding
    audio2, ll2 = generate_audio(m, frames, B, q, temperature=1e-4, prompt=p, seed=4, progress=False,
                                 use_prefill=False)
    audio3, ll3 = generate_audio(m, frames, B, q, temperature=1e-4, prompt=p, seed=4, progress=False)
    assert torch.equal(audio2, audio3) and torch.allclose(ll2, ll3, rtol=1e-4)


def test_cuda_graphs_need_cuda(stereo_ckpt, tmp_path):
    m = _tiny_model()
    q = Quantizer(m.cfg.quantization, m.cfg.bits)
    with pytest.raises(ValueError, match="CUDA"):
        generate_audio(m, 10, 1, q, progress=False, cuda_graphs=True)
    # the flag is accepted (and a no-op) on CPU
    assert generate_main(["--checkpoint", str(stereo_ckpt), "--seconds", "0.01", "--no-cuda-graphs",
                          "--out", str(tmp_path), "--device", "cpu"]) == 0


# ------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("head,temperature,top_p", [("categorical", 1.0, 0.95), ("categorical", 1e-4, 1.0),
                                                    ("dml", 1.0, 1.0)])
def test_cuda_graphs_equal_eager_gpu(head, temperature, top_p):
    """Replaying the captured graphs gives the tokens of the eager step for the same seed (the
    generator is registered with every graph, so it draws the same numbers), a prompt whose
    length is not a multiple of 16 included."""
    m = _tiny_model(head, C=2, device="cuda")
    q = Quantizer(m.cfg.quantization, m.cfg.bits)
    prompt = 0.2 * torch.sin(torch.arange(2 * 37, dtype=torch.float32) / 5).view(37, 2)
    for p in (None, prompt):
        a, la = generate_audio(m, 600, 4, q, temperature, top_p, prompt=p, seed=7, progress=False,
                               cuda_graphs=True)
        b, lb = generate_audio(m, 600, 4, q, temperature, top_p, prompt=p, seed=7, progress=False,
                               cuda_graphs=False)
        assert torch.equal(a, b)
        assert torch.allclose(la, lb, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(la).all() and (la < 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("preset,batch", [("tiny", 1), ("paper", 1), ("paper", 256)])
def test_cuda_graph_throughput_gpu(preset, batch):
    """Steps per second, CUDA graphs vs eager (printed; run with -s). Graphs must win."""
    import time
    torch.manual_seed(0)
    m = SaShiMi(ModelConfig(**dict(PRESETS[preset], channels=2))).cuda().eval()
    q = Quantizer(m.cfg.quantization, m.cfg.bits)
    frames = 2000
    rates = {}
    for graphs in (True, False):
        generate_audio(m, 40, batch, q, progress=False, cuda_graphs=graphs)        # warm
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate_audio(m, frames, batch, q, progress=False, cuda_graphs=graphs)
        torch.cuda.synchronize()
        rates[graphs] = frames * 2 / (time.perf_counter() - t0)
    print(f"\n{preset} stereo batch {batch}: CUDA graphs {rates[True]:,.0f} steps/s "
          f"({rates[True] * batch / 2:,.0f} samples/s), eager {rates[False]:,.0f} steps/s "
          f"(includes prefill, warm-up and capture)")
    assert rates[True] > rates[False]


@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("head", ["categorical", "dml"])
def test_generate_audio_frames_is_prefill_plus_the_frame_loop(with_prompt, head):
    """The frames layout: generate_audio = prefill of the prompt frames (or the silent frame) +
    a plain loop of one backbone step and two head samples (L, then R given L) per frame."""
    m = _tiny_model(head, C=2, ssm="diag", layout="frames")
    q = Quantizer(m.cfg.quantization, m.cfg.bits)
    B, frames = 3, 50
    p = 0.3 * torch.sin(torch.arange(13 * 2, dtype=torch.float32)).view(13, 2) if with_prompt else None
    audio, ll = generate_audio(m, frames, B, q, temperature=0.9, prompt=p, seed=5, progress=False)
    start = q.encode(p)[None] if with_prompt else torch.full((1, 1, 2), q.zero_token)
    n_prompt = start.shape[1]
    n_total = frames + (0 if with_prompt else 1)
    m.setup_step()
    gen = torch.Generator().manual_seed(5)
    toks = torch.zeros(B, n_total, 2, dtype=torch.long)
    toks[:, :n_prompt] = start
    ref_ll = torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        state, out = prefill(m, start)
        state = _broadcast_state(state, m.default_state(B))
        out = out.expand(B, -1).contiguous()
        for t in range(n_prompt, n_total):
            left, lp_l = m.head.sample(m.head(out), 0.9, 1.0, generator=gen)
            right, lp_r = m.head.sample(m.head(m.right(out, left)), 0.9, 1.0, generator=gen)
            toks[:, t] = torch.stack([left, right], 1)
            ref_ll += (lp_l + lp_r).double()          # as sample_next sums them
            if t < n_total - 1:
                out = m.step(toks[:, t], state, t)
    if not with_prompt:
        toks = toks[:, 1:]
    assert audio.shape == (B, frames, 2)
    assert torch.equal(audio, q.decode(toks).float())
    assert torch.allclose(ll, ref_ll / np.log(2), rtol=0, atol=1e-9)
    assert len(set(toks[:, n_prompt - (0 if with_prompt else 1):].flatten().tolist())) > 5
    # stepping through the prompt instead of prefilling it: the same state up to rounding
    a2, _ = generate_audio(m, frames, B, q, temperature=1e-4, prompt=p, seed=5, progress=False, use_prefill=False)
    a3, _ = generate_audio(m, frames, B, q, temperature=1e-4, prompt=p, seed=5, progress=False)
    assert torch.equal(a2, a3)


@pytest.mark.gpu
@pytest.mark.parametrize("head", ["categorical", "dml"])
def test_cuda_graphs_equal_eager_frames_gpu(head):
    """The frames layout's step (two head samples per backbone step) under CUDA graphs draws
    exactly the eager run's tokens."""
    m = _tiny_model(head, C=2, ssm="diag", device="cuda", layout="frames")
    q = Quantizer(m.cfg.quantization, m.cfg.bits)
    eager, ll_e = generate_audio(m, 400, 4, q, temperature=0.9, seed=6, progress=False, cuda_graphs=False)
    graphs, ll_g = generate_audio(m, 400, 4, q, temperature=0.9, seed=6, progress=False, cuda_graphs=True)
    assert torch.equal(eager, graphs) and torch.allclose(ll_e, ll_g)


def test_token_conversion_lives_in_the_session():
    """No code converts between the file's channels and the model's tokens (the layout's
    to_model / from_model) but sashimi.session (and the layouts that define it)."""
    import re
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for folder in ("sashimi", "bench") for p in (root / folder).rglob("*.py")
                 if "layouts" not in p.parts and p.name != "session.py"
                 and re.search(r"layout\.(to_model|from_model)\(", p.read_text())]
    assert offenders == []
