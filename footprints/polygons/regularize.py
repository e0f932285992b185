"""Regularised building outlines: right angles and straight walls, never leaving the building.

`regularize_footprints(gdf, pixel_size_m=None, metric_crs=None, ...)` -> a copy of a footprint layer
(`footprints.polygons.vectorize.polygons_from_probability`) with regularised geometries, every other column kept
(`area_m2` rescaled to the new outline), the row order kept, and a column `reg_iou`: the IoU of each
regularised outline with its raw one. The predict stage writes both: the regularised layer as the
footprints, its input (the raw outlines) beside it; the input layer is never modified.

Method, in a projected CRS (the layer's own when projected, else the UTM zone of its centre; pixel space
as it is), tolerances in pixels of the scene's ground sample distance `pixel_size_m`:
- `buildingregulariser.regularize_geodataframe` (PyPI, MIT): edges snapped to the building's main
  direction and its perpendicular (45 degrees allowed when the outline says so), near-circles as circles;
  optional alignment of a building's direction with its neighbours' (`align_neighbours`).
- Never leaves its building: the result is clipped to the raw outline buffered by `max_outside_px`
  (mitred: corners stay square) minus the raw outlines of touching neighbours, and reduced to its largest
  polygon. The default, 2 px, not 1: a segmentation's raw outline cuts square corners, so the true
  rectangle rarely lies within raw + 1 px and a 1-px clip notches nearly every corner it squares (to check,
  threshold blurred rotated rectangles, vectorise them and count the true rectangles that lie within the
  raw outline buffered by 1 px, then by 2 px).
- Touching buildings (split by the watershed) never overlap: each one's limit excludes its neighbours'
  raw outlines, and where two claim the same corner outside both, `shapely.coverage_clean` gives it to one.
  Their walls are regularised independently, so a shared wall may open by up to about `max_outside_px`;
  the raw layer keeps the exact shared walls.
- Kept raw: an outline the library drops, or one that is empty, invalid, or whose IoU with the raw outline
  falls below `min_iou`; the count is logged and in `attrs["regularize"]`.

Speed: the library is pure Python per polygon, so its time grows with the number of buildings, one core
by default; `num_cores` > 1 uses its process pool (fork). The log line (and `attrs["regularize"]`) gives
the seconds and the time per polygon of each call; `footprints bench vectorize` times it on ~3,000
synthetic buildings (`regularized_ratio`, `regularize_seconds`).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS as ProjCRS
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..scenes.geo import as_crs, utm_crs_for

log = logging.getLogger(__name__)


def _work_crs(gdf: gpd.GeoDataFrame, metric_crs: Any) -> ProjCRS | None:
    if metric_crs is not None:
        return as_crs(metric_crs)
    crs = as_crs(gdf.crs)
    if crs is None or not crs.is_geographic:
        return crs
    return utm_crs_for(gdf)


def _largest_polygon(geoms: np.ndarray) -> np.ndarray:
    """Each geometry's largest polygon (None where it has none)."""
    parts, idx = shapely.get_parts(geoms, return_index=True)
    out = np.full(len(geoms), None, dtype=object)
    poly = shapely.get_type_id(parts) == 3
    parts, idx = parts[poly], idx[poly]
    if len(parts):
        order = np.lexsort((-shapely.area(parts), idx))
        first = np.unique(idx[order], return_index=True)[1]
        out[idx[order][first]] = parts[order][first]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = shapely.area(shapely.intersection(a, b))
    union = shapely.area(a) + shapely.area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _touching(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j, of raw outlines that touch (shared walls, or a shared corner)."""
    a, b = shapely.STRtree(raw).query(raw, predicate="intersects")
    keep = a != b
    return a[keep], b[keep]


def _touching_groups(a: np.ndarray, b: np.ndarray, n: int) -> list[np.ndarray]:
    """Groups (>= 2) of outlines connected by touching pairs (i, j)."""
    if not len(a):
        return []
    _, comp = connected_components(coo_matrix((np.ones(len(a), np.int32), (a, b)), shape=(n, n)), directed=False)
    order = np.argsort(comp, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(comp))[:-1])
    return [g for g in groups if len(g) > 1]


def regularize_footprints(
    gdf: gpd.GeoDataFrame,
    pixel_size_m: float | None = None,
    metric_crs: Any = None,
    *,
    parallel_threshold_px: float = 3.0,
    simplify_tolerance_px: float = 3.0,
    allow_45_degree: bool = True,
    allow_circles: bool = True,
    align_neighbours: bool = False,
    neighbour_distance_m: float = 50.0,
    max_outside_px: float = 2.0,
    min_iou: float = 0.7,
    num_cores: int = 1,
) -> gpd.GeoDataFrame:
    """Regularised copy of a footprint layer (see the module docstring); the input is not modified.

    `pixel_size_m`: the scene's ground sample distance, the unit of every `*_px` tolerance (None: 1 unit
    of the work CRS, i.e. 1 m, or 1 pixel for a layer without CRS, in pixel coordinates). `metric_crs`:
    where to work (default: the layer's CRS when projected, else its UTM zone). `parallel_threshold_px`,
    `simplify_tolerance_px`, `allow_45_degree`, `allow_circles`: buildingregulariser's parameters, in
    pixels. `align_neighbours`: rotate each building towards its neighbours' direction (within 10
    degrees, neighbours within `neighbour_distance_m`; slower). `max_outside_px`: how far a regularised
    outline may leave its raw one. `min_iou`: below it the raw outline is kept.
    `num_cores`: the library's process pool (1 = none).
    Returns the layer in its own CRS with `reg_iou` (1.0 where the raw outline was kept).
    """
    from buildingregulariser import regularize_geodataframe

    t0 = time.perf_counter()
    out = gdf.copy()
    n = len(gdf)
    if n == 0:
        out["reg_iou"] = np.zeros(0, np.float64)
        out.attrs["regularize"] = {"polygons": 0, "kept_raw": 0, "seconds": 0.0}
        return out
    work = _work_crs(gdf, metric_crs)
    src_crs = as_crs(gdf.crs)
    raw_src = np.asarray(gdf.geometry.values, dtype=object)
    raw = raw_src if work is None or src_crs is None or work == src_crs else np.asarray(
        gdf.geometry.to_crs(work).values, dtype=object)
    unit_m = float(work.axis_info[0].unit_conversion_factor) if work is not None and work.axis_info else 1.0
    px = pixel_size_m / unit_m if (pixel_size_m and work is not None) else 1.0
    if pixel_size_m is None and work is not None:
        log.warning("regularize: no pixel size given, tolerances in units of %s (1 px = 1 unit)", work.name)

    pair_a, pair_b = _touching(raw)
    reg_all = _regularise(raw, work, regularize_geodataframe, dict(
        parallel_threshold=parallel_threshold_px * px, simplify=True, simplify_tolerance=simplify_tolerance_px * px,
        allow_45_degree=allow_45_degree, allow_circles=allow_circles, num_cores=max(1, int(num_cores)),
        neighbor_alignment=align_neighbours, neighbor_search_distance=neighbour_distance_m / unit_m,
        neighbor_max_rotation=10))
    limit = shapely.buffer(raw, max_outside_px * px, join_style="mitre", mitre_limit=2.0)
    if len(pair_a):  # and never into a touching neighbour's raw outline
        order = np.argsort(pair_a, kind="stable")
        owners, start = np.unique(pair_a[order], return_index=True)
        for i, nbrs in zip(owners, np.split(pair_b[order], start[1:]), strict=True):
            limit[i] = shapely.difference(limit[i], shapely.union_all(raw[nbrs]))

    def clip(g: np.ndarray, idx: np.ndarray) -> np.ndarray:
        have = np.flatnonzero([x is not None for x in g])
        out = np.full(len(g), None, dtype=object)
        if len(have):
            v = g[have]
            v = np.where(shapely.is_valid(v), v, shapely.make_valid(v))
            out[have] = _largest_polygon(shapely.intersection(v, limit[idx[have]]))
        return out

    reg = clip(reg_all, np.arange(n))
    ok = _acceptable(reg, raw, min_iou)
    reg = np.where(ok, reg, raw)
    for group in _touching_groups(pair_a, pair_b, n):
        # two neighbours may both claim a corner outside both raw outlines: coverage_clean gives it to one
        if shapely.STRtree(reg[group]).query(reg[group], predicate="overlaps").size:
            cleaned = _largest_polygon(shapely.coverage_clean(reg[group]))
            good = _acceptable(cleaned, raw[group], min_iou) & ok[group]  # a raw outline stays raw
            reg[group[good]] = cleaned[good]
    kept_raw = int((~ok).sum())
    iou = np.where(ok, _iou(reg, raw), 1.0)
    result = reg if work is None or src_crs is None or work == src_crs else np.asarray(
        gpd.GeoSeries(reg, crs=work).to_crs(src_crs).values, dtype=object)
    result = np.where(ok, result, raw_src)
    if "area_m2" in out.columns:
        ratio = shapely.area(reg) / np.maximum(shapely.area(raw), 1e-300)
        out["area_m2"] = out["area_m2"].to_numpy(dtype=np.float64) * ratio
    out = out.set_geometry(gpd.GeoSeries(result, crs=gdf.crs, index=gdf.index))
    out["reg_iou"] = iou.astype(np.float64)
    seconds = time.perf_counter() - t0
    out.attrs["regularize"] = {"polygons": n, "kept_raw": kept_raw, "seconds": round(seconds, 3)}
    log.info("regularize: %d outlines in %.2f s (%.2f ms each), raw kept for %d (IoU < %.2f, invalid or "
             "empty), median IoU %.3f", n, seconds, 1e3 * seconds / n, kept_raw, min_iou, float(np.median(iou)))
    return out


def _regularise(geoms: np.ndarray, crs: ProjCRS | None, fn: Any,
                kwargs: dict[str, Any]) -> np.ndarray:
    """buildingregulariser on an array of polygons -> one geometry per input (None where it dropped one)."""
    frame = gpd.GeoDataFrame({"_row": np.arange(len(geoms))}, geometry=gpd.GeoSeries(geoms, crs=crs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns for each polygon it returns unchanged
        reg_df = fn(frame, **kwargs)
    # the library explodes and may split or drop outlines: back to one geometry per input row
    reg = np.full(len(geoms), None, dtype=object)
    if len(reg_df):
        rows = reg_df["_row"].to_numpy()
        order = np.argsort(rows, kind="stable")
        uniq, start = np.unique(rows[order], return_index=True)
        parts = np.asarray(reg_df.geometry.values, dtype=object)[order]
        reg[uniq] = [shapely.union_all(g) if len(g) > 1 else g[0] for g in np.split(parts, start[1:])]
    return reg


def _acceptable(reg: np.ndarray, raw: np.ndarray, min_iou: float) -> np.ndarray:
    """Regularised outlines to keep: polygons, valid, not empty, IoU with the raw outline >= min_iou."""
    ok = np.array([g is not None for g in reg], dtype=bool)
    idx = np.flatnonzero(ok)
    g = reg[idx]
    good = ~shapely.is_empty(g) & shapely.is_valid(g) & (shapely.get_type_id(g) == 3)
    good &= _iou(g, raw[idx]) >= min_iou
    ok[idx] = good
    return ok
