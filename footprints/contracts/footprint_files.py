"""Footprint layers: the GeoJSON and GeoPackage files `predict` writes and `evaluate` reads.

- Columns: `scene`, `area_m2` (square metres, measured in a projected CRS), `mean_prob`, `max_prob`, then
  any extra columns, then the geometry (one Polygon per row).
- `write_geojson`: RFC 7946 (EPSG:4326, lon/lat, counter-clockwise exterior rings, no `crs` member, 7
  decimals ~ 1 cm); an empty layer is a valid FeatureCollection. Atomic.
- `write_gpkg`: GeoPackage in the layer's CRS, or its UTM zone when that CRS is geographic; empty but valid
  when nothing was found. Atomic.
- `read_footprints`: a scene's layer in a target CRS, failures as one line naming the file.
- `merge_scene_layers` (and `merge_outputs`, predict's use of it): many scenes' layers merged into one
  GeoJSON and one GeoPackage, streamed one scene at a time (`geojson_stream`, `gpkg_stream`), so that
  memory does not grow with the number of scenes; the files are what `write_geojson`/`write_gpkg` would
  write of the concatenated layers.
- The merged GeoPackage's CRS never distorts a scene: the scenes' own CRS when they share one (a
  single-zone run), else the UTM zone of the merged layer's lon/lat centre when every scene lies close
  enough to that zone's central meridian that the zone's scale error stays within `MAX_SCALE_ERROR`
  (0.2%, about 4 degrees of longitude at the equator, hardly more than a UTM zone's own edge: neighbouring
  zones), else EPSG:4326 (lon/lat, like the GeoJSON: e.g. Missouri and Portugal in one run). `area_m2` is
  always the value measured in each scene's own projected CRS, whatever the merged layer's CRS.
- `is_footprints_file`: whether an existing GeoJSON/GeoPackage is one footprints wrote (a layer with the
  footprint columns, or the QGIS style it adds): outputs replace only such files, never a user's own.
- Every GeoPackage carries a default QGIS style (`layer_styles`): coloured by damage grade when the layer
  has `damage` (the damage stage), by match status when it has `status` (evaluation), else by `mean_prob`.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from ..atomic import atomic_path
from ..errors import InputError
from ..scenes.geo import as_crs, utm_crs_for, utm_epsg
from .gpkg_style import add_layer_style

log = logging.getLogger(__name__)

COLUMNS = ["scene", "area_m2", "mean_prob", "max_prob"]
LAYER = "footprints"  # the GeoPackage layer name
RAW_LAYER = "footprints_raw"  # the outlines before regularisation, beside them
GEOJSON_PRECISION = 7  # decimal degrees: 1e-7 deg ~ 1 cm, far below any pixel
# rows per GeoPackage append of a streamed layer: each append is a SQLite transaction synced to disk, a fixed
# cost far above a row's (time `pyogrio.write_dataframe(gdf, path, layer=..., append=True)` of a few rows
# to see it), so scenes are gathered up to this many rows (a few MB, whatever the number of scenes) before
# one is made
GPKG_BATCH_ROWS = 20_000
# the largest scale error (|k - 1|, linear) a merged GeoPackage may have at any of its scenes: 0.1% at the
# edge of a UTM zone, 0.2% about 4 degrees of longitude from its central meridian at the equator
MAX_SCALE_ERROR = 0.002
UTM_K0 = 0.9996


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


def write_geojson(gdf: gpd.GeoDataFrame, path: str | Path, schema: bool = True) -> Path:
    """Write an RFC 7946 FeatureCollection (EPSG:4326 lon/lat, CCW exterior rings, no `crs` member); with
    `schema` false the layer's own columns as they are (a user's footprints), else the footprint schema's first.

    A layer without CRS (pixel space) is written in its own coordinates, with a warning: it is then
    plain GeoJSON, not RFC 7946. Written to a temporary file and renamed.
    """
    import pyogrio

    path = Path(path)
    if gdf.crs is None:
        log.warning("%s: no CRS, writing pixel coordinates (not RFC 7946 georeferenced GeoJSON)", path)
    out, layer_options = _geojson_layer(gdf, schema)
    with atomic_path(path) as tmp:
        pyogrio.write_dataframe(out, tmp, layer=path.stem, driver="GeoJSON", layer_options=layer_options,
                                geometry_type="Polygon" if len(out) == 0 else None)
    return path


def _geojson_layer(gdf: gpd.GeoDataFrame, schema: bool = True) -> tuple[gpd.GeoDataFrame, dict[str, str]]:
    """The layer as `write_geojson` writes it (schema order, EPSG:4326 or pixel space, oriented rings) and
    GDAL's layer options for it."""
    gdf = _schema_frame(gdf) if schema else gdf
    if gdf.crs is None:
        layer_options = {"COORDINATE_PRECISION": "3"}
        out = gdf
    else:
        out = gdf.to_crs(4326)
        layer_options = {"RFC7946": "YES", "COORDINATE_PRECISION": str(GEOJSON_PRECISION), "WRITE_BBOX": "NO"}
    geoms = out.geometry.values
    # RFC 7946 section 3.1.6: exterior rings counter-clockwise, holes clockwise (GDAL does it too; be sure)
    out = out.set_geometry(shapely.orient_polygons(np.asarray(geoms), exterior_cw=False), crs=out.crs)
    return out, layer_options


