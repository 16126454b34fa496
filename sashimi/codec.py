"""A lossless audio codec from a trained SaShiMi: the model's predictive distribution drives a
range coder (`constriction`), one independent stream per chunk.

    python -m sashimi.compress   --checkpoint C IN.(wav|flac|ogg) OUT.sash [--report R.json]
    python -m sashimi.decompress --checkpoint C OUT.sash RESTORED.wav

Lossless means bit-exact against the quantised input: with a `--bits 16 --quantization linear`
model a 16-bit PCM file comes back sample-identical; an 8-bit or mu-law model restores the
input as its quantiser sees it (`restored_pcm16(quantiser, tokens)`), and compress says so.
The input's rate and channel count must be the model's (a lossless codec never resamples).

Determinism: encoder and decoder compute every probability with the same recurrent step
(`SaShiMi.step`), on the same batch of chunks (a chunk's tokens are followed by silence
tokens up to the longest chunk), in float32 with one CPU thread, and the range coder
quantises the float64 probabilities the same way on both sides. So CPU encodes decode on
CPU; a file encoded on a GPU decodes on the same kind of GPU with the same kernels. Across
devices the float32 rounding differs and the decoder would drift: the header records the
device kind and decompress refuses another one.

The container (all little-endian): b"SASHIMI1", u32 header length, the header as JSON (format
version, model checkpoint SHA-256, sample rate, channels, bits, quantisation, frames, chunk
frames, device kind, per chunk: bytes and CRC-32), u32 CRC-32 of the header, then the chunks'
range-coder words (uint32). A damaged header or chunk, or another checkpoint, is one line
and a non-zero exit, never wrong audio.
"""
from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sashimi import checkpoint
from sashimi.cli import UserError
from sashimi.model import SaShiMi
from sashimi.quantize import Quantizer

MAGIC = b"SASHIMI1"
FORMAT_VERSION = 1


class CodecError(UserError):
    """A .sash file or an input that cannot be coded: one line, non-zero exit."""


# --------------------------------------------------------------------------------- samples

def restored_pcm16(quantizer: Quantizer, tokens: torch.Tensor) -> np.ndarray:
    """What decompress writes for these tokens: int16 PCM. Each token decodes to its bin's
    centre; floor(centre * 32768) is exact for 16-bit linear (token k -> k - 32768)."""
    x = quantizer.decode(tokens).double().numpy()
    return np.clip(np.floor(x * 32768.0), -32768, 32767).astype(np.int16)


def read_input(path: Path, sample_rate: int, channels: int) -> tuple[torch.Tensor, dict]:
    """The file's samples as float32 (frames, channels), refusing another rate or channel count."""
    import soundfile as sf
    if not path.exists():
        raise CodecError(f"not found: {path}")
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

def load_model(path) -> tuple[SaShiMi, str]:
    """The checkpoint's model on CPU (reference kernels) and its content SHA-256."""
    try:
        model, payload = checkpoint.load_model(path, "cpu")
    except checkpoint.CheckpointError as exc:
        raise CodecError(str(exc)) from None
    return model, payload.get("sha256") or checkpoint.content_hash(payload)


def _distribution(model: SaShiMi, out: torch.Tensor) -> np.ndarray:
    """float64 probabilities (B, levels) of the next token from the head output (B, ...)."""
    if model.cfg.head == "categorical":
        return torch.softmax(out.double(), -1).numpy()
    # the discretised logistic mixture: bin k gets sum_j w_j (sigmoid((e_k+1 - mu_j)/s_j) -
    # sigmoid((e_k - mu_j)/s_j)), the outer edges at -inf / +inf (as DMLHead.log_prob)
    head, V = model.head, model.cfg.levels
    logit_w, mean, log_s = (t.double() for t in head._split(out))
    half = 1.0 / (V - 1)
    edges = torch.linspace(-1.0 - half, 1.0 + half, V + 1, dtype=torch.float64)
    cdf = torch.sigmoid((edges[None, None, :] - mean[..., None]) * torch.exp(-log_s)[..., None])
    cdf[..., 0], cdf[..., -1] = 0.0, 1.0
    p = (torch.softmax(logit_w, -1)[..., None] * cdf.diff(dim=-1)).sum(1)
    return (p / p.sum(-1, keepdim=True)).numpy()


