"""Sample audio from a trained SaShiMi: `python -m sashimi.generate --checkpoint RUN/checkpoint.pt`.

The model runs as a recurrence, one interleaved token at a time (the exact step of every
module, `SaShiMi.step`), sampling from its head with temperature / top-p (categorical) or
from the logistic mixture (DML), and accumulating each sample's exact log-likelihood. The
sample rate, bit depth, quantisation and channel count come from the checkpoint. Stereo is
de-interleaved into (frames, 2) and written as 16-bit PCM WAV.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kernels._utils import nvtx_range
from sashimi import checkpoint
from sashimi.checkpoint import CheckpointError
from sashimi.model import ModelConfig, SaShiMi
from sashimi.quantize import Quantizer


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


def load_model(path, device) -> SaShiMi:
    """Rebuild the model of a checkpoint; CheckpointError with one line if it can't."""
    payload = checkpoint.load(path)
    try:
        cfg = ModelConfig.from_dict(payload["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unusable model config: {exc}") from None
    device = torch.device(device)
    backend = "reference" if device.type == "cpu" else "auto"
    import dataclasses
    model = SaShiMi(dataclasses.replace(cfg, kernel_backend=backend))
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model config: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


@torch.no_grad()
def generate_audio(model: SaShiMi, frames: int, batch: int, quantizer: Quantizer,
                   temperature: float = 1.0, top_p: float = 1.0, prompt: torch.Tensor | None = None,
                   seed: int = 0, progress: bool = True):
    """Generate `frames` frames (prompt included) for `batch` samples.

    prompt: float audio (P, C) at the model's rate, continued by every sample. Without one,
    generation starts from one frame of silence (not part of the output).
    Returns (audio float32 (batch, frames, C) in [-1, 1], log-likelihood of the generated
    tokens in bits, (batch,)).
    """
    cfg = model.cfg
    C = cfg.channels
    device = model.embedding.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    if prompt is not None:
        prompt_tokens = quantizer.encode(prompt.to(device)).reshape(-1)            # interleaved
        start = prompt_tokens.expand(batch, -1)
        emit_prompt = True
    else:
        start = torch.full((batch, C), quantizer.zero_token, dtype=torch.long, device=device)
        emit_prompt = False
    n_prompt = start.shape[1]
    n_total = frames * C + (0 if emit_prompt else C)
    if n_prompt > n_total:
        raise UserError(f"the prompt ({n_prompt // C} frames) is longer than the requested length ({frames} frames)")
    tokens = torch.empty(batch, n_total, dtype=torch.long, device=device)
    tokens[:, :n_prompt] = start
    loglik = torch.zeros(batch, dtype=torch.float64, device=device)

    was_training = model.training
    model.eval()
    model.setup_step()
    state = model.default_state(batch)
    from tqdm.auto import tqdm
    bar = tqdm(total=n_total - 1, disable=not progress, unit="tok", dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()
    for t in range(n_total - 1):
        with nvtx_range("sashimi/generate/step"):
            out = model.step(tokens[:, t], state, t)
            if t + 1 >= n_prompt:  # prompt tokens are only consumed
                nxt, logp = model.head.sample(out, temperature, top_p, generator=gen)
                tokens[:, t + 1] = nxt
                loglik += logp.double()
        if progress and (t % 256 == 255 or t == n_total - 2):
            elapsed = time.perf_counter() - t0
            sps = (t + 1) / C / elapsed
            bar.set_postfix(samples_s=f"{sps:,.0f}", realtime=f"{sps / cfg.sample_rate:.3f}x")
            bar.update(t + 1 - bar.n)
    bar.close()
    model.train(was_training)
    if not emit_prompt:
        tokens = tokens[:, C:]
    audio = quantizer.decode(tokens.view(batch, -1, C)).float().cpu()
    return audio, (loglik / math.log(2)).cpu()


def write_wav(path, audio: torch.Tensor, sample_rate: int) -> Path:
    """16-bit PCM WAV of (frames, C) float audio."""
    import soundfile as sf
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio.numpy(), -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def choose(loglik: torch.Tensor, keep: str) -> list[int]:
    order = torch.argsort(loglik, descending=True).tolist()
    if keep == "all":
        return order
    if keep == "best":
        return order[:1]
    return [order[len(order) // 2]]  # middle: the median sample


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sashimi.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by sashimi.train")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each sample (prompt included)")
    p.add_argument("--batch", type=int, default=1, help="samples generated in parallel")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (categorical head)")
    p.add_argument("--prompt", help="an audio file to continue (resampled to the model's rate)")
    p.add_argument("--keep", choices=("best", "middle", "all"), default="all",
                   help="which samples to write, ranked by their exact log-likelihood")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p.parse_args(argv)


def run(args) -> int:
    if args.seconds <= 0 or args.batch < 1:
        raise UserError("--seconds must be > 0 and --batch >= 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be > 0 and --top-p in (0, 1]")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    try:
        model = load_model(args.checkpoint, device)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    cfg = model.cfg
    quantizer = Quantizer(cfg.quantization, cfg.bits)
    prompt = None
    if args.prompt:
        from sashimi.data import DataError, read_audio
        try:
            prompt = read_audio(args.prompt, cfg.sample_rate, cfg.channels)
        except DataError as exc:
            raise UserError(str(exc)) from None
        if prompt.shape[0] == 0:
            raise UserError(f"the prompt {args.prompt} holds no audio")
    frames = int(round(args.seconds * cfg.sample_rate))
    audio, loglik = generate_audio(model, frames, args.batch, quantizer, args.temperature, args.top_p,
                                   prompt, args.seed)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "samples"
    n_gen = audio.shape[1] * cfg.channels - (prompt.numel() if prompt is not None else 0)
    for i in choose(loglik, args.keep):
        path = write_wav(out / f"sample_seed{args.seed}_{i:03d}.wav", audio[i], cfg.sample_rate)
        print(f"{path}  log-likelihood {loglik[i].item():.1f} bits "
              f"({-loglik[i].item() / max(1, n_gen):.3f} bits/sample NLL), "
              f"{audio.shape[1] / cfg.sample_rate:.2f} s, {cfg.channels} ch, {cfg.sample_rate} Hz")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
