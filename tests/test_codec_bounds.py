"""What a `.sash` file can make the decoder do is bounded by the file, not by the machine: its
claimed work (Chunking.work) must fit FREE_TOKENS + TOKENS_PER_BYTE x its stream bytes, each
group's token CRC is checked as soon as the group is decoded (the first bad group stops the
run), and the widest batch is capped. Crafted files of each kind are refused in one line within
10 CPU-seconds and 1 GiB (the address space beyond the loaded program), nothing written. Also: outputs
that cannot clobber each other, signals that leave nothing behind, and silence padded up to
the bound."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi import codec
from sashimi.codec import MAGIC
from sashimi.compress import main as compress_main
from sashimi.decompress import main as decompress_main
from sashimi.train import main as train_main

RATE = 8000
ROOT = Path(__file__).resolve().parents[1]
LIMITED = """
import resource, sys, time
import numpy, torch, constriction, soundfile
from sashimi.decompress import main
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30),) * 2)
def cpu():
    return sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
t0, c0 = time.perf_counter(), cpu()
rc = main(sys.argv[1:])
print(f"seconds {time.perf_counter() - t0:.2f} cpu {cpu() - c0:.2f}")
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    assert train_main(["--steps", "1", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0",
                       "--val-every", "1000", "--device", "cpu", "--sample-rate", str(RATE), "--bits", "16",
                       "--quantization", "linear", "--head", "dml", "--out", str(root / "m")]) == 0
    ckpt = root / "m" / "checkpoint.pt"
    rng = np.random.default_rng(0)
    sf.write(str(root / "in.wav"), (0.2 * rng.standard_normal((1200, 1))).astype(np.float32), RATE,
             subtype="PCM_16")
    assert compress_main(["--checkpoint", str(ckpt), str(root / "in.wav"), str(root / "x.sash"),
                          "--chunk-seconds", str(100 / RATE), "--jobs", "2", "--quiet"]) == 0
    return ckpt, root


def _parts(sash: Path):
    data = sash.read_bytes()
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    return json.loads(data[start:start + n]), data[start + n + 4:]


def _forge(header: dict, payload: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)) + payload


def _streams(payloads: list[bytes]) -> list[dict]:
    return [dict(bytes=len(p), crc32=zlib.crc32(p)) for p in payloads]


def _huge_claim(header, payload):
    return _forge({**header, "frames": 10**9, "chunk_frames": 10**9, "group_chunks": 1,
                   "group_tokens_crc32": [0], "streams": _streams([payload])}, payload)


def _at_the_bound(header, payload):
    """Garbage words claiming as much work as the bound allows, in one-row groups (the slowest
    per token): decoded to the end of its first group, then refused by that group's CRC."""
    words = np.random.default_rng(1).integers(0, 2**32, 64, dtype=np.uint32).tobytes()
    most = codec.FREE_TOKENS + codec.TOKENS_PER_BYTE * len(words)
    frames = most // codec.MIN_ROWS_CHARGED - 1
    return _forge({**header, "frames": frames, "chunk_frames": frames, "group_chunks": 1,
                   "group_tokens_crc32": [0], "streams": _streams([words])}, words)


def _many_groups(header, payload):
    """100,000 one-frame groups of 16 bytes each, every stream CRC valid."""
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 2**32, 4, dtype=np.uint32).tobytes() for _ in range(100_000)]
    return _forge({**header, "frames": 100_000, "chunk_frames": 1, "group_chunks": 1,
                   "group_tokens_crc32": [0] * 100_000, "streams": _streams(parts)}, b"".join(parts))


def _bad_first_crc(header, payload):
    crcs = list(header["group_tokens_crc32"])
    crcs[0] ^= 1
    return _forge({**header, "group_tokens_crc32": crcs}, payload)


def _wide_group(header, payload):
    return _forge({**header, "frames": 65536, "chunk_frames": 1, "group_chunks": 65536,
                   "group_tokens_crc32": [0]}, payload)


