"""Scene imagery and probability rasters as small images that a web map can lay exactly in place.

A Leaflet `imageOverlay` stretches a picture linearly between two corners in the map's projection
(EPSG:3857, web Mercator), so a raster in any other CRS (UTM, lon/lat) is first reprojected to EPSG:3857;
its corners then map exactly to two lon/lat pairs. Rasters are read decimated (from overviews where the
file has them: the probability COGs do) so that a 40,000 px scene costs no more memory than a thumbnail,
and the longest side of what is embedded is bounded (`max_side`). Scenes in pixel space (no CRS) are not
reprojected; the page shows them on a plain pixel grid.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import calculate_default_transform, reproject
from rasterio.warp import transform as transform_points

from ..contracts import probability

log = logging.getLogger(__name__)

WEB_MERCATOR = CRS.from_epsg(3857)
PROB_LEVELS = 256  # palette entries: 255 probability levels and one transparent


@dataclass
class Overlay:
    """An encoded picture and where it goes.

    `bounds` is ((south, west), (north, east)) in degrees for a georeferenced overlay, or
    ((y_min, x_min), (y_max, x_max)) in the scene's own coordinates for a pixel-space one (`geo` False).
    """

    data_uri: str
    width: int
    height: int
    bounds: tuple[tuple[float, float], tuple[float, float]]
    geo: bool
    source_width: int
    source_height: int

    @property
    def nbytes(self) -> int:
        return len(self.data_uri)

    def as_json(self) -> dict[str, Any]:
        return {
            "uri": self.data_uri,
            "width": self.width,
            "height": self.height,
            "bounds": [list(self.bounds[0]), list(self.bounds[1])],
            "source_width": self.source_width,
            "source_height": self.source_height,
        }


# ---------------------------------------------------------------------------------------------- reading
def _decimated_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(height, width) of a read at most `max_side` on the longest side (never upsampled)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_rgba(
    path: str | Path, max_side: int, transform: Affine | None = None, crs: CRS | str | None = None
) -> tuple[np.ndarray, Affine, CRS | None, tuple[int, int]]:
    """Display RGBA (4, h, w) uint8 of a scene image read at most `max_side` px on its longest side.

    Bands 1-3 are shown as RGB (one band is repeated); 8-bit data is shown as is, anything else stretched
    per band between its 2nd and 98th percentiles; alpha is the file's mask (nodata, alpha band, or
    internal mask). `transform`/`crs` georeference a file that carries none (xView2 PNGs), for the image's
    own pixel grid. Returns (rgba, transform of the decimated grid, crs or None, (source w, source h)).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            h, w = _decimated_shape(src.width, src.height, max_side)
            bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
            data = src.read(bands, out_shape=(3, h, w), resampling=Resampling.average)
            mask = src.read_masks(1, out_shape=(h, w), resampling=Resampling.nearest)
            if transform is None:
                base_t, base_crs = src.transform, src.crs
            else:
                base_t, base_crs = transform, (CRS.from_user_input(crs) if crs else None)
            src_size = (src.width, src.height)
    valid = mask > 0
    if data.dtype != np.uint8:
        data = _stretch(data, valid)
    rgba = np.concatenate([data, np.where(valid, 255, 0).astype(np.uint8)[None]], axis=0)
    t = base_t * Affine.scale(src_size[0] / w, src_size[1] / h)
    return rgba, t, base_crs, src_size


