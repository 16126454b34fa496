#!/usr/bin/env bash
# Idempotent set-up on a fresh machine with Python 3.11+: a virtual environment in .venv with
# the tested versions (constraints.txt) and this package installed editable. Says what it will
# download, and how big, before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sashimi-triton needs Python 3.11 or newer")'
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.sashimi-installed
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # sizes measured for the pinned set on Linux x86-64, Python 3.11 (docs/install.md)
  if ! .venv/bin/python -c 'import torch' 2> /dev/null; then
    echo "== set-up: downloading torch 2.11.0 with its CUDA 13 libraries, triton 3.6.0 and the rest of"
    echo "   constraints.txt: about 2.8 GB (5.0 GB once installed in .venv); a few minutes on a fast line"
    if ! command -v nvidia-smi > /dev/null 2>&1 && ! [ -e /dev/nvidia0 ]; then
      echo "   (no NVIDIA GPU here: a CPU-only torch is about 0.2 GB instead of 2.5 GB, and everything"
      echo "   runs on it; to use it, stop now (Ctrl-C) and see docs/install.md, 'Without a GPU')"
      if [ -t 0 ]; then sleep 10; fi   # at a terminal: time to read that
    fi
  else
    echo "== set-up: .venv holds torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'); installing the rest of constraints.txt"
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
  echo "$want" > "$stamp"
  echo "== set-up done: .venv (du -sh .venv for its size)"
fi
