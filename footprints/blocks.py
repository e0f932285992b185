"""Bounded-memory raster work: the one block iterator used by inference, vectorising and scoring."""

from __future__ import annotations

from collections.abc import Iterator

from rasterio.windows import Window


def iter_blocks(width: int, height: int, block_size: int) -> Iterator[Window]:
    """Row-major blocks of at most `block_size` x `block_size` pixels covering a width x height raster."""
    block_size = max(1, int(block_size))
    for r in range(0, height, block_size):
        for c in range(0, width, block_size):
            yield Window(c, r, min(block_size, width - c), min(block_size, height - r))
