"""Scene reading, shared by tile, predict and evaluate (discovery is `footprints.scenes.sources`).

A scene is one image (xView2 PNG or GeoTIFF) with optional labels: an xView2 label JSON, a vector
file (GeoJSON/GPKG, any CRS) or a mask raster on the image grid. `open_scene` turns it into a
`SceneReader` on an *output grid*: the image grid, resampled to `tile.target_gsd` when asked. Every
window handed to the reader is in output-grid pixels and may reach outside the scene (boundless):
pixels outside the scene or equal to nodata come back as `valid=False`, RGB 0, mask 255.

Bad input raises `InputError(path, reason)` naming the offending file (image, label or mask). Where the
scene lies and its output grid are `footprints.scenes.grid`; the reader reads pixels and labels on it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..config import DataConfig, TileConfig
from ..errors import InputError, one_line, printable
from .grid import crs_string, georeference, output_grid
from .labels import (
    LabelSource,
    MaskGrid,
    MaskLabels,
    PolygonLabels,
    XView2Label,
    read_vector_polygons,
    read_xview2_label,
)
from .rasters import check_regular_file, open_raster, sniff_raster
from .sources import SceneSource, scene_config
from .targets import ClassScheme, halo_px, instance_target

log = logging.getLogger(__name__)

# scenes up to this many pixels (output grid) are read once and served from memory: PNGs are not
# tiled, so windowed reads would decode the file from the top again and again
IN_MEMORY_MAX_PX = 40_000_000
# long side of the decimated read used for the stretch (and emptiness) of larger non-8-bit scenes
_STATS_SIDE = 1024
# pixels per strip when looking for a valid pixel in a large 8-bit scene (bounded memory at any width)
_STRIP_PX = 1 << 23
# a scene whose own GSD is more than this factor from the model's gets a warning (`gsd_warning`)
GSD_WARN_FACTOR = 2.0


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

    def __init__(self, source: SceneSource, data_cfg: DataConfig, tile_cfg: TileConfig | None = None,
                 georef: tuple[Affine, CRS | None] | None = None):
        self.source = source
        self._shared_georef = georef
        self.scene_id = source.scene_id
        # a scene of one of several data sources is read with its source's settings (data.sources[i]),
        # wherever it is opened (tile, calibration, predict): the source carries them
        self._data_cfg = scene_config(source, data_cfg)
        self._ds: Any = None
        self.labels: LabelSource | None = None
        self.xview2_label: XView2Label | None = None
        self._rgb: np.ndarray | None = None  # in-memory output grid (small scenes)
        self._valid: np.ndarray | None = None
        self._mask_full: np.ndarray | None = None
        self._target_full: dict[str, Any] = {}
        self._stretch: np.ndarray | None = None  # (bands, 2) lo/hi for non-uint8 imagery
        self.georef_rms_px = None
        self.warnings: list[str] = []
        try:
            self._open(tile_cfg)
        except InputError as err:
            self.close()
            # a file name that is not UTF-8, or holds a newline, prints on one line anywhere
            raise InputError(printable(err.path), printable(err.reason)) from None
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------------------

    def _open(self, tile_cfg: TileConfig | None) -> None:
        src, cfg = self.source, self._data_cfg
        img = src.image
        # a local regular file (not a pipe, folder or symlink loop), of a format meant as imagery, decided
        # from its content (`footprints.scenes.rasters`: never a VRT, whatever its name)
        if check_regular_file(img, "image").st_size == 0:
            raise InputError(img, "empty scene: the file has 0 bytes")
        if sniff_raster(img) == "PNG":
            self._verify_png(img)
        self._ds = open_raster(img, "image")
        ds = self._ds
        if ds.width == 0 or ds.height == 0 or ds.count == 0:
            raise InputError(img, f"empty scene: {ds.width}x{ds.height} px, {ds.count} bands")
        self.src_width, self.src_height = ds.width, ds.height
        self._bands = self._band_indexes(ds)
        self._nodata = cfg.nodata if cfg.nodata is not None else (ds.nodata if ds.nodata is not None else 0)
        self._is_plain = ds.driver in ("PNG", "JPEG")

        # georeference of the source grid
        label_kind = src.label_kind
        if src.label is not None and label_kind is None:
            label_kind = "xview2" if (src.label.suffix.lower() == ".json" and self._is_plain) else "vector"
        self._label_kind = label_kind if src.label is not None else None
        xview2 = None
        if self._label_kind == "xview2":
            xview2 = read_xview2_label(src.label, (ds.width, ds.height), img)
        if self._shared_georef is not None:  # a pair's post PNG: the pre scene's grid (footprints.scenes.pairs)
            src_transform, crs = self._shared_georef
        else:
            src_transform, crs, self.georef_rms_px = georeference(src, cfg, ds, xview2, self._warn)
        self.source_georef = (src_transform, crs)

        # output grid (target GSD, a band of rows)
        grid = output_grid(img, (ds.width, ds.height), src_transform, crs, xview2,
                           tile_cfg.target_gsd if tile_cfg is not None else None, src.rows, self._warn)
        self.width, self.height, self.transform, self.crs = grid.width, grid.height, grid.transform, grid.crs
        self.native_gsd_m, self.gsd_m, self.scale = grid.native_gsd_m, grid.gsd_m, grid.scale
        self._sx, self._sy, self._resampled, self._row_off = grid.sx, grid.sy, grid.resampled, grid.row_off

        # labels on the output grid
        self.xview2_label = xview2  # its buildings' properties (uid, damage grade) pair with `.polygons`
        if xview2 is not None:
            self.labels = PolygonLabels(src.label, self.source_to_output(xview2.polygons))
        elif self._label_kind == "vector":
            self.labels = PolygonLabels(src.label, read_vector_polygons(src.label, self.crs, self.transform,
                                                                        layer=cfg.label_layer))
        elif src.mask is not None:
            mask_grid = MaskGrid(ds.width, ds.height, self._sx, self._sy, self._resampled, self._row_off)
            self.labels = MaskLabels(src.mask, mask_grid, cfg.mask_threshold, ds.transform, img)

        # pixels: small scenes in memory at once; statistics (stretch, emptiness) from them
        if self.width * self.height <= IN_MEMORY_MAX_PX and ds.width * ds.height <= IN_MEMORY_MAX_PX:
            raw, valid = self._read_raw(0, self.height, 0, self.width)
            self._stretch = self._stretch_limits(raw, valid)
            self._rgb, self._valid = self._to_uint8(raw, valid), valid
            empty = not valid.any()
        elif ds.dtypes[self._bands[0] - 1] == "uint8":
            # 8-bit: no stretch to estimate, only emptiness: strips until the first valid pixel (one strip
            # for most scenes, where a decimated read decodes every block of the file)
            self._stretch = None
            empty = not self._any_valid_pixel()
        else:
            raw, valid = self._read_raw_decimated()
            self._stretch = self._stretch_limits(raw, valid)
            empty = not valid.any()
        if empty:
            raise InputError(img, f"empty scene: every pixel is nodata (value {self._nodata:g})")
        if isinstance(self.labels, PolygonLabels) and src.rows is None:  # a band may hold no building
            self.labels.check_inside(self.width, self.height, img)

    @staticmethod
    def _verify_png(path: Path) -> None:
        """GDAL returns zeros, without an error, for the rows a truncated PNG lacks; PIL's chunk and CRC
        check (no decompression, milliseconds) catches truncation and corruption before we trust it."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.verify()
        except Image.DecompressionBombError:
            return  # PIL's own size limit (~179 Mpx) is not ours: `footprints.scenes.rasters` judges the size
        except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as err:
            raise InputError(path, f"unreadable or truncated PNG ({one_line(err)})") from None

    def _warn(self, message: str) -> None:
        message = printable(message)  # a file name that is not UTF-8, or holds a newline: one printable line
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

    # -- pixels ------------------------------------------------------------------------------------

    def source_to_output(self, polys: list[Any]) -> list[Any]:
        """Outlines in the source image's pixels -> on this scene's output grid (resampled, a row band), in
        the same order."""
        if self._resampled:
            from shapely import affinity

            polys = [affinity.scale(g, 1 / self._sx, 1 / self._sy, origin=(0, 0)) for g in polys]
        return self._band_polygons(polys)

    def _band_polygons(self, polys: list[Any]) -> list[Any]:
        """Outlines on the full output grid -> on this scene's grid (shifted to a row band's top)."""
        if not self._row_off:
            return polys
        from shapely import affinity

        return [affinity.translate(g, 0, -self._row_off) for g in polys]

    def _src_window(self, r0: int, r1: int, c0: int, c1: int) -> Window:
        r0, r1 = r0 + self._row_off, r1 + self._row_off
        return Window(c0 * self._sx, r0 * self._sy, (c1 - c0) * self._sx, (r1 - r0) * self._sy)

    def _read_raw(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Selected bands (source dtype) and validity for output rows r0:r1, cols c0:c1 (inside the scene)."""
        ds, shape = self._ds, (3, r1 - r0, c1 - c0)
        r0, r1 = r0 + self._row_off, r1 + self._row_off
        try:
            if not self._resampled:
                win = Window(c0, r0, c1 - c0, r1 - r0)
                uniq = sorted(set(self._bands))
                data = ds.read(uniq, window=win)
                raw = data[[uniq.index(b) for b in self._bands]]
                near = raw
            else:
                win = self._src_window(r0 - self._row_off, r1 - self._row_off, c0, c1)
                # average when shrinking (no aliasing), bilinear when enlarging; validity from nearest
                rs = Resampling.average if self.scale < 1 else Resampling.bilinear
                raw = ds.read(self._bands, window=win, out_shape=shape, resampling=rs)
                near = ds.read(self._bands, window=win, out_shape=shape, resampling=Resampling.nearest)
        except RasterioError as err:
            raise InputError(self.source.image, f"cannot read pixels ({one_line(err)[:160]})") from None
        valid = self._validity(near)
        if raw is not near and np.issubdtype(raw.dtype, np.floating):
            valid &= np.isfinite(raw).all(axis=0)  # an average or bilinear value that met a NaN or inf
        return raw, valid

    def _validity(self, values: np.ndarray) -> np.ndarray:
        """Valid pixels of (bands, h, w) values: not the nodata value in every band, and, for floating
        point imagery, no NaN or +-inf in any band (never a measurement, declared as nodata or not)."""
        nodata = self._nodata
        if isinstance(nodata, float) and math.isnan(nodata):
            valid = np.ones(values.shape[1:], dtype=bool)
        else:
            valid = ~np.all(values == np.asarray(nodata, dtype=values.dtype), axis=0)
        if np.issubdtype(values.dtype, np.floating):  # NaN and +-inf are never measurements
            valid &= np.isfinite(values).all(axis=0)
        return valid

    def _any_valid_pixel(self, strip_rows: int = 512) -> bool:
        strip_rows = max(1, min(strip_rows, _STRIP_PX // max(self.width, 1)))
        return any(self._read_raw(r0, min(r0 + strip_rows, self.height), 0, self.width)[1].any()
                   for r0 in range(0, self.height, strip_rows))

    def _read_raw_decimated(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self._ds
        f = max(ds.width, ds.height) / _STATS_SIDE
        shape = (3, max(1, round(ds.height / f)), max(1, round(ds.width / f)))
        try:
            raw = ds.read(self._bands, out_shape=shape, resampling=Resampling.nearest)
        except RasterioError as err:
            raise InputError(self.source.image, f"cannot read pixels ({one_line(err)[:160]})") from None
        return raw, self._validity(raw)

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
            scaled = np.clip((raw.astype(np.float32) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255)
            out = np.nan_to_num(scaled, copy=False, nan=0.0).astype(np.uint8)  # NaN pixels are invalid (0)
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
        return self.labels is not None

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
                self._mask_full = self.labels.burn(0, self.height, 0, self.width)
            lab, ok = self._mask_full[r0:r1, c0:c1], self._valid[r0:r1, c0:c1]
        else:
            lab = self.labels.burn(r0, r1, c0, c1)
            _, ok = self._read_raw(r0, r1, c0, c1)
        out[r0 - ro : r1 - ro, c0 - co : c1 - co] = np.where(ok, lab, 255)
        return out

    def target(self, window: Window, scheme: ClassScheme, border_m: float, contact_m: float) -> np.ndarray | None:
        """Class mask uint8 (h, w) of `scheme` (`footprints.scenes.targets`): instances rasterised one by one with
        enough context around the window that border and contact classes are exact; 255 ignore. None
        without labels. The `binary` scheme is `truth_mask`."""
        if scheme.name == "binary":
            return self.truth_mask(window)
        if not self.has_labels:
            return None
        ro, co, h, w, r0, r1, c0, c1 = self._clip(window, self.width, self.height)
        out = np.full((h, w), 255, dtype=np.uint8)
        if r1 <= r0 or c1 <= c0:
            return out
        key = (scheme.name, border_m, contact_m)
        if self._rgb is not None:  # small scene: the whole scene's target once
            if self._target_full.get("key") != key:
                ids = self.labels.instances(0, self.height, 0, self.width)
                self._target_full = {"key": key, "target": instance_target(ids, scheme, self.gsd_m, border_m,
                                                                           contact_m)}
            cls = self._target_full["target"][r0:r1, c0:c1]
        else:
            pad = halo_px(border_m, contact_m, self.gsd_m)
            hr0, hr1 = max(r0 - pad, 0), min(r1 + pad, self.height)
            hc0, hc1 = max(c0 - pad, 0), min(c1 + pad, self.width)
            ids = self.labels.instances(hr0, hr1, hc0, hc1)
            cls = instance_target(ids, scheme, self.gsd_m, border_m, contact_m)[r0 - hr0 : r1 - hr0,
                                                                                 c0 - hc0 : c1 - hc0]
        truth = self.truth_mask(Window(c0, r0, c1 - c0, r1 - r0))  # validity (nodata) as the binary mask's
        out[r0 - ro : r1 - ro, c0 - co : c1 - co] = np.where(truth == 255, 255, cls)
        return out

    def truth_polygons(self) -> Any:
        """Label polygons as a GeoDataFrame in `.crs` (pixel coordinates when crs is None); None without labels.

        Mask-raster labels are vectorised on the output grid.
        """
        import geopandas as gpd

        from .geo import affine_geometries

        if not self.has_labels:
            return None
        if self.labels.has_polygons:
            polys = self.labels.polygons()
        else:
            from rasterio import features
            from shapely.geometry import shape

            grid = self.labels.burn(0, self.height, 0, self.width)
            polys = [shape(g) for g, v in features.shapes(grid, mask=grid == 1) if v == 1]
        if self.source.rows is not None:  # a band: its part of every building
            import shapely

            polys = [p for p in shapely.intersection(polys, shapely.box(0, 0, self.width, self.height))
                     if not p.is_empty and p.area > 0]
        geoms = affine_geometries(polys, self.transform)
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
            "rows": list(self.source.rows) if self.source.rows is not None else None,
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
        if self.labels is not None:
            self.labels.close()
        if self._ds is not None:
            self._ds.close()
        self._ds = None

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gsd_warning(reader: SceneReader, model_gsd: float | None) -> str | None:
    """One line to log when a scene's own ground sample distance is more than `GSD_WARN_FACTOR` from the
    model's (its `tile.target_gsd`, the GSD it was trained at), else None (also when either is unknown).

    A coarser scene is always worth the warning (enlarged to the model's grid it still lacks the detail the
    model learnt from; not enlarged, its buildings look smaller than any the model saw). A finer one only
    when it was not resampled to the model's GSD (averaging a 5 cm scene down to 0.5 m is what the model
    expects)."""
    native = reader.native_gsd_m
    if not model_gsd or native is None or not math.isfinite(native) or native <= 0:
        return None
    ratio = native / model_gsd
    if 1.0 / GSD_WARN_FACTOR <= ratio <= GSD_WARN_FACTOR:
        return None
    # resampled to the model's grid (a scene of a few pixels lands a little off it: whole pixels)
    resampled = bool(getattr(reader, "_resampled", False)) and reader.gsd_m is not None and (
        1.0 / GSD_WARN_FACTOR <= reader.gsd_m / model_gsd <= GSD_WARN_FACTOR)
    image = printable(reader.source.image)
    if ratio > 1:
        how = ("enlarged to the model's grid, it holds less detail than the model learnt from" if resampled
               else f"its buildings look {ratio:.4g}x smaller than the model learnt")
        return (f"{image}: ground sample distance {native:.4g} m is {ratio:.4g}x coarser than the model's "
                f"{model_gsd:g} m; {how}: expect poor footprints")
    if resampled:
        return None
    return (f"{image}: ground sample distance {native:.4g} m is {1 / ratio:.4g}x finer than the model's "
            f"{model_gsd:g} m and is not resampled: its buildings look {1 / ratio:.4g}x larger than the model "
            "learnt; expect poor footprints (a checkpoint with tile.target_gsd resamples)")


def open_scene(source: SceneSource, data_cfg: DataConfig, tile_cfg: TileConfig | None = None,
               georef: tuple[Affine, CRS | None] | None = None) -> SceneReader:
    """Open a scene on its output grid; raises `InputError` naming the bad file on bad input. `georef`: the
    source grid's (transform, CRS) as given, instead of the scene's own (the post PNG of an xView2 pair)."""
    return SceneReader(source, data_cfg, tile_cfg, georef)
