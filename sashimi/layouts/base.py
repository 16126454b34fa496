"""What every layout provides: how audio frames become the backbone's positions and back.

A layout is a small object bound to one `ModelConfig` (`cfg.layout`). The model, prefill,
generation, evaluation, training and the codec ask it, and none of them asks which layout it
is. It owns:

- the model's tokens: `to_model` / `from_model` map the quantiser's per-channel tokens of a
  frame (..., C) to the tokens the model predicts (identity, or mid/side), exactly invertible;
- the embedding: `build(model)` attaches its tables (and any extra head input) to the model,
  under the names checkpoints have always used; `encode` (training, the whole sequence) and
  `embed_steps` (one position of the recurrence) turn tokens into the backbone's input;
- the mapping frames <-> positions: `positions` / `frames` (a position holds `step_tokens`
  tokens: one interleaved token, or a whole frame);
- the step schedule: a backbone step at position t consumes that position's tokens; the next
  position's tokens are predicted in channel order, token j by `heads(model)[j]` from
  `head_output(model, out, j, given)` (`given`: the position's tokens 0..j-1, e.g. R given L);
- the order of the training targets (`nll_bits`) and their split by channel (`per_channel`);
- what `data` crops: `crop_frames` frames per training example;
- with `ModelConfig.value_input`, the values: each token's place on its head's grid enters the
  embedding through `model.value_in`, and the heads' means are offsets from a fixed
  second-order prediction of each channel slot (`anchors`), carried through the recurrence in
  the state's "values".
"""
from __future__ import annotations

import math

import torch

from sashimi.blocks import grid_values

LN2 = math.log(2.0)


