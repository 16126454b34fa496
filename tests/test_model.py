"""The SaShiMi model: shapes, causality, the recurrence reproducing the convolution, heads,
mixed precision, and the paper preset's size."""
from __future__ import annotations

import pytest
import torch

from sashimi.heads import HEADS, DMLHead
from sashimi.model import PRESETS, ModelConfig, SaShiMi, count_parameters

from conftest import assert_rel_close

COMBOS = [(ssm, C, head) for ssm in ("dplr", "diag") for C in (1, 2) for head in ("categorical", "dml")]


def tiny(**kw) -> ModelConfig:
    base = dict(PRESETS["tiny"], seq_len=64, kernel_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("ssm,C,head", COMBOS)
def test_shapes(ssm, C, head):
    torch.manual_seed(0)
    m = SaShiMi(tiny(ssm=ssm, channels=C, head=head))
    tokens = torch.randint(0, 256, (3, 64, C))
    out = m(tokens)
    assert out.shape == (3, 64 * C, 256 if head == "categorical" else 30)
    batch = torch.randint(0, 256, (3, 65, C))
    nll = m.nll_bits(batch)
    assert nll.shape == (3, 64 * C) and torch.isfinite(nll).all()
    parts = m.layout.per_channel(nll)
    assert len(parts) == C and all(p.shape == (3, 64) for p in parts)


@pytest.mark.parametrize("ssm,C,head", COMBOS)
def test_causal(ssm, C, head):
    """Changing the token at interleaved position t changes no output before t."""
    torch.manual_seed(1)
    m = SaShiMi(tiny(ssm=ssm, channels=C, head=head)).eval()
    tokens = torch.randint(0, 256, (2, 64, C))
    frame, ch = 37, C - 1
    t = frame * C + ch
    changed = tokens.clone()
    changed[:, frame, ch] = (changed[:, frame, ch] + 101) % 256
    with torch.no_grad():
        a, b = m(tokens), m(changed)
    scale = a.abs().max()
    # the FFT convolution mixes rounding noise across positions; information does not flow back
    assert (a[:, :t] - b[:, :t]).abs().max() <= 1e-5 * scale
    assert (a[:, t] - b[:, t]).abs().max() >= 1e-3 * scale  # and the change is seen at t


def test_per_channel_split_follows_the_target():
    nll = torch.arange(8.0).view(1, 8)  # positions 0..7 of L R L R ...: position i predicts i + 1
    left, right = tiny(channels=2).layout.per_channel(nll)
    assert right.tolist() == [[0.0, 2.0, 4.0, 6.0]]  # even positions predict R
    assert left.tolist() == [[1.0, 3.0, 5.0, 7.0]]


def _train_a_little(m: SaShiMi) -> torch.Tensor:
    """15 AdamW steps on one stereo batch (4, 129, 2), which it returns; leaves m in eval mode."""
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    batch = torch.randint(100, 156, (4, 129, 2))
    for _ in range(15):
        loss = m.nll_bits(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return batch


def _step_outputs(m: SaShiMi, tokens: torch.Tensor) -> torch.Tensor:
    B = tokens.shape[0]
    flat = tokens.reshape(B, -1)
    m.setup_step()
    state = m.default_state(B)
    with torch.no_grad():
        return torch.stack([m.step(flat[:, i], state, i) for i in range(flat.shape[1])], 1)


@pytest.mark.parametrize("ssm,C,head", COMBOS)
def test_recurrence_reproduces_convolution(ssm, C, head):
    """Token by token through `step`, 512 interleaved steps, equals the convolutional forward."""
    torch.manual_seed(2)
    frames = 512 // C
    m = SaShiMi(tiny(ssm=ssm, channels=C, head=head, seq_len=frames)).eval()
    tokens = torch.randint(0, 256, (2, frames, C))
    with torch.no_grad():
        conv = m(tokens)
    assert_rel_close(_step_outputs(m, tokens), conv, 1e-4, "step vs forward")


@pytest.mark.parametrize("ssm", ["dplr", "diag"])
def test_recurrence_after_training(ssm):
    """Also after the weights moved away from their initialisation."""
    torch.manual_seed(3)
    m = SaShiMi(tiny(ssm=ssm, channels=2, seq_len=128))
    batch = _train_a_little(m)
    tokens = batch[:2, :128]
    with torch.no_grad():
        conv = m(tokens)
    assert_rel_close(_step_outputs(m, tokens), conv, 1e-4, "step vs forward (trained)")


def test_paper_preset_parameter_count():
    """5,447,680: the public SaShiMi's count at this config (Embedding(256, 64), Linear(64, 256))."""
    m = SaShiMi(ModelConfig(**PRESETS["paper"], kernel_backend="reference"))
    assert count_parameters(m) == 5_447_680
    tied = SaShiMi(ModelConfig(**PRESETS["paper"], tie_weights=True, kernel_backend="reference"))
    assert count_parameters(tied) == 5_447_680 - 256 * 64
    assert tied.head.linear.weight is tied.embedding.weight


def test_weight_tying_stereo():
    m = SaShiMi(tiny(channels=2, tie_weights=True))
    assert m.head.linear.weight is m.embedding.weight
    m.nll_bits(torch.randint(0, 256, (1, 65, 2))).mean().backward()
    assert m.embedding.weight.grad is not None


def test_bf16_autocast_matches_fp32():
    """bf16 autocast for the dense layers (the SSM and the residual stream stay fp32): the loss
    agrees to 0.2% (4e-5 seen at this seed)."""
    torch.manual_seed(4)
    m = SaShiMi(tiny(channels=2))
    batch = torch.randint(0, 256, (2, 65, 2))
    with torch.no_grad():
        full = m.nll_bits(batch).mean()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m.nll_bits(batch).float().mean()
    assert abs(half.item() - full.item()) / full.item() < 2e-3


def test_dml_log_prob_is_normalised():
    torch.manual_seed(5)
    for levels in (256, 2 ** 16):
        head = DMLHead(8, levels, 4)
        out = head(torch.randn(3, 8))
        tokens = torch.arange(levels)
        logp = head.log_prob(out[:, None, :].expand(3, levels, 12), tokens.expand(3, levels))
        total = torch.logsumexp(logp, dim=-1).exp()
        assert torch.allclose(total, torch.ones(3), atol=2e-3), total


def test_sampling_heads():
    torch.manual_seed(6)
    m = SaShiMi(tiny())
    logits = torch.randn(4, 256)
    g = torch.Generator().manual_seed(0)
    tok, logp = m.head.sample(logits, temperature=1.0, top_p=0.5, generator=g)
    assert tok.shape == (4,) and ((0 <= tok) & (tok < 256)).all()
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
    # top_p: never a token outside the nucleus
    probs = torch.softmax(logits, -1)
    for i in range(4):
        sp, idx = probs[i].sort(descending=True)
        nucleus = set(idx[: int((sp.cumsum(0) < 0.5).sum()) + 1].tolist())
        assert tok[i].item() in nucleus
    # a near-zero temperature takes the argmax
    tok0, _ = m.head.sample(logits, temperature=1e-6, generator=g)
    assert torch.equal(tok0, logits.argmax(-1))


def test_config_errors():
    with pytest.raises(ValueError, match="multiple"):
        tiny(seq_len=63)
    with pytest.raises(ValueError, match="channels"):
        tiny(channels=3)
    with pytest.raises(ValueError, match="tying"):
        tiny(head="dml", tie_weights=True)
    m = SaShiMi(tiny(channels=2))
    with pytest.raises(ValueError, match="frames"):
        m(torch.randint(0, 256, (1, 64, 1)))
    cfg = tiny(channels=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_ordinal_embedding_is_smooth_in_amplitude():
    from sashimi.blocks import ordinal_embedding
    e = ordinal_embedding(256, 64)
    sim = e @ e.T
    assert torch.allclose(sim.diagonal(), torch.ones(256), atol=0.35)  # ~unit rows (random features)
    near, far = sim.diagonal(1).mean(), sim[:128, 128:].abs().mean()
    assert near > 0.7 and far < 0.2
    assert torch.equal(e, ordinal_embedding(256, 64))  # deterministic


def test_pool_schedule_is_static():
    """What a step runs depends only on t mod prod(pool): 16 variants for pool (4, 4)."""
    m = SaShiMi(tiny())
    assert [m.backbone.phases(t) for t in (0, 3, 4, 15, 16, 31)] == [[0, 0], [3, 0], [0, 1], [3, 3], [0, 0], [3, 3]]
    state = m.default_state(2)
    assert all(torch.is_tensor(s) for s in state["down"] + state["up"])


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["interleave", "frames"])
def test_whole_model_compiles_fullgraph(triton_device, layout):
    """torch.compile(fullgraph=True) traces the training loss through every custom op
    (embed_interleave or embed_frames, cauchy, ...): the public S4 does not compile at all."""
    torch.manual_seed(7)
    cfg = ModelConfig(**dict(PRESETS["tiny"], d_model=8, n_layers=1, d_state=4, seq_len=32, channels=2,
                             kernel_backend="triton", stereo_layout=layout))
    m = SaShiMi(cfg).to(triton_device)
    batch = torch.randint(0, 256, (1, 33, 2), device=triton_device)
    compiled = torch.compile(lambda b: m.nll_bits(b).mean(), fullgraph=True, backend="aot_eager")
    loss = compiled(batch)
    grads = torch.autograd.grad(loss, [m.embedding.weight, m.backbone.center[0].layer.C])
    eager = m.nll_bits(batch).mean()
    eager_grads = torch.autograd.grad(eager, [m.embedding.weight, m.backbone.center[0].layer.C])
    assert torch.allclose(loss, eager, rtol=1e-6)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ssm", ["dplr", "diag"])
def test_fused_tier_step_equals_module_by_module(ssm):
    """setup_step() packs each tier for kernels.tier_step; setup_step(fused=False) steps the
    modules one by one. Same recurrence, same outputs."""
    torch.manual_seed(8)
    m = SaShiMi(tiny(ssm=ssm, channels=2, seq_len=64)).eval()
    tokens = torch.randint(0, 256, (2, 64, 2))
    fused = _step_outputs(m, tokens)
    flat = tokens.reshape(2, -1)
    m.setup_step(fused=False)
    state = m.default_state(2)
    with torch.no_grad():
        modules = torch.stack([m.step(flat[:, i], state, i) for i in range(flat.shape[1])], 1)
    assert_rel_close(fused, modules, 1e-5, "fused vs module steps")


@pytest.mark.interpreter
def test_fused_tier_kernel_reproduces_convolution(triton_device):
    """The Triton tier_step (and ssm/dplr kernels inside it) in the model's recurrence."""
    torch.manual_seed(9)
    m = SaShiMi(tiny(ssm="dplr", channels=2, seq_len=32, kernel_backend="triton")).to(triton_device).eval()
    tokens = torch.randint(0, 256, (1, 32, 2), device=triton_device)
    with torch.no_grad():
        conv = m(tokens)
    assert_rel_close(_step_outputs(m, tokens), conv, 1e-4, "fused Triton step vs forward")


# --------------------------------------------------------------------------------------------
# the frames stereo layout: one position per frame, R predicted given L
# --------------------------------------------------------------------------------------------
FRAMES_COMBOS = [(ssm, head) for ssm in ("dplr", "diag") for head in ("categorical", "dml")]


def frames_cfg(**kw) -> ModelConfig:
    return tiny(channels=2, stereo_layout="frames", **kw)


def _frame_step_nll(m: SaShiMi, batch: torch.Tensor) -> torch.Tensor:
    """NLL in bits (B, L*2) of frames 1..L through `step` + `log_prob_next` (generation's path)."""
    B, L1, _ = batch.shape
    m.setup_step()
    state = m.default_state(B)
    with torch.no_grad():
        out = torch.stack([m.step(batch[:, t], state, t) for t in range(L1 - 1)], 1)
        return (-m.log_prob_next(out, batch[:, 1:]) / 0.6931471805599453).reshape(B, -1)


@pytest.mark.parametrize("ssm,head", FRAMES_COMBOS)
def test_frames_shapes_and_half_the_positions(ssm, head):
    torch.manual_seed(10)
    m = SaShiMi(frames_cfg(ssm=ssm, head=head))
    assert m.cfg.l_max == 64 and tiny(channels=2).l_max == 128
    tokens = torch.randint(0, 256, (3, 64, 2))
    out = m(tokens, next_left=torch.randint(0, 256, (3, 64)))
    assert out.shape == (3, 64, 2, 256 if head == "categorical" else 30)
    batch = torch.randint(0, 256, (3, 65, 2))
    nll = m.nll_bits(batch)
    assert nll.shape == (3, 128) and torch.isfinite(nll).all()
    nll.mean().backward()
    for name, p in m.named_parameters():   # every parameter is trained, the R|L block included
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="next_left"):
        m(tokens)


@pytest.mark.parametrize("ssm,head", FRAMES_COMBOS)
def test_frames_recurrence_reproduces_convolution(ssm, head):
    """Frame by frame through `step` (+ R given the true L), 256 frames, equals the
    convolutional training pass, target by target."""
    torch.manual_seed(11)
    m = SaShiMi(frames_cfg(ssm=ssm, head=head, seq_len=256)).eval()
    batch = torch.randint(0, 256, (2, 257, 2))
    with torch.no_grad():
        conv = m.nll_bits(batch)
    assert_rel_close(_frame_step_nll(m, batch), conv, 1e-4, "frames step vs forward")


def test_frames_recurrence_after_training():
    torch.manual_seed(12)
    m = SaShiMi(frames_cfg(ssm="dplr", seq_len=128))
    batch = _train_a_little(m)
    with torch.no_grad():
        conv = m.nll_bits(batch[:2])
    assert_rel_close(_frame_step_nll(m, batch[:2]), conv, 1e-4, "frames step vs forward (trained)")


def test_frames_causal_and_right_sees_left():
    """Changing frame t changes no prediction of frames <= t; changing L_{t+1} changes the
    prediction of R_{t+1} (and only that one, among the targets up to frame t + 1)."""
    torch.manual_seed(13)
    m = SaShiMi(frames_cfg()).eval()
    batch = torch.randint(0, 256, (2, 65, 2))
    t = 37
    changed = batch.clone()
    changed[:, t, :] = (changed[:, t, :] + 101) % 256
    with torch.no_grad():
        a = m.nll_bits(batch).view(2, 64, 2)   # [s, c]: channel c of frame s + 1
        b = m.nll_bits(changed).view(2, 64, 2)
    assert (a[:, :t - 1] - b[:, :t - 1]).abs().max() <= 1e-4
    # frame t's own targets (position t - 1) differ: L_t's NLL (target) and R_t's (target and L_t)
    assert (a[:, t - 1] - b[:, t - 1]).abs().min() >= 1e-3
    left_only = batch.clone()
    left_only[:, t, 0] = (left_only[:, t, 0] + 101) % 256
    with torch.no_grad():
        c = m.nll_bits(left_only).view(2, 64, 2)
    assert (c[:, t - 1, 1] - a[:, t - 1, 1]).abs().min() >= 1e-4   # R_t conditions on L_t


def test_frames_per_channel_split():
    nll = torch.arange(8.0).view(1, 8)   # frames layout: target 2t + c is channel c of frame t + 1
    left, right = frames_cfg().layout.per_channel(nll)
    assert left.tolist() == [[0.0, 2.0, 4.0, 6.0]] and right.tolist() == [[1.0, 3.0, 5.0, 7.0]]


def test_frames_sample_next_is_exact():
    """The two-stage sample's log-probability is the model's log p(L) + log p(R | L)."""
    torch.manual_seed(14)
    m = SaShiMi(frames_cfg()).eval()
    h = torch.randn(5, m.cfg.d_model)
    tok, logp = m.sample_next(h, generator=torch.Generator().manual_seed(0))
    assert tok.shape == (5, 2) and logp.shape == (5,)
    want = m.log_prob_next(h, tok).sum(-1)
    assert torch.allclose(logp, want, atol=1e-5)


def test_frames_config_errors():
    with pytest.raises(ValueError, match="needs stereo"):
        tiny(channels=1, stereo_layout="frames")
    with pytest.raises(ValueError, match="stereo_layout must be"):
        tiny(channels=2, stereo_layout="planar")
    with pytest.raises(ValueError, match="interleave layout"):
        tiny(channels=2, stereo_layout="frames", tie_weights=True)
    cfg = frames_cfg()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = tiny(channels=2).to_dict()
    del old["stereo_layout"]                   # a checkpoint from before the field: interleave
    assert ModelConfig.from_dict(old).stereo_layout == "interleave"


def test_interleave_init_unchanged_by_frames():
    """The frames layout's extra tables do not change an interleave model's initialisation."""
    from sashimi.blocks import ordinal_embedding
    m = SaShiMi(tiny(channels=2))
    assert torch.equal(m.embedding.weight, ordinal_embedding(256, m.cfg.d_model)) and m.right is None
    f = SaShiMi(frames_cfg())
    assert f.embedding.weight.shape == (512, f.cfg.d_model)
    assert not torch.allclose(f.embedding.weight[:256], f.embedding.weight[256:])   # L and R differ


@pytest.mark.interpreter
def test_frames_triton_path_equals_reference(triton_device):
    """The frames model's loss and gradients on the Triton kernels (embed_frames, the R|L
    block's embed_interleave, ...) equal the reference path's."""
    torch.manual_seed(15)
    kw = dict(PRESETS["tiny"], d_model=8, n_layers=1, d_state=4, seq_len=32, channels=2, stereo_layout="frames")
    ref = SaShiMi(ModelConfig(**kw, kernel_backend="reference")).to(triton_device)
    tri = SaShiMi(ModelConfig(**kw, kernel_backend="triton")).to(triton_device)
    tri.load_state_dict(ref.state_dict())
    batch = torch.randint(0, 256, (2, 33, 2), device=triton_device)
    a, b = ref.nll_bits(batch).mean(), tri.nll_bits(batch).mean()
    assert torch.allclose(a, b, rtol=1e-5)
    params = ["embedding.weight", "right.embedding.weight", "backbone.center.0.layer.C"]
    ga = torch.autograd.grad(a, [dict(ref.named_parameters())[n] for n in params])
    gb = torch.autograd.grad(b, [dict(tri.named_parameters())[n] for n in params])
    for name, x, y in zip(params, ga, gb):
        assert x.abs().sum() > 0, name
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------ 16-bit DML and value input
def test_dml_head_can_put_one_16_bit_bin_above_80_percent():
    """The log-scale floor is scaled to the grid: one component centred on a 16-bit token, at
    the narrowest scale, gives that token > 80% (the old floor of -7 could not go under 6.9 bits)."""
    head = DMLHead(4, 65536, n_mixtures=1)
    token = torch.tensor([40000])
    centre = 2 * 40000 / 65535 - 1
    out = torch.tensor([[0.0, centre, -100.0]])
    bits = -head.log_prob(out, token) / torch.log(torch.tensor(2.0))
    assert bits.item() < 0.33, bits
    assert head.min_log_scale < -12 and DMLHead(4, 256).min_log_scale == -7.0   # 8-bit unchanged


@pytest.mark.parametrize("levels,head", [(256, "dml"), (256, "categorical"), (65536, "dml")])
def test_cdf_at_is_the_log_prob_distribution(levels, head):
    """The codec's interval (cdf_at) and the loss (log_prob) are one distribution."""
    torch.manual_seed(4)
    h = DMLHead(8, levels, 3) if head == "dml" else HEADS["categorical"](8, levels)
    out = h(torch.randn(5, 8))
    if head == "dml":
        out = out.clone()
        out[:, 3:6] = torch.rand(5, 3) * 0.2 - 0.1                   # means near the middle
        out[:, 6:] = out[:, 6:].clamp(max=-4.0)
    tokens = torch.randint(levels // 2 - 40, levels // 2 + 40, (5,))
    lo = h.cdf_at(out, tokens[:, None])[:, 0]
    hi = h.cdf_at(out, tokens[:, None] + 1)[:, 0]
    p = torch.exp(h.log_prob(out, tokens).double())
    assert torch.allclose(hi - lo, p, rtol=1e-4, atol=1e-7), (hi - lo, p)
    ends = h.cdf_at(out, torch.tensor([[0, levels]] * 5))
    assert (ends[:, 0] == 0).all() and (ends[:, 1] == 1).all()


def test_value_input_needs_mono_or_frames():
    with pytest.raises(ValueError, match="value_input needs mono or the frames"):
        tiny(channels=2, head="dml", bits=16, quantization="linear", value_input=True)


@pytest.mark.parametrize("C,layout", [(1, "interleave"), (2, "frames")])
def test_value_input_recurrence_and_prefill(C, layout):
    """A 16-bit linear model with the sample values as input and anchored means: the recurrence
    reproduces the convolution's NLL and prefill reproduces the recurrence."""
    from sashimi.prefill import prefill
    torch.manual_seed(5)
    cfg = tiny(channels=C, stereo_layout=layout, head="dml", bits=16, quantization="linear", value_input=True,
               seq_len=32)
    m = SaShiMi(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = torch.randint(20000, 45000, (2, 33, C))
    with torch.no_grad():
        conv = m.nll_bits(batch)
        m.setup_step()
        state = m.default_state(2)
        seq = batch[:, :32] if layout == "frames" else batch[:, :32].reshape(2, -1)
        out = torch.stack([m.step(seq[:, t], state, t) for t in range(seq.shape[1])], 1)
        if layout == "frames":
            rec = -m.log_prob_next(out, batch[:, 1:]).reshape(2, -1)
        else:
            rec = -m.log_prob_next(out, batch.reshape(2, -1)[:, 1:seq.shape[1] + 1, None])[..., 0]
        rec = rec / torch.log(torch.tensor(2.0))
        assert (rec - conv).abs().max() < 0.01 and conv.mean() > 1
        _, par = prefill(m, seq, return_all=True)
    assert_rel_close(par, out, 1e-4, "prefill vs step")
    fresh = SaShiMi(cfg)
    assert fresh.value_in is not None and (fresh.embedding.weight == 0).all()
