"""Bounded-memory raster work: the one block iterator used by inference, vectorising and scoring, and the
read-ahead that overlaps reading the next item with work on the current one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rasterio.windows import Window


def iter_blocks(width: int, height: int, block_size: int) -> Iterator[Window]:
    """Row-major blocks of at most `block_size` x `block_size` pixels covering a width x height raster."""
    block_size = max(1, int(block_size))
    for r in range(0, height, block_size):
        for c in range(0, width, block_size):
            yield Window(c, r, min(block_size, width - c), min(block_size, height - r))


def prefetched(items: list[Any], produce: Callable[[Any], Any], depth: int, threaded: bool = True,
               name: str = "read-ahead") -> Iterator[Any]:
    """`produce(item)` for each item, in order, in one background thread, `depth` items ahead of the one
    consumed (`threaded=False`: in line, one at a time, for CPU runs where a helper thread would compete with
    torch's own threads for the cores). Close the generator (`contextlib.closing`) to stop early."""
    if not threaded:
        for item in items:
            yield produce(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(produce, item))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
