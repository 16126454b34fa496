"""The op registry (kernels/ops.py) is the one op list: it covers every public op and every
Triton kernel in kernels/, and what it declares is consistent. Cheap: no kernel runs here
(the self-test runs every op's `selftest` shape through `kernels.ops.check`)."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import kernels
from kernels import ops, reference

KERNELS_DIR = pathlib.Path(kernels.__file__).parent


def _jit_kernels() -> set[str]:
    """Names of the @triton.jit functions that are launched (their names end in _kernel)."""
    names = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


def test_registry_is_the_op_list():
    public = set(kernels.__all__) - {"reference"}
    assert set(ops.OPS) == public
    for name, spec in ops.OPS.items():
        assert spec.name == name
        assert spec.reference is getattr(reference, name)
        assert spec.module.__name__ == f"kernels.{name}"


def test_every_kernel_has_a_hot_loop_or_is_counted_per_iteration():
    declared = {k for spec in ops.OPS.values() for k in spec.hot_loop}
    assert declared <= _jit_kernels()
    # the main kernels of every op are declared (the others are gated per loop iteration)
    for k in ("_cauchy_fwd_kernel", "_cauchy_bwd_kernel", "_vandermonde_fwd_kernel",
              "_vandermonde_bwd_kernel", "_step_fwd_kernel", "_tier_step_fwd_kernel"):
        assert k in declared


@pytest.mark.parametrize("name", list(ops.OPS))
def test_inputs_run_the_reference(name):
    """Each factory's arguments fit its reference at the selftest shape."""
    spec = ops.OPS[name]
    args = spec.inputs(dict(spec.selftest), torch.Generator().manual_seed(0))
    out = spec.reference(*args)
    assert torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all()
    if spec.state is not None:
        assert args[spec.state].is_complex()


def test_anchors_and_targets_name_bench_shapes():
    """bench/anchors.json's kernel figures are at shapes of the registry's bench tables."""
    import json
    from pathlib import Path
    kernels = json.loads((Path(__file__).resolve().parents[1] / "bench" / "anchors.json").read_text())["kernels"]
    for name, shapes in kernels.items():
        spec = ops.OPS[name]
        for shape, directions in shapes.items():
            for direction, figures in directions.items():
                assert direction in ("fwd", "bwd", "fwdbwd") and shape in spec.bench
                assert figures["anchor_ms"] > 0 and all(ms > 0 for ms in figures.values())
                assert spec.work(spec.bench[shape], direction)[1] > 0


def test_dplr_step_factors_rank1_matches_the_closed_form():
    """Rank 1 with Q = P (the S4 case): W = P / (1 + Q^* E P), a real scalar per channel."""
    p = ops.step_system(4, 6, 1, generator=torch.Generator().manual_seed(1))
    sys_ = ops.step_system(4, 6, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p["W"], sys_["W"])
    E_P, Q = p["P"], p["Q"]
    qep = 2 * (Q.conj() * E_P).sum(-1).real
    torch.testing.assert_close(p["W"], Q / (1 + qep)[..., None], rtol=1e-12, atol=1e-12)
