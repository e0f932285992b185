"""The probability raster: what `predict` writes per scene and `evaluate` (and calibration) read.

`<scene>_prob.tif` is a Cloud-Optimised GeoTIFF on the scene's output grid (georeferenced like the scene)
holding in band 1 the building probability and, for models with an interior class, in band 2 the
watershed seed score (the interior's probability): uint8 round(255 * p) (default) or IEEE half floats in
Float32 bands (`prob_dtype: float16`). Invalid pixels (nodata, outside the scene) are flagged in an internal mask band,
so uint8 keeps the full 0-255 range. A pixel is a building when p >= threshold (`threshold_mask`): the
one rule shared by vectorisation, calibration and evaluation, so they all see the same pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window

COG_BLOCK = 512  # internal tile size of the probability COG
UINT8_SCALE = 255.0


def encode_probability(prob: np.ndarray, prob_dtype: str) -> np.ndarray:
    """Probability in [0, 1] -> stored values: uint8 round(p * 255), or float16 (stored as 16-bit float)."""
    if prob_dtype == "uint8":
        return np.rint(prob * UINT8_SCALE).astype(np.uint8)
    if prob_dtype == "float16":
        return prob.astype(np.float16).astype(np.float32)
    raise ValueError(f"prob_dtype must be 'uint8' or 'float16', got {prob_dtype!r}")


def decode_probability(values: np.ndarray) -> np.ndarray:
    """Stored values -> probability float32: value / 255 for uint8 rasters, the value itself for float ones.

    The one raw-to-probability rule of every reader of the raster (evaluate's, the report's).
    """
    prob = values.astype(np.float32)
    if values.dtype == np.uint8:
        prob /= UINT8_SCALE
    return prob


def read_probability(
    path: str | Path, window: Window | None = None, out_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(probability float32 in [0, 1], valid bool) of a probability raster written by `predict_scene`.

    `out_shape` (height, width): a decimated read (from the COG's overviews where they fit): values
    averaged, the mask by nearest neighbour, so that a valid pixel is one the mask keeps at that scale.
    """
    with rasterio.open(path) as src:
        if out_shape is None:
            values = src.read(1, window=window)
            valid = src.read_masks(1, window=window) > 0
        else:
            values = src.read(1, window=window, out_shape=out_shape, resampling=Resampling.average)
            valid = src.read_masks(1, window=window, out_shape=out_shape, resampling=Resampling.nearest) > 0
    return decode_probability(values), valid


def raster_profile(width: int, height: int, transform: Any, crs: Any, prob_dtype: str,
                   bands: int = 1) -> dict[str, Any]:
    """The tiled GeoTIFF predict writes block by block before `to_cog` copies it: a temporary, read once, so
    ZSTD at its fastest level (the COG itself is DEFLATE, which every GIS reads): it writes faster than
    DEFLATE level 1 and copies to the COG no slower, at the same size. To measure, on a real probability
    raster, time writing it both ways (`gdal_translate -co TILED=YES -co COMPRESS=ZSTD -co ZSTD_LEVEL=1`
    against `-co COMPRESS=DEFLATE -co ZLEVEL=1`) and `to_cog` of each, and compare the file sizes
    (configs/xview2.md keeps the figures behind this choice)."""
    block = COG_BLOCK if min(width, height) >= COG_BLOCK else 256
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": bands,
        "dtype": "uint8" if prob_dtype == "uint8" else "float32",
        "transform": transform,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "zstd",
        "zstd_level": 1,
        "BIGTIFF": "IF_SAFER",
    }
    if crs is not None:
        profile["crs"] = crs
    if prob_dtype == "float16":
        profile["nbits"] = 16  # IEEE half floats inside a Float32 band (GDAL has no Float16 type here)
    return profile


def to_cog(src_path: Path, dst_path: Path, prob_dtype: str) -> None:
    """Copy a tiled GeoTIFF to a Cloud-Optimised GeoTIFF (overviews averaged, mask band kept), compressing on
    every core (GDAL's NUM_THREADS: predict has finished the scene's inference when this runs).

    DEFLATE level 1 with horizontal differencing for 8-bit rasters: faster than GDAL's default level 6
    without it, and no larger. To measure, time this copy of a real probability raster against
    `gdal_translate -of COG -co COMPRESS=DEFLATE` (level 6, no predictor) and compare the file sizes
    (configs/xview2.md keeps the figures behind this choice).
    """
    opts: dict[str, Any] = {
        "driver": "COG",
        "compress": "DEFLATE",
        "level": 1,
        "num_threads": "ALL_CPUS",
        "blocksize": COG_BLOCK,
        "overview_resampling": "average",
        "BIGTIFF": "IF_SAFER",
    }
    if prob_dtype == "float16":
        opts["nbits"] = 16
    else:
        opts["predictor"] = 2
    rasterio.shutil.copy(str(src_path), str(dst_path), **opts)


def threshold_raw(dtype: np.dtype, threshold: float) -> float:
    # uint8 rasters store round(255 * p); compare in raw units so no float copy of the block is needed
    return round(threshold * 255.0, 6) if np.issubdtype(dtype, np.integer) else threshold


def threshold_mask(raw: np.ndarray, threshold: float) -> np.ndarray:
    """Building mask of stored probability values: `p >= threshold`, p = value / 255 for uint8 rasters.

    The one comparison used by vectorisation and evaluation, so both see the same pixels.
    """
    return raw >= threshold_raw(raw.dtype, threshold)


def prob_scale(dtype: np.dtype) -> float:
    return 1.0 / 255.0 if np.issubdtype(dtype, np.integer) else 1.0

