"""The audio data pipeline: files -> float audio at the model's rate -> int64 tokens -> batches.

- `read_audio` reads one crop of one file (soundfile: open, seek, read only the frames needed,
  plus a margin for the resampler), applies the channel policy (mono = mean of the file's
  channels; stereo = both channels, a mono file duplicated, > 2 channels: the first two, each
  with a warning, once per file) and resamples to the model's rate with soxr, the SoX
  resampler, at its "HQ" setting (skipped when the rates match). soxr does not depend on
  torch, so every install resamples the same way.
  A crop is what resampling the whole file gives, sliced, to float32 rounding (<= 3e-7 measured;
  the read is aligned to the resampler's period and carries its impulse response), so crops of
  one file agree wherever they overlap and the crop boundaries are not special.
- `SyntheticStereoMusic`: the built-in, deterministic source (panned notes and chords with ADSR
  envelopes, noise bursts, an inter-channel delay), used when no data folder is given.
- `AudioCrops`: a map-style Dataset of token crops (crop_frames, C) from a folder (scanned
  recursively for .wav/.flac/.ogg) or from the synthetic source. Training crops are random but
  derived only from (seed, index); validation crops are fixed. So a resumed run that restarts at
  the same index sees the same data without saving any loader state.
- `train_batches` / `valid_batches`: the batch iterators. The batch of global step s on rank r
  holds the indices [(s * world_size + r) * batch_size + i for i in range(batch_size)].

User errors (missing folder, no usable audio, unreadable file) raise `DataError`, one line.
"""
from __future__ import annotations

import argparse
import functools
import math
import numbers
import os
import signal
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

from sashimi.quantize import Quantizer

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
TRAIN_LENGTH = 2**31 - 1  # the nominal length of a training split: crops are drawn at random


class DataError(Exception):
    """A user error about the data (missing folder, no usable audio, unreadable file): the
    command lines print it as one line, without a traceback."""


class UnreadableFile(DataError):
    """The file cannot be opened at all (deleted, replaced, not audio): every crop of it fails."""


# A crop that fails to decode or holds non-finite samples is replaced by another one, drawn
# from (seed, index, attempt): a function of the data, so a resumed run sees the same batches.
MAX_REPLACEMENTS = 32


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------- warnings

_warned: set[tuple[str, str]] = set()


def _warn_once(path, what: str, message: str) -> None:
    key = (str(path), what)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


_said: set[str] = set()


def _warn_summary(message: str) -> None:
    """A scan's summary warning, once per process (the train and valid splits scan the same folder)."""
    if message not in _said:
        _said.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------- reading

def audio_info(path) -> tuple[int, int, int]:
    """(frames at the file's rate that decode, file rate, file channels): the header's, checked
    against a read of the last frames (`_probe`), so a header that over-states the length gives
    the length that really decodes."""
    try:
        return _probe(Path(path))
    except DataError:
        raise
    except Exception as err:  # libsndfile errors, missing files, directories, ...
        raise DataError(f"{path}: unreadable audio file ({_one_line(err)})") from None


# Sample rates of the files read. Below 1 kHz nothing is audio (a file at 1 Hz resampled to
# 16 kHz is 16,000 times its size); above 768 kHz (the model's own limit) neither.
MIN_FILE_RATE, MAX_FILE_RATE = 1_000, 768_000


def check_file_rate(rate: int, path) -> None:
    if not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
        raise UnreadableFile(f"{path}: sample rate {rate:,} Hz is outside {MIN_FILE_RATE:,} to "
                             f"{MAX_FILE_RATE:,} Hz (not audio this package reads)")


# soxr's "HQ" (its default, and librosa's): 20-bit precision, computed in float32. One setting
# for every install, so that training data do not depend on the environment.
RESAMPLER_QUALITY = "HQ"


