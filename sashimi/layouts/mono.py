"""Mono: one channel, one token per position (the interleave layout with C = 1)."""
from __future__ import annotations

from sashimi.layouts.interleave import Interleave


class Mono(Interleave):
    name = "mono"

    @property
    def channel_names(self) -> list[str]:
        return ["mono"]
