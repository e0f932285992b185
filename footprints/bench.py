"""`footprints bench NAME`: each benchmark lives beside the code it measures; this maps names to them."""

from __future__ import annotations

import importlib
from typing import Any

from .config import Config
from .errors import FootprintsError

BENCHMARKS: dict[str, str] = {
    "tile": "footprints.tiling:bench_tile",
    "head": "footprints.head:bench_head",
    "vectorize": "footprints.vectorize:bench_vectorize",
    "predict": "footprints.predict:bench_predict",
}


def run_benchmark(name: str, cfg: Config) -> dict[str, Any]:
    """Run benchmark `name`; returns the dict the CLI prints as the last line of output."""
    if name not in BENCHMARKS:
        raise FootprintsError(f"bench: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    module, func = BENCHMARKS[name].split(":")
    result = getattr(importlib.import_module(module), func)(cfg)
    return {"bench": name, **{k: v for k, v in result.items() if k != "bench"}}
