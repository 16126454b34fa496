"""A lossless audio codec from a trained SaShiMi: the model's predictive distribution drives a
range coder (`constriction`), streaming over a batch of independent chunks.

    python -m sashimi.compress   --checkpoint C IN.(wav|flac|ogg)|DIR OUT.sash|DIR [--report R.csv]
    python -m sashimi.decompress --checkpoint C IN.sash RESTORED.wav

Lossless means bit-exact against the quantised input: with a `--bits 16 --quantization linear`
model a 16-bit PCM file comes back sample-identical; an 8-bit or mu-law model restores the
input as its quantiser sees it (`restored_pcm16(quantiser, tokens)`), and compress says so.
The input's rate and channel count must be the model's (a lossless codec never resamples).

How a file is coded. It is cut into chunks of `chunk_frames` frames; each chunk starts from
one frame of silence, as generation does, so chunks are independent contexts, and all chunks
of a group (at most `group_chunks`) advance together: one recurrent step of the model (a
`Session`) per token position, for the whole batch. Groups are independent: `--jobs` worker
processes code them side by side (auto_chunking makes wide groups, at least one per job).
Nothing is held per position beyond the audio itself: memory grows with the batch, not with
the duration.
Each token is coded through its interval, never a full table: a 2^bits alphabet is split into
4-symbol digits (16-bit: 8 stages), and each stage codes one digit with a table of the head's
CDF (`head.cdf`) at that digit's 5 edges, the outer two known from the stage before: 24 CDF
evaluations per 16-bit token instead of 65,537 (format 2's 64 x 64 x 16 evaluated 147, 1.6x
slower on wide batches, where the CDF is most of the work). The coded CDF is the model's mixed
with a uniform one (UNIFORM_WEIGHT), so no token costs more than bits + 10. The range coder is
constriction's (`Categorical(perfect=False)` tables in a queue `RangeEncoder`); all rows of a
step go to it in one call. One stream per group.

What the decoder relies on (each held by a test in tests/test_codec.py):
1. The same batch. Decoder and encoder step the same chunks in the same order, finished
   chunks fed the zero token until the longest ends: a batched matmul's rows are NOT invariant
   to the batch size (measured on CPU: rows of a batch of 1-7 differ from the same rows in a
   batch of 64 by ~1e-6), so a file's groups are recorded in its header and never mixed with
   another file's chunks.
2. One CPU thread for the model (BLAS may split reductions by thread count): set inside the
   codec, whatever the caller's thread setting.
3. The same arithmetic: the same torch build at the same CPU capability (ATEN_CPU_CAPABILITY)
   on the same device kind. The header records them and decompress refuses another in one line
   that says how to match it.
4. One float64 function from the head's output to each stage's table, and constriction's
   deterministic quantisation of that table.
Each group's decoded tokens are checked against its CRC as soon as the group ends, so anything
else that computes differently is one line and no output, never wrong audio. What a file can
make the decoder do is bounded by its size (Chunking.work, FREE_TOKENS, TOKENS_PER_BYTE).

The container (little-endian): b"SASHIMI1", u32 header length, the header as JSON, u32 CRC-32
of the header, then each group's range-coder words (uint32). The header is validated against a
schema (types, ranges, the chunk table against `frames`, the streams against the file's size)
before anything is allocated. The CRCs guard against damage, not against a crafted file, which
is why the schema is checked too.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sashimi import checkpoint
from sashimi.cli import UserError, atomic_output, regular_file
from sashimi.model import SaShiMi
from sashimi.quantize import KINDS, Quantizer
from sashimi.session import Session

MAGIC = b"SASHIMI1"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)         # 2: 64-symbol stages, every edge evaluated; a CRC per chunk
MAX_HEADER_BYTES = 1 << 24          # a header lists a CRC per chunk: 16 MiB is ~200,000 chunks
UNIFORM_WEIGHT = 2.0 ** -10          # format 3 codes (1 - w) model + w uniform: see IntervalCoder
STAGE_SYMBOLS = 4                  # the widest table coded per stage (format 3)
DEFAULT_GROUP_CHUNKS = 256          # the batch width of a Chunking made without a choice
TARGET_ROWS = 2048                  # auto chunking: chunks per group (the batch width)
MIN_CHUNK_FRAMES = 1024             # auto chunking: the shortest chunk
MAX_GROUP_CHUNKS = 4096             # the widest batch a file may ask for (the decoder's memory)
FLUSH_FRAMES = 1024                 # the decoder hands on its tokens every this many frames
# The decoder's work is bounded by the file (not by this machine's memory): a file may ask
# for at most FREE_TOKENS + TOKENS_PER_BYTE x its stream bytes of work (Chunking.work); the
# encoder pads the few files that code below that with zeros (near-silence; or a file of one short
# group, whose steps are charged as MIN_ROWS_CHARGED rows: 64 tokens a byte keeps 3,000 frames of
# a cascade model's single chunk under 15 bits/sample).
# FREE_TOKENS is a few seconds of decoding at worst (one-row groups), so a crafted file is
# refused by its first group's CRC within seconds on any machine.
TOKENS_PER_BYTE = 64
FREE_TOKENS = 1 << 15
MIN_ROWS_CHARGED = 128              # a step costs about this many rows' work however narrow


class CodecError(UserError):
    """A .sash file or an input that cannot be coded: one line, non-zero exit."""


# --------------------------------------------------------------------------------- samples

BLOCK = 1 << 18     # samples converted at a time: whole-file temporaries would grow with duration


def restored_pcm16(quantizer: Quantizer, tokens: torch.Tensor) -> np.ndarray:
    """What decompress writes for these tokens: int16 PCM. Each token decodes to its bin's
    centre; floor(centre * 32768) is exact for 16-bit linear (token k -> k - 32768)."""
    flat, out = tokens.reshape(-1), np.empty(tokens.numel(), dtype=np.int16)
    for i in range(0, len(flat), BLOCK):
        x = quantizer.decode(flat[i:i + BLOCK].long()).double().numpy()
        out[i:i + BLOCK] = np.clip(np.floor(x * 32768.0), -32768, 32767)
    return out.reshape(tokens.shape)


def quantized(quantizer: Quantizer, audio: torch.Tensor) -> np.ndarray:
    """The model's tokens of float audio (frames, C) as int32, block by block."""
    flat, out = audio.reshape(-1), np.empty(audio.numel(), dtype=np.int32)
    for i in range(0, len(flat), BLOCK):
        out[i:i + BLOCK] = quantizer.encode(flat[i:i + BLOCK]).numpy()
    return out.reshape(audio.shape)


