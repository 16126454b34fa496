"""Bring a public SaShiMi checkpoint (state-spaces/s4) here:
`python -m sashimi.convert --from s4 PUBLIC.pt OUT.pt --dt-transform exp|softplus`.

Reads the public model's state_dict (a plain `torch.save(state_dict)`, or a dict holding one
under `state_dict` / `model`, with any key prefix such as Lightning's `model.`), infers the
architecture from the tensor shapes, maps every weight and writes a checkpoint of this
package that `python -m sashimi.generate` samples from. Mono only: the public code has no stereo.

The mapping (facts from the public source; the tests hold the result to the public model's
own float64 logits):
- A = -exp(A_real) - i A_imag there; here Lambda = -exp(A_real_log) + i A_imag, its conjugate,
  so A_real/A_imag copy over and B, P and C are conjugated (the function is the same).
- A, B, P may be shared by S = n_ssm copies: channel h uses copy h mod S.
- dt = exp(inv_dt) (the standalone Sashimi) or softplus(inv_dt) (the repo's configs): not
  visible in the weights, so --dt-transform says which. The model's dt clamp is widened to
  hold every dt of the checkpoint, never the weights clamped.
- C is stored as C~ = C (I - A_bar^L) at the tier's length `l_kernel` (0: raw C); it is
  re-expressed at this model's tier length when they differ (exact, float64).
- Conv1d(kernel_size=1) linears lose their last dim; DownPool inputs and UpPool outputs are
  reordered from channel-major (h p + s) to this model's step-major (s H + h).
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import re
import sys
from pathlib import Path

import torch

from sashimi import checkpoint, cli
from sashimi.cli import UserError, command, refuse_existing
from sashimi.model import ModelConfig, SaShiMi

S4_KEYS = ("D", "kernel.inv_dt", "kernel.C", "kernel.B", "kernel.A_real", "kernel.A_imag", "kernel.P",
           "kernel.l_kernel")


class ConvertError(UserError):
    """A public checkpoint this converter cannot map: one line saying what and why."""


# ------------------------------------------------------------------------------------ reading

def read_public(path: Path) -> dict[str, torch.Tensor]:
    """The public model's tensors, keys relative to the wrapper (embedding., backbone., head.)."""
    from sashimi.checkpoint import CheckpointError, check_container, check_structure
    from sashimi.cli import UserError, regular_file
    try:
        path = regular_file(path, "the public checkpoint")    # missing, a folder, a FIFO: one line
        check_container(path, path.stat().st_size)           # bounded by its own size before loading
    except (UserError, CheckpointError) as exc:
        raise ConvertError(str(exc)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if any(word in str(exc) for word in ("GLOBAL", "allowlisted", "add_safe_globals")):
            raise ConvertError(
                f"refusing to load {path}: it holds Python objects besides tensors (a Lightning checkpoint's "
                f"hyper-parameters, say), which could run code. In an environment you trust, load it there "
                f"and save just its weights: torch.save(ckpt['state_dict'], 'weights.pt')") from None
        raise ConvertError(f"cannot read {path}: damaged or not a torch file") from None
    except Exception as exc:
        raise ConvertError(f"cannot read {path}: {type(exc).__name__}: {checkpoint.torch_reason(exc)}") from None
    try:
        check_structure(obj, path.stat().st_size, path)
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and \
                any(torch.is_tensor(v) for v in obj[key].values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConvertError(f"{path} is not a state_dict (a dict of tensors)")
    check_public_values(obj, path)
    anchor = [k for k in obj if k.endswith("d_layers.0.linear.weight")]
    if len(anchor) != 1:
        raise ConvertError(f"{path}: no public SaShiMi backbone in it (no '...d_layers.0.linear.weight' key)")
    backbone_prefix = anchor[0][: -len("d_layers.0.linear.weight")]          # e.g. "model.backbone."
    outer = backbone_prefix[: -len("backbone.")] if backbone_prefix.endswith("backbone.") else None
    out = {"backbone." + k[len(backbone_prefix):]: v for k, v in obj.items() if k.startswith(backbone_prefix)}
    rest = {k: v for k, v in obj.items() if not k.startswith(backbone_prefix)}
    d_model = out["backbone.norm.weight"].shape[0] if "backbone.norm.weight" in out else None
    if d_model is None:
        raise ConvertError(f"{path}: the backbone has no final norm ('backbone.norm.weight')")
    ends, used = _find_ends(rest, outer, d_model, path)
    unknown = sorted(set(rest) - used)
    if unknown:
        raise ConvertError(f"{path}: keys this converter does not know (another variant of the model?): {unknown[:6]}")
    out.update(ends)
    return out


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_L_KERNEL = 2 ** 24          # ModelConfig's longest seq_len: no tier is longer
MAX_A_REAL = 80.0               # exp(A_real) must stay finite in float32 (exp(88.7) overflows)


def check_public_values(sd: dict, path) -> None:
    """What every tensor of a public state_dict must be before any is used (one line each):
    string keys; floating-point, finite weights (l_kernel: one whole number in [0, 2^24]);
    A_real whose exp(A_real) (A = -exp(A_real) + ...) stays finite."""
    odd = [k for k in sd if not isinstance(k, str)]
    if odd:
        raise ConvertError(f"{path}: state_dict keys must be strings, found {type(odd[0]).__name__} key {odd[0]!r}")
    for key, t in sd.items():
        if key.endswith("kernel.l_kernel"):
            if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
                raise ConvertError(f"{path}: {key} must be one whole number, got {t.dtype} of shape {tuple(t.shape)}")
            value = float(t.reshape(-1)[0])
            if not (math.isfinite(value) and value == int(value) and 0 <= value <= MAX_L_KERNEL):
                raise ConvertError(f"{path}: {key} is {value:g}; a tier's length is a whole number in "
                                   f"[0, {MAX_L_KERNEL:,}]")
            continue
        if t.dtype not in WEIGHT_DTYPES:
            raise ConvertError(f"{path}: {key} is {t.dtype}; weights are floating-point "
                               f"(float16, bfloat16, float32 or float64)")
        if not torch.isfinite(t).all():
            raise ConvertError(f"{path}: {key} holds NaN or infinite values: the model it came from diverged "
                               f"or the file is damaged")
        if key.endswith("kernel.A_real") and t.numel() and float(t.max()) > MAX_A_REAL:
            raise ConvertError(f"{path}: {key} holds {float(t.max()):g}: exp(A_real) overflows (A_real must be "
                               f"<= {MAX_A_REAL:g})")


def _find_ends(rest: dict, outer: str | None, d_model: int, path) -> dict:
    """The embedding (V, d) and the output head (V, d) + (V,) outside the backbone."""
    def pick(names, shape_ok, what):
        found = [k for k in rest if any(n in k for n in names) and shape_ok(rest[k])]
        if outer is not None:  # prefer the wrapper's own keys
            found = [k for k in found if k.startswith(outer)] or found
        if len(found) != 1:
            raise ConvertError(f"{path}: cannot find the {what} ({'several' if found else 'no'} candidates: "
                               f"{found[:4]}); keys outside the backbone: {sorted(rest)[:8]}")
        return found[0]

    emb = pick(("embedding", "encoder"), lambda t: t.dim() == 2 and t.shape[1] == d_model, "embedding")
    head_w = pick(("head", "decoder", "output"),
                  lambda t: t.dim() == 2 and t.shape[1] == d_model and t.shape[0] == rest[emb].shape[0], "head weight")
    head_b = head_w[: -len("weight")] + "bias"
    if head_b not in rest:
        raise ConvertError(f"{path}: the head {head_w} has no bias {head_b}")
    return ({"embedding.weight": rest[emb], "head.weight": rest[head_w], "head.bias": rest[head_b]},
            {emb, head_w, head_b})


# ------------------------------------------------------------------------- the architecture

def _blocks(sd: dict, prefix: str) -> list[tuple[str, str]]:
    """[(kind 's4' | 'ff', key prefix)] of the residual blocks under prefix, in order."""
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})
    blocks = []
    for i in idx:
        p = f"{prefix}{i}."
        if f"{p}layer.layer.kernel.C" in sd:
            blocks.append(("s4", p))
        elif f"{p}layer.ff.0.0.weight" in sd:
            blocks.append(("ff", p))
        elif f"{p}linear.weight" in sd:
            continue  # the UpPool at the head of an up block
        else:
            raise ConvertError(f"block {p} is neither an S4 nor a feed-forward block (unet or another layer type?)")
    return blocks


