"""sashimi.quantize: the fixed token map of [-1, 1] (linear and mu-law, 8 and 16 bits).

The oracle is the map's own definition: the bin edges, computed independently here in float64
(f(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu), mu = levels - 1, uniform bins in the companded
domain), and a binary search of them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

from sashimi.quantize import Quantizer
from tests.strategies import seeds

QUANTIZERS = [pytest.param(Quantizer(k, b), id=f"{k}-{b}") for k in ("mu-law", "linear") for b in (8, 16)]
quantizers = st.sampled_from([Quantizer(k, b) for k in ("mu-law", "linear") for b in (8, 16)])


def oracle_edges(q: Quantizer) -> torch.Tensor:
    """levels + 1 bin edges in the audio domain, float64, from the definition."""
    y = torch.linspace(-1.0, 1.0, q.levels + 1, dtype=torch.float64)
    if q.kind == "linear":
        return y
    mu = q.levels - 1
    return torch.sign(y) * ((1 + mu) ** y.abs() - 1) / mu


def compand(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    x = x.to(torch.float64)
    if q.kind == "linear":
        return x
    mu = q.levels - 1
    return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)


def audio(seed: int, n: int, spread: float = 1.2) -> torch.Tensor:
    """Values over [-spread, spread], dense near 0 too (mu-law bins are tiny there)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    small = torch.sign(u) * u.abs() ** 4  # many values near zero
    return torch.where(torch.rand(n, generator=g) < 0.5, u * spread, small).to(torch.float32)


def test_bad_arguments_raise_one_line():
    for kind, bits in (("mulaw", 8), ("linear", 12), ("mu-law", 0), ("linear", True)):
        with pytest.raises(ValueError) as err:
            Quantizer(kind, bits)
        assert "\n" not in str(err.value)


def test_properties_and_dict_round_trip():
    q = Quantizer()
    assert (q.kind, q.bits, q.levels, q.zero_token) == ("mu-law", 8, 256, 128)
    assert Quantizer("linear", 16).levels == 65536
    for k, b in (("mu-law", 16), ("linear", 8)):
        q = Quantizer(k, b)
        assert Quantizer.from_dict(q.to_dict()) == q
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 16
    with pytest.raises(ValueError):
        Quantizer.from_dict({"kind": "linear", "bits": 8, "extra": 1})
    with pytest.raises(ValueError):
        Quantizer.from_dict({"kind": "linear", "bits": 9})


@pytest.mark.parametrize("q", QUANTIZERS)
def test_tables_match_the_definition(q):
    edges = q.bin_edges()
    assert torch.allclose(edges, oracle_edges(q), rtol=1e-12, atol=1e-15)
    assert (edges.diff() > 0).all()
    centres = q.decode(torch.arange(q.levels))
    assert centres.dtype == torch.float32
    # decode = the bin centre in the (companded) domain
    expect_y = -1 + (2 * torch.arange(q.levels, dtype=torch.float64) + 1) / q.levels
    assert (compand(centres, q) - expect_y).abs().max() < 1e-6
    # every centre lies strictly inside its bin, so encode(decode(k)) == k for every token
    assert ((centres.double() > edges[:-1]) & (centres.double() < edges[1:])).all()
    assert torch.equal(q.encode(centres), torch.arange(q.levels))


@pytest.mark.parametrize("q", QUANTIZERS)
def test_ends_clipping_nan_and_zero(q):
    L = q.levels
    x = torch.tensor([-1.0, 1.0, 2.0, -5.0, math.inf, -math.inf, 1e30, -1e-30, 0.0])
    t = q.encode(x)
    assert t.tolist()[:6] == [0, L - 1, L - 1, 0, L - 1, 0]
    assert t[6] == L - 1 and t[7] == L // 2 - 1 and t[8] == q.zero_token
    with pytest.raises(ValueError, match="NaN"):
        q.encode(torch.tensor([0.1, float("nan")]))
    edges = q.bin_edges()
    smallest_step = edges.diff().min().item()
    z = q.decode(torch.tensor(q.zero_token)).item()
    assert z != 0.0 and abs(z) <= smallest_step / 2 * (1 + 1e-6)


