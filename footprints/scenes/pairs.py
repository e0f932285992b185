"""Pre/post-disaster pairs: the post scene of a pre scene, its pixels on the pre scene's grid, its grades.

- `post_source`: the post-disaster twin of a pre-disaster scene in the xView2 layout
  (`images/<x>_pre_disaster.png` -> `images/<x>_post_disaster.png`, `labels/<x>_post_disaster.json`); a
  GeoTIFF source names its post scenes the same way.
- `PostOnGrid`: the post scene read window by window on the pre scene's output grid. An xView2 PNG pair
  shares one pixel grid (the post PNG is the same size, pixel for pixel); a georeferenced pair in any CRS is
  resampled (bilinear) onto the pre grid, and one that does not overlap the pre scene is refused.
- `open_pair`: a pre scene and its post scene opened together (`OpenPair`).
- `graded_buildings`: every building of a post scene's labels with its damage grade on the pre grid (an
  xView2 label's `subtype`, or a vector label's `subtype`/`damage` with a `uid`). A post label naming a
  building the pre label lacks is refused: the two labels of one place describe the same buildings. A post
  scene without grades is graded, not trained on.

Bad files raise `InputError` naming them (one line), as every reader of this package does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from ..config import DataConfig, TileConfig
from ..errors import InputError
from .grades import GRADES, UNCLASSIFIED
from .reader import SceneReader, open_scene
from .sources import PLAIN_SUFFIXES, SceneSource

log = logging.getLogger(__name__)

PRE, POST = "_pre_disaster", "_post_disaster"


def post_source(pre: SceneSource) -> SceneSource | None:
    """The post-disaster scene beside `pre` (same folders, `_pre_disaster` -> `_post_disaster` in the file
    names), or None when `pre`'s image is not named as a pre-disaster scene. The files may be missing: opening
    them says so."""
    stem = pre.image.stem
    if not stem.endswith(PRE):
        return None
    post_stem = stem[: -len(PRE)] + POST
    image = pre.image.with_name(post_stem + pre.image.suffix)
    label = pre.label.with_name(post_stem + pre.label.suffix) if pre.label is not None else None
    return dataclasses.replace(pre, image=image, label=label, mask=None, name=None)


def _same_grid(pre: SceneReader, post: SceneReader) -> bool:
    """The same size, CRS and transform (within a thousandth of a pixel): nothing to resample."""
    if (pre.width, pre.height) != (post.width, post.height) or pre.crs is None or pre.crs != post.crs:
        return False
    tolerance = 1e-3 * (abs(pre.transform.a) or 1.0)
    return all(abs(a - b) <= tolerance for a, b in zip(pre.transform[:6], post.transform[:6], strict=True))


class PostOnGrid:
    """The post scene's RGB on the pre scene's output grid, window by window (see the module docstring)."""

    def __init__(self, pre: SceneReader, post: SceneReader):
        self.pre, self.post = pre, post
        plain = post.source.image.suffix.lower() in PLAIN_SUFFIXES
        if plain or _same_grid(pre, post) or pre.crs is None or post.crs is None:
            # xView2 PNGs (and scenes without a CRS) share the pre scene's pixel grid: same size, same pixels
            if (post.width, post.height) != (pre.width, pre.height):
                raise InputError(post.source.image, f"post-disaster scene is {post.width}x{post.height} px, its "
                                 f"pre-disaster scene {pre.source.image.name} {pre.width}x{pre.height} px: a pair "
                                 "must share one grid")
            self.resample = False
        else:
            self._check_overlap()
            self.resample = True

    def _check_overlap(self) -> None:
        from rasterio.warp import transform_bounds

        pre, post = self.pre, self.post
        pb = _grid_bounds(pre.transform, pre.width, pre.height)
        qb = transform_bounds(post.crs, pre.crs, *_grid_bounds(post.transform, post.width, post.height))
        w = min(pb[2], qb[2]) - max(pb[0], qb[0])
        h = min(pb[3], qb[3]) - max(pb[1], qb[1])
        if w <= 0 or h <= 0:
            raise InputError(post.source.image, f"post-disaster scene does not overlap its pre-disaster scene "
                             f"{pre.source.image.name}")
        share = w * h / ((pb[2] - pb[0]) * (pb[3] - pb[1]))
        if share < 0.99:
            log.warning("%s: the post-disaster scene covers %.0f%% of its pre-disaster scene %s; buildings wholly "
                        "outside it are left without a grade (those partly outside, graded from their pixels in it)",
                        post.source.image, 100 * share, pre.source.image.name)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (3, h, w) and validity (h, w) of the post scene on the pre grid's `window`."""
        if not self.resample:
            return self.post.read(window)
        from rasterio.warp import Resampling, reproject, transform_bounds
        from rasterio.windows import from_bounds

        pre, post = self.pre, self.post
        h, w = int(window.height), int(window.width)
        dst_transform = pre.window_transform(window)
        bounds = transform_bounds(pre.crs, post.crs, *_grid_bounds(dst_transform, w, h))
        src = from_bounds(*bounds, transform=post.transform).round_offsets().round_lengths()
        src = Window(src.col_off - 2, src.row_off - 2, src.width + 4, src.height + 4)  # the bilinear taps
        rgb, valid = post.read(src)
        out = np.zeros((3, h, w), np.uint8)
        ok = np.zeros((h, w), np.uint8)
        src_transform = post.window_transform(src)
        reproject(rgb, out, src_transform=src_transform, src_crs=post.crs, dst_transform=dst_transform,
                  dst_crs=pre.crs, resampling=Resampling.bilinear)
        reproject(valid.astype(np.uint8), ok, src_transform=src_transform, src_crs=post.crs,
                  dst_transform=dst_transform, dst_crs=pre.crs, resampling=Resampling.nearest)
        return out, ok.astype(bool)


