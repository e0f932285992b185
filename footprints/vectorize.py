"""Probability raster -> clean building polygons -> RFC 7946 GeoJSON and GeoPackage.

Public API (used by the predict and evaluate stages):

- `polygons_from_probability(prob, transform, crs, threshold, min_area_m2, hole_area_m2, simplify_px,
  valid_mask=None, block_size=2048, scene="")` -> GeoDataFrame in the raster CRS with columns
  `scene, area_m2, mean_prob, max_prob, geometry` (one Polygon per row). `prob` is a 2-D array (uint8
  0-255 or float 0-1), the path of a single-band raster (read window by window: bounded memory), or a
  function `read(window) -> (values, valid)` with `shape=(height, width)`.
- `write_geojson(gdf, path)`: RFC 7946 (EPSG:4326, lon/lat, counter-clockwise exterior rings, no `crs`
  member, 7 decimals ~ 1 cm); an empty layer is a valid FeatureCollection. Atomic.
- `write_gpkg(gdf, path, layer="footprints")`: GeoPackage in the layer's CRS, or its UTM zone when that CRS
  is geographic; empty but valid when nothing was found. Atomic.
- `gpkg_crs_for_raster(transform, crs, width, height)`: the GeoPackage CRS of a scene (its own, or the
  UTM zone of its centre when geographic); pass it to `write_gpkg(crs=)` so empty layers get it too.
- `threshold_mask(raw, threshold)`: the pixel rule (p >= threshold) shared with evaluation.
- `utm_crs_for(gdf_or_lon, lat=None)`: the WGS84 UTM zone (EPSG:326xx/327xx) of a layer's centre or a point.
- `bench_vectorize(cfg)`: throughput of this pipeline against bare `rasterio.features.shapes`.

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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.windows import Window
from scipy import ndimage

from .atomic import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ["scene", "area_m2", "mean_prob", "max_prob"]
GEOJSON_PRECISION = 7  # decimal degrees: 1e-7 deg ~ 1 cm, far below any pixel
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as rasterio.features.shapes(connectivity=4)


# ---------------------------------------------------------------------------------------------------
# CRS helpers


def _apply(t: Affine, x: Any, y: Any) -> tuple[Any, Any]:
    """Pixel (col, row) -> CRS (x, y); written out so it works on arrays with any `affine` version."""
    return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f


def _as_crs(crs: Any) -> ProjCRS | None:
    if crs is None:
        return None
    if isinstance(crs, ProjCRS):
        return crs
    if hasattr(crs, "to_wkt"):  # rasterio CRS
        return ProjCRS.from_wkt(crs.to_wkt())
    return ProjCRS.from_user_input(crs)


def utm_crs_for(obj: gpd.GeoDataFrame | gpd.GeoSeries | float, lat: float | None = None) -> ProjCRS:
    """WGS84 UTM zone (EPSG:326xx north, 327xx south) of a layer's bounding-box centre, or of (lon, lat).

    The Norway/Svalbard zone exceptions are ignored: any neighbouring zone measures areas to well under 1%.
    """
    if lat is None:
        if not isinstance(obj, (gpd.GeoDataFrame, gpd.GeoSeries)):
            raise TypeError("utm_crs_for: give a GeoDataFrame/GeoSeries, or lon and lat")
        if obj.crs is None:
            raise ValueError("utm_crs_for: the layer has no CRS")
        minx, miny, maxx, maxy = obj.to_crs(4326).total_bounds if len(obj) else (np.nan,) * 4
        if not np.all(np.isfinite([minx, miny, maxx, maxy])):
            raise ValueError("utm_crs_for: the layer is empty")
        lon, lat = (minx + maxx) / 2.0, (miny + maxy) / 2.0
    else:
        lon = float(obj)  # type: ignore[arg-type]
    return ProjCRS.from_epsg(utm_epsg(lon, lat))


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat): 326xx north, 327xx south."""
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return (32600 if lat >= 0 else 32700) + zone


