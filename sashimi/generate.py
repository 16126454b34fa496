"""Sample audio from a trained SaShiMi: `python -m sashimi.generate --checkpoint RUN/checkpoint.pt`.

The model runs as a recurrence, one position at a time (the exact step of every module,
`SaShiMi.step`): one position of the stereo layout (one interleaved token, or a whole frame:
its channels sampled in turn, e.g. R given L, several head samples per backbone step), sampling from its head with
temperature / top-p (categorical) or from the logistic mixture (DML), and accumulating each
sample's exact log-likelihood. The sample rate, bit depth, quantisation, channel count and
stereo layout come from the checkpoint. Stereo is written as (frames, 2) 16-bit PCM WAV.

Fast paths: the prompt (`--prompt`, or the one frame of silence an unconditional sample starts
from) is consumed in parallel by `sashimi.prefill.prefill` (no token-by-token stepping), and on
CUDA the step runs as one CUDA graph replay per token: one graph per phase variant
(t mod prod(pool)) of `StepSampler.step` (model step, sampling, the token written at a
device-side position, the log-likelihood accumulated on the device), replayed with no host
sync inside the loop. `--no-cuda-graphs` (and every CPU run) runs the same step function
eagerly.
"""
from __future__ import annotations

import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kernels.profiling import nvtx_range
from sashimi import checkpoint, cli
from sashimi.cli import (UserError, atomic_output, check_at_most, check_fits, check_out_dir, command,
                         regular_file, resolve_device)
from sashimi.model import SaShiMi
from sashimi.quantize import Quantizer
from sashimi.session import Session


class GenerationStopped(Exception):
    """generate_audio's should_stop() asked it to stop: nothing was generated."""


class GraphCaptureError(RuntimeError):
    """Capturing the generation step in a CUDA graph failed (rerun with --no-cuda-graphs)."""


class StepSampler:
    """One generation step on static buffers: the unit that is captured in a CUDA graph.

    step(phase): out = session.step_at(cur, phase) (the model's step on the session's state);
    (tokens, logp) = model.sample_next(out, ...) (one token, or a frame's channels when a
    position is a frame); cur <- tokens; position `pos` of `tokens` <- tokens, with `pos` a
    DEVICE tensor incremented in place; loglik += logp. Nothing is read back to the host and
    every buffer is allocated once, so the same function runs eagerly (CPU, --no-cuda-graphs)
    and under CUDA graph capture. `phase` = t mod prod(pool): what a step runs depends only on
    it (Backbone.phases), so prod(pool) graphs (16 for pool (4, 4)) cover every step.
    """

    def __init__(self, session: Session, tokens: torch.Tensor, loglik: torch.Tensor, pos: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None):
        device = tokens.device
        self.session, self.model, self.tokens, self.loglik = session, session.model, tokens, loglik
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.period = self.model.cfg.pool_factor
        self.k = session.k                             # tokens per position
        B = tokens.shape[0]
        # the last position's tokens: (B,) one token, (B, k) a frame
        self.cur = torch.zeros((B, self.k) if self.k > 1 else (B,), dtype=torch.long, device=device)
        self.pos = torch.full((1,), pos, dtype=torch.long, device=device)          # where it goes (positions)

    def sample(self, out: torch.Tensor) -> None:
        """Sample the tokens of position `pos` from the step output `out` (B, ...) and record them."""
        token, logp = self.model.sample_next(out, self.temperature, self.top_p, generator=self.generator)
        self.cur.copy_(token.view(self.cur.shape))
        self.tokens.view(token.shape[0], -1, self.k).index_copy_(1, self.pos, token.unsqueeze(1))
        self.pos.add_(1)
        self.loglik.add_(logp.double())

    def step(self, phase: int) -> None:
        """Consume `cur` (position t, phase = t mod prod(pool)) and sample the next position."""
        self.sample(self.session.step_at(self.cur, phase))

    def scratch(self, generator: torch.Generator | None, steps: int) -> "StepSampler":
        """A copy on buffers of its own (a session with the state cloned, room for `steps`
        tokens): for warming up before a capture without touching this sampler's buffers or
        generator."""
        B = self.tokens.shape[0]
        tokens = torch.zeros(B, (steps + 1) * self.k, dtype=torch.long, device=self.tokens.device)
        session = Session(self.model, B, self.session.device, setup=False)
        session.state = self.session.clone_state()
        other = StepSampler(session, tokens, torch.zeros_like(self.loglik), 0, self.temperature, self.top_p,
                            generator)
        other.cur.copy_(self.cur)
        return other


