"""SaShiMi for mono and stereo audio: its config, backbone and the model (the blocks are in
`sashimi.blocks`, the heads in `sashimi.heads`), and the recurrent step.

tokens --layout (embedding)--> backbone --> head --> loss, and back out through the
recurrent step. How frames of audio become positions (and which token the head predicts from
what) is the stereo layout's (`sashimi.layouts`, named by `ModelConfig.stereo_layout`): the
model asks `self.layout` and never which layout it is. The losses are reported overall and
per channel.

Every module has `forward` (convolutional, training) and `step` (recurrent, generation) with
`default_state(batch)`; `SaShiMi.setup_step()` prepares the recurrence once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from kernels.profiling import nvtx_range
from sashimi.blocks import DownPool, FeedForward, Residual, UpPool
from sashimi.heads import HEADS
from sashimi.quantize import KINDS as QUANTIZATION_KINDS
from sashimi.quantize import Quantizer
from sashimi.s4 import S4Layer

LN2 = math.log(2.0)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and to read and write its audio."""
    d_model: int = 64
    n_layers: int = 8
    pool: tuple[int, ...] = (4, 4)
    expand: int = 2
    ff: int = 2
    d_state: int = 64
    ssm: str = "dplr"
    init: str | None = None
    dropout: float = 0.0
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_per_length: float = 0.0    # > 0: per tier, dt_min >= dt_per_length / the tier's l_max (tier_dt_range)
    bits: int = 8
    quantization: str = "mu-law"
    channels: int = 1
    sample_rate: int = 16000
    seq_len: int = 16384          # frames per training example; l_max = seq_len * channels
    head: str = "categorical"
    n_mixtures: int = 10
    tie_weights: bool = False
    stereo_layout: str = "interleave"  # a name in sashimi.layouts.LAYOUTS (docs/layouts.md)
    embed_init: str = "ordinal"    # "ordinal" (amplitude-aware, see ordinal_embedding) or "normal"
    # the sample values enter as numbers (a linear projection beside the token table, which then
    # starts at zero) and the DML means are small corrections to a predictor's value of the
    # predicted channel (`predictor`): what makes a 16-bit linear model a predictor (a
    # 65,536-row table alone is not). The layout adds both; every layout but stereo interleave
    # takes it.
    value_input: bool = False
    # what the value-input heads' means are corrections to (a name in sashimi.predictors.PREDICTORS):
    # "fixed2" (the models before it), "cascade" (adaptive least squares + NLMS, the codec's)
    predictor: str = "fixed2"
    kernel_backend: str = "auto"

    def __post_init__(self):
        # every field is checked here, by the rules in CONFIG_RULES (a field without a rule must
        # have the type of its default), so a config read from a file never builds a wrong model
        problems = []
        for field in dataclasses.fields(self):
            rule = CONFIG_RULES.get(field.name) or _of_type(type(field.default))
            problem = rule(getattr(self, field.name))
            if problem:
                problems.append(f"{field.name} {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        self.pool = tuple(self.pool)
        if self.dt_min > self.dt_max:
            problems.append(f"dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        if self.init is not None and self.init not in SSM_INITS[self.ssm]:
            problems.append(f"init {self.init!r} does not fit ssm {self.ssm!r} (one of {SSM_INITS[self.ssm]}, or None)")
        if self.value_input and self.tie_weights:
            problems.append("value_input needs untied weights (its token table starts at zero)")
        if self.tie_weights and self.head != "categorical":
            problems.append("weight tying needs the categorical head")
        problems += self.layout.problems(self)
        if self.value_input:
            from sashimi.predictors import PREDICTORS
            problems += PREDICTORS[self.predictor].problems(self)
        if not problems and self.l_max % self.pool_factor:
            what = "seq_len x channels" if self.step_tokens < self.channels else "seq_len"
            problems.append(f"{what} = {self.l_max} must be a multiple of the total pooling "
                            f"factor {self.pool_factor} (pool={list(self.pool)})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def layout(self):
        """The stereo layout object (`sashimi.layouts`): frames <-> positions, embedding, schedule."""
        from sashimi.layouts import layout_for
        return layout_for(self)

    @property
    def quantizer(self) -> Quantizer:
        """The token map of the model's audio (bits, quantization)."""
        return Quantizer(self.quantization, self.bits)

    @property
    def step_tokens(self) -> int:
        """Tokens consumed (and generated) per backbone position (the layout's)."""
        return self.layout.step_tokens

    @property
    def samples(self) -> int:
        """Audio samples (tokens) per training example: seq_len frames x channels."""
        return self.seq_len * self.channels

    @property
    def l_max(self) -> int:
        """Backbone positions per training example."""
        return self.layout.positions_per_example

    @property
    def pool_factor(self) -> int:
        return math.prod(self.pool)

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pool"] = list(self.pool)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------- config field rules
# Each rule returns None or what is wrong ("must be ..., got ..."). The bounds are what a model
# can sensibly have, far beyond the presets; they keep a config read from a file from building
# a model that cannot fit any machine.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(least: int, most: int, even: bool = False):
    def rule(v):
        if not _is_int(v) or not least <= v <= most or (even and v % 2):
            return f"must be {'an even' if even else 'an'} integer in [{least}, {most}], got {v!r}"
    return rule


def _float(least: float, most: float, below_most: bool = False):
    def rule(v):
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and least <= v and (v < most if below_most else v <= most))
        if not ok:
            return f"must be a finite number in [{least}, {most}{')' if below_most else ']'}, got {v!r}"
    return rule


def _positive_float(most: float):
    def rule(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= most
        if not ok:
            return f"must be a finite number in (0, {most}], got {v!r}"
    return rule


def _layout_names() -> tuple[str, ...]:
    from sashimi.layouts import LAYOUTS   # the layouts build on this module
    return tuple(LAYOUTS)


def _predictor_names() -> tuple[str, ...]:
    from sashimi.predictors import PREDICTORS
    return tuple(PREDICTORS)


def _one_of(*choices):
    def rule(v):
        if type(v) not in {type(c) for c in choices} or v not in choices:   # 2.0 is not 2, True not 1
            return f"must be one of {', '.join(map(repr, choices))}, got {v!r}"
    return rule


def _of_type(kind: type):
    def rule(v):
        ok = (_is_int(v) if kind is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else isinstance(v, kind))
        if not ok:
            return f"must be a {kind.__name__}, got {v!r}"
    return rule


def _pool(v):
    if not isinstance(v, (list, tuple)) or not 0 <= len(v) <= 8 or not all(_is_int(p) and 1 <= p <= 64 for p in v):
        return f"must be a list of at most 8 integers in [1, 64], got {v!r}"


def _init(v):
    if v is not None and v not in {i for inits in SSM_INITS.values() for i in inits}:
        return f"must be None or one of {sorted({i for inits in SSM_INITS.values() for i in inits})}, got {v!r}"


SSM_INITS = {"dplr": ("legs",), "diag": ("lin", "inv")}
CONFIG_RULES = {
    "d_model": _int(1, 8192),
    "n_layers": _int(1, 1024),
    "pool": _pool,
    "expand": _int(1, 64),
    "ff": _int(0, 64),                 # 0: no feed-forward blocks
    "d_state": _int(2, 4096, even=True),
    "ssm": _one_of(*SSM_INITS),
    "init": _init,
    "dropout": _float(0.0, 1.0, below_most=True),
    "dt_min": _positive_float(1e3),
    "dt_max": _positive_float(1e3),
    "dt_per_length": _float(0.0, 1e6),
    "bits": _one_of(8, 16),
    "quantization": _one_of(*QUANTIZATION_KINDS),
    "channels": _one_of(1, 2),
    "sample_rate": _int(1, 768_000),
    "seq_len": _int(1, 2 ** 24),
    "head": _one_of(*HEADS),
    "n_mixtures": _int(1, 1024),
    "tie_weights": _of_type(bool),
    "stereo_layout": lambda v: _one_of(*_layout_names())(v),
    "embed_init": _one_of("ordinal", "normal"),
    "value_input": _of_type(bool),
    "predictor": lambda v: _one_of(*_predictor_names())(v),
    "kernel_backend": _one_of("auto", "triton", "reference"),
}


PRESETS = {
    # trains on a laptop CPU in minutes. S4D (half the CPU step time of DPLR) with each tier's
    # memory bounded by its training window (dt_per_length), so that it generates far beyond
    # its 64 ms window without drifting into noise (QUALITY.md has the measurements)
    "tiny": dict(d_model=32, n_layers=2, pool=(4, 4), expand=2, ff=2, d_state=16, seq_len=1024,
                 ssm="diag", dt_per_length=8.0),
    # the SaShiMi paper's model
    "paper": dict(d_model=64, n_layers=8, pool=(4, 4), expand=2, ff=2, d_state=64, seq_len=16384),
}


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------


def tier_dt_range(cfg: ModelConfig, l_max: int) -> tuple[float, float]:
    """The (dt_min, dt_max) of the S4 layers of a tier trained on sequences of length l_max.

    With dt_per_length = c > 0, dt_min >= c / l_max: the slowest mode then decays within the
    window the tier is trained on (S4D-Lin, Re(A) = -1/2: to exp(-c/2); HiPPO-LegS, slowest
    eigenvalue -1: to exp(-c)), so nothing the model does beyond its training window is
    untrained: the continuous recurrence predicts as well at any position as inside a window
    (QUALITY.md). dt_max grows to at least 10 dt_min. c = 0: the global range
    everywhere (the public SaShiMi's, which trains on 8 s windows)."""
    if cfg.dt_per_length <= 0:
        return cfg.dt_min, cfg.dt_max
    lo = max(cfg.dt_min, cfg.dt_per_length / l_max)
    return lo, max(cfg.dt_max, 10 * lo)


def _tier(d: int, cfg: ModelConfig, l_max: int) -> nn.ModuleList:
    layers = []
    dt_min, dt_max = tier_dt_range(cfg, l_max)
    for _ in range(cfg.n_layers):
        layers.append(Residual(d, S4Layer(d, cfg.d_state, l_max, cfg.ssm, cfg.init, dt_min,
                                           dt_max, cfg.dropout, cfg.kernel_backend)))
        if cfg.ff > 0:
            layers.append(Residual(d, FeedForward(d, cfg.ff, cfg.dropout)))
    return nn.ModuleList(layers)


class Backbone(nn.Module):
    """The SaShiMi backbone: DownPools, a centre tier of S4 + FF blocks, UpPools each followed
    by a tier of S4 + FF blocks, skip connections around every level, a final LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, l_max = cfg.d_model, cfg.l_max
        down = []
        for p in cfg.pool:
            down.append(DownPool(H, cfg.expand, p))
            H, l_max = H * cfg.expand, l_max // p
        self.down = nn.ModuleList(down)
        self.center = _tier(H, cfg, l_max)
        ups, up_tiers = [], []
        for p in reversed(cfg.pool):
            ups.append(UpPool(H, cfg.expand, p))
            H, l_max = H // cfg.expand, l_max * p
            up_tiers.append(_tier(H, cfg, l_max))
        self.up = nn.ModuleList(ups)
        self.up_tiers = nn.ModuleList(up_tiers)
        self.norm = nn.LayerNorm(H)

    def walk(self, x, down, tier, up):
        """The U-Net, shared by `forward`, `step` and prefill (sashimi.prefill): each down pool
        (`down(i, x)`; None: this level and the ones below it do not run now, as in `step`), the
        center tier plus the skip around it, then per level `up(j, x, skip)` (the UpPool plus
        its skip; x is None when the center did not run: the pool replays its buffer) and that
        level's tier plus its residual. `tier(i, x)`: tier i (0 = center, 1 + j = up tier j)
        without its skip. Returns the final LayerNorm of the output."""
        skips = [x]
        for i in range(len(self.down)):
            x = down(i, x)
            if x is None:
                break
            skips.append(x)
        n = len(self.down)
        if x is not None:
            x = tier(0, x) + skips.pop()
            first = 0
        else:  # tiers above len(skips) - 1 did not run: their UpPools replay buffered outputs
            first = n - len(skips)
        for j in range(first, n):
            x = up(j, x, skips.pop())
            x = tier(1 + j, x) + x
        return self.norm(x)

    def forward(self, x):
        def down(i, x):
            with nvtx_range(f"sashimi/model/down{i}"):
                return self.down[i](x)

        def tier(i, x):
            with nvtx_range("sashimi/model/center" if i == 0 else f"sashimi/model/up{i - 1}"):
                for layer in self._tiers()[i]:
                    x = layer(x)
                return x

        return self.walk(x, down, tier, lambda j, x, skip: self.up[j](x) + skip)

    def _tiers(self) -> list[nn.ModuleList]:
        return [self.center, *self.up_tiers]

    def default_state(self, batch, device=None):
        """Pool buffers, and per tier ONE stacked S4 state (n_s4_layers, B, H, N) complex64:
        layer k's state is its view [k] (what `kernels.tier_step` updates in one launch)."""
        def tier_state(tier):
            s4 = [m.layer for m in tier if isinstance(m.layer, S4Layer)]
            return torch.zeros(len(s4), batch, s4[0].H, s4[0].N, dtype=torch.complex64, device=device)
        return dict(
            down=[p.default_state(batch, device) for p in self.down],
            center=tier_state(self.center),
            up=[p.default_state(batch, device) for p in self.up],
            up_tiers=[tier_state(tier) for tier in self.up_tiers],
        )

    @staticmethod
    def layer_states(tier: nn.ModuleList, stacked: torch.Tensor) -> list:
        """Per-layer states of a tier: views of the stacked S4 state, None for FF blocks."""
        out, k = [], 0
        for m in tier:
            if isinstance(m.layer, S4Layer):
                out.append(stacked[k])
                k += 1
            else:
                out.append(None)
        return out

    def pack_step_params(self, fused: bool = True) -> None:
        """Stack every tier's step constants and weights for `kernels.tier_step` (after the
        S4 layers' setup_step; again after any weight change). fused=False: step module by
        module instead."""
        self._packed = ([(*pack_tier(tier), tier[0].layer.kernel_backend) for tier in self._tiers()]
                        if fused else None)

    def _tier_step(self, i: int, x: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
        packed = getattr(self, "_packed", None)
        if packed is None:  # module by module
            tier = self._tiers()[i]
            for layer, s in zip(tier, self.layer_states(tier, stacked)):
                x = layer.step(x, s)
            return x
        params, ssm, backend = packed[i]
        return kernels.tier_step(x, stacked, params, ssm, backend=backend)

    def phases(self, t: int) -> list[int]:
        """Slot of step t in each pool's block, finest first: tier i runs when every pool
        below it is at its last slot. Depends only on t mod prod(pool)."""
        out, stride = [], 1
        for pool in self.down:
            out.append((t // stride) % pool.pool)
            stride *= pool.pool
        return out

    def step(self, x, state, t: int):
        """Interleaved time step t: (B, H) -> (B, H). Coarser tiers run every p-th step; what
        runs depends only on t mod prod(pool), so each of those variants is a static graph."""
        phases = self.phases(t)
        n = len(self.down)
        stacked = [state["center"], *state["up_tiers"]]
        return self.walk(
            x,
            lambda i, x: self.down[i].step(x, state["down"][i], phases[i]),
            lambda i, x: self._tier_step(i, x, stacked[i]),
            # UpPool j feeds tier n - 1 - j: its slot is that tier's phase
            lambda j, x, skip: self.up[j].step(x, state["up"][j], phases[n - 1 - j]) + skip)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class SaShiMi(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = cfg.layout
        V, D = cfg.levels, cfg.d_model
        self.layout.build(self)            # the embedding (and any head input of its own)
        self.backbone = Backbone(cfg)
        self.head = HEADS[cfg.head].from_config(cfg, D, V)
        if cfg.tie_weights:
            self.head.linear.weight = self.embedding.weight
        if cfg.value_input:
            self.head.init_for_prediction(self.layout.predictor.scales)

    def encode(self, tokens: torch.Tensor, check_tokens: bool = True, cur: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, C) -> the backbone's input (B, positions, D), as the layout embeds
        them (`cur`: the positions' predictions, value input). check_tokens=False skips the
        range check (a host sync on CUDA) for callers that have validated the tokens already,
        as the trainer does on the CPU side of the loader."""
        with nvtx_range("sashimi/model/encoder"):
            return self.layout.encode(self, tokens, check_tokens, cur)

    def forward(self, tokens: torch.Tensor, check_tokens: bool = True,
                next_left: torch.Tensor | None = None, warmup: int = 0) -> torch.Tensor:
        """tokens (B, W + L, C) -> head outputs of the last L frames (the layout's: interleave
        (B, L*C, V or 3*n_mixtures), position i predicts interleaved token i + 1; a frame per
        position (B, L, C, ...), the outputs for frame t + 1, given next_left (B, L): the
        model's first channel of frames 1..L, on which the second channel's head conditions).
        The first W = `warmup` frames only run the predictor (value input)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.cfg.channels:
            raise ValueError(f"tokens must be (batch, frames, {self.cfg.channels}), got {tuple(tokens.shape)}")
        cur = nxt = None
        if self.cfg.value_input:   # a value-input layout has one position per frame
            with nvtx_range("sashimi/model/predictor"):
                cur, nxt = self.layout.predict_frames(tokens, warmup)
        tokens = tokens[:, warmup:]
        h = self.backbone(self.encode(tokens, check_tokens, cur))
        with nvtx_range("sashimi/model/head"):
            return self.layout.forward(self, tokens, h, next_left, check_tokens, nxt)

    def nll_bits(self, batch: torch.Tensor, check_tokens: bool = True) -> torch.Tensor:
        """batch: tokens (B, L + 1, C). Returns the NLL of every target, in bits, (B, L*C), in
        the layout's target order (`self.layout.per_channel` splits it by channel)."""
        return self.layout.nll_bits(self, batch, check_tokens)

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def setup_step(self, fused: bool = True) -> None:
        """Prepare the recurrence: every S4 layer's exact step, and (fused=True) each tier's
        stacked weights so that one `kernels.tier_step` launch runs a whole tier."""
        for m in self.modules():
            if isinstance(m, S4Layer):
                m.setup_step()
        self.backbone.pack_step_params(fused)

    def default_state(self, batch: int, device=None):
        device = self.embedding.weight.device if device is None else device
        state = self.backbone.default_state(batch, device)
        if self.cfg.value_input:   # the predictor's state and its prediction of the next position
            state["values"] = self.layout.new_value_state(batch, device)
        return state

    def advance(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run the predictor (value input) through positions (the layout's: (B, T) or
        (B, T, C)), updating `state`: (cur, nxt), the predictions of these positions and of
        the ones after each (`Layout.advance`); (None, None) without value input."""
        if not self.cfg.value_input:
            return None, None
        return self.layout.advance(tokens.reshape(tokens.shape[0], tokens.shape[1], -1), state["values"])

    def embed_steps(self, tokens: torch.Tensor, cur: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone input of positions (the layout's: one token (...,) or a frame
        (..., C)) -> (..., D), for the recurrence and prefill; `cur`: their predictions (from
        `advance`). No range check (graph-capturable)."""
        return self.layout.embed_steps(self, tokens, cur)

    def step(self, token: torch.Tensor, state, t: int) -> torch.Tensor:
        """Position t -> the step output that the next position's tokens are drawn from (see
        sample_next / log_prob_next). `state` (from default_state) is updated in place.
        One token per position: token t (B,) -> head output for token t + 1; a frame per
        position: frame t (B, C) -> the backbone output h_t (B, D), with value_input followed
        by the next frame's prediction (the second channel's head input depends on the first,
        sampled from it)."""
        cur, nxt = self.advance(token[:, None], state)
        if cur is not None:
            cur, nxt = cur[:, 0], nxt[:, 0]
        h = self.backbone.step(self.embed_steps(token, cur), state, t)
        return self.layout.step_output(self, h, nxt)

    def prefill_output(self, h: torch.Tensor, nxt: torch.Tensor | None, return_all: bool) -> torch.Tensor:
        """prefill's `out` from the backbone outputs h (B, T, D) and the predictions `nxt` of
        `advance`: what `step` returns after the last position (B, ...), or after every one
        (B, T, ...)."""
        return self.layout.prefill_output(self, h, nxt, return_all)

    @torch.no_grad()
    def sample_next(self, out: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next position's tokens (B, step_tokens) sampled from a step output (B, ...), and
        their exact natural-log probability under the model (B,), each channel given the ones
        the layout predicts before it."""
        return self.layout.sample_next(self, out, temperature, top_p, generator)

    def log_prob_next(self, out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Natural-log probability of the next position's tokens (..., step_tokens) given step
        outputs `out` (..., out dim): (..., step_tokens)."""
        return self.layout.log_prob_next(self, out, tokens)


def pack_tier(tier: nn.ModuleList) -> tuple[dict, str]:
    """The stacked parameters `kernels.tier_step` takes for a tier ([Residual(S4Layer),
    Residual(FeedForward)] x n, or S4 blocks only when ff = 0), after setup_step()."""
    s4 = [m for m in tier if isinstance(m.layer, S4Layer)]
    ff = [m for m in tier if isinstance(m.layer, FeedForward)]
    steps = [m.layer.step_factors().tensors() for m in s4]
    ssm = s4[0].layer.step_factors().ssm
    p = {k: torch.stack([st[k] for st in steps]) for k in steps[0]}
    p.update(s4_norm_w=torch.stack([m.norm.weight for m in s4]),
             s4_norm_b=torch.stack([m.norm.bias for m in s4]),
             s4_out_w=torch.stack([m.layer.out.weight for m in s4]),
             s4_out_b=torch.stack([m.layer.out.bias for m in s4]))
    if ff:
        p.update(ff_norm_w=torch.stack([m.norm.weight for m in ff]),
                 ff_norm_b=torch.stack([m.norm.bias for m in ff]),
                 ff_w1=torch.stack([m.layer.lin1.weight for m in ff]),
                 ff_b1=torch.stack([m.layer.lin1.bias for m in ff]),
                 ff_w2=torch.stack([m.layer.lin2.weight for m in ff]),
                 ff_b2=torch.stack([m.layer.lin2.bias for m in ff]))
    return {k: v.detach().contiguous() for k, v in p.items()}, ssm


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
