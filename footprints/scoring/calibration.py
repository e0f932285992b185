"""Calibration of the polygon rule (threshold x seed threshold x minimum area) on validation scenes, by
polygon F1.

`scene_counts` scores one labelled scene's probability raster at every grid point: pixel counts per
threshold, polygon matches per (threshold, seed threshold, minimum area) (a seed threshold None: no
watershed, connected components), exactly as evaluation scores the test split
(`footprints.scoring.scene`). The predict stage sums them over the validation scenes (`sum_counts`) and
`choose_calibration` picks the grid point with the best polygon F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GRID_KEYS
from ..polygons.vectorize import polygons_from_probability
from .matching import match_polygons
from .scene import metric_crs, pixel_counts, truth_polygons


def scene_counts(reader: Any, prob_path: Path, thresholds: Sequence[float],
                 seed_thresholds: Sequence[float | None], min_areas: Sequence[float], iou_threshold: float,
                 hole_area_m2: float, simplify_px: float, block_size: int) -> dict[str, Any]:
    """Confusion counts of one labelled scene at every grid point (summed over scenes by the caller).

    Pixel counts (tp, fp, fn, tn) per threshold over the scene's valid pixels; polygon counts (tp, fp,
    fn) per (threshold, seed threshold, min_area) from one-to-one matching of predicted to true polygons
    at IoU >= 0.5.
    """
    pixel = pixel_counts(reader, prob_path, thresholds, block_size)
    crs = metric_crs(reader)
    truth = truth_polygons(reader, hole_area_m2, simplify_px, block_size)
    polygon: list[list[Any]] = []
    for t in thresholds:
        for s in seed_thresholds:
            gdf = polygons_from_probability(
                prob_path, threshold=float(t), min_area_m2=0.0, hole_area_m2=hole_area_m2,
                simplify_px=simplify_px, block_size=block_size, scene=reader.scene_id, pixel_size_m=reader.gsd_m,
                seed_threshold=s,
            )  # fmt: skip
            if crs is not None and len(gdf):
                gdf = gdf.to_crs(crs)
            area = gdf["area_m2"].to_numpy(dtype=np.float64)
            geoms = np.asarray(gdf.geometry.values, dtype=object)
            for a in min_areas:
                keep = ~(area < a)  # NaN area (pixel space without GSD) is never filtered
                m = match_polygons(geoms[keep], truth, iou_threshold)
                polygon.append([float(t), s, float(a), m.tp, m.fp, m.fn])
    return {
        "scene_id": reader.scene_id,
        "pixel": [[float(t), *map(int, c)] for t, c in pixel.items()],
        "polygon": polygon,
    }


def _f1(tp: float, fp: float, fn: float) -> float:
    # 0 for an empty grid point (unlike polygon_scores' 1): the tie-break below relies on it
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def choose_calibration(pixel: Sequence[Sequence[float]], polygon: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The grid point with the best polygon F1 (ties: better pixel F1, smaller minimum area, threshold
    nearer 0.5). `pixel`: rows (threshold, tp, fp, fn, tn) summed over scenes; `polygon`: rows
    (threshold, seed threshold or None, min_area, tp, fp, fn) summed over scenes. Returns the choice and
    the whole table."""
    pix = {float(r[0]): r[1:] for r in pixel}
    table = []
    for t, s, a, tp, fp, fn in polygon:
        ptp, pfp, pfn, _ = pix[float(t)]
        table.append({
            "threshold": float(t), "seed_threshold": s, "min_area_m2": float(a),
            "polygon_f1": _f1(tp, fp, fn), "polygon_tp": int(tp), "polygon_fp": int(fp), "polygon_fn": int(fn),
            "pixel_f1": _f1(ptp, pfp, pfn),
            "pixel_iou": ptp / (ptp + pfp + pfn) if ptp + pfp + pfn > 0 else 0.0,
        })  # fmt: skip
    if not table:
        raise ValueError("choose_calibration: empty grid")
    best = max(table, key=lambda r: (r["polygon_f1"], r["pixel_f1"], -r["min_area_m2"], -abs(r["threshold"] - 0.5)))
    return {
        "threshold": best["threshold"],
        "seed_threshold": best["seed_threshold"],
        "min_area_m2": best["min_area_m2"],
        "criterion": "polygon F1 at IoU >= 0.5 (ties: pixel F1, then the smaller minimum area)",
        "best": best,
        "at_grid_edge": grid_edges(best, table),
        "grid": table,
    }


def grid_edges(best: dict[str, Any], table: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """{key: its grid values} for each key whose chosen value is the highest of 3 or more in the grid, or the
    lowest unless that is 0 (no minimum area is a floor), and beats the next value inward on polygon F1 (a
    tie says nothing): the best point may lie outside the grid.
    """
    edges = {}
    for key in GRID_KEYS:
        values = sorted({r[key] for r in table if r[key] is not None})
        chosen = best[key]
        if len(values) < 3 or chosen is None or chosen not in (values[0], values[-1]) or chosen == 0:
            continue
        inward = values[1] if chosen == values[0] else values[-2]
        if best["polygon_f1"] > max(r["polygon_f1"] for r in table if r[key] == inward):
            edges[key] = values
    return edges


def sum_counts(parts: Sequence[dict[str, Any]]) -> tuple[list[list[float]], list[list[float]]]:
    """Sum the `scene_counts` of several scenes: (pixel rows, polygon rows) for `choose_calibration`."""
    pixel: dict[float, np.ndarray] = {}
    polygon: dict[tuple[Any, ...], np.ndarray] = {}
    for part in parts:
        for t, *c in part["pixel"]:
            pixel[t] = pixel.get(t, 0) + np.asarray(c, dtype=np.int64)
        for t, s, a, *c in part["polygon"]:
            polygon[(t, s, a)] = polygon.get((t, s, a), 0) + np.asarray(c, dtype=np.int64)
    return ([[t, *c.tolist()] for t, c in pixel.items()],
            [[t, s, a, *c.tolist()] for (t, s, a), c in polygon.items()])
