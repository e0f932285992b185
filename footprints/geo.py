"""Coordinate reference systems for outputs: the UTM zone of a place, metric work CRSs, reprojection.

Areas and simplification tolerances are measured in metres, never in degrees: a scene in lon/lat is
measured in the UTM zone of its centre.
"""

from __future__ import annotations

import math
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Transformer


def apply_affine(t: Affine, x: Any, y: Any) -> tuple[Any, Any]:
    """Pixel (col, row) -> CRS (x, y); written out so it works on arrays with any `affine` version."""
    return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f


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



def gpkg_crs_for_raster(transform: Affine, crs: Any, width: int, height: int) -> ProjCRS | None:
    """CRS of a scene's GeoPackage: the scene's own, or the UTM zone of its centre when it is geographic.

    Pass it as `write_gpkg(..., crs=)` so that even an empty layer of a lon/lat scene is in UTM.
    """
    pcrs = as_crs(crs)
    if pcrs is not None and pcrs.is_geographic:
        return utm_for_raster(transform, pcrs, width, height)
    return pcrs