class _Stepper:
    """The recurrent model over a batch of chunks, one token (in interleaved order) per call,
    starting from one frame of silence (as generation does). Both sides of the codec run exactly
    this. With the frames layout a backbone step runs once per frame (after its R token); an L
    token gives R's distribution from the same backbone output (R | L)."""

    def __init__(self, model: SaShiMi, batch: int):
        self.model, self.C = model, model.cfg.channels
        self.zero = Quantizer(model.cfg.quantization, model.cfg.bits).zero_token
        model.setup_step()
        self.state = model.default_state(batch)
        self.t = 0                      # backbone steps run
        self.frame: list[torch.Tensor] = []   # the current frame's tokens so far (frames layout)
        self.h = None                   # the last backbone output (frames layout)
        self.out = None
        for _ in range(self.C):  # the silence frame; its last output predicts the first token
            self.feed(torch.full((batch,), self.zero, dtype=torch.long))

    def feed(self, tokens: torch.Tensor) -> None:
        if not self.model.cfg.frames:
            self.out = self.model.step(tokens, self.state, self.t)
            self.t += 1
            return
        self.frame.append(tokens)
        if len(self.frame) < self.C:    # L of a frame: R's head output given that L
            self.out = None if self.h is None else self.model.head_outputs(self.h, tokens)
            return
        self.h = self.model.step(torch.stack(self.frame, 1), self.state, self.t)
        self.t += 1
        self.frame = []
        self.out = self.model.head_outputs(self.h)

    def probabilities(self) -> np.ndarray:
        return _distribution(self.model, self.out)


@dataclass
class Chunking:
    frames: int
    chunk_frames: int

    @property
    def count(self) -> int:
        return -(-self.frames // self.chunk_frames)

    def length(self, i: int) -> int:
        return min(self.chunk_frames, self.frames - i * self.chunk_frames)


def _one_thread():
    """Probabilities must be bitwise the same in encoder and decoder: one CPU thread (BLAS
    reductions can depend on the thread count)."""
    class _Ctx:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)
    return _Ctx()


# --------------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_tokens(model: SaShiMi, tokens: torch.Tensor, chunk_frames: int, progress: bool = False):
    """tokens (frames, C) -> (list of uint32 arrays, one per chunk; model NLL in bits per
    channel, (C,))."""
    import constriction
    frames, C = tokens.shape
    chunks = Chunking(frames, chunk_frames)
    B, T = chunks.count, min(frames, chunk_frames) * C
    zero = Quantizer(model.cfg.quantization, model.cfg.bits).zero_token
    batch = torch.full((B, T), zero, dtype=torch.long)
    for i in range(B):
        n = chunks.length(i)
        batch[i, : n * C] = tokens[i * chunk_frames: i * chunk_frames + n].reshape(-1)
    probs = np.empty((B, T, model.cfg.levels), dtype=np.float64)
    with _one_thread():
        stepper = _Stepper(model, B)
        for t in _progress(range(T), progress, "encoding"):
            probs[:, t] = stepper.probabilities()
            stepper.feed(batch[:, t])
    family = constriction.stream.model.Categorical(perfect=False)
    streams, nll = [], np.zeros(C)
    for i in range(B):
        n = chunks.length(i) * C
        symbols = batch[i, :n].numpy().astype(np.int32)
        p = probs[i, :n]
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(symbols, family, p)
        streams.append(enc.get_compressed())
        bits = -np.log2(p[np.arange(n), symbols])
        for c in range(C):
            nll[c] += bits[c::C].sum()
    return streams, nll


