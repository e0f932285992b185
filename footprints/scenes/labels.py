"""Building labels behind one small interface: xView2 label JSON, vector files, mask rasters.

A `LabelSource` answers three questions on a scene's output grid (pixel coordinates, origin at the
top-left corner of the top-left pixel):

- `burn(r0, r1, c0, c1)`: the 0/1 building raster of output rows r0:r1, columns c0:c1 (inside the scene);
- `instances(r0, r1, c0, c1)`: int32 instance ids of the same window (0 background, one id per building;
  a mask raster's connected components, where touching buildings stay merged);
- `polygons()`: the building outlines in output-grid pixel coordinates (instances, one per building),
  when the source has them (`has_polygons`); a mask raster has none (its buildings touch and merge).

`PolygonLabels` holds outlines (from an xView2 label JSON or a GeoJSON/GPKG file); `MaskLabels` reads a mask
raster window by window. Parsing the files is here too: `read_xview2_label` (which also gives the vertex
pairs that georeference an xView2 PNG) and `read_vector_polygons`. Bad files raise `InputError` naming them.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError, one_line, printable
from .georef import WGS84, vertex_pairs
from .rasters import check_regular_file, describe_head, gdal_name, open_raster

log = logging.getLogger(__name__)


class LabelSource:
    """Building labels on a scene's output grid (see the module docstring)."""

    path: Path
    has_polygons: bool = False

    def burn(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        raise NotImplementedError

    def instances(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Connected components (4-connected) of the building raster: the fallback for sources without
        outlines."""
        from scipy import ndimage

        ids, _ = ndimage.label(self.burn(r0, r1, c0, c1), structure=ndimage.generate_binary_structure(2, 1))
        return ids.astype(np.int32)

    def polygons(self) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (mask rasters)."""


class PolygonLabels(LabelSource):
    """Building outlines in output-grid pixel coordinates."""

    has_polygons = True

    def __init__(self, path: Path, polygons: list[Any]):
        self.path = path
        self._polygons = [g for g in polygons if g is not None and not g.is_empty]
        self.repaired = _repair(self._polygons)
        if self.repaired:
            log.warning("%s: %d self-intersecting label polygon(s) repaired (make_valid keeps all of their "
                        "area)", printable(path), self.repaired)

    def polygons(self) -> list[Any]:
        return list(self._polygons)

    def burn(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self._rasterize(r0, r1, c0, c1, instances=False)

    def instances(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Each outline rasterised with its own id (its index + 1); a later outline wins a shared pixel."""
        return self._rasterize(r0, r1, c0, c1, instances=True)

    def _rasterize(self, r0: int, r1: int, c0: int, c1: int, instances: bool) -> np.ndarray:
        from rasterio import features
        from shapely.geometry import box

        shape = (r1 - r0, c1 - c0)
        dtype = np.int32 if instances else np.uint8
        frame = box(c0, r0, c1, r1)
        shapes = [(g, i + 1 if instances else 1) for i, g in enumerate(self._polygons) if g.intersects(frame)]
        if not shapes:
            return np.zeros(shape, dtype=dtype)
        # pixel-space polygons, integer translation: the same pixels as rasterising the whole scene
        return features.rasterize(shapes, out_shape=shape, transform=Affine.translation(c0, r0), fill=0,
                                  dtype=dtype)

    def check_inside(self, width: int, height: int, image: Path) -> None:
        """Refuse labels that lie entirely outside the image (a wrong file, or a wrong CRS)."""
        from shapely.geometry import box

        if self._polygons and not any(g.intersects(box(0, 0, width, height)) for g in self._polygons):
            raise InputError(self.path, f"all {len(self._polygons)} label polygons lie entirely outside the "
                             f"image {image.name}")


def _repair(polygons: list[Any]) -> int:
    """Make invalid outlines (bow-ties, self-touching rings) valid in place, keeping their polygonal parts;
    returns how many were repaired. Rasterising an invalid outline would keep about half of a bow-tie."""
    import shapely

    bad = [i for i, g in enumerate(polygons) if not g.is_valid]
    for i in bad:
        fixed = shapely.make_valid(polygons[i])
        parts = [p for p in shapely.get_parts(fixed) if p.geom_type in ("Polygon", "MultiPolygon")]
        polygons[i] = shapely.union_all(parts) if parts else fixed
    return len(bad)


@dataclass
class MaskGrid:
    """How the output grid maps onto the source grid of a mask raster (the image's grid)."""

    src_width: int
    src_height: int
    sx: float  # source pixels per output pixel, along x
    sy: float
    resampled: bool
    row_off: int = 0  # output rows above the scene's first row (a band of rows of the image)


class MaskLabels(LabelSource):
    """A building mask raster on the image grid: pixel values >= `threshold` are buildings."""

    def __init__(self, path: Path, grid: MaskGrid, threshold: int, image_transform: Affine, image: Path):
        self.path = path
        self._grid = grid
        self._threshold = threshold
        check_regular_file(path, "mask", missing="mask file missing")
        self._ds = open_raster(path, "mask")
        m = self._ds
        if (m.width, m.height) != (grid.src_width, grid.src_height):
            self.close()
            raise InputError(path, f"label/image size mismatch: mask is {m.width}x{m.height}, image "
                             f"{image.name} is {grid.src_width}x{grid.src_height}")
        if m.crs is not None and not m.transform.almost_equals(image_transform, precision=1e-9):
            self.close()
            raise InputError(path, "mask grid differs from the image grid (transform mismatch)")

    def burn(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        g = self._grid
        r0, r1 = r0 + g.row_off, r1 + g.row_off
        try:
            if not g.resampled:
                data = self._ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
            else:
                win = Window(c0 * g.sx, r0 * g.sy, (c1 - c0) * g.sx, (r1 - r0) * g.sy)
                data = self._ds.read(1, window=win, out_shape=(r1 - r0, c1 - c0), resampling=Resampling.nearest)
        except RasterioError as err:
            raise InputError(self.path, f"cannot read mask ({' '.join(str(err).split())[:160]})") from None
        # a declared mask nodata (SpaceNet masks say 0) is ignored on purpose: 0 means background
        return (data >= self._threshold).astype(np.uint8)

    def polygons(self) -> list[Any]:
        raise NotImplementedError("a mask raster has no building outlines; vectorise burn() instead")

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None


# ---------------------------------------------------------------------------------------------------
# parsing label files


@dataclass
class XView2Label:
    """An xView2 label JSON: building outlines in source-grid pixels, their lon/lat twins, metadata."""

    path: Path
    polygons: list[Any]  # `features.xy`, pixel coordinates of the source image
    lnglat: list[Any] | None  # `features.lng_lat`, paired with `polygons` (same order), or None
    metadata: dict[str, Any] = field(default_factory=dict)
    properties: list[dict[str, Any]] = field(default_factory=list)  # each building's (uid, subtype: its grade)

    def vertex_pairs(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Matching (pixel, lon/lat) vertices of every building, or None without lng_lat features."""
        if self.lnglat is None:
            return None
        return vertex_pairs(self.polygons, self.lnglat)

    @property
    def gsd_m(self) -> float | None:
        gsd = self.metadata.get("gsd")
        return float(gsd) if isinstance(gsd, (int, float)) and gsd > 0 else None


def _parse_wkt_list(path: Path, items: list, key: str) -> list[tuple[dict[str, Any], Any]]:
    """(properties, polygon) of every building of `features.<key>` (other feature types left out)."""
    import shapely
    from shapely import wkt as shp_wkt

    out = []
    for i, feat in enumerate(items):
        if not isinstance(feat, dict) or not isinstance(feat.get("wkt"), str):
            raise InputError(path, f"malformed label JSON (features.{key}[{i}] has no 'wkt' string)")
        props = feat.get("properties") or {}
        if props.get("feature_type", "building") != "building":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NaN coordinates: said below, naming the feature
                geom = shp_wkt.loads(feat["wkt"])
        except (shapely.errors.ShapelyError, ValueError, TypeError) as err:
            raise InputError(path, f"invalid WKT in features.{key}[{i}] ({one_line(err)[:120]})") from None
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise InputError(path, f"invalid WKT in features.{key}[{i}]: {geom.geom_type}, not a polygon")
        out.append((props, geom))
    return out


def read_xview2_label(path: Path, image_size: tuple[int, int], image: Path) -> XView2Label:
    """Parse an xView2 label JSON; `image_size` (width, height) must match its metadata when it has one."""
    check_regular_file(path, "label JSON", missing="label JSON missing")
    try:
        label = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"malformed label JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"unreadable label JSON ({one_line(err)})") from None
    feats = label.get("features") if isinstance(label, dict) else None
    if not isinstance(feats, dict) or not isinstance(feats.get("xy", []), list):
        raise InputError(path, "malformed label JSON (no 'features' object with an 'xy' list)")
    meta = label.get("metadata") or {}
    w, h = meta.get("width"), meta.get("height")
    if isinstance(w, int) and isinstance(h, int) and (w, h) != tuple(image_size):
        raise InputError(path, f"label/image size mismatch: label says {w}x{h}, image {image.name} is "
                         f"{image_size[0]}x{image_size[1]}")
    xy_items = _parse_wkt_list(path, feats.get("xy", []), "xy")
    xy = [(p.get("uid"), g) for p, g in xy_items]
    ll = [(p.get("uid"), g) for p, g in _parse_wkt_list(path, feats.get("lng_lat", []) or [], "lng_lat")]
    polygons = [g for _, g in xy]
    paired: list[Any] | None = None
    if ll:
        by_uid = {uid: g for uid, g in ll if uid is not None}
        if len(by_uid) == len(ll) and all(uid in by_uid for uid, _ in xy):
            paired = [by_uid[uid] for uid, _ in xy]
        elif len(ll) == len(xy):
            paired = [g for _, g in ll]
        else:
            raise InputError(path, f"{len(xy)} xy features but {len(ll)} lng_lat features")
    return XView2Label(path, polygons, paired, meta if isinstance(meta, dict) else {}, [p for p, _ in xy_items])


# vector label formats read (decided from the file's first bytes, then checked against the driver OGR used):
# none of them points at other files or URLs, unlike an OGR VRT (XML) or a GeoJSON CRS given as a link
VECTOR_DRIVERS = {"GeoJSON": "GeoJSON", "GPKG": "GeoPackage", "ESRI Shapefile": "Shapefile"}
_SINGLE_LAYER = {"GeoJSON", "ESRI Shapefile"}  # formats that hold exactly one layer
_BUILDING_LAYER = re.compile(r"build|footprint", re.IGNORECASE)


def _sniff_vector(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as err:
        raise InputError(path, f"cannot read vector labels ({err.strerror or err})") from None
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "GeoJSON"
    if head.startswith(b"SQLite format 3\x00") and head[68:72] in (b"GPKG", b"GP10", b"GP11"):
        return "GPKG"
    if head.startswith(b"\x00\x00\x27\x0a"):
        return "ESRI Shapefile"
    return None


def _crs_members(obj: Any) -> Iterator[Any]:
    """The `crs` members OGR reads in a GeoJSON document: the collection's, each feature's and geometry's."""
    if not isinstance(obj, dict):
        return
    items = [obj]
    feats = obj.get("features")
    if isinstance(feats, list):
        for feat in feats:
            if isinstance(feat, dict):
                items += [feat, feat.get("geometry")]
    items.append(obj.get("geometry"))
    for item in items:
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(key, str) and key.lower() == "crs":
                    yield value


def _check_geojson_crs(path: Path) -> None:
    """Refuse a GeoJSON whose CRS is a link or URL: OGR would fetch it (a request to any server)."""
    data = path.read_bytes()
    if not re.search(rb"(?i)crs|\\u", data):  # no crs member, even spelt with escapes: nothing to look at
        return
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return  # OGR says it is unreadable
    for crs in _crs_members(doc):
        if not isinstance(crs, dict):
            continue
        kind = str(crs.get("type", "")).lower()
        props = crs.get("properties") if isinstance(crs.get("properties"), dict) else {}
        keys = {str(k).lower() for k in props}
        if kind in ("link", "url") or keys & {"href", "url"}:
            raise InputError(path, f"its CRS is a {kind or 'link'} to {str(props.get('href') or props.get('url'))[:80]!r}: "
                             "links are not followed (write the CRS as a name, e.g. EPSG:32633, or use RFC 7946 "
                             "lon/lat)")


def _choose_layer(path: Path, driver: str, layers: Any, wanted: str | None) -> str | None:
    """The layer to read (see `read_vector_polygons`)."""
    names = [str(row[0]) for row in layers]
    kinds = {str(row[0]): "table" if row[1] is None else str(row[1]).lower() for row in layers}
    shown = ", ".join(repr(n) for n in names)
    if wanted:
        if wanted in names:
            return wanted
        if driver in _SINGLE_LAYER and len(names) == 1:
            return names[0]  # a GeoJSON/Shapefile has one layer, named after the file
        raise InputError(path, f"has no layer {wanted!r} (data.label_layer); its layers: {shown or 'none'}")
    if len(names) <= 1:
        return names[0] if names else None
    # layers that can hold outlines (not points, lines, or tables without geometry)
    polygonal = [n for n in names if "polygon" in kinds[n] or kinds[n] in ("unknown", "geometry")]
    building = [n for n in polygonal if _BUILDING_LAYER.search(n)]
    pick = building[0] if len(building) == 1 else polygonal[0] if len(polygonal) == 1 else None
    if pick is None:
        raise InputError(path, f"has {len(names)} layers ({shown}) and none is plainly the buildings (the only "
                         "polygon layer, or the only one named like building/footprint); set data.label_layer")
    log.warning("%s: %d layers (%s); reading %r (set data.label_layer to choose)", printable(path), len(names),
                shown, pick)
    return pick


def read_vector_polygons(path: Path, crs: Any, transform: Affine, layer: str | None = None) -> list[Any]:
    """Polygons of a GeoJSON/GPKG/Shapefile label file in output-grid pixel coordinates of a grid (`crs`,
    `transform`): `read_vector_labels` without attributes."""
    return read_vector_labels(path, crs, transform, layer)[0]


def read_vector_labels(path: Path, crs: Any, transform: Affine, layer: str | None = None,
                       columns: Sequence[str] = ()) -> tuple[list[Any], dict[str, list[Any]]]:
    """(polygons, {column: each polygon's value}) of a GeoJSON/GPKG/Shapefile label file, the polygons in
    output-grid pixel coordinates of a grid (`crs`, `transform`); of `columns`, those the layer has.

    GeoJSON without a CRS is WGS84 (RFC 7946); other formats must declare one. Invalid outlines are repaired.
    The file is untrusted: its format is decided from its content (`VECTOR_DRIVERS`; never an OGR VRT), a
    CRS given as a link is refused (OGR would fetch it), a feature whose coordinates are not finite, or
    cannot be placed in the scene's CRS, refuses the file naming the feature.

    Layers (`layer` = `data.label_layer`): when given, that layer (a file without it is refused, naming its
    layers; a GeoJSON/Shapefile, which has one layer, is read whatever its name). When not given, a file of
    one layer is read; of several, the one polygon layer named like building/footprint (or the only polygon
    layer), said in one warning line; else the file is refused, naming its layers.
    """
    import pyogrio
    import pyogrio.raw
    import shapely

    from .geo import affine_geometries, as_crs, reproject

    check_regular_file(path, "vector labels", missing="label file missing")
    driver = _sniff_vector(path)
    if driver is None:
        raise InputError(path, "unreadable vector labels: not a GeoJSON, GeoPackage or Shapefile (the file is "
                         f"{describe_head(_head_bytes(path))}); other formats are not read")
    if driver == "GeoJSON":
        _check_geojson_crs(path)
    try:
        with warnings.catch_warnings(), gdal_name(path) as name:
            warnings.simplefilter("ignore")
            # a GeoJSON or Shapefile holds one layer: no need to list them (a GeoJSON is parsed at each open)
            chosen = None if driver in _SINGLE_LAYER else _choose_layer(path, driver, pyogrio.list_layers(name),
                                                                        layer)
            info = pyogrio.read_info(name, layer=chosen)
            opened_as = info.get("driver")
            if opened_as != driver:
                raise InputError(path, f"read as {opened_as}, not {VECTOR_DRIVERS[driver]}; not read")
            present = [c for c in columns if c in set(info["fields"])]
            meta, _, wkb, field_data = pyogrio.raw.read(name, layer=chosen, columns=present, force_2d=True)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - pyogrio raises many types for a bad file
        raise InputError(path, f"unreadable vector labels ({one_line(err, path)})") from None
    if wkb is None or len(wkb) == 0:
        return [], {c: [] for c in present}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an invalid geometry is reported below, naming the feature
        geoms = shapely.from_wkb(np.asarray(wkb, dtype=object), on_invalid="ignore")
    bad = np.flatnonzero(shapely.is_missing(geoms) & np.array([w is not None for w in wkb]))
    if len(bad):
        raise InputError(path, f"feature {int(bad[0])}: unreadable geometry (non-finite coordinates or an unclosed "
                         f"ring){f'; {len(bad)} such features' if len(bad) > 1 else ''}")
    src_crs = as_crs(meta.get("crs"))
    if src_crs is None:
        if driver != "GeoJSON":
            raise InputError(path, "vector labels have no CRS")
        src_crs = as_crs(WGS84)  # RFC 7946: GeoJSON coordinates are WGS84 lon/lat
    keep = []
    for i, geom in enumerate(geoms):
        if geom is None or geom.is_empty:
            continue
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise InputError(path, f"feature {i} is a {geom.geom_type}, not a polygon")
        keep.append(i)
    _check_finite(path, geoms, keep, "non-finite (NaN or infinite) coordinates")
    dst = as_crs(crs)
    if dst is not None and not src_crs.equals(dst):
        geoms = geoms.copy()
        geoms[keep] = reproject(geoms[keep], src_crs, dst)
        _check_finite(path, geoms, keep, f"coordinates outside the area where {src_crs.to_string()} can be "
                      "placed in the scene's CRS")
    valid = [geoms[i] if geoms[i].is_valid else shapely.make_valid(geoms[i]) for i in keep]
    out = affine_geometries(valid, ~transform)  # CRS -> output-grid pixel coordinates
    return out, {c: [values[i] for i in keep] for c, values in zip(present, field_data, strict=True)}


def _check_finite(path: Path, geoms: np.ndarray, keep: list[int], why: str) -> None:
    import shapely

    if not keep:
        return
    coords, idx = shapely.get_coordinates(geoms[keep], return_index=True)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InputError(path, f"feature {keep[int(idx[bad][0])]} has {why}")


def _head_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError:
        return b""
