"""kernels.tier_step: one generation step of a whole tier of SaShiMi residual blocks (S4 + FF) in one
kernel, against kernels.reference.tier_step in float64 / complex128; the reference against
per-layer torch modules (nn.LayerNorm, nn.Linear) and against sashimi.model's own tier modules
(which also checks the parameter packing the model will use: `pack_tier` below).

S4 constants are stable (|dA| < 1): S4D-Lin-like for "diag", a normal-plus-low-rank HiPPO-like
system for "dplr" (tests/test_dplr_step.py's builders), so 10 steps in a row stay bounded.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kernels
from kernels import reference
from kernels._utils import interpreting
from kernels.tier_step import COMPLEX_KEYS, tier_step_fwd
from conftest import assert_rel_close
from strategies import dims, seeds
from kernels.ops import tier_weights
from test_dplr_step import dplr_system, step_factors

TOL = 1e-5  # fp32 kernel vs complex128 / float64 reference, relative to the largest |value|
C128, F64 = torch.complex128, torch.float64


# ------------------------------------------------------------------------------------------
# inputs

def diag_factors(H, N, g):
    """S4D-Lin-like ZOH step constants (complex128): dA = exp(dt (-1/2 + i pi n)), dt in [0.01, 0.1]."""
    dt = 0.01 + 0.09 * torch.rand(H, 1, generator=g, dtype=F64)
    lam = torch.complex(-0.5 * torch.ones(N, dtype=F64), math.pi * torch.arange(N, dtype=F64))
    f = reference.diag_step_factors(dt, lam, torch.randn(H, N, generator=g, dtype=C128))
    return dict(f, C=torch.randn(H, N, generator=g, dtype=C128), D=torch.randn(H, generator=g, dtype=F64))


def make_tier(B, H, N, n, ssm, r, F_, seed, device, steps=1, q_equals_p=False):
    """x steps (steps, B, H) fp32, state complex64 (n, B, H, N), stacked params (fp32 / complex64).
    F_ = 0: no FF block."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for l in range(n):
        if ssm == "diag":
            layers.append(diag_factors(H, N, g))
        else:
            sys_, _ = dplr_system(H, N, r, seed * 31 + l, q_equals_p)
            layers.append(step_factors(sys_))
    keys = ("dA", "dB", "C", "D") + (("P", "Q", "W") if ssm == "dplr" else ())
    p = {k: torch.stack([f[k] for f in layers]) for k in keys}

    p.update(tier_weights(n, H, F_, generator=g, scale=0.2))
    p = {k: (v.to(torch.complex64) if v.is_complex() else v.float()).contiguous().to(device)
         for k, v in p.items()}
    state = torch.randn(n, B, H, N, generator=g, dtype=C128).to(torch.complex64).to(device)
    xs = torch.randn(steps, B, H, generator=g, dtype=F64).float().to(device)
    return xs, state, p


def up(t):
    return t.to(C128 if t.is_complex() else F64).cpu()


def reference_steps(xs, state, p, ssm):
    """The reference in complex128 / float64 on a copy; returns (ys (S, B, H), final state)."""
    s = up(state).clone()
    pp = {k: up(v) for k, v in p.items()}
    ys = torch.stack([reference.tier_step(up(x), s, pp, ssm) for x in xs])
    return ys, s


def triton_call(x, state, p, ssm, config=None):
    """The public op, or (config given) the launcher with a fixed config, bypassing the autotuner."""
    if config is None:
        return kernels.tier_step(x, state, p, ssm, backend="triton")
    vr = torch.view_as_real
    c = {k: (vr(p[k]) if k in p else None) for k in COMPLEX_KEYS}
    return tier_step_fwd(vr(state), x, p["s4_norm_w"], p["s4_norm_b"], c["dA"], c["dB"], c["C"],
                         p["D"], c["P"], c["Q"], c["W"], p["s4_out_w"], p["s4_out_b"],
                         p.get("ff_norm_w"), p.get("ff_norm_b"), p.get("ff_w1"), p.get("ff_b1"),
                         p.get("ff_w2"), p.get("ff_b2"), config=config)