def write_gpkg(gdf: gpd.GeoDataFrame, path: str | Path, layer: str = LAYER, crs: Any = None,
               more_layers: dict[str, gpd.GeoDataFrame] | None = None, schema: bool = True) -> Path:
    """Write a GeoPackage layer in the layer's CRS (or `crs`; a geographic CRS becomes its UTM zone), and
    `more_layers` (name -> layer, e.g. the raw outlines beside regularised ones) in the same file and CRS;
    `schema` as `write_geojson`'s.

    An empty layer is written with its schema, so it opens as a valid, empty layer. Atomic.
    """
    import pyogrio

    path = Path(path)
    gdf = _schema_frame(gdf) if schema else gdf
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
            # QGIS opens the layer coloured (damage grade, match status, or probability); before the
            # rename: the file's size is part of freshness records
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



# ---------------------------------------------------------------------------------------------- merging
class GeoJSONWriter:
    """The features of an open FeatureCollection (see `geojson_stream`), added a layer at a time."""

    def __init__(self, out: TextIO, crs: Any, name: str) -> None:
        self.crs = as_crs(crs)
        self.name = name
        self.count = 0  # features written
        self._out = out
        # the collection's members as GDAL writes them (type, name, coordinate resolution), features last
        header = {k: v for k, v in _encode_geojson(empty_footprints(self.crs), name).items() if k != "features"}
        out.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "features": [\n')

    def write(self, gdf: gpd.GeoDataFrame) -> None:
        if not len(gdf):
            return
        if (gdf.crs is None) != (self.crs is None):
            raise ValueError(f"{self.name}: a layer {'without' if gdf.crs is None else 'with'} a CRS in a "
                             f"collection {'with' if self.crs is not None else 'without'} one")
        for feature in _encode_geojson(gdf, self.name)["features"]:
            self._out.write((",\n" if self.count else "") + json.dumps(feature, ensure_ascii=False))
            self.count += 1

    def close(self) -> None:
        self._out.write("\n]\n}\n" if self.count else "]\n}\n")


@contextmanager
def geojson_stream(path: str | Path, crs: Any = 4326) -> Iterator[GeoJSONWriter]:
    """An RFC 7946 FeatureCollection written a layer at a time (`writer.write(gdf)`, e.g. one scene each):
    the file `write_geojson` writes of the layers' concatenation, holding one layer in memory at a time.

    GDAL's GeoJSON driver edits a file in memory (an update reads it whole), so it cannot append in bounded
    memory: each layer is encoded by GDAL with `write_geojson`'s options into a buffer and its features are
    copied into the open collection, one a line. `crs`: EPSG:4326, or None for pixel coordinates (layers
    must then have no CRS either). Atomic: a temporary name, renamed when the block ends without error.
    """
    path = Path(path)
    if as_crs(crs) is None:
        log.warning("%s: no CRS, writing pixel coordinates (not RFC 7946 georeferenced GeoJSON)", path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        writer = GeoJSONWriter(out, crs, path.stem)
        yield writer
        writer.close()


def _encode_geojson(gdf: gpd.GeoDataFrame, name: str) -> dict[str, Any]:
    """The FeatureCollection GDAL writes of `gdf` with `write_geojson`'s options (one layer: bounded)."""
    import pyogrio

    out, layer_options = _geojson_layer(gdf)
    buf = io.BytesIO()
    pyogrio.write_dataframe(out, buf, layer=name, driver="GeoJSON", layer_options=layer_options,
                            geometry_type="Polygon" if len(out) == 0 else None)
    return json.loads(buf.getvalue())


class GpkgWriter:
    """A GeoPackage layer being written a layer at a time (see `gpkg_stream`)."""

    def __init__(self, path: Path, layer: str, crs: Any, fields: Mapping[str, str] | None) -> None:
        self.path = path
        self.layer = layer
        self.crs = as_crs(crs)
        self.fields = dict(fields) if fields is not None else _fields_of(empty_footprints())
        self.count = 0  # rows written
        self._pending: list[gpd.GeoDataFrame] = []
        self._pending_rows = 0

    def write(self, gdf: gpd.GeoDataFrame) -> None:
        if not len(gdf):
            return
        frame = _schema_frame(_conform(gdf, self.fields))
        if self.crs is not None and frame.crs is not None and frame.crs != self.crs:
            frame = frame.to_crs(self.crs)
        self._pending.append(frame)
        self._pending_rows += len(frame)
        if self._pending_rows >= GPKG_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyogrio

        if not self._pending and self.path.exists():
            return
        if not self._pending:  # nothing written: the schema, as an empty but valid layer
            frame = _schema_frame(_conform(empty_footprints(self.crs), self.fields))
        elif len(self._pending) == 1:
            frame = self._pending[0]
        else:
            first = self._pending[0]
            frame = gpd.GeoDataFrame(pd.concat(self._pending, ignore_index=True), geometry=first.geometry.name,
                                     crs=first.crs)
        self._pending, self._pending_rows = [], 0
        # the first write makes the table (with every field of the merge), the others append to it
        pyogrio.write_dataframe(frame, self.path, layer=self.layer, driver="GPKG", append=self.path.exists(),
                                geometry_type="Polygon" if len(frame) == 0 else None)
        self.count += len(frame)

    def close(self) -> None:
        self._flush()
        # before the rename: the file's size is part of freshness records
        add_layer_style(self.path, self.layer)


@contextmanager
def gpkg_stream(path: str | Path, layer: str = LAYER, crs: Any = None,
                fields: Mapping[str, str] | None = None) -> Iterator[GpkgWriter]:
    """A GeoPackage layer written a layer at a time (`writer.write(gdf)`, appended with pyogrio in batches
    of at most about `GPKG_BATCH_ROWS` rows): in `crs` (layers in another CRS are reprojected; None keeps
    theirs), with the columns `fields` (name -> dtype, after the footprint columns; missing ones null) so
    that every append fits the table the first write made. Empty but valid when nothing was written; styled
    for QGIS like `write_gpkg`; atomic."""
    with atomic_path(Path(path), suffix=".part.gpkg") as tmp:
        writer = GpkgWriter(tmp, layer, crs, fields)
        yield writer
        writer.close()


def _fields_of(gdf: gpd.GeoDataFrame) -> dict[str, str]:
    return {c: str(gdf[c].dtype) for c in gdf.columns if c != gdf.geometry.name}


def _conform(gdf: gpd.GeoDataFrame, fields: Mapping[str, str]) -> gpd.GeoDataFrame:
    """`gdf` with the columns `fields` (missing ones null, of their dtype) and then its own others.

    A column that is null throughout reads back untyped (object) from GeoJSON, e.g. the probabilities of a
    scene whose matches are all missed truths: it takes the field's dtype too, or the first scene written
    would make it a text field."""
    geom = gdf.geometry.name
    nulls = [name for name, dtype in fields.items()
             if name not in gdf.columns or (str(gdf[name].dtype) != dtype and bool(gdf[name].isna().all()))]
    if not nulls:
        return gdf
    gdf = gdf.copy()
    for name in nulls:
        dtype = fields[name]
        dtype = "Int64" if dtype.startswith(("int", "uint")) else "boolean" if dtype == "bool" else dtype
        gdf[name] = pd.Series([None] * len(gdf), index=gdf.index, dtype=dtype)
    order = [c for c in fields if c != geom] + [c for c in gdf.columns if c not in fields and c != geom]
    return gdf[[*order, geom]]


@dataclass(frozen=True)
class SceneLayer:
    """One scene's layer for `merge_scene_layers`: its GeoJSON (RFC 7946, or pixel coordinates when
    `georeferenced` is false) and, when it has one, its GeoPackage (layer `LAYER`, in the scene's CRS)."""

    scene_id: str
    geojson: Path
    gpkg: Path | None = None
    georeferenced: bool = True


@dataclass
class _Survey:
    """What the files of a merge hold, without their features: column union, bounding box, CRSs."""

    fields: dict[str, str]
    bounds: list[float] | None = None  # minx, miny, maxx, maxy of the files with features
    crss: set[str] = field(default_factory=set)


def _survey(paths: Iterable[Path], template: gpd.GeoDataFrame, layer: str | None = None) -> _Survey:
    import pyogrio

    out = _Survey(_fields_of(template))
    for path in paths:
        info = pyogrio.read_info(path, layer=layer, force_total_bounds=True)
        for name, dtype in zip(info["fields"], info["dtypes"], strict=True):
            out.fields.setdefault(str(name), str(dtype))
        crs = as_crs(info["crs"]) if info.get("crs") else None
        out.crss.add(crs.to_string() if crs is not None else "")
        bounds = info.get("total_bounds")
        if info.get("features") and bounds is not None and np.all(np.isfinite(bounds)):
            b = [float(v) for v in bounds]
            out.bounds = b if out.bounds is None else [min(out.bounds[0], b[0]), min(out.bounds[1], b[1]),
                                                       max(out.bounds[2], b[2]), max(out.bounds[3], b[3])]
    return out


def _read_layer(path: Path, layer: str | None, pixel: bool) -> gpd.GeoDataFrame:
    """One scene's file; a pixel-space GeoJSON reads back as lon/lat (GeoJSON's default): its CRS dropped."""
    import pyogrio

    frame = pyogrio.read_dataframe(path, layer=layer)
    if pixel:
        frame = gpd.GeoDataFrame(frame.drop(columns=frame.geometry.name),
                                 geometry=np.asarray(frame.geometry.values), crs=None)
    return frame


def merge_scene_layers(scenes: Iterable[SceneLayer], geojson_path: str | Path, gpkg_path: str | Path, *,
                       layer: str = LAYER, schema: gpd.GeoDataFrame | None = None) -> int:
    """Merged GeoJSON (RFC 7946) and GeoPackage (`layer`) of `scenes`, written one scene at a time; returns
    the number of polygons.

    - Scenes in scene-id order, each file's rows in order. Pixel-space scenes are merged only when every
      scene is in pixel space (else left out, with a warning; their own files remain).
    - The GeoPackage keeps the scenes' CRS when their GeoPackages share one, else (or without them) the UTM
      zone of the merged layer's lon/lat centre when it distorts no scene (`one_utm_zone`), else EPSG:4326;
      `area_m2` stays the per-scene value measured in each scene's own UTM/projected CRS.
    - Columns: those of `schema` (default: the footprint columns), then the others the files have, null where
      a scene lacks them; an empty but valid layer when there is nothing.

    Memory holds one scene's layer, at most `GPKG_BATCH_ROWS` rows waiting for the GeoPackage, and a few
    numbers per merge (a column union, a bounding box, the CRSs), whatever the number of scenes: each file
    is surveyed (`read_info`) and then read once.
    """
    scenes = sorted(scenes, key=lambda s: s.scene_id)
    geo = [s for s in scenes if s.georeferenced]
    pixel = [s for s in scenes if not s.georeferenced]
    if geo and pixel:
        log.warning("merged layers leave out %d scene(s) in pixel coordinates (%s); their own files remain",
                    len(pixel), ", ".join(s.scene_id for s in pixel[:5]))
    chosen = geo or pixel
    in_pixels = not geo
    template = schema if schema is not None else empty_footprints()
    gj = _survey((s.geojson for s in chosen), template)
    with geojson_stream(geojson_path, None if in_pixels else 4326) as out:
        for s in chosen:
            out.write(_conform(_read_layer(s.geojson, None, in_pixels), gj.fields))
    n = out.count

    sources: list[tuple[Path, str | None]] = [(s.geojson, None) for s in chosen]
    fields, target = gj.fields, None if in_pixels else as_crs(4326)
    if chosen and all(s.gpkg is not None for s in chosen):
        gp = _survey((s.gpkg for s in chosen if s.gpkg is not None), template, layer=LAYER)
        if len(gp.crss) == 1:
            (one,) = gp.crss
            sources = [(s.gpkg, LAYER) for s in chosen if s.gpkg is not None]
            fields, target = gp.fields, as_crs(one) if one else None
    if target is not None and target.is_geographic and n and gj.bounds is not None:
        zone = one_utm_zone(gj.bounds)
        if zone is None:
            log.info("%s: the scenes lie in several UTM zones too far apart for one; the GeoPackage is in "
                     "EPSG:4326 (area_m2 as measured in each scene's own CRS)", Path(gpkg_path).name)
        target = zone if zone is not None else target
    with gpkg_stream(gpkg_path, layer=layer, crs=target, fields=fields) as gpkg:
        for path, lyr in sources:
            gpkg.write(_read_layer(path, lyr, in_pixels and lyr is None))
    return n


def one_utm_zone(bounds: Sequence[float]) -> Any:
    """The UTM zone of the lon/lat centre of `bounds` (minx, miny, maxx, maxy in degrees) when its scale
    error stays within `MAX_SCALE_ERROR` over the whole box, else None (the box spans several zones).

    Transverse Mercator's scale at a longitude difference dl from the central meridian and latitude phi is
    about k0 (1 + (dl cos phi)^2 / 2): the box's worst point is its farthest longitude at its latitude
    nearest the equator."""
    minx, miny, maxx, maxy = (float(v) for v in bounds)
    if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
        return None
    lon, lat = (minx + maxx) / 2.0, (miny + maxy) / 2.0
    epsg = utm_epsg(lon, lat)
    meridian = (epsg % 100) * 6.0 - 183.0
    dlon = max(abs(minx - meridian), abs(maxx - meridian))
    if dlon >= 90.0:
        return None
    nearest = 0.0 if miny <= 0.0 <= maxy else min(abs(miny), abs(maxy))
    x = math.radians(dlon) * math.cos(math.radians(nearest))
    if abs(UTM_K0 * (1.0 + x * x / 2.0) - 1.0) > MAX_SCALE_ERROR:
        return None
    return utm_crs_for(lon, lat)


def merge_outputs(results: Sequence[Mapping[str, Any]], geojson_path: str | Path, gpkg_path: str | Path) -> int:
    """predict's merged `footprints.geojson` and `footprints.gpkg` from its per-scene results (`scene_id`,
    `crs` ("" in pixel space), `geojson`, `gpkg`), streamed by `merge_scene_layers`; returns the number of
    polygons."""
    return merge_scene_layers(
        (SceneLayer(str(r["scene_id"]), Path(r["geojson"]), Path(r["gpkg"]), bool(r.get("crs"))) for r in results),
        geojson_path, gpkg_path)
