"""Stereo as one interleaved sequence L0 R0 L1 R1 ... (the default stereo layout).

tokens (B, L, C) --kernels.embed_interleave--> (B, L*C, D) --backbone--> head --> loss. The
backbone is the same as mono's, only its length (l_max = seq_len * C) changes. Output position
i predicts interleaved token i + 1, so the target of position i belongs to channel (i + 1) % C.
A position holds one token; a step returns the head output of the next token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.profiling import nvtx_range
from sashimi.layouts.base import LN2, Layout
from sashimi.blocks import embedding_init


class Interleave(Layout):
    name = "interleave"
    step_tokens = 1

    @classmethod
    def problems(cls, cfg) -> list[str]:
        if cfg.value_input and cfg.channels == 2:   # its anchor would extrapolate across channels
            return ["value_input needs mono or the frames stereo layout (--stereo-layout frames)"]
        return []

    def build(self, model) -> None:
        cfg = self.cfg
        model.embedding = nn.Embedding(cfg.levels, cfg.d_model)
        with torch.no_grad():
            model.embedding.weight.copy_(embedding_init(cfg.levels, cfg.d_model, cfg.embed_init))
            if cfg.value_input:  # the values carry the amplitude; the table learns corrections
                model.embedding.weight.zero_()
        model.value_in = nn.Linear(self.value_features, cfg.d_model) if cfg.value_input else None
        model.right = None

    def tables(self, model) -> torch.Tensor:
        return model.embedding.weight

    def encode(self, model, tokens, check_tokens=True, cur=None):
        # fp32 out even under bf16 autocast: it starts the residual stream, which stays fp32;
        # under torch.use_deterministic_algorithms the backward sums in a fixed order
        x = kernels.embed_interleave(tokens, model.embedding.weight, check=check_tokens,
                                     deterministic=torch.are_deterministic_algorithms_enabled(),
                                     backend=self.cfg.kernel_backend)
        B, L, C = tokens.shape
        return self.with_values(model, x, tokens.reshape(B, L * C, 1), cur)

    def embed_steps(self, model, positions, cur=None):
        return self.with_values(model, F.embedding(positions.long(), model.embedding.weight), positions[..., None], cur)

    def step_output(self, model, h, anchor=None):
        out = model.head(h)           # one token per position: the step gives its distribution
        return out if anchor is None else self.anchored(model.head, out, anchor, 0)

    def forward(self, model, tokens, h, next_tokens, check_tokens, nxt=None):
        return self.step_output(model, h, nxt)

    def head_output(self, model, out, j, given=None):
        return out

    def log_prob_next(self, model, out, tokens):
        return model.head.log_prob(out, tokens[..., 0])[..., None]

    def nll_bits(self, model, batch, check_tokens=True):
        W = self.warmup_frames
        B, L1, C = batch.shape
        L = L1 - 1 - W
        out = model(batch[:, :W + L], check_tokens, warmup=W)
        targets = batch[:, W:].reshape(B, (L + 1) * C)[:, 1: L * C + 1]
        with nvtx_range("sashimi/model/loss"):
            return -model.head.log_prob(out, targets) / LN2

    def per_channel(self, nll):
        B, T = nll.shape
        C = self.cfg.channels
        # position i predicts channel (i + 1) % C: roll so that column c is channel c
        return list(torch.roll(nll.view(B, T // C, C), shifts=1, dims=2).unbind(2)) if C > 1 else [nll]
