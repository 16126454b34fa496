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


def bigger_buffers(state, us, g):
    """The state inside a bigger buffer (B, H + 1, N + 4) at [:, :H, 2:N + 2] and u every other
    column of (steps, B, 2H): (buffer, its state view, the strided u's)."""
    B, H, N = state.shape
    big = torch.randn(B, H + 1, N + 4, generator=g, dtype=torch.complex64).to(state.device)
    big[:, :H, 2:N + 2] = state
    u_big = torch.randn(us.shape[0], B, 2 * H, generator=g).to(state.device)
    u_big[:, :, ::2] = us
    return big, big[:, :H, 2:N + 2], u_big[:, :, ::2]


def check_strided(op, ref_op, state, us, consts, big, view, u_view, strided, tol=TOL):
    """Steps on the state view of `big` with strided u's and constants: the reference's answer,
    updated in place there, nothing outside the view written."""
    ys_ref, state_ref = reference_steps(ref_op, state, us, consts)
    H, N = view.shape[1], view.shape[2]
    outside = big.clone()
    outside[:, :H, 2:N + 2] = 0
    ys = torch.stack([op(view, u, **strided, backend="triton") for u in u_view])
    assert_rel_close(ys, ys_ref, tol, "y")
    assert_rel_close(view, state_ref, tol, "state")
    rest = big.clone()
    rest[:, :H, 2:N + 2] = 0
    assert torch.equal(rest, outside), "the kernel wrote outside the state view"


def check_planes_state(op, ref_op, state, us, consts, tol=TOL):
    """A state carried as float32 planes (B, H, N, 2) is updated in place, as the complex one."""
    ys_ref, state_ref = reference_steps(ref_op, state, us, consts)
    planes = torch.view_as_real(state).clone()
    ptr = planes.data_ptr()
    ys = triton_steps(op, planes, us, consts)
    assert planes.data_ptr() == ptr
    assert_rel_close(ys, ys_ref, tol, "y")
    assert_rel_close(torch.view_as_complex(planes), state_ref, tol, "state")


def check_compiled(two_steps, ref_op, state, us, consts, planes: bool, backend="aot_eager", tol=TOL):
    """torch.compile(fullgraph=True) of two steps through the custom op (fake impl, mutation):
    the reference's outputs, the state (complex, or float planes) updated in place."""
    ys_ref, state_ref = reference_steps(ref_op, state, us, consts)
    if planes:
        state = torch.view_as_real(state).clone()
    torch._dynamo.reset()
    kw = {} if backend is None else dict(backend=backend)
    compiled = torch.compile(two_steps, fullgraph=True, **kw)
    ptr = state.data_ptr()
    ys = compiled(state, us[0], us[1], **consts)
    assert state.data_ptr() == ptr
    assert_rel_close(ys, ys_ref, tol, "y")
    assert_rel_close(torch.view_as_complex(state) if planes else state, state_ref, tol, "state")


def check_parameter_without_grad_mode(op, ref_op, state, us, consts, mode, tol=TOL):
    """Under `mode` (torch.no_grad / torch.inference_mode) a D that requires grad is fine
    (generation passes the layer's parameter)."""
    ys_ref, state_ref = reference_steps(ref_op, state, us, consts)
    consts = dict(consts, D=torch.nn.Parameter(consts["D"]))
    with mode():
        y = op(state, us[0], **consts, backend="triton")
    assert_rel_close(y, ys_ref[0], tol, "y")
    assert_rel_close(state, state_ref, tol, "state")


def check_dispatch(op, ref_op, state, us, consts, backend):
    """backend="reference" (or "auto" without a GPU) runs the reference: in place, the same answer."""
    s2 = state.clone()
    kw = {} if backend == "auto" else dict(backend=backend)
    y = op(state, us[0], **consts, **kw)    # "auto" without a GPU warns once: running the reference
    y2 = ref_op(s2, us[0], **consts)
    assert torch.equal(y, y2) and torch.equal(state, s2)
