"""The op registry: every op of this package declared once.

`OPS` (name -> `OpSpec`) is the one list of ops. Everything that iterates over the ops reads it:
`python -m kernels.selftest` (the `selftest` shapes, through `check`), `scripts/aot_check.py`
and its static gate (`launch_configs`, `hot_loop`), the benchmark suites in bench/ (`bench`
shapes, `work`) and the tests (`tests/test_ops.py` checks that the registry covers every public
op and every kernel). What a new op takes: CONTRIBUTING.md.

The input factories (S4-like Cauchy inputs, S4D Vandermonde inputs, stable step systems) live
here too, so tests, self-test and benchmarks build their inputs the same way. They work in
float64 / complex128 on the CPU; `lower` rounds once to what the Triton path takes.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from kernels import reference

C128, F64 = torch.complex128, torch.float64


# ----------------------------------------------------------------------------------------------
# input factories
# ----------------------------------------------------------------------------------------------

def _log_uniform(shape, lo: float, hi: float, generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=F64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _complex_normal(shape, generator) -> torch.Tensor:
    re, im = (torch.randn(shape, generator=generator, dtype=F64) for _ in "ri")
    return torch.complex(re, im) / math.sqrt(2)


def s4d_lin(N: int) -> torch.Tensor:
    """S4D-Lin eigenvalues Lambda_n = -1/2 + i pi n, complex128 (N,)."""
    n = torch.arange(N, dtype=F64)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n)


def s4_like_inputs(H: int, N: int, L: int, *, sums: int | None = None, dt_min: float = 1e-3,
                   dt_max: float = 1e-1, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.complex64):
    """The inputs S4 gives its Cauchy kernel, for a sequence of length L.

    z = 2 (1 - Omega) / (1 + Omega), Omega = exp(-2 pi i k / L), k = 0..L//2 (L//2 + 1 nodes on
    the imaginary axis, formed in float64; the last one, Omega = -1, is ~1e16); w = dt Lambda with
    Lambda_n = -1/2 + i pi n (S4D-Lin) and dt log-uniform in [dt_min, dt_max] per channel;
    v complex normal. Returns (v, z, w): v (sums, H, N) if sums else (H, N), w (H, N).
    """
    g = generator
    k = torch.arange(L // 2 + 1, dtype=F64)
    omega = torch.polar(torch.ones_like(k), -2 * math.pi * k / L)
    z = 2 * (1 - omega) / (1 + omega)
    w = _log_uniform((H, 1), dt_min, dt_max, g) * s4d_lin(N)
    v = _complex_normal((H, N) if sums is None else (sums, H, N), g)
    return tuple(t.to(device=device, dtype=dtype) for t in (v, z, w))


def make_s4d_inputs(batch, N: int, init: str = "lin", *, generator: torch.Generator | None = None,
                    device=None, dtype: torch.dtype = torch.complex64,
                    dt_min: float = 1e-3, dt_max: float = 1e-1):
    """S4D-like (v, x) of shape (*batch, N) as the diagonal S4 layer builds them (ZOH):

        A_n = -1/2 + i Im(A_n)   (S4D-Lin: Im = pi n;  S4D-Inv: Im = N/pi (N/(2n+1) - 1))
        dt ~ log-uniform [dt_min, dt_max] per row,  x = dt A,  B = 1,
        v = C B (exp(x) - 1) / A,  C ~ standard complex normal.

    Computed in complex128 and rounded once to `dtype` (the kernel and a complex128 reference
    then see the same numbers). Seeded by `generator` (CPU generator; tensors moved to `device`).
    """
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    if init not in ("lin", "inv"):
        raise ValueError(f"make_s4d_inputs: init must be 'lin' or 'inv', got {init!r}")
    n = torch.arange(N, dtype=F64)
    A = s4d_lin(N) if init == "lin" else torch.complex(torch.full_like(n, -0.5),
                                                       N / math.pi * (N / (2 * n + 1) - 1))
    x = _log_uniform(batch + (1,), dt_min, dt_max, generator) * A
    C = _complex_normal(batch + (N,), generator)
    v = C * (torch.exp(x) - 1) / A
    return v.to(dtype).to(device), x.to(dtype).to(device)


def step_system(H: int, N: int, r: int = 0, *, generator=None, layers: tuple = (),
                q_equals_p: bool = True, p_scale: float = 1.0) -> dict:
    """A stable S4-like system, complex128: dt in [0.01, 0.1] per channel, Lambda S4D-Lin, B, C
    complex normal, D normal; for r >= 1 also P (normalised to |P_k| = sqrt(N) p_scale) and Q
    (= P, or P plus a small perturbation of norm 0.2 / (r sqrt(N)): A + A^* <= -0.2 stays
    contractive). Leading `layers` dims stack independent systems. Returns the step factors
    (kernels.reference.diag_step_factors / dplr_step_factors) plus C and D."""
    g, lead = generator, tuple(layers)
    dt = 0.01 + 0.09 * torch.rand(lead + (H, 1), generator=g, dtype=F64)
    lam = s4d_lin(N).expand(lead + (H, N))
    Bc = torch.randn(lead + (H, N), generator=g, dtype=C128)
    C = torch.randn(lead + (H, N), generator=g, dtype=C128)
    D = torch.randn(lead + (H,), generator=g, dtype=F64)
    if r == 0:
        return dict(reference.diag_step_factors(dt, lam, Bc), C=C, D=D)

    def low_rank(norm):
        X = torch.randn(lead + (r, H, N), generator=g, dtype=C128)
        return X / X.abs().pow(2).sum(-1, keepdim=True).sqrt() * norm

    P = low_rank(math.sqrt(N) * p_scale)
    Q = P if q_equals_p else P + low_rank(0.2 / (r * math.sqrt(N)))
    f = reference.dplr_step_factors(dt, lam, Bc, P, Q)
    return dict(dA=f["dA"], dB=f["dB"], C=C, D=D, P=f["P"], Q=f["Q"], W=f["W"])


def tier_weights(n: int, H: int, F: int, *, generator=None, scale: float = 0.1) -> dict:
    """Stacked LayerNorm / Linear weights of a tier of n [S4 block, FF block] layers (float64):
    norms 1 + scale N(0, 1), biases scale N(0, 1), matrices N(0, 1/fan_in); F = 0: no FF block."""
    def rnd(*shape, std=scale, shift=0.0):
        return shift + std * torch.randn(*shape, generator=generator, dtype=F64)

    p = dict(s4_norm_w=rnd(n, H, shift=1.0), s4_norm_b=rnd(n, H),
             s4_out_w=rnd(n, 2 * H, H, std=H ** -0.5), s4_out_b=rnd(n, 2 * H))
    if F:
        p.update(ff_norm_w=rnd(n, H, shift=1.0), ff_norm_b=rnd(n, H),
                 ff_w1=rnd(n, F, H, std=H ** -0.5), ff_b1=rnd(n, F),
                 ff_w2=rnd(n, H, F, std=F ** -0.5), ff_b2=rnd(n, H))
    return p


def tier_params(n: int, H: int, N: int, F: int, r: int = 0, *, generator=None) -> dict:
    """Stacked parameters of a tier (kernels.tier_step): step factors and weights, complex128 /
    float64."""
    p = step_system(H, N, r, generator=generator, layers=(n,))
    return dict(p, **tier_weights(n, H, F, generator=generator))


def lower(t, device=None):
    """complex128 -> complex64, float64 -> float32 (integers unchanged), on `device`; recursive
    over dicts, lists and tuples; anything else is returned as it is."""
    if isinstance(t, dict):
        return {k: lower(v, device) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(lower(v, device) for v in t)
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_complex():
        t = t.to(torch.complex64)
    elif t.is_floating_point():
        t = t.float()
    return t.to(device).contiguous() if device is not None else t.contiguous()


# ----------------------------------------------------------------------------------------------
# the declaration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HotLoop:
    """What one iteration of a kernel's hot loop does, for the static gate (scripts/aot_check.py).

    unit: the unit of work ("term", "state element", ...); per_iteration(kw) -> units of work
    one iteration of the hot loop does for the whole program (kw: the launch's constexprs,
    heuristics and config, num_warps included); loop: which innermost loop (0 = the first in
    the SASS; None = the whole kernel, for loop-free kernels); whole(kw): the units of the whole
    program, counted instead when the kernel compiles to no such loop (a constexpr loop unrolled)."""
    unit: str
    per_iteration: Callable[[dict], float]
    loop: int | None = 0
    whole: Callable[[dict], float] | None = None


@dataclass(frozen=True)
class OpSpec:
    """One op. `inputs(shape, generator)` returns the positional arguments of both `fn` and
    `reference` in float64 / complex128 on the CPU; `grads`: indices of the differentiable
    arguments; `state`: index of an argument updated in place, `drive`: index of the argument
    drawn afresh each of `shape["steps"]` calls (recurrent ops). Shapes: dicts; `selftest` runs
    on every machine, `bench` (name -> shape) on the GPU. `work(shape, direction)` -> (flops,
    bytes) at the floor (the public figures at the bench shapes: bench/anchors.json)."""
    name: str
    fn: Callable
    reference: Callable
    inputs: Callable[[dict, torch.Generator], list]
    tol: float
    selftest: dict
    grads: tuple = ()
    state: int | None = None
    drive: int | None = None
    bench: dict = field(default_factory=dict)
    work: Callable[[dict, str], tuple] | None = None
    compile_cases: Callable[[], Iterable] | None = None
    hot_loop: dict = field(default_factory=dict)

    @property
    def module(self):
        """kernels/<name>.py (kernels.<name> itself is the public function)."""
        return importlib.import_module(f"kernels.{self.name}")


def _cauchy_inputs(s, g):
    v, z, w = s4_like_inputs(s["H"], s["N"], 2 * s["L"], sums=s.get("sums"), generator=g,
                             dtype=C128)
    return [v, z[:s["L"]].contiguous(), w]     # the first L nodes (Nyquist excluded, as S4 does)


def _vandermonde_inputs(s, g):
    v, x = make_s4d_inputs((s["B"],), s["N"], generator=g, dtype=C128)
    return [v, x, s["L"]]


def _embed_inputs(s, g):
    tokens = torch.randint(0, s["V"], (s["B"], s["L"], s["C"]), generator=g)
    return [tokens, torch.randn(s["V"], s["D"], generator=g, dtype=F64), s.get("scale", 1.0)]


def _embed_frames_inputs(s, g):
    tokens = torch.randint(0, s["V"], (s["B"], s["L"], s["C"]), generator=g)
    return [tokens, torch.randn(s["C"], s["V"], s["D"], generator=g, dtype=F64), s.get("scale", 1.0)]


def _step_inputs(s, g):
    p = step_system(s["H"], s["N"], s.get("r", 0), generator=g)
    state = torch.zeros(s["B"], s["H"], s["N"], dtype=C128)
    args = [state, torch.zeros(s["B"], s["H"], dtype=F64), p["dA"], p["dB"], p["C"], p["D"]]
    return args + ([p["P"], p["Q"], p["W"]] if s.get("r", 0) else [])


def _tier_inputs(s, g):
    p = tier_params(s["n"], s["H"], s["N"], s.get("F", 0), s.get("r", 0), generator=g)
    state = torch.zeros(s["n"], s["B"], s["H"], s["N"], dtype=C128)
    return [torch.zeros(s["B"], s["H"], dtype=F64), state, p, "dplr" if s.get("r", 0) else "diag"]


def _pair_work(flops_fwd: int, flops_bwd: int):
    def work(s, direction):
        terms = s["B"] * s["N"] * s["L"]
        flops = terms * (flops_fwd + (flops_bwd if direction == "fwdbwd" else 0))
        return flops, (8 if direction == "fwd" else 16) * s["B"] * s["L"]
    return work


def _step_work(s, direction):
    """Bytes at the floor: the state read and written, the per-channel constants (dA, dB, C and
    P, Q, W per rank) once, u read and y written."""
    B, H, N, r = s["B"], s["H"], s["N"], s.get("r", 0)
    return None, 2 * B * H * N * 8 + (3 + 3 * r) * H * N * 8 + H * 4 + 2 * B * H * 4


def _threads(kw) -> int:
    return 32 * kw.get("num_warps", 4)


# The public S4's benchmark shapes: B rows = 4 Woodbury sums x H channels, N = 32 pairs.
# The last shape of each table is the --bench-size small one.
_PAIR_SHAPES = {f"B{B}-L{L}": dict(B=B, N=32, L=L)
                for B, L in [(1024, 16384), (256, 16384), (1024, 65536), (4096, 4096)]}
_CAUCHY_SHAPES = dict(_PAIR_SHAPES, **{"B256-L4096": dict(B=256, N=32, L=4096)})
_VANDERMONDE_SHAPES = dict(_PAIR_SHAPES, **{"B64-L4096": dict(B=64, N=32, L=4096)})
_STEP_SHAPES = {f"B{B}": dict(B=B, H=256, N=32) for B in (1, 16, 256)}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _cases_cauchy():
    c = OPS["cauchy"].module
    N = 32
    for name, vshape, wshape, nodes in [
        ("bench 1024x32, L=16384", (1024, N), (1024, N), 16384 // 2 + 1),
        ("anchor 1024x32, L=65536", (1024, N), (1024, N), 65536 // 2 + 1),
        ("S4 dplr v(4,256,32) w(256,32), L=16384", (4, 256, N), (256, N), 16384 // 2),
    ]:
        v, w, z = _meta(*vshape, 2), _meta(*wshape, 2), _meta(nodes, 2)
        batch = torch.broadcast_shapes(vshape[:-1], wshape[:-1])
        yield f"cauchy fwd {name}", lambda v=v, z=z, w=w: c.cauchy_fwd(v, z, w)
        g = _meta(*batch, nodes, 2)
        yield f"cauchy bwd {name}", lambda g=g, v=v, z=z, w=w: c.cauchy_bwd(g, v, z, w)


def _cases_vandermonde():
    vm = OPS["vandermonde"].module
    # paper / anchor sizes, then N that is not a multiple of the n-block (EVEN_N = False), wider
    # than one n-block (SINGLE_N = False) and the widest block (64), as the GPU tests use them
    for B, N, L in [(1024, 32, 16384), (1024, 32, 65536), (64, 32, 16384), (256, 32, 16384),
                    (16, 17, 5000), (16, 64, 65536), (16, 100, 4096)]:
        v, x = _meta(B, N, 2), _meta(B, N, 2)
        yield f"vandermonde fwd B={B} N={N} L={L}", lambda v=v, x=x, L=L: vm.vandermonde_fwd(v, x, L)
        g = _meta(B, L)
        yield f"vandermonde bwd B={B} N={N} L={L}", lambda g=g, v=v, x=x, L=L: vm.vandermonde_bwd(g, v, x, L)


def _cases_embed():
    e = OPS["embed_interleave"].module
    B, L, C, D = 16, 64000, 2, 64
    tokens = _meta(B, L + 1, C, dtype=torch.int64)[:, :L]   # the trainer's batch[:, :L] view
    for V in (256, 65536):
        for wdt in (torch.float32, torch.bfloat16):
            w = _meta(V, D, dtype=wdt)
            for odt in (torch.float32, torch.bfloat16):
                yield (f"embed fwd V={V} w={str(wdt)[6:]} out={str(odt)[6:]}",
                       lambda w=w, odt=odt: e.embed_interleave_fwd(tokens, w, 8.0, odt))
            for gdt in (torch.float32, torch.bfloat16):
                g = _meta(B, L * C, D, dtype=gdt)
                for det in (False, True):
                    yield (f"embed bwd V={V} w={str(wdt)[6:]} grad={str(gdt)[6:]} det={det}",
                           lambda g=g, V=V, wdt=wdt, det=det:
                           e.embed_interleave_bwd(g, tokens, V, wdt, 8.0, det))
    # the other token dtypes the public API takes (uint8 needs other=-1 to fit the dtype)
    w, g = _meta(256, D), _meta(B, L * C, D, dtype=torch.bfloat16)
    for tdt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        tok = _meta(B, L, C, dtype=tdt)
        yield (f"embed fwd V=256 tokens={str(tdt)[6:]}",
               lambda tok=tok: e.embed_interleave_fwd(tok, w, 8.0, torch.bfloat16))
        for V in (256, 65536):
            for det in (False, True):
                yield (f"embed bwd V={V} tokens={str(tdt)[6:]} det={det}",
                       lambda tok=tok, V=V, det=det: e.embed_interleave_bwd(g, tok, V, torch.float32, 8.0, det))


def _cases_embed_frames():
    f = OPS["embed_frames"].module
    # the bench shape: the interleave anchor's audio (B=16, L=64000, C=2) at one position per frame
    B, L, C, D = 16, 32000, 2, 64

    def view(c):   # the trainer's batch[:, :L] of a (B, L+1, c) batch
        return _meta(B, L + 1, c, dtype=torch.int64)[:, :L]

    tokens = view(C)
    for V in (256, 65536):
        for wdt in (torch.float32, torch.bfloat16):
            w = _meta(C, V, D, dtype=wdt)
            for odt in (torch.float32, torch.bfloat16):
                yield (f"frames fwd V={V} w={str(wdt)[6:]} out={str(odt)[6:]}",
                       lambda w=w, odt=odt: f.embed_frames_fwd(tokens, w, 8.0, odt))
    for c in (1, 3):      # C is a constexpr: one compile per channel count
        yield (f"frames fwd V=256 C={c}",
               lambda c=c: f.embed_frames_fwd(view(c), _meta(c, 256, D), 8.0, torch.bfloat16))
    w = _meta(C, 256, D)
    for tdt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        tok = _meta(B, L, C, dtype=tdt)
        yield (f"frames fwd V=256 tokens={str(tdt)[6:]}",
               lambda tok=tok: f.embed_frames_fwd(tok, w, 8.0, torch.bfloat16))
    # the backward launches embed_interleave's kernels, per channel: on views of the tokens
    # (check=True; channel 1's view starts 8 bytes in) or on the masked int64 copy (check=False)
    g = _meta(B, L, D, dtype=torch.bfloat16)
    for V in (256, 65536):
        for det in (False, True):
            for mask in (False, True):
                yield (f"frames bwd V={V} det={det} mask_invalid={mask}",
                       lambda V=V, det=det, mask=mask:
                       f.embed_frames_bwd(g, tokens, V, torch.float32, 8.0, det, mask))


def _step_call(launcher, B, H, N, r):
    m = _meta
    pqw = [m(r, H, N, 2) for _ in range(3)] if r else []
    return lambda: launcher(m(B, H, N, 2), m(B, H), m(H, N, 2), m(H, N, 2), m(H, N, 2), m(H), *pqw)


def _cases_ssm_step():
    s = OPS["ssm_step"].module
    for B in (1, 256, 1024):
        yield f"ssm_step B={B} H=256 N=32", _step_call(s.ssm_step_fwd, B, 256, 32, 0)


def _cases_dplr_step():
    d = OPS["dplr_step"].module
    for B, H, r in [(1, 256, 1), (256, 256, 1), (1024, 256, 1), (2, 64, 2)]:  # r = 2: a GPU test
        yield f"dplr_step B={B} H={H} N=32 r={r}", _step_call(d.dplr_step_fwd, B, H, 32, r)


def _tier_call(H, F, ssm, B, wdt=torch.float32, NL=8, N=32, r=1):
    t = OPS["tier_step"].module
    m = _meta

    def call():
        pqw = [m(NL, r, H, N, 2) for _ in range(3)] if ssm == "dplr" else [None] * 3
        ffw = ([m(NL, H, dtype=wdt), m(NL, H, dtype=wdt), m(NL, F, H, dtype=wdt), m(NL, F, dtype=wdt),
                m(NL, H, F, dtype=wdt), m(NL, H, dtype=wdt)] if F else [None] * 6)
        return t.tier_step_fwd(m(NL, B, H, N, 2), m(B, H), m(NL, H, dtype=wdt), m(NL, H, dtype=wdt),
                               m(NL, H, N, 2), m(NL, H, N, 2), m(NL, H, N, 2), m(NL, H, dtype=wdt),
                               *pqw, m(NL, 2 * H, H, dtype=wdt), m(NL, 2 * H, dtype=wdt), *ffw)
    return call


def _cases_tier_step():
    for H in (64, 128, 256):
        for ssm in ("dplr", "diag"):
            for ff in (True, False):
                for B in (1, 256):
                    F = 2 * H if ff else 0
                    yield f"tier_step H={H} N=32 F={F} n=8 {ssm} ff={ff} B={B}", _tier_call(H, F, ssm, B)
    # bf16 weights (the docstring's bandwidth option): the widest tier, dplr, with FF
    yield ("tier_step H=256 N=32 F=512 n=8 dplr ff=True B=1 bf16 weights",
           _tier_call(256, 512, "dplr", 1, torch.bfloat16))


def _lazy(name: str) -> Callable:
    """The public function kernels.<name>, looked up at call time (no import cycle)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"kernels.{name}"), name)(*args, **kwargs)
    call.__name__ = name
    return call


