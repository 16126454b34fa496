"""sashimi.data: reading, resampling, channel policy, the dataset, its split and batching.

Real files are written with soundfile into a temporary folder: 44.1 kHz stereo FLAC and OGG
(Vorbis), 48 kHz mono 16-bit WAV, a 4-channel WAV, an upper-case .WAV, nested folders, and
the files that must be skipped (too short, truncated FLAC, random bytes, empty, zero frames).
The oracle for the audio is the whole file decoded by soundfile and resampled by
soxr.resample (the pipeline's resampler and setting), sliced; the resampler itself is checked
against pure tones, whose resampled values are known in closed form.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from sashimi.data import (RESAMPLER_QUALITY, AudioCrops, DataError, SyntheticStereoMusic, audio_info,
                          model_frames, read_audio, train_batches, valid_batches)
from sashimi.quantize import Quantizer

RATE = 16000   # the model's rate in most tests
CROP = 2048    # frames at the model's rate


def music(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """Sums of sines under decaying envelopes, plus noise; different per channel. Peak 0.7."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    out = np.zeros((n, channels))
    for c in range(channels):
        for _ in range(6):
            f0 = rng.uniform(80, 2000)
            onset = rng.uniform(0, seconds * 0.8)
            env = np.where(t >= onset, np.exp(-(t - onset) * rng.uniform(1, 6)), 0.0)
            out[:, c] += env * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6))
        out[:, c] += 0.05 * rng.standard_normal(n)
    return (0.7 * out / np.abs(out).max()).astype(np.float32)