def check_steps(B, H, N, n, ssm, r, F_, seed, device, steps=1, config=None, tol=TOL,
                q_equals_p=False):
    xs, state, p = make_tier(B, H, N, n, ssm, r, F_, seed, device, steps, q_equals_p)
    ys_ref, state_ref = reference_steps(xs, state, p, ssm)
    before = state.clone()
    ptr = state.data_ptr()
    ys = torch.stack([triton_call(x, state, p, ssm, config) for x in xs])
    assert state.data_ptr() == ptr
    assert not torch.equal(state, before), "state was not updated in place"
    assert ys.dtype == torch.float32 and ys.shape == (steps, B, H)
    assert_rel_close(ys, ys_ref, tol, "y")
    assert_rel_close(state, state_ref, tol, "state")


# ------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, or CUDA)

ANCHORS = [  # B, H, N, n_layers, ssm, r, F
    pytest.param(1, 5, 3, 1, "diag", 0, 10, id="B1-H5-N3-n1-diag-ff"),
    pytest.param(2, 12, 8, 2, "diag", 0, 0, id="B2-H12-N8-n2-diag"),
    pytest.param(3, 17, 3, 3, "diag", 0, 34, id="B3-H17-N3-n3-diag-ff"),
    pytest.param(1, 16, 16, 2, "diag", 0, 32, id="B1-H16-N16-n2-diag-ff"),
    pytest.param(2, 1, 1, 1, "dplr", 1, 2, id="B2-H1-N1-n1-dplr1-ff"),
    pytest.param(3, 17, 3, 3, "dplr", 1, 34, id="B3-H17-N3-n3-dplr1-ff"),
    pytest.param(1, 12, 8, 2, "dplr", 2, 24, id="B1-H12-N8-n2-dplr2-ff"),
    pytest.param(2, 5, 8, 2, "dplr", 2, 0, id="B2-H5-N8-n2-dplr2"),
    pytest.param(1, 33, 5, 1, "dplr", 3, 66, id="B1-H33-N5-n1-dplr3-ff"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B,H,N,n,ssm,r,F_", ANCHORS)
def test_tier_step_fwd(B, H, N, n, ssm, r, F_, triton_device):
    check_steps(B, H, N, n, ssm, r, F_, seed=B * 1000 + H * 10 + N + n, device=triton_device)


@pytest.mark.interpreter
@pytest.mark.parametrize("B,H,N,n,ssm,r,F_", [
    pytest.param(2, 12, 8, 2, "diag", 0, 24, id="B2-H12-N8-n2-diag-ff"),
    pytest.param(1, 17, 3, 3, "dplr", 1, 34, id="B1-H17-N3-n3-dplr1-ff"),
    pytest.param(3, 5, 8, 2, "dplr", 2, 0, id="B3-H5-N8-n2-dplr2"),
])
def test_tier_step_many_steps(B, H, N, n, ssm, r, F_, triton_device, nan_poison):
    """10 steps in a row, fresh x each step: every output and the final states (NaN-poisoned
    outputs and scratch, so an unwritten element fails)."""
    check_steps(B, H, N, n, ssm, r, F_, seed=11, device=triton_device, steps=10)


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [
    pytest.param(dict(TILE=64, ROWS=2, BLOCK_HS=4, num_warps=1), id="TILE64-ROWS2-HS4"),
    pytest.param(dict(TILE=256, ROWS=4, BLOCK_HS=8, num_warps=2), id="TILE256-ROWS4-HS8"),
    pytest.param(dict(TILE=32, ROWS=1, BLOCK_HS=2, num_warps=1), id="TILE32-ROWS1-HS2"),
])
@pytest.mark.parametrize("ssm,r", [("diag", 0), ("dplr", 2)], ids=["diag", "dplr2"])
def test_tier_step_block_loops(config, ssm, r, triton_device, nan_poison):
    """Other configs than the interpreter's default: many output blocks per matrix-vector product,
    many S4 channel blocks, several batch rows per program with a partial last program (B = 3)."""
    check_steps(3, 17, 5, 2, ssm, r, 34, seed=5, device=triton_device, steps=2, config=config)


@pytest.mark.interpreter
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), H=dims(24), N=dims(9), n=st.integers(1, 3),
       ssm_r=st.sampled_from([("diag", 0), ("dplr", 1), ("dplr", 2)]), ff=st.booleans(),
       steps=st.integers(1, 3), seed=seeds)
