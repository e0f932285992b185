"""Opening rasters for reading: one-line errors naming the file, and no warning for plain PNGs (xView2)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from .errors import InputError, one_line


def open_raster(path: Path, what: str) -> Any:
    """rasterio.open without the PNG georeference warning; failures as one-line InputErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as err:
        raise InputError(path, f"unreadable {what} ({one_line(err)})") from None