def capture_step_graphs(sampler: StepSampler, phases=None, warmup: int = 2) -> dict:
    """One CUDA graph per phase variant of `sampler.step` (all prod(pool) of them, or `phases`,
    captured in that order; a replay order that differs is safe: no tensor allocated inside a
    capture outlives it, everything a step keeps is in the sampler's static buffers).

    Warm-up first, as the CUDA graphs docs require: every variant `warmup` times on a side
    stream, on scratch copies of the buffers and a scratch generator (this runs every Triton
    kernel once, so autotuning is never captured, and the real state and RNG are untouched).
    The sampler's generator is registered with every graph: each replay advances its philox
    offset exactly as the eager step would, so graphs and eager draw the same numbers.
    """
    device = sampler.tokens.device
    if device.type != "cuda":
        raise ValueError("capture_step_graphs needs a sampler on a CUDA device")
    order = list(range(sampler.period)) if phases is None else list(phases)
    try:
        scratch = sampler.scratch(torch.Generator(device=device).manual_seed(0), warmup * sampler.period)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for phase in range(sampler.period):
                    scratch.step(phase)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        del scratch
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for phase in order:
            g = torch.cuda.CUDAGraph()
            if sampler.generator is not None:
                g.register_generator_state(sampler.generator)
            with torch.cuda.graph(g, pool=pool):
                sampler.step(phase)
            graphs[phase] = g
        torch.cuda.synchronize(device)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphCaptureError(f"CUDA graph capture of the generation step failed ({first}); "
                                f"rerun with --no-cuda-graphs") from exc
    return graphs


def run_steps(sampler: StepSampler, t0: int, t1: int, graphs: dict | None = None,
              on_progress=None, every: int = 256) -> None:
    """Steps t = t0 .. t1-1: graphs[t mod period].replay(), or sampler.step eagerly. No host
    sync; on_progress(steps_done) every `every` steps (it must not read the device)."""
    P = sampler.period
    for t in range(t0, t1):
        if graphs is None:
            sampler.step(t % P)
        else:
            graphs[t % P].replay()
        if on_progress is not None and (t + 1 - t0) % every == 0:
            on_progress(t + 1 - t0)


