"""Where a scene lies and on what grid it is read: the georeference of its source grid, and its output grid.

`georeference` places the image's own pixels on the map: a GeoTIFF's transform and CRS, the
`data.geotransforms` override, a PNG/JPEG's world file with its CRS, or the fit of an xView2 label's
vertices. `output_grid` then derives the grid every window of a `footprints.scenes.reader.SceneReader` is in: the
source grid resampled to `tile.target_gsd` when asked (enlarging at most `MAX_UPSAMPLE` per side), cut to a
band of rows when the scene is one. Both raise `InputError` naming the offending file, and report warnings
through the `warn` callable they are given (the reader's, which keeps them for the scene's record).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affine import Affine
from rasterio.crs import CRS

from ..config import DataConfig
from ..errors import InputError, printable
from .geo import pixel_size_m
from .georef import WGS84, GeorefError, fit_affine, load_geotransforms, residual_px
from .labels import XView2Label
from .rasters import check_local
from .sources import SceneSource

# resampling to `tile.target_gsd` enlarges a scene at most this much per side (16x the pixels): beyond it
# the image holds nothing the model could use (a 10 m scene for a 0.5 m model is 20x: a 64 px image at
# 1 km would become 128,000 px wide), and the work, memory and disk grow with the square of the factor.
# Shrinking (a 5 cm drone scene for a 0.5 m model) is not bounded: it only ever makes the scene smaller.
MAX_UPSAMPLE = 4.0
# world files, and those GDAL reads beside each plain image format
_WORLD_FILES = (".tfw", ".tifw", ".tiffw", ".jgw", ".jpgw", ".jpegw", ".pgw", ".pngw", ".wld", ".j2w")
_WORLD_FILES_READ = {"PNG": (".pgw", ".pngw", ".wld"), "JPEG": (".jgw", ".jpgw", ".wld")}


def gsd_metres(transform: Affine, crs: CRS | None, width: int, height: int) -> float | None:
    """Ground sample distance in true metres at the scene centre (geometric mean of x and y); None in pixel
    space. A Web Mercator pixel of 1 unit at 60 N is 0.5 m (`geo.pixel_size_m`)."""
    return pixel_size_m(transform, crs, width, height)


def crs_string(crs: CRS | None) -> str:
    """'EPSG:xxxx' when the CRS has a code, WKT otherwise, '' for pixel space."""
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


# ---------------------------------------------------------------------------------------------------
# the source grid on the map


def georeference(source: SceneSource, cfg: DataConfig, ds: Any, label: XView2Label | None,
                 warn: Callable[[str], None]) -> tuple[Affine, CRS | None, float | None]:
    """Source-grid transform and CRS of the open image `ds`, and the RMS residual (px) of the label's lng_lat
    vertices against it (None without them): a GeoTIFF's own, the geotransforms override, a PNG/JPEG's own
    (a world file with a CRS in its `.aux.xml`), or the fit of an xView2 label's vertices."""
    src = source
    is_plain = ds.driver in ("PNG", "JPEG")
    override = None
    if cfg.geotransforms:
        check_local(cfg.geotransforms, "data.geotransforms")
        try:
            table = load_geotransforms(cfg.geotransforms)
        except ValueError as err:
            raise InputError(cfg.geotransforms, str(err)) from None
        override = table.get(src.image.name) or table.get(src.image.stem)
    if not is_plain:
        if ds.crs is None and override is None:
            raise InputError(src.image, "GeoTIFF has no CRS (cannot place its patches on the map)")
        if override is not None:
            return (*override, None)
        if ds.transform.is_identity:
            raise InputError(src.image, "GeoTIFF has a CRS but no geotransform")
        return ds.transform, ds.crs, None
    pairs = label.vertex_pairs() if label is not None else None
    own = None
    if ds.crs is not None and not ds.transform.is_identity:
        own = (ds.transform, ds.crs)  # a world file (.pgw/.jgw/.wld) and a CRS (.aux.xml) beside it
    if override is not None or own is not None:
        transform, crs = override if override is not None else own
        which = "the geotransforms entry" if override is not None else "the image's world file and CRS"
        rms_px = None
        if pairs is not None and len(pairs[0]):
            rms_px = residual_px(transform, *pairs)[0]
            if rms_px > cfg.max_residual_px:
                warn(f"{src.label}: the labels' lng_lat vertices lie {rms_px:.2f} px "
                     f"(RMS) from {which}; {which} is used anyway")
        return transform, crs, rms_px
    if label is None:
        warn(f"{src.image}: {_no_georeference(ds, src.image)}: tiled in pixel space (no CRS); give "
             "data.geotransforms to place it on the map")
        return Affine.identity(), None, None
    if pairs is None or len(pairs[0]) == 0:
        raise InputError(src.label, "cannot georeference: no lng_lat vertices paired with xy vertices "
                         "(give data.geotransforms for this scene)")
    try:
        fit = fit_affine(*pairs)
    except GeorefError as err:
        raise InputError(src.label, f"cannot georeference: {err}") from None
    if fit.rms_px > cfg.max_residual_px:
        raise InputError(src.label, f"georeference residual {fit.rms_px:.2f} px RMS exceeds "
                         f"data.max_residual_px {cfg.max_residual_px:g} ({fit.n_points} vertices)")
    return fit.transform, WGS84, fit.rms_px


