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
  embedding through `model.value_in`, and the heads' means are offsets from the prediction of
  each channel slot by `ModelConfig.predictor` (`sashimi.predictors`; `advance` runs it, its
  state rides in the model's recurrent state).
"""
from __future__ import annotations

import functools
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
        """Frames per training crop: the predictor's warm-up (value input), a window of seq_len
        frames, and the target after it."""
        return self.warmup_frames + self.cfg.seq_len + 1

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

    def encode(self, model, tokens: torch.Tensor, check_tokens: bool = True, cur=None) -> torch.Tensor:
        """Quantiser tokens (B, L, C) -> the backbone's input (B, positions, D); `cur`: the
        positions' predictions (value input, `advance`)."""
        raise NotImplementedError

    def embed_steps(self, model, positions: torch.Tensor, cur=None) -> torch.Tensor:
        """Positions (model tokens, (...,) or (..., step_tokens)) -> (..., D). No range check."""
        raise NotImplementedError

    # -- values (value_input) -------------------------------------------------------------------
    @functools.cached_property
    def predictor(self):
        """The predictor the heads' means are anchored on (`sashimi.predictors`)."""
        from sashimi.predictors import PREDICTORS
        return PREDICTORS[self.cfg.predictor](self)

    @property
    def warmup_frames(self) -> int:
        """Frames a training crop runs through the predictor before its first input."""
        return self.predictor.warmup_frames if self.cfg.value_input else 0

    @property
    def value_features(self) -> int:
        """Inputs of `model.value_in` per position: each slot's value, and the predictor's extras."""
        return self.step_tokens * (1 + self.predictor.extra_inputs)

    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's tokens of positions (..., step_tokens) -> their places on their heads'
        grids in [-1, 1] (float32): the sample values themselves for linear quantisation."""
        return torch.stack([grid_values(tokens[..., j], self.levels(j)) for j in range(tokens.shape[-1])], -1)

    def new_value_state(self, batch: int, device=None) -> dict:
        """The predictor's state before any position, and its prediction of position 0 (zeros)."""
        return dict(predictor=self.predictor.new_state(batch, device),
                    anchor=torch.zeros(batch, 3 * self.step_tokens, device=device))

    def advance(self, positions: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the predictor through positions (B, T, step_tokens), updating `state` (from
        new_value_state). Returns (cur, nxt), (B, T, 3 step_tokens) each: the predictions
        (base, gain, log scale: `anchor`) of positions 0..T-1 and of 1..T."""
        base, gain, log_scale = self.predictor.run(state["predictor"], positions)
        nxt = torch.cat([base, gain, log_scale], -1)
        cur = torch.cat([state["anchor"][:, None].to(nxt.dtype), nxt[:, :-1]], 1)
        state["anchor"].copy_(nxt[:, -1])
        return cur, nxt

    def predict_frames(self, tokens: torch.Tensor, warmup: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: the predictor (from a fresh state) through quantiser tokens (B, L, C) of a
        layout with one position per frame; (cur, nxt) of `advance` for frames warmup..L-1."""
        positions = self.to_model(tokens).reshape(tokens.shape[0], tokens.shape[1], -1)
        cur, nxt = self.advance(positions, self.new_value_state(tokens.shape[0], tokens.device))
        return cur[:, warmup:], nxt[:, warmup:]

    def predictor_pcm(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Quantiser tokens (..., C) -> the model's tokens centred on 0 (PCM integers for linear
        audio) and each channel slot's levels: what the cascade sees."""
        levels = [self.levels(j) for j in range(self.step_tokens)]
        return self.to_model(tokens) - torch.tensor([lv // 2 for lv in levels]), levels

    def anchor(self, pred: torch.Tensor, j: int, first: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted value of slot j (...,) from a prediction (..., 3 step_tokens) and, for
        j > 0, the grid value `first` (...,) of slot 0 of the same position."""
        S = self.step_tokens
        if j == 0:
            return pred[..., 0]
        return pred[..., j] + pred[..., S + j] * (first - 1.0 / (self.levels(0) - 1))

    def anchored(self, head, o: torch.Tensor, pred: torch.Tensor, j: int, first: torch.Tensor | None = None):
        """Head j's output `o` made a correction to the prediction `pred` (`anchor`), and to its
        log scale where the predictor gives one."""
        S = self.step_tokens
        log_scale = pred[..., 2 * S + j] if self.predictor.scales else None
        return head.anchored(o, self.anchor(pred, j, first), log_scale)

    # the residuals' scale as inputs: 2^7 on the grid (a residual of 256 16-bit steps) is 1
    RESIDUAL_SCALE = 2.0 ** 7

    def with_values(self, model, x: torch.Tensor, tokens: torch.Tensor, cur: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding x (..., D) of positions (..., step_tokens) plus the projection of their
        values (and, for a predictor with extra inputs, of their residuals against `cur`, the
        positions' predictions (..., 2 step_tokens))."""
        if model.value_in is None:
            return x
        v = self.values(tokens)
        if self.predictor.extra_inputs:
            anchors = torch.stack([self.anchor(cur, j, v[..., 0]) for j in range(self.step_tokens)], -1)
            v = torch.cat([v, ((v - anchors) * self.RESIDUAL_SCALE).clamp(-64.0, 64.0)], -1)
        return x + model.value_in(v)

    # -- heads and targets ----------------------------------------------------------------------
    def step_output(self, model, h: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """What a recurrent step returns for backbone outputs h (..., D): h, followed (with
        value_input) by the next position's prediction (..., 2 step_tokens) (`anchor`)."""
        return h if anchor is None else torch.cat([h, anchor], -1)

    def prefill_output(self, model, h: torch.Tensor, nxt: torch.Tensor | None, return_all: bool):
        """The step outputs of all T positions (B, T, ...) at once (return_all), or of the last,
        from backbone outputs h (B, T, D) and the predictions `nxt` of `advance`."""
        if not return_all:
            h, nxt = h[:, -1], None if nxt is None else nxt[:, -1]
        return self.step_output(model, h, nxt)

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
                check_tokens: bool, nxt: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the backbone outputs h (B, P, D) of quantiser tokens (B, L, C) -> head
        outputs. `next_tokens`: the model's tokens of the positions after each (what a head
        conditions on), when the layout needs them; `nxt`: the predictions of the positions
        after each (value input)."""
        raise NotImplementedError

    def nll_bits(self, model, batch: torch.Tensor, check_tokens: bool = True) -> torch.Tensor:
        """batch: quantiser tokens (B, W + L + 1, C), W = `warmup_frames` -> NLL of every target in
        bits (B, L*C), in the layout's target order (`per_channel` splits it)."""
        raise NotImplementedError

    def per_channel(self, nll: torch.Tensor) -> list[torch.Tensor]:
        """Split (B, L*C) target NLLs (from nll_bits) by the target's channel (channel_names)."""
        B, T = nll.shape
        C = self.cfg.channels
        return list(nll.view(B, T // C, C).unbind(2)) if C > 1 else [nll]