def test_tier_step_properties(B, H, N, n, ssm_r, ff, steps, seed, triton_device):
    ssm, r = ssm_r
    check_steps(B, H, N, n, ssm, r, 2 * H if ff else 0, seed % 10_000, triton_device, steps=steps)


@pytest.mark.interpreter
def test_tier_step_low_precision_weights(triton_device):
    """bf16 matrices (and an fp16 x) are loaded and computed in fp32: the same answer as the
    float64 reference on the same rounded values."""
    xs, state, p = make_tier(2, 9, 4, 2, "dplr", 1, 18, 3, triton_device, steps=2)
    for k in ("s4_out_w", "ff_w1", "ff_w2"):
        p[k] = p[k].bfloat16()
    xs = xs.half()
    ys_ref, state_ref = reference_steps(xs, state, p, "dplr")
    ys = torch.stack([kernels.tier_step(x, state, p, "dplr", backend="triton") for x in xs])
    assert_rel_close(ys, ys_ref, TOL, "y")
    assert_rel_close(state, state_ref, TOL, "state")


@pytest.mark.interpreter
def test_tier_step_strided(triton_device):
    """x a strided slice; the state a view into a bigger buffer (updated there, the rest untouched)."""
    n, B, H, N = 2, 3, 7, 5
    xs, state, p = make_tier(B, H, N, n, "diag", 0, 14, 9, triton_device, steps=2)
    ys_ref, state_ref = reference_steps(xs, state, p, "diag")
    g = torch.Generator().manual_seed(1)
    big = torch.randn(n, B + 1, H + 2, N + 3, generator=g, dtype=torch.complex64).to(triton_device)
    big[:, 1:, :H, 2:N + 2] = state
    view = big[:, 1:, :H, 2:N + 2]
    outside = big.clone()
    x_big = torch.randn(2, B, 2 * H, generator=g).to(triton_device)
    x_big[:, :, 1::2] = xs
    ys = torch.stack([kernels.tier_step(x_big[i, :, 1::2], view, p, "diag", backend="triton")
                      for i in range(2)])
    assert_rel_close(ys, ys_ref, TOL, "y")
    assert_rel_close(view, state_ref, TOL, "state")
    rest, rest0 = big.clone(), outside
    rest[:, 1:, :H, 2:N + 2] = 0
    rest0[:, 1:, :H, 2:N + 2] = 0
    assert torch.equal(rest, rest0), "the kernel wrote outside the state view"


@pytest.mark.interpreter
def test_tier_step_real_planes_state(triton_device):
    """A state carried as float32 planes (n, B, H, N, 2) is updated in place, as the complex one."""
    xs, state, p = make_tier(2, 6, 4, 2, "dplr", 1, 12, 4, triton_device, steps=2)
    ys_ref, state_ref = reference_steps(xs, state, p, "dplr")
    planes = torch.view_as_real(state).clone()
    ys = torch.stack([kernels.tier_step(x, planes, p, "dplr", backend="triton") for x in xs])
    assert_rel_close(ys, ys_ref, TOL, "y")
    assert_rel_close(torch.view_as_complex(planes), state_ref, TOL, "state")


@pytest.mark.interpreter
def test_tier_step_no_grad_parameters(triton_device):
    """Under torch.inference_mode, parameters that require grad are fine."""
    xs, state, p = make_tier(1, 5, 3, 1, "diag", 0, 10, 6, triton_device)
    ys_ref, state_ref = reference_steps(xs, state, p, "diag")
    p = {k: (nn.Parameter(v) if not v.is_complex() else v) for k, v in p.items()}
    with torch.inference_mode():
        y = kernels.tier_step(xs[0], state, p, "diag", backend="triton")
    assert_rel_close(y, ys_ref[0], TOL, "y")
    assert_rel_close(state, state_ref, TOL, "state")