@torch.no_grad()
def decode_tokens(model: SaShiMi, streams: list[np.ndarray], chunks: Chunking, progress: bool = False) -> torch.Tensor:
    import constriction
    C = model.cfg.channels
    B, T = chunks.count, min(chunks.frames, chunks.chunk_frames) * C
    family = constriction.stream.model.Categorical(perfect=False)
    decoders = [constriction.stream.queue.RangeDecoder(s) for s in streams]
    lengths = [chunks.length(i) * C for i in range(B)]
    zero = Quantizer(model.cfg.quantization, model.cfg.bits).zero_token
    out = torch.full((B, T), zero, dtype=torch.long)
    with _one_thread():
        stepper = _Stepper(model, B)
        for t in _progress(range(T), progress, "decoding"):
            p = stepper.probabilities()
            for i in range(B):
                if t < lengths[i]:
                    out[i, t] = int(decoders[i].decode(family, p[i:i + 1])[0])
            stepper.feed(out[:, t])
    parts = [out[i, :lengths[i]].view(-1, C) for i in range(B)]
    return torch.cat(parts)


def _progress(it, enabled: bool, what: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=what, unit="tok", mininterval=0.5, dynamic_ncols=True)


# -------------------------------------------------------------------------------- container

def token_crc(tokens: torch.Tensor) -> int:
    return zlib.crc32(tokens.to(torch.int32).numpy().astype("<i4").tobytes())


