"""Stereo as frames: one backbone position per frame, R predicted given L (stereo only).

tokens (B, L, 2) --kernels.embed_frames--> (B, L, D), a joint embedding of (L_t, R_t) (one
table per channel, summed) --backbone--> h_t. The head predicts L_{t+1} from h_t and R_{t+1}
from h_t plus L_{t+1} (`RightGivenLeft`: teacher-forced in training, sampled first in
generation), so R still conditions on L of the same instant. Half the positions of
interleave: half the backbone work per second of audio, half the generation steps. Target
2t + c of `nll_bits` is channel c of frame t + 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.profiling import nvtx_range
from sashimi.layouts.base import LN2, Layout
from sashimi.blocks import FeedForward, Residual, embedding_init, grid_values


class RightGivenLeft(nn.Module):
    """The head input of a frame's second channel: the backbone output h_t plus its first.

    right = u + FF(LayerNorm(u)), u = h_t + E[first_{t+1}] (E its own table): one residual
    feed-forward block, so the second channel's distribution can depend on the first jointly
    with the context (a linear head on h + E[first] could only add a per-token bias)."""

    def __init__(self, d: int, levels: int, expand: int, embed_init: str = "ordinal", value_input: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(levels, d)
        with torch.no_grad():
            self.embedding.weight.copy_(embedding_init(levels, d, embed_init, seed=7))
            if value_input:   # as the model's own table: the first channel's value says what its row would
                self.embedding.weight.zero_()
        self.value_in = nn.Linear(1, d) if value_input else None
        self.block = Residual(d, FeedForward(d, expand))

    def forward(self, h: torch.Tensor, left: torch.Tensor, check_tokens: bool = False,
                backend: str = "reference") -> torch.Tensor:
        """h (..., D), left (...) tokens -> (..., D)."""
        if h.dim() == 3:  # training: the one embedding op (mono is its C = 1 case)
            e = kernels.embed_interleave(left[..., None], self.embedding.weight, check=check_tokens,
                                         deterministic=torch.are_deterministic_algorithms_enabled(),
                                         backend=backend)
        else:
            e = F.embedding(left.long(), self.embedding.weight)
        if self.value_in is not None:
            e = e + self.value_in(grid_values(left, self.embedding.num_embeddings).unsqueeze(-1))
        return self.block(h + e)


class Frames(Layout):
    name = "frames"
    step_tokens = 2

    @classmethod
    def problems(cls, cfg) -> list[str]:
        out = []
        if cfg.channels != 2:
            out.append(f"stereo_layout {cls.name!r} needs stereo (channels=2: train --stereo)")
        if cfg.tie_weights:
            out.append(f"weight tying needs the interleave layout ({cls.name} has one table per channel)")
        return out

    def build(self, model) -> None:
        cfg = self.cfg
        V, D, C = cfg.levels, cfg.d_model, cfg.channels
        # one table per channel, rows [c V, (c + 1) V) (kernels.embed_frames sums them)
        model.embedding = nn.Embedding(C * V, D)
        with torch.no_grad():
            for c in range(C):  # distinct tables, so that L and R are told apart at init
                model.embedding.weight[c * V:(c + 1) * V] = embedding_init(V, D, cfg.embed_init, c) / math.sqrt(C)
            if cfg.value_input:  # the values carry the amplitude; the tables learn corrections
                model.embedding.weight.zero_()
        model.value_in = nn.Linear(self.value_features, D) if cfg.value_input else None
        model.right = RightGivenLeft(D, V, max(cfg.ff, 1), cfg.embed_init, cfg.value_input)

    def tables(self, model) -> torch.Tensor:
        """The embedding as kernels.embed_frames takes it: (C, V, D)."""
        return model.embedding.weight.view(self.cfg.channels, self.cfg.levels, -1)

    def encode(self, model, tokens, check_tokens=True, cur=None):
        x = kernels.embed_frames(tokens, self.tables(model), check=check_tokens,
                                 deterministic=torch.are_deterministic_algorithms_enabled(),
                                 backend=self.cfg.kernel_backend)
        return self.with_values(model, x, tokens, cur)

    def embed_steps(self, model, positions, cur=None):
        offsets = torch.arange(self.cfg.channels, device=positions.device) * self.cfg.levels
        return self.with_values(model, F.embedding(positions.long() + offsets, model.embedding.weight).sum(-2),
                                positions, cur)

    def head_output(self, model, out, j, given=None):
        D = self.cfg.d_model
        h = out[..., :D]               # value_input: the prediction follows h
        head = self.heads(model)[j]
        o = head(h if j == 0 else model.right(h, given[..., 0]))
        if not self.cfg.value_input:
            return o
        first = None if j == 0 else grid_values(given[..., 0], self.levels(0))
        return self.anchored(head, o, out[..., D:], j, first)

    def forward(self, model, tokens, h, next_tokens, check_tokens, nxt=None):
        if next_tokens is None or next_tokens.shape != h.shape[:2]:
            raise ValueError(f"the {self.name} layout needs next_left {tuple(h.shape[:2])} (the first "
                             f"channel of the next frames), got "
                             f"{None if next_tokens is None else tuple(next_tokens.shape)}")
        heads = self.heads(model)
        right = model.right(h, next_tokens, check_tokens, self.cfg.kernel_backend)
        out = [heads[0](h), heads[1](right)]
        if self.cfg.value_input:
            first = grid_values(next_tokens, self.levels(0))
            out = [self.anchored(heads[c], o, nxt, c, first) for c, o in enumerate(out)]
        return torch.stack(out, 2)

    def nll_bits(self, model, batch, check_tokens=True):
        W = self.warmup_frames
        B, L1, C = batch.shape
        L = L1 - 1 - W
        targets = self.to_model(batch[:, W + 1:])
        out = model(batch[:, :W + L], check_tokens, next_left=targets[..., 0], warmup=W)
        with nvtx_range("sashimi/model/loss"):
            heads = self.heads(model)
            if heads[0] is heads[1]:     # one head for both channels: one call
                logp = heads[0].log_prob(out, targets)
            else:
                logp = torch.stack([heads[c].log_prob(out[:, :, c], targets[..., c]) for c in range(C)], -1)
            return (-logp / LN2).reshape(B, L * C)