@pytest.mark.interpreter
def test_tier_step_empty_batch(triton_device):
    xs, state, p = make_tier(1, 5, 3, 1, "diag", 0, 10, 0, triton_device)
    y = kernels.tier_step(xs[0][:0], state[:, :0], p, "diag", backend="triton")
    assert y.shape == (0, 5) and y.dtype == torch.float32


def two_steps(x0, x1, state, params, ssm: str):
    y0 = kernels.tier_step(x0, state, params, ssm, backend="triton")
    y1 = kernels.tier_step(x1 + y0, state, params, ssm, backend="triton")
    return torch.stack([y0, y1])


@pytest.mark.interpreter
@pytest.mark.parametrize("planes", [False, True], ids=["complex-state", "planes-state"])
@pytest.mark.parametrize("ssm,r,F_", [("diag", 0, 0), ("dplr", 2, 10)], ids=["diag", "dplr2-ff"])
def test_tier_step_compile(planes, ssm, r, F_, triton_device):
    """torch.compile(fullgraph=True) traces two chained steps through the custom op."""
    xs, state, p = make_tier(2, 5, 4, 2, ssm, r, F_, 21, triton_device, steps=2)
    s_ref = up(state).clone()
    pp = {k: up(v) for k, v in p.items()}
    y0 = reference.tier_step(up(xs[0]), s_ref, pp, ssm)
    y1 = reference.tier_step(up(xs[1]) + y0, s_ref, pp, ssm)
    if planes:
        state = torch.view_as_real(state).clone()
    torch._dynamo.reset()
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    ptr = state.data_ptr()
    ys = compiled(xs[0], xs[1], state, p, ssm)
    assert state.data_ptr() == ptr
    assert_rel_close(ys, torch.stack([y0, y1]), TOL, "y")
    assert_rel_close(torch.view_as_complex(state) if planes else state, s_ref, TOL, "state")


@pytest.mark.interpreter
@pytest.mark.parametrize("ssm,r,F_", [("diag", 0, 0), ("dplr", 1, 6)], ids=["diag", "dplr1-ff"])
def test_tier_step_opcheck(ssm, r, F_, triton_device):
    """torch.library.opcheck: schema (declared mutation), fake tensor, AOT dispatch."""
    xs, state, p = make_tier(2, 3, 2, 2, ssm, r, F_, 8, triton_device)
    vr = torch.view_as_real
    c = {k: (vr(p[k]) if k in p else None) for k in COMPLEX_KEYS}
    args = (vr(state), xs[0], p["s4_norm_w"], p["s4_norm_b"], c["dA"], c["dB"], c["C"], p["D"],
            c["P"], c["Q"], c["W"], p["s4_out_w"], p["s4_out_b"], p.get("ff_norm_w"),
            p.get("ff_norm_b"), p.get("ff_w1"), p.get("ff_b1"), p.get("ff_w2"), p.get("ff_b2"))
    torch.library.opcheck(torch.ops.sashimi_kernels.tier_step.default, args)


