"""`footprints bench NAME`: each benchmark prints figures and ends with one JSON line (the result).

Benchmarks measure; they assert nothing (performance targets live here, not in timed unit tests). They may
use any stage or module; nothing imports them but the CLI.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

from ..errors import FootprintsError

BENCHMARKS: dict[str, str] = {
    "tile": "footprints.benchmarks.tile:bench_tile",
    "head": "footprints.benchmarks.head:bench_head",
    "vectorize": "footprints.benchmarks.vectorize:bench_vectorize",
    "predict": "footprints.benchmarks.predict:bench_predict",
    "loader": "footprints.benchmarks.loader:bench_loader",
    "features": "footprints.benchmarks.features:bench_features",
    "scale": "footprints.benchmarks.scale:bench_scale",
}
# the options of the benchmarks that take some (the CLI's --classifier-gb, --scene-px, --model-px)
OPTIONS: dict[str, tuple[str, ...]] = {"scale": ("classifier_gb",), "predict": ("scene_px", "model_px")}


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): before and after a timed span."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(name: str, cfg: Any, **options: Any) -> dict[str, Any]:
    """Run benchmark `name` (with its own `options`, those of `OPTIONS`); returns the dict the CLI
    prints as the last line of output."""
    if name not in BENCHMARKS:
        raise FootprintsError(f"bench: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    module, func = BENCHMARKS[name].split(":")
    unknown = sorted(set(options) - set(OPTIONS.get(name, ())))
    if unknown:
        takes = ", ".join(f"bench {n}" for n in OPTIONS)
        raise FootprintsError(f"bench {name}: takes no option {', '.join(unknown)} (only {takes} take options)")
    result = getattr(importlib.import_module(module), func)(cfg, **options)
    return {"bench": name, **{k: v for k, v in result.items() if k != "bench"}}


def tiled_synthetic(cfg: Any, root: Path, n_scenes: int, stride: int, split_ratios: list[float] | None = None
                    ) -> tuple[Any, Path]:
    """`n_scenes` synthetic 1024 px GeoTIFF scenes (vector labels) under `root`, tiled into 256 px patches at
    `stride` with the patch store, in process: (the run's config, its tile folder). Random backbone weights."""
    from ..config import DataConfig
    from ..contracts.paths import RunPaths
    from ..stages.tile import run as run_tile
    from ..synth.dataset import write_synthetic_dataset

    write_synthetic_dataset(root / "data", n_scenes=n_scenes, seed=cfg.seed, size=1024, geotiff=True)
    bcfg = copy.deepcopy(cfg)
    bcfg.name, bcfg.output_root = "bench", str(root / "out")
    bcfg.data = DataConfig(root=str(root / "data" / "geotiff"), format="geotiff", label_format="vector")
    bcfg.cluster.workers, bcfg.cluster.kind = 0, "local"
    bcfg.tile.size, bcfg.tile.stride, bcfg.tile.patch_store = 256, stride, True
    if split_ratios is not None:
        bcfg.tile.split_ratios = split_ratios
    bcfg.backbone.weights = "random"
    run_tile(bcfg)
    return bcfg, RunPaths.of(bcfg).tile
