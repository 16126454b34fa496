"""The one-call GPU check (`python -m bench.gpu_check`): its CPU rehearsal (--dry-run, which
scripts/test.sh runs first and hands over through GPU_CHECK_DRY_RUN_OUT), its time boxes, the
wheels it carries, and its training step against the benchmark's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADLINE_KEYS = {
    "kernels": {f"{op}-{d}-{p}" for op in ("cauchy", "vandermonde") for d in ("fwd", "fwdbwd")
                for p in ("triton", "reference")},
    "train": {f"{c}-{p}" for c in ("mono", "stereo") for p in ("fp32", "bf16")},
    "train_compile": {f"{c}-{p}" for c in ("mono", "stereo") for p in ("fp32", "bf16")},
    "generation": {f"{c}-B{b}-{p}" for c in ("mono", "stereo") for b in (1, 2) for p in ("graphs", "eager")},
    "recurrence": {f"{c}-{s}" for c in ("mono", "stereo") for s in ("dplr", "diag")},
}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    given = os.environ.get("GPU_CHECK_DRY_RUN_OUT")
    if given and (Path(given) / "gpu_check.json").exists():
        return Path(given)
    out = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return out


def _result(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_every_stage_ok(dry_run):
    d = _result(dry_run)
    assert d["dry_run"] is True and d["exit_code"] == 0
    assert list(d["stages"]) == ["setup", "precompile", "facts", "headline", "codec", "tests", "profile",
                                 "bench"]
    codec = d["codec"]["round_trip"]["tiny"]
    assert codec["round_trip"] is True and codec["encode_samples_per_s"] > 0, codec
    for name, st in d["stages"].items():
        assert st["status"] == "ok", (name, st)
        assert st["wall_s"] is not None and st["wall_s"] <= st["box_s"] + 10, (name, st)
    # what the device returns: at most 8 plain files, no folders, plain names
    files = sorted(p.name for p in dry_run.iterdir())
    assert set(files) == {"gpu_check.json", "summary.txt", "bench.json", "log.txt", "profile.txt"}, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    summary = (dry_run / "summary.txt").read_text()
    assert "dry-run" in summary and "measured on an H100" in summary and "selftest: all ops pass" in summary


def test_dry_run_every_field_written(dry_run):
    from bench.gpu_check import stages
    d = _result(dry_run)
    fields = {"kernels": stages.KERNEL_FIELDS, "train": stages.TRAIN_FIELDS, "train_compile": stages.TRAIN_FIELDS,
              "generation": stages.GEN_FIELDS, "recurrence": stages.REC_FIELDS}
    numeric = {"kernels": ("ms_p50", "ms_p20", "ms_p80", "first_call_s", "gflops", "fraction_of_floor"),
               "train": ("ms_p50", "tokens_per_s", "first_call_s", "parameters"),
               "train_compile": ("ms_p50", "tokens_per_s", "first_call_s"),
               "generation": ("ms_p50", "steps_per_s", "samples_per_s", "us_per_step"),
               "recurrence": ("rel_err", "seconds")}
    for section, keys in HEADLINE_KEYS.items():
        got = d["headline"][section]
        assert set(got) == keys, section
        for key, rec in got.items():
            assert set(fields[section]) <= set(rec), (section, key, set(fields[section]) - set(rec))
            if section == "train_compile" and rec["status"] == "skipped":
                assert "dry run" in rec["reason"]
                continue
            assert rec["status"] == "ok", (section, key, rec)
            for f in numeric[section]:
                assert isinstance(rec[f], (int, float)) and rec[f] >= 0, (section, key, f, rec[f])
    assert [k for k, r in d["headline"]["train_compile"].items() if r["status"] == "ok"] == ["stereo-bf16"]
    assert all(r["meets_target"] for r in d["headline"]["recurrence"].values())
    assert d["selftest"]["all_pass"] and len(d["selftest"]["rows"]) >= 6
    assert d["device"]["cpu_count"] and d["versions"]["torch"] and d["ceilings"]["copy_gbps"] > 0
    assert all(v["version"] for k, v in d["versions"]["packages"].items() if k != "matplotlib")
    t = d["tests"]
    assert t["finished"] and t["passed"] == t["selected"] > 0 and t["failed"] == 0 and t["collected"] > t["selected"]
    assert d["bench"]["missing_ids"] == [] and len(d["bench"]["deselected"]) == 20
    assert all(d["profile"][k]["status"] == "ok" and d["profile"][k]["summary"] for k in ("train", "generate"))
    assert "train" in (dry_run / "profile.txt").read_text()


def test_bench_json_feeds_compare(dry_run, tmp_path):
    run = json.loads((dry_run / "bench.json").read_text())
    assert run["machine_info"]["gpu_name"] == "dry-run-cpu"
    names = [b["fullname"] for b in run["benchmarks"]]
    assert len(names) == len(set(names)) == 8 + 4 + 1 + 8
    for b in run["benchmarks"]:
        assert b["extra_info"]["ms_p50"] > 0 and b["stats"]["median"] > 0 and b["extra_info"]["op"]
    base = tmp_path / "baseline.json"
    cmd = [sys.executable, "-m", "bench.compare", str(dry_run / "bench.json"), "--baseline", str(base)]
    r = subprocess.run(cmd + ["--save-baseline"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(cmd + ["--threshold", "100"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


def test_bench_json_feeds_the_report(dry_run, tmp_path):
    """bench.json is what the BENCHMARKS.md generator reads."""
    report = ["-m", "bench.report"] if (ROOT / "bench" / "report.py").exists() else \
        [str(ROOT / "scripts" / "make_benchmarks.py")]
    cmd = [sys.executable, *report, str(dry_run / "bench.json"), "--out", str(tmp_path / "B.md"),
           "--plots-dir", str(tmp_path / "plots")]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "B.md").read_text()
    assert "dry-run-cpu" in text and "tokens/s" in text and "H100" in text


def test_time_box_kills_the_stage_and_its_children(tmp_path):
    from bench.gpu_check import run
    runner = run.Runner(run.parse_args(["--dry-run", "--out", str(tmp_path)]))
    tmp_path.mkdir(exist_ok=True)
    pidfile = tmp_path / "pid"
    code = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.time()
    rc, wall = runner.run_cmd([sys.executable, "-c", code], 2.0, env=_env(), label="sleeper")
    assert rc == "timeout" and wall < 15 and time.time() - t0 < 15
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert "sleeper" in (tmp_path / "log.txt").read_text()


def test_stages_not_started_once_the_budget_is_spent(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path),
                        "--stages", "bench", "--budget", "5"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    d = _result(tmp_path)
    assert d["stages"]["bench"]["status"] == "skipped" and "budget" in d["stages"]["bench"]["note"]
    assert "skipped" in (tmp_path / "summary.txt").read_text()


def test_without_a_gpu_the_real_check_refuses(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry-run" in r.stderr
    assert _result(tmp_path)["exit_code"] == 2


def test_wheels_cover_what_the_device_lacks():
    import tomllib
    from bench.gpu_check import wheels
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {wheels.norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in needed}
    carried = {wheels.norm(n) for n in wheels.WHEELS} | {wheels.norm(n) for n in wheels.DEVICE_HAS}
    assert names <= carried, names - carried
    pins = wheels.pins()
    assert all(wheels.norm(n) in pins for n in wheels.WHEELS)
    flags = wheels.device_flags()
    assert "--only-binary=:all:" in flags and "3.12" in flags


def test_every_import_is_on_the_device_or_carried():
    """A module imported anywhere in the code the GPU check runs is in the standard library,
    this repository, or wheels.MODULES, whose distribution is carried or on the device."""
    import ast
    from bench.gpu_check import wheels
    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()} | \
        {p.stem for p in (ROOT / "tests").glob("*.py")}
    seen: dict[str, str] = {}
    for folder in ("kernels", "sashimi", "bench", "tests", "profiles", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    seen.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    third = {m: p for m, p in seen.items() if m not in sys.stdlib_module_names and m not in local}
    unknown = {m: p for m, p in third.items() if m not in wheels.MODULES}
    assert not unknown, f"add these imports to bench/gpu_check/wheels.py MODULES (and WHEELS): {unknown}"
    available = {wheels.norm(n) for n in wheels.WHEELS + wheels.DEVICE_HAS}
    missing = {m: wheels.MODULES[m] for m in third if wheels.norm(wheels.MODULES[m]) not in available}
    assert not missing, f"neither carried nor on the device: {missing}"


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + \
        "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def test_wheel_check_finds_gaps(tmp_path, monkeypatch):
    from bench.gpu_check import wheels
    monkeypatch.setattr(wheels, "WHEELS", ("soundfile", "cffi"))
    _fake_wheel(tmp_path, "soundfile", "0.14.0", ["cffi>=1.0", "numpy", "colorama; platform_system == \"Windows\""])
    assert wheels.check(tmp_path) == ["missing wheel: cffi",
                                      "soundfile needs cffi: neither carried nor on the device"]
    _fake_wheel(tmp_path, "cffi", "2.1.1", ["pycparser; implementation_name != \"PyPy\"", "pytest; extra == \"test\""])
    assert wheels.check(tmp_path) == ["cffi needs pycparser: neither carried nor on the device"]
    _fake_wheel(tmp_path, "cffi", "2.0.0", [])
    assert any("two versions of cffi" in p for p in wheels.check(tmp_path))


def test_train_step_is_the_benchmarks():
    """gpu_check's step (a config, optionally compiled) is bench/test_train_step.py's (a preset
    and a kernel backend): same loss, same weights after a step."""
    import torch
    from bench import test_train_step
    from bench.gpu_check.stages import make_train_step
    from sashimi.model import PRESETS
    mine, m1, n1 = make_train_step(dict(PRESETS["tiny"], kernel_backend="reference"), 2, 64, 2, "fp32", "cpu")
    theirs, m2, n2 = test_train_step.make_train_step("tiny", 2, 64, 2, "fp32", "cpu", kernel_backend="reference")
    assert n1 == n2
    for _ in range(2):
        assert torch.equal(mine(), theirs())
    for (k1, p1), (k2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2), k1


def test_a_stopped_call_stops_its_stage(tmp_path):
    """SIGTERM to the orchestrator (a device call stopped at its limit): the running stage's
    processes end too, and what was written stays."""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path),
                             "--stages", "facts"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not _stage_pids(tmp_path):
        time.sleep(0.2)
    assert _stage_pids(tmp_path), "the facts stage never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert not _stage_pids(tmp_path)
    d = _result(tmp_path)
    assert d["stopped_by"] == f"signal {int(signal.SIGTERM)}" and d["stages"]["facts"]["status"] == "running"


def _stage_pids(out: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "bench.gpu_check.stages" in cmd and str(out) in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids
