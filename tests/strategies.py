"""Hypothesis strategies shared by the kernel tests."""
from __future__ import annotations

from hypothesis import strategies as st

EDGE_SIZES = [1, 2, 3, 5, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65]


def dims(max_value: int, min_value: int = 1) -> st.SearchStrategy[int]:
    """Sizes mixing the edges (1, primes, powers of two and their neighbours) with any integer."""
    edges = [s for s in EDGE_SIZES if min_value <= s <= max_value]
    return st.one_of(st.sampled_from(edges), st.integers(min_value, max_value))


def batch_shapes(max_dims: int = 2, max_size: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """Leading batch shapes: (), (3,), (2, 5), ..."""
    return st.lists(st.integers(1, max_size), min_size=0, max_size=max_dims).map(tuple)


seeds = st.integers(0, 2**31 - 1)
