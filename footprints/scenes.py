"""Scene discovery and reading, shared by tile and predict.

A scene is one image (xView2 PNG or GeoTIFF) with optional labels: an xView2 label JSON, a vector
file (GeoJSON/GPKG, any CRS) or a mask raster on the image grid. `open_scene` turns it into a
`SceneReader` on an *output grid*: the image grid, resampled to `tile.target_gsd` when asked. Every
window handed to the reader is in output-grid pixels and may reach outside the scene (boundless):
pixels outside the scene or equal to nodata come back as `valid=False`, RGB 0, mask 255.

Bad input raises `InputError(path, reason)` naming the offending file (image, label or mask).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from .config import DataConfig, TileConfig
from .errors import InputError
from .georef import WGS84, GeorefError, fit_affine, load_geotransforms, residual_px, vertex_pairs

log = logging.getLogger(__name__)

# scenes up to this many pixels (output grid) are read once and served from memory: PNGs are not
# tiled, so windowed reads would decode the file from the top again and again
IN_MEMORY_MAX_PX = 40_000_000
# long side of the decimated read used for statistics (stretch, emptiness) of larger scenes
_STATS_SIDE = 1024
_RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
_PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
_VECTOR_SUFFIXES = (".geojson", ".gpkg", ".json", ".shp")


@dataclass(frozen=True)
class SceneSource:
    """Where a scene's files are. `label` is an xView2 JSON or a vector file, `mask` a raster."""

    image: Path
    label: Path | None = None
    mask: Path | None = None
    subset: str | None = None
    # "xview2" (label JSON with xy/lng_lat WKT) or "vector"; None = inferred from the label's suffix
    label_kind: str | None = None

    @property
    def scene_id(self) -> str:
        return self.image.stem

    @property
    def location_id(self) -> str:
        """The scene id without the xView2 `_pre_disaster`/`_post_disaster` suffix (splits group on it)."""
        sid = self.scene_id
        for suffix in ("_pre_disaster", "_post_disaster"):
            if sid.endswith(suffix):
                return sid[: -len(suffix)]
        return sid

    def files(self) -> list[str]:
        return [str(p) for p in (self.image, self.label, self.mask) if p is not None]


# ---------------------------------------------------------------------------------------------------
# discovery


def _is_post(path: Path) -> bool:
    return "_post_disaster" in path.stem


def _vector_label(labels_dir: Path, stem: str) -> Path:
    for suffix in _VECTOR_SUFFIXES:
        if (labels_dir / f"{stem}{suffix}").is_file():
            return labels_dir / f"{stem}{suffix}"
    return labels_dir / f"{stem}.geojson"  # missing: open_scene says so, naming this path