@torch.no_grad()
def generate_audio(model: SaShiMi, frames: int, batch: int, quantizer: Quantizer,
                   temperature: float = 1.0, top_p: float = 1.0, prompt: torch.Tensor | None = None,
                   seed: int = 0, progress: bool = True, cuda_graphs: bool | None = None,
                   use_prefill: bool = True, should_stop=None):
    """Generate `frames` frames (prompt included) for `batch` samples.

    prompt: float audio (P, C) at the model's rate, continued by every sample. Without one,
    generation starts from one frame of silence (not part of the output).
    The prompt (or that frame) is consumed by `sashimi.prefill.prefill` in parallel (once, then
    its state is copied to every sample); use_prefill=False steps through it token by token.
    cuda_graphs: replay one CUDA graph per phase variant of the step (default: on CUDA);
    False runs the same step function eagerly (always on CPU).
    should_stop: polled every 256 steps; when it returns True, GenerationStopped is raised.
    Returns (audio float32 (batch, frames, C) in [-1, 1], log-likelihood of the generated
    tokens in bits, (batch,)).
    """
    cfg = model.cfg
    C = cfg.channels
    device = model.embedding.weight.device
    if cuda_graphs is None:   # a predictor on the CPU (the cascade) cannot ride in a graph
        cuda_graphs = device.type == "cuda" and (not model.cfg.value_input or model.layout.predictor.graph_safe)
    elif cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, got {device}")
    gen = torch.Generator(device=device).manual_seed(seed)
    one = Session(model, 1, device)                  # the prompt's, then copied to every sample
    if prompt is not None:
        prompt_tokens = one.to_model(quantizer.encode(prompt.to(device))).reshape(-1)   # frame by frame
        start = prompt_tokens.expand(batch, -1)
        emit_prompt = True
    else:
        start = one.silence().expand(batch, C)
        emit_prompt = False
    k = one.k                                        # tokens per position
    n_prompt = start.shape[1]
    n_total = frames * C + (0 if emit_prompt else C)
    if n_prompt > n_total:
        raise UserError(f"the prompt ({n_prompt // C} frames) is longer than the requested length ({frames} frames)")
    if n_prompt == 0:
        raise UserError("the prompt holds no audio")
    tokens = torch.empty(batch, n_total, dtype=torch.long, device=device)
    tokens[:, :n_prompt] = start
    loglik = torch.zeros(batch, dtype=torch.float64, device=device)

    was_training = model.training
    model.eval()
    try:
        if n_prompt < n_total:
            # the prompt is the same for every sample: consume it once, copy the state
            positions = one.positions(start[:1].view(1, -1, C))
            if use_prefill:
                with nvtx_range("sashimi/generate/prefill"):
                    out = one.prefill(positions)
            else:
                for t in range(positions.shape[1]):
                    out = one.step(positions[:, t])
            sampler = StepSampler(one.replicate(batch), tokens, loglik, n_prompt // k, temperature, top_p, gen)
            sampler.sample(out.expand(batch, *out.shape[1:]).contiguous())        # position n_prompt / k
            t0, t1 = n_prompt // k, n_total // k - 1
            graphs = None
            if cuda_graphs and t1 > t0:
                phases = [t % sampler.period for t in range(t0, min(t1, t0 + sampler.period))]
                graphs = capture_step_graphs(sampler, phases)
            # On CPU a step is hundreds of tiny ops: one thread each avoids OpenMP spin-waits
            # that, on a busy machine, made every op ~100x slower (measured 0.26 s vs 16 s).
            threads = torch.get_num_threads()
            if device.type == "cpu":
                torch.set_num_threads(1)
            try:
                _generate_steps(sampler, t0, t1, graphs, batch, C // k, cfg.sample_rate, progress, should_stop)
            finally:
                torch.set_num_threads(threads)
    finally:
        model.train(was_training)
    if not emit_prompt:
        tokens = tokens[:, C:]
    audio = quantizer.decode(one.from_model(tokens.view(batch, -1, C))).float().cpu()
    return audio, (loglik / math.log(2)).cpu()


def _generate_steps(sampler, t0, t1, graphs, batch, per_frame, rate, progress, should_stop=None):
    """run_steps with a progress bar (samples/s over the batch, real-time factor per stream);
    per_frame: positions per frame (C interleaved, 1 for frames or mono); should_stop() polled
    with the progress (GenerationStopped when it says so)."""
    from tqdm.auto import tqdm
    bar = tqdm(total=t1 - t0 + 1, disable=not progress, unit="step", dynamic_ncols=True, mininterval=0.5)
    bar.update(1)                                   # the position sampled from the prompt's state
    start = time.perf_counter()

    def show(done: int) -> None:                    # host-side counters only: no device sync
        elapsed = max(time.perf_counter() - start, 1e-9)
        fps = done / per_frame / elapsed                    # frames per second, per stream
        bar.set_postfix(samples_s=f"{batch * fps:,.0f}", realtime=f"{fps / rate:.3f}x")
        bar.update(done + 1 - bar.n)

    def on_progress(done: int) -> None:
        if progress:
            show(done)
        if should_stop is not None and should_stop():
            bar.close()
            raise GenerationStopped

    every = 256 if graphs is None else 4096
    with nvtx_range("sashimi/generate/steps"):
        run_steps(sampler, t0, t1, graphs, on_progress if progress or should_stop else None, every)
    if progress:
        if sampler.tokens.is_cuda:
            torch.cuda.synchronize(sampler.tokens.device)
        show(t1 - t0)
    bar.close()


def write_wav(path, audio: torch.Tensor, sample_rate: int, overwrite: bool = True) -> Path:
    """16-bit PCM WAV of (frames, C) float audio; overwrite=False never replaces a file that
    exists by the end (another run's): one line then."""
    import soundfile as sf
    path = Path(path)
    buffer = io.BytesIO()   # encoded in memory: a full disk is then an OSError, not libsndfile's "System error"
    sf.write(buffer, np.clip(audio.numpy(), -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    with atomic_output(path, overwrite) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def check_finite_result(audio: torch.Tensor, loglik: torch.Tensor, checkpoint_path) -> None:
    """A NaN or infinite log-likelihood (or sample) means the model computes garbage (weights or
    config that are finite but diverge, e.g. a converted model with an unstable A): one line, no
    WAV, instead of a constant full-scale file."""
    if not torch.isfinite(loglik).all() or not torch.isfinite(audio).all():
        bad = loglik[~torch.isfinite(loglik)]
        raise UserError(f"{checkpoint_path}: the model's log-likelihood of its own samples is "
                        f"{bad[0].item() if bad.numel() else 'finite but the audio is not'}: it computes "
                        f"non-finite probabilities (a diverged or damaged model); nothing written")


def choose(loglik: torch.Tensor, keep: str) -> list[int]:
    order = torch.argsort(loglik, descending=True).tolist()
    if keep == "all":
        return order
    if keep == "best":
        return order[:1]
    return [order[len(order) // 2]]  # middle: the median sample


def parse_args(argv=None):
    p = cli.parser("sashimi.generate", __doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by sashimi.train")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each sample (prompt included)")
    p.add_argument("--batch", type=int, default=1, help="samples generated in parallel")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature: below 1 is more conservative (a young model's samples at 1.0 "
                        "are mostly noise)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (categorical head)")
    p.add_argument("--prompt", help="an audio file to continue (resampled to the model's rate)")
    p.add_argument("--keep", choices=("best", "middle", "all"), default="all",
                   help="which samples to write, ranked by their exact log-likelihood")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/samples)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the step eagerly instead of replaying CUDA graphs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing WAVs of the same name (default: pick new names)")
    p.add_argument("--spectrogram", action="store_true",
                   help="also write a spectrogram PNG beside each WAV (needs matplotlib)")
    return p.parse_args(argv)


MAX_BATCH = 65_536   # samples generated in parallel: far beyond what fills a GPU


def check_args(args) -> None:
    """Flags a user can get wrong: one line each, before the model is even loaded."""
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise UserError(f"--seconds must be a finite number > 0, got {args.seconds!r}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    check_at_most("--batch", args.batch, MAX_BATCH)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature must be a finite number > 0, got {args.temperature!r}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p!r}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.prompt is not None:
        regular_file(args.prompt, "--prompt")   # missing, a folder, a FIFO: one line
    if args.spectrogram:
        from sashimi.spectrogram import require_matplotlib
        require_matplotlib()                     # before the work, not after it


def check_batch_fits(model: SaShiMi, batch: int, frames: int, device: torch.device) -> None:
    """Refuse a batch whose recurrent state and tokens cannot fit in the device's memory."""
    per_sample = Session(model, 0, "meta", setup=False).state_bytes_per_row()
    per_sample += frames * model.cfg.channels * 8 + 2 * 4 * model.cfg.levels  # tokens, head output
    check_fits({"recurrent state and tokens (--batch x --seconds)": batch * per_sample}, device,
               f"--batch {batch} of {frames} frames")


def output_paths(out: Path, names: list[str], overwrite: bool) -> list[Path]:
    """Where the WAVs go: `names` in `out`, or (without --overwrite, when any exists) the same
    names with the first free suffix _2, _3, ... so nothing is overwritten."""
    paths = [out / n for n in names]
    if overwrite or not any(p.exists() for p in paths):
        return paths
    k = 2
    while True:
        paths = [out / f"{Path(n).stem}_{k}{Path(n).suffix}" for n in names]
        if not any(p.exists() for p in paths):
            return paths
        k += 1


def run(args) -> int:
    check_args(args)
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "samples"
    model = checkpoint.load_model(args.checkpoint, device)[0]
    cfg = model.cfg
    prompt = None   # read before --out is created: a refused prompt leaves nothing
    if args.prompt:
        from sashimi.data import DataError, read_audio
        try:
            prompt = read_audio(args.prompt, cfg.sample_rate, cfg.channels)
        except DataError as exc:
            raise UserError(str(exc)) from None
        if prompt.shape[0] == 0:
            raise UserError(f"the prompt {args.prompt} holds no audio")
        if not torch.isfinite(prompt).all():
            raise UserError(f"the prompt {args.prompt} holds NaN or infinite samples")
    frames = int(round(args.seconds * cfg.sample_rate))
    if frames < 1:
        raise UserError(f"--seconds {args.seconds} is less than one sample at {cfg.sample_rate} Hz")
    check_batch_fits(model, args.batch, frames, device)
    check_out_dir(out)
    quantizer = cfg.quantizer
    try:
        audio, loglik = generate_audio(model, frames, args.batch, quantizer, args.temperature, args.top_p,
                                       prompt, args.seed, cuda_graphs=False if args.no_cuda_graphs else None)
    except GraphCaptureError as exc:
        raise UserError(str(exc)) from None
    check_finite_result(audio, loglik, args.checkpoint)
    n_gen = audio.shape[1] * cfg.channels - (prompt.numel() if prompt is not None else 0)
    kept = choose(loglik, args.keep)
    paths = output_paths(out, [f"sample_seed{args.seed}_{i:03d}.wav" for i in kept], args.overwrite)
    for i, target in zip(kept, paths):
        path = write_wav(target, audio[i], cfg.sample_rate, args.overwrite)
        print(f"{path}  log-likelihood {loglik[i].item():.1f} bits "
              f"({-loglik[i].item() / max(1, n_gen):.3f} bits/sample NLL), "
              f"{audio.shape[1] / cfg.sample_rate:.2f} s, {cfg.channels} ch, {cfg.sample_rate} Hz")
        if args.spectrogram:
            from sashimi.spectrogram import write_png
            print(write_png(path.with_suffix(".png"), audio[i].numpy(), cfg.sample_rate, path.name))
    return 0


main = command(parse_args, run)      # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