CRAFTED = {"huge claimed length": (_huge_claim, "claims"),
           "as much work as the bound allows": (_at_the_bound, "damaged"),
           "100,000 tiny groups": (_many_groups, "damaged"),
           "bad CRC in the first group": (_bad_first_crc, "chunks 1-"),
           "group_chunks 65536": (_wide_group, "'group_chunks' must be")}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_are_refused_within_10_s_and_1_gib(coded, tmp_path, case):
    ckpt, root = coded
    header, payload = _parts(root / "x.sash")
    assert len(header["streams"]) == 2           # the first group's CRC is met before the second's
    make, phrase = CRAFTED[case]
    bad = tmp_path / "bad.sash"
    bad.write_bytes(make(header, payload))
    out = tmp_path / "out.wav"
    r = subprocess.run([sys.executable, "-c", LIMITED, "--checkpoint", str(ckpt), str(bad), str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert phrase in r.stderr, r.stderr
    # CPU seconds (this command and its workers): the wall time of a loaded machine is not the
    # file's doing; the wall time is bounded too, loosely
    seconds, cpu = (float(v) for v in r.stdout.split("seconds")[-1].split("cpu"))
    assert cpu < 10 and seconds < 60, f"{case}: {cpu:.1f} CPU-s, {seconds:.1f} s wall"
    assert sorted(os.listdir(tmp_path)) == ["bad.sash"]       # nothing written, no temp left


def test_silence_is_padded_up_to_the_bound(coded, tmp_path, monkeypatch):
    """A file that codes below the bound gets zero words the decoder never reads; without them
    the decoder would refuse it."""
    ckpt, _ = coded
    monkeypatch.setattr(codec, "FREE_TOKENS", 0)
    src = tmp_path / "silence.wav"
    sf.write(str(src), np.zeros((4000, 1), dtype=np.int16), RATE, subtype="PCM_16")
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "s.sash"), "--jobs", "1",
                          "--quiet"]) == 0
    header, payload = _parts(tmp_path / "s.sash")
    chunks = codec.Chunking(header["frames"], header["chunk_frames"], header["group_chunks"])
    assert len(payload) * codec.TOKENS_PER_BYTE >= chunks.work(1) > 0
    assert decompress_main(["--checkpoint", str(ckpt), str(tmp_path / "s.sash"), str(tmp_path / "s.wav"),
                            "--quiet", "--jobs", "2"]) == 0
    assert (tmp_path / "s.wav").read_bytes() == src.read_bytes()


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, **kw)


def test_two_compresses_to_one_path_leave_one_file_and_one_refusal(coded, tmp_path):
    ckpt, root = coded
    rng = np.random.default_rng(5)
    inputs = []
    for i in range(2):
        inputs.append(tmp_path / f"in{i}.wav")
        sf.write(str(inputs[-1]), (0.1 * rng.standard_normal((3000, 1))).astype(np.float32), RATE,
                 subtype="PCM_16")
    out = tmp_path / "one.sash"
    runs = [_cli(["sashimi.compress", "--checkpoint", str(ckpt), str(src), str(out), "--quiet", "--jobs", "1"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for src in inputs]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refusal = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in refusal and len(refusal.strip().splitlines()) == 1 and "--overwrite" in refusal
    assert sorted(os.listdir(tmp_path)) == ["in0.wav", "in1.wav", "one.sash"]
    assert decompress_main(["--checkpoint", str(ckpt), str(out), str(tmp_path / "back.wav"), "--quiet"]) == 0
    winner = inputs[[rc for rc, _ in results].index(0)]
    assert (tmp_path / "back.wav").read_bytes() == winner.read_bytes()


@pytest.fixture(scope="module")
def long_file(coded):
    """40 s of audio and its .sash: long enough to be mid-coding when a signal comes."""
    ckpt, root = coded
    src = root / "long.wav"
    t = np.arange(40 * RATE) / RATE
    sf.write(str(src), (0.3 * np.sin(2 * np.pi * 220 * t))[:, None].astype(np.float32), RATE, subtype="PCM_16")
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(root / "long.sash"), "--quiet"]) == 0
    return src, root / "long.sash"