# one iteration of the ROWS loop: BLOCK_H channels x N of one row; where ptxas unrolls the loop
# (or ROWS = 1), the whole program: ROWS rows
_STEP_HOT = HotLoop("state element", lambda kw: kw["BLOCK_H"] * kw["BLOCK_N"], loop=0,
                    whole=lambda kw: kw["BLOCK_H"] * kw["BLOCK_N"] * kw["ROWS"])

OPS: dict[str, OpSpec] = {s.name: s for s in [
    OpSpec(
        "cauchy", _lazy("cauchy"), reference.cauchy, _cauchy_inputs, tol=1e-4,
        selftest=dict(H=6, N=9, L=49), grads=(0, 2),
        bench=_CAUCHY_SHAPES, work=_pair_work(14, 28),
        compile_cases=_cases_cauchy,
        hot_loop={"_cauchy_fwd_kernel": HotLoop("term", lambda kw: kw["BLOCK_B"] * kw["BLOCK_L"]),
                  "_cauchy_bwd_kernel": HotLoop("term", lambda kw: kw["BLOCK_N"] * kw["BLOCK_L"])}),
    OpSpec(
        "vandermonde", _lazy("vandermonde"), reference.vandermonde, _vandermonde_inputs, tol=1e-4,
        selftest=dict(B=5, N=7, L=150), grads=(0, 1),
        # bytes: the fp32 (B, L) output written (and the incoming gradient read), v and x read
        bench=_VANDERMONDE_SHAPES, work=lambda s, d: (
            s["B"] * s["N"] * s["L"] * (7 if d == "fwd" else 21),
            s["B"] * (s["L"] * 4 + s["N"] * 16 if d == "fwd" else 2 * s["L"] * 4 + s["N"] * 48)),
        compile_cases=_cases_vandermonde,
        hot_loop={k: HotLoop("term", lambda kw: kw["BLOCK_C"] * kw["BLOCK_J"] * kw["BLOCK_N"])
                  for k in ("_vandermonde_fwd_kernel", "_vandermonde_bwd_kernel")}),
    OpSpec(
        "embed_interleave", _lazy("embed_interleave"), reference.embed_interleave, _embed_inputs,
        tol=1e-5, selftest=dict(B=3, L=11, C=2, V=37, D=13, scale=0.5), grads=(1,),
        bench={"B16-L64000-C2-D64": dict(B=16, L=64000, C=2, D=64)},
        work=lambda s, d: (None, s["B"] * s["L"] * s["C"] * (8 + s["D"] * (2 if d == "fwd" else 4))),
        compile_cases=_cases_embed,
        hot_loop={"_embed_interleave_fwd_kernel":
                  HotLoop("row element", lambda kw: kw["BLOCK_R"] * kw["BLOCK_D"], loop=None)}),
    OpSpec(
        "embed_frames", _lazy("embed_frames"), reference.embed_frames, _embed_frames_inputs,
        tol=1e-5, selftest=dict(B=3, L=11, C=2, V=37, D=13, scale=0.5), grads=(1,),
        # the same audio as embed_interleave's anchor (B16-L64000-C2) in half the positions
        bench={"B16-L32000-C2-D64": dict(B=16, L=32000, C=2, D=64)},
        # bf16 out: tokens read + one row written per frame (the C tables stay in L2); fwdbwd adds
        # grad_out read once (the floor: the per-channel backward reads it C times)
        work=lambda s, d: (None, s["B"] * s["L"] * (8 * s["C"] + s["D"] * (2 if d == "fwd" else 4))),
        compile_cases=_cases_embed_frames,
        hot_loop={"_embed_frames_fwd_kernel":
                  HotLoop("frame element", lambda kw: kw["BLOCK_L"] * kw["BLOCK_D"], loop=None)}),
    OpSpec(
        "ssm_step", _lazy("ssm_step"), reference.ssm_step, _step_inputs, tol=1e-4,
        selftest=dict(B=2, H=5, N=7, steps=12), state=0, drive=1,
        bench=_STEP_SHAPES, work=_step_work, compile_cases=_cases_ssm_step,
        hot_loop={"_step_fwd_kernel": _STEP_HOT}),
    OpSpec(
        "dplr_step", _lazy("dplr_step"), reference.dplr_step, _step_inputs, tol=1e-4,
        selftest=dict(B=2, H=5, N=7, r=1, steps=12), state=0, drive=1,
        bench={k: dict(v, r=1) for k, v in _STEP_SHAPES.items()}, work=_step_work,
        compile_cases=_cases_dplr_step, hot_loop={"_step_fwd_kernel": _STEP_HOT}),
    OpSpec(
        "tier_step", _lazy("tier_step"), reference.tier_step, _tier_inputs, tol=1e-4,
        selftest=dict(n=2, B=2, H=5, N=4, F=10, r=1, steps=6), state=1, drive=0,
        compile_cases=_cases_tier_step,
        # the first loop in the SASS: the S4 step over channel blocks (BHS channels x ROWS rows)
        hot_loop={"_tier_step_fwd_kernel":
                  HotLoop("state element", lambda kw: kw["BHS"] * kw["BLOCK_N"] * kw["ROWS"])}),
]}


