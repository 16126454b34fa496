"""Stereo as mid/side frames, for 16-bit linear audio: M = floor((L + R) / 2), S = L - R.

FLAC's stereo decorrelation. On integer samples the pair is exactly invertible (L + R =
2M + (S mod 2), L = (L + R + S) / 2, R = (L + R - S) / 2), so the model's likelihood of (M, S)
is a likelihood of (L, R) and a codec built on it stays lossless. M has the 16-bit grid of L
and R; S spans [-65535, 65535], one bit more, and gets a DML head of its own on a grid of
2^17 values (`side_head`; the top one no pair gives). Otherwise it is the frames layout: one
backbone position per frame, a joint embedding of (M_t, S_t) (one table per channel, summed),
M_{t+1} predicted from h_t and S_{t+1} from h_t plus M_{t+1} (`RightGivenLeft`), and with
value_input the values of M and S as input and each head's means anchored on its own
channel's history. Targets and per-channel NLLs are M and S.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import check_tokens as check_range
from sashimi.layouts.frames import Frames, RightGivenLeft
from sashimi.blocks import embedding_init
from sashimi.heads import HEADS

LEVELS = 2 ** 16                 # L, R and M: 16-bit linear tokens (sample + 32768)
# S = L - R in [-65535, 65535]: token S + 65535, on a grid of 2^17 (the codec codes power-of-two
# alphabets; the top token, S = 65536, no pair gives)
SIDE_LEVELS = 2 * LEVELS


class MidSide(Frames):
    name = "midside"
    step_tokens = 2

    @classmethod
    def problems(cls, cfg) -> list[str]:
        out = super().problems(cfg)
        if cfg.bits != 16 or cfg.quantization != "linear":
            out.append(f"stereo_layout {cls.name!r} needs 16-bit linear audio (--bits 16 --quantization linear)")
        if cfg.head != "dml":
            out.append(f"stereo_layout {cls.name!r} needs the DML head (--head dml): S has 2^17 values")
        return out

    @property
    def channel_names(self) -> list[str]:
        return ["M", "S"]

    def levels(self, j: int) -> int:
        return LEVELS if j == 0 else SIDE_LEVELS

    # -- tokens ---------------------------------------------------------------------------------
    def to_model(self, tokens):
        left, right = tokens[..., 0].long(), tokens[..., 1].long()
        mid = torch.div(left + right, 2, rounding_mode="floor")     # the offsets cancel: M + 32768
        return torch.stack([mid, left - right + (LEVELS - 1)], -1)

    def from_model(self, tokens):
        mid, side = tokens[..., 0].long(), tokens[..., 1].long() - (LEVELS - 1)
        total = 2 * mid + (side & 1)                                  # L + R, in tokens
        # a pair that no (L, R) gives (a sample can draw one: |S| near 2^16 with M far from 0)
        # is clipped to the grid; every pair that to_model makes comes back exactly
        return torch.stack([(total + side) // 2, (total - side) // 2], -1).clamp(0, LEVELS - 1)

    # -- the model's pieces ---------------------------------------------------------------------
    def build(self, model) -> None:
        cfg = self.cfg
        D = cfg.d_model
        # rows [0, 2^16): M; [2^16, 2^16 + 2^17): S
        model.embedding = nn.Embedding(LEVELS + SIDE_LEVELS, D)
        with torch.no_grad():
            for c, (start, n) in enumerate(((0, LEVELS), (LEVELS, SIDE_LEVELS))):
                model.embedding.weight[start:start + n] = embedding_init(n, D, cfg.embed_init, c) / math.sqrt(2)
            if cfg.value_input:  # the values carry the amplitude; the tables learn corrections
                model.embedding.weight.zero_()
        model.value_in = nn.Linear(self.value_features, D) if cfg.value_input else None
        model.right = RightGivenLeft(D, LEVELS, max(cfg.ff, 1), cfg.embed_init, cfg.value_input)
        model.side_head = HEADS[cfg.head].from_config(cfg, D, SIDE_LEVELS)
        if cfg.value_input:
            model.side_head.init_for_prediction(self.predictor.scales)

    def heads(self, model) -> list:
        return [model.head, model.side_head]

    def encode(self, model, tokens, check_tokens=True, cur=None):
        if check_tokens:
            check_range(tokens, LEVELS, "midside")
        return self.embed_steps(model, self.to_model(tokens), cur)

    def embed_steps(self, model, positions, cur=None):
        offsets = torch.tensor([0, LEVELS], device=positions.device)
        return self.with_values(model, F.embedding(positions.long() + offsets, model.embedding.weight).sum(-2),
                                positions, cur)
