"""FLAC's fixed second-order prediction, 2 v[t] - v[t-1], of each channel slot, on the grid
values v. The predictor of models trained before the cascade (and `--predictor fixed2`)."""
from __future__ import annotations

import torch

from sashimi.predictors.base import Predictor


class Fixed2(Predictor):
    name = "fixed2"

    def new_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.layout.step_tokens, device=device)   # v[t-1]; 0 at the start

    def run(self, state, positions):
        v = self.layout.values(positions)
        base = 2.0 * v - torch.cat([state[:, None].to(v.dtype), v[:, :-1]], 1)
        state.copy_(v[:, -1])
        zero = torch.zeros_like(base)
        return base, zero, zero
