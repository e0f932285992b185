"""Patches: a 3-band uint8 image GeoTIFF and a 1-band mask GeoTIFF per manifest row.

Mask values: 0 background, 1 building, 255 ignore (nodata, padding outside the scene). Each patch carries
its own transform and the scene's CRS, so GIS users can open any of them. Paths in the manifest
(`image_path`, `mask_path`) are relative to the tile folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from ..errors import InputError

IGNORE = 255
# GeoTIFF creation options of every patch: fast deflate (level 1) with the horizontal predictor
PATCH_PROFILE: dict[str, Any] = {"driver": "GTiff", "compress": "deflate", "zlevel": 1, "predictor": 2}


def patch_name(scene_id: str, row_off: int, col_off: int) -> str:
    return f"{scene_id}_r{row_off:05d}_c{col_off:05d}"


def write_patch(path: Path, array: np.ndarray, transform: Any, crs: Any, nodata: float | None = None) -> None:
    """Write a (bands, h, w) uint8 array as a GeoTIFF atomically: a `.part` name, then rename.

    The temporary name is fixed (`.<name>.part` beside the patch): a scene's patch folder belongs to the
    one task tiling that scene, and a fixed name spares the mkstemp round trip of `atomic_path`, which
    cost a fifth of the tile stage's time at 256 px patches.
    """
    profile = dict(PATCH_PROFILE, width=array.shape[2], height=array.shape[1], count=array.shape[0],
                   dtype=array.dtype.name, transform=transform, crs=crs)
    if nodata is not None:
        profile["nodata"] = nodata
    tmp = path.with_name(f".{path.name}.part")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _field(row: Any, name: str) -> Any:
    """A column of a manifest row given as a dict, a pandas Series or a namedtuple (itertuples)."""
    return getattr(row, name) if isinstance(row, tuple) else row[name]


def load_patch(tile_dir: str | Path, row: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (3, H, W), mask uint8 (H, W)) of one manifest row."""
    base = Path(tile_dir)
    image_path = base / _field(row, "image_path")
    try:
        with rasterio.open(image_path) as ds:
            image = ds.read()
        with rasterio.open(base / _field(row, "mask_path")) as ds:
            mask = ds.read(1)
    except rasterio.errors.RasterioError as err:
        raise InputError(image_path, f"unreadable patch ({' '.join(str(err).split())})") from None
    return image, mask
