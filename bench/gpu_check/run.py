"""The orchestrator of `python -m bench.gpu_check` (see bench/gpu_check/__init__.py).

Runs each stage in its own process group with its own time box (killed at its end), writes
OUT/gpu_check.json and OUT/summary.txt after every stage (the stages themselves write figure by
figure), appends every stage's output to OUT/log.txt, and stops starting stages when the total
budget is spent. Imports no torch itself: a stage that crashes or hangs takes only itself down.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu_check import record

ROOT = Path(__file__).resolve().parents[2]
GPU_BUDGET_S = 480            # 8 minutes on the device, its start not included
DRY_BUDGET_S = 420            # generous: a slow CI machine must not turn the rehearsal red
# stage -> (time box on the GPU, in the dry run), seconds, in the order they run; "bench" gets
# what is left. A stage is the orchestrator's do_<name>, else bench/gpu_check/stages.py's.
BOXES = {"setup": (60, 60), "precompile": (60, 90), "facts": (75, 90), "headline": (200, 150),
         "codec": (40, 60), "tests": (120, 120), "profile": (45, 60), "bench": (None, 90)}
STAGES = tuple(BOXES)
MIN_START_S = 15              # a stage is not started with less left than this
KILL_GRACE_S = 10             # ending a stage at its box takes up to this (SIGTERM, then SIGKILL)
BENCH_ORDER = ("test_cauchy.py", "test_vandermonde.py", "test_embed_interleave.py", "test_steps.py",
               "test_tier_step.py", "test_generation.py", "test_train_step.py", "test_data.py")
TEST_SELECTION = "gpu or interpreter"
DRY_KEEP_TESTS = 6            # the rehearsal collects the whole selection, runs this many of
DRY_KEEP_FROM = "test_embed_interleave.py"     # ... this (quick under the interpreter) file


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description="The one-call GPU check "
                                "(bench/gpu_check/__init__.py).")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                   help="results folder (default: $OUT, else runs/gpu_check)")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: TRITON_INTERPRET=1, tiny sizes")
    p.add_argument("--budget", type=float, help=f"total seconds (default {GPU_BUDGET_S}, {DRY_BUDGET_S} dry)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {','.join(STAGES)}")
    p.add_argument("--wheels", default=str(ROOT / "wheels"), help="wheel folder to install first")
    p.add_argument("--triton-cache", help="TRITON_CACHE_DIR (default: $TRITON_CACHE_DIR, else ~/.triton/cache; "
                   "a temporary one for --dry-run)")
    p.add_argument("--sha", default=os.environ.get("GPU_CHECK_SHA"), help="git commit to record")
    a = p.parse_args(argv)
    a.stages = [s for s in a.stages.split(",") if s]
    if bad := [s for s in a.stages if s not in STAGES]:
        p.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    return a


def _own_group_dies_with_parent() -> None:
    """In the stage's process: its own process group (killed whole at the end of its box), and
    SIGTERM when the orchestrator dies (a device call stopped at its limit leaves no stage running)."""
    os.setsid()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def _cuda_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                       capture_output=True, timeout=120)
    return r.returncode == 0


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=10, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _cubins(path: Path | None) -> int | None:
    """Compiled kernels in a Triton cache dir (one .cubin per kernel x specialisation x config)."""
    if path is None or not path.is_dir():
        return None
    return sum(1 for _ in path.rglob("*.cubin"))


class Runner:
    def __init__(self, a):
        self.a = a
        self.dry = a.dry_run
        self.out = Path(a.out).resolve()
        self.t0 = time.time()
        self.budget = a.budget or (DRY_BUDGET_S if self.dry else GPU_BUDGET_S)
        self.end = self.t0 + self.budget
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.site: Path | None = None
        if a.triton_cache:
            self.cache = Path(a.triton_cache).resolve()
        elif self.dry:      # the rehearsal leaves no compiled kernels behind
            self.cache = self.work / "triton_cache"
        else:
            self.cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
        self.failed: list[str] = []
        self.current: subprocess.Popen | None = None

    # ---------------------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        line = f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        with open(self.out / record.LOG, "a") as f:
            f.write(line + "\n")

    def env(self) -> dict:
        e = dict(os.environ)
        path = [str(ROOT)] + ([str(self.site)] if self.site else [])
        if e.get("PYTHONPATH"):
            path.append(e["PYTHONPATH"])
        e.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", GPU_CHECK_OUT=str(self.out),
                 GPU_CHECK_SHA=self.sha, TRITON_CACHE_DIR=str(self.cache))
        e.setdefault("HYPOTHESIS_PROFILE", "interp")
        for k in ("GPU_CHECK_KEEP", "GPU_CHECK_EXPECT", "GPU_CHECK_KEEP_FROM"):
            e.pop(k, None)
        if self.dry:
            e.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=e.get("OMP_NUM_THREADS", "1"))
        else:
            e.pop("TRITON_INTERPRET", None)
            e.setdefault("TRITON_CACHE_AUTOTUNING", "1")    # autotune once per session, reused by later stages
            e.setdefault("TRITON_PRINT_AUTOTUNING", "1")    # chosen configs and tuning time in log.txt
            e["GPU_CHECK_GPU_FIRST"] = "1"                   # tests: the gpu-marked ones first
        return e

    def box(self, stage: str) -> float:
        cap = BOXES[stage][1 if self.dry else 0]
        left = self.end - time.time() - KILL_GRACE_S
        return left if cap is None else min(cap, left)

    def set_stage(self, stage: str, **kw) -> None:
        record.update(self.out, lambda d: d.setdefault("stages", {}).setdefault(stage, {}).update(kw))

    def run_cmd(self, cmd: list[str], box: float, env: dict | None = None, label: str = "") -> tuple[object, float]:
        """Run cmd in its own process group, output appended to log.txt; kill the group at the
        end of the box. Returns (exit code or 'timeout', seconds)."""
        t0 = time.time()
        with open(self.out / record.LOG, "a") as log:
            log.write(f"\n===== {label or cmd[0]}: {' '.join(cmd)} (box {box:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_own_group_dies_with_parent)
            self.current = proc
            try:
                rc = proc.wait(timeout=max(1.0, box))
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):     # 5 s each to end
                    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=5)
                        break
                rc = "timeout"
            finally:
                self.current = None
        return rc, time.time() - t0

    def on_signal(self, signum, frame):
        """The device call itself is being stopped: end the running stage's process group,
        mark the stage, leave the results as they are."""
        if self.current is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.current.pid, signal.SIGKILL)
        try:
            record.update(self.out, lambda d: d.update(finished_utc=record.now_utc(), exit_code=128 + signum,
                                                       stopped_by=f"signal {signum}"))
        finally:
            os._exit(128 + signum)

    def stage(self, name: str, fn) -> None:
        box = self.box(name)
        if box < MIN_START_S:
            self.set_stage(name, status="skipped", note=f"budget spent ({box:.0f} s left)", box_s=round(box, 1))
            self.say(f"{name}: skipped (budget spent)")
            return
        before = _cubins(self.cache)
        self.set_stage(name, status="running", box_s=round(box, 1), started_s=round(time.time() - self.t0, 1))
        self.say(f"{name}: start (box {box:.0f} s)")
        try:
            status, note = fn(box)
        except Exception as exc:  # noqa: BLE001 - the orchestrator's own bug: report, go on
            status, note = "error", f"{type(exc).__name__}: {exc}"[:300]
        after = _cubins(self.cache)
        for stray in self.out.glob("*.tmp"):      # a write the box's end cut short (<= 8 files return)
            stray.unlink(missing_ok=True)
        wall = time.time() - self.t0 - record.load(self.out)["stages"][name]["started_s"]
        self.set_stage(name, status=status, note=note, wall_s=round(wall, 1),
                       triton_new_cubins=None if after is None else after - (before or 0))
        if status != "ok":
            self.failed.append(name)
        self.say(f"{name}: {status} in {wall:.1f} s" + (f" ({note})" if note else ""))

    @staticmethod
    def _status(rc) -> tuple[str, str]:
        if rc == "timeout":
            return "timeout", "killed at the end of its time box; what finished is recorded"
        return ("ok", "") if rc == 0 else ("failed", f"exit code {rc}")

    # ---------------------------------------------------------------------------- stages
    def do_setup(self, box: float):
        wheels = Path(self.a.wheels)
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        info = dict(folder=str(wheels), wheels=[w.name for w in found], installed_to=None, problems=[])
        if not found:
            info["note"] = ("no wheel folder here: the packages this environment has are used (on the "
                            "GPU machine, fetch them here with python -m bench.gpu_check.wheels and carry 'wheels')")
            record.put(self.out, "setup", None, info)
            return "ok", "no wheels to install"
        from bench.gpu_check import wheels as W
        info["problems"] = W.check(wheels)
        site = self.work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site)]
        if self.dry:   # install for the device's interpreter (its tags), not this one: nothing is imported
            cmd += W.device_flags()
        rc, _ = self.run_cmd(cmd + [str(w) for w in found], box, label="pip install wheels")
        if rc == 0 and not self.dry:
            self.site = site
        info["installed_to"] = str(site) if rc == 0 else None
        info["for"] = f"CPython {W.DEVICE_PYTHON} manylinux x86-64 (dry run: installed, not imported)" if self.dry \
            else f"this interpreter, {sys.version.split()[0]}"
        record.put(self.out, "setup", None, info)
        status, note = self._status(rc)
        if status == "ok" and info["problems"]:
            status, note = "failed", "; ".join(info["problems"])
        return status, note

    def do_precompile(self, box: float):
        """Every kernel x autotune config, compiled for sm_90 into the session's Triton cache by
        scripts/aot_check.py on all cores (the runtime's autotuning compiles one config at a
        time): the later stages' first calls then load cubins instead of running ptxas. Each
        stage's `triton_new_cubins` counts what it still had to compile (cache misses). The
        rehearsal compiles one small op."""
        cmd = [sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--cache-dir", str(self.cache),
               "--jobs", str(os.cpu_count() or 1)] + (["--only", "ssm_step"] if self.dry else [])
        env = self.env()
        env.pop("TRITON_INTERPRET", None)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.cache.mkdir(parents=True, exist_ok=True)
        rc, _ = self.run_cmd(cmd, box, env=env, label="precompile")
        if rc == "timeout":
            return "timeout", "cut at its box: the rest compiles on first use"
        # aot_check's own verdict (spills, static gate) is CI's business; a compile error is not
        return ("ok", "") if rc in (0, 1) and _cubins(self.cache) else ("failed", f"exit code {rc}")

    def _py_stage(self, name: str, box: float):
        deadline = time.time() + box - 5
        cmd = [sys.executable, "-m", "bench.gpu_check.stages", name, "--out", str(self.out),
               "--deadline", f"{deadline:.1f}"] + (["--dry-run"] if self.dry else [])
        rc, _ = self.run_cmd(cmd, box, label=name)
        return self._status(rc)

    def do_tests(self, box: float):
        env = self.env()
        env["GPU_CHECK_SECTION"] = "tests"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu_check.plugin",
               "--device", "cpu" if self.dry else "cuda", "-m", TEST_SELECTION, "--durations=15", "-rf", "tests"]
        if self.dry:
            env.update(GPU_CHECK_KEEP=str(DRY_KEEP_TESTS), GPU_CHECK_KEEP_FROM=DRY_KEEP_FROM)
        record.update(self.out, lambda d: d.setdefault("tests", {}).update(
            selection=f"-m '{TEST_SELECTION}' tests, hypothesis profile {env['HYPOTHESIS_PROFILE']}"
                      + (f", the first {DRY_KEEP_TESTS} of {DRY_KEEP_FROM} run (dry run)" if self.dry else ""),
            command=" ".join(cmd[1:])))
        rc, _ = self.run_cmd(cmd, box, env=env, label="tests")
        if rc == 1:
            return "failed", "some tests failed (tests.failures)"
        return self._status(rc)

    def _bench_files(self) -> list[str]:
        present = sorted(p.name for p in (ROOT / "bench").glob("test_*.py"))
        ordered = [f for f in BENCH_ORDER if f in present]
        return ordered + [f for f in present if f not in ordered]

    def do_bench(self, box: float):
        from bench.gpu_check import ids
        headline = ids.headline_bench_ids()
        files = self._bench_files()
        groups = [files] if self.dry else [[f] for f in files]   # the rehearsal: one pytest, all skip
        missing, statuses = [], []
        for group in groups:
            key = "+".join(group) if len(group) > 1 else group[0]
            left = self.end - time.time() - KILL_GRACE_S
            if left < MIN_START_S:
                record.update(self.out, lambda d, key=key: d.setdefault("bench", {}).setdefault("files", {}).update(
                    {key: dict(status="skipped", reason="budget spent")}))
                continue
            paths = [f"bench/{f}" for f in group]
            expect = [i for i in headline if i.split("::")[0] in paths]
            js = self.work / f"bench_{len(statuses)}.json"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu_check.plugin",
                   "--benchmark-only", f"--benchmark-json={js}", *paths]
            for i in expect:
                cmd += ["--deselect", i]
            env = self.env()
            env.update(GPU_CHECK_SECTION=f"bench:{key}", GPU_CHECK_EXPECT=";".join(expect))
            rc, wall = self.run_cmd(cmd, min(box, left), env=env, label=f"bench {key}")
            n = record.merge_pytest_json(self.out, js) if js.exists() else None
            status = "timeout" if rc == "timeout" else ("ok" if rc in (0, 5) else "failed")
            statuses.append(status)
            file_missing = ((record.load(self.out).get("bench") or {}).get("files", {}).get(key, {})
                            .get("tests", {}).get("missing_ids") or [])
            missing += file_missing
            record.update(self.out, lambda d, key=key, status=status, n=n, wall=wall: d.setdefault("bench", {})
                          .setdefault("files", {}).setdefault(key, {}).update(status=status, benchmarks=n,
                                                                              wall_s=round(wall, 1)))
        record.update(self.out, lambda d: d.setdefault("bench", {}).update(
            missing_ids=missing, deselected=headline))
        if missing:
            return "failed", f"headline ids not collected in bench/: {missing}"
        bad = [s for s in statuses if s != "ok"]
        if bad:
            return ("timeout" if "timeout" in bad else "failed"), f"{len(bad)} of {len(statuses)} bench runs not ok"
        return "ok", ""

    # ---------------------------------------------------------------------------- main
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        for f in record.OUT_FILES:          # a fresh start: never mix two runs' results
            (self.out / f).unlink(missing_ok=True)
        self.sha = self.a.sha or _git_sha()
        skeleton = dict(schema=record.SCHEMA, tool="python -m bench.gpu_check", dry_run=self.dry,
                        argv=sys.argv[1:], started_utc=record.now_utc(), budget_s=self.budget,
                        git_sha=self.sha, out_files=list(record.OUT_FILES), triton_cache=str(self.cache),
                        stages={s: dict(status="pending", box_s=None, wall_s=None, note=None)
                                for s in self.a.stages})
        record.update(self.out, lambda d: d.update(skeleton))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        self.say(f"{'dry run (CPU rehearsal)' if self.dry else 'GPU check'}: budget {self.budget:.0f} s, "
                 f"results in {self.out}")
        if not self.dry and not _cuda_available():
            msg = "no CUDA device here: run the CPU rehearsal with --dry-run"
            record.update(self.out, lambda d: d.update(error=msg, exit_code=2, finished_utc=record.now_utc()))
            print(f"error: {msg}", file=sys.stderr)
            shutil.rmtree(self.work, ignore_errors=True)
            return 2
        for name in self.a.stages:   # the orchestrator's own do_<name>, else a stages.py process
            self.stage(name, getattr(self, f"do_{name}", None) or (lambda box, name=name: self._py_stage(name, box)))
        wall = time.time() - self.t0
        code = 1 if self.failed else 0
        record.update(self.out, lambda d: d.update(finished_utc=record.now_utc(), wall_s=round(wall, 1),
                                                   exit_code=code, failed_stages=self.failed))
        shutil.rmtree(self.work, ignore_errors=True)
        print((self.out / record.SUMMARY).read_text(), flush=True)
        self.say(f"{'dry run' if self.dry else 'GPU check'} finished in {wall:.1f} s wall"
                 + (f"; not ok: {', '.join(self.failed)}" if self.failed else "; every stage ok"))
        return code


def main(argv=None) -> int:
    a = parse_args(argv)
    return Runner(a).run()


if __name__ == "__main__":
    sys.exit(main())
