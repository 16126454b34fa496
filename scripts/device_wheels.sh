#!/usr/bin/env bash
# Download (here, with network) the wheels the GPU machine lacks, into wheels/ (git-ignored):
# the device has torch 2.11, triton 3.6, torchaudio 2.11 and pytest, but no network. Carry
# `wheels` (and `.deb` for nsys, see shared/tools/nsys-on-device.md) with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p wheels
pip_dl() {
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d wheels "$@"
}
# pure-Python or manylinux wheels, pinned to what CI tests (constraints.txt)
for pkg in nvtx soundfile cffi pycparser hypothesis sortedcontainers pytest-benchmark py-cpuinfo2 \
           tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil; do
  pin=$(grep -i "^${pkg}==" constraints.txt || true)
  pip_dl "${pin:-$pkg}" || pip_dl "$pkg"
done
ls wheels | wc -l