def read_input(path: Path, sample_rate: int, channels: int) -> tuple[torch.Tensor, dict]:
    """The file's samples as float32 (frames, channels), refusing another rate or channel count."""
    import soundfile as sf
    regular_file(path, "input")
    try:
        info = sf.info(str(path))
        data = sf.read(str(path), dtype="float32", always_2d=True)[0]
    except Exception as exc:
        raise CodecError(f"{path}: unreadable audio file ({' '.join(str(exc).split())})") from None
    if info.samplerate != sample_rate:
        raise CodecError(f"{path} is {info.samplerate} Hz but the model is {sample_rate} Hz; a lossless codec "
                         f"does not resample: resample the file first, or use a {info.samplerate} Hz model")
    if info.channels != channels:
        raise CodecError(f"{path} has {info.channels} channel(s) but the model has {channels}")
    if data.shape[0] == 0:
        raise CodecError(f"{path} holds no audio")
    if not np.isfinite(data).all():
        raise CodecError(f"{path} holds NaN or infinite samples")
    return torch.from_numpy(data), dict(subtype=info.subtype, format=info.format)


# ------------------------------------------------------------------------------- the model

def load_model(path, device: str = "cpu") -> tuple[SaShiMi, str]:
    """The checkpoint's model on `device` (CPU: reference kernels; CUDA: the Triton step
    kernels, which use no atomics) and its content SHA-256 (a CheckpointError is one line)."""
    from sashimi.cli import resolve_device
    model, payload = checkpoint.load_model(regular_file(path, "--checkpoint"), resolve_device(device))
    model.eval().setup_step()
    return model, payload.get("sha256") or checkpoint.content_hash(payload)


def arithmetic(device: torch.device) -> dict:
    """What the probabilities' bits depend on besides the model (invariant 3)."""
    kind = "cpu" if device.type == "cpu" else f"cuda {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(), device=kind)


def _device(model: SaShiMi) -> torch.device:
    return model.embedding.weight.device


# ------------------------------------------------------------------- the coded interval

def stage_sizes(levels: int, stage_symbols: int = STAGE_SYMBOLS) -> list[int]:
    """The alphabet 2^bits as digits of at most `stage_symbols` symbols, most significant first."""
    bits, out = int(levels).bit_length() - 1, []
    if 1 << bits != levels:
        raise ValueError(f"levels must be a power of two, got {levels}")
    per = stage_symbols.bit_length() - 1
    while bits > 0:
        b = min(per, bits)
        out.append(1 << b)
        bits -= b
    return out


class IntervalCoder:
    """Codes tokens through the head's CDF at each stage's edges (see the module doc): the
    encoder and the decoder make the same calls with the same floats and get the same tables.

    A stage's two outer edges are the inner edges of the digit chosen before it, so only its
    size - 1 inner edges are evaluated (format 3: 4-symbol stages, 3 new edges each, 24 per
    16-bit token). Format 2 evaluated all size + 1 edges of 64-symbol stages (147 per token)."""

    def __init__(self, head, levels: int, stage_symbols: int = STAGE_SYMBOLS, reuse_edges: bool = True):
        import constriction
        self.head, self.levels, self.sizes = head, levels, stage_sizes(levels, stage_symbols)
        self.reuse = reuse_edges
        self.family = constriction.stream.model.Categorical(perfect=False)

    def _stage(self, cdf, lo: torch.Tensor, width: int, size: int, below, above):
        """float64 (A, size) P(digit) of the symbols [lo + d width, lo + (d + 1) width) as numpy,
        and the CDF at the size + 1 edges (A, size + 1); below / above: the CDF at the outer
        edges (A,), known from the stage before (None: compute them, format 2)."""
        if self.reuse:
            edges = lo[:, None] + torch.arange(1, size) * width
            inner = cdf(edges.to(cdf.device)).cpu()
            # the model mixed with a uniform distribution (UNIFORM_WEIGHT): no token costs more
            # than bits + 10 however confidently the model misses it (0 and 1 stay 0 and 1)
            inner = inner * (1.0 - UNIFORM_WEIGHT) + edges.double() * (UNIFORM_WEIGHT / self.levels)
            full = torch.cat([below[:, None], inner, above[:, None]], 1)
        else:
            full = cdf((lo[:, None] + torch.arange(size + 1) * width).to(cdf.device))
        full = full.cpu()
        p = (full[:, 1:] - full[:, :-1]).clamp_(min=0.0)
        # far in a tail float64 runs out (every difference 0): code that digit uniformly; both
        # sides see the same floats, so both take this branch
        lost = ~(p.sum(1) > 1e-200)
        return p.masked_fill_(lost[:, None], 1.0).numpy(), full

    def _start(self, n: int):
        return (torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64),
                torch.ones(n, dtype=torch.float64))

    @staticmethod
    def _narrow(full: torch.Tensor, digit: torch.Tensor):
        d = digit[:, None]
        return full.gather(1, d)[:, 0], full.gather(1, d + 1)[:, 0]

    def encode(self, coder, out: torch.Tensor, symbols: torch.Tensor) -> np.ndarray:
        """Code symbols (A,) given head outputs (A, ...); returns their ideal cost in bits (A,)."""
        (lo, below, above), width, bits = self._start(len(symbols)), self.levels, np.zeros(len(symbols))
        cdf = self.head.cdf(out)
        rows = np.arange(len(symbols))
        for size in self.sizes:
            width //= size
            p, full = self._stage(cdf, lo, width, size, below, above)
            digit = (symbols - lo) // width
            d = digit.numpy().astype(np.int32)
            coder.encode(d, self.family, p)
            bits -= np.log2(np.maximum(p[rows, d] / p.sum(1), 1e-300))
            lo = lo + digit * width
            below, above = self._narrow(full, digit)
        return bits

    def decode(self, coder, out: torch.Tensor) -> torch.Tensor:
        (lo, below, above), width = self._start(out.shape[0]), self.levels
        cdf = self.head.cdf(out)
        for size in self.sizes:
            width //= size
            p, full = self._stage(cdf, lo, width, size, below, above)
            digit = torch.from_numpy(np.asarray(coder.decode(self.family, p), dtype=np.int64))
            lo = lo + digit * width
            below, above = self._narrow(full, digit)
        return lo


