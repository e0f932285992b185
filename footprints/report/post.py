"""A damage run's post-disaster imagery on the page: each scene's post-disaster twin, on its pre image's place.

A run graded by the damage stage (`<run>/damage/`) shows, beside each scene's (pre-disaster) imagery, the
layer "Post-disaster imagery": the scene's post-disaster twin (`scenes.pairs.post_source`: the same folders,
`_pre_disaster` -> `_post_disaster`), read as the damage stage reads it (`scenes.pairs.PostOnGrid`: an
xView2 PNG pair shares one pixel grid; a GeoTIFF in another CRS or grid is resampled onto the pre scene's),
on the pixel grid of the pre image file the page shows. So the post picture is downsampled to exactly the
pre picture's size and transform and goes through the same placing and encoding (`rasters.make_overlay`):
the two overlays cover the same corners, and a user flips between before and after in the layer control.

The pair is opened with `scenes.pairs.open_pair`, the pre scene keeping the georeference of its tile record
(`pre_georef`: the one its own overlay is placed by; fitting it again would need the label or
`data.geotransforms`) and not resampled to `tile.target_gsd` (the page shows the image file's own grid).
A post image that is missing or cannot be read costs its scene the layer only (a line in the log), never
the page.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

if TYPE_CHECKING:
    from ..config import DataConfig
    from ..scenes.sources import SceneSource

log = logging.getLogger(__name__)

STRIP_PX = 1 << 22  # pixels of the pre grid read at a time (bounded memory for any scene size)
# what of a scene's tile record `params` reads its pixels (`geotransforms`: a post GeoTIFF without a CRS)
SETTINGS = ("bands", "stretch_percentiles", "nodata", "max_residual_px", "geotransforms")


@dataclass
class PostImagery:
    """The post-disaster twin (`image`) of a scene's pre image (`pre_image`), and the `data:` settings the
    tile stage read the scene with (its record's `params`: bands, stretch, nodata; `geotransforms` found
    again). `rgba` reads it; the last picture read is kept, so that the page's re-renders at a smaller
    side (`html.write_report`'s size bound) downsample it instead of reading the scene again."""

    pre_image: Path
    image: Path
    settings: Mapping[str, Any] = field(default_factory=dict)
    _cache: tuple[tuple[Any, ...], np.ndarray] | None = field(default=None, repr=False)

    def rgba(
        self, transform: Affine, crs: CRS | None, src_size: tuple[int, int], shape: tuple[int, int]
    ) -> np.ndarray:
        """RGBA (4, h, w) uint8 of the post image on the pre image's pixel grid (`transform`, `crs`,
        `src_size` (w, h) px: the pre file's own), averaged down to `shape` (h, w): the pre picture's. Alpha
        is the post scene's validity (nodata, and, resampled, outside the post scene). Raises on a missing or
        unreadable post image."""
        key = (tuple(float(f"{v:.12g}") for v in tuple(transform)[:6]), str(crs or ""), tuple(src_size))
        if self._cache is not None and self._cache[0] == key:
            cached = self._cache[1]
            if cached.shape[1:] == tuple(shape):
                return cached
            if cached.shape[1] >= shape[0] and cached.shape[2] >= shape[1]:
                planes = _premultiplied(cached)
                out = _finish(_box_resize(planes, shape))
                self._cache = (key, out)
                return out
        out = self._read(transform, crs, src_size, shape)
        self._cache = (key, out)
        return out

    def _read(
        self, transform: Affine, crs: CRS | None, src_size: tuple[int, int], shape: tuple[int, int]
    ) -> np.ndarray:
        from ..config import DataConfig
        from ..scenes.sources import SceneSource

        cfg = DataConfig(**{k: self.settings[k] for k in SETTINGS if self.settings.get(k) is not None})
        with warnings.catch_warnings():  # an xView2 PNG has no georeference of its own: it is given one
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return self._read_pair(SceneSource(self.pre_image), SceneSource(self.image), cfg, transform, crs,
                                   src_size, shape)

    def _read_pair(
        self, pre_src: SceneSource, post_src: SceneSource, cfg: DataConfig, transform: Affine, crs: CRS | None,
        src_size: tuple[int, int], shape: tuple[int, int],
    ) -> np.ndarray:
        from rasterio.windows import Window

        from ..scenes.pairs import open_pair

        with open_pair(pre_src, post_src, cfg, None, pre_georef=(transform, crs)) as pair:
            width, height = pair.pre.width, pair.pre.height
            if (width, height) != tuple(src_size):
                raise ValueError(f"the pre scene opens {width}x{height} px, its image is "
                                 f"{src_size[0]}x{src_size[1]} px")
            h, w = shape
            fy = height / h
            step = max(1, int(STRIP_PX // max(1, width * fy)))
            parts = []
            for a in range(0, h, step):
                b = min(h, a + step)
                y0, y1 = a * fy, b * fy
                r0, r1 = math.floor(y0), min(height, math.ceil(y1))
                rgb, valid = pair.post_on_grid.read(Window(0, r0, width, r1 - r0))
                planes = np.concatenate([rgb.astype(np.float32) * valid, valid[None].astype(np.float32)])
                parts.append(_box_resize(planes, (b - a, w), (0.0, y0 - r0, float(width), y1 - r0)))
        return _finish(np.concatenate(parts, axis=1))


def _premultiplied(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 -> (4, h, w) float32: RGB times validity (0/1), then validity."""
    valid = (rgba[3] > 0).astype(np.float32)
    return np.concatenate([rgba[:3].astype(np.float32) * valid, valid[None]])


def _box_resize(
    planes: np.ndarray, shape: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """(n, H, W) float32 planes averaged (area) to (n, h, w); `box` (left, top, right, bottom; fractions of a
    pixel allowed) the part of them that becomes the output."""
    from PIL import Image

    h, w = shape
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(p), mode="F").resize((w, h), Image.Resampling.BOX, box=box))
        for p in planes
    ])


def _finish(planes: np.ndarray) -> np.ndarray:
    """Premultiplied planes (RGB x validity, validity) -> RGBA uint8, opaque where at least half valid."""
    cover = planes[3]
    keep = cover >= 0.5
    rgb = np.where(keep, planes[:3] / np.maximum(cover, 1e-6), 0.0)
    alpha = np.where(keep, 255, 0).astype(np.uint8)
    return np.concatenate([np.clip(np.rint(rgb), 0, 255).astype(np.uint8), alpha[None]])


def post_imagery(
    scene_id: str, pre_image: Path | None, settings: Mapping[str, Any] | None
) -> PostImagery | None:
    """The `PostImagery` of a scene whose image is `pre_image`, or None (said in the log) when the image is
    not named as a pre-disaster scene or its post-disaster twin is not there."""
    from ..scenes.pairs import post_source
    from ..scenes.sources import SceneSource

    if pre_image is None:
        return None
    twin = post_source(SceneSource(Path(pre_image)))
    if twin is None:
        log.info("report: %s: %s is not named as a pre-disaster image: no post-disaster imagery", scene_id,
                 Path(pre_image).name)
        return None
    if not twin.image.is_file():
        log.warning("report: %s: no post-disaster imagery (%s not found)", scene_id, twin.image)
        return None
    return PostImagery(Path(pre_image), twin.image, dict(settings or {}))