def whole(path, rate: int, channels: int) -> torch.Tensor:
    """The oracle: decode everything, apply the channel policy, resample the whole file."""
    x = torch.from_numpy(sf.read(str(path), dtype="float32", always_2d=True)[0])
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] == 1:
        x = x.expand(-1, 2)
    else:
        x = x[:, :2]
    file_rate = sf.info(str(path)).samplerate
    if file_rate != rate:
        x = torch.from_numpy(soxr.resample(x.contiguous().numpy(), file_rate, rate, quality=RESAMPLER_QUALITY))
    return x.contiguous()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    (root / "sub" / "deeper").mkdir(parents=True)
    sf.write(root / "a_stereo.flac", music(1.0, 44100, 2, 1), 44100)
    # 3 s: long enough for libsndfile's Vorbis seek to go wrong in the final page (checked)
    sf.write(root / "sub" / "b_stereo.ogg", music(3.0, 44100, 2, 2), 44100)
    sf.write(root / "sub" / "deeper" / "c_mono48.wav", music(0.8, 48000, 1, 3), 48000, subtype="PCM_16")
    sf.write(root / "d_quad.wav", music(0.5, 44100, 4, 4), 44100, subtype="PCM_16")
    sf.write(root / "E_UPPER.WAV", music(0.5, 22050, 2, 5), 22050, subtype="PCM_16")
    # a WAV cut in half: libsndfile reads the frames that are there (usable, shorter)
    sf.write(root / "f_cut.wav", music(1.0, 44100, 2, 6), 44100, subtype="PCM_16")
    raw = (root / "f_cut.wav").read_bytes()
    (root / "f_cut.wav").write_bytes(raw[:len(raw) // 2])
    # a truncated FLAC (its header claims the full length): read to where it really ends
    # skipped: too short, random bytes, an empty file, zero frames; and a non-audio file
    # that is not even considered
    sf.write(root / "sub" / "short.wav", music(0.05, 44100, 2, 7), 44100, subtype="PCM_16")
    sf.write(root / "sub" / "trunc.flac", music(1.0, 44100, 2, 8), 44100)
    raw = (root / "sub" / "trunc.flac").read_bytes()
    (root / "sub" / "trunc.flac").write_bytes(raw[:len(raw) // 2])
    (root / "random.flac").write_bytes(np.random.default_rng(9).bytes(3000))
    (root / "empty.wav").write_bytes(b"")
    sf.write(root / "zero.wav", np.zeros((0, 2), np.float32), 44100)
    (root / "notes.txt").write_text("not audio")
    return root


USABLE = ["E_UPPER.WAV", "a_stereo.flac", "d_quad.wav", "f_cut.wav", "sub/b_stereo.ogg",
          "sub/deeper/c_mono48.wav", "sub/trunc.flac"]
SKIPPED = ["empty.wav", "random.flac", "sub/short.wav", "zero.wav"]


def crops(folder, split="train", **kw) -> AudioCrops:
    args = dict(sample_rate=RATE, channels=2, crop_frames=CROP, quantizer=Quantizer(), split=split)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AudioCrops(folder, **args)


@pytest.fixture(scope="module")
def train_set(folder):
    return crops(folder)


# ------------------------------------------------------------------------------ scanning

def test_scan_names_and_counts_skipped_files_in_one_warning(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = AudioCrops(folder, sample_rate=RATE, channels=2, crop_frames=CROP, quantizer=Quantizer())
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skips) == 1, skips
    msg = skips[0]
    assert msg.startswith(f"skipped {len(SKIPPED)} of {len(USABLE) + len(SKIPPED)} files: ")
    for name in SKIPPED:
        assert name in msg
    for name in USABLE:
        assert name not in msg
    assert "too short" in msg and "unreadable" in msg and "empty" in msg
    assert [p.relative_to(folder).as_posix() for p in ds.files] == USABLE
    # the mono file and the 4-channel file are announced (once each, by name)
    text = " | ".join(str(w.message) for w in caught)
    assert "c_mono48.wav" in text and "d_quad.wav (4 channels)" in text
    assert ds.held_out_files  # 6 usable files: validation holds out whole files


def test_missing_path_and_no_usable_audio_raise_data_error(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        crops(tmp_path / "nope")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no audio files"):
        crops(tmp_path / "only_text")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.ogg").write_bytes(b"OggS garbage")
    sf.write(bad / "short.flac", music(0.05, 16000, 1, 0), 16000)
    with pytest.raises(DataError, match="no usable audio") as err:
        crops(bad)
    assert "\n" not in str(err.value)
    # a crop longer than every file: nothing usable either
    with pytest.raises(DataError, match="no usable audio"):
        crops(folder, crop_frames=10 * RATE)


def test_audio_info_and_unreadable_files(folder):
    assert audio_info(folder / "a_stereo.flac") == (44100, 44100, 2)
    assert audio_info(folder / "sub" / "deeper" / "c_mono48.wav") == (38400, 48000, 1)
    for name in ("random.flac", "empty.wav", "notes.txt", "missing.wav"):
        with pytest.raises(DataError, match=name):
            audio_info(folder / name)
    with pytest.raises(DataError, match="random.flac"):
        read_audio(folder / "random.flac", RATE, 2)
    # the truncated FLAC is as long as what decodes: read to the cut, not beyond
    n_decoded = audio_info(folder / "sub" / "trunc.flac")[0]
    assert 0 < n_decoded < 44100
    read_audio(folder / "sub" / "trunc.flac", RATE, 2, 0, 100)
    with pytest.raises(DataError, match="trunc.flac.*asked for frames"):
        read_audio(folder / "sub" / "trunc.flac", RATE, 2, RATE - 200, 100)
    with pytest.raises(DataError, match="asked for frames"):
        read_audio(folder / "a_stereo.flac", RATE, 2, RATE - 10, 11)
    with pytest.raises(ValueError):
        read_audio(folder / "a_stereo.flac", RATE, 3)


# ------------------------------------------------------------------------- channel policy

def test_mono_file_is_duplicated_with_one_warning(tmp_path):
    path = tmp_path / "mono.wav"
    sf.write(path, music(0.3, 48000, 1, 11), 48000, subtype="PCM_16")
    with pytest.warns(UserWarning, match="duplicated"):
        x = read_audio(path, RATE, 2)
    assert x.shape == (int(0.3 * RATE), 2) and torch.equal(x[:, 0], x[:, 1])
    assert x.abs().max() > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file: no second warning
        read_audio(path, RATE, 2, 10, 100)
        mono = read_audio(path, RATE, 1)
    assert torch.allclose(mono[:, 0], x[:, 0])


def test_more_than_two_channels_keep_the_first_two(tmp_path):
    path = tmp_path / "quad.wav"
    data = music(0.3, 44100, 4, 12)
    sf.write(path, data, 44100, subtype="PCM_16")
    pcm = torch.from_numpy(sf.read(path, dtype="float32")[0])
    with pytest.warns(UserWarning, match="first two"):
        x = read_audio(path, 44100, 2)
    assert torch.equal(x, pcm[:, :2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_audio(path, 44100, 2, 5, 50)
        mono = read_audio(path, 44100, 1)  # mono: the mean of all the file's channels
    assert torch.allclose(mono[:, 0], pcm.mean(dim=1), atol=1e-7)


def test_stereo_to_mono_is_the_channel_mean(folder):
    st = read_audio(folder / "a_stereo.flac", RATE, 2, 1000, 3000)
    mono = read_audio(folder / "a_stereo.flac", RATE, 1, 1000, 3000)
    assert mono.shape == (3000, 1) and st.shape == (3000, 2)
    assert not torch.allclose(st[:, 0], st[:, 1])
    assert torch.allclose(mono[:, 0], st.mean(dim=1), atol=1e-6)


# --------------------------------------------------------------- reading crops: the oracle

CASES = [
    pytest.param("a_stereo.flac", 16000, id="flac44-to-16k"),
    pytest.param("a_stereo.flac", 48000, id="flac44-to-48k"),
    pytest.param("a_stereo.flac", 44100, id="flac44-same-rate"),
    pytest.param("sub/b_stereo.ogg", 16000, id="ogg44-to-16k"),
    pytest.param("sub/b_stereo.ogg", 44100, id="ogg44-same-rate"),
    pytest.param("sub/deeper/c_mono48.wav", 16000, id="wav48-mono-to-16k"),
    pytest.param("sub/deeper/c_mono48.wav", 22050, id="wav48-mono-to-22k"),
    pytest.param("E_UPPER.WAV", 16000, id="wav22-to-16k"),
]


@pytest.mark.parametrize("name,rate", CASES)
def test_crops_equal_the_whole_file_resampled(folder, name, rate):
    """A crop is the slice of the whole file resampled, including the first and last frames
    of the file and of the crop (the read carries the resampler's support), and including the
    end of Ogg files (where libsndfile's Vorbis seek is not sample-exact)."""
    path = folder / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for channels in (1, 2):
            ref = whole(path, rate, channels)
            n = ref.shape[0]
            full = read_audio(path, rate, channels)
            assert full.shape == ref.shape and full.dtype == torch.float32
            assert (full - ref).abs().max() <= 1e-5
            rng = np.random.default_rng(len(name) + rate)
            spans = [(0, 1), (0, 777), (n - 1, 1), (n - 513, 513), (n - 5000, 64), (n - 300, 300)]
            spans += [(int(a), int(m)) for m in rng.integers(1, n // 2, 6) for a in rng.integers(0, n - m, 1)]
            for a, m in spans:
                a = max(0, a)
                crop = read_audio(path, rate, channels, a, m)
                assert crop.shape == (m, channels)
                err = (crop - ref[a:a + m]).abs().max().item()
                assert err <= 1e-5, f"crop [{a}, {a + m}) of {n}: max error {err:.2e}"
    assert ref.abs().max() > 0.1  # not silence


def _tones(rate: int, frames: int, freqs: tuple[float, ...], amps: tuple[float, ...]) -> np.ndarray:
    t = np.arange(frames) / rate
    return sum(a * np.sin(2 * np.pi * f * t + i) for i, (f, a) in enumerate(zip(freqs, amps)))


@pytest.mark.parametrize("file_rate,rate", [(44100, 16000), (48000, 22050), (22050, 16000),
                                            (16000, 44100), (96000, 8000)])
def test_resampling_keeps_tones_below_the_new_nyquist_and_removes_those_above(tmp_path, file_rate, rate):
    """Checked against the closed form, not against a resampler: tones below the model's
    Nyquist come out as the same tones sampled at the model's rate (to 1e-5; measured ~5e-7),
    a tone above it is removed (< 1e-5 of amplitude 0.5: measured ~1e-7, -130 dB), away from
    the file's ends (20th of a second), where the filter sees the file's edges. The length is
    model_frames."""
    n = file_rate  # one second
    below = (440.0, 0.2 * min(rate, file_rate)), (0.4, 0.3)
    sf.write(tmp_path / "below.wav", _tones(file_rate, n, *below).astype(np.float32), file_rate, subtype="FLOAT")
    x = read_audio(tmp_path / "below.wav", rate, 1)[:, 0].double()
    m = model_frames(n, file_rate, rate)
    assert x.shape == (m,) and m == n * rate // file_rate
    edge = rate // 20
    want = torch.from_numpy(_tones(rate, m, *below))
    assert (x - want)[edge:-edge].abs().max() < 1e-5
    if 0.6 * rate < 0.45 * file_rate:
        sf.write(tmp_path / "above.wav", _tones(file_rate, n, (0.6 * rate,), (0.5,)).astype(np.float32),
                 file_rate, subtype="FLOAT")
        y = read_audio(tmp_path / "above.wav", rate, 1)
        assert y[edge:-edge].abs().max() < 1e-5


@pytest.mark.parametrize("q", [Quantizer("mu-law", 8), Quantizer("linear", 16)], ids=["mu8", "lin16"])
@pytest.mark.parametrize("channels", [1, 2])
def test_tokens_decode_back_to_the_source(folder, q, channels):
    """Every crop of the dataset (train and valid) holds, sample by sample, the token whose bin
    contains the source (the whole file resampled independently), up to a resampling tolerance
    of 1e-5: so decode(tokens) is within the bin's half-width (linear) or the mu-law bin bound
    of the source."""
    edges = q.bin_edges()
    refs = {}
    for split in ("train", "valid"):
        ds = crops(folder, split=split, channels=channels, quantizer=q, valid_crops=6)
        for index in range(6):
            tokens = ds[index]
            assert tokens.dtype == torch.int64 and tokens.shape == (CROP, channels)
            item, first = ds.crop_position(index)
            path = ds.files[item]
            if path not in refs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    refs[path] = whole(path, RATE, channels).double().clamp(-1, 1)
            src = refs[path][first:first + CROP]
            lo, hi = edges[tokens], edges[tokens + 1]
            tol = 1e-5
            assert ((src >= lo - tol) & (src <= hi + tol)).all(), f"{path.name} @ {first}"
            dec = q.decode(tokens).double()
            centre_bound = torch.maximum(dec - lo, hi - dec)
            assert ((dec - src).abs() <= centre_bound + tol).all()
            assert tokens.unique().numel() > 20  # real audio, not a constant


def test_nan_audio_raises_data_error_naming_the_file(tmp_path):
    x = music(0.5, RATE, 1, 13)
    x[100] = np.nan
    sf.write(tmp_path / "nan.wav", x, RATE, subtype="FLOAT")
    ds = crops(tmp_path, channels=1, crop_frames=RATE // 2)
    with pytest.raises(DataError, match="nan.wav.*NaN"):
        ds[0]


# ------------------------------------------------------------------------- dataset, split

def test_train_crops_depend_only_on_seed_and_index(folder, train_set):
    again = crops(folder)
    assert len(train_set) == 2**31 - 1
    a, b = train_set[5], again[5]
    assert torch.equal(a, b)
    assert train_set.crop_position(5) == again.crop_position(5)
    # out-of-order access gives the same crops
    assert torch.equal(again[7], train_set[7]) and torch.equal(again[5], a)
    assert not torch.equal(train_set[5], train_set[6])
    other = crops(folder, seed=1)
    positions = [train_set.crop_position(i) for i in range(20)]
    assert positions != [other.crop_position(i) for i in range(20)]
    assert len(set(positions)) == 20


def test_split_holds_out_whole_files(folder, train_set):
    valid = crops(folder, split="valid", valid_crops=7)
    train_items = {r[0] for r in train_set.regions}
    valid_items = {r[0] for r in valid.regions}
    assert valid_items and train_items and not train_items & valid_items
    assert train_items | valid_items == set(range(len(USABLE)))
    assert len(valid_items) == 1  # round(0.1 * 6), at least one
    assert {train_set.crop_position(i)[0] for i in range(200)} == train_items
    # fixed crops, spread over the validation audio, the same on every construction
    assert len(valid) == 7
    again = crops(folder, split="valid", valid_crops=7)
    assert [valid.crop_position(i) for i in range(7)] == [again.crop_position(i) for i in range(7)]
    starts = [valid.crop_position(i)[1] for i in range(7)]
    assert len(set(starts)) == 7
    with pytest.raises(IndexError):
        valid[7]
    batches = valid_batches(valid, batch_size=3)
    assert [b.shape for b in batches] == [(3, CROP, 2), (3, CROP, 2), (1, CROP, 2)]
    assert torch.equal(torch.cat(batches), torch.stack([again[i] for i in range(7)]))


def test_split_with_few_files_uses_the_end_of_each_file(tmp_path):
    for i, seconds in enumerate((1.0, 0.5, 0.2)):
        sf.write(tmp_path / f"f{i}.flac", music(seconds, 44100, 2, 20 + i), 44100)
    kw = dict(valid_fraction=0.25, valid_crops=8)
    train, valid = crops(tmp_path, **kw), crops(tmp_path, split="valid", **kw)
    assert not train.held_out_files
    lengths = train.lengths
    assert lengths == [16000, 8000, 3200]
    # f0: 16000 frames, valid = the last 4000; f1: 8000 frames, valid = the last 2048 (a crop);
    # f2: 3200 frames, too short for both: training only
    assert sorted(valid.regions) == [(0, 12000, 4000), (1, 5952, 2048)]
    assert sorted(train.regions) == [(0, 0, 12000), (1, 0, 5952), (2, 0, 3200)]
    for i in range(300):
        item, first = train.crop_position(i)
        end = dict((r[0], r[1] + r[2]) for r in train.regions)[item]
        assert first >= 0 and first + CROP <= end
    for i in range(len(valid)):
        item, first = valid.crop_position(i)
        region = [r for r in valid.regions if r[0] == item][0]
        assert region[1] <= first and first + CROP <= region[1] + region[2]


def test_synthetic_dataset(tmp_path):
    q = Quantizer("mu-law", 8)
    ds = AudioCrops(None, sample_rate=8000, channels=2, crop_frames=1024, quantizer=q)
    x = ds[3]
    assert x.shape == (1024, 2) and x.dtype == torch.int64
    assert 0 <= x.min() and x.max() < 256 and x.unique().numel() > 30
    again = AudioCrops(None, sample_rate=8000, channels=2, crop_frames=1024, quantizer=q)
    assert torch.equal(again[3], x) and not torch.equal(ds[4], x)
    valid = AudioCrops(None, sample_rate=8000, channels=2, crop_frames=1024, quantizer=q, split="valid")
    assert {r[0] for r in valid.regions}.isdisjoint({r[0] for r in ds.regions})
    mono = AudioCrops(None, sample_rate=8000, channels=1, crop_frames=1024, quantizer=q)
    assert mono[3].shape == (1024, 1)
    # a crop longer than 4 s: the clips grow to hold it
    long = AudioCrops(None, sample_rate=8000, channels=1, crop_frames=40000, quantizer=q, split="valid")
    assert long[0].shape == (40000, 1)


# --------------------------------------------------------------------------- the batches

def test_train_batches_shard_ranks_and_resume_exactly(train_set):
    B, W = 3, 2
    per_rank = []
    for rank in range(W):
        it = train_batches(train_set, batch_size=B, rank=rank, world_size=W)
        per_rank.append([next(it) for _ in range(3)])
    for rank in range(W):
        for step, batch in enumerate(per_rank[rank]):
            assert batch.shape == (B, CROP, 2) and batch.dtype == torch.int64
            first = (step * W + rank) * B
            expect = torch.stack([train_set[first + i] for i in range(B)])
            assert torch.equal(batch, expect)
    # disjoint crops across ranks and steps
    positions = {train_set.crop_position((s * W + r) * B + i)
                 for s in range(3) for r in range(W) for i in range(B)}
    assert len(positions) == 3 * W * B
    resumed = train_batches(train_set, batch_size=B, start_step=2, rank=1, world_size=W)
    assert torch.equal(next(resumed), per_rank[1][2])
    with pytest.raises(ValueError):
        train_batches(train_set, batch_size=B, rank=2, world_size=2)


def test_workers_give_the_same_batches(train_set):
    serial = train_batches(train_set, batch_size=2, start_step=4)
    parallel = train_batches(train_set, batch_size=2, start_step=4, num_workers=2)
    for _ in range(4):
        assert torch.equal(next(serial), next(parallel))


def test_batch_helpers_check_the_split(folder, train_set):
    valid = crops(folder, split="valid")
    with pytest.raises(ValueError):
        train_batches(valid, batch_size=2)
    with pytest.raises(ValueError):
        valid_batches(train_set, batch_size=2)
    with pytest.raises(ValueError):
        crops(folder, split="test")
    with pytest.raises(ValueError):
        crops(folder, channels=3)


# ----------------------------------------------------------------------- synthetic music

def test_synthetic_music_is_deterministic_stereo_music():
    src = SyntheticStereoMusic(16000, seconds_per_clip=2.0, clips=4, seed=0)
    assert len(src) == 4
    a = src.clip(1)
    assert a.shape == (32000, 2) and a.dtype == torch.float32
    assert torch.equal(a, SyntheticStereoMusic(16000, seconds_per_clip=2.0, clips=4, seed=0).clip(1))
    assert not torch.allclose(a, src.clip(2))
    assert not torch.allclose(a, SyntheticStereoMusic(16000, 2.0, 4, seed=1).clip(1))
    peak = a.abs().max().item()
    assert 0.5 < peak <= 1.0 and math.isclose(peak, 0.8, rel_tol=1e-5)
    rms = a.pow(2).mean(0).sqrt()
    assert (rms > 0.02).all()
    # panning and delay: the channels differ, but remain one piece of music
    left, right = a[:, 0], a[:, 1]
    assert (left - right).pow(2).mean().sqrt() > 0.2 * rms.mean()
    corr = torch.corrcoef(a.t())[0, 1].item()
    assert -0.5 < corr < 0.98
    # not a stationary tone: the energy moves over time (notes, envelopes)
    frames = a.pow(2).sum(1).reshape(40, -1).mean(1)
    assert frames.max() > 3 * frames.min()
    with pytest.raises(IndexError):
        src.clip(4)