def _stretch(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(data.shape, dtype=np.uint8)
    for i, band in enumerate(data.astype(np.float64)):
        values = band[valid] if valid.any() else band.ravel()
        lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out[i] = np.clip((band - lo) * scale, 0, 255).astype(np.uint8)
    return out


def probability_lut(cmap: str = "magma", levels: int = 256) -> np.ndarray:
    """(levels, 4) uint8 colour table for probability 0..1 (alpha rises with probability so that the
    imagery shows through where the model sees no building)."""
    import matplotlib

    ramp = np.linspace(0.0, 1.0, levels)
    rgb = (matplotlib.colormaps[cmap](ramp)[:, :3] * 255).round().astype(np.uint8)
    alpha = np.round(255 * (0.25 + 0.65 * ramp)).astype(np.uint8)
    return np.concatenate([rgb, alpha[:, None]], axis=1)


def read_probability(
    path: str | Path, max_side: int
) -> tuple[np.ndarray, Affine, CRS | None, tuple[int, int]]:
    """Probability float32 in [0, 1] (NaN where the raster's mask says invalid) of a probability raster,
    read from the COG's overviews (averaged) at most `max_side` px on its longest side and decoded by the
    contract's rule (`contracts.probability.read_probability`). Returns (p, transform of the decimated
    grid, crs or None, (source w, source h))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            h, w = _decimated_shape(src.width, src.height, max_side)
            t = src.transform * Affine.scale(src.width / w, src.height / h)
            crs, src_size = src.crs, (src.width, src.height)
        p, valid = probability.read_probability(path, out_shape=(h, w))
    p[~valid] = np.nan
    return np.clip(p, 0.0, 1.0), t, crs, src_size


def probability_overlay(path: str | Path, max_side: int, cmap: str = "magma") -> Overlay:
    """The probability raster as a palette PNG: 255 probability levels through `cmap` (alpha rising with
    probability) plus one transparent entry for invalid pixels. The values are reprojected (bilinear) before
    they are coloured, so the picture holds exactly the palette's colours: one byte a pixel before
    compression, where RGBA has four (to measure the saving: this overlay's `nbytes` against `make_overlay`
    of the same picture coloured to RGBA)."""
    p, t, crs, src_size = read_probability(path, max_side)
    geo = crs is not None
    if geo:
        dst_t, dst_w, dst_h, bounds = _mercator_grid(t, crs, p.shape[1], p.shape[0], max_side)
        out = np.full((dst_h, dst_w), np.nan, dtype=np.float32)
        reproject(
            p,
            out,
            src_transform=t,
            src_crs=crs,
            dst_transform=dst_t,
            dst_crs=WEB_MERCATOR,
            resampling=Resampling.bilinear,
            src_nodata=np.nan,
            dst_nodata=np.nan,
        )
        p = out
    else:
        bounds = pixel_bounds(t, p.shape[1], p.shape[0])
    levels = PROB_LEVELS - 1
    idx = np.where(np.isfinite(p), np.rint(np.nan_to_num(p) * (levels - 1)), levels).astype(np.uint8)
    lut = probability_lut(cmap, levels)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(lut[:, :3].ravel().tolist() + [0, 0, 0])
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, transparency=bytes(lut[:, 3].tolist()) + b"\x00")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Overlay(uri, idx.shape[1], idx.shape[0], bounds, geo, *src_size)


# ---------------------------------------------------------------------------------------------- placing
def to_web_mercator(
    rgba: np.ndarray, transform: Affine, crs: CRS, max_side: int
) -> tuple[np.ndarray, tuple[tuple[float, float], tuple[float, float]]]:
    """Reproject RGBA to EPSG:3857 (longest side <= max_side); returns it and its ((s, w), (n, e)) corners."""
    _, h, w = rgba.shape
    dst_t, dst_w, dst_h, corners = _mercator_grid(transform, crs, w, h, max_side)
    out = np.zeros((4, dst_h, dst_w), dtype=np.uint8)
    # premultiply so that bilinear resampling does not bleed nodata colour into the edges
    alpha = rgba[3:4].astype(np.float32) / 255.0
    pre = np.concatenate([rgba[:3] * alpha, rgba[3:4].astype(np.float32)], axis=0)
    res = np.zeros((4, dst_h, dst_w), dtype=np.float32)
    reproject(
        pre,
        res,
        src_transform=transform,
        src_crs=crs,
        dst_transform=dst_t,
        dst_crs=WEB_MERCATOR,
        resampling=Resampling.bilinear,
        src_nodata=None,
        dst_nodata=0,
    )
    a = res[3]
    with np.errstate(divide="ignore", invalid="ignore"):
        rgb = np.where(a > 0, res[:3] * 255.0 / np.maximum(a, 1e-6), 0)
    out[:3] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    out[3] = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return out, corners


def _mercator_grid(
    transform: Affine, crs: CRS, w: int, h: int, max_side: int
) -> tuple[Affine, int, int, tuple[tuple[float, float], tuple[float, float]]]:
    """The EPSG:3857 grid covering a (w, h) grid, longest side <= max_side: (transform, width, height,
    ((south, west), (north, east)) in degrees)."""
    left, top = transform * (0, 0)
    right, bottom = transform * (w, h)
    bounds = (min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    dst_t, dst_w, dst_h = calculate_default_transform(crs, WEB_MERCATOR, w, h, *bounds)
    scale = max(dst_w, dst_h) / max_side
    if scale > 1:  # same extent, coarser pixels
        (x0, y0), (x1, y1) = dst_t * (0, 0), dst_t * (dst_w, dst_h)
        dst_w, dst_h = max(1, math.floor(dst_w / scale)), max(1, math.floor(dst_h / scale))
        dst_t = Affine((x1 - x0) / dst_w, 0, x0, 0, (y1 - y0) / dst_h, y0)
    west, north = dst_t * (0, 0)
    east, south = dst_t * (dst_w, dst_h)
    lons, lats = transform_points(WEB_MERCATOR, "EPSG:4326", [west, east], [south, north])
    return dst_t, int(dst_w), int(dst_h), ((lats[0], lons[0]), (lats[1], lons[1]))


def pixel_bounds(
    transform: Affine, width: int, height: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """((y_min, x_min), (y_max, x_max)) of a grid in its own coordinates."""
    xs, ys = zip(*(transform * (c, r) for c, r in ((0, 0), (width, height))), strict=True)
    return (min(ys), min(xs)), (max(ys), max(xs))


def encode(rgba: np.ndarray, fmt: str = "png", quality: int = 80) -> str:
    """A data URI of RGBA (4, h, w): PNG (lossless) or WebP (lossy colour, exact alpha)."""
    img = Image.fromarray(np.ascontiguousarray(rgba.transpose(1, 2, 0)), mode="RGBA")
    if fmt == "png" and bool((rgba[3] == 255).all()):
        img = img.convert("RGB")
    buf = io.BytesIO()
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4, exact=False)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"image format must be 'png' or 'webp', not {fmt!r}")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_overlay(
    rgba: np.ndarray, transform: Affine, crs: CRS | None, src_size: tuple[int, int], max_side: int, fmt: str
) -> Overlay:
    """Place (reproject or not) and encode one raster."""
    if crs is not None:
        img, bounds = to_web_mercator(rgba, transform, crs, max_side)
        geo = True
    else:
        img, geo = rgba, False
        bounds = pixel_bounds(transform, rgba.shape[2], rgba.shape[1])
    return Overlay(encode(img, fmt), img.shape[2], img.shape[1], bounds, geo, *src_size)


def webp_available() -> bool:
    from PIL import features

    return bool(features.check("webp"))
