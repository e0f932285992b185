"""Probability raster -> clean building polygons (the method shared by predict, calibration and evaluate).

`polygons_from_probability(prob, transform, crs, threshold, min_area_m2, hole_area_m2, simplify_px,
valid_mask=None, block_size=2048, scene="")` -> GeoDataFrame in the raster CRS with columns `scene,
area_m2, mean_prob, max_prob, geometry` (one Polygon per row). `prob` is a 2-D array (uint8 0-255 or
float 0-1), the path of a single-band raster (read block by block: bounded memory), or a function
`read(window) -> (values, valid)` with `shape=(height, width)`. Writing the layers is
`footprints.contracts.footprint_files`; the pixel rule is `footprints.contracts.probability.threshold_mask`.

Method, in order: threshold (`prob >= threshold`, inside the valid mask) -> 4-connected components
(scipy.ndimage.label) -> `rasterio.features.shapes` on the label image with `mask=` (one polygon per
component, in exact integer scene-pixel coordinates) and per-component sum/count/max of the probability
while the block is in memory -> pieces that touch an inner block border are dissolved across blocks (union,
then split into parts, so pieces touching only at a corner stay apart as 4-connectivity says; statistics
summed) -> the scene affine -> in a metric CRS (the raster's own when projected, else its UTM zone):
holes smaller than `hole_area_m2` filled, simplified with tolerance `simplify_px` pixels (topology
preserving), repaired with `make_valid` where needed, polygons below `min_area_m2` dropped -> back to the
raster CRS. `mean_prob`/`max_prob` are taken over the above-threshold pixels that make up the polygon.
"""

from __future__ import annotations

import itertools
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

from .blocks import iter_blocks
from .contracts.footprint_files import empty_footprints
from .contracts.probability import prob_scale, threshold_raw
from .geo import apply_affine, as_crs, reproject, utm_for_raster

log = logging.getLogger(__name__)

BlockReader = Callable[[Window], tuple[np.ndarray, "np.ndarray | None"]]
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as rasterio.features.shapes(connectivity=4)


class _Metric:
    """Where the cleaning happens: a CRS in metres (or pixel space) and its scale to metres."""

    def __init__(self, transform: Affine, crs: ProjCRS | None, width: int, height: int,
                 pixel_size_m: float | None):
        self.src = crs
        px_units = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
        if crs is None:
            # pixel space (an xView2 PNG without georeference): metres only if the caller knows the GSD
            self.work = None
            self.m_per_unit = (pixel_size_m / px_units) if pixel_size_m else None
            self.px = px_units
        elif crs.is_geographic:
            self.work = utm_for_raster(transform, crs, width, height)
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



def _polygons_from_rings(polys: list[list]) -> np.ndarray:
    """GeoJSON-like polygon coordinates (shell first, then holes) -> shapely Polygons, in one vectorised
    call (a Python `Polygon(...)` per building costs as much as GDAL's polygonize itself)."""
    rings = [r for p in polys for r in p]
    owner = np.repeat(np.arange(len(polys)), [len(p) for p in polys])
    lens = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    coords = np.array(list(itertools.chain.from_iterable(rings)), dtype=np.float64).reshape(-1, 2)
    lr = shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), lens))
    return shapely.polygons(lr, indices=owner)