@pytest.mark.parametrize("q", QUANTIZERS)
def test_decode_errors_and_dtypes(q):
    with pytest.raises(ValueError, match="tokens must lie"):
        q.decode(torch.tensor([0, q.levels]))
    with pytest.raises(ValueError, match="tokens must lie"):
        q.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        q.decode(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="floating"):
        q.encode(torch.tensor([1, 2]))
    x = audio(3, 64).reshape(4, 8, 2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = q.encode(x.to(dtype))
        assert t.dtype == torch.int64 and t.shape == x.shape
        assert torch.equal(t, q.encode(x.to(dtype).to(torch.float64)))
    assert q.decode(torch.zeros(0, 2, dtype=torch.int64)).shape == (0, 2)
    assert q.encode(torch.zeros(0)).shape == (0,)
    # non-contiguous input
    xt = audio(4, 200).reshape(20, 10).t()
    assert torch.equal(q.encode(xt), q.encode(xt.contiguous()))


@given(q=quantizers, seed=seeds, n=st.integers(1, 300))
@example(q=Quantizer("mu-law", 16), seed=0, n=1)
def test_encode_is_the_binary_search_of_the_edges(q, seed, n):
    x = audio(seed, n)
    edges = oracle_edges(q)
    # also hit the edges themselves and their float32 neighbours
    g = torch.Generator().manual_seed(seed + 1)
    pick = edges[torch.randint(0, q.levels + 1, (n,), generator=g)].to(torch.float32)
    near = torch.cat([pick, torch.nextafter(pick, torch.tensor(2.0)), torch.nextafter(pick, torch.tensor(-2.0))])
    x = torch.cat([x, near])
    expect = torch.bucketize(x.double().clamp(-1, 1), edges[1:-1], right=True)
    got = q.encode(x)
    assert torch.equal(got, expect)
    assert got.min() >= 0 and got.max() < q.levels


@given(q=quantizers, seed=seeds, n=st.integers(1, 500))
def test_round_trip_within_the_bin(q, seed, n):
    x = audio(seed, n).double().clamp(-1, 1)
    t = q.encode(x)
    y = q.decode(t).double()
    edges = oracle_edges(q)
    lo, hi = edges[t], edges[t + 1]
    assert ((lo <= x) & ((x < hi) | (x == 1.0))).all(), "token's bin does not hold x"
    if q.kind == "linear":
        bound = torch.full_like(x, 1.0 / q.levels)  # half a step
    else:
        # decode is the companded bin centre: |error| <= its distance to the farther edge,
        # and, in the companded domain, half a bin
        centre = oracle_centres(q)[t]
        bound = torch.maximum(centre - lo, hi - centre)
        assert ((compand(y, q) - compand(x, q)).abs() <= 1.0 / q.levels + 1e-6).all()
    err = (y - x).abs()
    slack = 1e-7 * y.abs() + 1e-12  # the float32 rounding of the decode value
    assert (err <= bound + slack).all(), f"max excess {(err - bound).max().item():.3e}"


def oracle_centres(q: Quantizer) -> torch.Tensor:
    y = -1 + (2 * torch.arange(q.levels, dtype=torch.float64) + 1) / q.levels
    if q.kind == "linear":
        return y
    mu = q.levels - 1
    return torch.sign(y) * ((1 + mu) ** y.abs() - 1) / mu


@given(q=quantizers, seed=seeds, n=st.integers(2, 400))
def test_encode_is_monotone(q, seed, n):
    x = torch.sort(audio(seed, n, spread=1.5)).values
    t = q.encode(x)
    assert (t.diff() >= 0).all()
    d = q.decode(t)
    assert (d.diff() >= 0).all()


def test_mu_law_resolves_quiet_audio_better_than_linear():
    """The point of mu-law: a quiet signal keeps more distinct levels."""
    x = 0.01 * torch.sin(torch.linspace(0, 20 * np.pi, 4000))
    mu, lin = Quantizer("mu-law", 8), Quantizer("linear", 8)
    assert mu.encode(x).unique().numel() > 4 * lin.encode(x).unique().numel()
    err_mu = (mu.decode(mu.encode(x)) - x).abs().max()
    err_lin = (lin.decode(lin.encode(x)) - x).abs().max()
    assert err_mu < err_lin / 4