def hot_loop(kernel: str) -> HotLoop | None:
    """The hot-loop declaration of a kernel (by its Python name), or None."""
    for spec in OPS.values():
        if kernel in spec.hot_loop:
            return spec.hot_loop[kernel]
    return None


def units_per_thread(kernel: str, kw: dict, whole: bool = False) -> tuple[str, float]:
    """(unit, units of work per thread per hot-loop iteration, or in the whole program if
    `whole`); ("iteration", 1) if undeclared."""
    h = hot_loop(kernel)
    if h is None:
        return "iteration", 1.0
    per = h.whole if whole and h.whole is not None else h.per_iteration
    return h.unit, per(kw) / _threads(kw)


# ----------------------------------------------------------------------------------------------
# launch configurations: what the static gate compiles (scripts/aot_check.py)
# ----------------------------------------------------------------------------------------------

@dataclass
class LaunchConfig:
    """One launch of an op's host launcher at one of its compile cases, with one autotune config.
    `runner(*args, grid=..., warmup=..., **kwargs)` is Triton's own entry below the autotuner
    (heuristics applied, then the @triton.jit function `jit`); `pruned`: the autotuner's early
    pruner drops this config at this size; `grid`: evaluated for `gpu`, or an error text."""
    op: str
    case: str
    kernel: str
    config: str
    pruned: bool
    runner: object
    jit: object
    args: tuple
    kwargs: dict
    grid: tuple | str


