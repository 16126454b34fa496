"""Predictors: the value that a value-input model's heads are anchored on (`base.Predictor`).

`ModelConfig.predictor` names one of `PREDICTORS`. A new predictor is one module here with a
`Predictor` subclass, registered below, and its test.
"""
from __future__ import annotations

from sashimi.predictors.base import Predictor
from sashimi.predictors.cascade import Cascade
from sashimi.predictors.fixed2 import Fixed2

PREDICTORS: dict[str, type[Predictor]] = {cls.name: cls for cls in (Fixed2, Cascade)}

__all__ = ["PREDICTORS", "Predictor"]
