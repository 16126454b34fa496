"""The static kernel gate (scripts/aot_check.py, no GPU): a planted extra instruction in a hot
loop, or a planted register spill, must fail it; the committed baseline must cover every op.

The compiles here are real: tiny kernels built for sm_90 with the Triton wheel's ptxas, read back
with its nvdisasm. Not run under TRITON_INTERPRET=1 (aot_check compiles GPU code): the module is
imported lazily so collecting this file under the interpreter changes nothing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="compiles sm_90 code: not under the interpreter")


def _aot():
    if "aot_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "scripts", "aot_check.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["aot_check"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["aot_check"]


@triton.jit
def planted_kernel(x_ptr, out_ptr, N, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n = tl.zeros((), dtype=tl.int32)
    while n < N:
        x = tl.load(x_ptr + n * BLOCK + offs)
        acc = acc * x + 1.0
        if EXTRA:  # the plant: more work per element in the hot loop
            acc = tl.sqrt(acc * 1.0001 + x)
        n += 1
    tl.store(out_ptr + offs, acc)


def _record(tmp_path, monkeypatch, extra: int, block: int, maxnreg: int | None = None) -> dict:
    """Compile the planted kernel for sm_90 and return its static-gate record."""
    aot = _aot()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kern = planted_kernel
    meta = torch.empty(block * 4, device="meta")
    kw = dict(EXTRA=extra, BLOCK=block, num_warps=1)
    if maxnreg:
        kw["maxnreg"] = maxnreg
    from kernels.ops import LaunchConfig
    launch = LaunchConfig("planted", "planted", "planted_kernel", f"EXTRA={extra}", False, kern, kern,
                          (meta, meta, 4), kw, (1, 1, 1))
    res = aot.compile_variant(launch)
    assert res["status"] == "ok", res.get("trace") or res["error"]
    row = dict(status="ok", op="planted", kernel="planted_kernel", config=f"BLOCK={block}",
               scenarios=["planted"], regs=res["regs"], spill_st=res["spill_st"],
               spill_ld=res["spill_ld"], shared=res["shared"], loop=res["loop"],
               loop_instrs=res["loop_instrs"], unit=res["unit"], per_unit=res["per_unit"],
               pruned_everywhere=False)
    return aot.static_records([row])


def test_planted_instruction_in_the_hot_loop_fails(tmp_path, monkeypatch):
    aot = _aot()
    base = _record(tmp_path, monkeypatch, extra=0, block=128)
    planted = _record(tmp_path, monkeypatch, extra=1, block=128)
    (key, b), = base.items()
    assert b["loop"].startswith("loop") and b["loop_instrs"] > 0
    assert planted[key]["per_unit"] > b["per_unit"] * 1.1
    failures, _ = aot.compare(base, planted)
    assert len(failures) == 1 and "hot loop" in failures[0]
    assert aot.compare(base, base) == ([], [])
    from triton import knobs   # the compile check's knobs do not leak into this process
    assert not knobs.compilation.always_compile and not knobs.nvidia.dump_ptxas_log


def test_planted_spill_fails(tmp_path, monkeypatch):
    aot = _aot()
    base = _record(tmp_path, monkeypatch, extra=1, block=128)
    (key, b), = base.items()
    assert b["spill"] == 0
    # 256 live floats per thread under a 32-register cap: ptxas must spill
    spilled = _record(tmp_path, monkeypatch, extra=1, block=8192, maxnreg=32)
    (k2, s), = spilled.items()
    assert s["spill"] > 0
    failures, _ = aot.compare(base, {key: s})
    assert any("spills" in f for f in failures)
    failures, _ = aot.compare({}, {k2: s})          # a new variant that spills fails too
    assert any("spills" in f and "new" in f for f in failures)


def test_sass_loops_finds_the_innermost_loops():
    aot = _aot()
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FADD R2, R2, R3 ;
.L_x_1:
        /*0020*/                   FFMA R4, R4, R5, R6 ;
        /*0030*/                   NOP ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
.L_x_2:
        /*0070*/                   BRA `(.L_x_2);
"""
    instrs, inner = aot.sass_loops(sass)
    assert len(instrs) == 7                    # the NOP is not counted
    assert inner == [(2, 3)]                   # FFMA + BRA; the outer loop and the trap are not


def test_baseline_covers_every_op():
    from kernels.ops import OPS
    with open(os.path.join(ROOT, "bench", "baselines", "sm90_static.json")) as f:
        base = json.load(f)
    assert base["reason"]
    ops = {r["op"] for r in base["records"].values()}
    assert ops == set(OPS)
    assert all(r["per_unit"] for r in base["records"].values() if r["kernel"] in
               {k for spec in OPS.values() for k in spec.hot_loop})


def test_launch_configs_come_from_the_registry():
    """kernels.ops.launch_configs: every autotune config of every launch at the compile cases,
    planned for an H100 through the public assume_gpu hook, which leaves nothing behind."""
    from kernels._utils import gpu_for
    from kernels.ops import launch_configs
    configs = launch_configs("vandermonde")
    assert {c.kernel for c in configs} >= {"_vandermonde_fwd_kernel", "_vandermonde_bwd_kernel"}
    assert all(isinstance(c.grid, tuple) and len(c.grid) == 3 for c in configs)
    # the launcher split the rows over the H100's 132 SMs (4 programs per SM), not the interpreter's 4
    fwd = next(c for c in configs if c.kernel == "_vandermonde_fwd_kernel" and "B=64 N=32 L=16384" in c.case)
    assert fwd.grid[1] > 1
    assert gpu_for(torch.device("cpu")) is None
    spec = _aot().specialise(configs[0])
    assert json.loads(spec)["name"].endswith("_kernel")