@pytest.mark.interpreter
def test_tier_step_triton_dtypes(triton_device):
    xs, state, p = make_tier(1, 3, 2, 1, "dplr", 1, 6, 0, triton_device)
    with pytest.raises(ValueError, match="complex64"):
        kernels.tier_step(xs[0], state, {**p, "W": p["W"].to(C128)}, "dplr", backend="triton")
    with pytest.raises(ValueError, match="complex64"):
        kernels.tier_step(xs[0], state.to(C128), p, "dplr", backend="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.tier_step(xs[0], state, {**p, "ff_w1": p["ff_w1"].double()}, "dplr", backend="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.tier_step(xs[0].double(), state, p, "dplr", backend="triton")


# ------------------------------------------------------------------------------------------
# sashimi.model's tier modules: the packing the model uses (reference path here; Triton below)

def pack_tier(tier: nn.ModuleList) -> tuple[dict, str]:
    from sashimi.model import pack_tier as model_pack_tier
    return model_pack_tier(tier)


def model_tier_case(ssm, ff, device, seed=0):
    from sashimi.model import ModelConfig, _tier
    torch.manual_seed(seed)  # the modules' own init (nn.Linear, S4Layer) uses the global RNG
    cfg = ModelConfig(d_model=6, n_layers=2, d_state=8, ssm=ssm, ff=ff, seq_len=64,
                      kernel_backend="reference")
    tier = _tier(6, cfg, 64).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norms and D (LayerNorm inits to 1 / 0)
        for m in tier:
            m.norm.weight.add_(0.2 * torch.randn(6, generator=g))
            m.norm.bias.add_(0.2 * torch.randn(6, generator=g))
    tier = tier.to(device)
    for m in tier:
        if hasattr(m.layer, "setup_step"):
            m.layer.setup_step()  # after .to(device): the step factors are built on the device
    xs = torch.randn(5, 3, 6, generator=g).to(device)
    return tier, xs


def model_tier_steps(tier, xs, device):
    states = [m.default_state(3, device) for m in tier]
    ys = []
    with torch.no_grad():
        for x in xs:
            for m, s in zip(tier, states):
                x = m.step(x, s)
            ys.append(x)
    s4_states = torch.stack([s for s in states if s is not None])
    return torch.stack(ys), s4_states


@pytest.mark.parametrize("ssm", ["diag", "dplr"])
@pytest.mark.parametrize("ff", [2, 0], ids=["ff2", "ff0"])
def test_tier_step_reference_matches_model_tier(ssm, ff):
    """5 steps of sashimi.model's tier (Residual(S4Layer).step, Residual(FeedForward).step) ==
    5 calls of the reference on the packed, stacked params and state."""
    tier, xs = model_tier_case(ssm, ff, "cpu")
    ys_model, states_model = model_tier_steps(tier, xs, "cpu")
    params, kind = pack_tier(tier)
    assert kind == ssm
    state = torch.zeros(2, 3, 6, 4, dtype=torch.complex64)
    with torch.no_grad():
        ys = torch.stack([kernels.tier_step(x, state, params, ssm, backend="reference") for x in xs])
    assert_rel_close(ys, ys_model, 1e-6, "y")
    assert_rel_close(state, states_model, 1e-6, "state")


@pytest.mark.interpreter
@pytest.mark.parametrize("ssm", ["diag", "dplr"])
def test_tier_step_triton_matches_model_tier(ssm, triton_device):
    tier, xs = model_tier_case(ssm, 2, triton_device, seed=3)
    ys_model, states_model = model_tier_steps(tier, xs, triton_device)
    params, _ = pack_tier(tier)
    state = torch.zeros(2, 3, 6, 4, dtype=torch.complex64, device=triton_device)
    with torch.no_grad():
        ys = torch.stack([kernels.tier_step(x, state, params, ssm, backend="triton") for x in xs])
    assert_rel_close(ys, ys_model, 1e-5, "y")
    assert_rel_close(state, states_model, 1e-5, "state")


# ------------------------------------------------------------------------------------------
# no Triton below: the reference against plain torch modules, dispatch, errors

@pytest.mark.parametrize("ssm,r,F_", [("diag", 0, 10), ("dplr", 2, 10), ("dplr", 1, 0)],
                         ids=["diag-ff", "dplr2-ff", "dplr1"])
def test_tier_step_reference_matches_modules(ssm, r, F_):
    """The reference == a loop over per-layer nn.LayerNorm / nn.Linear modules holding the same
    weights (float64), with the S4 step written out (diag) or kernels.reference.dplr_step (dplr,
    itself checked against the dense bilinear step in test_dplr_step.py), 3 steps."""
    n, B, H, N = 2, 3, 5, 4
    xs, state, p = make_tier(B, H, N, n, ssm, r, F_, 17, "cpu", steps=3)
    pp = {k: up(v) for k, v in p.items()}
    s_ref = up(state).clone()
    ys_ref = torch.stack([reference.tier_step(up(x), s_ref, pp, ssm) for x in xs])

    def linear(w, b):
        m = nn.Linear(w.shape[1], w.shape[0], dtype=F64)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m

    def norm(w, b):
        m = nn.LayerNorm(H, dtype=F64)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m

    blocks = []
    for l in range(n):
        blk = dict(norm=norm(pp["s4_norm_w"][l], pp["s4_norm_b"][l]),
                   out=linear(pp["s4_out_w"][l], pp["s4_out_b"][l]))
        if F_:
            blk.update(ff_norm=norm(pp["ff_norm_w"][l], pp["ff_norm_b"][l]),
                       lin1=linear(pp["ff_w1"][l], pp["ff_b1"][l]),
                       lin2=linear(pp["ff_w2"][l], pp["ff_b2"][l]))
        blocks.append(blk)
    s = up(state).clone()
    ys = []
    with torch.no_grad():
        for x in xs:
            x = up(x)
            for l, blk in enumerate(blocks):
                u = blk["norm"](x)
                if ssm == "diag":
                    s[l] = pp["dA"][l] * s[l] + pp["dB"][l] * u[..., None]
                    y = 2 * (pp["C"][l] * s[l]).sum(-1).real + pp["D"][l] * u
                else:
                    y = reference.dplr_step(s[l], u, *(pp[k][l] for k in ("dA", "dB", "C", "D", "P", "Q", "W")))
                z = blk["out"](0.5 * y * (1 + torch.erf(y / math.sqrt(2))))
                x = x + z[:, :H] * torch.sigmoid(z[:, H:])
                if F_:
                    x = x + blk["lin2"](nn.GELU()(blk["lin1"](blk["ff_norm"](x))))
            ys.append(x)
    assert_rel_close(ys_ref, torch.stack(ys), 1e-12, "y")
    assert_rel_close(s_ref, s, 1e-12, "state")


def test_tier_step_reference_backend(device):
    xs, state, p = make_tier(2, 5, 3, 2, "dplr", 1, 10, 2, device)
    s2 = state.clone()
    y = kernels.tier_step(xs[0], state, p, "dplr", backend="reference")
    y2 = reference.tier_step(xs[0], s2, p, "dplr")
    assert torch.equal(y, y2) and torch.equal(state, s2)


@pytest.mark.filterwarnings("ignore:tier_step. no GPU")
def test_tier_step_auto_falls_back_on_cpu():
    if interpreting():
        pytest.skip("under TRITON_INTERPRET=1 'auto' runs Triton on CPU")
    xs, state, p = make_tier(1, 4, 3, 1, "diag", 0, 8, 4, "cpu")
    s2 = state.clone()
    y = kernels.tier_step(xs[0], state, p, "diag")  # warns once: running the reference
    assert torch.equal(y, reference.tier_step(xs[0], s2, p, "diag"))


def _errors_case():
    xs, state, p = make_tier(2, 3, 4, 2, "dplr", 1, 6, 0, "cpu")
    return xs[0], state, p


def _drop(p, *keys):
    return {k: v for k, v in p.items() if k not in keys}


@pytest.mark.parametrize("mutate,match", [
    pytest.param(lambda x, s, p: (x, s, p, "s4"), "ssm must be 'diag' or 'dplr'", id="bad-ssm"),
    pytest.param(lambda x, s, p: (x, s, list(p.values()), "dplr"), "params must be a dict", id="params-list"),
    pytest.param(lambda x, s, p: (x, s, _drop(p, "s4_out_b"), "dplr"), "missing params \\['s4_out_b'\\]",
                 id="missing-key"),
    pytest.param(lambda x, s, p: (x, s, _drop(p, "W"), "dplr"), "missing params \\['W'\\]", id="missing-W"),
    pytest.param(lambda x, s, p: (x, s, p, "diag"), "ssm='diag' takes none", id="diag-with-P"),
    pytest.param(lambda x, s, p: (x, s, _drop(p, "ff_b2"), "dplr"), "give all or none", id="partial-ff"),
    pytest.param(lambda x, s, p: (x, s, {**p, "ff_w3": p["ff_w1"]}, "dplr"), "unknown params", id="unknown"),
    pytest.param(lambda x, s, p: (x, s, {**p, "D": p["D"].tolist()}, "dplr"), "must be a tensor", id="not-tensor"),
    pytest.param(lambda x, s, p: (x, s[0], p, "dplr"), "state must be \\(n_layers, B, H, N\\)", id="state-rank"),
    pytest.param(lambda x, s, p: (x, s.abs(), p, "dplr"), "planes", id="state-real"),
    pytest.param(lambda x, s, p: (x, s[:, :1].expand(-1, 2, -1, -1), p, "dplr"), "expanded",
                 id="state-expanded"),
    pytest.param(lambda x, s, p: (x[:1], s, p, "dplr"), "x must be \\(B, H\\)", id="x-shape"),
    pytest.param(lambda x, s, p: (x.to(torch.int32), s, p, "dplr"), "x must be a real floating", id="x-int"),
    pytest.param(lambda x, s, p: (x, s, {**p, "dA": p["dA"][:, :, :3].contiguous()}, "dplr"),
                 "params\\['dA'\\] must be \\(2, 3, 4\\)", id="dA-N-mismatch"),
    pytest.param(lambda x, s, p: (x, s, {**p, "D": p["D"][:1]}, "dplr"), "params\\['D'\\] must be \\(2, 3\\)",
                 id="D-n-mismatch"),
    pytest.param(lambda x, s, p: (x, s, {**p, "s4_out_w": p["s4_out_w"][:, :3].contiguous()}, "dplr"),
                 "params\\['s4_out_w'\\] must be \\(2, 6, 3\\)", id="out-w-shape"),
    pytest.param(lambda x, s, p: (x, s, {**p, "Q": p["Q"][:, :, :2].contiguous()}, "dplr"),
                 "params\\['Q'\\] must be \\(2, 1, 3, 4\\)", id="Q-H-mismatch"),
    pytest.param(lambda x, s, p: (x, s, {**p, "P": p["P"][:, :0]}, "dplr"), "r >= 1", id="r0"),
    pytest.param(lambda x, s, p: (x, s, {**p, "P": p["P"][:, 0]}, "dplr"), "r >= 1", id="P-rank3"),
    pytest.param(lambda x, s, p: (x, s, {**p, "ff_w2": p["ff_w2"][..., :5].contiguous()}, "dplr"),
                 "params\\['ff_w2'\\] must be \\(2, 3, 6\\)", id="ff-w2-F-mismatch"),
    pytest.param(lambda x, s, p: (x, s, {**p, "ff_w1": p["ff_w1"][:, :0]}, "dplr"), "F >= 1", id="F0"),
    pytest.param(lambda x, s, p: (x, s, {**p, "C": p["C"].real.contiguous()}, "dplr"),
                 "params\\['C'\\] must be complex", id="C-real"),
    pytest.param(lambda x, s, p: (x, s, {**p, "s4_norm_w": p["s4_norm_w"].to(torch.complex64)}, "dplr"),
                 "params\\['s4_norm_w'\\] must be a real floating", id="norm-complex"),
    pytest.param(lambda x, s, p: (x, s, {**p, "ff_w1": p["ff_w1"].transpose(1, 2).contiguous().transpose(1, 2)},
                                  "dplr"), "must be contiguous", id="non-contiguous"),
    pytest.param(lambda x, s, p: (x, s, {**p, "ff_b1": p["ff_b1"].to("meta")}, "dplr"), "same device",
                 id="devices"),
])
def test_tier_step_errors(mutate, match):
    x, state, p, ssm = mutate(*_errors_case())
    with pytest.raises(ValueError, match=match):
        kernels.tier_step(x, state, p, ssm, backend="reference")


def test_tier_step_bad_backend():
    x, state, p = _errors_case()
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.tier_step(x, state, p, "dplr", backend="cuda")


@pytest.mark.parametrize("name", ["x", "state", "s4_out_w", "ff_b2", "P"])
def test_tier_step_requires_grad_raises(name):
    x, state, p = _errors_case()
    if name == "x":
        x = x.clone().requires_grad_(True)
    elif name == "state":
        state = state.clone().requires_grad_(True)
    else:
        p = {**p, name: p[name].clone().requires_grad_(True)}
    with pytest.raises(ValueError, match="inference only"):
        kernels.tier_step(x, state, p, "dplr", backend="reference")


def test_tier_step_none_ff_is_no_ff():
    """FF params given as None are the same as absent (a tier built with ff = 0)."""
    xs, state, p = make_tier(1, 4, 3, 2, "diag", 0, 0, 12, "cpu")
    s2 = state.clone()
    y = kernels.tier_step(xs[0], state, {**p, **{k: None for k in ("ff_w1", "ff_b1")}}, "diag",
                          backend="reference")
    assert torch.equal(y, reference.tier_step(xs[0], s2, p, "diag"))


# ------------------------------------------------------------------------------------------
# GPU only

PAPER = dict(H=256, N=32, F_=512, n=8)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 256])
@pytest.mark.parametrize("ssm,r", [("diag", 0), ("dplr", 1)], ids=["diag", "dplr1"])
def test_tier_step_gpu_paper_sizes(B, ssm, r):
    """The widest tier of the paper model (H = 256, N = 32, F = 512, 8 layers), 20 steps. 16 residual
    blocks of fp32 matrix-vector products (K up to 512) against float64: tolerance 5e-5."""
    check_steps(B, PAPER["H"], PAPER["N"], PAPER["n"], ssm, r, PAPER["F_"], seed=B,
                device=torch.device("cuda"), steps=20, tol=5e-5, q_equals_p=True)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128, 256])
