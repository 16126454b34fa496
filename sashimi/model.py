"""SaShiMi for mono and stereo audio: encoder, backbone, heads, and the recurrent step.

Two stereo layouts (`ModelConfig.stereo_layout`):

- interleave (default; mono is this layout with C = 1): tokens (B, L, C)
  --kernels.embed_interleave--> (B, L*C, D) --backbone--> head --> loss. Stereo is one
  interleaved sequence L0 R0 L1 R1 ...: the backbone is the same for C = 1 and 2, only its
  length (l_max = seq_len * C) changes. Output position i predicts interleaved token i + 1, so
  the target of position i belongs to channel (i + 1) % C.
- frames (stereo only): tokens (B, L, 2) --kernels.embed_frames--> (B, L, D), one position per
  frame (a joint embedding of (L_t, R_t)) --backbone--> h_t. The head predicts L_{t+1} from h_t
  and R_{t+1} from h_t plus L_{t+1} (`RightGivenLeft`: teacher-forced in training, sampled
  first in generation), so R still conditions on L of the same instant. Half the positions of
  interleave: half the backbone work per second of audio, half the generation steps.

Either way the losses are reported overall and per channel.

Every module has `forward` (convolutional, training) and `step` (recurrent, generation) with
`default_state(batch)`; `SaShiMi.setup_step()` prepares the recurrence once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.profiling import nvtx_range
from sashimi.quantize import KINDS as QUANTIZATION_KINDS
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
    stereo_layout: str = "interleave"  # or "frames" (stereo only): one position per frame
    embed_init: str = "ordinal"    # "ordinal" (amplitude-aware, see ordinal_embedding) or "normal"
    # the sample values enter as numbers (a linear projection beside the token table, which then
    # starts at zero) and the DML means are small offsets from a fixed second-order prediction
    # of the predicted channel (2 x_t - x_{t-1}, FLAC's "fixed order 2"): what makes a 16-bit
    # linear model a predictor (a 65,536-row table alone is not). Mono and frames layouts.
    value_input: bool = False
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
        if self.value_input and self.channels == 2 and self.stereo_layout != "frames":
            problems.append("value_input needs mono or the frames stereo layout (--stereo-layout frames)")
        if self.tie_weights and self.head != "categorical":
            problems.append("weight tying needs the categorical head")
        if self.stereo_layout == "frames" and self.channels != 2:
            problems.append("stereo_layout 'frames' needs stereo (channels=2: train --stereo)")
        elif self.stereo_layout == "frames" and self.tie_weights:
            problems.append("weight tying needs the interleave layout (frames has one table per channel)")
        if not problems and self.l_max % self.pool_factor:
            what = "seq_len" if self.frames else "seq_len x channels"
            problems.append(f"{what} = {self.l_max} must be a multiple of the total pooling "
                            f"factor {self.pool_factor} (pool={list(self.pool)})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def frames(self) -> bool:
        """The frames stereo layout (one backbone position per frame)."""
        return self.stereo_layout == "frames"

    @property
    def step_tokens(self) -> int:
        """Tokens consumed (and generated) per backbone position: 1 (interleave), C (frames)."""
        return self.channels if self.frames else 1

    @property
    def samples(self) -> int:
        """Audio samples (tokens) per training example: seq_len frames x channels."""
        return self.seq_len * self.channels

    @property
    def l_max(self) -> int:
        """Backbone positions per training example."""
        return self.samples // self.step_tokens

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
    "head": _one_of("categorical", "dml"),
    "n_mixtures": _int(1, 1024),
    "tie_weights": _of_type(bool),
    "stereo_layout": _one_of("interleave", "frames"),
    "embed_init": _one_of("ordinal", "normal"),
    "value_input": _of_type(bool),
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
# heads
# --------------------------------------------------------------------------------------------
def grid_values(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Tokens k -> their place on the head's grid, 2k / (levels - 1) - 1 in [-1, 1] (float32):
    the DML head's bin centres, and the sample value itself for linear quantisation."""
    return tokens.float() * (2.0 / (levels - 1)) - 1.0


