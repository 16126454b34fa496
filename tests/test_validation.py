"""Validation you can trust: a held-out folder (--val-data) is validated whole, and
the trainer reports the standard error of its validation mean."""
import numpy as np
import soundfile as sf

from sashimi.data import AudioCrops
from sashimi.quantize import Quantizer


def test_whole_folder_is_one_split(tmp_path):
    for i in range(6):
        sf.write(str(tmp_path / f"f{i}.wav"), np.random.default_rng(i).uniform(-0.5, 0.5, (900, 2)), 8000)
    kw = dict(sample_rate=8000, channels=2, crop_frames=100, quantizer=Quantizer("mu-law", 8), valid_crops=12)
    split = AudioCrops(tmp_path, split="valid", **kw)
    assert len({r[0] for r in split.regions}) == 1                 # round(0.1 * 6): one file held out
    whole = AudioCrops(tmp_path, split="valid", whole=True, **kw)
    assert sorted(r[0] for r in whole.regions) == list(range(6)) and len(whole) == 12
    assert {whole.crop_position(i)[0] for i in range(12)} == set(range(6))   # crops spread over all files
    train = AudioCrops(tmp_path, split="train", whole=True, **kw)
    assert sorted(r[0] for r in train.regions) == list(range(6))
    assert AudioCrops(None, sample_rate=8000, channels=2, crop_frames=100, quantizer=kw["quantizer"],
                      split="valid").valid_crops == 256
