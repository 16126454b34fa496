"""The model's building blocks: feed-forward and residual blocks, the pooling layers between
the backbone's tiers, and the token tables' initialisations. Each module has `forward`
(convolutional, training) and `step` (recurrent) with `default_state(batch)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    def __init__(self, d: int, expand: int, dropout: float = 0.0):
        super().__init__()
        self.lin1 = nn.Linear(d, expand * d)
        self.lin2 = nn.Linear(expand * d, d)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.lin2(self.dropout(F.gelu(self.lin1(x))))

    def default_state(self, batch, device=None):
        return None

    def step(self, x, state):
        return self.forward(x)

    def prefill(self, x, state, block: int = 128, dtype=torch.float32):
        return self.forward(x)        # stateless: the whole sequence at once is its forward


class Residual(nn.Module):
    """x + layer(LayerNorm(x)) (pre-norm)."""

    def __init__(self, d: int, layer: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.layer = layer

    def forward(self, x):
        return x + self.layer(self.norm(x))

    def default_state(self, batch, device=None):
        return self.layer.default_state(batch, device)

    def step(self, x, state):
        return x + self.layer.step(self.norm(x), state)

    def prefill(self, x, state, block: int = 128, dtype=torch.float32):
        """x (B, T, d): T steps from a zero state at once (sashimi.prefill); fills `state`."""
        return x + self.layer.prefill(self.norm(x), state, block, dtype)


class DownPool(nn.Module):
    """(B, L, H) -> (B, L/p, expand*H): p consecutive steps side by side, then a linear map."""

    def __init__(self, d: int, expand: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(d * pool, d * expand)

    def forward(self, x):
        B, L, H = x.shape
        return self.linear(x.reshape(B, L // self.pool, self.pool * H))

    def default_state(self, batch, device=None):
        # the inputs of the current block, slot k = k-th step of the block (a fixed buffer, so
        # a step can be captured in a CUDA graph)
        return torch.zeros(batch, self.pool, self.linear.in_features // self.pool, device=device)

    def step(self, x, state: torch.Tensor, phase: int):
        """Buffers the input in slot `phase` (0..p-1); returns the pooled output at phase p-1, else None."""
        state[:, phase].copy_(x)
        if phase < self.pool - 1:
            return None
        return self.linear(state.reshape(state.shape[0], -1))


class UpPool(nn.Module):
    """(B, L', H) -> (B, L'*p, H/expand), shifted right by one coarse step so it stays causal."""

    def __init__(self, d_in: int, expand: int, pool: int):
        super().__init__()
        self.pool, self.d_out = pool, d_in // expand
        self.linear = nn.Linear(d_in, self.d_out * pool)

    def forward(self, x):
        B, Lc, _ = x.shape
        y = self.linear(x)
        y = F.pad(y[:, :-1], (0, 0, 1, 0))  # block m is made from coarse step m - 1
        return y.reshape(B, Lc * self.pool, self.d_out)

    def default_state(self, batch, device=None):
        return torch.zeros(batch, self.pool, self.d_out, device=device)  # block 0 is zeros

    def step(self, x, state: torch.Tensor, phase: int):
        """Emits slot `phase` of the current block; at phase p-1 refills the buffer from x, the
        coarse tier's output of the block that just ended."""
        y = state[:, phase].clone()
        if phase == self.pool - 1:
            if x is None:
                raise RuntimeError("UpPool.step: the coarse tier did not produce its output in time")
            state.copy_(self.linear(x).view(x.shape[0], self.pool, self.d_out))
        return y


def grid_values(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Tokens k -> their place on the head's grid, 2k / (levels - 1) - 1 in [-1, 1] (float32):
    the DML head's bin centres, and the sample value itself for linear quantisation."""
    return tokens.float() * (2.0 / (levels - 1)) - 1.0


def embedding_init(levels: int, d: int, embed_init: str, seed: int = 0) -> torch.Tensor:
    """A token table's initial rows (levels, d): `ordinal_embedding` (seeded), or N(0, 1/d)."""
    if embed_init == "ordinal":
        return ordinal_embedding(levels, d, seed=seed)
    return torch.randn(levels, d) * d ** -0.5


def ordinal_embedding(levels: int, d: int, bandwidth_tokens: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Random Fourier features of the token's position on the (companded) amplitude axis.

    Audio tokens are ordinal: neighbouring tokens are neighbouring amplitudes. With these
    features e_j . e_k ~ exp(-(j - k)^2 / (2 bandwidth^2)) / 2, so at initialisation the model
    already generalises across nearby amplitudes (a random table makes it learn every one of
    2^bits rows separately, and training sits at the unigram entropy for hundreds of steps).
    Scaled like the usual N(0, 1/d) init. Deterministic (its own seeded generator).
    """
    g = torch.Generator().manual_seed(levels * 7919 + d + 104729 * seed)
    a = torch.arange(levels, dtype=torch.float64)[:, None]
    freq = torch.randn(1, d, generator=g, dtype=torch.float64) / bandwidth_tokens
    phase = torch.rand(1, d, generator=g, dtype=torch.float64) * 2 * math.pi
    return (torch.cos(a * freq + phase) * math.sqrt(2.0 / d)).float()