class CategoricalHead(nn.Module):
    """Logits over the 2^bits tokens."""

    def __init__(self, d: int, levels: int):
        super().__init__()
        self.linear = nn.Linear(d, levels)
        self.levels = levels

    def forward(self, x):
        return self.linear(x)

    def log_prob(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Natural-log probability of each target token: out (..., V), target (...)."""
        return -F.cross_entropy(out.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)

    def cdf_at(self, out: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """P(token < e) for integer edges e in [0, levels] (B, E), float64 (the codec's
        interval): the table of the current step only."""
        return self.cdf(out)(edges)

    def cdf(self, out: torch.Tensor):
        """`cdf_at` for several edge sets of the same outputs: the table's sums made once."""
        cdf = F.pad(torch.softmax(out.double(), -1).cumsum(-1), (1, 0)).clamp_(max=1.0)
        cdf[..., -1] = 1.0     # exactly, as the DML head's last edge

        def at(edges: torch.Tensor) -> torch.Tensor:
            return cdf.gather(-1, edges.long().clamp(0, self.levels))
        at.device = out.device
        return at

    @staticmethod
    def anchored(out: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return out  # a table has no location to move

    def init_for_prediction(self) -> None:
        pass

    @torch.no_grad()
    def sample(self, out: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample tokens (B,) from logits (B, V); returns (tokens, exact log-prob under the model)."""
        logits = out.float()
        logp_model = torch.log_softmax(logits, -1)
        logits = logits / max(temperature, 1e-6)
        if top_p < 1.0:
            probs = torch.softmax(logits, -1)
            sorted_p, idx = probs.sort(-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop_sorted = cum - sorted_p > top_p          # keep the smallest prefix reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        # Gumbel-max: no host sync, graph-capturable
        u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-20, 1.0)
        token = (logits - torch.log(-torch.log(u))).argmax(-1)
        return token, logp_model.gather(-1, token[:, None]).squeeze(-1)


class DMLHead(nn.Module):
    """Discretised mixture of logistics over the token grid mapped to [-1, 1] (PixelCNN++).

    Token k sits at x_k = 2k / (levels - 1) - 1; its bin is [x_k - half, x_k + half) with
    half = 1 / (levels - 1), the end bins open to -inf / +inf. `params` is the one definition
    of the mixture; `log_prob` (training, float32, numerically stable form) and `cdf_at` (the
    codec, float64) are both computed from it."""

    def __init__(self, d: int, levels: int, n_mixtures: int = 10):
        super().__init__()
        self.linear = nn.Linear(d, 3 * n_mixtures)
        self.levels, self.m = levels, n_mixtures
        # the narrowest logistic: a bin is ~5 scale units wide, so one bin can hold ~87% of a
        # component at any bit depth (8-bit keeps the historical -7, 16-bit goes to -12.1)
        self.min_log_scale = min(-7.0, math.log(1.0 / (levels - 1)) - 1.0)

    def forward(self, x):
        return self.linear(x)

    def params(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head output (..., 3m) -> (log weights, means, log scales), each (..., m), float32."""
        logit_w, mean, log_s = out.float().split(self.m, dim=-1)
        return torch.log_softmax(logit_w, -1), mean, log_s.clamp(min=self.min_log_scale)

    # value_input: the network's mean outputs are corrections in units of 2^-7 of full scale
    # (128 16-bit steps): an optimiser step then moves a mean by about lr x 2^-7, fine enough for
    # 16-bit prediction (unscaled, Adam's steps alone jitter the means by thousands of steps)
    DELTA_SCALE = 2.0 ** -7
    INIT_LOG_SCALE = math.log(2.0 ** -8)     # a typical CD-music residual, ~128 16-bit steps

    def init_for_prediction(self) -> None:
        """value_input models start at the anchor with a residual-sized scale."""
        with torch.no_grad():
            self.linear.bias[2 * self.m:] = self.INIT_LOG_SCALE

    @classmethod
    def anchored(cls, out: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """The head output with the mixture means made anchor + DELTA_SCALE x the network's
        corrections (ModelConfig.value_input): anchor (...,) on the grid of [-1, 1]."""
        w, mean, log_s = out.float().split(out.shape[-1] // 3, dim=-1)
        return torch.cat([w, anchor.float().unsqueeze(-1) + cls.DELTA_SCALE * mean, log_s], -1)

    def log_prob(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_w, mean, log_s = self.params(out)
        half = 1.0 / (self.levels - 1)                      # half a bin in [-1, 1]
        x = grid_values(target, self.levels).unsqueeze(-1)
        centred = x - mean
        inv_s = torch.exp(-log_s)
        plus, minus = inv_s * (centred + half), inv_s * (centred - half)
        log_cdf_plus = plus - F.softplus(plus)              # log sigmoid(plus)
        log_one_minus_cdf_min = -F.softplus(minus)          # log (1 - sigmoid(minus))
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        mid = inv_s * centred
        log_pdf_mid = mid - log_s - 2.0 * F.softplus(mid)   # log density at the bin centre
        log_bin = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                              log_pdf_mid + math.log(2 * half))
        edge_lo, edge_hi = (target == 0).unsqueeze(-1), (target == self.levels - 1).unsqueeze(-1)
        log_p = torch.where(edge_lo, log_cdf_plus, torch.where(edge_hi, log_one_minus_cdf_min, log_bin))
        return torch.logsumexp(log_p + log_w, dim=-1)

    def cdf_at(self, out: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """P(token < e) for integer edges e in [0, levels] (B, E), from head outputs (B, 3m):
        float64 (B, E). Edge 0 is 0 and edge `levels` is 1 exactly (the open end bins)."""
        return self.cdf(out)(edges)

    def cdf(self, out: torch.Tensor):
        """`cdf_at` for several edge sets of the same outputs: the mixture prepared once."""
        log_w, mean, log_s = (t.double() for t in self.params(out))
        w, inv_s = torch.exp(log_w)[:, :, None], torch.exp(-log_s)[:, None, :]
        mean = mean[:, None, :]

        def at(edges: torch.Tensor) -> torch.Tensor:
            x = edges.double().mul(2.0 / (self.levels - 1)).sub_(1.0 + 1.0 / (self.levels - 1))
            z = (x[:, :, None] - mean).mul_(inv_s).sigmoid_()
            cdf = torch.bmm(z, w)[..., 0]           # the mixture: sum_j w_j sigmoid((x - mu_j) / s_j)
            return cdf.masked_fill_(edges <= 0, 0.0).masked_fill_(edges >= self.levels, 1.0)
        at.device = out.device
        return at

    @torch.no_grad()
    def sample(self, out, temperature: float = 1.0, top_p: float = 1.0, generator=None):
        log_w, mean, log_s = self.params(out)
        g = torch.rand(log_w.shape, device=out.device, generator=generator).clamp_(1e-20, 1.0)
        k = (log_w / max(temperature, 1e-6) - torch.log(-torch.log(g))).argmax(-1, keepdim=True)
        mu, s = mean.gather(-1, k).squeeze(-1), torch.exp(log_s.gather(-1, k).squeeze(-1))
        u = torch.rand(mu.shape, device=out.device, generator=generator).clamp_(1e-5, 1 - 1e-5)
        x = (mu + s * temperature * (torch.log(u) - torch.log1p(-u))).clamp(-1.0, 1.0)
        token = torch.round((x + 1.0) / 2.0 * (self.levels - 1)).long()
        return token, self.log_prob(out, token)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class SaShiMi(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V, D = cfg.levels, cfg.d_model
        # frames: one table per channel, rows [c V, (c + 1) V) (kernels.embed_frames sums them)
        tables = cfg.channels if cfg.frames else 1
        self.embedding = nn.Embedding(tables * V, D)
        with torch.no_grad():
            for c in range(tables):  # distinct tables, so that L and R are told apart at init
                self.embedding.weight[c * V:(c + 1) * V] = embedding_init(V, D, cfg.embed_init, c) / math.sqrt(tables)
            if cfg.value_input:  # the values carry the amplitude; the table learns corrections
                self.embedding.weight.zero_()
        # the values of a position's tokens (1, or C for frames) -> D
        self.value_in = nn.Linear(cfg.step_tokens, D) if cfg.value_input else None
        self.backbone = Backbone(cfg)
        if cfg.head == "categorical":
            self.head = CategoricalHead(D, V)
            if cfg.tie_weights:
                self.head.linear.weight = self.embedding.weight
        else:
            self.head = DMLHead(D, V, cfg.n_mixtures)
        if cfg.value_input:
            self.head.init_for_prediction()
        self.right = RightGivenLeft(D, V, max(cfg.ff, 1), cfg.embed_init, cfg.value_input) if cfg.frames else None

    def encode(self, tokens: torch.Tensor, check_tokens: bool = True) -> torch.Tensor:
        """tokens (B, L, C) -> the backbone's input: interleaved embeddings (B, L*C, D), one
        fused op for C = 1 and 2, or (frames) one joint embedding per frame (B, L, D).
        check_tokens=False skips the range check (a host sync on CUDA) for callers that have
        validated the tokens already, as the trainer does on the CPU side of the loader."""
        with nvtx_range("sashimi/model/encoder"):
            # fp32 out even under bf16 autocast: it starts the residual stream, which stays fp32
            # under torch.use_deterministic_algorithms (train --deterministic) the backward
            # sums in a fixed order instead of with atomics
            op = kernels.embed_frames if self.cfg.frames else kernels.embed_interleave
            x = op(tokens, self.tables(), check=check_tokens,
                   deterministic=torch.are_deterministic_algorithms_enabled(),
                   backend=self.cfg.kernel_backend)
            if self.value_in is not None:
                B, L, C = tokens.shape
                per_position = tokens if self.cfg.frames else tokens.reshape(B, L * C, 1)
                x = x + self.value_in(self.token_values(per_position))
            return x

    def token_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> their place on the head's grid, 2k / (levels - 1) - 1 in [-1, 1] (float32):
        the sample value itself for linear quantisation."""
        return grid_values(tokens, self.cfg.levels)

    def anchors(self, tokens: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """value_input: the fixed prediction the head's means are offset from, per position and
        channel slot: 2 v_p - v_{p-1} of the position's values v (B, T, step_tokens) from its
        tokens; v_{-1} is `previous` (B, step_tokens), 0 when None (a sequence's start)."""
        v = self.token_values(tokens)
        before = torch.zeros_like(v[:, :1]) if previous is None else previous[:, None].to(v.dtype)
        return 2.0 * v - torch.cat([before, v[:, :-1]], 1)

    def tables(self) -> torch.Tensor:
        """The embedding as its op takes it: (V, D), or (C, V, D) for frames."""
        w = self.embedding.weight
        return w.view(self.cfg.channels, self.cfg.levels, -1) if self.cfg.frames else w

    def forward(self, tokens: torch.Tensor, check_tokens: bool = True,
                next_left: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, C) -> head output. interleave: (B, L*C, V or 3*n_mixtures), position i
        predicts interleaved token i + 1. frames: (B, L, 2, ...), the outputs for L_{t+1} and
        R_{t+1} of frame t + 1; needs next_left (B, L), the left tokens of frames 1..L (the
        right channel's head conditions on them)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.cfg.channels:
            raise ValueError(f"tokens must be (batch, frames, {self.cfg.channels}), got {tuple(tokens.shape)}")
        h = self.backbone(self.encode(tokens, check_tokens))
        with nvtx_range("sashimi/model/head"):
            if not self.cfg.frames:
                out = self.head(h)
                return self.head.anchored(out, self.anchors(tokens)[..., 0]) if self.cfg.value_input else out
            if next_left is None or next_left.shape != tokens.shape[:2]:
                raise ValueError(f"the frames layout needs next_left {tuple(tokens.shape[:2])} (the left "
                                 f"channel of the next frames), got "
                                 f"{None if next_left is None else tuple(next_left.shape)}")
            right = self.right(h, next_left, check_tokens, self.cfg.kernel_backend)
            out = [self.head(h), self.head(right)]
            if self.cfg.value_input:
                anchor = self.anchors(tokens)
                out = [self.head.anchored(o, anchor[..., c]) for c, o in enumerate(out)]
            return torch.stack(out, 2)

    def nll_bits(self, batch: torch.Tensor, check_tokens: bool = True) -> torch.Tensor:
        """batch: tokens (B, L + 1, C). Returns the NLL of every target, in bits, (B, L*C), in
        interleaved order: interleave: target i is interleaved token i + 1, of channel
        (i + 1) % C; frames: target 2t + c is channel c of frame t + 1."""
        B, L1, C = batch.shape
        L = L1 - 1
        if self.cfg.frames:
            targets = batch[:, 1:]
            out = self(batch[:, :L], check_tokens, next_left=targets[..., 0])
            with nvtx_range("sashimi/model/loss"):
                return (-self.head.log_prob(out, targets) / LN2).reshape(B, L * C)
        out = self(batch[:, :L], check_tokens)
        targets = batch.reshape(B, L1 * C)[:, 1: L * C + 1]
        with nvtx_range("sashimi/model/loss"):
            return -self.head.log_prob(out, targets) / LN2

    @staticmethod
    def per_channel(nll: torch.Tensor, channels: int, frames: bool = False) -> list[torch.Tensor]:
        """Split (B, L*C) target NLLs (from nll_bits) by the target's channel: [left, right]
        (or [mono]). frames: the cfg.frames of the model that scored them."""
        if channels == 1:
            return [nll]
        B, T = nll.shape
        by_target = nll.view(B, T // channels, channels)
        if not frames:  # interleave: position i predicts channel (i + 1) % C
            by_target = torch.roll(by_target, shifts=1, dims=2)
        return list(by_target.unbind(2))

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
        if self.cfg.value_input:   # the last position's values, for the anchors (0 at the start)
            state["values"] = torch.zeros(batch, self.cfg.step_tokens, device=device)
        return state

    def embed_steps(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone input of positions, for the recurrence and prefill: interleaved tokens
        (...,) -> (..., D), or frames (..., C) -> (..., D). No range check (graph-capturable)."""
        if not self.cfg.frames:
            x = F.embedding(tokens.long(), self.embedding.weight)
        else:
            offsets = torch.arange(self.cfg.channels, device=tokens.device) * self.cfg.levels
            x = F.embedding(tokens.long() + offsets, self.embedding.weight).sum(-2)
        if self.value_in is not None:
            x = x + self.value_in(self.token_values(tokens if self.cfg.frames else tokens[..., None]))
        return x

    def step(self, token: torch.Tensor, state, t: int) -> torch.Tensor:
        """Position t -> the step output that the next position's tokens are drawn from (see
        sample_next / log_prob_next). `state` (from default_state) is updated in place.
        interleave: token t (B,) -> head output for token t + 1 (B, V or 3*n_mixtures).
        frames: frame t (B, C) -> the backbone output h_t (B, D), with value_input followed by
        the frame's C values (R's head input depends on the L sampled from it)."""
        h = self.backbone.step(self.embed_steps(token), state, t)
        if not self.cfg.value_input:
            return self.step_output(h)
        per_position = token.view(token.shape[0], 1, -1)
        anchor = self.anchors(per_position, state["values"])[:, 0]
        state["values"].copy_(self.token_values(per_position)[:, 0])
        return self.step_output(h, anchor)

    def step_output(self, h: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """What `step` returns for backbone outputs h (..., D), with value_input the positions'
        anchors (..., step_tokens) (see `anchors`; prefill's `out`)."""
        if not self.cfg.frames:
            out = self.head(h)
            return self.head.anchored(out, anchor[..., 0]) if self.cfg.value_input else out
        return torch.cat([h, anchor], -1) if self.cfg.value_input else h

    def _frame_head(self, out: torch.Tensor, channel: int, left: torch.Tensor | None = None) -> torch.Tensor:
        """frames: the head output of channel 0 (L_{t+1}) or 1 (R_{t+1} given L_{t+1} = left)
        from a step output."""
        h = out[..., :self.cfg.d_model]
        x = h if channel == 0 else self.right(h, left)
        if not self.cfg.value_input:
            return self.head(x)
        return self.head.anchored(self.head(x), out[..., self.cfg.d_model + channel])

    @torch.no_grad()
    def sample_next(self, out: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next position's tokens (B, step_tokens) sampled from a step output (B, ...), and
        their exact natural-log probability under the model (B,). frames: L first, then R
        given that L."""
        sample = self.head.sample
        if not self.cfg.frames:
            token, logp = sample(out, temperature, top_p, generator=generator)
            return token[:, None], logp
        left, lp_left = sample(self._frame_head(out, 0), temperature, top_p, generator=generator)
        right, lp_right = sample(self._frame_head(out, 1, left), temperature, top_p, generator=generator)
        return torch.stack([left, right], 1), lp_left + lp_right

    def log_prob_next(self, out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Natural-log probability of the next position's tokens (..., step_tokens) given step
        outputs `out` (..., out dim): (..., step_tokens)."""
        if not self.cfg.frames:
            return self.head.log_prob(out, tokens[..., 0])[..., None]
        return torch.stack([self.head.log_prob(self._frame_head(out, 0), tokens[..., 0]),
                            self.head.log_prob(self._frame_head(out, 1, tokens[..., 0]), tokens[..., 1])], -1)

    def head_outputs(self, out: torch.Tensor, left: torch.Tensor | None = None) -> torch.Tensor:
        """The head output of the next token: interleave: `out` itself; frames: that of L_{t+1}
        (left=None), or of R_{t+1} given L_{t+1} = left. (The codec codes token by token.)"""
        if not self.cfg.frames:
            return out
        return self._frame_head(out, 0) if left is None else self._frame_head(out, 1, left)


class RightGivenLeft(nn.Module):
    """The frames layout's head input for R_{t+1}: the backbone output h_t plus L_{t+1}.

    right = u + FF(LayerNorm(u)), u = h_t + E[L_{t+1}] (E its own table): one residual
    feed-forward block, so R's distribution can depend on L jointly with the context (a linear
    head on h + E[L] could only add a per-L bias to R's logits)."""

    def __init__(self, d: int, levels: int, expand: int, embed_init: str = "ordinal", value_input: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(levels, d)
        with torch.no_grad():
            self.embedding.weight.copy_(embedding_init(levels, d, embed_init, seed=7))
            if value_input:   # as the model's own table: L's value says what its row would
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
