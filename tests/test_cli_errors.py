"""Every user mistake on `sashimi.train` and `sashimi.generate` is one line on stderr, exit code 2,
no traceback, and nothing is done first (no checkpoint, no log, no WAV). One table per command."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi import checkpoint
from sashimi.generate import main as generate_main
from sashimi.train import RunLock, main as train_main

FAST = ["--seq-len", "64", "--batch-size", "2", "--num-workers", "0", "--val-every", "1000", "--device", "cpu"]


@dataclasses.dataclass
class Ctx:
    tmp: Path
    run: Path          # a finished 2-step stereo run (shared, read-only)

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoint.pt"

    def forged_run(self, edit) -> Path:
        """A copy of the run whose checkpoint was edited by edit(payload) (hash recomputed)."""
        out = self.tmp / "forged"
        out.mkdir(exist_ok=True)
        payload = checkpoint.load(self.ckpt)
        edit(payload)
        payload = {k: v for k, v in payload.items() if k not in ("sha256",)}
        payload["sha256"] = checkpoint.content_hash(payload)
        torch.save(payload, out / "checkpoint.pt")
        return out

    def a_file(self) -> Path:
        path = self.tmp / "a_file"
        path.write_text("x")
        return path

    def nan_prompt(self) -> Path:
        x = np.zeros((1600, 2), dtype=np.float32)
        x[100:200] = np.nan
        path = self.tmp / "nan.wav"
        sf.write(str(path), x, 16000, subtype="FLOAT")
        return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert train_main(["--stereo", "--steps", "2", *FAST, "--out", str(out)]) == 0
    return out


@pytest.fixture
def ctx(tmp_path, finished_run) -> Ctx:
    return Ctx(tmp_path, finished_run)


def _new(c: Ctx, *flags):
    return ["--stereo", "--steps", "2", *FAST, "--out", str(c.tmp / "new"), *flags]


def _resume(out_of, *flags):
    return lambda c: ["--steps", "4", *FAST, "--out", str(out_of(c)), "--resume", *flags]


TRAIN_ROWS = [
    # (id, argv from ctx, expected part of the one line)
    ("out-is-a-file", lambda c: ["--steps", "2", *FAST, "--out", str(c.a_file())], "is a file"),
    ("out-unwritable", lambda c: ["--steps", "2", *FAST, "--out", str(c.a_file() / "sub")], "cannot create"),
    ("seq-len-0", lambda c: _new(c, "--seq-len", "0"), "--seq-len must be >= 1"),
    ("seq-len-negative", lambda c: _new(c, "--seq-len", "-8"), "--seq-len must be >= 1"),
    ("sample-rate-0", lambda c: _new(c, "--sample-rate", "0"), "--sample-rate must be >= 1"),
    ("n-mixtures-0", lambda c: _new(c, "--head", "dml", "--n-mixtures", "0"), "--n-mixtures must be >= 1"),
    ("n-mixtures-negative", lambda c: _new(c, "--n-mixtures", "-3"), "--n-mixtures must be >= 1"),
    ("seed-negative", lambda c: _new(c, "--seed", "-1"), "--seed must be in [0,"),
    ("num-workers-negative", lambda c: _new(c, "--num-workers", "-1"), "--num-workers must be >= 0"),
    ("sample-every-negative", lambda c: _new(c, "--sample-every", "-1"), "--sample-every must be >= 0"),
    ("sample-seconds-0", lambda c: _new(c, "--sample-seconds", "0"), "--sample-seconds must be"),
    ("sample-seconds-negative", lambda c: _new(c, "--sample-seconds", "-1"), "--sample-seconds must be"),
    ("lr-nan", lambda c: _new(c, "--lr", "nan"), "--lr must be"),
    ("device-mps", lambda c: _new(c, "--device", "mps"), "runs on cpu or cuda"),
    ("device-unknown", lambda c: _new(c, "--device", "foo"), "unknown device"),
    ("batch-too-big", lambda c: _new(c, "--batch-size", "1000000000"), "needs at least"),
    ("resume-nothing", lambda c: ["--steps", "2", *FAST, "--out", str(c.tmp / "empty"), "--resume"], "no checkpoint"),
    ("resume-missing-model-config", _resume(lambda c: c.forged_run(lambda p: p.pop("model_config"))), "model_config"),
    ("resume-missing-rng", _resume(lambda c: c.forged_run(lambda p: p.pop("rng"))), "rng"),
    ("resume-negative-step", _resume(lambda c: c.forged_run(lambda p: p.update(step=-3))), "invalid step -3"),
    ("resume-unknown-train-key", _resume(lambda c: c.forged_run(lambda p: p["train_config"].update(turbo=1))),
     "unknown train_config keys ['turbo']"),
    ("resume-string-version", _resume(lambda c: c.forged_run(lambda p: p.update(format_version="2"))),
     "format version '2'"),
    ("resume-other-data", _resume(lambda c: c.run, "--data", "/tmp"), "--data"),
    ("resume-other-seed", _resume(lambda c: c.run, "--seed", "5"), "--seed 5 (the run used 0)"),
    ("resume-other-batch", _resume(lambda c: c.run, "--batch-size", "3"), "--batch-size 3 (the run used 2)"),
    ("resume-fewer-steps", lambda c: ["--steps", "1", *FAST, "--out", str(c.run), "--resume"], "already at step 2"),
    ("resume-other-model", _resume(lambda c: c.run, "--bits", "16"), "differ from the checkpoint"),
    ("resume-other-layout", _resume(lambda c: c.run, "--stereo-layout", "frames"),
     "stereo_layout='frames' (checkpoint: 'interleave')"),
    ("frames-mono", lambda c: ["--steps", "2", *FAST, "--out", str(c.tmp / "new"), "--stereo-layout", "frames"],
     "needs stereo"),
    ("frames-tied", lambda c: _new(c, "--stereo-layout", "frames", "--tie-weights"), "interleave layout"),
    # bounded from above, finite, non-empty
    ("seed-2**70", lambda c: _new(c, "--seed", str(2 ** 70)), "--seed must be in [0,"),
    ("data-empty", lambda c: _new(c, "--data", ""), "--data must not be empty"),
    ("val-data-empty", lambda c: _new(c, "--val-data", ""), "--val-data must not be empty"),
    ("out-empty", lambda c: ["--steps", "2", *FAST, "--out", ""], "--out must not be empty"),
    ("lr-inf", lambda c: _new(c, "--lr", "inf"), "--lr must be a finite number"),
    ("sample-seconds-nan", lambda c: _new(c, "--sample-seconds", "nan"), "--sample-seconds must be a finite"),
    ("sample-seconds-below-one-sample", lambda c: _new(c, "--sample-every", "1", "--sample-seconds", "1e-6"),
     "less than one sample"),
    ("val-crops-1e7", lambda c: _new(c, "--val-crops", "10000000"), "--val-crops must be <="),
    ("val-crops-0", lambda c: _new(c, "--val-crops", "0"), "--val-crops must be >= 1"),
    ("threads-100000", lambda c: _new(c, "--threads", "100000"), "--threads must be <="),
    ("threads-0", lambda c: _new(c, "--threads", "0"), "--threads must be >= 1"),
    ("num-workers-1000", lambda c: _new(c, "--num-workers", "1000"), "--num-workers must be <="),
    ("n-mixtures-1e6", lambda c: _new(c, "--head", "dml", "--n-mixtures", "1000000"), "n_mixtures must be an integer in"),
    ("sample-rate-1e9", lambda c: _new(c, "--sample-rate", "1000000000"), "sample_rate must be an integer in"),
    ("seq-len-2**31", lambda c: _new(c, "--seq-len", str(2 ** 31)), "seq_len must be an integer in"),
    ("resume-forged-train-config", _resume(lambda c: c.forged_run(lambda p: p["train_config"].update(steps="9"))),
     "unusable train_config: steps='9'"),
    ("resume-mismatched-weights", _resume(lambda c: c.forged_run(lambda p: p["model"].pop("embedding.weight"))),
     "missing embedding.weight"),
]


def _check_one_line(capsys, rc, expected):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_train_mistakes(ctx, capsys, row):
    _, argv, expected = row
    before = sorted(p.name for p in ctx.run.iterdir())
    rc = train_main(argv(ctx))
    _check_one_line(capsys, rc, expected)
    assert not (ctx.tmp / "new" / "checkpoint.pt").exists() and not (ctx.tmp / "new" / "log.csv").exists()
    assert sorted(p.name for p in ctx.run.iterdir()) == before  # the finished run is untouched


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # what a live run holds
        rc = train_main(["--steps", "2", *FAST, "--out", str(out)])
    _check_one_line(capsys, rc, "another training run")
    assert not (out / "log.csv").exists()
    assert train_main(["--steps", "1", *FAST, "--out", str(out)]) == 0  # released: a dead run leaves no lock


def test_sixteen_bit_categorical_warns(tmp_path, capsys):
    rc = train_main(["--bits", "16", "--head", "categorical", "--steps", "1", *FAST, "--seq-len", "16",
                     "--out", str(tmp_path / "run")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "65,536-way softmax" in err and "--head dml" in err


GENERATE_ROWS = [
    ("out-is-a-file", lambda c: ["--out", str(c.a_file())], "is a file"),
    ("out-unwritable", lambda c: ["--out", str(c.a_file() / "sub")], "cannot create"),
    ("device-unknown", lambda c: ["--device", "foo"], "unknown device"),
    ("seconds-nan", lambda c: ["--seconds", "nan"], "--seconds must be"),
    ("seconds-inf", lambda c: ["--seconds", "inf"], "--seconds must be"),
    ("seconds-below-one-sample", lambda c: ["--seconds", "0.00001"], "less than one sample"),
    ("temperature-nan", lambda c: ["--temperature", "nan"], "--temperature must be"),
    ("temperature-inf", lambda c: ["--temperature", "inf"], "--temperature must be"),
    ("top-p-nan", lambda c: ["--top-p", "nan"], "--top-p must be"),
    ("batch-too-big", lambda c: ["--batch", "10000000000"], "--batch must be <="),
    ("prompt-missing", lambda c: ["--prompt", str(c.tmp / "nope.wav")], "not found"),
    ("prompt-nan", lambda c: ["--prompt", str(c.nan_prompt())], "NaN"),
    ("checkpoint-missing", lambda c: ["--checkpoint", str(c.tmp / "nope.pt")], "not found"),
    ("checkpoint-empty", lambda c: ["--checkpoint", ""], "--checkpoint must not be empty"),
    ("checkpoint-folder", lambda c: ["--checkpoint", str(c.tmp)], "is a folder"),
    ("prompt-empty", lambda c: ["--prompt", ""], "--prompt must not be empty"),
    ("prompt-folder", lambda c: ["--prompt", str(c.tmp)], "is a folder"),
    ("out-empty", lambda c: ["--out", ""], "--out must not be empty"),
    ("seed-2**70", lambda c: ["--seed", str(2 ** 70)], "--seed must be in [0,"),
    ("seed-negative", lambda c: ["--seed", "-1"], "--seed must be in [0,"),
    ("batch-200000", lambda c: ["--batch", "200000"], "--batch must be <="),
    ("seconds-1e300", lambda c: ["--seconds", "1e300"], "needs at least"),
]


@pytest.mark.parametrize("row", GENERATE_ROWS, ids=[r[0] for r in GENERATE_ROWS])
def test_generate_mistakes(ctx, capsys, row):
    _, argv, expected = row
    extra = argv(ctx)
    base = ["--checkpoint", str(ctx.ckpt), "--device", "cpu", "--seconds", "0.01", "--out", str(ctx.tmp / "wavs")]
    rc = generate_main(base + extra)
    _check_one_line(capsys, rc, expected)
    assert not list(ctx.tmp.rglob("*.wav")) or "prompt-nan" in row[0]
    assert not (ctx.tmp / "wavs").exists() or not list((ctx.tmp / "wavs").iterdir())


EVALUATE_ROWS = [
    ("seconds-nan", ["--seconds", "nan"], "--seconds must be a finite number"),
    ("seconds-inf", ["--seconds", "inf"], "--seconds must be a finite number"),
    ("seconds-1e7", ["--seconds", "1e7"], "--seconds must be <="),
    ("seconds-negative", ["--seconds", "-1"], "--seconds and --offset must be >= 0"),
    ("offset-nan", ["--offset", "nan"], "--offset must be a finite number"),
    ("excerpts-per-file-1e9", ["--excerpts-per-file", "1000000000"], "--excerpts-per-file must be <="),
    ("clips-1e6", ["--clips", "1000000"], "--clips must be <="),
    ("block-0", ["--block", "0"], ">= 1"),
    ("data-empty", ["--data", ""], "--data must not be empty"),
    ("out-empty", ["--out", ""], "--out must not be empty"),
    ("memory", ["--seconds", "86400", "--clips", "100000"], "needs at least"),
]


@pytest.mark.parametrize("row", EVALUATE_ROWS, ids=[r[0] for r in EVALUATE_ROWS])
def test_evaluate_mistakes(ctx, capsys, row):
    from sashimi.evaluate import main as evaluate_main
    _, extra, expected = row
    rc = evaluate_main(["--checkpoint", str(ctx.ckpt), "--device", "cpu", "--quiet", "--out", str(ctx.tmp / "eval"),
                        *extra])
    _check_one_line(capsys, rc, expected)
    assert not (ctx.tmp / "eval" / "summary.json").exists()


def test_resume_compares_data_by_resolved_path_and_val_data_equal_to_data_warns(tmp_path, monkeypatch, capsys):
    """The same relative --data from another folder is other audio: refused. --val-data equal
    to --data validates on training audio: a warning."""
    for where in ("a", "b"):
        audio = tmp_path / where / "audio"
        audio.mkdir(parents=True)
        rng = np.random.default_rng(len(where) + ord(where))
        for i in range(6):
            sf.write(str(audio / f"{i}.wav"), 0.1 * rng.standard_normal((4000, 2)).astype(np.float32), 16000)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    assert train_main(["--stereo", "--data", "audio", "--val-data", "audio", "--steps", "1", *FAST,
                       "--out", str(run)]) == 0
    assert "--val-data is --data" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "b")
    rc = train_main(["--stereo", "--data", "audio", "--val-data", "audio", "--steps", "2", *FAST,
                     "--out", str(run), "--resume"])
    _check_one_line(capsys, rc, "cannot change mid-run: --data")


def test_generate_never_overwrites_without_asking(ctx, capsys):
    out = ctx.tmp / "wavs"
    args = ["--checkpoint", str(ctx.ckpt), "--device", "cpu", "--seconds", "0.005", "--out", str(out)]
    assert generate_main(args) == 0
    first = (out / "sample_seed0_000.wav").read_bytes()
    assert generate_main(args + ["--temperature", "0.5"]) == 0
    assert (out / "sample_seed0_000.wav").read_bytes() == first
    assert (out / "sample_seed0_000_2.wav").exists()
    assert generate_main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_seed0_000.wav", "sample_seed0_000_2.wav"]
