"""`python -m kernels.selftest`: is my install working?

Runs every op on small random inputs on the machine at hand, the Triton path where a GPU (or
the interpreter, TRITON_INTERPRET=1) is there, else the reference path, against the
reference computed in float64 / complex128, forward and gradients, and prints a table:
op, path, max relative error, pass/fail, time. Exit code 1 on any failure.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from kernels import reference
from kernels._utils import interpreting, triton_can_run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().cpu().to(torch.complex128 if a.is_complex() else torch.float64)
    b = b.detach().cpu().to(torch.complex128 if b.is_complex() else torch.float64)
    if not torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all():
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _s4_inputs(g, device, B, N, L):
    """S4-like Cauchy inputs: rfft nodes through the bilinear map, w = dt * Lambda."""
    k = torch.arange(L // 2, dtype=torch.float64)
    omega = torch.exp(-2j * math.pi * k / L)
    z = (2 * (1 - omega) / (1 + omega)).to(torch.complex64)
    dt = torch.exp(torch.empty(B, 1, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    lam = torch.complex(torch.full((B, N), -0.5, dtype=torch.float64), math.pi * torch.arange(N, dtype=torch.float64).expand(B, N))
    w = (dt * lam).to(torch.complex64)
    v = torch.randn(B, N, dtype=torch.complex64, generator=g)
    return v.to(device), z.to(device), w.to(device)


def check_cauchy(device, g):
    import kernels
    v, z, w = _s4_inputs(g, device, 6, 9, 98)
    v.requires_grad_(True)
    w.requires_grad_(True)
    out = kernels.cauchy(v, z, w)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=g).to(device)
    gv, gw = torch.autograd.grad(out, [v, w], dout)
    v64, w64 = v.detach().to(torch.complex128).requires_grad_(True), w.detach().to(torch.complex128).requires_grad_(True)
    ref = reference.cauchy(v64, z.to(torch.complex128), w64)
    rv, rw = torch.autograd.grad(ref, [v64, w64], dout.to(torch.complex128))
    return max(_rel(out, ref), _rel(gv, rv), _rel(gw, rw)), 1e-4


def check_vandermonde(device, g):
    import kernels
    B, N, L = 5, 7, 150
    dt = torch.exp(torch.empty(B, 1).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    x = (dt * torch.complex(torch.full((B, N), -0.5), math.pi * torch.arange(N).float().expand(B, N))).to(device)
    v = torch.randn(B, N, dtype=torch.complex64, generator=g).to(device)
    v.requires_grad_(True)
    x.requires_grad_(True)
    out = kernels.vandermonde(v, x, L)
    dout = torch.randn(out.shape, generator=g).to(device)
    gv, gx = torch.autograd.grad(out, [v, x], dout)
    v64, x64 = v.detach().to(torch.complex128).requires_grad_(True), x.detach().to(torch.complex128).requires_grad_(True)
    ref = reference.vandermonde(v64, x64, L)
    rv, rx = torch.autograd.grad(ref, [v64, x64], dout.double())
    return max(_rel(out, ref), _rel(gv, rv), _rel(gx, rx)), 1e-4


def check_embed_interleave(device, g):
    import kernels
    tokens = torch.randint(0, 37, (3, 11, 2), generator=g).to(device)
    weight = torch.randn(37, 13, generator=g).to(device).requires_grad_(True)
    out = kernels.embed_interleave(tokens, weight, scale=0.5)
    dout = torch.randn(out.shape, generator=g).to(device)
    (gw,) = torch.autograd.grad(out, [weight], dout)
    w64 = weight.detach().double().requires_grad_(True)
    ref = reference.embed_interleave(tokens, w64, scale=0.5)
    (rw,) = torch.autograd.grad(ref, [w64], dout.double())
    exact = 0.0 if torch.equal(out.double(), ref) else _rel(out, ref)
    return max(exact, _rel(gw, rw)), 1e-5


def _step_constants(g, device, H, N, r=None):
    dt = torch.exp(torch.empty(H, 1).uniform_(math.log(1e-2), math.log(1e-1), generator=g))
    lam = torch.complex(torch.full((H, N), -0.5), math.pi * torch.arange(N).float().expand(H, N))
    B = torch.randn(H, N, dtype=torch.complex64, generator=g)
    C = torch.randn(H, N, dtype=torch.complex64, generator=g)
    D = torch.randn(H, generator=g)
    if r is None:
        dA = torch.exp(dt * lam)
        return [t.to(device) for t in (dA, (dA - 1) / lam * B, C, D)]
    P = 0.3 * torch.randn(r, H, N, dtype=torch.complex64, generator=g)
    E = 1 / (2 / dt - lam)
    qep = 2 * (P.conj()[:, None] * (E * P)[None]).sum(-1).real          # (r, r, H): Q_j^* E P_k
    M = torch.linalg.inv(torch.eye(r) + qep.permute(2, 0, 1))              # (H, r, r)
    W = torch.einsum("hkj,jhn->khn", M.to(torch.complex64), P)            # W_k = sum_j M_kj Q_j
    return [t.to(device) for t in (E * (2 / dt + lam), 2 * E * B, C, D, E * P, P, W)]


def _check_step(op_name, device, g, r):
    import kernels
    op = getattr(kernels, op_name)
    ref_op = getattr(reference, op_name)
    Bt, H, N = 2, 5, 7
    consts = _step_constants(g, device, H, N, r)
    state = torch.zeros(Bt, H, N, dtype=torch.complex64, device=device)
    state_ref = torch.zeros(Bt, H, N, dtype=torch.complex128)
    consts64 = [c.cpu().to(torch.complex128 if c.is_complex() else torch.float64) for c in consts]
    err = 0.0
    for _ in range(12):
        u = torch.randn(Bt, H, generator=g)
        y = op(state, u.to(device), *consts)
        y_ref = ref_op(state_ref, u.double(), *consts64)
        err = max(err, _rel(y, y_ref), _rel(state, state_ref))
    return err, 1e-4


def check_ssm_step(device, g):
    return _check_step("ssm_step", device, g, None)


def check_dplr_step(device, g):
    return _check_step("dplr_step", device, g, 1)


def check_tier_step(device, g):
    """Two S4 + FF residual blocks (DPLR, rank 1) stepped 6 times, against complex128."""
    import kernels
    n, Bt, H, N, F = 2, 2, 5, 4, 10
    layers = [_step_constants(g, "cpu", H, N, 1) for _ in range(n)]
    p = {k: torch.stack([lay[i] for lay in layers]) for i, k in enumerate(["dA", "dB", "C", "D", "P", "Q", "W"])}
    rnd = lambda *shape: 0.3 * torch.randn(*shape, generator=g)
    p.update(s4_norm_w=1 + rnd(n, H), s4_norm_b=rnd(n, H), s4_out_w=rnd(n, 2 * H, H), s4_out_b=rnd(n, 2 * H),
             ff_norm_w=1 + rnd(n, H), ff_norm_b=rnd(n, H), ff_w1=rnd(n, F, H), ff_b1=rnd(n, F),
             ff_w2=rnd(n, H, F), ff_b2=rnd(n, H))
    p64 = {k: v.to(torch.complex128 if v.is_complex() else torch.float64) for k, v in p.items()}
    p = {k: v.to(device).contiguous() for k, v in p.items()}
    state = torch.zeros(n, Bt, H, N, dtype=torch.complex64, device=device)
    state_ref = torch.zeros(n, Bt, H, N, dtype=torch.complex128)
    err = 0.0
    for _ in range(6):
        x = torch.randn(Bt, H, generator=g)
        y = kernels.tier_step(x.to(device), state, p, "dplr")
        y_ref = reference.tier_step(x.double(), state_ref, p64, "dplr")
        err = max(err, _rel(y, y_ref), _rel(state, state_ref))
    return err, 1e-4


CHECKS = [("cauchy", check_cauchy), ("vandermonde", check_vandermonde),
          ("embed_interleave", check_embed_interleave), ("ssm_step", check_ssm_step),
          ("dplr_step", check_dplr_step), ("tier_step", check_tier_step)]


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if triton_can_run(device):
        path = "triton" + (" (interpreter)" if device.type == "cpu" and interpreting() else f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    else:
        path = "reference"
        print("no GPU and TRITON_INTERPRET is not set: checking the plain-PyTorch reference path "
              "(run `TRITON_INTERPRET=1 python -m kernels.selftest` to check the Triton code on CPU)")
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)
    rows, failed = [], False
    for name, check in CHECKS:
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        try:
            err, tol = check(device, g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ok = err <= tol
            note = ""
        except Exception as exc:  # report, keep going
            err, tol, ok, note = math.nan, math.nan, False, f"{type(exc).__name__}: {exc}"
        ms = (time.perf_counter() - t0) * 1e3
        failed |= not ok
        rows.append((name, path, err, tol, "pass" if ok else "FAIL", ms, note))
    print(f"{'op':<18} {'path':<26} {'max rel err':>12} {'tol':>8} {'result':>6} {'time ms':>9}")
    for name, p, err, tol, res, ms, note in rows:
        print(f"{name:<18} {p:<26} {err:>12.2e} {tol:>8.0e} {res:>6} {ms:>9.1f}" + (f"  {note}" if note else ""))
    print("all ops pass" if not failed else "SOME OPS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
