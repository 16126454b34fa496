"""Prefill: the state after a prompt, computed in parallel, is the state token-by-token stepping
leaves, and the steps that follow it give the same outputs (mono and stereo, diag and DPLR,
categorical and DML; prompt lengths that are not multiples of prod(pool), shorter than it,
and longer than l_max)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from sashimi.model import PRESETS, ModelConfig, SaShiMi
from sashimi.prefill import block_ops, prefill, s4_prefill
from sashimi.s4 import S4Layer

from conftest import assert_rel_close

COMBOS = [(ssm, C, head) for ssm in ("dplr", "diag") for C in (1, 2) for head in ("categorical", "dml")]
# (prompt length, scan block): 1 and 7 < prod(pool) = 16; 37 and 203 are not multiples of 16
# (203 > l_max = 64 * C, and block 8 gives several blocks plus a partial one on every tier)
LENGTHS = [(1, 128), (7, 128), (16, 128), (37, 8), (150, 64), (203, 8)]
FOLLOW = 64


def tiny(**kw) -> ModelConfig:
    base = dict(PRESETS["tiny"], seq_len=64, kernel_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def _flat(state) -> list[torch.Tensor]:
    return [s for s in tree_leaves(state) if s is not None]


def _clone(state):
    return tree_map(lambda s: s.clone() if torch.is_tensor(s) else s, state)


def _assert_states_close(actual, expected, tol, name):
    a, e = _flat(actual), _flat(expected)
    assert len(a) == len(e)
    for i, (x, y) in enumerate(zip(a, e)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{name}[{i}]"
        if y.abs().max() == 0:
            assert x.abs().max() == 0, f"{name}[{i}]: expected zeros"
        else:
            assert_rel_close(x, y, tol, f"{name}[{i}]")


def _check_prompts(m: SaShiMi, positions: torch.Tensor, lengths) -> torch.Tensor:
    """One stepped run through `positions` (snapshots of the state after each prompt length L);
    prefill of the first L positions (block size b, for each (L, b) of `lengths`) leaves that
    state and last output, and the FOLLOW steps after it agree. Returns the stepped outputs."""
    state = m.default_state(positions.shape[0])
    outs, snaps = [], {}
    with torch.no_grad():
        for t in range(positions.shape[1]):
            outs.append(m.step(positions[:, t], state, t))
            if t + 1 in {L for L, _ in lengths}:
                snaps[t + 1] = _clone(state)
    outs = torch.stack(outs, 1)
    for L, block in lengths:
        pre_state, last = prefill(m, positions[:, :L], block=block)
        _assert_states_close(pre_state, snaps[L], 1e-5, f"state after {L}")
        assert_rel_close(last, outs[:, L - 1], 1e-4, f"last output, prompt {L}")
        with torch.no_grad():
            follow = torch.stack([m.step(positions[:, t], pre_state, t) for t in range(L, L + FOLLOW)], 1)
        assert_rel_close(follow, outs[:, L: L + FOLLOW], 1e-4, f"the {FOLLOW} steps after a prompt of {L}")
    return outs


@pytest.mark.parametrize("ssm,C,head", COMBOS)
def test_prefill_equals_stepping(ssm, C, head):
    torch.manual_seed(10)
    m = SaShiMi(tiny(ssm=ssm, channels=C, head=head)).eval()
    m.setup_step()
    T_max = max(L for L, _ in LENGTHS)
    tokens = torch.randint(0, 256, (2, T_max + FOLLOW))
    outs = _check_prompts(m, tokens, LENGTHS)
    # every prompt position at once, and a float64 scan
    _, all_out = prefill(m, tokens[:, :37], block=16, return_all=True, dtype=torch.float64)
    assert_rel_close(all_out, outs[:, :37], 1e-4, "return_all")


def _dense_dplr(layer: S4Layer):
    """A_bar and B_bar of the DPLR layer on its full 2N state, dense complex128 (test oracle only)."""
    dt = layer._dt().double()
    lam = layer._Lambda().to(torch.complex128)
    P = torch.view_as_complex(layer.P).to(torch.complex128)[0]
    B = torch.view_as_complex(layer.B).to(torch.complex128)
    lam_f, p_f, b_f = (torch.cat([z, z.conj()], -1) for z in (lam, P, B))
    A = torch.diag_embed(lam_f) - p_f[:, :, None] * p_f.conj()[:, None, :]
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    two = (2 / dt)[:, None, None]
    A_bar = torch.linalg.solve(two * eye - A, two * eye + A)
    B_bar = 2 * torch.linalg.solve(two * eye - A, b_f.unsqueeze(-1)).squeeze(-1)
    return A_bar, B_bar


@pytest.mark.parametrize("ssm", ["diag", "dplr"])
@pytest.mark.parametrize("T,block", [(1, 64), (63, 16), (300, 32)])
def test_s4_state_is_the_closed_form(ssm, T, block):
    """x_T = sum_j A_bar^{T-1-j} B_bar u_j: for S4D the Vandermonde sum dB * sum_j dA^{T-1-j} u_j,
    for DPLR the dense bilinear matrices (complex128, test oracle only)."""
    torch.manual_seed(11)
    layer = S4Layer(8, 16, 64, ssm=ssm, kernel_backend="reference")
    layer.setup_step()
    u = torch.randn(3, 8, T, dtype=torch.float64)
    y, x = s4_prefill(layer, u.float(), block=block)
    k = torch.arange(T - 1, -1, -1, dtype=torch.float64)
    if ssm == "diag":
        s = layer._step
        dA, dB = s["dA"].to(torch.complex128), s["dB"].to(torch.complex128)
        powers = torch.exp(torch.log(dA)[..., None] * k)                      # (H, N, T)
        expected = dB * torch.einsum("hnt,bht->bhn", powers, u.to(torch.complex128))
    else:
        A_bar, B_bar = _dense_dplr(layer)
        xs = torch.zeros(3, 8, A_bar.shape[-1], dtype=torch.complex128)
        for t in range(T):
            xs = torch.einsum("hij,bhj->bhi", A_bar, xs) + B_bar * u[:, :, t, None]
        expected = xs[..., : layer.N]
    assert x.shape == (3, 8, layer.N) and x.dtype == torch.complex64
    assert_rel_close(x, expected, 1e-5, "state")
    # and the outputs are the step's
    state = layer.default_state(3)
    s = layer._step
    from kernels import reference
    ref = []
    for t in range(T):
        if ssm == "diag":
            ref.append(reference.ssm_step(state, u[:, :, t].float(), s["dA"], s["dB"], s["C"], s["D"]))
        else:
            ref.append(reference.dplr_step(state, u[:, :, t].float(), s["dA"], s["dB"], s["C"], s["D"],
                                           s["P"], s["Q"], s["W"]))
    assert_rel_close(y, torch.stack(ref, -1), 1e-5, "outputs")
    assert_rel_close(x, state, 1e-5, "state vs stepping")


def test_block_ops_are_cached_while_the_step_is_unchanged():
    layer = S4Layer(4, 8, 32, ssm="dplr", kernel_backend="reference")
    layer.setup_step()
    a = block_ops(layer, 16)
    assert block_ops(layer, 16) is a and block_ops(layer, 8) is not a
    layer.setup_step()                      # same weights: same factors, no rebuild
    assert block_ops(layer, 16) is a
    with torch.no_grad():
        layer.log_dt.add_(0.1)
    layer.setup_step()
    b = block_ops(layer, 16)
    assert b is not a and not torch.equal(a.transition, b.transition)


def test_prefill_errors():
    m = SaShiMi(tiny()).eval()
    with pytest.raises(RuntimeError, match="setup_step"):
        prefill(m, torch.zeros(1, 5, dtype=torch.long))
    m.setup_step()
    with pytest.raises(ValueError, match="at least one position"):
        prefill(m, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        prefill(m, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        prefill(m, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="block"):
        prefill(m, torch.zeros(1, 5, dtype=torch.long), block=0)


@pytest.mark.gpu
@pytest.mark.parametrize("ssm", ["diag", "dplr"])
def test_prefill_equals_stepping_cuda(ssm):
    """On the GPU, against the Triton step kernels (kernel_backend='auto'); T > l_max = 2048."""
    torch.manual_seed(12)
    m = SaShiMi(ModelConfig(**dict(PRESETS["tiny"], ssm=ssm, channels=2))).cuda().eval()
    m.setup_step()
    T = 4003
    tokens = torch.randint(0, 256, (2, T + FOLLOW), device="cuda")
    state = m.default_state(2)
    with torch.no_grad():
        outs = torch.stack([m.step(tokens[:, t], state, t) for t in range(T + FOLLOW)], 1)
    for block in (64, 256):
        pre_state, last = prefill(m, tokens[:, :T], block=block)
        assert_rel_close(last, outs[:, T - 1], 1e-4, "last output")
        with torch.no_grad():
            follow = torch.stack([m.step(tokens[:, t], pre_state, t) for t in range(T, T + FOLLOW)], 1)
        assert_rel_close(follow, outs[:, T:], 1e-4, "following steps")


@pytest.mark.parametrize("ssm,head", [("dplr", "categorical"), ("diag", "dml")])
def test_prefill_equals_stepping_frames(ssm, head):
    """The frames layout: prefill of T frames (B, T, 2) is the state and output frame-by-frame
    stepping leaves, and the frames that follow agree."""
    torch.manual_seed(11)
    m = SaShiMi(tiny(ssm=ssm, channels=2, head=head, stereo_layout="frames")).eval()
    m.setup_step()
    lengths = [(1, 128), (7, 128), (37, 8), (150, 64)]      # 150 > l_max = 64 frames
    T_max = max(L for L, _ in lengths)
    frames = torch.randint(0, 256, (2, T_max + FOLLOW, 2))
    outs = _check_prompts(m, frames, lengths)
    _, all_out = prefill(m, frames[:, :37], block=16, return_all=True)
    assert_rel_close(all_out, outs[:, :37], 1e-4, "return_all")
    with pytest.raises(ValueError, match=r"\(batch, T, 2\) frames"):
        prefill(m, frames[:, :5, 0])
