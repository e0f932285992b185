"""Scoring one scene against its truth: the same pixels and polygons for calibration and evaluation.

- `pixel_counts`: (tp, fp, fn, tn) of the thresholded probability raster (`threshold_mask`, the rule the
  vectorisation uses) against the truth mask on the same grid, nodata left out, block by block.
- `truth_polygons`: the scene's truth outlines in its metric CRS, repaired (`clean_truth`): the label
  file's polygons, or a mask raster vectorised with the predictions' own cleaning (hole filling,
  simplification; no area filter: truth is truth).
- `metric_crs`: where polygons are compared: the scene's projected CRS when it measures true metres, else the
  UTM zone of its centre (lon/lat and Web Mercator scenes; `geo.metric_crs_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from ..contracts.probability import threshold_mask
from ..errors import InputError
from ..polygons.blocks import iter_blocks
from ..polygons.vectorize import polygons_from_probability
from ..scenes.geo import metric_crs_for
from .matching import clean_truth
from .metrics import confusion


def metric_crs(reader: Any) -> Any:
    """The CRS polygons of a scene are compared in (None in pixel space)."""
    return metric_crs_for(reader.transform, reader.crs, reader.width, reader.height)


def pixel_counts(reader: Any, prob_path: Path, thresholds: Sequence[float],
                 block_size: int) -> dict[float, np.ndarray]:
    """{threshold: int64 [tp, fp, fn, tn]} over the scene's labelled, valid pixels."""
    try:
        ds = rasterio.open(prob_path)
    except rasterio.errors.RasterioError as err:
        raise InputError(prob_path, f"cannot open probability raster ({' '.join(str(err).split())[:160]})") from None
    counts = {float(t): np.zeros(4, dtype=np.int64) for t in thresholds}
    with ds:
        if (ds.width, ds.height) != (reader.width, reader.height):
            raise InputError(prob_path, f"size {ds.width}x{ds.height} differs from the scene grid "
                                        f"{reader.width}x{reader.height} (predicted with another tile config?)")
        for win in iter_blocks(ds.width, ds.height, block_size):
            raw = ds.read(1, window=win)
            truth = np.where(ds.read_masks(1, window=win) > 0, reader.truth_mask(win), 255)
            for t in counts:
                counts[t] += np.asarray(confusion(threshold_mask(raw, t), truth, ignore=255), dtype=np.int64)
    return counts


def truth_polygons(reader: Any, hole_area_m2: float = 0.0, simplify_px: float = 1.0,
                   block_size: int = 2048) -> np.ndarray:
    """The scene's truth outlines in `metric_crs(reader)`, ready to match (see the module docstring)."""
    if reader.labels is not None and reader.labels.has_polygons:
        gdf = reader.truth_polygons()
    else:
        def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
            t = reader.truth_mask(win)
            return np.where(t == 1, 255, 0).astype(np.uint8), t != 255

        gdf = polygons_from_probability(
            read, reader.transform, reader.crs, threshold=0.5, min_area_m2=0.0, hole_area_m2=hole_area_m2,
            simplify_px=simplify_px, block_size=block_size, scene=reader.scene_id, pixel_size_m=reader.gsd_m,
            shape=(reader.height, reader.width),
        )  # fmt: skip
    crs = metric_crs(reader)
    if crs is not None and len(gdf):
        gdf = gdf.to_crs(crs)
    return clean_truth(np.asarray(gdf.geometry.values, dtype=object))