def _utm_for_raster(transform: Affine, crs: ProjCRS, width: int, height: int) -> ProjCRS:
    cx, cy = _apply(transform, width / 2.0, height / 2.0)
    lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(cx, cy)
    return utm_crs_for(lon, lat)


def _reproject(geoms: np.ndarray, src: ProjCRS, dst: ProjCRS) -> np.ndarray:
    if len(geoms) == 0 or src == dst:
        return geoms
    tr = Transformer.from_crs(src, dst, always_xy=True)

    def fn(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, fn)


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
            self.work = _utm_for_raster(transform, crs, width, height)
            self.m_per_unit = 1.0
            # pixel size in metres at the scene centre (areas are never measured in degrees)
            cx, cy = width / 2.0, height / 2.0
            pix = shapely.box(cx, cy, cx + 1, cy + 1)
            pix = shapely.transform(pix, lambda xy: np.column_stack(_apply(transform, xy[:, 0], xy[:, 1])))
            self.px = math.sqrt(_reproject(np.array([pix]), crs, self.work)[0].area)
        else:
            self.work = crs
            self.m_per_unit = float(crs.axis_info[0].unit_conversion_factor) if crs.axis_info else 1.0
            self.px = px_units

    def to_work(self, geoms: np.ndarray) -> np.ndarray:
        return geoms if self.work is None or self.work == self.src else _reproject(geoms, self.src, self.work)

    def from_work(self, geoms: np.ndarray) -> np.ndarray:
        return geoms if self.work is None or self.work == self.src else _reproject(geoms, self.work, self.src)


# ---------------------------------------------------------------------------------------------------
# raster -> pieces, block by block


def _blocks(height: int, width: int, block_size: int) -> Iterator[Window]:
    for r in range(0, height, block_size):
        for c in range(0, width, block_size):
            yield Window(c, r, min(block_size, width - c), min(block_size, height - r))


def _threshold_raw(dtype: np.dtype, threshold: float) -> float:
    # uint8 rasters store round(255 * p); compare in raw units so no float copy of the block is needed
    return round(threshold * 255.0, 6) if np.issubdtype(dtype, np.integer) else threshold


def threshold_mask(raw: np.ndarray, threshold: float) -> np.ndarray:
    """Building mask of stored probability values: `p >= threshold`, p = value / 255 for uint8 rasters.

    The one comparison used by vectorisation and evaluation, so both see the same pixels.
    """
    return raw >= _threshold_raw(raw.dtype, threshold)


def _prob_scale(dtype: np.dtype) -> float:
    return 1.0 / 255.0 if np.issubdtype(dtype, np.integer) else 1.0


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


def empty_footprints(crs: Any = None) -> gpd.GeoDataFrame:
    """An empty layer with the footprint schema (so that empty GeoJSON/GPKG files still carry it)."""
    return gpd.GeoDataFrame(
        {
            "scene": pd.Series([], dtype=object),
            "area_m2": pd.Series([], dtype="float64"),
            "mean_prob": pd.Series([], dtype="float64"),
            "max_prob": pd.Series([], dtype="float64"),
        },
        geometry=gpd.GeoSeries([], crs=_as_crs(crs)),
    )


