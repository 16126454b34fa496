"""One recurrent session: a loaded model stepped over a batch, position by position.

The codec (both sides), generation, evaluation and the benchmarks' step loops all drive a
`Session`: it owns the model's step state for the batch (created by `model.default_state`,
advanced only by `model.step` or `prefill`, and otherwise opaque: whatever the model keeps
per row, backbone or not), the position (backbone steps run), the device, and the conversion
between the audio's channels and the model's tokens (the layout's `to_model` / `from_model`,
e.g. L/R <-> mid/side). Nothing outside a session converts tokens.

Two ways to advance it:
- `step(position)` / `step_at(position, phase)`: one backbone step over a position (one token
  (B,), or a frame (B, step_tokens)); `step_at` keeps no host counter and allocates nothing
  that outlives it, so generation captures it in a CUDA graph (phase = t mod prod(pool)).
- `feed(tokens)`: one channel slot at a time, as the codec needs: after each token `out` is
  the head output the next token is coded with, by the head of slot `j` (a frame's later
  channels given its earlier ones: the layout's `head_output`, R given L).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from sashimi.prefill import prefill as _prefill


def map_state(fn, state):
    """fn applied to every tensor of a (nested dict / list) step state; anything else is kept
    as it is (the state is the model's: a session never assumes what it holds)."""
    if torch.is_tensor(state):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, v) for v in state)
    return state


def broadcast_state(one, full):
    """Copy a batch-1 state into every row of a batch-B state of the same structure (its
    tensors are (B, ...) or stacked (n, B, ...): broadcasting handles both)."""
    for src, dst in zip(tree_leaves(one), tree_leaves(full)):
        if torch.is_tensor(dst):
            dst.copy_(src.expand_as(dst))
    return full


class Session:
    """A model's recurrence over `batch` rows (see the module doc). `model.setup_step()` is
    called once here unless `setup=False` (the caller set it up, e.g. with fused kernels)."""

    def __init__(self, model, batch: int, device=None, setup: bool = True):
        self.model, self.layout, self.cfg = model, model.layout, model.cfg
        self.device = torch.device(device) if device is not None else model.embedding.weight.device
        self.batch = batch
        self.k = self.layout.step_tokens          # tokens per position
        self.channels = self.cfg.channels
        if setup:
            model.setup_step()
        self.state = model.default_state(batch, self.device)
        self.t = 0                                # backbone steps run
        self._slot: list[torch.Tensor] = []       # feed: the current position's tokens so far
        self._step_out = None
        self.out = None                           # feed: the head output of the next token
        self.j = 0                                # feed: its channel slot in the position

    # ------------------------------------------------------------------ token conversion
    def to_model(self, tokens: torch.Tensor) -> torch.Tensor:
        """Audio tokens (..., frames, C) in the file's channels -> the model's (the layout's)."""
        return self.layout.to_model(tokens)

    def from_model(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's tokens (..., frames, C) -> the file's channels."""
        return self.layout.from_model(tokens)

    def positions(self, frames: torch.Tensor) -> torch.Tensor:
        """Model tokens (B, T, C) -> the layout's positions: (B, T*C) or (B, T*C/k, k)."""
        return self.layout.positions(frames)

    def silence(self, rows: int | None = None) -> torch.Tensor:
        """One frame of silence as the model's tokens (rows, C): what every sequence starts from."""
        zero = self.cfg.quantizer.zero_token
        frame = torch.full((self.batch if rows is None else rows, self.channels), zero, dtype=torch.long,
                           device=self.device)
        return self.to_model(frame)

    def first_position(self) -> torch.Tensor:
        """The silence frame's first position: (B,) one token, or (B, k) a frame."""
        return self.positions(self.silence()[:, None])[:, 0]

    # ---------------------------------------------------------------------- stepping
    def step_at(self, position: torch.Tensor, phase: int) -> torch.Tensor:
        """One backbone step at phase `phase` (t mod prod(pool)); no host counter (capturable)."""
        return self.model.step(position, self.state, phase)

    def step(self, position: torch.Tensor) -> torch.Tensor:
        """One backbone step over position t; returns the step output that predicts t + 1."""
        out = self.model.step(position.to(self.device, non_blocking=True), self.state, self.t)
        self.t += 1
        return out

    def prefill(self, positions: torch.Tensor, return_all: bool = False, block: int = 128):
        """Consume positions (B, T[, k]) in parallel (sashimi.prefill): the state is then what
        T steps leave. Returns the step output after the last one (or after each)."""
        self.state, out = _prefill(self.model, positions, block=block, return_all=return_all)
        self.t = positions.shape[1]
        return out

    def replicate(self, batch: int) -> "Session":
        """A session of `batch` rows, each a copy of this batch-1 session's state and position."""
        other = Session(self.model, batch, self.device, setup=False)
        broadcast_state(self.state, other.state)
        other.t = self.t
        return other

    def clone_state(self):
        """A copy of the state (tensors cloned): for warming up without touching this one."""
        return map_state(torch.clone, self.state)

    def state_bytes_per_row(self) -> int:
        """What one row of the step state takes (for memory checks)."""
        one = self.model.default_state(1, device="meta")
        return sum(t.numel() * t.element_size() for t in tree_leaves(one) if torch.is_tensor(t))

    # ---------------------------------------------------- token by token (the codec)
    def start(self) -> None:
        """Feed one frame of silence; `out` then predicts the first token."""
        silence = self.silence()
        for c in range(self.channels):
            self.feed(silence[:, c])

    def feed(self, tokens: torch.Tensor) -> None:
        """The next token (B,) of the current position, in the model's channel order."""
        self._slot.append(tokens.to(self.device, non_blocking=True))
        if len(self._slot) < self.k:         # the next token is of this position, given these
            self.j = len(self._slot)
            self.out = None if self._step_out is None else \
                self.layout.head_output(self.model, self._step_out, self.j, torch.stack(self._slot, -1))
            return
        current = self._slot[0] if self.k == 1 else torch.stack(self._slot, 1)
        self._step_out = self.step(current)
        self._slot, self.j = [], 0
        self.out = self.layout.head_output(self.model, self._step_out, 0)