def test_tier_step_gpu_cuda_graph(H):
    """One tier step captured in a CUDA graph (after the autotuning warm-up), replayed 10 times."""
    dev = torch.device("cuda")
    B, S = 4, 10
    xs, state, p = make_tier(B, H, 32, 8, "dplr", 1, 2 * H, 9, dev, steps=S, q_equals_p=True)
    ys_ref, state_ref = reference_steps(xs, state, p, "dplr")
    with torch.inference_mode():
        warm = state.clone()
        kernels.tier_step(xs[0], warm, p, "dplr")  # autotune outside the capture
        x_static = xs[0].clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = kernels.tier_step(x_static, state, p, "dplr")
        ys = []
        for t in range(S):
            x_static.copy_(xs[t])
            graph.replay()
            ys.append(y_static.clone())
    assert_rel_close(torch.stack(ys), ys_ref, 5e-5, "y")
    assert_rel_close(state, state_ref, 5e-5, "state")


@pytest.mark.gpu
@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
def test_tier_step_compile_inductor(triton_device):
    """The default backend (Inductor) too: the complex state goes through the copy fallback, the
    float planes are mutated in place by the op. Marked gpu only because Inductor's C++ compile
    takes tens of seconds on the 2-core CI box (it passes there under the interpreter by hand)."""
    for planes in (False, True):
        xs, state, p = make_tier(2, 5, 4, 2, "dplr", 1, 10, 22, triton_device, steps=2)
        s_ref = up(state).clone()
        pp = {k: up(v) for k, v in p.items()}
        y0 = reference.tier_step(up(xs[0]), s_ref, pp, "dplr")
        y1 = reference.tier_step(up(xs[1]) + y0, s_ref, pp, "dplr")
        if planes:
            state = torch.view_as_real(state).clone()
        torch._dynamo.reset()
        ys = torch.compile(two_steps, fullgraph=True)(xs[0], xs[1], state, p, "dplr")
        assert_rel_close(ys, torch.stack([y0, y1]), TOL, "y")
        assert_rel_close(torch.view_as_complex(state) if planes else state, s_ref, TOL, "state")
