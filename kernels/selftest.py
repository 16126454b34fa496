"""`python -m kernels.selftest`: is my install working?

Runs every op of the registry (`kernels.ops.OPS`, its `selftest` shape) on small random inputs on
the machine at hand, the Triton path where a GPU (or the interpreter, TRITON_INTERPRET=1) is
there, else the reference path, against the reference computed in float64 / complex128, forward,
in-place state and gradients (`kernels.ops.check`), and prints a table: op, path, max relative
error, pass/fail, time. Exit code 1 on any failure.
"""
from __future__ import annotations

import math
import sys
import time
import warnings

import torch

from kernels._utils import interpreting, triton_can_run
from kernels.ops import OPS, check


def _path(device: torch.device) -> str:
    if not triton_can_run(device):
        return "reference"
    if device.type == "cuda":
        return f"triton ({torch.cuda.get_device_name()})"
    return "triton (interpreter)" if interpreting() else "triton"


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = _path(device)
    if path == "reference":
        print("no GPU and TRITON_INTERPRET is not set: checking the plain-PyTorch reference path "
              "(run `TRITON_INTERPRET=1 python -m kernels.selftest` to check the Triton code on CPU)")
    warnings.simplefilter("ignore", RuntimeWarning)
    rows, failed = [], False
    for spec in OPS.values():
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        try:
            err = check(spec, spec.selftest, device, g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ok, note = err <= spec.tol, ""
        except Exception as exc:  # report, keep going
            err, ok, note = math.nan, False, f"{type(exc).__name__}: {exc}"
        ms = (time.perf_counter() - t0) * 1e3
        failed |= not ok
        rows.append((spec.name, path, err, spec.tol, "pass" if ok else "FAIL", ms, note))
    print(f"{'op':<18} {'path':<26} {'max rel err':>12} {'tol':>8} {'result':>6} {'time ms':>9}")
    for name, p, err, tol, res, ms, note in rows:
        print(f"{name:<18} {p:<26} {err:>12.2e} {tol:>8.0e} {res:>6} {ms:>9.1f}" + (f"  {note}" if note else ""))
    print("all ops pass" if not failed else "SOME OPS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
