"""Probability raster -> clean building polygons (the method shared by predict, calibration and evaluate).

`polygons_from_probability(prob, transform, crs, threshold, min_area_m2, hole_area_m2, simplify_px,
valid_mask=None, block_size=2048, scene="", pixel_size_m=None, shape=None, *, seed_threshold=None,
seed=None, halo_px=256, max_component_px=2**24)` -> GeoDataFrame in the raster CRS with columns `scene,
area_m2, mean_prob, max_prob, geometry` (one Polygon per row). `prob` is a 2-D array (uint8 0-255 or
float 0-1), the path of a raster (band 1; read block by block: bounded memory), or a function
`read(window) -> (values, valid)` with `shape=(height, width)`. Writing the layers is
`footprints.contracts.footprint_files`; the pixel rule is `footprints.contracts.probability.threshold_mask`.

Method, in order: threshold (`prob >= threshold`, inside the valid mask) -> 4-connected components
(scipy.ndimage.label) -> `rasterio.features.shapes` on the label image with `mask=` (one polygon per
component, in exact integer scene-pixel coordinates) and per-component sum/count/max of the probability
while the block is in memory -> pieces that touch an inner block border are dissolved across blocks (union,
then split into parts, so pieces touching only at a corner stay apart as 4-connectivity says; statistics
summed) -> the scene affine -> in a metric CRS (the raster's own when it measures true metres, else the UTM
zone of its centre: lon/lat, Web Mercator; `geo.metric_crs_for`):
holes smaller than `hole_area_m2` filled, simplified with tolerance `simplify_px` pixels (topology
preserving), repaired with `make_valid` where needed, polygons below `min_area_m2` dropped -> back to the
raster CRS. `mean_prob`/`max_prob` are taken over the above-threshold pixels that make up the polygon.

Instances (`seed_threshold` set): components are split into buildings by a seeded watershed on the seed
score (band 2 of the raster, or `seed=`, or the reader's third value; else the probability itself), a
whole component at a time, so that the result equals a single-block run for any block size
(`footprints.polygons.instances`). A component that stays one building is cleaned exactly as above; the buildings
split out of one component are cleaned together: `shapely.coverage_simplify` on the group (every pixel
corner a vertex first, so that shared walls are edge-matched), then holes (never one that holds a
neighbour), repair, area filter: walls shared before simplification stay shared, no gap, no overlap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from rasterio.windows import Window
from scipy import ndimage

from ..contracts.footprint_files import empty_footprints
from ..contracts.probability import prob_scale, threshold_raw
from ..scenes.geo import apply_affine, as_crs, metric_crs_for, reproject
from .blocks import iter_blocks
from .instances import MAX_COMPONENT_PX, instance_pieces, label_pieces

log = logging.getLogger(__name__)

BlockReader = Callable[[Window], tuple[np.ndarray, "np.ndarray | None"]]
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as rasterio.features.shapes(connectivity=4)


class _Metric:
    """Where the cleaning happens: a CRS in metres (or pixel space) and its scale to metres.

    The work CRS is `geo.metric_crs_for`: the raster's own when it measures true metres (UTM, national grids),
    else the UTM zone of the scene's centre (lon/lat; Web Mercator, whose "metres" are 2x too long at 60 N)."""

    def __init__(self, transform: Affine, crs: ProjCRS | None, width: int, height: int,
                 pixel_size_m: float | None):
        self.src = crs
        px_units = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
        work = metric_crs_for(transform, crs, width, height) if crs is not None else None
        if crs is None:
            # pixel space (an xView2 PNG without georeference): metres only if the caller knows the GSD
            self.work = None
            self.m_per_unit = (pixel_size_m / px_units) if pixel_size_m else None
            self.px = px_units
        elif work != crs:
            self.work = work
            self.m_per_unit = 1.0
            # pixel size in metres at the scene centre (areas are never measured in degrees)
            cx, cy = width / 2.0, height / 2.0
            pix = shapely.box(cx, cy, cx + 1, cy + 1)
            pix = shapely.transform(pix, lambda xy: np.column_stack(apply_affine(transform, xy[:, 0], xy[:, 1])))
            self.px = math.sqrt(reproject(np.array([pix]), crs, self.work)[0].area)
        else:
            self.work = crs
            self.m_per_unit = float(crs.axis_info[0].unit_conversion_factor) if crs.axis_info else 1.0
            self.px = px_units

    def to_work(self, geoms: np.ndarray) -> np.ndarray:
        return geoms if self.work is None or self.work == self.src else reproject(geoms, self.src, self.work)

    def from_work(self, geoms: np.ndarray) -> np.ndarray:
        return geoms if self.work is None or self.work == self.src else reproject(geoms, self.work, self.src)



