"""`python -m sashimi.convert` validates a public checkpoint the way `checkpoint.load` validates
ours: keys (and their types), dtypes, shapes, `l_kernel` values and non-finite or overflowing
weights are each refused in one line, exit code 2, before any model is built, and nothing is
written; a converted model whose first steps compute non-finite logits is refused too.

The malformed checkpoints are made here by mutating a tiny valid public-style state_dict
(the key layout of state-spaces/s4's Sashimi: see sashimi/convert.py), so these run anywhere."""
from __future__ import annotations

import math

import pytest
import torch

from sashimi import checkpoint
from sashimi.convert import main as convert_main

D, N, POOL, EXPAND, FF, L = 8, 2, (2, 2), 2, 2, 64   # d_model, complex modes, pools, ..., top length


def _s4(sd: dict, p: str, H: int, length: int, g: torch.Generator) -> None:
    def r(*shape, scale=0.3):
        return scale * torch.randn(*shape, generator=g)
    sd.update({f"{p}norm.weight": torch.ones(H), f"{p}norm.bias": torch.zeros(H),
               f"{p}layer.layer.D": r(1, H), f"{p}layer.layer.kernel.inv_dt": torch.full((H, 1), math.log(0.01)),
               f"{p}layer.layer.kernel.C": r(1, H, N, 2), f"{p}layer.layer.kernel.B": r(1, H, N, 2),
               f"{p}layer.layer.kernel.A_real": torch.full((H, N), math.log(0.5)),
               f"{p}layer.layer.kernel.A_imag": math.pi * torch.arange(N).float().expand(H, N).contiguous(),
               f"{p}layer.layer.kernel.P": r(1, H, N, 2), f"{p}layer.layer.kernel.l_kernel": torch.tensor(length),
               f"{p}layer.output_linear.0.weight": r(2 * H, H), f"{p}layer.output_linear.0.bias": r(2 * H)})


def _ff(sd: dict, p: str, H: int, g: torch.Generator) -> None:
    sd.update({f"{p}norm.weight": torch.ones(H), f"{p}norm.bias": torch.zeros(H),
               f"{p}layer.ff.0.0.weight": 0.3 * torch.randn(FF * H, H, 1, generator=g),
               f"{p}layer.ff.0.0.bias": torch.zeros(FF * H),
               f"{p}layer.ff.2.weight": 0.3 * torch.randn(H, FF * H, 1, generator=g),
               f"{p}layer.ff.2.bias": torch.zeros(H)})


def public_state_dict() -> dict:
    """A tiny public-style Sashimi state_dict (d_model 8, one S4 + FF block per tier, pools 2, 2)."""
    g = torch.Generator().manual_seed(0)
    sd = {"embedding.weight": torch.randn(256, D, generator=g), "head.weight": 0.3 * torch.randn(256, D, generator=g),
          "head.bias": torch.zeros(256), "backbone.norm.weight": torch.ones(D), "backbone.norm.bias": torch.zeros(D)}
    H, length = D, L
    for i, p in enumerate(POOL):
        sd[f"backbone.d_layers.{i}.linear.weight"] = 0.3 * torch.randn(H * EXPAND, H * p, 1, generator=g)
        sd[f"backbone.d_layers.{i}.linear.bias"] = torch.zeros(H * EXPAND)
        H, length = H * EXPAND, length // p
    _s4(sd, "backbone.c_layers.0.", H, length, g)
    _ff(sd, "backbone.c_layers.1.", H, g)
    for j, p in enumerate(reversed(POOL)):
        d_out, length = H // EXPAND, length * p
        sd[f"backbone.u_layers.{j}.0.linear.weight"] = 0.3 * torch.randn(d_out * p, H, 1, generator=g)
        sd[f"backbone.u_layers.{j}.0.linear.bias"] = torch.zeros(d_out * p)
        H = d_out
        _s4(sd, f"backbone.u_layers.{j}.1.", H, length, g)
        _ff(sd, f"backbone.u_layers.{j}.2.", H, g)
    return sd


S4_TOP = "backbone.u_layers.1.1.layer.layer.kernel."
S4_MID = "backbone.c_layers.0.layer.layer.kernel."


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


