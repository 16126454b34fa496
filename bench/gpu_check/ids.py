"""The headline figures' sizes and names (no torch import: the orchestrator uses them).

Where bench/ holds the same benchmark at the same size, the headline figure carries that
benchmark's pytest node id, so bench.json compares with a full `pytest bench` run and the bench
stage deselects it instead of measuring it twice; the dry run checks every id is still collected.
"""
from __future__ import annotations

KERNEL_SIZE = dict(B=1024, L=16384)            # N/2 = 32 conjugate pairs
TRAIN_SHAPES = {"mono": (8, 16384, 1), "stereo": (4, 16384, 2)}     # B, L frames, C
GEN_BATCHES = (1, 256)
CHANNELS = ("mono", "stereo")


def kernel_id(op: str, direction: str, provider: str) -> str:
    return f"bench/test_{op}.py::test_bench_{op}[{provider}-B{KERNEL_SIZE['B']}-L{KERNEL_SIZE['L']}-{direction}]"


def train_shape_id(preset: str, ch: str, B: int, L: int, C: int) -> str:
    return f"{preset}-{ch}-B{B}-L{L}" + (f"-C{C}" if C == 2 else "")


def train_id(ch: str, precision: str) -> str:
    B, L, C = TRAIN_SHAPES[ch]
    return f"bench/test_train_step.py::test_bench_train_step_fwdbwd[triton-{train_shape_id('paper', ch, B, L, C)}-{precision}]"


def generation_id(provider: str, ch: str, batch: int) -> str:
    return f"bench/test_generation.py::test_bench_generation_fwd[{provider}-paper-{ch}-B{batch}]"


def headline_bench_ids() -> list[str]:
    return ([kernel_id(op, d, p) for op in ("cauchy", "vandermonde") for d in ("fwd", "fwdbwd")
             for p in ("triton", "reference")]
            + [train_id(ch, prec) for ch in TRAIN_SHAPES for prec in ("fp32", "bf16")]
            + [generation_id(p, ch, b) for ch in CHANNELS for b in GEN_BATCHES for p in ("graphs", "eager")])
