"""A `.sash` file on another machine: what the decoder needs to match the encoder, held as the
README states it. The thread count never matters (the codec runs the model on one thread); the
CPU capability torch dispatches to (ATEN_CPU_CAPABILITY) must match, and when it does not,
decompress refuses in one line that says which to set, before decoding anything."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.train import main as train_main

RATE = 8000
ROOT = Path(__file__).resolve().parents[1]
NATIVE = torch.backends.cpu.get_cpu_capability()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("machines")
    assert train_main(["--steps", "2", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0",
                       "--val-every", "1000", "--device", "cpu", "--sample-rate", str(RATE), "--stereo",
                       "--stereo-layout", "frames", "--bits", "16", "--quantization", "linear", "--head", "dml",
                       "--out", str(root / "m")]) == 0
    rng = np.random.default_rng(1)
    t = np.arange(700) / RATE
    x = 0.3 * np.sin(2 * np.pi * 330 * t)[:, None] + 0.02 * rng.standard_normal((700, 2))
    sf.write(str(root / "in.wav"), x.astype(np.float32), RATE, subtype="PCM_16")
    return root, root / "m" / "checkpoint.pt"


def _cli(command: str, args: list[str], **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full.pop("ATEN_CPU_CAPABILITY", None) if "ATEN_CPU_CAPABILITY" not in env else None
    return subprocess.run([sys.executable, "-m", f"sashimi.{command}", *args, "--quiet"], env=full,
                          capture_output=True, text=True, timeout=300)


def _compress(root, ckpt, name, **env):
    r = _cli("compress", ["--checkpoint", str(ckpt), str(root / "in.wav"), str(root / name), "--overwrite",
                          "--chunk-seconds", str(100 / RATE)], **env)
    assert r.returncode == 0, r.stderr
    return root / name


def test_thread_counts_do_not_matter(setup):
    root, ckpt = setup
    sash = _compress(root, ckpt, "threads.sash", OMP_NUM_THREADS="2")
    r = _cli("decompress", ["--checkpoint", str(ckpt), str(sash), str(root / "threads.wav"), "--overwrite"],
             OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert (root / "threads.wav").read_bytes() == (root / "in.wav").read_bytes()


@pytest.mark.skipif(NATIVE == "DEFAULT", reason="this CPU's best torch kernels are the default ones")
@pytest.mark.parametrize("encode_at,decode_at", [("default", None), (None, "default")])
def test_another_cpu_capability_is_refused_in_one_line(setup, encode_at, decode_at):
    root, ckpt = setup
    enc_env = {"ATEN_CPU_CAPABILITY": encode_at} if encode_at else {}
    dec_env = {"ATEN_CPU_CAPABILITY": decode_at} if decode_at else {}
    sash = _compress(root, ckpt, f"cap-{encode_at}.sash", **enc_env)
    out = root / f"cap-{encode_at}.wav"
    r = _cli("decompress", ["--checkpoint", str(ckpt), str(sash), str(out)], **dec_env)
    want = (encode_at or NATIVE).lower()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"decode with ATEN_CPU_CAPABILITY={want}" in r.stderr and not out.exists()
    # and doing what the line says decodes it exactly
    r = _cli("decompress", ["--checkpoint", str(ckpt), str(sash), str(out)], ATEN_CPU_CAPABILITY=want)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (root / "in.wav").read_bytes()


def test_the_batch_is_what_the_header_says(setup, tmp_path):
    """Invariant 1: groups of chunks are recorded, so a file coded in groups of 3 chunks decodes
    with the same groups whatever the decoder would choose itself."""
    from sashimi import codec
    root, ckpt = setup
    model, digest = codec.load_model(ckpt)
    report = codec.compress(ckpt, root / "in.wav", tmp_path / "g.sash", chunk_seconds=100 / RATE,
                            progress=False, say=lambda *a: None, group_chunks=3, loaded=(model, digest))
    header, streams = codec.read_container(tmp_path / "g.sash")
    assert header["group_chunks"] == 3 and len(streams) == 3 and report["frames"] == 700
    codec.decompress(ckpt, tmp_path / "g.sash", tmp_path / "g.wav", progress=False, say=lambda *a: None,
                     loaded=(model, digest))
    assert (tmp_path / "g.wav").read_bytes() == (root / "in.wav").read_bytes()