def _no_georeference(ds: Any, img: Path) -> str:
    """Why a PNG/JPEG without labels has no georeference, in a few words."""
    if not ds.transform.is_identity:
        return "no labels, and its world file has no CRS beside it (add one in a .aux.xml)"
    stem = img.name.rsplit(".", 1)[0]
    try:
        beside = sorted(p for p in img.parent.iterdir() if p.name.startswith(stem + "."))
    except OSError:
        beside = []
    unread = [p.name for p in beside
              if p.suffix.lower() in _WORLD_FILES and p.suffix.lower() not in _WORLD_FILES_READ[ds.driver]]
    if unread:
        return (f"no labels, and {printable(unread[0])} is not a world file GDAL reads for a "
                f"{ds.driver} (it reads {', '.join(_WORLD_FILES_READ[ds.driver])})")
    return "no labels and no georeference"


# ---------------------------------------------------------------------------------------------------
# the output grid


@dataclass(frozen=True)
class OutputGrid:
    """The grid a scene is read on, and how it maps onto the image's own (source) grid."""

    width: int
    height: int  # rows of the scene (of its band of rows, when it is one)
    sx: float  # source pixels per output pixel, along x
    sy: float
    resampled: bool  # the output grid differs in size from the source grid
    transform: Affine  # of the scene's top-left output pixel
    crs: CRS | None
    native_gsd_m: float | None  # of the source grid
    gsd_m: float | None  # of the output grid
    row_off: int  # output rows above the scene's first row (a band of rows of the image)

    @property
    def scale(self) -> float:
        """Output pixels per source pixel."""
        return 1.0 / math.sqrt(self.sx * self.sy)


def output_grid(image: Path, size: tuple[int, int], src_transform: Affine, crs: CRS | None,
                label: XView2Label | None, target_gsd: float | None, rows: tuple[float, float] | None,
                warn: Callable[[str], None]) -> OutputGrid:
    """The output grid of an image of `size` (width, height) on `src_transform`/`crs`: resampled to
    `target_gsd` when given and the scene's GSD is known (from its georeference, else the xView2 label's
    metadata), then cut to the band `rows` (fractions of its height) when given."""
    src_w, src_h = size
    native_gsd = gsd_metres(src_transform, crs, src_w, src_h)
    if native_gsd is not None and not (math.isfinite(native_gsd) and native_gsd > 0):
        raise InputError(image, f"its georeference gives a pixel size of {native_gsd} m (a degenerate "
                         "geotransform, or coordinates outside the valid area of its CRS)")
    if native_gsd is None and label is not None:
        native_gsd = label.gsd_m
    out_w, out_h = src_w, src_h
    if target_gsd:
        if native_gsd is None:
            warn(f"{image}: no ground sample distance known (pixel space); tile.target_gsd ignored")
        else:
            scale = native_gsd / target_gsd
            out_w, out_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
            if scale > MAX_UPSAMPLE:
                raise InputError(image, f"ground sample distance {native_gsd:.4g} m is {scale:.4g}x coarser "
                                 f"than the model's {target_gsd:g} m (tile.target_gsd): it would be enlarged "
                                 f"from {src_w}x{src_h} to {out_w}x{out_h} px; more than {MAX_UPSAMPLE:g}x "
                                 f"per side is refused (use imagery of {MAX_UPSAMPLE * target_gsd:g} m or finer, "
                                 "or a model trained at this resolution)")
    sx, sy = src_w / out_w, src_h / out_h
    transform = src_transform @ Affine.scale(sx, sy)
    gsd = native_gsd * math.sqrt(sx * sy) if native_gsd is not None else None
    # a band of rows (SceneSource.rows): the scene is that band; output rows count from its top
    row_off, height = 0, out_h
    if rows is not None:
        r0, r1 = round(rows[0] * out_h), round(rows[1] * out_h)
        if not 0 <= r0 < r1 <= out_h:
            raise InputError(image, f"row band {rows} is empty for a scene of {out_h} rows")
        row_off, height = r0, r1 - r0
        transform = transform @ Affine.translation(0, r0)
    return OutputGrid(out_w, height, sx, sy, (out_w, out_h) != (src_w, src_h), transform, crs, native_gsd,
                      gsd, row_off)
