"""Coordinate reference systems for outputs: the UTM zone of a place, metric work CRSs, reprojection.

Areas and simplification tolerances are measured in metres, never in degrees, and never in the "metres" of a
projection that stretches them: a scene in lon/lat, or in a projected CRS whose areas at the scene are more
than `AREA_TOLERANCE` from true (Web Mercator: 4x at 60 N), is measured in the UTM zone of its centre
(`metric_crs_for`); a UTM or national-grid scene is measured in its own CRS. A scene's GeoPackage is written in
that same CRS (`write_gpkg(..., crs=metric_crs_for(...))`, so that even an empty layer of a lon/lat scene is in
UTM).
"""

from __future__ import annotations

import math
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
import shapely.affinity
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Geod, Transformer


def apply_affine(t: Affine, x: Any, y: Any) -> tuple[Any, Any]:
    """Pixel (col, row) -> CRS (x, y); written out so it works on arrays with any `affine` version."""
    return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f


def affine_geometries(geoms: Any, t: Affine) -> list[Any]:
    """Shapely geometries through the affine `t`: a scene's transform (pixels -> CRS), or its inverse
    (`~transform`: CRS -> pixels)."""
    return [shapely.affinity.affine_transform(g, [t.a, t.b, t.d, t.e, t.c, t.f]) for g in geoms]


def as_crs(crs: Any) -> ProjCRS | None:
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


def utm_for_raster(transform: Affine, crs: ProjCRS, width: int, height: int) -> ProjCRS:
    cx, cy = apply_affine(transform, width / 2.0, height / 2.0)
    lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(cx, cy)
    return utm_crs_for(lon, lat)


def reproject(geoms: np.ndarray, src: ProjCRS, dst: ProjCRS) -> np.ndarray:
    if len(geoms) == 0 or src == dst:
        return geoms
    tr = Transformer.from_crs(src, dst, always_xy=True)

    def fn(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, fn)


# a projected CRS whose areas at a scene's centre are within this fraction of the true (ellipsoidal) areas
# is measured in as it is: UTM itself is up to ~0.2% off at the edge of a zone, national grids less; Web
# Mercator is within it only within ~4 degrees of the equator
AREA_TOLERANCE = 0.005


def _unit_m(crs: ProjCRS) -> float:
    info = crs.axis_info
    return float(info[0].unit_conversion_factor) if info and info[0].unit_conversion_factor else 1.0


def area_scale(crs: Any, x: float, y: float, step: float) -> float:
    """Map area / true area of a `step`-wide square centred at (x, y) of a projected CRS (1 = true areas;
    4 for Web Mercator at 60 N). True areas are geodesic, on the CRS's own ellipsoid."""
    pcrs = as_crs(crs)
    geodetic = pcrs.geodetic_crs or ProjCRS.from_epsg(4326)
    to_ll = Transformer.from_crs(pcrs, geodetic, always_xy=True)
    h = step / 2.0
    lon, lat = to_ll.transform([x - h, x + h, x + h, x - h], [y - h, y - h, y + h, y + h])
    true = abs(pcrs.get_geod().polygon_area_perimeter(lon, lat)[0])
    mapped = step * step * _unit_m(pcrs) ** 2
    if not (math.isfinite(true) and true > 0):
        raise ValueError(f"cannot measure the area of a square at ({x}, {y})")
    return mapped / true


def metric_crs_for(transform: Affine, crs: Any, width: int, height: int) -> ProjCRS | None:
    """Where a scene's areas, lengths and simplification are measured (None in pixel space): its own CRS
    when that is projected and true to `AREA_TOLERANCE` at the scene's centre, else (lon/lat, Web Mercator
    away from the equator, any projection that cannot be measured) the UTM zone of its centre."""
    pcrs = as_crs(crs)
    if pcrs is None:
        return None
    if pcrs.is_projected:
        cx, cy = apply_affine(transform, width / 2.0, height / 2.0)
        step = 64 * math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)) or 1.0
        try:
            if abs(area_scale(pcrs, cx, cy, step) - 1.0) <= AREA_TOLERANCE:
                return pcrs
        except Exception:  # noqa: BLE001 - pyproj raises several types; measure in UTM then
            pass
    elif not pcrs.is_geographic:
        return pcrs  # an engineering or local CRS: nothing better to measure in
    return utm_for_raster(transform, pcrs, width, height)


def pixel_size_m(transform: Affine, crs: Any, width: int, height: int) -> float | None:
    """Ground sample distance in metres at the scene centre (geometric mean of x and y); None in pixel space.

    In a CRS true to `AREA_TOLERANCE` (UTM, national grids) the pixel size in its units; elsewhere (lon/lat,
    Web Mercator) geodesic distances, so that a Mercator pixel of 1 unit at 60 N is 0.5 m."""
    pcrs = as_crs(crs)
    if pcrs is None:
        return None
    cx, cy = width / 2.0, height / 2.0
    p0 = apply_affine(transform, cx, cy)
    px = apply_affine(transform, cx + 1, cy)
    py = apply_affine(transform, cx, cy + 1)
    if metric_crs_for(transform, pcrs, width, height) == pcrs:  # true metres (or a local CRS): its units
        unit = _unit_m(pcrs)
        dx = math.hypot(px[0] - p0[0], px[1] - p0[1]) * unit
        dy = math.hypot(py[0] - p0[0], py[1] - p0[1]) * unit
    else:
        geodetic = pcrs.geodetic_crs or ProjCRS.from_epsg(4326)
        lon, lat = Transformer.from_crs(pcrs, geodetic, always_xy=True).transform(
            [p0[0], px[0], py[0]], [p0[1], px[1], py[1]])
        geod = pcrs.get_geod() or Geod(ellps="WGS84")
        dx = geod.inv(lon[0], lat[0], lon[1], lat[1])[2]
        dy = geod.inv(lon[0], lat[0], lon[2], lat[2])[2]
    return float(math.sqrt(dx * dy))
