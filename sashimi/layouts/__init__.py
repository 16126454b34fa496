"""Stereo layouts: how audio frames become the backbone's positions (see `base.Layout`).

`ModelConfig.stereo_layout` names one of `LAYOUTS` (a mono model is always `Mono`). A new
layout is one module with a `Layout` subclass, registered here.
"""
from __future__ import annotations

from sashimi.layouts.base import Layout
from sashimi.layouts.frames import Frames
from sashimi.layouts.interleave import Interleave
from sashimi.layouts.midside import MidSide
from sashimi.layouts.mono import Mono

LAYOUTS: dict[str, type[Layout]] = {cls.name: cls for cls in (Interleave, Frames, MidSide)}

__all__ = ["LAYOUTS", "Layout", "layout_class", "layout_for"]


def layout_class(cfg) -> type[Layout] | None:
    """The layout class of a config (None for an unknown stereo_layout name)."""
    if cfg.channels == 1 and cfg.stereo_layout == "interleave":
        return Mono
    return LAYOUTS.get(cfg.stereo_layout)


def layout_for(cfg) -> Layout:
    return layout_class(cfg)(cfg)
