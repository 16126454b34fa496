"""scripts/compare_layouts.py, the reproduction of QUALITY.md's layout table, end to end at a toy
size: both runs train (frames gets steps x ratio), are scored, timed, tabled and plotted."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_layouts.py"


def test_compare_layouts_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_layouts", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cmp"
    args = [str(out), "--steps", "4", "--ratio", "1.5", "--val-every", "2", "--val-crops", "2",
            "--eval-seconds", "0.1", "--clips", "2", "--gen-seconds", "0.02"]
    assert mod.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["layouts"]["interleave"]["steps"] == 4 and results["layouts"]["frames"]["steps"] == 6
    for layout in ("interleave", "frames"):
        r = results["layouts"][layout]
        assert 0 < r["eval"]["bits"] < 9 and r["generation"]["frames_per_s"] > 0
        assert [c["step"] for c in r["curve"]][-1] == r["steps"]
    paired = results["paired"]   # both models scored on the same 2 clips
    assert paired["n"] == 2 and 0 <= paired["frames_better"] <= 2 and abs(paired["mean"]) < 9
    table = (out / "table.md").read_text()
    assert "| **held-out NLL" in table and "frames" in table
    # a rerun does not train again
    assert mod.main(args) == 0
    assert (out / "frames.train.log").read_text().count("SaShiMi stereo (frames)") == 1
