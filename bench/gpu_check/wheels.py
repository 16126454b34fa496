"""The wheels the GPU machine needs, fetched here in one command (it has no network):

    python -m bench.gpu_check.wheels [--dest wheels] [--python-version 3.12] [--check]

The device image (torch 2.11, triton 3.6, torchaudio 2.11, Python 3.12) lacks soundfile (with
cffi, pycparser), soxr (the data pipeline's resampler), nvtx and constriction (the test stage
imports it); hypothesis and pytest-benchmark (with py-cpuinfo2) travel pinned, since the
derandomised hypothesis profile and the benchmark JSON depend on their versions; pytest-xdist
(with execnet) travels because the dev extra names it; numba (with llvmlite) runs the codec's
adaptive predictor. Versions come from constraints.txt. Carry the folder
with the device call; `python -m bench.gpu_check` installs it first (pip --target, no network).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICE_PYTHON = "3.12"
# distribution names as in constraints.txt
WHEELS = ("soundfile", "cffi", "pycparser", "soxr", "nvtx", "constriction", "hypothesis", "sortedcontainers",
          "pytest-benchmark", "py-cpuinfo2", "pytest-xdist", "execnet", "numba", "llvmlite")
# on the device image already (KINDS.md, 2026-11-17), in versions that do for this package
DEVICE_HAS = ("torch", "torchaudio", "triton", "numpy", "tqdm", "pytest", "pluggy", "iniconfig",
              "packaging", "matplotlib", "typing-extensions", "filelock", "sympy", "networkx", "jinja2",
              "fsspec", "pillow", "py-cpuinfo", "pygments", "attrs")
# import name -> distribution, for every third-party module the code imports (tests check that
# each import in kernels/, sashimi/, bench/, tests/, profiles/, scripts/ is listed here and is
# either carried or on the device)
MODULES = {"torch": "torch", "torchaudio": "torchaudio", "triton": "triton", "numpy": "numpy",
           "soundfile": "soundfile", "soxr": "soxr", "nvtx": "nvtx", "constriction": "constriction", "tqdm": "tqdm",
           "hypothesis": "hypothesis", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
           "cpuinfo": "py-cpuinfo2", "matplotlib": "matplotlib", "numba": "numba"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    out = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[norm(name)] = ver.strip()
    return out


def device_flags(python_version: str = DEVICE_PYTHON) -> list[str]:
    """pip flags that select wheels for the device's interpreter (CPython, manylinux x86-64)."""
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def requirements(wheel: Path) -> tuple[str, list[str]]:
    """(distribution name, unconditional Requires-Dist names) of a wheel file."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    name = re.search(r"^Name:\s*(\S+)", text, re.M).group(1)
    reqs = []
    for line in re.findall(r"^Requires-Dist:\s*(.+)$", text, re.M):
        if "extra ==" in line or "extra==" in line:
            continue
        marker = line.split(";", 1)[1] if ";" in line else ""
        if "platform_system == \"Windows\"" in marker or "python_version < \"3" in marker \
                or "implementation_name == \"pypy\"" in marker.lower():
            continue
        reqs.append(norm(re.match(r"[A-Za-z0-9_.\-]+", line).group(0)))
    return norm(name), reqs


def check(folder: Path) -> list[str]:
    """Problems with a wheel folder: a needed wheel missing, two versions of one, a requirement
    that is neither carried nor on the device image."""
    wheels = sorted(Path(folder).glob("*.whl"))
    have: dict[str, list[str]] = {}
    reqs: dict[str, list[str]] = {}
    for w in wheels:
        name, r = requirements(w)
        have.setdefault(name, []).append(w.name)
        reqs[name] = r
    problems = [f"missing wheel: {n}" for n in map(norm, WHEELS) if n not in have]
    problems += [f"two versions of {n}: {v}" for n, v in have.items() if len(v) > 1]
    ok = set(have) | {norm(n) for n in DEVICE_HAS}
    for name, r in reqs.items():
        problems += [f"{name} needs {x}: neither carried nor on the device" for x in r if x not in ok]
    return problems


def fetch(dest: Path, python_version: str = DEVICE_PYTHON, python: str = sys.executable) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    pinned = pins()
    for name in WHEELS:
        spec = f"{name}=={pinned[norm(name)]}" if norm(name) in pinned else name
        cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", *device_flags(python_version),
               "-d", str(dest), spec]
        print("+", " ".join(cmd[3:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"error: could not download {spec}", file=sys.stderr)
            return 1
    problems = check(dest)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest}"
          + (" (carry it with the device call)" if not problems else ""))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check.wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(ROOT / "wheels"))
    p.add_argument("--python-version", default=DEVICE_PYTHON)
    p.add_argument("--check", action="store_true", help="only check the folder")
    a = p.parse_args(argv)
    if a.check:
        problems = check(Path(a.dest))
        print("\n".join(problems) or "ok")
        return 1 if problems else 0
    return fetch(Path(a.dest), a.python_version)


if __name__ == "__main__":
    sys.exit(main())
