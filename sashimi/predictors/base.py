"""What a predictor provides: the value that a value-input model's heads are anchored on.

A value-input model (`ModelConfig.value_input`) predicts each sample as a correction to a
predictor's value: the head's means are `anchor + DELTA_SCALE x` the network's output. The
predictor runs identically in training (over a crop), prefill, the recurrent step, generation,
evaluation and both sides of the codec, so it must be causal and deterministic: after position
t it predicts position t + 1 from positions <= t only.

A predictor is a `Predictor` subclass in one module of `sashimi/predictors/`, registered in
`PREDICTORS` (`sashimi/predictors/__init__.py`), with a test; nothing else changes.
"""
from __future__ import annotations

import torch


class Predictor:
    name = "?"
    extra_inputs = 0      # features per channel slot beyond the value that enter the embedding
    graph_safe = True     # runs inside a CUDA graph (torch ops on the model's device only)
    warmup_frames = 0     # frames a training crop runs through before its first target
    scales = False        # whether `run`'s log scale anchors the heads' scales too
    min_chunk_seconds = 0.0   # the codec's shortest automatic chunk (each restarts the predictor)

    def __init__(self, layout):
        self.layout = layout

    @classmethod
    def problems(cls, cfg) -> list[str]:
        """What in `cfg` this predictor cannot run (one phrase each)."""
        return []

    def new_state(self, batch: int, device=None):
        """The state before any position: a tensor or a dict of tensors, batch first."""
        raise NotImplementedError

    def run(self, state, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance `state` (in place) through positions (B, T, S) of model tokens; return base,
        gain, log_scale (B, T, S) float32 on the positions' device, on the heads' grids of
        [-1, 1]: after position t, slot j of position t + 1 is predicted as
            base[:, t, j] + gain[:, t, j] * (v0 - 1 / (levels(0) - 1)),
        v0 the grid value of slot 0 of position t + 1 (gain is 0 for slot 0), with a logistic
        scale of about exp(log_scale) (used when `scales`)."""
        raise NotImplementedError
