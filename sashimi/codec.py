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


class _Stepper:
    """The recurrent model over a batch of chunks, one model token per call in the layout's
    order (`Layout.positions`), starting from one frame of silence (as generation does). Both
    sides of the codec run exactly this. A backbone step runs once per position (after its last
    token); the tokens of a position are predicted in turn from the same step output, each
    given the ones before it (the layout's `head_output`)."""

    def __init__(self, model: SaShiMi, batch: int):
        self.model, self.layout = model, model.layout
        self.k, self.heads = self.layout.step_tokens, self.layout.heads(model)
        model.setup_step()
        self.state = model.default_state(batch)
        self.t = 0                      # backbone steps run
        self.position: list[torch.Tensor] = []   # the current position's tokens so far
        self.step_out = None            # the last step output
        self.out = None                 # the head output of the next token
        self.j = 0                      # which token of its position the next one is
        silence = self.layout.to_model(torch.full((batch, model.cfg.channels), model.cfg.quantizer.zero_token))
        for c in range(silence.shape[1]):  # the silence frame; its last output predicts the first token
            self.feed(silence[:, c])

    def feed(self, tokens: torch.Tensor) -> None:
        self.position.append(tokens)
        if len(self.position) < self.k:    # the next token is of the same position, given these
            self.j = len(self.position)
            given = torch.stack(self.position, -1)
            self.out = None if self.step_out is None else \
                self.layout.head_output(self.model, self.step_out, self.j, given)
            return
        cur = self.position[0] if self.k == 1 else torch.stack(self.position, 1)
        self.step_out = self.model.step(cur, self.state, self.t)
        self.t += 1
        self.position, self.j = [], 0
        self.out = self.layout.head_output(self.model, self.step_out, 0)

    def probabilities(self) -> np.ndarray:
        """float64 probabilities (B, levels of the next token) from its head."""
        return self.heads[self.j].probabilities(self.out).numpy()


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
    channel of the model (its layout's channel_names), (C,))."""
    import constriction
    frames, C = tokens.shape
    chunks = Chunking(frames, chunk_frames)
    B, T = chunks.count, min(frames, chunk_frames) * C
    batch = _silence(model, B, T)
    layout = model.layout
    for i in range(B):
        n = chunks.length(i)
        # the model's tokens frame by frame: the order in which the layout's positions hold them
        batch[i, : n * C] = layout.to_model(tokens[i * chunk_frames: i * chunk_frames + n]).reshape(-1)
    probs = np.zeros((B, T, _most_levels(model)), dtype=np.float64)
    with _one_thread():
        stepper = _Stepper(model, B)
        for t in _progress(range(T), progress, "encoding"):
            p = stepper.probabilities()
            probs[:, t, :p.shape[1]] = p
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
    out = _silence(model, B, T)
    with _one_thread():
        stepper = _Stepper(model, B)
        for t in _progress(range(T), progress, "decoding"):
            p = stepper.probabilities()
            p = np.pad(p, ((0, 0), (0, _most_levels(model) - p.shape[1])))
            for i in range(B):
                if t < lengths[i]:
                    out[i, t] = int(decoders[i].decode(family, p[i:i + 1])[0])
            stepper.feed(out[:, t])
    parts = [model.layout.from_model(out[i, :lengths[i]].view(-1, C)) for i in range(B)]
    return torch.cat(parts)


def _silence(model: SaShiMi, batch: int, tokens: int) -> torch.Tensor:
    """(batch, tokens) of the model's tokens of silent frames (what pads a short chunk)."""
    C = model.cfg.channels
    frame = model.layout.to_model(torch.full((1, C), model.cfg.quantizer.zero_token, dtype=torch.long))
    return frame.repeat(batch, tokens // C)


def _most_levels(model: SaShiMi) -> int:
    """The coder's alphabet: the largest grid of the model's tokens (the others are padded)."""
    return max(model.layout.levels(j) for j in range(model.layout.step_tokens))


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
    quantizer = cfg.quantizer
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
    pcm = restored_pcm16(cfg.quantizer, tokens)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    sf.write(str(tmp), pcm, cfg.sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(out_path)
    say(f"{out_path}: {chunks.frames} frames, {cfg.channels} ch, {cfg.sample_rate} Hz, 16-bit PCM")
    return out_path
