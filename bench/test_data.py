"""Data pipeline throughput: `sashimi.data.train_batches` over a folder of real-rate audio.

8 files x 20 s of 44.1 kHz stereo (WAV 16-bit or FLAC), written once per session; crops of
16384 frames at the model's rate, batch 8, stereo, 8-bit mu-law; model rate 16 kHz (every crop
resampled) or 44.1 kHz (no resampling); 0, 4 or 12 DataLoader workers. Reported as tokens/s
(frames x channels) in extra_info, against the pipeline's target of 30 M tokens/s (10x the
training target of 3 M tokens/s). CPU-bound: it measures the host's cores, not the GPU (it is
collected with the GPU suite, where the H100 machine's 16 cores are what matters).
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from bench._common import ANCHORS
from sashimi.data import AudioCrops, train_batches
from sashimi.quantize import Quantizer

FILES, SECONDS, FILE_RATE = 8, 20.0, 44100
CROP, BATCH, CHANNELS = 16384, 8, 2
TARGET_TOKENS_PER_S = ANCHORS["data"]["target_tokens_per_s"]


@pytest.fixture(scope="session")
def audio_folders(tmp_path_factory):
    """{"wav": folder, "flac": folder}: the same 8 clips of music-like audio in each format."""
    roots = {fmt: tmp_path_factory.mktemp(f"bench_audio_{fmt}") for fmt in ("wav", "flac")}
    n = int(SECONDS * FILE_RATE)
    t = np.arange(n) / FILE_RATE
    for i in range(FILES):
        rng = np.random.default_rng(i)
        x = np.zeros((n, 2))
        for _ in range(12):
            f0, onset, decay = rng.uniform(60, 3000), rng.uniform(0, SECONDS), rng.uniform(0.5, 4)
            env = np.where(t >= onset, np.exp(-(t - onset) * decay), 0.0)
            pan = rng.uniform(0.1, 0.9)
            tone = env * np.sin(2 * np.pi * f0 * t)
            x[:, 0] += (1 - pan) * tone
            x[:, 1] += pan * tone
        x += 0.02 * rng.standard_normal((n, 2))
        x = (0.8 * x / np.abs(x).max()).astype(np.float32)
        sf.write(roots["wav"] / f"clip{i}.wav", x, FILE_RATE, subtype="PCM_16")
        sf.write(roots["flac"] / f"clip{i}.flac", x, FILE_RATE)
    return roots


CASES = [pytest.param(fmt, rate, workers, id=f"workers{workers}-{fmt}{FILE_RATE}-to{rate}")
         for fmt in ("flac", "wav") for rate in (16000, 44100) for workers in (0, 4, 12)]


@pytest.mark.parametrize("fmt,rate,workers", CASES)
def test_bench_data_fwd(benchmark, bench_size, audio_folders, fmt, rate, workers):
    """fwd = producing training batches (read, resample, quantise, collate)."""
    if bench_size == "small" and (fmt, rate, workers) != ("flac", 16000, 4):
        pytest.skip("--bench-size small: one case (flac, 16 kHz, 4 workers)")
    if workers > 2 * (os.cpu_count() or 1):
        pytest.skip(f"{workers} workers on {os.cpu_count()} cores: oversubscribed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = AudioCrops(audio_folders[fmt], sample_rate=rate, channels=CHANNELS,
                             crop_frames=CROP, quantizer=Quantizer("mu-law", 8))
    batches = train_batches(dataset, batch_size=BATCH, num_workers=workers)
    per_round = max(4, 2 * workers)  # batches per timed round: keeps every worker busy
    for _ in range(per_round):  # start the workers, fill the prefetch queue
        next(batches)
    tokens_per_batch = BATCH * CROP * CHANNELS

    def pull():
        for _ in range(per_round):
            next(batches)

    times = []

    def timed():
        t0 = time.perf_counter()
        pull()
        times.append(time.perf_counter() - t0)

    benchmark.group = f"data-fwd-{fmt}-to{rate}"
    benchmark.pedantic(timed, rounds=8, warmup_rounds=1, iterations=1)
    seconds = float(np.median(times))
    tokens_per_s = per_round * tokens_per_batch / seconds
    benchmark.extra_info.update(
        op="data", direction="fwd", provider=f"workers{workers}",
        shape=dict(files=FILES, seconds=SECONDS, file_rate=FILE_RATE, format=fmt, model_rate=rate,
                   crop=CROP, batch=BATCH, channels=CHANNELS),
        dtype="int64", cpu_count=os.cpu_count(), torch=torch.__version__,
        ms_per_batch=seconds / per_round * 1e3, tokens_per_s=tokens_per_s,
        target_tokens_per_s=TARGET_TOKENS_PER_S, fraction_of_target=tokens_per_s / TARGET_TOKENS_PER_S)
    del batches  # shut the workers down
