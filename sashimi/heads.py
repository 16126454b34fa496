"""The heads: what the backbone's output says about the next token.

`HEADS` names every head (`ModelConfig.head`). A head is an `nn.Module` with
`from_config(cfg, d, levels)`, `output_size(cfg, levels)`, `forward(h) -> out`, and, on that output, `log_prob(out, target)`
(training), `cdf(out)` / `cdf_at(out, edges)` (the codec), `sample(out, ...)` (generation), and
`anchored(out, anchor)` / `init_for_prediction()` (value input: the output made a correction to
a predictor's value, `sashimi.predictors`). Adding a head is a class here plus its entry in
`HEADS`; training, generation, evaluation and the codec need no change.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sashimi.blocks import grid_values


class CategoricalHead(nn.Module):
    """Logits over the 2^bits tokens."""

    def __init__(self, d: int, levels: int):
        super().__init__()
        self.linear = nn.Linear(d, levels)
        self.levels = levels

    @classmethod
    def from_config(cls, cfg, d: int, levels: int) -> "CategoricalHead":
        return cls(d, levels)

    @staticmethod
    def output_size(cfg, levels: int) -> int:
        """Floats per token of the head's output (for memory estimates)."""
        return levels

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
    def anchored(out: torch.Tensor, anchor: torch.Tensor, log_scale: torch.Tensor | None = None) -> torch.Tensor:
        return out  # a table has no location to move

    def init_for_prediction(self, scaled: bool = False) -> None:
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

    @classmethod
    def from_config(cls, cfg, d: int, levels: int) -> "DMLHead":
        return cls(d, levels, cfg.n_mixtures)

    @staticmethod
    def output_size(cfg, levels: int) -> int:
        return 3 * cfg.n_mixtures

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
    # a logistic of scale s has mean |x| = 2 ln 2 s: the scale that matches a predictor's running
    # mean absolute residual
    LOG_SCALE_OF_MEAN_ABS = -math.log(2.0 * math.log(2.0))

    def init_for_prediction(self, scaled: bool = False) -> None:
        """value_input models start at the predictor's value with a residual-sized scale: a
        typical one, or (`scaled`: the predictor gives a scale) the predictor's."""
        with torch.no_grad():
            self.linear.bias[2 * self.m:] = self.LOG_SCALE_OF_MEAN_ABS if scaled else self.INIT_LOG_SCALE
            if scaled:   # start exactly at the predictor: random corrections of ~2^-7 (256 16-bit
                #          steps) would cost more than a residual of CD music before they are learnt
                self.linear.weight[self.m:].zero_()
                self.linear.bias[self.m:2 * self.m] = 0.0

    @classmethod
    def anchored(cls, out: torch.Tensor, anchor: torch.Tensor, log_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The head output with the mixture means made anchor + DELTA_SCALE x the network's
        corrections (ModelConfig.value_input): anchor (...,) on the grid of [-1, 1]; and, given
        a predictor's `log_scale` (...,), the log scales made corrections to it."""
        w, mean, log_s = out.float().split(out.shape[-1] // 3, dim=-1)
        if log_scale is not None:
            log_s = log_s + log_scale.float().unsqueeze(-1)
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


HEADS: dict[str, type[nn.Module]] = {"categorical": CategoricalHead, "dml": DMLHead}