def _block_pieces(raw: np.ndarray, valid: np.ndarray | None, thr_raw: float, win: Window, height: int,
                  width: int) -> dict[str, np.ndarray]:
    """Polygons and probability sums of the connected components of one block."""
    fg = raw >= thr_raw
    if valid is not None:
        fg &= valid
    labels, n = ndimage.label(fg, structure=_FOUR)
    if n == 0:
        return {}
    # statistics over the foreground pixels only (a few % of the block): no sort, no full-block pass
    where = np.flatnonzero(fg)
    lab = labels.ravel()[where] - 1
    vals = raw.ravel()[where]
    counts = np.bincount(lab, minlength=n)
    sums = np.bincount(lab, weights=vals, minlength=n)
    # every label 1..n has pixels, so after sorting by label each group starts where the label changes
    order = np.argsort(lab, kind="stable")
    starts = np.flatnonzero(np.r_[True, lab[order][1:] != lab[order][:-1]])
    maxs = np.maximum.reduceat(vals[order], starts).astype(np.float64)
    # scene pixel coordinates (integers, exact): pieces of neighbouring blocks share their border vertices
    # bit for bit, so the merge never leaves slivers; the scene affine is applied once, after the merge
    btf = Affine.translation(win.col_off, win.row_off)
    found = list(rasterio.features.shapes(labels, mask=fg, connectivity=4, transform=btf))
    geoms = np.empty(n, dtype=object)
    geoms[np.array([int(v) - 1 for _, v in found], dtype=np.int64)] = _polygons_from_rings(
        [g["coordinates"] for g, _ in found])
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
    return {"geom": geoms, "sum": sums, "count": counts.astype(np.float64), "max": maxs, "edge": edge}


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
    bad = ~shapely.is_valid(g)
    if bad.any():
        g = g.copy()
        g[bad] = shapely.make_valid(g[bad])
    g, src = _polygonal_parts(g)
    area = shapely.area(g)
    area_m2 = area * scale2 if scale2 else np.full(len(g), np.nan)
    keep = area > 0
    if scale2 and min_area_m2 > 0:
        keep &= area_m2 >= min_area_m2
    g, src, area_m2 = g[keep], src[keep], area_m2[keep]
    return metric.from_work(g), area_m2, src



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
) -> gpd.GeoDataFrame:
    """Building polygons of a probability raster (see the module docstring for the method).

    `prob`: 2-D array (uint8 = 255 * p, or float p in 0..1) or a raster path (band 1; its nodata/mask
    marks invalid pixels; `transform`/`crs` default to the file's), or a function `read(window) -> (values,
    valid or None)` with the raster `shape=(height, width)` (e.g. a scene reader's truth mask, so that truth
    masks are vectorised exactly like predictions, block by block). `valid_mask`: bool array, False =
    never a building (nodata, padding). `threshold` in 0..1, a pixel is a building when p >= threshold.
    Areas are in square metres (a UTM zone for geographic rasters); in pixel space (`crs` None) areas
    and the area filter need `pixel_size_m`, else `area_m2` is NaN and no area filter applies.
    Returns a GeoDataFrame in the raster CRS: scene, area_m2, mean_prob, max_prob, geometry (Polygon).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    ds = None
    if isinstance(prob, (str, Path)):
        ds = rasterio.open(prob)
        height, width, dtype = ds.height, ds.width, np.dtype(ds.dtypes[0])
        transform = ds.transform if transform is None else transform
        crs = ds.crs if crs is None else crs
    elif callable(prob):
        if shape is None:
            raise ValueError("a block-reading function needs shape=(height, width)")
        height, width = int(shape[0]), int(shape[1])
        dtype = None  # known from the first block
    else:
        prob = np.asarray(prob)
        if prob.ndim != 2:
            raise ValueError(f"prob must be 2-D, got shape {prob.shape}")
        height, width, dtype = prob.shape[0], prob.shape[1], prob.dtype
        if valid_mask is not None and valid_mask.shape != prob.shape:
            raise ValueError(f"valid_mask shape {valid_mask.shape} != prob shape {prob.shape}")
    transform = Affine.identity() if transform is None else transform
    pcrs = as_crs(crs)
    if pcrs is None:
        log.warning("%s: no CRS, polygons are in pixel coordinates", scene or "scene")
    collected: list[dict[str, np.ndarray]] = []
    try:
        for win in iter_blocks(width, height, block_size):
            rows = slice(win.row_off, win.row_off + win.height)
            cols = slice(win.col_off, win.col_off + win.width)
            if ds is not None:
                raw = ds.read(1, window=win)
                valid = ds.read_masks(1, window=win) > 0
                if valid_mask is not None:
                    valid &= valid_mask[rows, cols]
                if valid.all():
                    valid = None
            elif callable(prob):
                raw, valid = prob(win)
                if valid_mask is not None:
                    valid = valid_mask[rows, cols] if valid is None else valid & valid_mask[rows, cols]
            else:
                raw = prob[rows, cols]
                valid = None if valid_mask is None else valid_mask[rows, cols]
            if raw.dtype == np.float16:
                raw = raw.astype(np.float32)
            dtype = raw.dtype if dtype is None else dtype
            pieces = _block_pieces(raw, valid, threshold_raw(dtype, threshold), win, height, width)
            if pieces:
                collected.append(pieces)
    finally:
        if ds is not None:
            ds.close()
    if not collected:
        return empty_footprints(pcrs)
    merged = _merge_edge_pieces({k: np.concatenate([c[k] for c in collected]) for k in collected[0]})
    if transform != Affine.identity():
        merged["geom"] = shapely.transform(merged["geom"], lambda xy: np.column_stack(apply_affine(transform, xy[:, 0], xy[:, 1])))
    metric = _Metric(transform, pcrs, width, height, pixel_size_m)
    if pcrs is None and min_area_m2 > 0 and metric.m_per_unit is None:
        log.warning("%s: pixel space without pixel_size_m: min_area_m2 not applied", scene or "scene")
    geoms, area_m2, src = clean_polygons(merged["geom"], metric, min_area_m2, hole_area_m2, simplify_px)
    if len(geoms) == 0:
        return empty_footprints(pcrs)
    scale = prob_scale(dtype)
    mean = merged["sum"][src] / np.maximum(merged["count"][src], 1) * scale
    mx = merged["max"][src] * scale
    return gpd.GeoDataFrame(
        {
            "scene": np.full(len(geoms), scene, dtype=object),
            "area_m2": area_m2.astype(np.float64),
            "mean_prob": mean.astype(np.float64),
            "max_prob": mx.astype(np.float64),
        },
        geometry=gpd.GeoSeries(geoms, crs=pcrs),
    )