def write_container(path: Path, header: dict, streams: list[np.ndarray], token_crcs: list[int]) -> int:
    payloads = [s.astype("<u4").tobytes() for s in streams]
    header = dict(header, chunks=[dict(bytes=len(p), crc32=zlib.crc32(p), tokens_crc32=t)
                                  for p, t in zip(payloads, token_crcs)])
    blob = json.dumps(header, sort_keys=True).encode()
    data = MAGIC + struct.pack("<I", len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)) + b"".join(payloads)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def read_container(path: Path) -> tuple[dict, list[np.ndarray]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CodecError(f"not found: {path}") from None
    except OSError as exc:
        raise CodecError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.startswith(MAGIC):
        raise CodecError(f"{path} is not a sashimi-compressed file (no {MAGIC.decode()} signature)")
    try:
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        blob = data[start:start + n]
        (crc,) = struct.unpack_from("<I", data, start + n)
    except struct.error:
        raise CodecError(f"{path} is truncated (its header is incomplete)") from None
    if len(blob) != n or zlib.crc32(blob) != crc:
        raise CodecError(f"{path}: the header is damaged (CRC mismatch)")
    header = json.loads(blob)
    if header.get("format_version") != FORMAT_VERSION:
        raise CodecError(f"{path} has format version {header.get('format_version')!r}; this version reads "
                         f"{FORMAT_VERSION}")
    pos, streams = start + n + 4, []
    for i, chunk in enumerate(header["chunks"]):
        payload = data[pos:pos + chunk["bytes"]]
        pos += chunk["bytes"]
        if len(payload) != chunk["bytes"] or zlib.crc32(payload) != chunk["crc32"]:
            raise CodecError(f"{path}: chunk {i + 1} of {len(header['chunks'])} is damaged "
                             f"({'truncated' if len(payload) != chunk['bytes'] else 'CRC mismatch'}); nothing was written")
        streams.append(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    if pos != len(data):
        raise CodecError(f"{path}: {len(data) - pos} unexpected bytes after the last chunk")
    return header, streams


# ----------------------------------------------------------------------------- the commands

def flac_bytes(pcm: np.ndarray, sample_rate: int) -> int:
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return len(buf.getvalue())  # not tell(): libsndfile seeks back to finish the header


def compress(checkpoint_path, in_path, out_path, chunk_seconds: float = 1.0, progress: bool = True,
             say=print) -> dict:
    in_path, out_path = Path(in_path), Path(out_path)
    if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
        raise CodecError(f"--chunk-seconds must be a finite number > 0, got {chunk_seconds!r}")
    model, digest = load_model(checkpoint_path)
    cfg = model.cfg
    quantizer = Quantizer(cfg.quantization, cfg.bits)
    audio, info = read_input(in_path, cfg.sample_rate, cfg.channels)
    exact = cfg.bits == 16 and cfg.quantization == "linear" and info["subtype"] in ("PCM_16", "PCM_S8", "PCM_U8")
    if not exact:
        say(f"note: a {cfg.bits}-bit {cfg.quantization} model codes the input as its quantiser sees it "
            f"({info['subtype']} in): decompress restores those samples exactly, not the original file")
    tokens = quantizer.encode(audio)
    chunk_frames = max(1, int(round(chunk_seconds * cfg.sample_rate)))
    t0 = time.perf_counter()
    streams, nll = encode_tokens(model, tokens, chunk_frames, progress)
    seconds = time.perf_counter() - t0
    header = dict(format_version=FORMAT_VERSION, checkpoint_sha256=digest, sample_rate=cfg.sample_rate,
                  channels=cfg.channels, bits=cfg.bits, quantization=cfg.quantization,
                  frames=int(tokens.shape[0]), chunk_frames=chunk_frames, device="cpu")
    crcs = [token_crc(tokens[i * chunk_frames: (i + 1) * chunk_frames]) for i in range(len(streams))]
    size = write_container(out_path, header, streams, crcs)
    samples = tokens.numel()
    payload_bits = 8 * sum(s.nbytes for s in streams)
    flac = flac_bytes(restored_pcm16(quantizer, tokens), cfg.sample_rate)
    report = dict(file=str(in_path), out=str(out_path), frames=int(tokens.shape[0]), channels=cfg.channels,
                  bytes=size, bits_per_sample=8 * size / samples,
                  payload_bits_per_sample=payload_bits / samples,
                  nll_bits_per_sample=float(nll.sum() / samples),
                  nll_bits_per_sample_per_channel=[float(v / tokens.shape[0]) for v in nll],
                  flac_bytes=flac, ratio_to_flac=size / flac, pcm16_bytes=2 * samples,
                  samples_per_s=samples / seconds, exact_input=exact)
    say(f"{out_path}: {size:,} bytes, {report['bits_per_sample']:.3f} bits/sample (model NLL "
        f"{report['nll_bits_per_sample']:.3f}; per channel "
        + ", ".join(f"{v:.3f}" for v in report["nll_bits_per_sample_per_channel"])
        + f"); FLAC {flac:,} bytes ({report['ratio_to_flac']:.3f}x of it); {report['samples_per_s']:,.0f} samples/s")
    return report


def decompress(checkpoint_path, in_path, out_path, progress: bool = True, say=print) -> Path:
    import soundfile as sf
    in_path, out_path = Path(in_path), Path(out_path)
    header, streams = read_container(in_path)
    model, digest = load_model(checkpoint_path)
    cfg = model.cfg
    if header["checkpoint_sha256"] != digest:
        raise CodecError(f"{in_path} was compressed with another model (checkpoint SHA-256 "
                         f"{header['checkpoint_sha256'][:12]}..., this one {digest[:12]}...): pass that checkpoint")
    mine = dict(sample_rate=cfg.sample_rate, channels=cfg.channels, bits=cfg.bits, quantization=cfg.quantization)
    if any(header[k] != v for k, v in mine.items()):
        raise CodecError(f"{in_path}: header {dict((k, header[k]) for k in mine)} does not match the model {mine}")
    if header.get("device", "cpu") != "cpu":
        raise CodecError(f"{in_path} was coded on {header['device']}: decode it there (float rounding differs)")
    chunks = Chunking(header["frames"], header["chunk_frames"])
    if chunks.count != len(streams):
        raise CodecError(f"{in_path}: the header's chunk count does not match its frames")
    tokens = decode_tokens(model, streams, chunks, progress)
    for i, chunk in enumerate(header["chunks"]):
        # the decoded tokens are checked, so a model that computes differently here (another
        # library build, say) is an error, never wrong audio
        if token_crc(tokens[i * chunks.chunk_frames: (i + 1) * chunks.chunk_frames]) != chunk["tokens_crc32"]:
            raise CodecError(f"{in_path}: chunk {i + 1} decoded to other samples than were encoded: this machine "
                             f"computes the model's probabilities differently from the encoder's; nothing was written")
    pcm = restored_pcm16(Quantizer(cfg.quantization, cfg.bits), tokens)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    sf.write(str(tmp), pcm, cfg.sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(out_path)
    say(f"{out_path}: {chunks.frames} frames, {cfg.channels} ch, {cfg.sample_rate} Hz, 16-bit PCM")
    return out_path
