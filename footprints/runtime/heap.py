"""Peak memory that does not creep up with the number of steps or scenes a process works through.

glibc's malloc serves large blocks from its heap once it has seen a few of them freed (its mmap threshold
rises dynamically up to 32 MB), and a heap fragmented by tensors of varying sizes grows its high-water mark
step after step: without a fixed threshold, train-segmenter's peak resident memory keeps rising with the
number of training steps. A fixed threshold keeps blocks of 1 MB and more as their own memory maps,
returned to the system when freed, and the peak stays nearly flat.

The price is CPU time (each large block is mapped and zeroed afresh): train-classifier and train-segmenter's
steps run slower than with glibc's dynamic threshold; a 4 MB threshold (with a 256 MB trim threshold) lies
between the two on both counts. A user who prefers speed sets `MALLOC_MMAP_THRESHOLD_` (e.g. 33554432),
which wins.

To measure: run a stage (e.g. `footprints train-segmenter --config configs/demo.yaml --set
segmenter.max_steps_per_epoch=4`, then 12) under `/usr/bin/time -v` (its "Maximum resident set size" and
elapsed time), once as it is and once with `MALLOC_MMAP_THRESHOLD_=33554432` (the dynamic threshold's
ceiling, fixed) in the environment; `footprints bench scale` prints each stage's peak resident memory.
configs/xview2.md keeps the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large or larger get their own mapping
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold in this process (mallopt) and in the processes it starts (the
    `MALLOC_MMAP_THRESHOLD_` environment variable: dask workers, data-loader workers, srun tasks). A user's
    own setting of that variable wins. Returns whether this process's allocator took it (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    try:
        threshold = int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except ValueError:  # the user's own unparsable setting: glibc ignores it, and so do we
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
