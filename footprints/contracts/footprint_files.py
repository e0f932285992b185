"""Footprint layers: the GeoJSON and GeoPackage files `predict` writes and `evaluate` reads.

- Columns: `scene`, `area_m2` (square metres, measured in a projected CRS), `mean_prob`, `max_prob`, then
  any extra columns, then the geometry (one Polygon per row).
- `write_geojson`: RFC 7946 (EPSG:4326, lon/lat, counter-clockwise exterior rings, no `crs` member, 7
  decimals ~ 1 cm); an empty layer is a valid FeatureCollection. Atomic.
- `write_gpkg`: GeoPackage in the layer's CRS, or its UTM zone when that CRS is geographic; empty but valid
  when nothing was found. Atomic.
- `read_footprints`: a scene's layer in a target CRS, failures as one line naming the file.
- Every GeoPackage carries a default QGIS style (`layer_styles`): coloured by match status when the layer
  has `status` (evaluation), else by `mean_prob`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from ..atomic import atomic_path
from ..errors import InputError
from ..geo import as_crs, utm_crs_for
from .gpkg_style import add_layer_style

log = logging.getLogger(__name__)

COLUMNS = ["scene", "area_m2", "mean_prob", "max_prob"]
LAYER = "footprints"  # the GeoPackage layer name
RAW_LAYER = "footprints_raw"  # the outlines before regularisation, beside them
GEOJSON_PRECISION = 7  # decimal degrees: 1e-7 deg ~ 1 cm, far below any pixel


def empty_footprints(crs: Any = None) -> gpd.GeoDataFrame:
    """An empty layer with the footprint schema (so that empty GeoJSON/GPKG files still carry it)."""
    return gpd.GeoDataFrame(
        {
            "scene": pd.Series([], dtype=object),
            "area_m2": pd.Series([], dtype="float64"),
            "mean_prob": pd.Series([], dtype="float64"),
            "max_prob": pd.Series([], dtype="float64"),
        },
        geometry=gpd.GeoSeries([], crs=as_crs(crs)),
    )



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


def write_gpkg(gdf: gpd.GeoDataFrame, path: str | Path, layer: str = LAYER, crs: Any = None,
               more_layers: dict[str, gpd.GeoDataFrame] | None = None) -> Path:
    """Write a GeoPackage layer in the layer's CRS (or `crs`; a geographic CRS becomes its UTM zone), and
    `more_layers` (name -> layer, e.g. the raw outlines beside regularised ones) in the same file and CRS.

    An empty layer is written with its schema, so it opens as a valid, empty layer. Atomic.
    """
    import pyogrio

    path = Path(path)
    gdf = _schema_frame(gdf)
    target = as_crs(crs) if crs is not None else gdf.crs
    if target is not None and target.is_geographic:
        target = utm_crs_for(gdf) if len(gdf) else target
    layers = {layer: gdf, **{k: _schema_frame(v) for k, v in (more_layers or {}).items()}}
    with atomic_path(path, suffix=".part.gpkg") as tmp:
        for name, frame in layers.items():
            if target is not None and frame.crs is not None and target != frame.crs:
                frame = frame.to_crs(target)
            pyogrio.write_dataframe(frame, tmp, layer=name, driver="GPKG",
                                    geometry_type="Polygon" if len(frame) == 0 else None)
            # QGIS opens the layer coloured (match status, or probability); before the rename: the
            # file's size is part of freshness records
            add_layer_style(tmp, name)
    return path


def read_footprints(path: Path, target_crs: Any) -> gpd.GeoDataFrame:
    """The footprint layer of a scene's GeoPackage, in `target_crs` (pixel space when both have no CRS)."""
    import pyogrio

    try:
        gdf = pyogrio.read_dataframe(path, layer=LAYER)
    except Exception as err:  # noqa: BLE001 - any GDAL failure is a bad input file
        raise InputError(path, f"cannot read footprints ({' '.join(str(err).split())[:160]})") from None
    if len(gdf) and target_crs is not None:
        if gdf.crs is None:
            raise InputError(path, "footprints have no CRS but the scene has one")
        gdf = gdf.to_crs(target_crs)
    return gdf