class Layout:
    name = "?"
    step_tokens = 1              # tokens per backbone position

    def __init__(self, cfg):
        self.cfg = cfg

    # -- configuration --------------------------------------------------------------------------
    @classmethod
    def problems(cls, cfg) -> list[str]:
        """What in `cfg` this layout cannot run (one phrase each; empty when it can)."""
        return []

    @property
    def channel_names(self) -> list[str]:
        """The model's channels, in the order its head predicts them."""
        return ["L", "R"] if self.cfg.channels == 2 else ["mono"]

    @property
    def crop_frames(self) -> int:
        """Frames per training crop: a window of seq_len frames plus the target after it."""
        return self.cfg.seq_len + 1

    @property
    def positions_per_example(self) -> int:
        """Backbone positions per training example (the backbone's l_max)."""
        return self.cfg.samples // self.step_tokens

    # -- tokens and positions ---------------------------------------------------------------------
    def to_model(self, tokens: torch.Tensor) -> torch.Tensor:
        """Quantiser tokens of frames (..., C) -> the model's tokens (..., C)."""
        return tokens

    def from_model(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_model`."""
        return tokens

    def positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's tokens of frames (B, T, C) -> positions: (B, T*C) when a position holds
        one token, else (B, T*C / step_tokens, step_tokens)."""
        B = tokens.shape[0]
        if self.step_tokens == 1:
            return tokens.reshape(B, -1)
        return tokens.reshape(B, -1, self.step_tokens)

    def frames(self, positions: torch.Tensor) -> torch.Tensor:
        """The inverse of `positions`: (B, T, C) model tokens."""
        return positions.reshape(positions.shape[0], -1, self.cfg.channels)

    # -- the model's pieces ---------------------------------------------------------------------
    def build(self, model) -> None:
        raise NotImplementedError

    def levels(self, j: int) -> int:
        """Token values of channel j of a position (its head's grid)."""
        return self.cfg.levels

    def heads(self, model) -> list:
        """The head of each token of a position, in prediction order."""
        return [model.head] * self.step_tokens

    def encode(self, model, tokens: torch.Tensor, check_tokens: bool = True) -> torch.Tensor:
        """Quantiser tokens (B, L, C) -> the backbone's input (B, positions, D)."""
        raise NotImplementedError

    def embed_steps(self, model, positions: torch.Tensor) -> torch.Tensor:
        """Positions (model tokens, (...,) or (..., step_tokens)) -> (..., D). No range check."""
        raise NotImplementedError

    # -- values (value_input) -------------------------------------------------------------------
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's tokens of positions (..., step_tokens) -> their places on their heads'
        grids in [-1, 1] (float32): the sample values themselves for linear quantisation."""
        return torch.stack([grid_values(tokens[..., j], self.levels(j)) for j in range(tokens.shape[-1])], -1)

    def with_values(self, model, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding x (..., D) of positions (..., step_tokens) plus their values' projection."""
        return x if model.value_in is None else x + model.value_in(self.values(tokens))

    def anchors(self, tokens: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The fixed prediction the head's means are offset from, per position and channel slot:
        2 v_p - v_{p-1} of the values v (B, T, step_tokens) of positions' tokens; v_{-1} is
        `previous` (B, step_tokens), 0 when None (a sequence's start)."""
        v = self.values(tokens)
        before = torch.zeros_like(v[:, :1]) if previous is None else previous[:, None].to(v.dtype)
        return 2.0 * v - torch.cat([before, v[:, :-1]], 1)

    # -- heads and targets ----------------------------------------------------------------------
    def step_output(self, model, h: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """What a recurrent step returns for backbone outputs h (..., D): h, followed (with
        value_input) by the next position's anchors (..., step_tokens)."""
        return h if anchor is None else torch.cat([h, anchor], -1)

    def after_step(self, model, positions: torch.Tensor, h: torch.Tensor, state) -> torch.Tensor:
        """The step output of a recurrent step over `positions` (B,) or (B, step_tokens) that
        gave backbone outputs h (B, D); keeps their values in the state (value_input)."""
        if not self.cfg.value_input:
            return self.step_output(model, h)
        per_position = positions.view(positions.shape[0], 1, -1)
        anchor = self.anchors(per_position, state["values"])[:, 0]
        state["values"].copy_(self.values(per_position)[:, 0])
        return self.step_output(model, h, anchor)

    def prefill_output(self, model, positions: torch.Tensor, h: torch.Tensor, state, return_all: bool):
        """The step outputs of all T positions (B, T, ...) at once (return_all), or of the last."""
        anchor = None
        if self.cfg.value_input:
            per_position = positions.view(positions.shape[0], positions.shape[1], -1)
            anchor = self.anchors(per_position)
            state["values"].copy_(self.values(per_position[:, -1]))
        if not return_all:
            h, anchor = h[:, -1], None if anchor is None else anchor[:, -1]
        return self.step_output(model, h, anchor)

    def head_output(self, model, out: torch.Tensor, j: int, given: torch.Tensor | None = None) -> torch.Tensor:
        """The head output (what `heads(model)[j]` scores) of token j of the next position, from
        the step output `out` and that position's tokens 0..j-1 (`given`, (..., j); None for
        j = 0)."""
        raise NotImplementedError

    def log_prob_next(self, model, out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Natural-log probability of the next position's tokens (..., step_tokens) given step
        outputs `out`: (..., step_tokens)."""
        heads = self.heads(model)
        return torch.stack([heads[j].log_prob(self.head_output(model, out, j, tokens[..., :j]), tokens[..., j])
                            for j in range(self.step_tokens)], -1)

    @torch.no_grad()
    def sample_next(self, model, out: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next position's tokens (B, step_tokens), in prediction order (each given the ones
        before it), and their exact natural-log probability (B,)."""
        tokens, logp = [], 0.0
        for j, head in enumerate(self.heads(model)):
            given = torch.stack(tokens, -1) if tokens else None
            token, lp = head.sample(self.head_output(model, out, j, given), temperature, top_p, generator=generator)
            tokens.append(token)
            logp = logp + lp
        return torch.stack(tokens, 1), logp

    def forward(self, model, tokens: torch.Tensor, h: torch.Tensor, next_tokens: torch.Tensor | None,
                check_tokens: bool) -> torch.Tensor:
        """Training: the backbone outputs h (B, P, D) of quantiser tokens (B, L, C) -> head
        outputs. `next_tokens`: the model's tokens of the positions after each (what a head
        conditions on), when the layout needs them."""
        raise NotImplementedError

    def nll_bits(self, model, batch: torch.Tensor, check_tokens: bool = True) -> torch.Tensor:
        """batch: quantiser tokens (B, L + 1, C) -> NLL of every target in bits (B, L*C), in
        the layout's target order (`per_channel` splits it)."""
        raise NotImplementedError

    def per_channel(self, nll: torch.Tensor) -> list[torch.Tensor]:
        """Split (B, L*C) target NLLs (from nll_bits) by the target's channel (channel_names)."""
        B, T = nll.shape
        C = self.cfg.channels
        return list(nll.view(B, T // C, C).unbind(2)) if C > 1 else [nll]
