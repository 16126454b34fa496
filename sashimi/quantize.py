"""Quantisation: float audio in [-1, 1] <-> integer tokens in [0, 2**bits).

A FIXED map of [-1, 1], the same for every clip (no per-clip normalisation), so that
generation can invert it exactly: `decode(encode(x))` is the centre of the bin that holds x.

- ``linear``: ``levels = 2**bits`` uniform bins over [-1, 1]; bin k is
  ``[-1 + 2k/levels, -1 + 2(k+1)/levels)`` and decodes to its centre ``-1 + (2k+1)/levels``.
- ``mu-law``: compand with ``mu = levels - 1``,
  ``f(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)`` (a bijection of [-1, 1]), then the same
  uniform bins in the companded domain; a token decodes to ``f^-1`` of its bin centre.
  (torchaudio's ``mu_law_encoding`` rounds to ``levels`` grid points that include +-1, i.e.
  half-width end bins and no exact centre decode, so it is not used.)

Both maps are stored as tables computed once in float64: ``levels + 1`` bin edges (in the
audio domain) and ``levels`` decode values. ``encode`` is exactly a binary search of the
edges (monotone, and consistent with ``decode``: ``encode(decode(k)) == k`` for every
token), computed as a closed-form float32 guess plus a +-1 correction against the float64
edges (4x faster than ``torch.bucketize``: ~0.4 ms per 32k samples on one CPU core);
``decode`` is a table lookup. With an even number of bins 0.0 sits on an edge: it encodes
to ``zero_token = levels // 2``, whose decode value is the small positive centre of the bin
[0, edge) (half a step for linear, less for mu-law).

Out-of-range input is clipped to [-1, 1] (never wrapped: 2.0 encodes like 1.0, -inf like
-1.0); NaN raises ValueError. Token k covers ``[edges[k], edges[k+1])`` (the last bin also
holds 1.0); ``bin_edges()`` returns all ``levels + 1`` edges, for tests and tools.
Round-trip error: at most half a step (1/levels) for linear; for mu-law at most the distance
from the bin's decode value to its farther edge (and half a bin in the companded domain).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

KINDS = ("mu-law", "linear")
BITS = (8, 16)

_tables: dict[tuple, torch.Tensor] = {}
_tables_lock = threading.Lock()


def _compand_inverse(y: torch.Tensor, mu: float) -> torch.Tensor:
    """f^-1(y) = sign(y) ((1 + mu)^|y| - 1) / mu, in float64."""
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def _build(kind: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All levels + 1 bin edges and levels decode values, float64, on CPU."""
    levels = 2**bits
    k = torch.arange(levels + 1, dtype=torch.float64)
    edges_y = -1.0 + 2.0 * k / levels                       # exact (dyadic) in float64
    centres_y = -1.0 + (2.0 * torch.arange(levels, dtype=torch.float64) + 1.0) / levels
    if kind == "linear":
        return edges_y, centres_y
    mu = float(levels - 1)
    edges = _compand_inverse(edges_y, mu)
    edges[0], edges[-1], edges[levels // 2] = -1.0, 1.0, 0.0   # exact at the ends and at 0
    return edges, _compand_inverse(centres_y, mu)


def _table(kind: str, bits: int, what: str, device: torch.device) -> torch.Tensor:
    key = (kind, bits, what, str(device))
    table = _tables.get(key)
    if table is None:
        with _tables_lock:
            table = _tables.get(key)
            if table is None:
                edges, centres = _build(kind, bits)
                if what == "open_edges":   # outer edges at -inf/+inf: the end bins are open
                    table = edges.clone()
                    table[0], table[-1] = -math.inf, math.inf
                elif what == "edges":
                    table = edges
                else:
                    table = centres.to(torch.float32)
                table = table.to(device)
                _tables[key] = table
    return table


@dataclass(frozen=True)
class Quantizer:
    """The token map. ``Quantizer(kind="mu-law" | "linear", bits=8 | 16)``."""

    kind: str = "mu-law"
    bits: int = 8

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quantization kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"quantization bits must be 8 or 16, got {self.bits!r}")

    @property
    def levels(self) -> int:
        """Number of tokens, 2**bits."""
        return 2**self.bits

    @property
    def zero_token(self) -> int:
        """The token that encodes 0.0 (used to prime generation)."""
        return self.levels // 2

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Float audio (any shape, any float dtype/device) -> int64 tokens of the same shape.
        Values outside [-1, 1] are clipped; NaN raises ValueError."""
        if not torch.is_tensor(x):
            x = torch.as_tensor(x)
        if not (x.is_floating_point()):
            raise ValueError(f"encode expects floating-point audio, got {x.dtype}")
        if torch.isnan(x).any():
            raise ValueError("audio contains NaN: cannot quantise it")
        # A closed-form guess (float32: fast), then an exact +-1 correction against the float64
        # edge table, so the result equals a binary search of the edges (tested) at ~4x its speed.
        x = x.clamp(-1.0, 1.0)
        levels = self.levels
        g = x.to(torch.float32)
        if self.kind == "mu-law":
            mu = float(levels - 1)
            g = torch.log1p(g.abs() * mu).mul_(1.0 / math.log1p(mu)).copysign_(g)
        else:
            g = g.clone()
        k = g.add_(1.0).mul_(levels / 2).floor_().to(torch.int64).clamp_(0, levels - 1)
        edges = _table(self.kind, self.bits, "open_edges", x.device)
        x64 = x.to(torch.float64)
        k.sub_((x64 < edges[k]).to(torch.int64)).add_((x64 >= edges[k + 1]).to(torch.int64))
        return k

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Integer tokens in [0, levels) -> float32 audio (the bin centres), same shape.
        A token out of range raises ValueError."""
        if not torch.is_tensor(tokens):
            tokens = torch.as_tensor(tokens)
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"decode expects integer tokens, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.levels):
            raise ValueError(f"tokens must lie in [0, {self.levels}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        table = _table(self.kind, self.bits, "centres", tokens.device)
        return table[tokens.long()]

    def bin_edges(self) -> torch.Tensor:
        """The levels + 1 bin edges in the audio domain (float64, CPU): token k covers
        [edges[k], edges[k+1]) (the last bin also holds 1.0)."""
        return _table(self.kind, self.bits, "edges", torch.device("cpu")).clone()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bits": self.bits}

    @classmethod
    def from_dict(cls, d: dict) -> "Quantizer":
        if not isinstance(d, dict) or set(d) - {"kind", "bits"}:
            raise ValueError(f"not a quantizer description: {d!r}")
        return cls(kind=d.get("kind", "mu-law"), bits=d.get("bits", 8))