BlockReader = Callable[[Window], tuple[np.ndarray, "np.ndarray | None"]]


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
    pcrs = _as_crs(crs)
    if pcrs is None:
        log.warning("%s: no CRS, polygons are in pixel coordinates", scene or "scene")
    collected: list[dict[str, np.ndarray]] = []
    try:
        for win in _blocks(height, width, block_size):
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
            pieces = _block_pieces(raw, valid, _threshold_raw(dtype, threshold), win, height, width)
            if pieces:
                collected.append(pieces)
    finally:
        if ds is not None:
            ds.close()
    if not collected:
        return empty_footprints(pcrs)
    merged = _merge_edge_pieces({k: np.concatenate([c[k] for c in collected]) for k in collected[0]})
    if transform != Affine.identity():
        merged["geom"] = shapely.transform(merged["geom"], lambda xy: np.column_stack(_apply(transform, xy[:, 0], xy[:, 1])))
    metric = _Metric(transform, pcrs, width, height, pixel_size_m)
    if pcrs is None and min_area_m2 > 0 and metric.m_per_unit is None:
        log.warning("%s: pixel space without pixel_size_m: min_area_m2 not applied", scene or "scene")
    geoms, area_m2, src = clean_polygons(merged["geom"], metric, min_area_m2, hole_area_m2, simplify_px)
    if len(geoms) == 0:
        return empty_footprints(pcrs)
    scale = _prob_scale(dtype)
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


# ---------------------------------------------------------------------------------------------------
# writers


