"""A scene's rasters on the page: where they lie (`RasterPlacement`) and their overlays at a given side.

The report renders each scene's imagery and probability raster possibly several times, at a shrinking
longest side, until the page fits its size bound (`html.write_report`); this module does one rendering.
An image without georeference (xView2 PNGs) is placed by the scene's own transform, or stretched over the
probability raster's extent. A raster that cannot be read or shown is noted on its scene and left out, so
one bad file never costs the other scenes their page.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from affine import Affine
from rasterio.crs import CRS

from . import rasters
from .scene import ReportScene, note

log = logging.getLogger(__name__)


@dataclass
class RasterPlacement:
    """Where a scene's rasters lie: georeferenced (crs) or pixel space, and the transform and size of the
    raster it was read from (the probability raster; the image for a scene without one).

    Not `inference.WindowGrid` (predict's window grid over a scene): this is what the page needs to place a
    scene's pictures and to lay pixel-space scenes side by side.
    """

    crs: CRS | None
    prob_transform: Affine | None = None
    prob_size: tuple[int, int] | None = None


def raster_placement(path: Path | None) -> RasterPlacement | None:
    """The `RasterPlacement` of a raster file (None when there is no such file)."""
    if path is None or not Path(path).is_file():
        return None
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return RasterPlacement(src.crs, src.transform, (src.width, src.height))


def safe_raster_placement(scene: ReportScene, path: Path | None, what: str) -> RasterPlacement | None:
    """`raster_placement`, an unreadable file noted on its scene (and left out) instead of failing the page."""
    try:
        return raster_placement(path)
    except Exception as err:  # noqa: BLE001 - one bad raster must not cost the other scenes their page
        log.warning("report: %s: cannot read the %s %s (%s)", scene.scene_id, what, path, " ".join(str(err).split()))
        note(scene, f"{what} not shown: cannot read it")
        return None


def image_georef(
    scene: ReportScene, at: RasterPlacement | None
) -> tuple[Affine | None, CRS | None, str | None]:
    """(transform, crs, note) for the scene image; (None, None) means: use the file's own georeference."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    assert scene.image is not None
    if scene.image_transform is not None:
        t = scene.image_transform
        t = t if isinstance(t, Affine) else Affine.from_gdal(*[float(v) for v in t])
        crs = CRS.from_user_input(scene.image_crs) if scene.image_crs else None
        return t, crs, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(scene.image) as src:
            if src.crs is not None:
                return None, None, None
            size = (src.width, src.height)
    if at is not None and at.prob_transform is not None and at.prob_size is not None:
        t = at.prob_transform * Affine.scale(at.prob_size[0] / size[0], at.prob_size[1] / size[1])
        text = (
            "imagery placed on the probability raster's extent (the image file has no georeference)"
            if scene.prob is not None
            else None
        )
        return t, at.crs, text
    return None, None, None


@dataclass
class SceneRasters:
    """A scene's overlays rendered at most `side` px on their longest side (any may be missing; `post`, a
    damage run's post-disaster imagery, only with `image`, on its place)."""

    image: rasters.Overlay | None = None
    prob: rasters.Overlay | None = None
    side: int = 0
    post: rasters.Overlay | None = None

    @property
    def nbytes(self) -> int:
        return sum(ov.nbytes for ov in (self.image, self.prob, self.post) if ov is not None)


def render_post(
    scene: ReportScene, shape: tuple[int, ...], transform: Affine, crs: CRS | None, size: tuple[int, int],
    side: int, fmt: str,
) -> rasters.Overlay | None:
    """The scene's post-disaster imagery as its image's picture was made: on the image's grid (`transform` of
    the `shape` (h, w) picture of a `size` (w, h) px image), placed and encoded alike. A post image that
    cannot be read: None, and a line in the log (the scene keeps its other layers)."""
    assert scene.post is not None
    h, w = int(shape[0]), int(shape[1])
    try:
        own = transform * Affine.scale(w / size[0], h / size[1])  # the image file's own pixel grid
        rgba = scene.post.rgba(own, crs, size, (h, w))
        return rasters.make_overlay(rgba, transform, crs, size, side, fmt)
    except Exception as err:  # noqa: BLE001 - a bad post image costs its layer only
        log.warning("report: %s: no post-disaster imagery: cannot show %s (%s)", scene.scene_id,
                    scene.post.image, " ".join(str(err).split()))
        scene.post = None
        return None


def render_scene(
    scene: ReportScene, placement: RasterPlacement | None, geo: bool, side: int, fmt: str
) -> SceneRasters:
    """The scene's imagery (as `fmt`) and probability overlays at most `side` px; what fails is noted."""
    out = SceneRasters(side=side)
    if scene.image is not None and Path(scene.image).is_file():
        try:
            t, crs, text = image_georef(scene, placement)
            rgba, tt, cc, size = rasters.read_rgba(scene.image, side, t, crs)
            if (cc is not None) != geo:  # e.g. a PNG without georeference beside lon/lat footprints
                note(scene, "imagery not shown: it has no georeference and nothing to place it by")
            else:
                out.image = rasters.make_overlay(rgba, tt, cc, size, side, fmt)
                if text:
                    note(scene, text)
                if scene.post is not None:
                    out.post = render_post(scene, rgba.shape[1:], tt, cc, size, side, fmt)
        except Exception as err:  # a broken image must not cost the whole report
            log.warning("report: %s: cannot show the image %s (%s)", scene.scene_id, scene.image, err)
            note(scene, f"imagery not shown: {err}")
    elif scene.image is not None:
        note(scene, f"imagery not shown: {scene.image} not found")
    if scene.prob is not None and Path(scene.prob).is_file():
        try:
            out.prob = rasters.probability_overlay(scene.prob, side)
        except Exception as err:
            log.warning(
                "report: %s: cannot show the probability raster %s (%s)", scene.scene_id, scene.prob, err
            )
            note(scene, f"probability raster not shown: {err}")
    return out
