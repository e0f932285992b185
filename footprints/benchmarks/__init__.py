"""`footprints bench NAME`: each benchmark prints figures and ends with one JSON line (the result).

Benchmarks measure; they assert nothing (performance targets live here, not in timed unit tests). They may
use any stage or module; nothing imports them but the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import FootprintsError

BENCHMARKS: dict[str, str] = {
    "tile": "footprints.benchmarks.tile:bench_tile",
    "head": "footprints.benchmarks.head:bench_head",
    "vectorize": "footprints.benchmarks.vectorize:bench_vectorize",
    "predict": "footprints.benchmarks.predict:bench_predict",
    "loader": "footprints.benchmarks.loader:bench_loader",
    "features": "footprints.benchmarks.features:bench_features",
}


def run_benchmark(name: str, cfg: Any) -> dict[str, Any]:
    """Run benchmark `name`; returns the dict the CLI prints as the last line of output."""
    if name not in BENCHMARKS:
        raise FootprintsError(f"bench: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    module, func = BENCHMARKS[name].split(":")
    result = getattr(importlib.import_module(module), func)(cfg)
    return {"bench": name, **{k: v for k, v in result.items() if k != "bench"}}