@pytest.mark.parametrize("command", ["compress", "decompress"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_is_one_line_its_exit_code_and_nothing_left(coded, long_file, tmp_path, command, sig):
    ckpt, _ = coded
    src, sash = long_file
    if command == "decompress":
        args = [str(sash), str(tmp_path / "out.wav")]
    else:
        args = [str(src), str(tmp_path / "out.sash")]
    before = sorted(os.listdir(tmp_path))
    err_path = tmp_path.parent / f"{tmp_path.name}.err"
    with open(err_path, "w") as err:
        p = _cli([f"sashimi.{command}", "--checkpoint", str(ckpt), *args], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while "coding" not in err_path.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)                       # the progress bar: it is coding now
        time.sleep(0.5)
        p.send_signal(sig)
        rc = p.wait(timeout=120)
    text = err_path.read_text()
    assert rc == 128 + sig, text
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].split("\r")[-1] == \
        f"{command}: stopped by {signal.Signals(sig).name}; nothing was written", text
    assert sorted(os.listdir(tmp_path)) == before            # no output, no temp file


def test_flac_is_measured_only_for_a_report(coded, tmp_path, capsys):
    ckpt, root = coded
    src = root / "in.wav"
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "a.sash"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "flac -8" not in out and "FLAC" not in out
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "b.sash"), "--quiet",
                          "--report", str(tmp_path / "r.json")]) == 0
    assert "flac" in capsys.readouterr().out.lower()
    assert "flac_bytes" in json.loads((tmp_path / "r.json").read_text())[0]
    assert compress_main(["--checkpoint", str(ckpt), str(src), str(tmp_path / "c.sash"), "--quiet", "--no-flac",
                          "--report", str(tmp_path / "s.json")]) == 0
    assert "flac_bytes" not in json.loads((tmp_path / "s.json").read_text())[0]


def test_full_range_noise_costs_at_most_bits_plus_10(coded, tmp_path):
    """The coded distribution is the model's mixed with a uniform one, so an (untrained) model's
    confident misses cost at most 16 + 10 bits a sample, and the reported cost of the model's
    probabilities is what the stream spends."""
    ckpt, _ = coded
    src = tmp_path / "noise.wav"
    rng = np.random.default_rng(3)
    sf.write(str(src), rng.integers(-32768, 32768, (3000, 1)).astype(np.int16), RATE, subtype="PCM_16")
    report = codec.compress(ckpt, src, tmp_path / "n.sash", progress=False, say=lambda *a: None)
    assert report["payload_bits_per_sample"] <= 16 + 10 + 0.1, report
    assert abs(report["nll_bits_per_sample"] - report["payload_bits_per_sample"]) < 0.1, report


def test_format_2_still_decodes(coded, tmp_path):
    """A file of format 2 (64-symbol stages, every edge evaluated, a CRC per chunk) decodes."""
    ckpt, root = coded
    model, digest = codec.load_model(ckpt)
    x = sf.read(str(root / "in.wav"), dtype="float32", always_2d=True)[0]
    tokens = codec.quantized(model.cfg.quantizer, torch.from_numpy(x))
    chunks = codec.Chunking(len(tokens), 100, 5)
    zero = model.cfg.quantizer.zero_token
    payloads = [codec.encode_group(model, *codec._group_frames(tokens, chunks, g, zero), version=2)[0]
                .astype("<u4").tobytes() for g in chunks.groups()]
    header = dict(format_version=2, checkpoint_sha256=digest, sample_rate=RATE, channels=1, bits=16,
                  quantization="linear", frames=chunks.frames, chunk_frames=100, group_chunks=5,
                  streams=_streams(payloads), **codec.arithmetic(torch.device("cpu")),
                  chunk_tokens_crc32=[codec.token_crc(tokens[i * 100:(i + 1) * 100]) for i in range(chunks.count)])
    (tmp_path / "v2.sash").write_bytes(_forge(header, b"".join(payloads)))
    assert decompress_main(["--checkpoint", str(ckpt), str(tmp_path / "v2.sash"), str(tmp_path / "v2.wav"),
                            "--quiet"]) == 0
    assert (tmp_path / "v2.wav").read_bytes() == (root / "in.wav").read_bytes()
