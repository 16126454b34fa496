"""Hostile and broken `.sash` files and outputs: each is one line, a non-zero exit and nothing
written, before anything is allocated from the header (the CRCs guard against damage, not
against a crafted file, so the header is also checked against its schema)."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sashimi.codec import MAGIC, read_container
from sashimi.compress import main as compress_main
from sashimi.decompress import main as decompress_main
from sashimi.train import main as train_main

RATE = 8000


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("container")
    assert train_main(["--steps", "1", "--seq-len", "64", "--batch-size", "2", "--num-workers", "0",
                       "--val-every", "1000", "--device", "cpu", "--sample-rate", str(RATE), "--bits", "16",
                       "--quantization", "linear", "--head", "dml", "--out", str(root / "m")]) == 0
    ckpt = root / "m" / "checkpoint.pt"
    rng = np.random.default_rng(0)
    sf.write(str(root / "in.wav"), (0.2 * rng.standard_normal((300, 1))).astype(np.float32), RATE,
             subtype="PCM_16")
    assert compress_main(["--checkpoint", str(ckpt), str(root / "in.wav"), str(root / "x.sash"),
                          "--chunk-seconds", str(100 / RATE), "--jobs", "1", "--quiet"]) == 0
    return ckpt, root / "x.sash"


def _parts(sash: Path):
    data = sash.read_bytes()
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    return json.loads(data[start:start + n]), data[start + n + 4:]


def _forge(header, payload: bytes) -> bytes:
    """A file whose header CRC is right: what anyone can make."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)) + payload


def _edit(**fields):
    def make(header, payload):
        return _forge({**header, **fields}, payload)
    return make


def _drop(name):
    def make(header, payload):
        return _forge({k: v for k, v in header.items() if k != name}, payload)
    return make


CASES = {
    # name: (how to make the file from (header, payload), a phrase the message holds)
    "frames 1e12 in one chunk": (_edit(frames=10**12, chunk_frames=10**12, group_tokens_crc32=[0]), "claims"),
    "frames 1e9 in its chunks": (_edit(frames=10**9), "claims"),
    "frames without its chunks": (_edit(frames=600), "CRCs but its frames"),
    "group_chunks 65536": (_edit(group_chunks=65536), "'group_chunks' must be"),
    "frames as a float": (_edit(frames=300.0), "'frames' must be"),
    "frames negative": (_edit(frames=-5), "'frames' must be"),
    "frames a string": (_edit(frames="300"), "'frames' must be"),
    "chunk_frames zero": (_edit(chunk_frames=0), "'chunk_frames' must be"),
    "group_chunks zero": (_edit(group_chunks=0), "'group_chunks' must be"),
    "channels 3": (_edit(channels=3), "'channels' must be"),
    "channels true": (_edit(channels=True), "'channels' must be"),
    "bits 12": (_edit(bits=12), "'bits' must be"),
    "quantisation a-law": (_edit(quantization="a-law"), "'quantization' must be"),
    "sample rate 0": (_edit(sample_rate=0), "'sample_rate' must be"),
    "sha not hex": (_edit(checkpoint_sha256="z" * 64), "'checkpoint_sha256' must be"),
    "streams not a list": (_edit(streams={"bytes": 4}), "'streams' must be"),
    "stream bytes negative": (_edit(streams=[{"bytes": -4, "crc32": 0}]), "'streams' must be"),
    "stream bytes beyond the file": (_edit(streams=[{"bytes": 4096, "crc32": 0}]), "file holds"),
    "two streams for one group": (lambda h, p: _forge({**h, "streams": h["streams"] + [{"bytes": 0, "crc32": 0}]}, p),
                                  "streams for"),
    "crc list of strings": (_edit(group_tokens_crc32=["a", "b", "c"]), "'group_tokens_crc32' must be"),
    "no frames": (_drop("frames"), "has no 'frames'"),
    "unknown field": (_edit(extra=1), "unknown header fields"),
    "format 1": (_edit(format_version=1), "format version 1"),
    "format a string": (_edit(format_version="3"), "format version '3'"),
    "header a list": (lambda h, p: _forge(b"[1, 2]", p), "not a JSON object"),
    "header not JSON": (lambda h, p: _forge(b"{nope", p), "not valid JSON"),
    "header not UTF-8": (lambda h, p: _forge(b"\xff\xfe{}", p), "not valid JSON"),
    "header deeply nested": (lambda h, p: _forge(b"[" * 100000 + b"]" * 100000, p), "not valid JSON"),
    "header length beyond the file": (lambda h, p: MAGIC + struct.pack("<I", 2**31) + b"{}", "truncated"),
    "header CRC wrong": (lambda h, p: _forge(h, p)[:-len(p) - 4] + b"\0\0\0\0" + p, "damaged"),
    "trailing bytes": (lambda h, p: _forge(h, p + b"\0\0\0\0"), "file holds"),
    "stream flipped": (lambda h, p: _forge(h, bytes([p[0] ^ 1]) + p[1:]), "stream 1 of 1 is damaged"),
    "no magic": (lambda h, p: b"RIFF" + _forge(h, p)[4:], "not a sashimi-compressed file"),
    "empty": (lambda h, p: b"", "not a sashimi-compressed file"),
    "magic only": (lambda h, p: MAGIC, "truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_headers_are_one_line(tmp_path, coded, capsys, case):
    ckpt, sash = coded
    header, payload = _parts(sash)
    make, phrase = CASES[case]
    bad = tmp_path / "bad.sash"
    bad.write_bytes(make(header, payload))
    out = tmp_path / "out.wav"
    rc = decompress_main(["--checkpoint", str(ckpt), str(bad), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert phrase in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.sash"]   # nothing written, no temp left


def test_the_good_file_still_reads(coded):
    header, streams = read_container(coded[1])
    assert header["frames"] == 300 and len(streams) == 1


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "folder"])
def test_non_regular_inputs_are_refused(tmp_path, coded, capsys, what):
    ckpt, _ = coded
    if what == "fifo":
        src = tmp_path / "pipe.sash"
        os.mkfifo(src)
    elif what == "dev-zero":
        src = Path("/dev/zero")
    else:
        src = tmp_path / "dir.sash"
        src.mkdir()
    for main, args in ((decompress_main, [str(src), str(tmp_path / "o.wav")]),
                       (compress_main, [str(src) if what != "folder" else str(tmp_path / "missing.wav"),
                                        str(tmp_path / "o.sash")])):
        rc = main(["--checkpoint", str(ckpt), *args, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # the checkpoint path too
    rc = decompress_main(["--checkpoint", str(src), str(coded[1]), str(tmp_path / "o.wav"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.wav").exists() and not (tmp_path / "o.sash").exists()


def test_a_missing_output_folder_is_made(tmp_path, coded):
    ckpt, sash = coded
    out = tmp_path / "no" / "such" / "out.wav"
    assert decompress_main(["--checkpoint", str(ckpt), str(sash), str(out), "--quiet"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("where", ["folder", "parent is a file"])
def test_bad_outputs_are_one_line_and_leave_nothing(tmp_path, coded, capsys, where):
    ckpt, sash = coded
    if where == "folder":
        out = tmp_path / "out.wav"
        out.mkdir()
    elif where == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out.wav"
    rc = decompress_main(["--checkpoint", str(ckpt), str(sash), str(out), "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
