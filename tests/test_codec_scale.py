"""The codec's memory does not grow with the duration: compress and decompress of 10 s and of
60 s peak at the same RSS (within 20%), and both round trips are exact. Each run is its own
process, so its peak is its own."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sashimi.train import main as train_main

RATE = 8000
ROOT = Path(__file__).resolve().parents[1]
PEAK = """
import resource, sys
from sashimi.{cmd} import main
rc = main(sys.argv[1:])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _peak_kb(cmd: str, args: list[str]) -> int:
    r = subprocess.run([sys.executable, "-c", PEAK.format(cmd=cmd), *args, "--quiet"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                             "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("maxrss_kb")[-1])


@pytest.mark.slow
def test_memory_is_flat_in_duration(tmp_path):
    assert train_main(["--steps", "1", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0",
                       "--val-every", "1000", "--device", "cpu", "--sample-rate", str(RATE), "--bits", "16",
                       "--quantization", "linear", "--head", "dml", "--out", str(tmp_path / "m")]) == 0
    ckpt = str(tmp_path / "m" / "checkpoint.pt")
    rng = np.random.default_rng(0)
    peaks = {}
    for seconds in (10, 60):
        t = np.arange(seconds * RATE) / RATE
        x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.shape)
        src = tmp_path / f"{seconds}.wav"
        sf.write(str(src), x.astype(np.float32), RATE, subtype="PCM_16")
        sash, out = tmp_path / f"{seconds}.sash", tmp_path / f"{seconds}.out.wav"
        peaks[seconds] = (_peak_kb("compress", ["--checkpoint", ckpt, str(src), str(sash), "--chunk-seconds", "0.25"]),
                          _peak_kb("decompress", ["--checkpoint", ckpt, str(sash), str(out)]))
        assert out.read_bytes() == src.read_bytes()
    for i, what in enumerate(("compress", "decompress")):
        short, long = peaks[10][i], peaks[60][i]
        assert long <= 1.2 * short, f"{what}: peak RSS {short} kB at 10 s, {long} kB at 60 s"
