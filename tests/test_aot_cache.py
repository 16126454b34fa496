"""scripts/aot_check.py keeps each compile's result by the hash of what determines it: a re-run
reuses it, a change to the kernels' sources or the Triton version compiles afresh, and a failed
compile is never kept. The compile itself is replaced here (tests/test_static_gate.py compiles)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="aot_check compiles sm_90 code: not under the interpreter")


@pytest.fixture
def aot(monkeypatch, tmp_path):
    if "aot_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "scripts", "aot_check.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["aot_check"] = mod
        spec.loader.exec_module(mod)
    mod = sys.modules["aot_check"]
    monkeypatch.setattr(mod, "_VARIANTS", ["variant"])
    monkeypatch.setattr(mod, "_SPECS", ['{"signature": "one specialisation"}'])
    monkeypatch.setattr(mod, "_RESULTS_DIR", str(tmp_path))
    return mod


def test_a_result_is_reused_and_an_error_is_not(aot, monkeypatch):
    calls = []

    def compile_variant(v, spec, status="ok"):
        calls.append(spec)
        return dict(status=status, regs=len(calls))

    monkeypatch.setattr(aot, "compile_variant", compile_variant)
    assert aot._worker(0) == (0, dict(status="ok", regs=1))
    assert aot._worker(0) == (0, dict(status="ok", regs=1)) and len(calls) == 1   # kept
    monkeypatch.setattr(aot, "_SPECS", ['{"signature": "another"}'])
    monkeypatch.setattr(aot, "compile_variant", lambda v, spec: compile_variant(v, spec, "ERROR"))
    aot._worker(0)
    aot._worker(0)
    assert len(calls) == 3   # an error is compiled again each time


def test_the_key_follows_the_sources_and_the_triton_version(aot, monkeypatch):
    before = aot.sources_hash()
    assert aot.sources_hash() == before
    monkeypatch.setattr(aot.triton, "__version__", "0.0.0")
    assert aot.sources_hash() != before
    monkeypatch.undo()
    real_open = open

    def edited(path, *a, **k):  # one kernel source one byte longer
        f = real_open(path, *a, **k)
        if path.endswith(os.path.join("kernels", "_step.py")):
            data = f.read() + b" "
            f.close()
            import io
            return io.BytesIO(data)
        return f

    monkeypatch.setattr("builtins.open", edited)
    assert aot.sources_hash() != before