@functools.lru_cache(maxsize=None)
def _resampling(orig: int, new: int) -> tuple[int, int, int]:
    """(o, n, support) for resampling orig Hz -> new Hz: o input frames make n output frames
    (the reduced ratio; output frame k sits at input time k o / n), and an output frame depends
    on the inputs within `support` frames of its time. The support is measured once per pair
    of rates from the resampler's impulse response (where it exceeds 1e-9 of its peak; soxr's
    filters depend on the ratio), plus a quarter and one block (o frames) for safety."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    span = 40 * max(1, -(-orig // new)) * 1024  # input frames (_measurement_size)
    impulse = np.zeros(2 * span, dtype=np.float64)
    impulse[span] = 1.0
    response = np.abs(soxr.resample(impulse, orig, new, quality=RESAMPLER_QUALITY))
    k = np.nonzero(response > 1e-9 * response.max())[0]
    reach = max(span - k[0] * orig / new, k[-1] * orig / new - span)
    return o, n, int(math.ceil(1.25 * reach)) + o


# The support measurement resamples a test impulse of 2 x 40 x 1024 frames at the file's rate
# (far beyond any soxr filter): its output grows as model rate / file rate. Where that output
# is larger than both this budget and the whole file at the model's rate, the file is instead
# read whole (exact), so no allocation is larger than a small multiple of the file's own size.
MEASURE_BUDGET = 1 << 18   # output samples (2 MiB of float64)


def _measurement_size(orig: int, new: int) -> int:
    return 2 * 40 * max(1, -(-orig // new)) * 1024 * new // orig


def model_frames(file_frames: int, file_rate: int, sample_rate: int) -> int:
    """Length at the model's rate of a file of `file_frames` frames at `file_rate`: the length
    the resampler gives, floor(file_frames * sample_rate / file_rate)."""
    if file_rate == sample_rate:
        return file_frames
    g = math.gcd(file_rate, sample_rate)
    return file_frames * (sample_rate // g) // (file_rate // g)


def _apply_channels(x: torch.Tensor, channels: int, path, warn: bool) -> torch.Tensor:
    """(frames, file_channels) -> (frames, channels)."""
    fc = x.shape[1]
    if channels == 1:
        return x if fc == 1 else x.mean(dim=1, keepdim=True)
    if fc == 1:
        if warn:
            _warn_once(path, "mono", f"{path}: mono file in a stereo dataset: its channel is duplicated")
        return x.expand(-1, 2)
    if fc > 2:
        if warn:
            _warn_once(path, "multichannel",
                       f"{path}: {fc} channels: only the first two are used as left and right")
        return x[:, :2]
    return x


_OGG_MAX_PAGE = 65307  # bytes: 27-byte header + 255 lacing values + 255 * 255 bytes of data


def _ogg_seek_limit(path: str) -> int:
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return _ogg_seek_limit_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _ogg_seek_limit_cached(path: str, size: int, mtime_ns: int) -> int:
    """The frame up to which seeking in this Ogg file is sample-exact. libsndfile's Vorbis seek
    can land up to a block off inside the final Ogg page (a known libsndfile bug, still open;
    measured here: a constant shift of a few hundred frames), so reads starting later seek to
    before the final page and decode forward. Found from the granule position (the frame count
    at the end of a page) of the second-to-last page, minus a safety margin of 8192 frames;
    0 (decode from the start) when the tail cannot be parsed."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 2 * _OGG_MAX_PAGE))
            tail = fh.read()
    except OSError:
        return 0
    granules = []
    i = tail.find(b"OggS")
    while i != -1:
        if i + 14 <= len(tail) and tail[i + 4] == 0:  # stream structure version 0
            g = struct.unpack_from("<q", tail, i + 6)[0]
            if g >= 0:  # -1: no packet ends on this page
                granules.append(g)
        i = tail.find(b"OggS", i + 1)
    if len(granules) < 2 or granules[-2] > granules[-1]:
        return 0
    return max(0, granules[-2] - 8192)


def _read_frames(f: sf.SoundFile, count: int) -> np.ndarray:
    """Up to `count` frames from the current position as float32 (frames, channels): what
    decodes. soundfile's read() seeks to the new position after reading, which fails at the
    real end of a file whose header over-states its length (libFLAC): libsndfile's own read,
    which returns the frames it decoded, is called directly where soundfile exposes it."""
    snd, ffi = getattr(sf, "_snd", None), getattr(sf, "_ffi", None)
    if snd is None or ffi is None or not hasattr(snd, "sf_readf_float"):
        return f.read(count, dtype="float32", always_2d=True)
    out = np.empty((count, f.channels), dtype=np.float32)
    got = 0
    while got < count:   # in pieces, so that a decoder that stops early costs no more
        n = snd.sf_readf_float(f._file, ffi.cast("float *", out[got:].ctypes.data), min(count - got, 1 << 20))
        if n <= 0:
            break
        got += n
    return out[:got]


def _seek_read(f: sf.SoundFile, path, a: int, count: int) -> np.ndarray:
    """Frames [a, a + count) of an open file as float32 (count, file_channels). Where a seek
    fails (libFLAC near the real end of a file whose header over-states its length), the file
    is reopened and decoded forward from further back."""
    seek_to = a
    if f.format == "OGG":
        seek_to = min(a, _ogg_seek_limit(str(path)))
    data, err = None, None
    for attempt, back in enumerate(sorted({seek_to, max(0, seek_to - (1 << 16)), 0}, reverse=True)):
        try:
            g = f if attempt == 0 else sf.SoundFile(str(path))
            try:
                if back:
                    g.seek(back)
                data = _read_frames(g, a - back + count)
            finally:
                if g is not f:
                    g.close()
            seek_to = back
            break
        except Exception as exc:
            err = exc
    if data is None:
        raise DataError(f"{path}: cannot read frames [{a}, {a + count}) ({_one_line(err)})") from None
    if data.shape[0] != a - seek_to + count:
        raise DataError(f"{path}: the file ended early (read {max(0, data.shape[0] - (a - seek_to))} of "
                        f"{count} frames at offset {a}): truncated or corrupt")
    return data[a - seek_to:]


