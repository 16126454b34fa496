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
of a group (at most `group_chunks`) advance together: one recurrent step of the model per
token position, for the whole batch. Nothing is held per position beyond the audio itself (as
16-bit integers): memory grows with the batch, not with the duration.
Each token is coded through its interval, never a full table: a 2^bits alphabet is split into
stages of at most 64 symbols (16-bit: 64 x 64 x 16), and each stage codes one digit with a table
of the head's CDF (`head.cdf`) at that digit's edges: 147 edges instead of 65,537 (the fastest
split measured on CPU: 256 x 256 was 13% and 16^4 8% slower). The range
coder is constriction's (`Categorical(perfect=False)` tables in a queue `RangeEncoder`); all
rows of a step go to it in one call. One stream per group.

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
The decoded tokens are checked against per-chunk CRCs, so anything else that computes
differently is one line and no output, never wrong audio.

The container (little-endian): b"SASHIMI1", u32 header length, the header as JSON, u32 CRC-32
of the header, then each group's range-coder words (uint32). The header is validated against a
schema (types, ranges, the chunk table against `frames`, the streams against the file's size)
before anything is allocated. The CRCs guard against damage, not against a crafted file, which
is why the schema is checked too.
"""
from __future__ import annotations

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

MAGIC = b"SASHIMI1"
FORMAT_VERSION = 2
MAX_HEADER_BYTES = 1 << 24          # a header lists a CRC per chunk: 16 MiB is ~200,000 chunks
STAGE_SYMBOLS = 64                 # the widest table coded per stage
DEFAULT_GROUP_CHUNKS = 256          # the batch width: chunks stepped together


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
    kernels, which use no atomics) and its content SHA-256."""
    from sashimi.cli import resolve_device
    dev = resolve_device(device)
    try:
        model, payload = checkpoint.load_model(regular_file(path, "--checkpoint"), dev)
    except checkpoint.CheckpointError as exc:
        raise CodecError(str(exc)) from None
    return model, payload.get("sha256") or checkpoint.content_hash(payload)


def arithmetic(device: torch.device) -> dict:
    """What the probabilities' bits depend on besides the model (invariant 3)."""
    kind = "cpu" if device.type == "cpu" else f"cuda {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(), device=kind)


def _device(model: SaShiMi) -> torch.device:
    return model.embedding.weight.device


class TokenStepper:
    """The recurrent model over a batch of chunks, one model token per `feed` in the layout's
    order (`Layout.positions`), starting from one frame of silence. `out` is the head output
    that the next token is coded with, by the head of its channel slot `j`. Both sides of the
    codec run exactly this. A backbone step runs once per position (after its last token); the
    tokens of a position are predicted in turn from the same step output, each given the ones
    before it (the layout's `head_output`: R given L)."""

    def __init__(self, model: SaShiMi, batch: int):
        self.model, self.layout = model, model.layout
        self.k = self.layout.step_tokens
        model.setup_step()
        self.device = _device(model)
        self.state = model.default_state(batch, self.device)
        self.t = 0                      # backbone steps run
        self.position: list[torch.Tensor] = []   # the current position's tokens so far
        self.step_out = None            # the last step output
        self.out = None
        self.j = 0                      # the channel slot of the next token in its position
        C = model.cfg.channels
        silence = self.layout.to_model(torch.full((batch, C), model.cfg.quantizer.zero_token, dtype=torch.long))
        for c in range(C):  # the silence frame; its last output predicts the first token
            self.feed(silence[:, c])

    def feed(self, tokens: torch.Tensor) -> None:
        tokens = tokens.to(self.device, non_blocking=True)
        self.position.append(tokens)
        if len(self.position) < self.k:    # the next token is of this position, given these
            self.j = len(self.position)
            self.out = None if self.step_out is None else \
                self.layout.head_output(self.model, self.step_out, self.j, torch.stack(self.position, -1))
            return
        current = self.position[0] if self.k == 1 else torch.stack(self.position, 1)
        self.step_out = self.model.step(current, self.state, self.t)
        self.t += 1
        self.position, self.j = [], 0
        self.out = self.layout.head_output(self.model, self.step_out, 0)


# ------------------------------------------------------------------- the coded interval

def stage_sizes(levels: int) -> list[int]:
    """The alphabet 2^bits as digits of at most STAGE_SYMBOLS symbols, most significant first."""
    bits, out = int(levels).bit_length() - 1, []
    if 1 << bits != levels:
        raise ValueError(f"levels must be a power of two, got {levels}")
    per = STAGE_SYMBOLS.bit_length() - 1
    while bits > 0:
        b = min(per, bits)
        out.append(1 << b)
        bits -= b
    return out


class IntervalCoder:
    """Codes tokens through the head's CDF at each stage's edges (see the module doc): the
    encoder and the decoder call `stage_table` with the same floats and get the same table."""

    def __init__(self, head, levels: int):
        import constriction
        self.head, self.levels, self.sizes = head, levels, stage_sizes(levels)
        self.family = constriction.stream.model.Categorical(perfect=False)

    @staticmethod
    def stage_table(cdf, lo: torch.Tensor, width: int, size: int) -> np.ndarray:
        """float64 (A, size): P(digit) of the symbols [lo + d width, lo + (d + 1) width), from
        the head's `cdf(out)`."""
        edges = lo[:, None] + torch.arange(size + 1) * width
        cdf = cdf(edges.to(cdf.device)).cpu()
        p = (cdf[:, 1:] - cdf[:, :-1]).clamp_(min=0.0)
        # far in a tail float64 runs out (every difference 0): code that digit uniformly; both
        # sides see the same floats, so both take this branch
        lost = ~(p.sum(1) > 1e-200)
        return p.masked_fill_(lost[:, None], 1.0).numpy()

    def encode(self, coder, out: torch.Tensor, symbols: torch.Tensor) -> np.ndarray:
        """Code symbols (A,) given head outputs (A, ...); returns their ideal cost in bits (A,)."""
        lo, width, bits = torch.zeros_like(symbols), self.levels, np.zeros(len(symbols))
        cdf = self.head.cdf(out)
        for size in self.sizes:
            width //= size
            p = self.stage_table(cdf, lo, width, size)
            digit = (symbols - lo) // width
            d = digit.numpy().astype(np.int32)
            coder.encode(d, self.family, p)
            bits -= np.log2(np.maximum(p[np.arange(len(d)), d] / p.sum(1), 1e-300))
            lo = lo + digit * width
        return bits

    def decode(self, coder, out: torch.Tensor) -> torch.Tensor:
        lo, width = torch.zeros(out.shape[0], dtype=torch.long), self.levels
        cdf = self.head.cdf(out)
        for size in self.sizes:
            width //= size
            p = self.stage_table(cdf, lo, width, size)
            lo = lo + torch.from_numpy(np.asarray(coder.decode(self.family, p), dtype=np.int64)) * width
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


class _one_thread:
    """Invariant 2: the model runs on one CPU thread on both sides."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _group_tokens(tokens: np.ndarray, chunks: Chunking, group: range, zero: int) -> tuple[torch.Tensor, list[int]]:
    """A group's tokens in coding order (B, T) int32, padded with the zero token, and lengths."""
    C = tokens.shape[1]
    lengths = [chunks.length(i) * C for i in group]
    batch = np.full((len(group), max(lengths)), zero, dtype=np.int32)
    for row, i in enumerate(group):
        start = i * chunks.chunk_frames
        batch[row, :lengths[row]] = tokens[start:start + chunks.length(i)].reshape(-1)
    return torch.from_numpy(batch), lengths


# --------------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_tokens(model: SaShiMi, tokens: torch.Tensor, chunks: Chunking, progress: bool = False):
    """tokens (frames, C) -> (one uint32 array per group; model cost in bits per channel of the
    model (C,), its layout's channel_names)."""
    import constriction
    C = model.cfg.channels
    tokens = torch.as_tensor(np.asarray(tokens)) if not torch.is_tensor(tokens) else tokens
    tokens = model.layout.to_model(tokens).numpy().astype(np.int32)      # what the model predicts
    zero = model.cfg.quantizer.zero_token       # pads finished chunks: a token of every channel's grid
    coders = channel_coders(model)
    streams, nll = [], np.zeros(C)
    bar = _progress(tokens.size, progress, "encoding")
    with _one_thread():
        for group in chunks.groups():
            batch, lengths = _group_tokens(tokens, chunks, group, zero)
            enc = constriction.stream.queue.RangeEncoder()
            stepper = TokenStepper(model, len(group))
            active = len(group)
            for t in range(batch.shape[1]):
                while lengths[active - 1] <= t:   # only the last chunk is shorter
                    active -= 1
                column = batch[:, t].long()
                nll[t % C] += coders[stepper.j].encode(enc, stepper.out[:active], column[:active]).sum()
                stepper.feed(column)
                bar.update(active)
            streams.append(enc.get_compressed())
    bar.close()
    return streams, nll


@torch.no_grad()
def decode_tokens(model: SaShiMi, streams: list[np.ndarray], chunks: Chunking, progress: bool = False) -> np.ndarray:
    """The tokens (frames, C) int32 from the groups' streams."""
    import constriction
    C = model.cfg.channels
    zero = model.cfg.quantizer.zero_token
    coders = channel_coders(model)
    tokens = np.empty((chunks.frames, C), dtype=np.int32)
    bar = _progress(chunks.frames * C, progress, "decoding")
    with _one_thread():
        for group, stream in zip(chunks.groups(), streams):
            dec = constriction.stream.queue.RangeDecoder(stream)
            lengths = [chunks.length(i) * C for i in group]
            out = np.full((len(group), max(lengths)), zero, dtype=np.int32)
            stepper = TokenStepper(model, len(group))
            active = len(group)
            column = torch.full((len(group),), zero, dtype=torch.long)
            for t in range(out.shape[1]):
                while lengths[active - 1] <= t:
                    active -= 1
                try:
                    column[:active] = coders[stepper.j].decode(dec, stepper.out[:active])
                except Exception as exc:   # a stream that ends early or cannot be read
                    raise CodecError(f"the coded stream of chunks {group.start + 1}-{group.stop} cannot be "
                                     f"decoded ({' '.join(str(exc).split())[:120]}); nothing was written") from None
                column[active:] = zero
                out[:, t] = column.numpy()
                stepper.feed(column.clone())
                bar.update(active)
            for row, i in enumerate(group):
                start = i * chunks.chunk_frames
                tokens[start:start + chunks.length(i)] = out[row, :lengths[row]].reshape(-1, C)
    bar.close()
    return model.layout.from_model(torch.from_numpy(tokens)).numpy().astype(np.int32)


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


def channel_coders(model: SaShiMi) -> list[IntervalCoder]:
    """The coder of each channel slot of a position: its head on its grid (the layout's)."""
    layout = model.layout
    return [IntervalCoder(head, layout.levels(j)) for j, head in enumerate(layout.heads(model))]


class _NoBar:
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


def write_container(path: Path, header: dict, streams: list[np.ndarray], token_crcs: list[int]) -> int:
    payloads = [s.astype("<u4").tobytes() for s in streams]
    header = dict(header, streams=[dict(bytes=len(p), crc32=zlib.crc32(p)) for p in payloads],
                  chunk_tokens_crc32=token_crcs)
    blob = json.dumps(header, sort_keys=True).encode()
    data = MAGIC + struct.pack("<I", len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)) + b"".join(payloads)
    atomic_write(path, data)
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


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a temp file beside the target, removed on any failure; one line on error."""
    writable_path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# the header's schema: name -> (check, what it must be)
_HEADER = {
    "format_version": (lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION}"),
    "checkpoint_sha256": (lambda v: isinstance(v, str) and len(v) == 64
                          and all(c in "0123456789abcdef" for c in v), "64 hex digits"),
    "sample_rate": (lambda v: _is_int(v) and 1 <= v <= 1_000_000, "an integer in [1, 1000000]"),
    "channels": (lambda v: v in (1, 2) and _is_int(v), "1 or 2"),
    "bits": (lambda v: v in (8, 16) and _is_int(v), "8 or 16"),
    "quantization": (lambda v: v in KINDS, " or ".join(KINDS)),
    "frames": (lambda v: _is_int(v) and 1 <= v <= 2**40, "an integer >= 1"),
    "chunk_frames": (lambda v: _is_int(v) and 1 <= v <= 2**40, "an integer >= 1"),
    "group_chunks": (lambda v: _is_int(v) and 1 <= v <= 65536, "an integer in [1, 65536]"),
    "torch": (lambda v: isinstance(v, str) and len(v) < 64, "a version string"),
    "cpu_capability": (lambda v: isinstance(v, str) and len(v) < 64, "a string"),
    "device": (lambda v: isinstance(v, str) and len(v) < 64, "a string"),
    "streams": (lambda v: isinstance(v, list) and all(
        isinstance(s, dict) and set(s) == {"bytes", "crc32"} and _is_int(s["bytes"]) and s["bytes"] >= 0
        and s["bytes"] % 4 == 0 and _is_int(s["crc32"]) and 0 <= s["crc32"] < 2**32 for s in v),
        "a list of {bytes, crc32}"),
    "chunk_tokens_crc32": (lambda v: isinstance(v, list) and all(_is_int(c) and 0 <= c < 2**32 for c in v),
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
    if version != FORMAT_VERSION:
        raise CodecError(f"{path} has format version {version!r}; this version reads {FORMAT_VERSION}"
                         + (" (re-compress it with this version)" if version == 1 else ""))
    for name, (ok, want) in _HEADER.items():
        if name not in header:
            raise CodecError(f"{path}: the header has no {name!r}")
        if not ok(header[name]):
            raise CodecError(f"{path}: header field {name!r} must be {want}, got {_short(header[name])}")
    unknown = set(header) - set(_HEADER)
    if unknown:
        raise CodecError(f"{path}: unknown header fields {sorted(unknown)[:5]}")
    chunks = Chunking(header["frames"], header["chunk_frames"], header["group_chunks"])
    if len(header["chunk_tokens_crc32"]) != chunks.count:
        raise CodecError(f"{path}: the header lists {len(header['chunk_tokens_crc32'])} chunks but its "
                         f"frames and chunk size make {chunks.count}")
    if len(header["streams"]) != len(chunks.groups()):
        raise CodecError(f"{path}: the header lists {len(header['streams'])} streams for "
                         f"{len(chunks.groups())} groups of chunks")
    if sum(s["bytes"] for s in header["streams"]) != payload_bytes:
        raise CodecError(f"{path}: the streams add up to {sum(s['bytes'] for s in header['streams'])} bytes "
                         f"but the file holds {payload_bytes} after the header (truncated or extended)")
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
            streams = []
            for i, s in enumerate(header["streams"]):
                payload = fh.read(s["bytes"])
                if len(payload) != s["bytes"] or zlib.crc32(payload) != s["crc32"]:
                    raise CodecError(f"{path}: stream {i + 1} of {len(header['streams'])} is damaged "
                                     f"({'truncated' if len(payload) != s['bytes'] else 'CRC mismatch'}); "
                                     f"nothing was written")
                streams.append(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    except OSError as exc:
        raise CodecError(f"cannot read {path}: {exc.strerror or exc}") from None
    return header, streams


# ----------------------------------------------------------------------------- the commands

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


def compress(checkpoint_path, in_path, out_path, chunk_seconds: float = 1.0, progress: bool = True,
             say=print, group_chunks: int = DEFAULT_GROUP_CHUNKS, loaded=None, device: str = "cpu") -> dict:
    """Code one file; `loaded` = load_model(...) to reuse a model across files."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise CodecError(f"--chunk-seconds must be a finite number > 0, got {chunk_seconds!r}")
    model, digest = loaded or load_model(checkpoint_path, device)
    cfg = model.cfg
    quantizer = cfg.quantizer
    audio, info = read_input(in_path, cfg.sample_rate, cfg.channels)
    exact = cfg.bits == 16 and cfg.quantization == "linear" and info["subtype"] in ("PCM_16", "PCM_S8", "PCM_U8")
    if not exact:
        say(f"note: a {cfg.bits}-bit {cfg.quantization} model codes the input as its quantiser sees it "
            f"({info['subtype']} in): decompress restores those samples exactly, not the original file")
    tokens = quantized(quantizer, audio)
    del audio
    chunks = Chunking(tokens.shape[0], max(1, int(round(chunk_seconds * cfg.sample_rate))), group_chunks)
    t0 = time.perf_counter()
    streams, nll = encode_tokens(model, tokens, chunks, progress)
    seconds = time.perf_counter() - t0
    header = dict(format_version=FORMAT_VERSION, checkpoint_sha256=digest, sample_rate=cfg.sample_rate,
                  channels=cfg.channels, bits=cfg.bits, quantization=cfg.quantization,
                  frames=chunks.frames, chunk_frames=chunks.chunk_frames, group_chunks=chunks.group_chunks,
                  **arithmetic(_device(model)))
    crcs = [token_crc(tokens[i * chunks.chunk_frames: i * chunks.chunk_frames + chunks.length(i)])
            for i in range(chunks.count)]
    size = write_container(out_path, header, streams, crcs)
    samples = tokens.size
    pcm = restored_pcm16(quantizer, torch.from_numpy(tokens))
    flac, flac_how = flac_bytes(pcm, cfg.sample_rate)
    report = dict(file=str(in_path), out=str(out_path), frames=chunks.frames, channels=cfg.channels,
                  bytes=size, bits_per_sample=8 * size / samples,
                  payload_bits_per_sample=8 * sum(s.nbytes for s in streams) / samples,
                  nll_bits_per_sample=float(nll.sum() / samples),
                  nll_bits_per_sample_per_channel=[float(v / chunks.frames) for v in nll],
                  flac_bytes=flac, flac_bits_per_sample=8 * flac / samples, flac=flac_how,
                  ratio_to_flac=size / flac, pcm16_bytes=2 * samples,
                  seconds=seconds, samples_per_s=samples / seconds, exact_input=exact)
    say(f"{out_path}: {size:,} bytes, {report['bits_per_sample']:.3f} bits/sample (model NLL "
        f"{report['nll_bits_per_sample']:.3f}; per channel "
        + ", ".join(f"{v:.3f}" for v in report["nll_bits_per_sample_per_channel"])
        + f"); {flac_how} {report['flac_bits_per_sample']:.3f} bits/sample ({report['ratio_to_flac']:.3f}x of it); "
        f"{report['samples_per_s']:,.0f} samples/s")
    return report


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
               device: str = "cpu") -> Path:
    import soundfile as sf
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
    _check_fits(in_path, chunks, cfg.channels)
    tokens = decode_tokens(model, streams, chunks, progress)
    for i, crc in enumerate(header["chunk_tokens_crc32"]):
        # a model that computes differently here is an error, never wrong audio
        start = i * chunks.chunk_frames
        if token_crc(tokens[start:start + chunks.length(i)]) != crc:
            raise CodecError(f"{in_path}: chunk {i + 1} decoded to other samples than were encoded: this machine "
                             f"computes the model's probabilities differently from the encoder's; nothing was written")
    pcm = restored_pcm16(cfg.quantizer, torch.from_numpy(tokens))
    atomic_write(out_path, _wav_bytes(pcm, cfg.sample_rate))
    say(f"{out_path}: {chunks.frames} frames, {cfg.channels} ch, {cfg.sample_rate} Hz, 16-bit PCM")
    return out_path


def _wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM WAV of int16 samples (frames, C): a 44-byte header and the samples as they
    are (no float round trip, no second copy through an encoder)."""
    frames, channels = pcm.shape
    data = pcm.astype("<i2", copy=False).tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, channels,
                         sample_rate, sample_rate * channels * 2, channels * 2, 16, b"data", len(data))
    return header + data


def _check_fits(path: Path, chunks: Chunking, channels: int) -> None:
    """A header may claim any length: refuse one whose decoded audio (int32 tokens, int16 PCM
    and the WAV) cannot fit this machine's memory, before allocating it."""
    from sashimi.cli import machine_memory
    need = chunks.frames * channels * (4 + 2 + 2)
    have = machine_memory(torch.device("cpu"))
    if have and need > have // 2:
        raise CodecError(f"{path} claims {chunks.frames:,} frames ({need / 2**30:.1f} GiB to decode), more than "
                         f"half of this machine's {have / 2**30:.1f} GiB")
