"""The benchmark tooling, on CPU: the regression gate (bench/compare.py), the BENCHMARKS.md
generator (bench/report.py).

Every case starts from tests/data/bench_baseline_sample.json (a hand-written pytest-benchmark
file with invented numbers) and doctors a copy of it.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402
SAMPLE = Path(__file__).resolve().parent / "data" / "bench_baseline_sample.json"
H100 = "NVIDIA H100 80GB HBM3"
CAUCHY_TRITON = "test_bench_cauchy_fwd[triton-B1024-L16384]"


@pytest.fixture
def sample() -> dict:
    return json.loads(SAMPLE.read_text())


@pytest.fixture
def baselines(tmp_path, monkeypatch) -> Path:
    """An empty default baseline folder (bench/baselines is never touched by the tests)."""
    folder = tmp_path / "baselines"
    monkeypatch.setattr(compare, "BASELINE_DIR", folder)
    return folder


def _write(path: Path, run: dict) -> str:
    path.write_text(json.dumps(run))
    return str(path)


def _slow_down(run: dict, name_part: str, factor: float, field: str = "ms_p50") -> dict:
    run = copy.deepcopy(run)
    hits = [b for b in run["benchmarks"] if name_part in b["fullname"]]
    assert len(hits) == 1, name_part
    if field == "ms_p50":
        hits[0]["extra_info"]["ms_p50"] *= factor
    else:
        hits[0]["stats"]["median"] *= factor
    return run


def _compare(tmp_path, baseline: dict, run: dict, *extra: str) -> list[str]:
    return [_write(tmp_path / "run.json", run), "--baseline", _write(tmp_path / "base.json", baseline),
            *extra]


def test_sample_is_a_plausible_run(sample):
    assert compare.gpu_name(sample) == H100
    assert len(sample["benchmarks"]) >= 3
    for b in sample["benchmarks"]:
        assert b["extra_info"]["ms_p50"] > 0 and b["stats"]["median"] > 0
        # the do_bench median is what is compared, not pytest-benchmark's wall clock
        assert compare.median_ms(b) == b["extra_info"]["ms_p50"]


def test_identical_run_passes(tmp_path, sample, capsys):
    assert compare.main(_compare(tmp_path, sample, sample)) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "SLOWER" not in out
    for b in sample["benchmarks"]:
        assert b["name"] in out


def test_planted_20_percent_slowdown_fails_and_names_it(tmp_path, sample, capsys):
    run = _slow_down(sample, CAUCHY_TRITON, 1.20)
    assert compare.main(_compare(tmp_path, sample, run)) == 1
    out = capsys.readouterr().out
    offenders = out.split("FAIL:")[1]
    assert CAUCHY_TRITON in offenders and "1.200" in offenders and "SLOWER" in offenders
    others = [b["name"] for b in sample["benchmarks"] if b["name"] != CAUCHY_TRITON]
    assert not any(name in offenders for name in others)


def test_5_percent_slowdown_passes(tmp_path, sample, capsys):
    run = _slow_down(sample, CAUCHY_TRITON, 1.05)
    assert compare.main(_compare(tmp_path, sample, run)) == 0
    assert "1.050" in capsys.readouterr().out


def test_threshold_flag(tmp_path, sample):
    run = _slow_down(sample, CAUCHY_TRITON, 1.20)
    assert compare.main(_compare(tmp_path, sample, run, "--threshold", "0.25")) == 0
    run = _slow_down(sample, CAUCHY_TRITON, 1.05)
    assert compare.main(_compare(tmp_path, sample, run, "--threshold", "0.02")) == 1


def test_min_delta_ignores_tiny_absolute_slowdowns(tmp_path, sample):
    run = _slow_down(sample, CAUCHY_TRITON, 1.20)          # 0.412 ms -> +0.08 ms
    assert compare.main(_compare(tmp_path, sample, run, "--min-delta-ms", "0.1")) == 0
    assert compare.main(_compare(tmp_path, sample, run, "--min-delta-ms", "0.05")) == 1


def test_exclude(tmp_path, sample, capsys):
    run = _slow_down(sample, CAUCHY_TRITON, 1.5)
    assert compare.main(_compare(tmp_path, sample, run, "--exclude", "test_cauchy.py")) == 0
    assert "test_cauchy.py" not in capsys.readouterr().out


def test_falls_back_to_stats_median_without_ms_p50(tmp_path, sample):
    for b in sample["benchmarks"]:
        del b["extra_info"]["ms_p50"]
    assert compare.median_ms(sample["benchmarks"][0]) == pytest.approx(
        sample["benchmarks"][0]["stats"]["median"] * 1e3)
    run = _slow_down(sample, "train_step", 1.25, field="median")
    assert compare.main(_compare(tmp_path, sample, run)) == 1


def test_faster_is_reported_not_failed(tmp_path, sample, capsys):
    run = _slow_down(sample, CAUCHY_TRITON, 0.5)
    assert compare.main(_compare(tmp_path, sample, run)) == 0
    assert "faster" in capsys.readouterr().out


def test_new_and_missing_benchmarks_are_listed_not_failed(tmp_path, sample, capsys):
    run = copy.deepcopy(sample)
    dropped = run["benchmarks"].pop(2)
    extra = copy.deepcopy(run["benchmarks"][0])
    extra["fullname"] = extra["fullname"].replace("B1024-L16384", "B4096-L4096")
    extra["name"] = extra["name"].replace("B1024-L16384", "B4096-L4096")
    run["benchmarks"].append(extra)
    assert compare.main(_compare(tmp_path, sample, run)) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "::" in line}
    assert rows[compare.bench_key(dropped)].rstrip().endswith("missing")
    assert rows[compare.bench_key(extra)].rstrip().endswith("new")


def test_matches_whatever_folder_pytest_ran_from(tmp_path, sample):
    run = copy.deepcopy(sample)
    for b in run["benchmarks"]:
        b["fullname"] = b["fullname"].replace("bench/", "")       # `cd bench && pytest .`
    run = _slow_down(run, CAUCHY_TRITON, 1.3)
    assert compare.main(_compare(tmp_path, sample, run)) == 1


def test_different_gpu_is_refused(tmp_path, sample, capsys):
    run = copy.deepcopy(sample)
    for b in run["benchmarks"]:
        b["extra_info"]["gpu_name"] = "NVIDIA A100-SXM4-80GB"
    assert compare.main(_compare(tmp_path, sample, run)) == 2
    err = capsys.readouterr().err
    assert "different GPU models" in err and "A100" in err and "H100" in err


def test_gpu_name_from_machine_info(tmp_path, sample, capsys):
    run = copy.deepcopy(sample)
    run["machine_info"]["gpu_name"] = "NVIDIA H200"
    assert compare.gpu_name(run) == "NVIDIA H200"
    assert compare.main(_compare(tmp_path, sample, run)) == 2
    assert "different GPU models" in capsys.readouterr().err


def test_run_mixing_gpus_is_refused(tmp_path, sample, capsys):
    run = copy.deepcopy(sample)
    run["benchmarks"][0]["extra_info"]["gpu_name"] = "NVIDIA A100-SXM4-80GB"
    assert compare.main(_compare(tmp_path, sample, run)) == 2
    assert "several GPU models" in capsys.readouterr().err


def test_missing_baseline_says_how_to_create_one(tmp_path, sample, baselines, capsys):
    run_path = _write(tmp_path / "run.json", sample)
    assert compare.main([run_path]) == 2
    err = capsys.readouterr().err
    assert "nvidia-h100-80gb-hbm3.json" in err and "--save-baseline" in err
    assert not baselines.exists()


def test_save_baseline_then_compare(tmp_path, sample, baselines, capsys):
    run_path = _write(tmp_path / "run.json", sample)
    assert compare.main([run_path, "--save-baseline"]) == 0
    saved = baselines / "nvidia-h100-80gb-hbm3.json"
    assert json.loads(saved.read_text()) == sample
    assert compare.main([run_path]) == 0                      # the default path is found
    slow = _write(tmp_path / "slow.json", _slow_down(sample, "vandermonde", 1.5))
    capsys.readouterr()
    assert compare.main([slow]) == 1
    assert "test_bench_vandermonde_fwd" in capsys.readouterr().out.split("FAIL:")[1]


def test_save_baseline_to_explicit_path(tmp_path, sample):
    target = tmp_path / "deep" / "dir" / "mine.json"
    run_path = _write(tmp_path / "run.json", sample)
    assert compare.main([run_path, "--save-baseline", "--baseline", str(target)]) == 0
    assert json.loads(target.read_text()) == sample


def test_unusable_inputs_exit_2(tmp_path, sample, capsys):
    assert compare.main([str(tmp_path / "nope.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert compare.main([str(tmp_path / "bad.json")]) == 2
    empty = dict(sample, benchmarks=[])
    assert compare.main([_write(tmp_path / "empty.json", empty)]) == 2
    assert "holds no benchmarks" in capsys.readouterr().err
    nogpu = copy.deepcopy(sample)
    for b in nogpu["benchmarks"]:
        del b["extra_info"]["gpu_name"]
    assert compare.main([_write(tmp_path / "nogpu.json", nogpu)]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_slug():
    assert compare.slug(H100) == "nvidia-h100-80gb-hbm3"
    assert compare.slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_command_line_exit_status(tmp_path, sample):
    """`python -m bench.compare` as CI runs it (the module imports no torch: starts fast)."""
    args = _compare(tmp_path, sample, _slow_down(sample, CAUCHY_TRITON, 1.2))
    proc = subprocess.run([sys.executable, "-m", "bench.compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert CAUCHY_TRITON in proc.stdout


# --------------------------------------------------------------------------------------------
# bench/report.py
# --------------------------------------------------------------------------------------------
def _make_benchmarks():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_benchmarks_on_the_sample(tmp_path, capsys):
    mb = _make_benchmarks()
    out = tmp_path / "BENCHMARKS.md"
    assert mb.main([str(SAMPLE), "--out", str(out), "--plots-dir", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    lines = text.splitlines()
    row = lambda *parts: next((ln for ln in lines if all(p in ln for p in parts)), None)  # noqa: E731
    assert H100 in text and "torch 2.11.0+cu130" in text and "triton 3.6.0" in text
    assert "2026-11-25" in text
    cauchy = row("| cauchy | fwd |", "| triton |")
    assert cauchy is not None
    assert "0.412" in cauchy and "17.3" in cauchy and "42.0x" in cauchy     # median, reference, speed-up
    anchors = json.loads((ROOT / "bench" / "anchors.json").read_text())     # the one copy of the anchors
    fig = anchors["kernels"]["cauchy"]["B1024-L16384"]["fwd"]
    assert f"S4 ext {fig['anchor_ms']:g} ms" in cauchy and "1.76x" in cauchy and f"<= {fig['target_ms']:g} ms" in cauchy
    assert "GFLOP/s" in cauchy and "%" in cauchy
    assert row("| vandermonde | fwd |", "S4 ext 0.487 ms") is not None
    assert row("| cauchy |", "| reference |") is None                  # references are a column
    train = row("| paper | B=8 x L=16384 x C=1 |")
    assert train is not None and "2.50 M" in train and "5.41" in train
    assert f"{anchors['train']['anchor_peak_gib']:g} GiB" in train
    assert ">= 3.00 M tokens/s, <= 6 GiB" in train
    gen = row("| paper | mono | 1 | eager |")
    gen_anchor, gen_target = (anchors["generation"][k]["1"] for k in ("anchor_samples_per_s", "target_steps_per_s"))
    assert gen is not None and "557" in gen and f"{gen_anchor:,.0f}" in gen and f">= {gen_target:,.0f} steps/s" in gen
    assert "## Floors (before tuning)" in text and "~0.2-0.27 ms" in text   # the static part
    if not mb.have_matplotlib():
        assert "matplotlib is not installed" in capsys.readouterr().out
        assert not (tmp_path / "plots").exists()


def test_make_benchmarks_rejects_an_empty_run(tmp_path, sample):
    mb = _make_benchmarks()
    path = _write(tmp_path / "empty.json", dict(sample, benchmarks=[]))
    assert mb.main([path, "--out", str(tmp_path / "B.md")]) == 2
    assert not (tmp_path / "B.md").exists()


def test_report_writes_only_between_its_markers(tmp_path, sample):
    mb = _make_benchmarks()
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- bench.report:begin -->\nold\n"
                   "<!-- bench.report:end -->\n\n## Hand-written tail\n")
    assert mb.main([str(SAMPLE), "--out", str(out), "--no-plots"]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written intro\n")
    assert text.rstrip().endswith("## Hand-written tail") and "\nold\n" not in text
    assert "| cauchy | fwd |" in text
    assert mb.replace_section("a", "x", "b") == "a\n\n<!-- x:begin -->\nb\n<!-- x:end -->\n"