def _schema_frame(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Footprint columns in a fixed order (extra columns kept after them), scene as text."""
    gdf = gdf.copy()
    for col in COLUMNS:
        if col not in gdf.columns:
            gdf[col] = pd.Series(dtype=object if col == "scene" else "float64")
    gdf["scene"] = gdf["scene"].astype(object)
    extra = [c for c in gdf.columns if c not in COLUMNS and c != gdf.geometry.name]
    return gdf[COLUMNS + extra + [gdf.geometry.name]]


def write_geojson(gdf: gpd.GeoDataFrame, path: str | Path) -> Path:
    """Write an RFC 7946 FeatureCollection (EPSG:4326 lon/lat, CCW exterior rings, no `crs` member).

    A layer without CRS (pixel space) is written in its own coordinates, with a warning: it is then
    plain GeoJSON, not RFC 7946. Written to a temporary file and renamed.
    """
    import pyogrio

    path = Path(path)
    gdf = _schema_frame(gdf)
    if gdf.crs is None:
        log.warning("%s: no CRS, writing pixel coordinates (not RFC 7946 georeferenced GeoJSON)", path)
        layer_options = {"COORDINATE_PRECISION": "3"}
        out = gdf
    else:
        out = gdf.to_crs(4326)
        layer_options = {"RFC7946": "YES", "COORDINATE_PRECISION": str(GEOJSON_PRECISION), "WRITE_BBOX": "NO"}
    geoms = out.geometry.values
    # RFC 7946 section 3.1.6: exterior rings counter-clockwise, holes clockwise (GDAL does it too; be sure)
    out = out.set_geometry(shapely.orient_polygons(np.asarray(geoms), exterior_cw=False), crs=out.crs)
    with atomic_path(path) as tmp:
        pyogrio.write_dataframe(out, tmp, layer=path.stem, driver="GeoJSON", layer_options=layer_options,
                                geometry_type="Polygon" if len(out) == 0 else None)
    return path


def gpkg_crs_for_raster(transform: Affine, crs: Any, width: int, height: int) -> ProjCRS | None:
    """CRS of a scene's GeoPackage: the scene's own, or the UTM zone of its centre when it is geographic.

    Pass it as `write_gpkg(..., crs=)` so that even an empty layer of a lon/lat scene is in UTM.
    """
    pcrs = _as_crs(crs)
    if pcrs is not None and pcrs.is_geographic:
        return _utm_for_raster(transform, pcrs, width, height)
    return pcrs


def write_gpkg(gdf: gpd.GeoDataFrame, path: str | Path, layer: str = "footprints",
               crs: Any = None) -> Path:
    """Write a GeoPackage layer in the layer's CRS (or `crs`; a geographic CRS becomes its UTM zone).

    An empty layer is written with its schema, so it opens as a valid, empty layer. Atomic.
    """
    import pyogrio

    path = Path(path)
    gdf = _schema_frame(gdf)
    target = _as_crs(crs) if crs is not None else gdf.crs
    if target is not None and target.is_geographic:
        target = utm_crs_for(gdf) if len(gdf) else target
    if target is not None and gdf.crs is not None and target != gdf.crs:
        gdf = gdf.to_crs(target)
    with atomic_path(path, suffix=".part.gpkg") as tmp:
        pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG",
                                geometry_type="Polygon" if len(gdf) == 0 else None)
    return path


# ---------------------------------------------------------------------------------------------------
# benchmark


def synthetic_probability(size: int = 4096, n_blobs: int = 3000, seed: int = 0) -> np.ndarray:
    """uint8 probability raster with `n_blobs` building-like blobs (rectangles, some with holes/notches)."""
    rng = np.random.default_rng(seed)
    prob = (rng.random((size, size), dtype=np.float32) * 60).astype(np.uint8)  # background noise < 0.25
    for _ in range(n_blobs):
        h, w = rng.integers(6, 40, size=2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        prob[r:r + h, c:c + w] = rng.integers(140, 255)
        if h > 12 and w > 12 and rng.random() < 0.3:  # a courtyard
            prob[r + 4:r + h - 4, c + 4:c + w - 4] = 30
        if rng.random() < 0.5:  # an L-shaped notch so outlines are not all rectangles
            prob[r:r + h // 3, c:c + w // 3] = 20
    return prob


def bench_vectorize(cfg: Any, repeats: int = 3) -> dict[str, Any]:
    """Pixels/s of `polygons_from_probability` (all cleaning, `predict.block_size` blocks) vs bare `shapes`.

    Both run on the same 4096 x 4096 synthetic raster in one process, interleaved `repeats` times; the best
    time of each is kept (the machine is shared, the minimum is the least disturbed). The bare baseline is
    only `rasterio.features.shapes` on the precomputed mask (thresholding not even counted); ours starts
    from the probabilities. ratio = ours / bare pixels per second (target >= 0.5).
    """
    size = 4096
    prob = synthetic_probability(size=size, n_blobs=3000, seed=0)
    transform = Affine(0.5, 0, 680000.0, 0, -0.5, 7460000.0)  # 0.5 m pixels in UTM 23S (Rio de Janeiro)
    crs = "EPSG:32723"
    pcfg = getattr(cfg, "predict", None)
    hole = float(getattr(pcfg, "hole_area_m2", 4.0))
    simp = float(getattr(pcfg, "simplify_px", 1.0))
    block = int(getattr(pcfg, "block_size", 2048))
    mask = prob >= 128
    mask_u8 = mask.astype(np.uint8)
    t_bare = t_ours = math.inf
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        bare = list(rasterio.features.shapes(mask_u8, mask=mask, connectivity=4, transform=transform))
        t_bare = min(t_bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        gdf = polygons_from_probability(prob, transform, crs, threshold=128 / 255, min_area_m2=5.0,
                                        hole_area_m2=hole, simplify_px=simp, block_size=block, scene="bench")
        t_ours = min(t_ours, time.perf_counter() - t0)
    px = size * size
    result = {
        "bench": "vectorize",
        "ratio": round(t_bare / t_ours, 3),
        "pixels_per_s": round(px / t_ours),
        "bare_pixels_per_s": round(px / t_bare),
        "pixels": px,
        "bare_polygons": len(bare),
        "polygons": len(gdf),
        "block_size": block,
        "seconds": round(t_ours, 3),
        "bare_seconds": round(t_bare, 3),
    }
    log.info(
        "vectorize: %.2f Mpx/s with threshold, components, shapes, block merge, hole fill, simplify, "
        "make_valid, area filter in m2 and stats (%d polygons, best of %d: %.2f s); bare "
        "rasterio.features.shapes: %.2f Mpx/s (%d polygons, %.2f s); ratio %.2f",
        px / t_ours / 1e6, len(gdf), repeats, t_ours, px / t_bare / 1e6, len(bare), t_bare, t_bare / t_ours,
    )
    return result