def _sources_in(folder: Path, subset: str | None, cfg: DataConfig) -> list[SceneSource]:
    images_dir = folder / cfg.images_dir
    if not images_dir.is_dir():
        raise InputError(images_dir, "images folder not found")
    pattern = cfg.image_glob or ("*.png" if cfg.format == "xview2" else "*.tif")
    images = sorted(p for p in images_dir.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if cfg.format == "geotiff" and not cfg.image_glob:
        images += sorted(p for p in images_dir.glob("*.tiff") if p.is_file())
    if cfg.format == "xview2" and not cfg.use_post_disaster:
        skipped = [p for p in images if _is_post(p)]
        if skipped:
            log.debug("%s: %d post-disaster images left out (data.use_post_disaster: false)", images_dir,
                      len(skipped))
        images = [p for p in images if not _is_post(p)]
    labels_dir = folder / cfg.labels_dir
    masks_dir = folder / cfg.masks_dir
    out = []
    for img in images:
        label = mask = None
        kind = None
        if cfg.format == "xview2":
            if labels_dir.is_dir():
                label, kind = labels_dir / f"{img.stem}.json", "xview2"
        elif cfg.label_format == "mask":
            if masks_dir.is_dir():
                mask = masks_dir / img.name
                if not mask.is_file():
                    alt = sorted(masks_dir.glob(f"{img.stem}.tif*"))
                    mask = alt[0] if alt else mask
        elif labels_dir.is_dir():
            label, kind = _vector_label(labels_dir, img.stem), "vector"
        out.append(SceneSource(img, label, mask, subset, kind))
    return out


def discover_scenes(data_cfg: DataConfig) -> list[SceneSource]:
    """All scenes under `data.root` (in `data.subsets` folders when given), sorted by subset and name.

    A labels (or masks) folder that is absent means an unlabelled dataset: its scenes get `label=None`.
    A labels folder that exists but lacks one scene's file keeps the expected path, so that opening the
    scene reports the missing file by name.
    """
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise InputError(root, "data root not found")
    sources: list[SceneSource] = []
    if data_cfg.subsets:
        for subset in data_cfg.subsets:
            sources += _sources_in(root / subset, subset, data_cfg)
    else:
        sources = _sources_in(root, None, data_cfg)
    seen: dict[str, SceneSource] = {}
    unique = []
    for src in sources:
        if src.scene_id in seen:
            log.warning("%s: duplicate scene id %r (also %s); kept the first", src.image, src.scene_id,
                        seen[src.scene_id].image)
            continue
        seen[src.scene_id] = src
        unique.append(src)
    return unique


def sources_from_paths(paths: list[str | Path], data_cfg: DataConfig) -> list[SceneSource]:
    """Scenes from explicit files or folders (e.g. `predict --input`): labels are looked up beside them
    (`../labels/<stem>.json` for PNGs; `../<labels_dir>` or `../<masks_dir>` for GeoTIFFs) when present."""
    out: list[SceneSource] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in _RASTER_SUFFIXES | _PLAIN_SUFFIXES)
        elif path.is_file():
            files = [path]
        else:
            raise InputError(path, "no such file or folder")
        for img in files:
            parent = img.parent.parent
            label = mask = kind = None
            if img.suffix.lower() in _PLAIN_SUFFIXES:
                cand = parent / data_cfg.labels_dir / f"{img.stem}.json"
                if cand.is_file():
                    label, kind = cand, "xview2"
            else:
                cand = _vector_label(parent / data_cfg.labels_dir, img.stem)
                mcand = parent / data_cfg.masks_dir / img.name
                if data_cfg.label_format == "mask" and mcand.is_file() and mcand != img:
                    mask = mcand
                elif cand.is_file():
                    label, kind = cand, "vector"
            out.append(SceneSource(img, label, mask, None, kind))
    return out


# ---------------------------------------------------------------------------------------------------
# reading


def gsd_metres(transform: Affine, crs: CRS | None, width: int, height: int) -> float | None:
    """Ground sample distance in metres at the scene centre (geometric mean of x and y); None in pixel space."""
    if crs is None:
        return None
    cx, cy = width / 2.0, height / 2.0
    p0, px, py = transform @ (cx, cy), transform @ (cx + 1, cy), transform @ (cx, cy + 1)
    if crs.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        dx = geod.inv(p0[0], p0[1], px[0], px[1])[2]
        dy = geod.inv(p0[0], p0[1], py[0], py[1])[2]
    else:
        factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
        dx = math.hypot(px[0] - p0[0], px[1] - p0[1]) * factor
        dy = math.hypot(py[0] - p0[0], py[1] - p0[1]) * factor
    return float(math.sqrt(dx * dy))


def _one_line(err: BaseException, path: Path | None = None) -> str:
    """A library error as one short line (with its cause, which rasterio often hides behind 'See previous')."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text.replace('See previous exception for details.', '').strip()} {cause}"
    if path is not None:
        text = text.replace(f"'{path}'", path.name).replace(str(path), path.name)
    return " ".join(text.split())[:200] or type(err).__name__


def _open_raster(path: Path, what: str) -> Any:
    """rasterio.open without the PNG georeference warning; failures as one-line InputErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as err:
        raise InputError(path, f"unreadable {what} ({_one_line(err)})") from None


