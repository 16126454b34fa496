"""pytest plugin (`-p bench.gpu_check.plugin`): records outcomes into OUT/gpu_check.json as
the tests run, so a run killed at its time box still reports what finished. Environment:
GPU_CHECK_OUT (the folder; without it the plugin does nothing), GPU_CHECK_SECTION ("tests" or
"bench:<file>"), GPU_CHECK_EXPECT (';'-separated node ids that must be collected: the headline's,
which the bench stage deselects), GPU_CHECK_KEEP / GPU_CHECK_KEEP_FROM (run only the first N
selected tests, from node ids containing a string: the rehearsal), GPU_CHECK_GPU_FIRST=1 (the
@pytest.mark.gpu tests first: a time box that ends the run early cuts the property tests).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.gpu_check import record

_OUT = os.environ.get("GPU_CHECK_OUT")
_SECTION = os.environ.get("GPU_CHECK_SECTION", "tests")
_state = dict(passed=0, failed=0, errors=0, skipped=0, xfailed=0, xpassed=0, selected=None, collected=None,
              failures=[], slowest=[], finished=False, exitstatus=None, missing_ids=[])
_last = [0.0]


def _flush(force: bool = False) -> None:
    if not _OUT or (not force and time.time() - _last[0] < 2.0):
        return
    _last[0] = time.time()
    snap = {k: (list(v) if isinstance(v, list) else v) for k, v in _state.items()}
    snap["slowest"] = sorted(snap["slowest"], key=lambda x: -x[1])[:10]
    if _SECTION == "tests":
        record.update(Path(_OUT), lambda d: d.setdefault("tests", {}).update(snap))
    else:
        name = _SECTION.split(":", 1)[1]
        record.update(Path(_OUT), lambda d: d.setdefault("bench", {}).setdefault("files", {}).setdefault(
            name, {}).update(tests=snap))


@pytest.hookimpl(tryfirst=True, specname="pytest_collection_modifyitems")
def _expected_ids(session, config, items):
    expect = [x for x in os.environ.get("GPU_CHECK_EXPECT", "").split(";") if x]
    if expect:
        have = {item.nodeid for item in items}
        _state["missing_ids"] = [x for x in expect if x not in have]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("GPU_CHECK_GPU_FIRST") == "1":
        items.sort(key=lambda it: it.get_closest_marker("gpu") is None)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    keep = os.environ.get("GPU_CHECK_KEEP")
    _state["collected"] = len(session.items)     # matching the selection (marker, -k, files)
    if keep:
        where = os.environ.get("GPU_CHECK_KEEP_FROM", "")
        kept = [it for it in session.items if where in it.nodeid][:int(keep)] or session.items[:int(keep)]
        dropped = [it for it in session.items if it not in kept]
        if dropped:
            session.config.hook.pytest_deselected(items=dropped)
            session.items[:] = kept
    _state["selected"] = len(session.items)
    _flush(force=True)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        if hasattr(report, "wasxfail"):
            _state["xfailed" if report.skipped else "xpassed"] += 1
        elif report.outcome == "passed":
            _state["passed"] += 1
        elif report.outcome == "skipped":
            _state["skipped"] += 1
        else:
            _state["failed" if report.when == "call" else "errors"] += 1
            msg = ""
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None:
                msg = crash.message
            elif report.longrepr is not None:
                msg = str(report.longrepr).strip().splitlines()[-1] if str(report.longrepr).strip() else ""
            _state["failures"].append(dict(nodeid=report.nodeid, when=report.when, message=msg[:500]))
            _flush(force=True)
        if report.when == "call":
            _state["slowest"].append((report.nodeid, round(report.duration, 2)))
            _state["slowest"] = sorted(_state["slowest"], key=lambda x: -x[1])[:10]
    _flush()


def pytest_sessionfinish(session, exitstatus):
    _state["finished"] = True
    _state["exitstatus"] = int(exitstatus)
    _flush(force=True)
