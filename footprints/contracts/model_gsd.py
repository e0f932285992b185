"""The ground sample distance a model was trained at, as its checkpoint records it, and the GSD predict
reads a scene at.

`training_gsd(tile_dir)` is what train-classifier stores in its checkpoint and train-segmenter in its
`meta`, as `training_gsd`: the median, smallest and largest GSD (metres) of the run's training scenes and
how many there were, from the tile stage's scene records (`tile/scenes/<scene>.json`, `gsd_m`: the GSD of
the scene's output grid, i.e. `tile.target_gsd` when the run set one, else the scene's own). Scenes in
pixel space (no GSD known) are left out; a run with none of known GSD records None, as does a checkpoint
made before the record existed.

`match_gsd(native, record)` is predict's rule (`predict.match_model_gsd`): a scene whose own GSD lies
within the training scenes' range, widened by `GSD_TOLERANCE`, is read as it is (the model saw buildings
at that scale); any other scene is resampled to the training median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .manifest import split_scene_ids
from .paths import RunPaths
from .tile_records import read_scene_record

# a scene's GSD within this fraction of the training scenes' range counts as the model's
GSD_TOLERANCE = 0.05
TRAINING_GSD = "training_gsd"  # the key of the record in a classifier checkpoint and a segmenter's meta


def training_gsd(tile_dir: str | Path, split: str = "train") -> dict[str, Any] | None:
    """{"median_m", "min_m", "max_m", "scenes"} over the GSDs of the `split` scenes of a tiled run, or None
    when none of them has a known GSD (pixel space, or no tile manifest)."""
    tile_dir = Path(tile_dir)
    if not (tile_dir / "manifest.csv").is_file():
        return None
    paths = RunPaths(tile_dir.parent)
    values = []
    for sid in split_scene_ids(tile_dir, split):
        record = read_scene_record(paths.scene_record(sid))
        gsd = record.scene.get("gsd_m") if record is not None else None
        if isinstance(gsd, (int, float)) and math.isfinite(gsd) and gsd > 0:
            values.append(float(gsd))
    if not values:
        return None
    return {"median_m": round(statistics.median(values), 6), "min_m": round(min(values), 6),
            "max_m": round(max(values), 6), "scenes": len(values)}


def gsd_range(record: Any) -> tuple[float, float, float] | None:
    """(median, min, max) metres of a `training_gsd` record; None for an absent or malformed one (a
    checkpoint made before the record: predict then keeps the checkpoint's `target_gsd`, or none)."""
    if not isinstance(record, Mapping):
        return None
    try:
        out = tuple(float(record[k]) for k in ("median_m", "min_m", "max_m"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in out) or not out[1] <= out[0] <= out[2]:
        return None
    return out  # type: ignore[return-value]


def match_gsd(native_m: float | None, model: tuple[float, float, float]) -> float | None:
    """The GSD to read a scene of GSD `native_m` at for a model of training GSD `model` (median, min, max):
    None (its own) when it is unknown or within the training range widened by `GSD_TOLERANCE`, else the
    training median."""
    if native_m is None or not math.isfinite(native_m) or native_m <= 0:
        return None
    median, lo, hi = model
    if lo * (1 - GSD_TOLERANCE) <= native_m <= hi * (1 + GSD_TOLERANCE):
        return None
    return median