def _config_label(kw: dict, opts: dict) -> str:
    o = f"w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)}"
    o += f" r{opts['maxnreg']}" if opts.get("maxnreg") else ""
    return f"{','.join(f'{k}={v}' for k, v in kw.items())} {o}".strip()


def launch_configs(op: str, gpu=None) -> list[LaunchConfig]:
    """Every (launch, autotune config) that the launchers of `op` make at its `compile_cases`,
    planned for `gpu` (default: an H100) on meta tensors. Nothing runs: Triton's launch entry
    points record each launch instead, and the configs come from the kernel's autotune list
    (every one; TRITON_INTERPRET must be unset)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kernels._utils import H100, assume_gpu
    launches, case = [], [""]

    def record(self, *args, grid=None, warmup=False, **kwargs):
        launches.append((case[0], self, args, dict(kwargs), grid))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run = JITFunction.run = record
    out = []
    try:
        with assume_gpu(gpu or H100), torch.no_grad():
            for case[0], call in OPS[op].compile_cases():
                call()
            Autotuner.run, JITFunction.run = saved
            for name, kernel, args, kwargs, grid in launches:
                out += _expand(op, name, kernel, args, kwargs, grid)
    finally:
        Autotuner.run, JITFunction.run = saved
    return out


def _expand(op, case, kernel, args, kwargs, grid) -> list[LaunchConfig]:
    from triton.runtime.autotuner import Autotuner, Heuristics
    tuner = kernel if isinstance(kernel, Autotuner) else None
    runner = tuner.fn if tuner else kernel
    jit = runner
    while isinstance(jit, Heuristics):
        jit = jit.fn
    nargs = dict(zip(jit.arg_names, args))
    if tuner is None:
        items = [(None, False)]
    else:
        prune = tuner.early_config_prune
        kept = prune(tuner.configs, nargs, **kwargs) if prune else tuner.configs
        same = lambda a, b: a.all_kwargs() == b.all_kwargs()  # noqa: E731
        items = [(c, not any(same(c, k) for k in kept)) for c in tuner.configs]
        items += [(k, False) for k in kept if not any(same(k, c) for c in tuner.configs)]  # rewritten by a pruner
    out = []
    for cfg, pruned in items:
        kw = dict(kwargs, **(cfg.all_kwargs() if cfg else {}))
        meta = dict(kw)
        h = runner
        while isinstance(h, Heuristics):       # outermost first, as at run time
            meta.update({name: fn({**nargs, **meta}) for name, fn in h.values.items()})
            h = h.fn
        opts = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
        label = ("fixed " + _config_label({}, opts)) if cfg is None else _config_label(cfg.kwargs, opts)
        try:
            g = grid({**nargs, **meta}) if callable(grid) else grid
            g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            g = f"grid: {type(exc).__name__}: {exc}"
        out.append(LaunchConfig(op, case, jit.fn.__name__, label, pruned, runner, jit, args, kw, g))
    return out


# ----------------------------------------------------------------------------------------------
# the generic check (self-test): fn against the reference in float64, forward and gradients
# ----------------------------------------------------------------------------------------------

def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 on the CPU; inf if a has a non-finite value."""
    a = a.detach().cpu().to(C128 if a.is_complex() else F64)
    b = b.detach().cpu().to(C128 if b.is_complex() else F64)
    if not torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all():
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(spec: OpSpec, shape: dict, device, generator: torch.Generator) -> float:
    """Run spec.fn on `shape` (Triton or reference path, as the device allows) against
    spec.reference in float64: the outputs, the in-place state and every gradient. Returns the
    largest relative error."""
    g = generator
    args64 = spec.inputs(shape, g)
    args = [lower(a, device) for a in args64]
    for i in spec.grads:
        args64[i] = args64[i].detach().requires_grad_(True)
        args[i] = args[i].detach().requires_grad_(True)
    err = 0.0
    for _ in range(shape.get("steps", 1)):
        if spec.drive is not None:
            args64[spec.drive] = torch.randn(args64[spec.drive].shape, generator=g, dtype=F64)
            args[spec.drive] = lower(args64[spec.drive], device)
        with torch.set_grad_enabled(bool(spec.grads)):
            out, ref = spec.fn(*args), spec.reference(*args64)
        err = max(err, rel_error(out, ref))
        if spec.state is not None:
            err = max(err, rel_error(args[spec.state], args64[spec.state]))
        if spec.grads:
            dout = torch.randn(ref.shape, dtype=ref.dtype, generator=g)
            got = torch.autograd.grad(out, [args[i] for i in spec.grads], lower(dout, device))
            want = torch.autograd.grad(ref, [args64[i] for i in spec.grads], dout)
            err = max([err] + [rel_error(a, b) for a, b in zip(got, want)])
    return err