# (case id, mutation of the valid state_dict, what the one line must say)
MALFORMED = [
    ("int-key", lambda sd: sd.__setitem__(7, torch.zeros(1)), "keys must be strings"),
    ("tuple-key", lambda sd: sd.__setitem__(("a", 1), torch.zeros(1)), "keys must be strings"),
    ("not-tensors", lambda sd: sd.__setitem__("extra", 3), "not a state_dict"),
    ("int-weight", _set("head.bias", torch.zeros(256, dtype=torch.int64)), "torch.int64"),
    ("complex-weight", _set("head.bias", torch.zeros(256, dtype=torch.complex64)), "torch.complex64"),
    ("bool-weight", _set("head.bias", torch.zeros(256, dtype=torch.bool)), "torch.bool"),
    ("nan-weight", _set("backbone.c_layers.1.layer.ff.2.bias", torch.full((32,), math.nan)), "NaN or infinite"),
    ("inf-weight", _set("embedding.weight", torch.full((256, D), math.inf)), "NaN or infinite"),
    ("A_real-overflows", _set(S4_MID + "A_real", torch.full((32, N), 1e4)), "exp(A_real) overflows"),
    ("huge-weights", _set("backbone.u_layers.1.1.layer.output_linear.0.weight", torch.full((16, 8), 3e38)),
     "non-finite logits"),
    ("l_kernel-2^30", _set(S4_TOP + "l_kernel", torch.tensor(2 ** 30)), "whole number in [0"),
    ("l_kernel-5", _set(S4_TOP + "l_kernel", torch.tensor(5)), "multiple of the total pooling"),
    ("l_kernel-negative", _set(S4_TOP + "l_kernel", torch.tensor(-64)), "whole number in [0"),
    ("l_kernel-fraction", _set(S4_MID + "l_kernel", torch.tensor(1.5)), "whole number in [0"),
    ("l_kernel-nan", _set(S4_MID + "l_kernel", torch.tensor(math.nan)), "whole number in [0"),
    ("l_kernel-vector", _set(S4_MID + "l_kernel", torch.tensor([16, 16])), "one whole number"),
    ("D-shape", _set("backbone.c_layers.0.layer.layer.D", torch.zeros(1, 33)), "fit"),
    ("C-3d", _set(S4_MID + "C", torch.zeros(1, 32, N)), "S4 C has shape"),
    ("B-shape", _set(S4_MID + "B", torch.zeros(1, 32, N + 1, 2)), "fit"),
    ("inv_dt-shape", _set(S4_MID + "inv_dt", torch.zeros(31, 1)), "31 values for 32 channels"),
    ("embedding-1d", _set("embedding.weight", torch.zeros(256)), "cannot find the embedding"),
    ("pool-width", _set("backbone.d_layers.0.linear.weight", torch.zeros(16, 17, 1)), "does not fit width"),
    ("up-shape", _set("backbone.u_layers.0.0.linear.weight", torch.zeros(32, 31, 1)), "fit"),
    ("output-linear-shape", _set("backbone.c_layers.0.layer.output_linear.0.weight", torch.zeros(64, 31)),
     "fit"),
    ("ff-shape", _set("backbone.c_layers.1.layer.ff.2.weight", torch.zeros(32, 63, 1)), "fit"),
    ("inv_dt-huge", _set(S4_MID + "inv_dt", torch.full((32, 1), 80.0)), "dt"),
]


def _convert(tmp_path, sd) -> int:
    torch.save(sd, tmp_path / "public.pt")
    return convert_main(["--from", "s4", str(tmp_path / "public.pt"), str(tmp_path / "out.pt"),
                         "--dt-transform", "exp"])


def test_the_tiny_public_state_dict_converts(tmp_path, capsys):
    rc = _convert(tmp_path, public_state_dict())
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cfg = checkpoint.load(tmp_path / "out.pt")["model_config"]
    assert (cfg["d_model"], tuple(cfg["pool"]), cfg["seq_len"], cfg["d_state"]) == (D, POOL, L, 2 * N)


@pytest.mark.parametrize("edit,expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_public_checkpoint_is_one_line(tmp_path, capsys, edit, expected):
    sd = public_state_dict()
    edit(sd)
    rc = _convert(tmp_path, sd)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "out.pt").exists() and not list(tmp_path.glob(".out.pt*"))