def infer_config(sd: dict, *, bits: int | None, quantization: str, sample_rate: int) -> ModelConfig:
    levels, d_model = sd["embedding.weight"].shape
    if bits is None:
        bits = int(round(math.log2(levels)))
    if 2 ** bits != levels or bits not in (8, 16):
        raise ConvertError(f"the embedding has {levels} levels; this package models 8- or 16-bit audio (256 or 65536)")
    pool, expand, H = [], None, d_model
    i = 0
    while f"backbone.d_layers.{i}.linear.weight" in sd:
        w = sd[f"backbone.d_layers.{i}.linear.weight"]
        out_ch, in_ch = w.shape[0], w.shape[1]
        if in_ch % H or out_ch % H:
            raise ConvertError(f"d_layers.{i}: a {in_ch}->{out_ch} pool does not fit width {H}")
        pool.append(in_ch // H)
        e = out_ch // H
        if expand not in (None, e):
            raise ConvertError("the pools expand the width by different factors; this model has one expand")
        expand, H = e, out_ch
        i += 1
    if any(k.startswith("backbone.d_layers.") and ".layer." in k for k in sd):
        raise ConvertError("the down path has S4 blocks (unet=True): this package's model does not (unet=False)")
    center = _blocks(sd, "backbone.c_layers.")
    n_s4 = sum(kind == "s4" for kind, _ in center)
    if [kind for kind, _ in center] != ["s4", "ff"] * n_s4:
        raise ConvertError("the centre tier is not alternating S4 and feed-forward blocks")
    first_ff = next(p for kind, p in center if kind == "ff")
    ff = sd[f"{first_ff}layer.ff.0.0.weight"].shape[0] // H
    C = sd[f"{center[0][1]}layer.layer.kernel.C"]
    if C.dim() != 4 or C.shape[0] != 1:
        raise ConvertError(f"S4 C has shape {tuple(C.shape)}; only channels=1 S4 layers map to this model")
    d_state = 2 * C.shape[2]
    top = [p for kind, p in _blocks(sd, f"backbone.u_layers.{len(pool) - 1}.") if kind == "s4"]
    seq_len = int(sd[f"{top[0]}layer.layer.kernel.l_kernel"]) if top else 0
    if seq_len <= 0:
        raise ConvertError("the top tier's l_kernel is 0 (C never set up for a length): pass a model that ran "
                           "a forward pass, or one saved after training")
    try:
        return ModelConfig(d_model=d_model, n_layers=n_s4, pool=tuple(pool), expand=expand, ff=ff, d_state=d_state,
                           ssm="dplr", bits=bits, quantization=quantization, channels=1, sample_rate=sample_rate,
                           seq_len=seq_len, head="categorical", tie_weights=False)
    except ValueError as exc:
        raise ConvertError(f"the model its shapes describe is not one this package builds: {exc}") from None


def _dt(inv_dt: torch.Tensor, transform: str) -> torch.Tensor:
    x = inv_dt.double().reshape(-1)
    return torch.exp(x) if transform == "exp" else torch.nn.functional.softplus(x)


# ----------------------------------------------------------------------------- the mapping

def _per_channel(t: torch.Tensor, H: int, name: str) -> torch.Tensor:
    """(S, ...) shared by S SSM copies -> (H, ...): channel h uses copy h mod S."""
    S = t.shape[0]
    if H % S:
        raise ConvertError(f"{name}: {S} SSM copies do not divide {H} channels")
    return t.repeat(H // S, *([1] * (t.dim() - 1)))


def _conj(t: torch.Tensor) -> torch.Tensor:
    """Conjugate a real view (..., 2)."""
    return torch.stack([t[..., 0], -t[..., 1]], -1)


def _c_tilde_map(dt, Lam, P, L_from: int, L_to: int) -> torch.Tensor:
    """(I - A_bar^L_from)^-1 (I - A_bar^L_to) on the full 2N state, so that
    C~(L_to) = C~(L_from) @ this (row vectors). L_from = 0: raw C."""
    H, N = Lam.shape
    eye = torch.eye(2 * N, dtype=torch.complex128)
    lam = torch.cat([Lam, Lam.conj()], -1)
    p = torch.cat([P, P.conj()], -1)
    A = torch.diag_embed(lam) - p[:, :, None] * p.conj()[:, None, :]
    two_dt = (2 / dt)[:, None, None].to(torch.complex128)
    A_bar = torch.linalg.solve(two_dt * eye - A, two_dt * eye + A)

    def factor(L):
        return eye.expand(H, -1, -1) if L == 0 else eye - torch.linalg.matrix_power(A_bar, L)
    return torch.linalg.solve(factor(L_from), factor(L_to))


def map_state_dict(sd: dict, cfg: ModelConfig, dt_transform: str) -> dict:
    """The public tensors as this package's state_dict for `SaShiMi(cfg)`."""
    model = SaShiMi(cfg)
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {"embedding.weight": sd["embedding.weight"],
                                    "head.linear.weight": sd["head.weight"], "head.linear.bias": sd["head.bias"],
                                    "backbone.norm.weight": sd["backbone.norm.weight"],
                                    "backbone.norm.bias": sd["backbone.norm.bias"]}
    used = {"embedding.weight", "head.weight", "head.bias", "backbone.norm.weight", "backbone.norm.bias"}

    def take(key):
        if key not in sd:
            raise ConvertError(f"the public checkpoint lacks {key}")
        used.add(key)
        return sd[key]

    H = cfg.d_model
    for i, p in enumerate(cfg.pool):
        w = take(f"backbone.d_layers.{i}.linear.weight").squeeze(-1)           # (out, H p), index h p + s
        out[f"backbone.down.{i}.linear.weight"] = w.view(w.shape[0], H, p).transpose(1, 2).reshape(w.shape[0], -1)
        out[f"backbone.down.{i}.linear.bias"] = take(f"backbone.d_layers.{i}.linear.bias")
        H *= cfg.expand
    lengths = [cfg.l_max // math.prod(cfg.pool)]
    for p in reversed(cfg.pool):
        lengths.append(lengths[-1] * p)
    tiers = [("backbone.c_layers.", "backbone.center.", H, lengths[0])]
    for j, p in enumerate(reversed(cfg.pool)):
        d_out = H // cfg.expand
        w = take(f"backbone.u_layers.{j}.0.linear.weight").squeeze(-1)           # (d_out p, H), index h p + s
        b = take(f"backbone.u_layers.{j}.0.linear.bias")
        out[f"backbone.up.{j}.linear.weight"] = w.view(d_out, p, -1).transpose(0, 1).reshape(d_out * p, -1)
        out[f"backbone.up.{j}.linear.bias"] = b.view(d_out, p).t().reshape(-1)
        H = d_out
        tiers.append((f"backbone.u_layers.{j}.", f"backbone.up_tiers.{j}.", H, lengths[j + 1]))
    for src, dst, width, L in tiers:
        blocks = _blocks(sd, src)
        for k, (kind, p) in enumerate(blocks):
            q = f"{dst}{k}."
            out[q + "norm.weight"], out[q + "norm.bias"] = take(p + "norm.weight"), take(p + "norm.bias")
            if kind == "ff":
                for a, b in (("lin1", "ff.0.0"), ("lin2", "ff.2")):
                    out[f"{q}layer.{a}.weight"] = take(f"{p}layer.{b}.weight").squeeze(-1)
                    out[f"{q}layer.{a}.bias"] = take(f"{p}layer.{b}.bias")
                continue
            out.update(_map_s4(take, p, q, width, L, dt_transform))
    missing = sorted(set(target) - set(out))
    unknown = sorted(set(sd) - used)
    if missing:
        raise ConvertError(f"the public checkpoint lacks what this model needs: {missing[:6]}")
    if unknown:
        raise ConvertError(f"keys this converter does not know (another variant of the model?): {unknown[:6]}")
    for k, v in out.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ConvertError(f"{k}: shape {tuple(v.shape)} does not fit this model's {tuple(target[k].shape)}")
    return {k: v.to(target[k].dtype).contiguous() for k, v in out.items()}


def _map_s4(take, p: str, q: str, H: int, L: int, dt_transform: str) -> dict:
    s = f"{p}layer.layer."
    P = take(s + "kernel.P")
    if P.shape[0] != 1:
        raise ConvertError(f"{s}kernel.P has rank {P.shape[0]}; this model's DPLR layer has rank 1")
    dt = _dt(take(s + "kernel.inv_dt"), dt_transform)
    if dt.numel() != H:
        raise ConvertError(f"{s}kernel.inv_dt has {dt.numel()} values for {H} channels (dt not tied per channel?)")
    a_real = _per_channel(take(s + "kernel.A_real"), H, s + "kernel.A_real")
    a_imag = _per_channel(take(s + "kernel.A_imag"), H, s + "kernel.A_imag")
    B = _conj(_per_channel(take(s + "kernel.B")[0], H, s + "kernel.B"))
    P = _conj(_per_channel(P[0], H, s + "kernel.P"))
    C = _conj(take(s + "kernel.C")[0])
    l_kernel = int(take(s + "kernel.l_kernel"))
    if l_kernel != L:  # re-express C~ at this model's tier length, exactly
        Lam = torch.complex(-torch.exp(a_real.double()), a_imag.double())
        Pc = torch.view_as_complex(P.double().contiguous())
        Cc = torch.view_as_complex(C.double().contiguous())
        row = torch.cat([Cc, Cc.conj()], -1).unsqueeze(1)                   # (H, 1, 2N)
        Cc = (row @ _c_tilde_map(dt, Lam, Pc, l_kernel, L)).squeeze(1)[:, : Cc.shape[-1]]
        C = torch.view_as_real(Cc)
    D = take(s + "D")
    return {f"{q}layer.log_dt": torch.log(dt), f"{q}layer.A_real_log": a_real, f"{q}layer.A_imag": a_imag,
            f"{q}layer.B": B, f"{q}layer.P": P.unsqueeze(0), f"{q}layer.C": C, f"{q}layer.D": D.reshape(-1),
            f"{q}layer.out.weight": take(f"{p}layer.output_linear.0.weight"),
            f"{q}layer.out.bias": take(f"{p}layer.output_linear.0.bias")}


def convert(public_path, *, dt_transform: str, bits: int | None = None, quantization: str = "mu-law",
            sample_rate: int = 16000) -> tuple[ModelConfig, dict]:
    """(config, state_dict) of this package's model equal to the public checkpoint's."""
    sd = read_public(Path(public_path))
    try:
        cfg = infer_config(sd, bits=bits, quantization=quantization, sample_rate=sample_rate)
        # widen the dt clamp to the dt the checkpoint actually holds under the chosen transform
        dts = torch.cat([_dt(v, dt_transform) for k, v in sd.items() if k.endswith("kernel.inv_dt")])
        if not torch.isfinite(dts).all() or (dts <= 0).any():
            raise ConvertError("the checkpoint's dt values are not finite and positive")
        try:
            cfg = dataclasses.replace(cfg, dt_min=min(cfg.dt_min, float(dts.min()) * (1 - 1e-6)),
                                      dt_max=max(cfg.dt_max, float(dts.max()) * (1 + 1e-6)))
        except ValueError as exc:
            raise ConvertError(f"the checkpoint's dt values are out of range: {exc}") from None
        return cfg, map_state_dict(sd, cfg, dt_transform)
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError, StopIteration, ZeroDivisionError) as exc:
        # shapes that fit no public SaShiMi (the checks above name the common cases)
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ConvertError(f"{public_path}: its tensors do not fit a public SaShiMi: {text[:300]}") from None


def check_first_steps(cfg: ModelConfig, state: dict, steps: int | None = None) -> None:
    """The converted model's first steps through the recurrence generation runs on (from
    silence): their logits must be finite, or nothing is written. As many steps as make every
    tier tick twice."""
    model = SaShiMi(dataclasses.replace(cfg, kernel_backend="reference"))
    model.load_state_dict(state)
    model.eval()
    steps = steps or 2 * math.prod(cfg.pool) + 1
    silence = cfg.quantizer.encode(torch.zeros(1, 1)).reshape(1)
    with torch.no_grad():
        model.setup_step()
        st = model.default_state(1)
        for t in range(steps):
            logits = model.step(silence, st, t)
            if not torch.isfinite(logits).all():
                raise ConvertError(f"the converted model computes non-finite logits at step {t + 1} of its first "
                                   f"{steps} (weights that overflow); nothing written")


# ---------------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    p = cli.parser("sashimi.convert", __doc__)
    p.add_argument("--from", dest="source", choices=("s4",), required=True,
                   help="the implementation the checkpoint comes from (state-spaces/s4)")
    p.add_argument("public", help="the public checkpoint (.pt state_dict, or a dict holding one)")
    p.add_argument("out", help="where to write this package's checkpoint")
    p.add_argument("--dt-transform", choices=("exp", "softplus"), required=True,
                   help="how the public model stored dt: exp (the standalone Sashimi's default) or softplus "
                        "(the repo's configs/model/layer/s4.yaml); the weights alone do not tell")
    p.add_argument("--bits", type=int, choices=(8, 16), default=None, help="default: from the embedding size")
    p.add_argument("--quantization", choices=("mu-law", "linear"), default="mu-law",
                   help="how the model's training audio was quantised")
    p.add_argument("--sample-rate", type=int, default=16000, help="the model's sample rate in Hz")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def run(args) -> int:
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    if args.sample_rate < 1:
        raise UserError(f"--sample-rate must be >= 1, got {args.sample_rate}")
    cfg, state = convert(args.public, dt_transform=args.dt_transform, bits=args.bits,
                         quantization=args.quantization, sample_rate=args.sample_rate)
    check_first_steps(cfg, state)
    try:
        checkpoint.save(out, dict(model_config=cfg.to_dict(), model=state, step=0,
                                  converted_from=dict(source="state-spaces/s4", path=str(args.public),
                                                      dt_transform=args.dt_transform)))
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    n = sum(v.numel() for v in state.values())
    print(f"{out}: SaShiMi mono, {cfg.bits}-bit {cfg.quantization}, {cfg.sample_rate} Hz, d_model {cfg.d_model}, "
          f"{cfg.n_layers} S4 layers per tier, pool {list(cfg.pool)}, d_state {cfg.d_state}, "
          f"seq_len {cfg.seq_len}, {n:,} parameters")
    print(f"sample from it: python -m sashimi.generate --checkpoint {out}")
    return 0


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