def _block_pieces(raw: np.ndarray, valid: np.ndarray | None, thr_raw: float, win: Window, height: int,
                  width: int) -> dict[str, np.ndarray]:
    """Polygons and probability sums of the connected components of one block."""
    fg = raw >= thr_raw
    if valid is not None:
        fg &= valid
    labels, n = ndimage.label(fg, structure=_FOUR)
    if n == 0:
        return {}
    pieces = label_pieces(labels, n, fg, raw, win.col_off, win.row_off)
    # components that reach an inner block border may continue in the next block
    edge_labels = []
    if win.row_off > 0:
        edge_labels.append(labels[0, :])
    if win.row_off + win.height < height:
        edge_labels.append(labels[-1, :])
    if win.col_off > 0:
        edge_labels.append(labels[:, 0])
    if win.col_off + win.width < width:
        edge_labels.append(labels[:, -1])
    edge = np.zeros(n, dtype=bool)
    if edge_labels:
        ids = np.unique(np.concatenate(edge_labels))
        edge[ids[ids > 0] - 1] = True
    pieces["edge"] = edge
    return pieces


def _merge_edge_pieces(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dissolve pieces cut by block borders; parts that only touch at a corner stay apart (4-connectivity)."""
    edge = p["edge"]
    if not edge.any():
        return p
    keep = {k: v[~edge] for k, v in p.items()}
    pieces = p["geom"][edge]
    parts = shapely.get_parts(shapely.union_all(pieces))
    parts = parts[shapely.get_type_id(parts) == 3]
    # each piece lies inside exactly one part: locate it by a point inside it
    pts = shapely.point_on_surface(pieces)
    tree = shapely.STRtree(parts)
    src, dst = tree.query(pts, predicate="intersects")
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    first = np.unique(src, return_index=True)[1]  # a point on a shared corner may hit two parts: take one
    src, dst = src[first], dst[first]
    m = len(parts)
    sums = np.zeros(m)
    counts = np.zeros(m)
    maxs = np.zeros(m)
    np.add.at(sums, dst, p["sum"][edge][src])
    np.add.at(counts, dst, p["count"][edge][src])
    np.maximum.at(maxs, dst, p["max"][edge][src])
    return {
        "geom": np.concatenate([keep["geom"], parts]),
        "sum": np.concatenate([keep["sum"], sums]),
        "count": np.concatenate([keep["count"], counts]),
        "max": np.concatenate([keep["max"], maxs]),
        "edge": np.zeros(len(keep["geom"]) + m, dtype=bool),
    }


# ---------------------------------------------------------------------------------------------------
# cleaning (vectorised with shapely 2 array functions)


def _fill_holes(geoms: np.ndarray, min_hole_area: float) -> np.ndarray:
    """Remove interior rings whose area is below `min_hole_area` (in the geometries' units)."""
    n_holes = shapely.get_num_interior_rings(geoms)
    idx = np.flatnonzero(n_holes > 0)
    if len(idx) == 0 or min_hole_area <= 0:
        return geoms
    out = geoms.copy()
    for i in idx:  # few buildings have holes; the loop touches only those
        rings = shapely.get_interior_ring(geoms[i], np.arange(n_holes[i]))
        areas = shapely.area(shapely.polygons(rings))
        kept = rings[areas >= min_hole_area]
        if len(kept) < len(rings):
            out[i] = shapely.Polygon(shapely.get_exterior_ring(geoms[i]), list(kept))
    return out


def _polygonal_parts(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (Multi)Polygons and collections into Polygons; returns (parts, index of their source)."""
    if (shapely.get_type_id(geoms) == 3).all():  # the usual case: get_parts would only clone every polygon
        return geoms, np.arange(len(geoms))
    parts, idx = shapely.get_parts(geoms, return_index=True)
    nested = shapely.get_type_id(parts) == 7  # a GeometryCollection may hold a MultiPolygon
    if nested.any():
        sub, sub_idx = shapely.get_parts(parts[nested], return_index=True)
        sub, sub_idx = _polygonal_parts(sub)
        parts = np.concatenate([parts[~nested], sub])
        idx = np.concatenate([idx[~nested], idx[nested][sub_idx]])
    sub_multi = shapely.get_type_id(parts) == 6
    if sub_multi.any():
        sub, sub_idx = shapely.get_parts(parts[sub_multi], return_index=True)
        parts = np.concatenate([parts[~sub_multi], sub])
        idx = np.concatenate([idx[~sub_multi], idx[sub_multi][sub_idx]])
    poly = shapely.get_type_id(parts) == 3
    return parts[poly], idx[poly]


def _repair_and_filter(g: np.ndarray, metric: _Metric,
                       min_area_m2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bad = ~shapely.is_valid(g)
    if bad.any():
        g = g.copy()
        g[bad] = shapely.make_valid(g[bad])
    g, src = _polygonal_parts(g)
    area = shapely.area(g)
    scale2 = metric.m_per_unit**2 if metric.m_per_unit else None
    area_m2 = area * scale2 if scale2 else np.full(len(g), np.nan)
    keep = area > 0
    if scale2 and min_area_m2 > 0:
        keep &= area_m2 >= min_area_m2
    g, src, area_m2 = g[keep], src[keep], area_m2[keep]
    return metric.from_work(g), area_m2, src


def clean_polygons(geoms: np.ndarray, metric: _Metric, min_area_m2: float, hole_area_m2: float,
                   simplify_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill small holes, simplify, repair, drop small polygons. Returns (polygons in the raster CRS,
    area_m2, index of the source geometry)."""
    g = metric.to_work(np.asarray(geoms, dtype=object))
    scale2 = metric.m_per_unit**2 if metric.m_per_unit else None
    if scale2 and hole_area_m2 > 0:
        g = _fill_holes(g, hole_area_m2 / scale2)
    if simplify_px > 0 and len(g):
        # a canonical ring start (and no collinear vertices, as union leaves at block borders) makes the
        # simplified outline independent of where blocks were cut
        g = shapely.normalize(shapely.simplify(g, 0.0))
        g = shapely.simplify(g, simplify_px * metric.px, preserve_topology=True)
    return _repair_and_filter(g, metric, min_area_m2)


def _fill_holes_in_coverage(g: np.ndarray, group: np.ndarray, min_hole_area: float) -> np.ndarray:
    """`_fill_holes` for buildings split out of one component, except holes that hold a neighbour."""
    filled = _fill_holes(g, min_hole_area)
    changed = np.flatnonzero([a is not b for a, b in zip(filled, g, strict=True)])
    if len(changed) == 0:
        return g
    tree = shapely.STRtree(g)
    out = g.copy()
    for i in changed:
        near = tree.query(filled[i], predicate="intersects")
        near = near[(near != i) & (group[near] == group[i])]
        # a neighbour inside a filled hole would be overlapped: keep that polygon's holes as they are
        overlap = shapely.area(shapely.intersection(filled[i], g[near])) if len(near) else np.zeros(0)
        if not (overlap > 1e-6 * shapely.area(filled[i])).any():
            out[i] = filled[i]
    return out


def clean_coverage(geoms: np.ndarray, group: np.ndarray, metric: _Metric, min_area_m2: float,
                   hole_area_m2: float, simplify_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`clean_polygons` for buildings split out of one component (`group`: the component of each): each
    group is simplified together with `shapely.coverage_simplify` (Visvalingam-Whyatt, tolerance
    `simplify_px` pixels), so the walls two buildings share stay shared: no gap, no overlap. `geoms` must
    be edge-matched (every pixel corner a vertex: `shapely.segmentize(pixel polygons, 1)`)."""
    g = metric.to_work(np.asarray(geoms, dtype=object))
    if simplify_px > 0 and len(g):
        g = g.copy()
        order = np.argsort(group, kind="stable")
        cuts = np.flatnonzero(np.diff(group[order])) + 1
        for idx in np.split(order, cuts):
            g[idx] = shapely.coverage_simplify(g[idx], simplify_px * metric.px)
    scale2 = metric.m_per_unit**2 if metric.m_per_unit else None
    if scale2 and hole_area_m2 > 0:
        g = _fill_holes_in_coverage(g, group, hole_area_m2 / scale2)
    return _repair_and_filter(g, metric, min_area_m2)


def _canonical_coverage(geoms: np.ndarray, group: np.ndarray,
                        simplify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pixel polygons of split components -> canonical ring start and a canonical order within each
    group; to be simplified, every pixel corner a vertex (shared walls edge-matched, as coverage
    simplification needs), else no collinear vertex."""
    g = shapely.segmentize(geoms, 1.0) if simplify else shapely.simplify(geoms, 0.0)
    g = shapely.normalize(g)
    b = shapely.bounds(g)
    order = np.lexsort((shapely.area(g), b[:, 3], b[:, 2], b[:, 1], b[:, 0], group))
    return g, order


class _Source:
    """The probability raster behind one interface: `read(window, with_seed) -> (values, valid, seed)`."""

    def __init__(self, prob: Any, valid_mask: np.ndarray | None, seed: np.ndarray | None,
                 shape: tuple[int, int] | None):
        self.ds = None
        self.prob, self.valid_mask, self.seed = prob, valid_mask, seed
        self.transform = self.crs = self.dtype = None
        if isinstance(prob, (str, Path)):
            self.ds = rasterio.open(prob)
            self.height, self.width, self.dtype = self.ds.height, self.ds.width, np.dtype(self.ds.dtypes[0])
            self.transform, self.crs = self.ds.transform, self.ds.crs
        elif callable(prob):
            if shape is None:
                raise ValueError("a block-reading function needs shape=(height, width)")
            self.height, self.width = int(shape[0]), int(shape[1])
        else:
            self.prob = prob = np.asarray(prob)
            if prob.ndim != 2:
                raise ValueError(f"prob must be 2-D, got shape {prob.shape}")
            self.height, self.width, self.dtype = prob.shape[0], prob.shape[1], prob.dtype
            if valid_mask is not None and valid_mask.shape != prob.shape:
                raise ValueError(f"valid_mask shape {valid_mask.shape} != prob shape {prob.shape}")
            if seed is not None and np.shape(seed) != prob.shape:
                raise ValueError(f"seed shape {np.shape(seed)} != prob shape {prob.shape}")

    def read(self, win: Window, with_seed: bool = False) -> tuple[np.ndarray, Any, Any]:
        rows = slice(win.row_off, win.row_off + win.height)
        cols = slice(win.col_off, win.col_off + win.width)
        seed = None
        if self.ds is not None:
            raw = self.ds.read(1, window=win)
            valid = self.ds.read_masks(1, window=win) > 0
            if self.valid_mask is not None:
                valid &= self.valid_mask[rows, cols]
            if valid.all():
                valid = None
            if with_seed:
                seed = self.ds.read(2, window=win) if self.ds.count >= 2 else raw
        elif callable(self.prob):
            got = self.prob(win)
            raw, valid = got[0], got[1]
            seed = got[2] if len(got) > 2 and got[2] is not None else raw
            if self.valid_mask is not None:
                valid = self.valid_mask[rows, cols] if valid is None else valid & self.valid_mask[rows, cols]
        else:
            raw = self.prob[rows, cols]
            valid = None if self.valid_mask is None else self.valid_mask[rows, cols]
            seed = (raw if self.seed is None else np.asarray(self.seed)[rows, cols]) if with_seed else None
        if raw.dtype == np.float16:
            raw = raw.astype(np.float32)
        if seed is not None and seed.dtype == np.float16:
            seed = seed.astype(np.float32)
        self.dtype = raw.dtype if self.dtype is None else self.dtype
        return raw, valid, seed

    def close(self) -> None:
        if self.ds is not None:
            self.ds.close()


def polygons_from_probability(
    prob: np.ndarray | str | Path | BlockReader,
    transform: Affine | None = None,
    crs: Any = None,
    threshold: float = 0.5,
    min_area_m2: float = 0.0,
    hole_area_m2: float = 0.0,
    simplify_px: float = 1.0,
    valid_mask: np.ndarray | None = None,
    block_size: int = 2048,
    scene: str = "",
    pixel_size_m: float | None = None,
    shape: tuple[int, int] | None = None,
    *,
    seed_threshold: float | None = None,
    seed: np.ndarray | None = None,
    halo_px: int = 256,
    max_component_px: int = MAX_COMPONENT_PX,
) -> gpd.GeoDataFrame:
    """Building polygons of a probability raster (see the module docstring for the method).

    `prob`: 2-D array (uint8 = 255 * p, or float p in 0..1) or a raster path (band 1; its nodata/mask
    marks invalid pixels; `transform`/`crs` default to the file's), or a function `read(window) -> (values,
    valid or None)` with the raster `shape=(height, width)` (e.g. a scene reader's truth mask, so that truth
    masks are vectorised exactly like predictions, block by block). `valid_mask`: bool array, False =
    never a building (nodata, padding). `threshold` in 0..1, a pixel is a building when p >= threshold.
    Areas are in true square metres (the UTM zone for lon/lat and Web Mercator rasters); in pixel space (`crs` None) areas
    and the area filter need `pixel_size_m`, else `area_m2` is NaN and no area filter applies.
    Returns a GeoDataFrame in the raster CRS: scene, area_m2, mean_prob, max_prob, geometry (Polygon).

    Instances (`seed_threshold` in 0..1; None = connected components, as before): touching buildings are
    split by a seeded watershed (`footprints.polygons.instances`). The seed score, encoded like the probability:
    band 2 of a raster path (band 1 itself when there is one band: the cores of high probability), the
    array `seed` beside an array `prob` (default: `prob`), or the third value of `read(window) -> (values,
    valid, seed)` (default: the values). `halo_px`: the overlap of the block windows (only speed depends
    on it); `max_component_px`: components whose bounding box is larger are not split (bounded memory).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    src = _Source(prob, valid_mask, seed, shape)
    transform = src.transform if transform is None and src.transform is not None else transform
    crs = src.crs if crs is None and src.crs is not None else crs
    height, width = src.height, src.width
    transform = Affine.identity() if transform is None else transform
    pcrs = as_crs(crs)
    if pcrs is None:
        log.warning("%s: no CRS, polygons are in pixel coordinates", scene or "scene")
    try:
        if seed_threshold is None:
            collected: list[dict[str, np.ndarray]] = []
            for win in iter_blocks(width, height, block_size):
                raw, valid, _ = src.read(win)
                pieces = _block_pieces(raw, valid, threshold_raw(src.dtype, threshold), win, height, width)
                if pieces:
                    collected.append(pieces)
            split: dict[str, np.ndarray] = {}
        else:
            split, over = instance_pieces(src.read, height, width, threshold, seed_threshold, block_size,
                                          halo_px, max_component_px, scene)
            collected = [over] if over else []
            if split and (split["group"] < 0).any():
                one = split["group"] < 0
                collected.append({**{k: v[one] for k, v in split.items() if k != "group"},
                                  "edge": np.zeros(int(one.sum()), bool)})
                split = {k: v[~one] for k, v in split.items()}
    finally:
        src.close()
    dtype = src.dtype if src.dtype is not None else np.dtype(np.float32)
    if not collected and not split:
        return empty_footprints(pcrs)
    metric = _Metric(transform, pcrs, width, height, pixel_size_m)
    if pcrs is None and min_area_m2 > 0 and metric.m_per_unit is None:
        log.warning("%s: pixel space without pixel_size_m: min_area_m2 not applied", scene or "scene")
    parts = []
    if collected:
        merged = _merge_edge_pieces({k: np.concatenate([c[k] for c in collected]) for k in collected[0]})
        if seed_threshold is not None:
            # the collinear vertices a block merge leaves, dropped while coordinates are exact integers
            # (after a reprojection `clean_polygons` may no longer see them as collinear)
            merged["geom"] = shapely.simplify(merged["geom"], 0.0)
        parts.append((merged, *clean_polygons(_to_scene(merged["geom"], transform), metric, min_area_m2,
                                              hole_area_m2, simplify_px)))
    if split:
        g, order = _canonical_coverage(split["geom"], split["group"], simplify_px > 0)
        split = {k: v[order] for k, v in {**split, "geom": g}.items()}
        parts.append((split, *clean_coverage(_to_scene(split["geom"], transform), split["group"], metric,
                                             min_area_m2, hole_area_m2, simplify_px)))
    geoms = np.concatenate([p[1] for p in parts])
    if len(geoms) == 0:
        return empty_footprints(pcrs)
    area_m2 = np.concatenate([p[2] for p in parts])
    scale = prob_scale(dtype)
    mean = np.concatenate([p[0]["sum"][p[3]] / np.maximum(p[0]["count"][p[3]], 1) for p in parts]) * scale
    mx = np.concatenate([p[0]["max"][p[3]] for p in parts]) * scale
    return gpd.GeoDataFrame(
        {
            "scene": np.full(len(geoms), scene, dtype=object),
            "area_m2": area_m2.astype(np.float64),
            "mean_prob": mean.astype(np.float64),
            "max_prob": mx.astype(np.float64),
        },
        geometry=gpd.GeoSeries(geoms, crs=pcrs),
    )


def _to_scene(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Scene pixel coordinates -> the raster CRS."""
    if transform == Affine.identity():
        return geoms
    return shapely.transform(geoms, lambda xy: np.column_stack(apply_affine(transform, xy[:, 0], xy[:, 1])))