# ------------------------------------------------------------------------------- chunking

@dataclass(frozen=True)
class Chunking:
    frames: int
    chunk_frames: int
    group_chunks: int = DEFAULT_GROUP_CHUNKS

    @property
    def count(self) -> int:
        return -(-self.frames // self.chunk_frames)

    def length(self, i: int) -> int:
        return min(self.chunk_frames, self.frames - i * self.chunk_frames)

    def groups(self) -> list[range]:
        """The chunks stepped as one batch, in order."""
        return [range(g, min(g + self.group_chunks, self.count)) for g in range(0, self.count, self.group_chunks)]

    def group_work(self, group: range, channels: int) -> int:
        """The decoder's work for a group, in tokens: its steps (and the silent frame it starts
        from) times its rows, a group of fewer than MIN_ROWS_CHARGED rows charged as that many
        (a step costs about that much however narrow the batch)."""
        return (self.length(group.start) + 1) * channels * max(len(group), MIN_ROWS_CHARGED)

    def work(self, channels: int) -> int:
        """group_work summed over the groups: every group but the last starts with a whole
        chunk (arithmetic, not a loop over 10^5 groups)."""
        n = -(-self.count // self.group_chunks)
        last = range((n - 1) * self.group_chunks, self.count)
        return ((n - 1) * (self.chunk_frames + 1) * channels * max(self.group_chunks, MIN_ROWS_CHARGED)
                + self.group_work(last, channels))


def auto_chunking(frames: int, jobs: int, min_chunk: int = MIN_CHUNK_FRAMES) -> Chunking:
    """The chunking of a file when --chunk-seconds is not given: wide batches (the per-step
    cost is mostly paid once per batch, so a batch of ~TARGET_ROWS chunks codes several times
    more samples per second than one of 10) and at least `jobs` groups to run side by side.
    Chunks are at least `min_chunk` frames long (each starts from silence: shorter ones cost the
    model context, and an adaptive predictor its adaptation)."""
    chunk = max(min_chunk, -(-frames // (max(1, jobs) * TARGET_ROWS)))
    chunk = min(chunk, frames)
    count = -(-frames // chunk)
    groups = max(-(-count // TARGET_ROWS), min(max(1, jobs), count))
    return Chunking(frames, chunk, -(-count // groups))


def chunking_for(frames: int, sample_rate: int, chunk_seconds: float | None, jobs: int,
                 group_chunks: int | None = None, min_chunk: int = MIN_CHUNK_FRAMES) -> Chunking:
    """--chunk-seconds given: chunks of that length, groups of up to TARGET_ROWS (or
    `group_chunks`), at least `jobs` groups; else auto_chunking."""
    if chunk_seconds is None and group_chunks is None:
        return auto_chunking(frames, jobs, min_chunk)
    chunk = max(1, min(frames, int(round((chunk_seconds or 1.0) * sample_rate))))
    count = -(-frames // chunk)
    if group_chunks is None:
        groups = max(-(-count // TARGET_ROWS), min(max(1, jobs), count))
        group_chunks = -(-count // groups)
    return Chunking(frames, chunk, group_chunks)


class _one_thread:
    """Invariant 2: the model runs on one CPU thread on both sides."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


# ------------------------------------------------------------------------- coding a group
# A group is coded by one process on one thread (invariants 1 and 2); groups are independent,
# so `--jobs` worker processes code them side by side. Workers are forked after the model is
# loaded (they share it) and get a group's tokens or stream as their task.

_MODEL: SaShiMi | None = None        # the model a worker codes with (set before forking)
_DONE = None                         # tokens coded so far, all workers together (the progress bar)
TICK = 512                           # token positions between progress updates


def _tick(n: int) -> None:
    if _DONE is not None:
        with _DONE.get_lock():
            _DONE.value += n


@torch.no_grad()
def encode_group(model: SaShiMi, frames: np.ndarray, lengths: list[int],
                 version: int = FORMAT_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """One group: frames (rows, L, C) int32, the file's tokens of each chunk (padded to the
    longest), and each chunk's length in frames -> (its range-coder words, the model's ideal
    cost in bits per model channel (C,))."""
    import constriction
    rows, L, C = frames.shape
    with _one_thread():
        session = Session(model, rows, setup=False)
        zero = model.cfg.quantizer.zero_token     # pads finished chunks: a token of every channel's grid
        tokens = session.to_model(torch.from_numpy(frames).long()).reshape(rows, L * C)
        ends = [n * C for n in lengths]
        for row, end in enumerate(ends):
            tokens[row, end:] = zero
        coders = channel_coders(model, version)
        enc = constriction.stream.queue.RangeEncoder()
        nll = np.zeros(C)
        session.start()
        active = rows
        for t in range(L * C):
            while ends[active - 1] <= t:      # only the file's last chunk is shorter
                active -= 1
            column = tokens[:, t]
            nll[t % C] += coders[session.j].encode(enc, session.out[:active], column[:active]).sum()
            session.feed(column)
            if t % TICK == TICK - 1:
                _tick(TICK * active)
        return enc.get_compressed(), nll


@torch.no_grad()
def decode_group(model: SaShiMi, stream: np.ndarray, lengths: list[int], sink,
                 version: int = FORMAT_VERSION) -> None:
    """One group's stream -> its tokens, handed to `sink(first_frame, block)` every
    FLUSH_FRAMES frames as the file's tokens (rows, frames, C) int32: memory stays a fixed
    block whatever the chunk length claims."""
    import constriction
    rows, C = len(lengths), model.cfg.channels
    L = max(lengths)
    with _one_thread():
        session = Session(model, rows, setup=False)
        zero = model.cfg.quantizer.zero_token
        coders = channel_coders(model, version)
        dec = constriction.stream.queue.RangeDecoder(stream)
        ends = [n * C for n in lengths]
        block = min(L, FLUSH_FRAMES)
        out = torch.full((rows, block * C), zero, dtype=torch.long)
        column = torch.full((rows,), zero, dtype=torch.long)
        session.start()
        active, first = rows, 0
        for t in range(L * C):
            while ends[active - 1] <= t:
                active -= 1
            try:
                column[:active] = coders[session.j].decode(dec, session.out[:active])
            except Exception as exc:   # a stream that ends early or cannot be read
                raise CodecError(f"the coded stream cannot be decoded ({' '.join(str(exc).split())[:120]})") from None
            column[active:] = zero
            if t % TICK == TICK - 1:
                _tick(TICK * active)
            i = t - first * C
            out[:, i] = column
            session.feed(column.clone())
            if i + 1 == out.shape[1] or t + 1 == L * C:
                n = (i + 1) // C
                sink(first, session.from_model(out[:, :n * C].view(rows, n, C)).numpy().astype(np.int32))
                first += n


def channel_coders(model: SaShiMi, version: int = FORMAT_VERSION) -> list[IntervalCoder]:
    """The coder of each channel slot of a position: its head on its grid (the layout's), as
    format `version` codes it."""
    layout = model.layout
    how = dict(stage_symbols=STAGE_SYMBOLS) if version >= 3 else dict(stage_symbols=64, reuse_edges=False)
    return [IntervalCoder(head, layout.levels(j), **how) for j, head in enumerate(layout.heads(model))]


def group_crc(chunk_crcs) -> int:
    """A group's token CRC: the CRC-32 of its chunks' token CRCs (each of the chunk's tokens,
    (frames, C) int32 little-endian, in the file's channels)."""
    return zlib.crc32(np.asarray(list(chunk_crcs), dtype="<u4").tobytes())


def _group_frames(tokens: np.ndarray, chunks: Chunking, group: range, zero: int) -> tuple[np.ndarray, list[int]]:
    """A group's tokens (rows, L, C) int32 from the file's (frames, C), padded, and lengths."""
    lengths = [chunks.length(i) for i in group]
    frames = np.full((len(group), max(lengths), tokens.shape[1]), zero, dtype=np.int32)
    for row, i in enumerate(group):
        start = i * chunks.chunk_frames
        frames[row, :lengths[row]] = tokens[start:start + lengths[row]]
    return frames, lengths


def _encode_task(task):
    frames, lengths = task
    return encode_group(_MODEL, frames, lengths)


def _worker_init() -> None:
    """A worker: one thread; Ctrl-C is the parent's to handle (it ends the pool), SIGTERM and
    SIGHUP end the worker at once."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    torch.set_num_threads(1)


class Workers:
    """`jobs` processes that code groups (forked, sharing the loaded model), or none (jobs 1, or
    a model on a GPU: groups then run here one after another). `submit(fn, tasks)` starts them;
    leaving the block (an error, a signal) ends the workers at once."""

    def __init__(self, model: SaShiMi, jobs: int):
        import multiprocessing
        global _MODEL, _DONE
        self.model, self.pool, self.jobs = model, None, jobs
        _MODEL, _DONE = model, multiprocessing.get_context("fork").Value("q", 0)
        if jobs > 1 and _device(model).type == "cpu":
            torch.set_num_threads(1)    # no thread pool in the parent to inherit half-made
            self.pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_init)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def submit(self, fn, tasks: list, bar=None):
        """Start the tasks; returns a callable that waits for their results (in order), showing
        the tokens coded so far on `bar` while it waits."""
        if self.pool is None:
            def run_here():
                results = []
                for t in tasks:
                    results.append(fn(t))
                    _show(bar)
                return results
            return run_here
        # a few tasks in flight at a time: memory stays bounded, and ending the pool never
        # waits on a queue of thousands (a file may hold 10^5 groups)
        todo, pending = collections.deque(tasks), []
        window = 2 * self.jobs

        def top_up():
            while todo and len(pending) < window:
                pending.append(self.pool.apply_async(fn, (todo.popleft(),)))
        top_up()

        def wait():
            results = []
            while pending:
                p = pending.pop(0)
                while not p.ready():
                    p.wait(0.5)
                    _show(bar)
                results.append(p.get())
                top_up()
            return results
        return wait


def _show(bar) -> None:
    if bar is not None and _DONE is not None and not isinstance(bar, _NoBar):
        bar.update(_DONE.value - bar.n)


# --------------------------------------------------------------------------------- encoding

def encode_tokens(model: SaShiMi, tokens, chunks: Chunking, progress: bool = False, workers: Workers | None = None):
    """tokens (frames, C) -> (one uint32 array per group; the model's ideal cost in bits per
    channel of the model (C,), its layout's channel_names)."""
    model.setup_step()
    return _encode_start(model, np.asarray(tokens, dtype=np.int32), chunks, workers)()


def _encode_start(model, tokens: np.ndarray, chunks: Chunking, workers: Workers | None, bar=None):
    """Start coding a file's groups; returns a callable that waits for (streams, nll)."""
    zero = model.cfg.quantizer.zero_token
    tasks = [_group_frames(tokens, chunks, g, zero) for g in chunks.groups()]
    wait = (workers or Workers(model, 1)).submit(_encode_task, tasks, bar)

    def finish():
        results = wait()
        streams = [s for s, _ in results]
        _pad_to_bound(streams, chunks, tokens.shape[1])
        return streams, sum(n for _, n in results)
    return finish


def _pad_to_bound(streams: list[np.ndarray], chunks: Chunking, channels: int) -> None:
    """The decoder's bound (see _check_work): a file that codes below it (near-silence) gets
    zero words after its last stream, which the range decoder never reads."""
    have = 4 * sum(len(s) for s in streams)
    need = -(-(chunks.work(channels) - FREE_TOKENS) // TOKENS_PER_BYTE)
    if need > have:
        streams[-1] = np.concatenate([streams[-1], np.zeros(-(-(need - have) // 4), dtype=np.uint32)])


# --------------------------------------------------------------------------------- decoding

def decode_tokens(model: SaShiMi, streams: list[np.ndarray], chunks: Chunking, progress: bool = False,
                  crcs: list[int] | None = None, version: int = FORMAT_VERSION) -> np.ndarray:
    """The tokens (frames, C) int32 from the groups' streams, in this process (measurements,
    tests); `crcs`: each group's token CRC, checked as the group ends."""
    C = model.cfg.channels
    model.setup_step()
    tokens = np.empty((chunks.frames, C), dtype=np.int32)
    for g, (group, stream) in enumerate(zip(chunks.groups(), streams)):
        def put(row, first, block, group=group):
            start = (group.start + row) * chunks.chunk_frames + first
            tokens[start:start + len(block)] = block
        _decode_one(model, group, stream, None if crcs is None else crcs[g], put, chunks, version)
    return tokens


def _decode_one(model, group: range, stream, crc, put, chunks: Chunking, version: int) -> None:
    """Decode a group, handing each chunk's tokens to put(row, first_frame, tokens) in order,
    and check its CRC the moment it ends: the first bad group stops the run."""
    lengths = [chunks.length(i) for i in group]
    running = [0] * len(group)

    def sink(first, block):
        for row, n in enumerate(lengths):
            part = block[row, :max(0, min(len(block[row]), n - first))]
            if len(part):
                running[row] = zlib.crc32(np.ascontiguousarray(part, dtype="<i4").tobytes(), running[row])
                put(row, first, part)
    what = f"chunk {group.start + 1}" if len(group) == 1 else f"chunks {group.start + 1}-{group.stop}"
    try:
        decode_group(model, stream, lengths, sink, version)
    except CodecError as exc:
        raise CodecError(f"{what}: {exc}") from None
    if crc is not None and group_crc(running) != crc:
        raise CodecError(f"{what} decoded to other samples than were encoded")


def _decode_task(task):
    group, stream, chunks, crc, path, version = task
    channels, quantizer = _MODEL.cfg.channels, _MODEL.cfg.quantizer
    with open(path, "r+b") as fh:
        fd = fh.fileno()

        def put(row, first, tokens):
            offset = WAV_HEADER_BYTES + ((group.start + row) * chunks.chunk_frames + first) * channels * 2
            os.pwrite(fd, restored_pcm16(quantizer, torch.from_numpy(tokens)).astype("<i2").tobytes(), offset)
        _decode_one(_MODEL, group, stream, crc, put, chunks, version)


def measure_round_trip(model: SaShiMi, tokens: np.ndarray, chunks: Chunking, sync=lambda: None) -> dict:
    """Encode and decode `tokens` (frames, C) as compress and decompress do: samples/s of each,
    bits/sample of the streams, and whether the decoded tokens are the input (gpu_check's row)."""
    t0 = time.perf_counter()
    streams, _ = encode_tokens(model, tokens, chunks)
    sync()
    t1 = time.perf_counter()
    decoded = decode_tokens(model, streams, chunks)
    sync()
    t2 = time.perf_counter()
    return dict(encode_samples_per_s=tokens.size / (t1 - t0), decode_samples_per_s=tokens.size / (t2 - t1),
                bits_per_sample=8 * sum(s.nbytes for s in streams) / tokens.size,
                round_trip=bool(np.array_equal(decoded, tokens)))


class _NoBar:
    n = 0

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, what: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=what, unit="sample", unit_scale=True, mininterval=0.5, dynamic_ncols=True)


# -------------------------------------------------------------------------------- container

def token_crc(tokens: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(tokens, dtype="<i4").tobytes())


def write_container(path: Path, header: dict, streams: list[np.ndarray], group_crcs: list[int],
                    overwrite: bool = True) -> int:
    payloads = [s.astype("<u4").tobytes() for s in streams]
    header = dict(header, streams=[dict(bytes=len(p), crc32=zlib.crc32(p)) for p in payloads],
                  group_tokens_crc32=group_crcs)
    blob = json.dumps(header, sort_keys=True).encode()
    data = MAGIC + struct.pack("<I", len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)) + b"".join(payloads)
    atomic_write(path, data, overwrite)
    return len(data)


def writable_path(path: Path) -> Path:
    """An output path whose folders are folders (or can be made) and which is not one: checked
    before the work, one line."""
    for folder in reversed(path.parents):
        if folder.exists() and not folder.is_dir():
            raise CodecError(f"cannot write {path}: {folder} is a file, not a folder")
    if path.is_dir():
        raise CodecError(f"cannot write {path}: it is a folder")
    return path


def atomic_write(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write through a temp file beside the target, removed on any failure; one line on error.
    overwrite=False: never replace a file that exists by the end (another run's)."""
    writable_path(path)
    with atomic_output(path, overwrite) as tmp:
        tmp.write_bytes(data)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# the header's schema: name -> (check, what it must be)
_HEADER = {
    "format_version": (lambda v: v in READABLE_VERSIONS, f"{FORMAT_VERSION}"),
    "checkpoint_sha256": (lambda v: isinstance(v, str) and len(v) == 64
                          and all(c in "0123456789abcdef" for c in v), "64 hex digits"),
    "sample_rate": (lambda v: _is_int(v) and 1 <= v <= 1_000_000, "an integer in [1, 1000000]"),
    "channels": (lambda v: v in (1, 2) and _is_int(v), "1 or 2"),
    "bits": (lambda v: v in (8, 16) and _is_int(v), "8 or 16"),
    "quantization": (lambda v: v in KINDS, " or ".join(KINDS)),
    "frames": (lambda v: _is_int(v) and 1 <= v <= 2**40, "an integer >= 1"),
    "chunk_frames": (lambda v: _is_int(v) and 1 <= v <= 2**40, "an integer >= 1"),
    "group_chunks": (lambda v: _is_int(v) and 1 <= v <= MAX_GROUP_CHUNKS, f"an integer in [1, {MAX_GROUP_CHUNKS}]"),
    "torch": (lambda v: isinstance(v, str) and len(v) < 64, "a version string"),
    "cpu_capability": (lambda v: isinstance(v, str) and len(v) < 64, "a string"),
    "device": (lambda v: isinstance(v, str) and len(v) < 64, "a string"),
    "streams": (lambda v: isinstance(v, list) and all(
        isinstance(s, dict) and set(s) == {"bytes", "crc32"} and _is_int(s["bytes"]) and s["bytes"] >= 0
        and s["bytes"] % 4 == 0 and _is_int(s["crc32"]) and 0 <= s["crc32"] < 2**32 for s in v),
        "a list of {bytes, crc32}"),
    "group_tokens_crc32": (lambda v: isinstance(v, list) and all(_is_int(c) and 0 <= c < 2**32 for c in v),
                           "a list of CRC-32s"),
}


def _validated_header(path: Path, blob: bytes, payload_bytes: int) -> dict:
    """The header if it keeps the schema, the chunk table agrees with `frames` and the streams
    with the file's length; else one line. Nothing has been allocated from it yet."""
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CodecError(f"{path}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CodecError(f"{path}: the header is not a JSON object")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CodecError(f"{path} has format version {version!r}; this version reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))}"
                         + (" (re-compress it with this version)" if version == 1 else ""))
    crc_field = "group_tokens_crc32" if version >= 3 else "chunk_tokens_crc32"
    schema = {("chunk_tokens_crc32" if k == "group_tokens_crc32" and version < 3 else k): v
              for k, v in _HEADER.items()}
    for name, (ok, want) in schema.items():
        if name not in header:
            raise CodecError(f"{path}: the header has no {name!r}")
        if not ok(header[name]):
            raise CodecError(f"{path}: header field {name!r} must be {want}, got {_short(header[name])}")
    unknown = set(header) - set(schema)
    if unknown:
        raise CodecError(f"{path}: unknown header fields {sorted(unknown)[:5]}")
    if sum(s["bytes"] for s in header["streams"]) != payload_bytes:
        raise CodecError(f"{path}: the streams add up to {sum(s['bytes'] for s in header['streams'])} bytes "
                         f"but the file holds {payload_bytes} after the header (truncated or extended)")
    # the decoder's work, before anything that grows with the claimed length
    chunks = Chunking(header["frames"], header["chunk_frames"], header["group_chunks"])
    work, most = chunks.work(header["channels"]), FREE_TOKENS + TOKENS_PER_BYTE * payload_bytes
    if work > most:
        raise CodecError(f"{path} claims {chunks.frames:,} frames in groups of {chunks.group_chunks} chunks: "
                         f"{work:,} tokens of decoding, more than its {payload_bytes:,} bytes of stream can hold "
                         f"(at most {most:,}): a damaged or crafted header")
    groups = -(-chunks.count // chunks.group_chunks)
    want = chunks.count if version < 3 else groups
    if len(header[crc_field]) != want:
        raise CodecError(f"{path}: the header lists {len(header[crc_field])} CRCs but its frames and chunking "
                         f"make {want} {'chunks' if version < 3 else 'groups of chunks'}")
    if len(header["streams"]) != groups:
        raise CodecError(f"{path}: the header lists {len(header['streams'])} streams for "
                         f"{groups} groups of chunks")
    if version < 3:
        listed = header.pop("chunk_tokens_crc32")
        header["group_tokens_crc32"] = [group_crc(listed[g.start:g.stop]) for g in chunks.groups()]
    return header


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def read_container(path: Path) -> tuple[dict, list[np.ndarray]]:
    regular_file(path, "input")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 4)
            if not head.startswith(MAGIC):
                raise CodecError(f"{path} is not a sashimi-compressed file (no {MAGIC.decode()} signature)")
            if len(head) < len(MAGIC) + 4:
                raise CodecError(f"{path} is truncated (its header is incomplete)")
            (n,) = struct.unpack_from("<I", head, len(MAGIC))
            size = os.fstat(fh.fileno()).st_size
            if n > MAX_HEADER_BYTES or len(head) + n + 4 > size:
                raise CodecError(f"{path} is truncated or damaged (its header claims {n:,} bytes)")
            blob = fh.read(n)
            (crc,) = struct.unpack("<I", fh.read(4))
            if zlib.crc32(blob) != crc:
                raise CodecError(f"{path}: the header is damaged (CRC mismatch)")
            header = _validated_header(path, blob, size - len(head) - n - 4)
            streams, data, at = [], memoryview(fh.read(size - len(head) - n - 4)), 0
            for i, s in enumerate(header["streams"]):
                payload, at = data[at:at + s["bytes"]], at + s["bytes"]
                if len(payload) != s["bytes"] or zlib.crc32(payload) != s["crc32"]:
                    raise CodecError(f"{path}: stream {i + 1} of {len(header['streams'])} is damaged "
                                     f"({'truncated' if len(payload) != s['bytes'] else 'CRC mismatch'}); "
                                     f"nothing was written")
                streams.append(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    except OSError as exc:
        raise CodecError(f"cannot read {path}: {exc.strerror or exc}") from None
    return header, streams


# ----------------------------------------------------------------------------- the commands

def cascade_only_bits(model, tokens: np.ndarray, chunks: Chunking) -> float:
    """The bits of these tokens (frames, C) under the model's cascade predictor alone, chunk by
    chunk as they are coded (`cascade.code_length_bits`): what the network adds to it is the
    difference from the coded size."""
    from sashimi.predictors.cascade import code_length_bits
    pcm, levels = model.layout.predictor_pcm(torch.from_numpy(tokens).long())
    pcm = pcm.numpy()
    full = chunks.frames // chunks.chunk_frames
    bits = 0.0
    if full:
        bits += code_length_bits(pcm[:full * chunks.chunk_frames].reshape(full, chunks.chunk_frames, -1), levels)
    if chunks.frames > full * chunks.chunk_frames:
        bits += code_length_bits(pcm[None, full * chunks.chunk_frames:], levels)
    return bits


def flac_bytes(pcm: np.ndarray, sample_rate: int) -> tuple[int, str]:
    """FLAC's size for these samples and how it was made: the `flac` binary at -8 where it
    exists, else libsndfile's FLAC encoder (its default level, about flac -5)."""
    import shutil
    import subprocess
    import tempfile

    import soundfile as sf
    if shutil.which("flac"):
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "in.wav"
            sf.write(str(wav), pcm, sample_rate, subtype="PCM_16")
            r = subprocess.run(["flac", "-8", "--silent", "-f", "-o", str(wav.with_suffix(".flac")), str(wav)],
                               capture_output=True)
            if r.returncode == 0:
                return wav.with_suffix(".flac").stat().st_size, "flac -8"
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return len(buf.getvalue()), "libsndfile FLAC (default level)"


def compress(checkpoint_path, in_path, out_path, chunk_seconds: float | None = None, progress: bool = True,
             say=print, group_chunks: int | None = None, loaded=None, device: str = "cpu", jobs: int = 1,
             overwrite: bool = True, flac: bool = False) -> dict:
    """Code one file (see compress_files)."""
    return compress_files(checkpoint_path, [(in_path, out_path)], chunk_seconds, progress, say, group_chunks,
                          loaded, device, jobs, overwrite, flac)[0]


def compress_files(checkpoint_path, pairs, chunk_seconds: float | None = None, progress: bool = True, say=print,
                   group_chunks: int | None = None, loaded=None, device: str = "cpu", jobs: int = 1,
                   overwrite: bool = True, flac: bool = False) -> list[dict]:
    """Code each (input, output) pair; `loaded` = load_model(...) to reuse a model. `jobs`
    worker processes code groups of chunks side by side, the next file's while this one's
    output is written. chunk_seconds None: auto_chunking. flac: also measure FLAC's size."""
    if chunk_seconds is not None and not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise CodecError(f"--chunk-seconds must be a finite number > 0, got {chunk_seconds!r}")
    model, digest = loaded or load_model(checkpoint_path, device)
    bar = _progress(0, progress, "coding")
    reports, pending = [], []
    try:
        with Workers(model, jobs) as workers:
            for src, dst in pairs:
                pending.append(_compress_start(model, digest, Path(src), Path(dst), chunk_seconds, group_chunks,
                                               workers, bar, jobs, overwrite, flac, say))
                while len(pending) > 1:          # one file ahead: the workers never wait for the writing
                    reports.append(pending.pop(0)())
            while pending:
                reports.append(pending.pop(0)())
    finally:
        bar.close()
    return reports


def _compress_start(model, digest, in_path: Path, out_path: Path, chunk_seconds, group_chunks, workers, bar,
                    jobs, overwrite, flac, say):
    cfg = model.cfg
    quantizer = cfg.quantizer
    audio, info = read_input(in_path, cfg.sample_rate, cfg.channels)
    exact = cfg.bits == 16 and cfg.quantization == "linear" and info["subtype"] in ("PCM_16", "PCM_S8", "PCM_U8")
    if not exact:
        say(f"note: a {cfg.bits}-bit {cfg.quantization} model codes the input as its quantiser sees it "
            f"({info['subtype']} in): decompress restores those samples exactly, not the original file")
    tokens = quantized(quantizer, audio)
    del audio
    # an adaptive predictor restarts with every chunk: the cascade's own shortest (docs/predictors.md)
    min_chunk = max(MIN_CHUNK_FRAMES, int(model.layout.predictor.min_chunk_seconds * cfg.sample_rate)
                    if cfg.value_input else 0)
    chunks = chunking_for(tokens.shape[0], cfg.sample_rate, chunk_seconds, jobs, group_chunks, min_chunk)
    if chunks.group_chunks > MAX_GROUP_CHUNKS:
        raise CodecError(f"groups of {chunks.group_chunks} chunks: at most {MAX_GROUP_CHUNKS} are coded as one batch")
    if hasattr(bar, "total"):
        bar.total += tokens.size
        bar.refresh()
    t0 = time.perf_counter()
    finish = _encode_start(model, tokens, chunks, workers, bar)
    crcs = [group_crc(token_crc(tokens[i * chunks.chunk_frames: i * chunks.chunk_frames + chunks.length(i)])
                      for i in group) for group in chunks.groups()]

    def done() -> dict:
        streams, nll = finish()
        seconds = time.perf_counter() - t0
        header = dict(format_version=FORMAT_VERSION, checkpoint_sha256=digest, sample_rate=cfg.sample_rate,
                      channels=cfg.channels, bits=cfg.bits, quantization=cfg.quantization,
                      frames=chunks.frames, chunk_frames=chunks.chunk_frames, group_chunks=chunks.group_chunks,
                      **arithmetic(_device(model)))
        size = write_container(out_path, header, streams, crcs, overwrite)
        samples = tokens.size
        payload = 8 * sum(s.nbytes for s in streams) / samples
        report = dict(file=str(in_path), out=str(out_path), frames=chunks.frames, channels=cfg.channels,
                      chunk_frames=chunks.chunk_frames, groups=len(streams), bytes=size,
                      bits_per_sample=8 * size / samples, payload_bits_per_sample=payload,
                      nll_bits_per_sample=float(nll.sum() / samples),
                      nll_bits_per_sample_per_channel=[float(v / chunks.frames) for v in nll],
                      pcm16_bytes=2 * samples, seconds=seconds, samples_per_s=samples / seconds,
                      exact_input=exact)
        line = f"{out_path}: {size:,} bytes, {report['bits_per_sample']:.3f} bits/sample"
        if report["nll_bits_per_sample"] <= 1.05 * payload + 0.05:
            line += (f" (the model's own cost {report['nll_bits_per_sample']:.3f}; per channel "
                     + ", ".join(f"{v:.3f}" for v in report["nll_bits_per_sample_per_channel"]) + ")")
        else:   # the coder floors each stage's probability, so confident misses cost far less coded
            line += " (the model's own cost is not comparable here: its misses fall below the coder's floor)"
        if flac and cfg.value_input and cfg.predictor == "cascade":
            report["cascade_only_bits_per_sample"] = cascade_only_bits(model, tokens, chunks) / samples
            line += f"; the cascade alone {report['cascade_only_bits_per_sample']:.3f}"
        if flac:
            pcm = restored_pcm16(quantizer, torch.from_numpy(tokens))
            fbytes, how = flac_bytes(pcm, cfg.sample_rate)
            report.update(flac_bytes=fbytes, flac_bits_per_sample=8 * fbytes / samples, flac=how,
                          ratio_to_flac=size / fbytes)
            line += f"; {how} {report['flac_bits_per_sample']:.3f} bits/sample ({report['ratio_to_flac']:.3f}x of it)"
        say(line + f"; {report['samples_per_s']:,.0f} samples/s")
        return report
    return done


def _check_arithmetic(path: Path, header: dict, device: torch.device) -> None:
    """Invariant 3, before any decoding: the same device kind, torch build and CPU capability."""
    mine = arithmetic(device)
    if header["device"] != mine["device"]:
        where = "--device cpu" if header["device"] == "cpu" else f"--device cuda on a {header['device']}"
        raise CodecError(f"{path} was coded on {header['device']}, this is {mine['device']}: decode it with "
                         f"{where} (float rounding differs between devices)")
    if header["cpu_capability"] != mine["cpu_capability"]:
        raise CodecError(f"{path} was coded at CPU capability {header['cpu_capability']}, this process runs "
                         f"{mine['cpu_capability']}: decode with ATEN_CPU_CAPABILITY={header['cpu_capability'].lower()} "
                         f"set (on a CPU that has it)")
    if header["torch"] != mine["torch"]:
        raise CodecError(f"{path} was coded with torch {header['torch']}, this is {mine['torch']}: decode it "
                         f"with torch {header['torch']} (the model's float rounding may differ between builds)")


def decompress(checkpoint_path, in_path, out_path, progress: bool = True, say=print, loaded=None,
               device: str = "cpu", jobs: int = 1, overwrite: bool = True) -> Path:
    """Decode a .sash into a 16-bit WAV. `jobs` workers decode groups side by side, each
    writing its chunks' samples into the temp file at their place; each group's chunk CRCs
    are checked as it ends, and the first bad one stops the run with nothing written."""
    in_path, out_path = Path(in_path), Path(out_path)
    header, streams = read_container(in_path)
    model, digest = loaded or load_model(checkpoint_path, device)
    cfg = model.cfg
    if header["checkpoint_sha256"] != digest:
        raise CodecError(f"{in_path} was compressed with another model (checkpoint SHA-256 "
                         f"{header['checkpoint_sha256'][:12]}..., this one {digest[:12]}...): pass that checkpoint")
    mine = dict(sample_rate=cfg.sample_rate, channels=cfg.channels, bits=cfg.bits, quantization=cfg.quantization)
    if any(header[k] != v for k, v in mine.items()):
        raise CodecError(f"{in_path}: header {dict((k, header[k]) for k in mine)} does not match the model {mine}")
    _check_arithmetic(in_path, header, _device(model))
    chunks = Chunking(header["frames"], header["chunk_frames"], header["group_chunks"])
    C = cfg.channels
    data_bytes = chunks.frames * C * 2
    if WAV_HEADER_BYTES + data_bytes > 2**32 - 1:
        raise CodecError(f"{in_path} holds {chunks.frames:,} frames: more than a WAV file can hold")
    writable_path(out_path)
    bar = _progress(chunks.frames * C, progress, "decoding")
    try:
        with Workers(model, jobs) as workers, atomic_output(out_path, overwrite) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(_wav_header(chunks.frames, C, cfg.sample_rate))
                fh.truncate(WAV_HEADER_BYTES + data_bytes)
            tasks = [(group, stream, chunks, crc, str(tmp), header["format_version"])
                     for group, stream, crc in zip(chunks.groups(), streams, header["group_tokens_crc32"])]
            workers.submit(_decode_task, tasks, bar)()
    except CodecError as exc:
        # the header's machine facts are this machine's (checked above): the file is at fault
        raise CodecError(f"{in_path}: {exc}: the file is damaged (it names this machine's torch, CPU capability "
                         f"and device, so the model computes here what it computed for the encoder); "
                         f"nothing was written") from None
    finally:
        bar.close()
    say(f"{out_path}: {chunks.frames} frames, {C} ch, {cfg.sample_rate} Hz, 16-bit PCM")
    return out_path


WAV_HEADER_BYTES = 44


def _wav_header(frames: int, channels: int, sample_rate: int) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV of `frames` frames."""
    data = frames * channels * 2
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data, b"WAVE", b"fmt ", 16, 1, channels,
                       sample_rate, sample_rate * channels * 2, channels * 2, 16, b"data", data)


# ------------------------------------------------------------------------------- signals

class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so temp files are removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def interruptible():
    """Within the block SIGINT / SIGTERM / SIGHUP raise Interrupted (the previous handlers
    come back after it): a command catches it, says one line and exits 128 + the signal."""
    import signal
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]

    def handler(signum, frame):
        raise Interrupted(signum)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_interruptible(command: str, fn) -> int:
    """fn() under `interruptible`; a signal is one line on stderr and exit code 128 + signal."""
    import signal
    import sys
    try:
        with interruptible():
            return fn()
    except Interrupted as exc:
        print(f"{command}: stopped by {signal.Signals(exc.signum).name}; nothing was written", file=sys.stderr)
        return 128 + exc.signum
