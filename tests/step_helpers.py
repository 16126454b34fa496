"""What the recurrent-step tests (ssm_step, dplr_step) share: constants on the device, the
complex128 reference run on a copy, the Triton run, the in-place check, the CUDA-graph replay
and the inference-only check."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_rel_close

TOL = 1e-5  # fp32 kernel vs complex128 reference, relative to the largest |value|
C128, F64 = torch.complex128, torch.float64


def lower(consts: dict, device) -> dict:
    """complex128 / float64 constants -> complex64 / float32 on `device`."""
    return {k: (v.to(torch.complex64) if v.is_complex() else v.float()).to(device) for k, v in consts.items()}


def up(t: torch.Tensor) -> torch.Tensor:
    return t.to(C128 if t.is_complex() else F64).cpu()


def reference_steps(ref_op, state, us, consts):
    """The reference in complex128 on a copy; returns (ys (S, B, H), final state)."""
    s = up(state).clone()
    c = {k: up(v) for k, v in consts.items()}
    ys = torch.stack([ref_op(s, up(u), **c) for u in us])
    return ys, s


def triton_steps(op, state, us, consts):
    return torch.stack([op(state, u, **consts, backend="triton") for u in us])


def check_in_place(op, ref_op, state, us, consts, tol=TOL):
    """y of every step and the final state against the reference; the state updated in place."""
    steps, B, H = us.shape
    ys_ref, state_ref = reference_steps(ref_op, state, us, consts)
    before = state.clone()
    ptr = state.data_ptr()
    ys = triton_steps(op, state, us, consts)
    assert state.data_ptr() == ptr
    assert not torch.equal(state, before), "state was not updated in place"
    assert ys.dtype == torch.float32 and ys.shape == (steps, B, H)
    assert_rel_close(ys, ys_ref, tol, "y")
    assert_rel_close(state, state_ref, tol, "state")


def check_cuda_graph(op, ref_op, state, us, consts, tol=TOL):
    """One step captured in a CUDA graph (after the autotuning warm-up), replayed len(us) times:
    y of every replay and the final state against the reference."""
    ys_ref, state_ref = reference_steps(ref_op, state, us, consts)
    op(state.clone(), us[0], **consts)  # autotune outside the capture
    u_static = us[0].clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = op(state, u_static, **consts)
    ys = []
    for u in us:
        u_static.copy_(u)
        graph.replay()
        ys.append(y_static.clone())
    assert_rel_close(torch.stack(ys), ys_ref, tol, "y")
    assert_rel_close(state, state_ref, tol, "state")


def check_requires_grad_raises(op, state, u, consts, name):
    """With grad mode on, the input `name` requiring grad is an error (inference only)."""
    args = dict(state=state, u=u, **consts)
    args[name] = args[name].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        op(**args, backend="reference")