@dataclasses.dataclass
class OpenPair:
    """A pre scene and its post scene on the pre grid (close with `close`, or use it as a context manager)."""

    pre: SceneReader
    post: SceneReader
    post_on_grid: PostOnGrid

    def close(self) -> None:
        self.pre.close()
        self.post.close()

    def __enter__(self) -> OpenPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pair(pre_src: SceneSource, post_src: SceneSource | None, data_cfg: DataConfig,
              tile_cfg: TileConfig | None, pre_georef: tuple[Affine, CRS | None] | None = None) -> OpenPair:
    """Open a pair; `post_src` None: the xView2-named twin of `pre_src` (`post_source`). A post scene without
    its label file is opened unlabelled (graded, not trained on). `pre_georef`: the pre scene's source-grid
    (transform, CRS) as given (the report places it by its tile record's), instead of its own. Bad input:
    `InputError` naming the file."""
    post_src = post_src if post_src is not None else post_source(pre_src)
    if post_src is None:
        raise InputError(pre_src.image, "not named as a pre-disaster scene (<name>_pre_disaster.<ext>): its "
                         "post-disaster scene cannot be found")
    if not post_src.image.exists():
        raise InputError(post_src.image, f"post-disaster scene missing (the pair of {pre_src.image.name})")
    if post_src.label is not None and not post_src.label.exists():
        post_src = dataclasses.replace(post_src, label=None)
    pre = open_scene(pre_src, data_cfg, tile_cfg, georef=pre_georef)
    try:
        # an xView2 PNG pair shares one grid: the post PNG gets the pre scene's georeference (an empty post
        # label has no vertices to fit one to)
        shared = pre.source_georef if post_src.image.suffix.lower() in PLAIN_SUFFIXES else None
        post = open_scene(post_src, data_cfg, tile_cfg, georef=shared)
    except BaseException:
        pre.close()
        raise
    try:
        return OpenPair(pre, post, PostOnGrid(pre, post))
    except BaseException:
        pre.close()
        post.close()
        raise


def _grid_bounds(t: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a `width` x `height` grid through `t`, from its four corners."""
    xs, ys = zip(*(t * (c, r) for c, r in ((0, 0), (width, 0), (0, height), (width, height))), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _grade_of(path: Path, where: str, value: Any) -> str | None:
    """A label's grade: one of GRADES, None for un-classified; a clear error otherwise."""
    if value == UNCLASSIFIED:
        return None
    if value not in GRADES:
        what = "no damage grade (subtype)" if value is None else f"unknown damage grade {str(value)[:40]!r}"
        raise InputError(path, f"{where}: {what} (expected one of {', '.join(GRADES)} or {UNCLASSIFIED})")
    return str(value)


@dataclasses.dataclass(frozen=True)
class GradedBuilding:
    uid: str
    grade: str | None  # None: un-classified (neither trained on nor scored)
    polygon: Any  # on the pre scene's output grid (pixels)


GRADE_FIELDS = ("subtype", "damage")  # where a vector label keeps a building's grade: xView2's name, or ours


def graded_buildings(post: SceneReader, pre: SceneReader) -> list[GradedBuilding] | None:
    """The buildings of a post scene's labels with their grades, on the pre scene's grid: an xView2 label's
    `subtype`, or a vector label's `subtype` (or `damage`, as `footprints damage` writes it) with a `uid`.
    None when the post scene has no labels or they carry no grades (a post scene to grade, not to train on).
    A building the pre label lacks (by uid) is refused, naming the post label."""
    label = post.xview2_label
    if label is not None:
        if label.properties and all("subtype" not in p for p in label.properties):
            return None  # (a label without buildings is a graded scene with none)
        path, props = label.path, label.properties
        polygons = post.source_to_output(label.polygons)  # the pair shares one pixel grid (PostOnGrid checks)
    elif post.source.label is not None and post.source.label_kind == "vector":
        from .labels import read_vector_labels

        path = post.source.label
        polygons, fields = read_vector_labels(path, pre.crs, pre.transform, post.source.data.label_layer
                                              if post.source.data is not None else None, ("uid", *GRADE_FIELDS))
        column = next((c for c in GRADE_FIELDS if c in fields), None)
        if column is None:
            return None
        if "uid" not in fields:
            raise InputError(path, f"damage labels need a 'uid' per building beside its {column!r}")
        props = [{"uid": u, "subtype": g} for u, g in zip(fields["uid"], fields[column], strict=True)]
    else:
        return None
    grades, uids = [], []
    for i, p in enumerate(props):
        uid = p.get("uid")
        if not isinstance(uid, str) or not uid:
            raise InputError(path, f"building {i} has no uid")
        uids.append(uid)
        grades.append(_grade_of(path, f"building {i}", p.get("subtype")))
    known = _pre_uids(pre)
    if known is not None:
        extra = [u for u in uids if u not in known]
        if extra:
            raise InputError(path, f"{len(extra)} building(s) absent from the pre-disaster label "
                             f"{pre.source.label.name} (e.g. uid {extra[0][:40]})")
    return [GradedBuilding(u, g, p) for u, g, p in zip(uids, grades, polygons, strict=True)
            if p is not None and not p.is_empty]


def _pre_uids(pre: SceneReader) -> set[str] | None:
    """The building uids of the pre scene's labels (None: it has none to compare with)."""
    if pre.xview2_label is not None:
        return {p.get("uid") for p in pre.xview2_label.properties}
    if pre.source.label is not None and pre.source.label_kind == "vector":
        from .labels import read_vector_labels

        _, fields = read_vector_labels(pre.source.label, pre.crs, pre.transform, columns=("uid",))
        return set(fields["uid"]) if "uid" in fields else None
    return None