def _warn_if_beyond_full_scale(data: np.ndarray, path) -> None:
    """Float files can hold samples beyond [-1, 1], which quantisation clips: say so, once per file."""
    finite = data[np.isfinite(data)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if peak > 1.0:
        _warn_once(path, "clipped", f"{path}: samples beyond full scale (peak {peak:.3g}) are clipped to [-1, 1]")


def _read(path, sample_rate: int, channels: int, start: int, frames: int | None,
          warn: bool = True) -> torch.Tensor:
    try:
        n_file, rate, _ = _probe(Path(path))   # the length that decodes; a rate in range
        f = sf.SoundFile(str(path))
    except DataError as err:
        raise UnreadableFile(str(err)) from None
    except Exception as err:
        raise UnreadableFile(f"{path}: unreadable audio file ({_one_line(err)})") from None
    with f:
        total = model_frames(n_file, rate, sample_rate)
        if frames is None:
            frames = max(0, total - start)
        if start + frames > total:
            raise DataError(f"{path}: asked for frames [{start}, {start + frames}) at {sample_rate} Hz "
                            f"but the file has {total}")
        if frames == 0:
            return torch.zeros(0, channels)
        if rate == sample_rate:
            a, b = start, start + frames
        elif _measurement_size(rate, sample_rate) > max(MEASURE_BUDGET, total):
            g = math.gcd(rate, sample_rate)   # a short file at a low rate: read whole (exact)
            o, n = rate // g, sample_rate // g
            a, b = 0, n_file
        else:
            o, n, support = _resampling(rate, sample_rate)
            # Output block m (n outputs) reads inputs [m o - support, (m + 1) o + support):
            # start the read on a block boundary (where the resampler's phase is that of the
            # whole file) far enough back, and end it past the support.
            m0, m1 = start // n, (start + frames - 1) // n
            a = max(0, m0 - -(-support // o)) * o
            b = min(n_file, (m1 + 1) * o + support)
        data = _seek_read(f, path, a, b - a)
    _warn_if_beyond_full_scale(data, path)
    x = _apply_channels(torch.from_numpy(data), channels, path, warn)
    if rate == sample_rate:
        return x.contiguous()
    y = soxr.resample(np.ascontiguousarray(x.numpy()), rate, sample_rate, quality=RESAMPLER_QUALITY)
    off = start - a // o * n
    y = y[off:off + frames]
    if y.shape[0] != frames:  # cannot happen unless the header lied about the length
        raise DataError(f"{path}: resampled crop has {y.shape[0]} frames, expected {frames}")
    return torch.from_numpy(y)


def read_audio(path, sample_rate: int, channels: int, start: int = 0,
               frames: int | None = None) -> torch.Tensor:
    """Read `frames` frames (all of them when None) from frame `start`, both counted at the
    model's rate `sample_rate`, as float32 (frames, channels) in the file's scale ([-1, 1] for
    PCM). Only the needed part of the file is decoded. The result equals
    soxr.resample of the whole file (quality RESAMPLER_QUALITY), sliced, to float32 rounding. Raises DataError for unreadable,
    truncated or corrupt files and for a range beyond the file's end."""
    sample_rate = _positive_int(sample_rate, "sample_rate")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")
    if start < 0 or (frames is not None and frames < 0):
        raise ValueError(f"start and frames must be >= 0, got start={start}, frames={frames}")
    return _read(path, sample_rate, channels, int(start), None if frames is None else int(frames))


# -------------------------------------------------------------------------- synthetic music

class SyntheticStereoMusic:
    """Deterministic synthetic stereo music, generated on the fly: clip i depends only on
    (seed, i). Each clip: a tempo, a key (minor or major pentatonic), a melody of notes and a
    chord per bar, each note a few decaying harmonics under an ADSR envelope, panned by a slow
    LFO (equal-power) with an inter-channel delay of up to ~1-3 ms towards the far side; short
    filtered noise bursts (hats), and a little background noise. Peak normalised to 0.8."""

    PEAK = 0.8

    def __init__(self, sample_rate: int, seconds_per_clip: float = 4.0, clips: int = 16, seed: int = 0):
        sample_rate = _positive_int(sample_rate, "sample_rate")
        if not seconds_per_clip > 0 or clips < 1:
            raise ValueError("seconds_per_clip must be > 0 and clips >= 1")
        self.sample_rate = sample_rate
        self.seconds_per_clip = float(seconds_per_clip)
        self.clips = int(clips)
        self.seed = int(seed)
        self.frames = max(1, int(round(self.seconds_per_clip * sample_rate)))

    def __len__(self) -> int:
        return self.clips

    def __repr__(self) -> str:
        return (f"SyntheticStereoMusic(sample_rate={self.sample_rate}, seconds_per_clip="
                f"{self.seconds_per_clip}, clips={self.clips}, seed={self.seed})")

    def clip(self, i: int) -> torch.Tensor:
        """Clip i as float32 (frames, 2), peak 0.8."""
        if not 0 <= i < self.clips:
            raise IndexError(f"clip {i} out of range [0, {self.clips})")
        rng = np.random.default_rng([self.seed, int(i), 0x5A5])
        sr, n = self.sample_rate, self.frames
        out = np.zeros((2, n + 1), dtype=np.float64)  # the last column is a scratch sink
        table_size = 2048
        phase_grid = np.arange(table_size) / table_size

        # slow pan LFOs (melody and chords move differently), max inter-channel delay
        pan_rate = rng.uniform(0.05, 0.3, size=2)
        pan_phase = rng.uniform(0, 2 * np.pi, size=2)
        max_delay = rng.uniform(1e-3, 3e-3)

        def pan_at(voice: int, t_sec: float) -> float:
            return 0.5 + 0.3 * math.sin(2 * math.pi * pan_rate[voice] * t_sec + pan_phase[voice])

        def add(sig: np.ndarray, start: int, pan: float) -> None:
            """Equal-power pan plus the inter-channel delay (the far channel lags)."""
            delay = int(round((pan - 0.5) * 2 * max_delay * sr))
            gains = (math.cos(pan * math.pi / 2), math.sin(pan * math.pi / 2))
            for ch, lag in ((0, max(delay, 0)), (1, max(-delay, 0))):
                s0 = start + lag
                if s0 >= n:
                    continue
                m = min(len(sig), n - s0)
                out[ch, s0:s0 + m] += gains[ch] * sig[:m]

        def note(f0: float, start: int, dur: float, vel: float, bright: float, pan: float) -> None:
            att, dec = rng.uniform(0.004, 0.03), rng.uniform(0.05, 0.25)
            sus, rel = rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.3)
            length = int((dur + rel) * sr)
            if length <= 1 or start >= n:
                return
            # a wavetable of a few harmonics below Nyquist, read by phase
            k = np.arange(1, 7)
            k = k[k * f0 < 0.45 * sr]
            amps = k ** (-bright) * rng.uniform(0.6, 1.0, size=k.size)
            table = (amps[:, None] * np.sin(2 * np.pi * k[:, None] * phase_grid[None, :])).sum(0)
            t = np.arange(length) / sr
            vib = 1.0 + 0.003 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
            phase = np.cumsum(f0 * vib / sr) + rng.uniform()
            wave = table[((phase % 1.0) * table_size).astype(np.int64) % table_size]
            env = np.interp(t, [0.0, att, att + dec, max(dur, att + dec), dur + rel],
                            [0.0, 1.0, sus, sus, 0.0])
            add(vel * env * wave / max(amps.sum(), 1e-9), start, pan)

        # key, tempo
        root = 45 + int(rng.integers(0, 12))
        scale = [0, 3, 5, 7, 10] if rng.random() < 0.5 else [0, 2, 4, 7, 9]
        step = 60.0 / rng.uniform(80, 140) / 2          # an eighth note, seconds
        seconds = n / sr

        def midi_hz(degree: int, octave: int) -> float:
            semis = scale[degree % len(scale)] + 12 * (degree // len(scale) + octave)
            return 440.0 * 2 ** ((root + semis - 69) / 12)

        # melody: a random walk on the scale
        t_sec, degree = 0.0, int(rng.integers(0, 5))
        bright = rng.uniform(0.8, 2.0)
        while t_sec < seconds:
            steps = int(rng.choice([1, 1, 2, 2, 3, 4]))
            if rng.random() > 0.15:  # else a rest
                degree = int(np.clip(degree + rng.integers(-2, 3), -3, 9))
                note(midi_hz(degree, 1), int(t_sec * sr), steps * step * rng.uniform(0.6, 1.0),
                     rng.uniform(0.4, 0.9), bright, pan_at(0, t_sec))
            t_sec += steps * step
        # chords: a triad per bar, lower and softer
        bar = 8 * step
        t_sec = 0.0
        while t_sec < seconds:
            d0 = int(rng.integers(0, 5))
            for d in (d0, d0 + 2, d0 + 4):
                note(midi_hz(d, 0), int(t_sec * sr), bar * 0.9, 0.25, 2.0, pan_at(1, t_sec))
            t_sec += bar
        # noise bursts (hats): high-passed noise with a fast decay
        for _ in range(int(rng.poisson(2.0 * seconds))):
            s0 = int(rng.integers(0, max(1, int(seconds / step)))) * int(step * sr)
            length = int(rng.uniform(0.02, 0.12) * sr)
            burst = np.diff(rng.standard_normal(length + 1))
            burst *= np.exp(-np.arange(length) / (rng.uniform(0.01, 0.04) * sr)) * rng.uniform(0.05, 0.2)
            add(burst, s0, rng.uniform(0.1, 0.9))

        x = out[:, :n]
        x += rng.standard_normal((2, n)) * 3e-4
        peak = np.abs(x).max()
        if peak > 0:
            x *= self.PEAK / peak
        return torch.from_numpy(np.ascontiguousarray(x.T, dtype=np.float32))


# ------------------------------------------------------------------------------- the dataset

def _scan(root: Path) -> list[Path]:
    """Audio files under root, recursively, following symlinked folders (each real folder and
    file once, so a link loop ends); unreadable folders are skipped with a warning."""
    if root.is_file():
        return [root]
    files, seen_dirs, seen_files, unreadable = [], set(), set(), []

    def on_error(err: OSError) -> None:
        unreadable.append(f"{err.filename} ({err.strerror or type(err).__name__})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:   # reached again through a link: a loop, or an alias of a folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix.lower() not in AUDIO_SUFFIXES or not p.is_file():
                continue
            real_file = os.path.realpath(p)
            if real_file not in seen_files:
                seen_files.add(real_file)
                files.append(p)
    if unreadable:
        _warn_summary(f"skipped {len(unreadable)} unreadable folder(s) under {root}: " + ", ".join(unreadable[:10]))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _probe(path: Path) -> tuple[int, int, int]:
    """(frames that decode, rate, channels): the header, checked by a read of the last frames.
    A header that over-states the length (a common Vorbis end-trim; a truncated FLAC) gives
    the length that really decodes, with one warning naming the file and the shortfall; a file
    of which nothing decodes, or at a rate outside [MIN_FILE_RATE, MAX_FILE_RATE], raises.
    Cached per (path, size, mtime) and process, so the second split's scan is cheap."""
    st = os.stat(path)
    frames, rate, ch, claimed = _probe_cached(str(path), st.st_size, st.st_mtime_ns)
    if claimed != frames:
        _warn_once(path, "short", f"{path}: the header says {claimed:,} frames but {frames:,} decode "
                                  f"({claimed - frames:,} fewer, {(claimed - frames) / rate:.3f} s); "
                                  f"read to where it ends")
    return frames, rate, ch


@functools.lru_cache(maxsize=65536)
def _probe_cached(path: str, size: int, mtime_ns: int) -> tuple[int, int, int, int]:
    """(frames that decode, rate, channels, frames the header claims)."""
    with sf.SoundFile(str(path)) as f:
        frames, rate, ch = int(f.frames), int(f.samplerate), int(f.channels)
        check_file_rate(rate, path)
        if frames == 0:
            return 0, rate, ch, 0
        k = min(frames, 16)
        try:
            _seek_read(f, path, frames - k, k)
            return frames, rate, ch, frames
        except DataError:
            pass
        decoded = _decoded_length(path, f.format, frames)
    if decoded == 0:
        raise UnreadableFile(f"{path}: nothing in it decodes (the header claims {frames:,} frames)")
    return decoded, rate, ch, frames


def _readable(path: str, frame: int) -> bool:
    """Whether a seek to `frame` and a one-frame read succeed (in a fresh handle: a failed
    seek can leave libFLAC's decoder unusable)."""
    try:
        with sf.SoundFile(path) as f:
            f.seek(frame)
            return _read_frames(f, 1).shape[0] == 1
    except Exception:
        return False


def _decoded_length(path: str, fmt: str, claimed: int) -> int:
    """How many frames of a file whose header claims `claimed` really decode: a bisection on
    where a seek and a one-frame read still succeed, then a decode from a little before that
    (from before the final page for Ogg, where seeking is not sample-exact) to the real end."""
    lo, hi = 0, claimed   # frame lo reads (or lo == 0), frame hi does not
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if _readable(path, mid):
            lo = mid
        else:
            hi = mid
    for start in sorted({max(0, lo - 8192), 0}, reverse=True):
        if fmt == "OGG":
            start = min(start, _ogg_seek_limit(path))
        try:
            with sf.SoundFile(path) as f:
                if start:
                    f.seek(start)
                pos = start
                while pos < claimed:
                    got = _read_frames(f, min(1 << 16, claimed - pos)).shape[0]
                    if got == 0:
                        break
                    pos += got
            return pos
        except Exception:
            continue
    return 0


class AudioCrops(torch.utils.data.Dataset):
    """Token crops (crop_frames, channels), int64, from a folder of audio or the synthetic source.

    source: a folder (scanned recursively for .wav/.flac/.ogg, any case), a single audio file,
    or None for `SyntheticStereoMusic(sample_rate, seed=seed)` (16 clips, at least 4 s and two
    crops long). Unreadable, empty and too-short files are skipped with one warning.

    Split (the same for both splits given the same source, crop_frames, seed and
    valid_fraction): with >= 5 usable files (or clips), about `valid_fraction` of them (at
    least 1) chosen by `seed` are held out for validation; with fewer, the last
    `valid_fraction` of each file (at least one crop) is validation and the rest is training
    (a file too short for both is training only).

    train: len() is 2**31 - 1 (nominal); item `index` is a crop drawn uniformly over all
    training crop positions with numpy.random.default_rng([seed, 0, index]), so it depends
    only on (seed, index). valid: `valid_crops` fixed crops spread evenly over the validation
    audio (fewer positions than that: crops repeat). 256 by default: on the tiny preset's
    synthetic validation audio the per-crop NLL has a standard deviation of ~0.6 bits, so 16
    crops (the old default) read 0.05 bits off the 512-crop figure; 128+ agree to < 0.001.
    whole=True: no split, every file is in this one (for a held-out folder, `--val-data`).
    """

    def __init__(self, source, *, sample_rate: int, channels: int, crop_frames: int,
                 quantizer: Quantizer, split: str = "train", seed: int = 0,
                 valid_fraction: float = 0.1, valid_crops: int = 256, whole: bool = False):
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels!r}")
        sample_rate = _positive_int(sample_rate, "sample_rate")
        crop_frames = _positive_int(crop_frames, "crop_frames")
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
        if valid_crops < 1:
            raise ValueError(f"valid_crops must be >= 1, got {valid_crops!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.sample_rate, self.channels, self.crop_frames = sample_rate, channels, crop_frames
        self.quantizer, self.split, self.seed = quantizer, split, int(seed)
        self.valid_fraction, self.valid_crops = float(valid_fraction), int(valid_crops)
        self.whole = bool(whole)  # every file is in this split (a separate --val-data folder)
        self.source = None if source is None else Path(source)
        self.synthetic: SyntheticStereoMusic | None = None
        self._tokens: dict[int, torch.Tensor] = {}
        self._faults: dict[str, int] = {}   # replaced crops per file, in this process
        self._dropped: set[int] = set()      # files that could not be opened any more

        if source is None:
            seconds = max(4.0, 2.0 * crop_frames / sample_rate)
            self.synthetic = SyntheticStereoMusic(sample_rate, seconds_per_clip=seconds, seed=self.seed)
            self.files: list[Path] = []
            self.file_info: list[tuple[int, int, int]] = []
            lengths = [self.synthetic.frames] * len(self.synthetic)
        else:
            lengths = self._scan_folder()

        self.lengths = lengths  # per usable file (or clip), in frames at the model's rate
        self._split(lengths)
        if self.synthetic is not None:  # quantise the clips this split uses, once
            for item in sorted({r[0] for r in self.regions}):
                clip = self.synthetic.clip(item)
                if channels == 1:
                    clip = clip.mean(dim=1, keepdim=True)
                self._tokens[item] = quantizer.encode(clip).to(torch.int32)

    # -- scanning
    def _scan_folder(self) -> list[int]:
        root = self.source
        if not root.exists():
            raise DataError(f"data path {root} does not exist")
        candidates = _scan(root)
        if not candidates:
            raise DataError(f"no audio files (.wav, .flac, .ogg) found under {root}")
        base = root if root.is_dir() else root.parent
        self.files, self.file_info = [], []
        lengths, skipped, mono, multi = [], [], [], []
        for path in candidates:
            name = path.relative_to(base).as_posix()
            try:
                n_file, rate, fc = _probe(path)
            except Exception as err:
                reason = _one_line(err).replace(f"{path}: ", "")
                skipped.append(f"{name} (unreadable: {reason})")
                continue
            n_model = model_frames(n_file, rate, self.sample_rate)
            if n_file == 0:
                skipped.append(f"{name} (empty)")
                continue
            if n_model < self.crop_frames:
                skipped.append(f"{name} (too short: {n_model} frames at {self.sample_rate} Hz "
                               f"< crop of {self.crop_frames})")
                continue
            self.files.append(path)
            self.file_info.append((n_file, rate, fc))
            lengths.append(n_model)
            if self.channels == 2 and fc == 1:
                mono.append(name)
                _warned.add((str(path), "mono"))
            elif self.channels == 2 and fc > 2:
                multi.append(f"{name} ({fc} channels)")
                _warned.add((str(path), "multichannel"))
        shown = skipped[:20] + ([f"... and {len(skipped) - 20} more"] if len(skipped) > 20 else [])
        if not self.files:   # one line: the error says why each file was skipped
            raise DataError(f"no usable audio in {root}: all {len(candidates)} audio files were skipped "
                            f"(unreadable, empty or shorter than the crop of {self.crop_frames} frames "
                            f"at {self.sample_rate} Hz): " + ", ".join(shown))
        if skipped:
            _warn_summary(f"skipped {len(skipped)} of {len(candidates)} files: " + ", ".join(shown))
        if mono:
            _warn_summary(f"{len(mono)} mono file(s) in a stereo dataset, their channel duplicated: "
                          + ", ".join(mono[:20]) + (" ..." if len(mono) > 20 else ""))
        if multi:
            _warn_summary(f"{len(multi)} file(s) with more than 2 channels, only the first two used: "
                          + ", ".join(multi[:20]) + (" ..." if len(multi) > 20 else ""))
        return lengths

    # -- the split
    def _split(self, lengths: list[int]) -> None:
        crop, count = self.crop_frames, len(lengths)
        train, valid = [], []  # regions: (item, first frame, frames)
        if count >= 5:
            n_valid = min(count - 1, max(1, round(self.valid_fraction * count)))
            held = set(np.random.default_rng([self.seed, 1]).permutation(count)[:n_valid].tolist())
            for i, m in enumerate(lengths):
                (valid if i in held else train).append((i, 0, m))
        else:
            for i, m in enumerate(lengths):
                v = max(crop, math.ceil(self.valid_fraction * m))
                if m - v >= crop:
                    train.append((i, 0, m - v))
                    valid.append((i, m - v, v))
                else:
                    train.append((i, 0, m))
        if self.whole:
            train = valid = [(i, 0, m) for i, m in enumerate(lengths)]
        self.held_out_files = count >= 5 or self.whole
        self.regions = train if self.split == "train" else valid
        positions = np.array([r[2] - crop + 1 for r in self.regions], dtype=np.int64)
        self._cum = np.cumsum(positions)
        self._total = int(self._cum[-1]) if len(self._cum) else 0
        if self.split == "valid":
            if self._total == 0:
                warnings.warn("no validation audio: the files are too short to hold out a crop "
                              "(validation is empty)", UserWarning, stacklevel=3)
                self._valid = []
            else:
                q = ((np.arange(self.valid_crops) + 0.5) * self._total / self.valid_crops).astype(np.int64)
                self._valid = [self._locate(int(u)) for u in q]

    def _locate(self, u: int) -> tuple[int, int]:
        """Crop position number u (over all regions) -> (item, first frame)."""
        j = int(np.searchsorted(self._cum, u, side="right"))
        before = int(self._cum[j - 1]) if j else 0
        item, first, _ = self.regions[j]
        return item, first + (u - before)

    # -- Dataset
    def __len__(self) -> int:
        return TRAIN_LENGTH if self.split == "train" else len(self._valid)

    def crop_position(self, index: int, attempt: int = 0) -> tuple[int, int]:
        """(item, first frame at the model's rate) of crop `index`: item indexes `files` (or
        the synthetic clips). attempt > 0: the attempt-th replacement for that crop, should the
        earlier ones be unusable (a function of (seed, index, attempt) only)."""
        index = int(index)
        if index < 0:
            raise IndexError(f"crop index must be >= 0, got {index}")
        if self.split == "valid":
            if index >= len(self._valid):
                raise IndexError(f"validation crop {index} out of range [0, {len(self._valid)})")
            if attempt == 0:
                return self._valid[index]
            rng = np.random.default_rng([self.seed, 2, index, attempt])
        else:
            rng = np.random.default_rng([self.seed, 0, index] + ([attempt] if attempt else []))
        return self._locate(int(rng.integers(self._total)))

    def __getitem__(self, index: int) -> torch.Tensor:
        """The tokens of crop `index`. A crop that cannot be decoded or holds NaN/inf samples is
        replaced by crop_position(index, 1), (index, 2), ... (deterministic, so resume stays
        exact) and its file named in a warning with a running count; a file that cannot be
        opened any more is dropped (every crop of it would fail). Never returns tokens made
        from non-finite audio."""
        if self.synthetic is not None:
            item, first = self.crop_position(index)
            return self._tokens[item][first:first + self.crop_frames].long()
        last = ""
        for attempt in range(MAX_REPLACEMENTS + 1):
            item, first = self.crop_position(index, attempt)
            path = self.files[item]
            if item in self._dropped:
                continue
            span = f"frames [{first}, {first + self.crop_frames}) at {self.sample_rate} Hz"
            try:
                audio = _read(path, self.sample_rate, self.channels, first, self.crop_frames, warn=False)
            except UnreadableFile as err:
                self._dropped.add(item)
                last = _one_line(err)
                self._fault(path, f"{last}; the file is dropped from this run")
                continue
            except DataError as err:
                last = _one_line(err)
                self._fault(path, last.replace(f"{path}: ", ""))
                continue
            if not torch.isfinite(audio).all():
                bad = int((~torch.isfinite(audio)).sum())
                last = f"{path}: {span} holds {bad} NaN/infinite sample(s)"
                self._fault(path, f"{span} holds {bad} NaN/infinite sample(s)")
                continue
            return self.quantizer.encode(audio)
        raise DataError(f"{MAX_REPLACEMENTS + 1} crops in a row were unusable (last: {last}): "
                        f"the data in {self.source} is mostly damaged")

    def _fault(self, path, what: str) -> None:
        """Count a replaced crop of `path`; warn on the 1st, 10th, 100th, ... of each file."""
        count = self._faults.get(str(path), 0) + 1
        self._faults[str(path)] = count
        if count == 1 or math.log10(count).is_integer():
            warnings.warn(f"{path}: {what}; replaced by another crop ({count} crop(s) of this file "
                          f"replaced so far in this process)", UserWarning, stacklevel=3)

    def __repr__(self) -> str:
        what = repr(self.synthetic) if self.synthetic is not None else f"{len(self.files)} files in {self.source}"
        return (f"AudioCrops({what}, split={self.split}, {self.sample_rate} Hz, channels={self.channels}, "
                f"crop_frames={self.crop_frames}, {self.quantizer})")


# ------------------------------------------------------------------------------- batching

class StepIndexSampler(torch.utils.data.Sampler):
    """Infinite: from step `start_step` on, the indices of each step's batch on `rank`."""

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start_step = batch_size, start_step
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            base = (step * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)
            step += 1


def train_batches(dataset, *, batch_size: int, start_step: int = 0, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0,
                  pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """An infinite iterator of LongTensor (batch_size, crop_frames, C): the batch of global
    step s on rank r holds dataset indices (s * world_size + r) * batch_size + i. Starting at
    `start_step` gives exactly the batches an uninterrupted iterator gives from that step.
    With num_workers > 0 the workers persist and prefetch; pin_memory applies on CUDA only."""
    if getattr(dataset, "split", "train") != "train":
        raise ValueError("train_batches needs a training split (use valid_batches for validation)")
    if batch_size < 1 or start_step < 0 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad batching arguments: batch_size={batch_size}, start_step={start_step}, "
                         f"rank={rank}, world_size={world_size}, num_workers={num_workers}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size,
        sampler=StepIndexSampler(batch_size, start_step, rank, world_size),
        num_workers=num_workers,
        pin_memory=bool(pin_memory and torch.cuda.is_available()),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_ignores_stop_signals if num_workers > 0 else None,
    )
    if num_workers == 0 or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    # The workers are started with the stop signals blocked (a signal in between would find
    # them with the default action, death) and ignore them from their first instruction on.
    # torch's SIGCHLD handler, which raises a worker's death as an exception wherever the main
    # process happens to be (inside a checkpoint write, say), is put back to what it was: a
    # dead worker is then reported by the iterator's own liveness check, from next().
    chld = signal.getsignal(signal.SIGCHLD)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if chld is None else chld)
    return batches


# A job's preemption (SLURM, `timeout`, a closed terminal) signals every process of its group:
# data-loader workers ignore these, and the main process, which owns shutdown, stops them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def valid_batches(dataset, *, batch_size: int) -> list[torch.Tensor]:
    """All validation crops in their fixed order, batched (the last batch may be smaller)."""
    if getattr(dataset, "split", "valid") != "valid":
        raise ValueError("valid_batches needs a validation split")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    return [torch.stack([dataset[i] for i in range(s, min(n, s + batch_size))])
            for s in range(0, n, batch_size)]


# ------------------------------------------------------------------------------- CLI (bench)

def _bench_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sashimi.data",
                                description="Measure the data pipeline's throughput (tokens/s).")
    p.add_argument("--bench", metavar="DIR", required=True, help="folder of audio (or 'synthetic')")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--crop", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--quantization", default="mu-law")
    return p.parse_args(argv)


def _bench(argv=None) -> None:
    """Tokens/s of the training loader over a folder (or the synthetic source)."""
    a = _bench_args(argv)
    try:
        ds = AudioCrops(None if a.bench == "synthetic" else a.bench, sample_rate=a.sample_rate,
                        channels=a.channels, crop_frames=a.crop,
                        quantizer=Quantizer(a.quantization, a.bits))
    except (DataError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    it = train_batches(ds, batch_size=a.batch_size, num_workers=a.workers)
    for _ in range(max(1, a.workers)):  # warm up (workers start, files open)
        next(it)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(a.batches):
        tokens += next(it).numel()
    dt = time.perf_counter() - t0
    print(f"{ds}\n{a.batches} batches, {tokens / dt / 1e6:.2f} M tokens/s "
          f"({a.workers} workers, {dt / a.batches * 1e3:.1f} ms/batch)")


if __name__ == "__main__":
    _bench()