class SceneReader:
    """A scene on its output grid. Build it with `open_scene`; use as a context manager."""

    scene_id: str
    width: int
    height: int
    transform: Affine
    crs: CRS | None
    gsd_m: float | None
    native_gsd_m: float | None
    georef_rms_px: float | None
    scale: float  # output pixels per source pixel

    def __init__(self, source: SceneSource, data_cfg: DataConfig, tile_cfg: TileConfig | None = None):
        self.source = source
        self.scene_id = source.scene_id
        self._data_cfg = data_cfg
        self._ds: Any = None
        self._mask_ds: Any = None
        self._rgb: np.ndarray | None = None  # in-memory output grid (small scenes)
        self._valid: np.ndarray | None = None
        self._mask_full: np.ndarray | None = None
        self._polys_px: list[Any] | None = None  # label polygons in output-grid pixel coordinates
        self._stretch: np.ndarray | None = None  # (bands, 2) lo/hi for non-uint8 imagery
        self.georef_rms_px = None
        self.warnings: list[str] = []
        try:
            self._open(tile_cfg)
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------------------

    def _open(self, tile_cfg: TileConfig | None) -> None:
        src, cfg = self.source, self._data_cfg
        img = src.image
        if not img.is_file():
            raise InputError(img, "image file not found")
        if img.stat().st_size == 0:
            raise InputError(img, "empty scene: the file has 0 bytes")
        if img.suffix.lower() == ".png":
            self._verify_png(img)
        self._ds = _open_raster(img, "image")
        ds = self._ds
        if ds.width == 0 or ds.height == 0 or ds.count == 0:
            raise InputError(img, f"empty scene: {ds.width}x{ds.height} px, {ds.count} bands")
        self.src_width, self.src_height = ds.width, ds.height
        self._bands = self._band_indexes(ds)
        self._nodata = cfg.nodata if cfg.nodata is not None else (ds.nodata if ds.nodata is not None else 0)
        self._is_plain = img.suffix.lower() in _PLAIN_SUFFIXES or ds.driver in ("PNG", "JPEG")

        # georeference of the source grid
        label_kind = src.label_kind
        if src.label is not None and label_kind is None:
            label_kind = "xview2" if (src.label.suffix.lower() == ".json" and self._is_plain) else "vector"
        self._label_kind = label_kind if src.label is not None else None
        xview2_label: dict | None = None
        if self._label_kind == "xview2":
            xview2_label = self._load_xview2_json(src.label)
        src_transform, crs = self._georeference(xview2_label)

        # output grid (target GSD)
        native_gsd = gsd_metres(src_transform, crs, ds.width, ds.height)
        if native_gsd is None and xview2_label is not None:
            gsd_meta = (xview2_label.get("metadata") or {}).get("gsd")
            native_gsd = float(gsd_meta) if isinstance(gsd_meta, (int, float)) and gsd_meta > 0 else None
        self.native_gsd_m = native_gsd
        target = tile_cfg.target_gsd if tile_cfg is not None else None
        out_w, out_h = ds.width, ds.height
        if target:
            if native_gsd is None:
                self._warn(f"{img}: no ground sample distance known (pixel space); tile.target_gsd ignored")
            else:
                scale = native_gsd / target
                out_w, out_h = max(1, round(ds.width * scale)), max(1, round(ds.height * scale))
        self.width, self.height = out_w, out_h
        self._sx, self._sy = ds.width / out_w, ds.height / out_h  # source pixels per output pixel
        self.scale = 1.0 / math.sqrt(self._sx * self._sy)
        self._resampled = (out_w, out_h) != (ds.width, ds.height)
        self.transform = src_transform @ Affine.scale(self._sx, self._sy)
        self.crs = crs
        self.gsd_m = native_gsd * math.sqrt(self._sx * self._sy) if native_gsd is not None else None

        # labels on the output grid
        if xview2_label is not None:
            self._polys_px = self._xview2_polygons(xview2_label)
        elif self._label_kind == "vector":
            self._polys_px = self._vector_polygons(src.label)
        if src.mask is not None:
            self._open_mask(src.mask)

        # pixels: small scenes in memory at once; statistics (stretch, emptiness) from them
        if self.width * self.height <= IN_MEMORY_MAX_PX and ds.width * ds.height <= IN_MEMORY_MAX_PX:
            raw, valid = self._read_raw(0, self.height, 0, self.width)
            self._stretch = self._stretch_limits(raw, valid)
            self._rgb, self._valid = self._to_uint8(raw, valid), valid
        else:
            raw, valid = self._read_raw_decimated()
            self._stretch = self._stretch_limits(raw, valid)
        if not valid.any():
            raise InputError(img, f"empty scene: every pixel is nodata (value {self._nodata:g})")
        if self._polys_px is not None and self._mask_ds is None:
            self._check_polygons_inside()

    @staticmethod
    def _verify_png(path: Path) -> None:
        """GDAL returns zeros, without an error, for the rows a truncated PNG lacks; PIL's chunk and CRC
        check (no decompression, milliseconds) catches truncation and corruption before we trust it."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as err:
            raise InputError(path, f"unreadable or truncated PNG ({_one_line(err)})") from None

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def _band_indexes(self, ds: Any) -> list[int]:
        bands = list(self._data_cfg.bands) or [1, 2, 3]
        if ds.count == 1:
            return [1, 1, 1]  # a single-band scene is repeated to 3 channels
        if len(bands) == 1:
            bands = bands * 3
        if len(bands) != 3:
            raise InputError(self.source.image, f"data.bands must name 1 or 3 bands, got {bands}")
        bad = [b for b in bands if not 1 <= b <= ds.count]
        if bad:
            raise InputError(self.source.image, f"has {ds.count} bands; data.bands asks for band(s) {bad}")
        return bands

    def _load_xview2_json(self, path: Path) -> dict:
        if not path.is_file():
            raise InputError(path, "label JSON missing")
        try:
            label = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed label JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(path, f"unreadable label JSON ({_one_line(err)})") from None
        feats = label.get("features") if isinstance(label, dict) else None
        if not isinstance(feats, dict) or not isinstance(feats.get("xy", []), list):
            raise InputError(path, "malformed label JSON (no 'features' object with an 'xy' list)")
        meta = label.get("metadata") or {}
        w, h = meta.get("width"), meta.get("height")
        if isinstance(w, int) and isinstance(h, int) and (w, h) != (self._ds.width, self._ds.height):
            raise InputError(
                path, f"label/image size mismatch: label says {w}x{h}, image {self.source.image.name} is "
                f"{self._ds.width}x{self._ds.height}"
            )
        return label

    @staticmethod
    def _parse_wkt_list(path: Path, items: list, key: str) -> list[tuple[str | None, Any]]:
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
                geom = shp_wkt.loads(feat["wkt"])
            except (shapely.errors.ShapelyError, ValueError, TypeError) as err:
                raise InputError(path, f"invalid WKT in features.{key}[{i}] ({_one_line(err)[:120]})") from None
            if geom.geom_type not in ("Polygon", "MultiPolygon"):
                raise InputError(path, f"invalid WKT in features.{key}[{i}]: {geom.geom_type}, not a polygon")
            out.append((props.get("uid"), geom))
        return out

    def _georeference(self, label: dict | None) -> tuple[Affine, CRS | None]:
        """Source-grid transform and CRS: a GeoTIFF's own, the geotransforms override, or the fit."""
        src, cfg, ds = self.source, self._data_cfg, self._ds
        override = None
        if cfg.geotransforms:
            try:
                table = load_geotransforms(cfg.geotransforms)
            except ValueError as err:
                raise InputError(cfg.geotransforms, str(err)) from None
            override = table.get(src.image.name) or table.get(src.image.stem)
        if not self._is_plain:
            if ds.crs is None and override is None:
                raise InputError(src.image, "GeoTIFF has no CRS (cannot place its patches on the map)")
            if override is not None:
                return override
            if ds.transform.is_identity:
                raise InputError(src.image, "GeoTIFF has a CRS but no geotransform")
            return ds.transform, ds.crs
        pairs = None
        if label is not None:
            xy = self._parse_wkt_list(src.label, label["features"].get("xy", []), "xy")
            ll = self._parse_wkt_list(src.label, label["features"].get("lng_lat", []) or [], "lng_lat")
            self._xy_geoms = [g for _, g in xy]
            if ll:
                by_uid = {uid: g for uid, g in ll if uid is not None}
                if len(by_uid) == len(ll) and all(uid in by_uid for uid, _ in xy):
                    paired_ll = [by_uid[uid] for uid, _ in xy]
                elif len(ll) == len(xy):
                    paired_ll = [g for _, g in ll]
                else:
                    raise InputError(src.label, f"{len(xy)} xy features but {len(ll)} lng_lat features")
                pairs = vertex_pairs(self._xy_geoms, paired_ll)
        if override is not None:
            transform, crs = override
            if pairs is not None and len(pairs[0]):
                self.georef_rms_px = residual_px(transform, *pairs)[0]
                if self.georef_rms_px > cfg.max_residual_px:
                    self._warn(f"{src.label}: the labels' lng_lat vertices lie {self.georef_rms_px:.2f} px "
                               f"(RMS) from the geotransforms entry; the override is used anyway")
            return transform, crs
        if label is None:
            self._warn(f"{src.image}: no labels and no georeference: tiled in pixel space (no CRS); "
                       "give data.geotransforms to place it on the map")
            return Affine.identity(), None
        if pairs is None or len(pairs[0]) == 0:
            raise InputError(src.label, "cannot georeference: no lng_lat vertices paired with xy vertices "
                             "(give data.geotransforms for this scene)")
        try:
            fit = fit_affine(*pairs)
        except GeorefError as err:
            raise InputError(src.label, f"cannot georeference: {err}") from None
        self.georef_rms_px = fit.rms_px
        if fit.rms_px > cfg.max_residual_px:
            raise InputError(src.label, f"georeference residual {fit.rms_px:.2f} px RMS exceeds "
                             f"data.max_residual_px {cfg.max_residual_px:g} ({fit.n_points} vertices)")
        return fit.transform, WGS84

    def _xview2_polygons(self, label: dict) -> list[Any]:
        from shapely import affinity

        geoms = getattr(self, "_xy_geoms", [])
        if not self._resampled:
            return [g for g in geoms if not g.is_empty]
        return [affinity.scale(g, 1 / self._sx, 1 / self._sy, origin=(0, 0)) for g in geoms if not g.is_empty]

    def _vector_polygons(self, path: Path) -> list[Any]:
        import geopandas as gpd
        import shapely
        from shapely import affinity

        if not path.is_file():
            raise InputError(path, "label file missing")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gdf = gpd.read_file(path)
        except Exception as err:  # noqa: BLE001 - pyogrio/fiona raise many types for a bad file
            raise InputError(path, f"unreadable vector labels ({_one_line(err, path)})") from None
        if len(gdf) == 0:
            return []
        if gdf.crs is None:
            if path.suffix.lower() in (".geojson", ".json"):
                gdf = gdf.set_crs(WGS84)  # RFC 7946: GeoJSON coordinates are WGS84 lon/lat
            else:
                raise InputError(path, "vector labels have no CRS")
        if self.crs is not None and not gdf.crs.equals(self.crs):
            gdf = gdf.to_crs(self.crs)
        geoms = []
        for i, geom in enumerate(gdf.geometry):
            if geom is None or geom.is_empty:
                continue
            if geom.geom_type not in ("Polygon", "MultiPolygon"):
                raise InputError(path, f"feature {i} is a {geom.geom_type}, not a polygon")
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
            geoms.append(geom)
        inv = ~self.transform  # CRS -> output-grid pixel coordinates
        return [affinity.affine_transform(g, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f]) for g in geoms]

    def _open_mask(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(path, "mask file missing")
        self._mask_ds = _open_raster(path, "mask")
        m = self._mask_ds
        if (m.width, m.height) != (self.src_width, self.src_height):
            raise InputError(path, f"label/image size mismatch: mask is {m.width}x{m.height}, image "
                             f"{self.source.image.name} is {self.src_width}x{self.src_height}")
        if m.crs is not None and not m.transform.almost_equals(self._ds.transform, precision=1e-9):
            raise InputError(path, "mask grid differs from the image grid (transform mismatch)")

    def _check_polygons_inside(self) -> None:
        from shapely.geometry import box

        if not self._polys_px:
            return
        extent = box(0, 0, self.width, self.height)
        if not any(g.intersects(extent) for g in self._polys_px):
            raise InputError(self.source.label, f"all {len(self._polys_px)} label polygons lie entirely "
                             f"outside the image {self.source.image.name}")

    # -- pixels ------------------------------------------------------------------------------------

    def _src_window(self, r0: int, r1: int, c0: int, c1: int) -> Window:
        return Window(c0 * self._sx, r0 * self._sy, (c1 - c0) * self._sx, (r1 - r0) * self._sy)

    def _read_raw(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Selected bands (source dtype) and validity for output rows r0:r1, cols c0:c1 (inside the scene)."""
        ds, shape = self._ds, (3, r1 - r0, c1 - c0)
        try:
            if not self._resampled:
                win = Window(c0, r0, c1 - c0, r1 - r0)
                uniq = sorted(set(self._bands))
                data = ds.read(uniq, window=win)
                raw = data[[uniq.index(b) for b in self._bands]]
                near = raw
            else:
                win = self._src_window(r0, r1, c0, c1)
                # average when shrinking (no aliasing), bilinear when enlarging; validity from nearest
                rs = Resampling.average if self.scale < 1 else Resampling.bilinear
                raw = ds.read(self._bands, window=win, out_shape=shape, resampling=rs)
                near = ds.read(self._bands, window=win, out_shape=shape, resampling=Resampling.nearest)
        except RasterioError as err:
            raise InputError(self.source.image, f"cannot read pixels ({_one_line(err)[:160]})") from None
        valid = ~np.all(near == np.asarray(self._nodata, dtype=near.dtype), axis=0)
        if isinstance(self._nodata, float) and math.isnan(self._nodata):
            valid = ~np.all(np.isnan(near), axis=0)
        return raw, valid

    def _read_raw_decimated(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self._ds
        f = max(ds.width, ds.height) / _STATS_SIDE
        shape = (3, max(1, round(ds.height / f)), max(1, round(ds.width / f)))
        try:
            raw = ds.read(self._bands, out_shape=shape, resampling=Resampling.nearest)
        except RasterioError as err:
            raise InputError(self.source.image, f"cannot read pixels ({_one_line(err)[:160]})") from None
        return raw, ~np.all(raw == np.asarray(self._nodata, dtype=raw.dtype), axis=0)

    def _stretch_limits(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        if raw.dtype == np.uint8:
            return None
        lo_p, hi_p = self._data_cfg.stretch_percentiles
        limits = np.zeros((3, 2), dtype=np.float64)
        for b in range(3):
            vals = raw[b][valid]
            if vals.size == 0:
                limits[b] = (0, 1)
                continue
            lo, hi = np.percentile(vals, [lo_p, hi_p])
            limits[b] = (lo, hi if hi > lo else lo + 1)
        return limits

    def _to_uint8(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self._stretch is None:
            out = raw.astype(np.uint8, copy=True) if raw.dtype != np.uint8 else raw.copy()
        else:
            lo, hi = self._stretch[:, 0, None, None], self._stretch[:, 1, None, None]
            out = np.clip((raw.astype(np.float32) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out[:, ~valid] = 0
        return out

    @staticmethod
    def _clip(window: Window, width: int, height: int) -> tuple[int, int, int, int, int, int, int, int]:
        ro, co = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        r0, r1 = max(ro, 0), min(ro + h, height)
        c0, c1 = max(co, 0), min(co + w, width)
        return ro, co, h, w, r0, r1, c0, c1

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (3, h, w) and validity (h, w) for an output-grid window (boundless: outside = invalid, 0)."""
        ro, co, h, w, r0, r1, c0, c1 = self._clip(window, self.width, self.height)
        rgb = np.zeros((3, h, w), dtype=np.uint8)
        valid = np.zeros((h, w), dtype=bool)
        if r1 <= r0 or c1 <= c0:
            return rgb, valid
        if self._rgb is not None:
            part, ok = self._rgb[:, r0:r1, c0:c1], self._valid[r0:r1, c0:c1]
        else:
            raw, ok = self._read_raw(r0, r1, c0, c1)
            part = self._to_uint8(raw, ok)
        rgb[:, r0 - ro : r1 - ro, c0 - co : c1 - co] = part
        valid[r0 - ro : r1 - ro, c0 - co : c1 - co] = ok
        return rgb, valid

    @property
    def has_labels(self) -> bool:
        return self._polys_px is not None or self._mask_ds is not None

    def _label_grid(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """0/1 building raster for output rows r0:r1, cols c0:c1 (inside the scene)."""
        if self._mask_ds is not None:
            m = self._mask_ds
            try:
                if not self._resampled:
                    data = m.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
                else:
                    data = m.read(1, window=self._src_window(r0, r1, c0, c1), out_shape=(r1 - r0, c1 - c0),
                                  resampling=Resampling.nearest)
            except RasterioError as err:
                raise InputError(self.source.mask, f"cannot read mask ({_one_line(err)[:160]})") from None
            # a declared mask nodata (SpaceNet masks say 0) is ignored on purpose: 0 means background
            return (data >= self._data_cfg.mask_threshold).astype(np.uint8)
        from rasterio import features
        from shapely.geometry import box

        shape = (r1 - r0, c1 - c0)
        frame = box(c0, r0, c1, r1)
        shapes = [(g, 1) for g in self._polys_px or [] if g.intersects(frame)]
        if not shapes:
            return np.zeros(shape, dtype=np.uint8)
        # pixel-space polygons, integer translation: the same pixels as rasterising the whole scene
        return features.rasterize(shapes, out_shape=shape, transform=Affine.translation(c0, r0), fill=0,
                                  dtype=np.uint8)

    def truth_mask(self, window: Window) -> np.ndarray | None:
        """Mask uint8 (h, w): 0 background, 1 building, 255 ignore (nodata or outside); None without labels."""
        if not self.has_labels:
            return None
        ro, co, h, w, r0, r1, c0, c1 = self._clip(window, self.width, self.height)
        out = np.full((h, w), 255, dtype=np.uint8)
        if r1 <= r0 or c1 <= c0:
            return out
        if self._rgb is not None:
            if self._mask_full is None:
                self._mask_full = self._label_grid(0, self.height, 0, self.width)
            lab, ok = self._mask_full[r0:r1, c0:c1], self._valid[r0:r1, c0:c1]
        else:
            lab = self._label_grid(r0, r1, c0, c1)
            _, ok = self._read_raw(r0, r1, c0, c1)
        out[r0 - ro : r1 - ro, c0 - co : c1 - co] = np.where(ok, lab, 255)
        return out

    def truth_polygons(self) -> Any:
        """Label polygons as a GeoDataFrame in `.crs` (pixel coordinates when crs is None); None without labels.

        Mask-raster labels are vectorised on the output grid.
        """
        import geopandas as gpd
        from shapely import affinity

        if not self.has_labels:
            return None
        if self._polys_px is not None:
            polys = self._polys_px
        else:
            from rasterio import features
            from shapely.geometry import shape

            grid = self._label_grid(0, self.height, 0, self.width)
            polys = [shape(g) for g, v in features.shapes(grid, mask=grid == 1) if v == 1]
        t = self.transform
        geoms = [affinity.affine_transform(g, [t.a, t.b, t.d, t.e, t.c, t.f]) for g in polys]
        return gpd.GeoDataFrame({"geometry": geoms}, geometry="geometry", crs=self.crs)

    def window_transform(self, window: Window) -> Affine:
        """The affine of an output-grid window (its top-left pixel corner at the window's offset)."""
        return self.transform @ Affine.translation(int(window.col_off), int(window.row_off))

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description of the scene (transform as GDAL numbers, CRS as WKT/EPSG string)."""
        return {
            "scene_id": self.scene_id,
            "image_file": str(self.source.image),
            "label_file": str(self.source.label or self.source.mask or ""),
            "subset": self.source.subset,
            "width": self.width,
            "height": self.height,
            "source_width": self.src_width,
            "source_height": self.src_height,
            "transform": list(self.transform.to_gdal()),
            "crs": crs_string(self.crs),
            "gsd_m": self.gsd_m,
            "native_gsd_m": self.native_gsd_m,
            "georef_rms_px": self.georef_rms_px,
            "labelled": self.has_labels,
            "warnings": self.warnings,
        }

    def close(self) -> None:
        for ds in (self._ds, self._mask_ds):
            if ds is not None:
                ds.close()
        self._ds = self._mask_ds = None

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def crs_string(crs: CRS | None) -> str:
    """'EPSG:xxxx' when the CRS has a code, WKT otherwise, '' for pixel space."""
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def open_scene(source: SceneSource, data_cfg: DataConfig, tile_cfg: TileConfig | None = None) -> SceneReader:
    """Open a scene on its output grid; raises `InputError` naming the bad file on bad input."""
    return SceneReader(source, data_cfg, tile_cfg)
