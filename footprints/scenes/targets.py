"""What the classifier and the segmenter learn per pixel: the class schemes and the instance-aware target.

A model trained on merged building masks learns to merge touching roofs. Instance labels (xView2 JSON,
vector polygons) carry the separation: each building is rasterised on its own (`instance ids`), and extra
classes mark where buildings end (the recipe of the winning SpaceNet-4 and xView2 solutions):

- `binary`: background, building (the seed's two classes).
- `border`: background, building interior, building border (building pixels within `border_m` of the
  building's outline, where it meets background or another building).
- `contact`: as `border`, plus contact (background pixels within `contact_m` of two or more different
  buildings: the narrow gaps a model must not fill).

Distances are in metres, so a model means the same at 0.3 m and at 0.5 m. A pixel is a building when it is
of a `building` class; the watershed seeds come from the `seed` classes (the interior, or the building
itself for `binary`). Mask values: the class index, 255 ignore (nodata, outside the scene).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IGNORE = 255


@dataclass(frozen=True)
class ClassScheme:
    name: str
    classes: tuple[str, ...]  # class names; the index is the mask value
    building: tuple[int, ...]  # classes whose pixels are building
    seed: tuple[int, ...]  # classes whose probability seeds the watershed

    @property
    def k(self) -> int:
        return len(self.classes)

    @property
    def needs_instances(self) -> bool:
        return self.name != "binary"


SCHEMES: dict[str, ClassScheme] = {
    "binary": ClassScheme("binary", ("background", "building"), (1,), (1,)),
    "border": ClassScheme("border", ("background", "interior", "border"), (1, 2), (1,)),
    "contact": ClassScheme("contact", ("background", "interior", "border", "contact"), (1, 2), (1,)),
}


def scheme_for(classes: Sequence[str] | None) -> ClassScheme:
    """The scheme of a list of class names (a checkpoint's); None or the seed's two classes -> `binary`."""
    names = tuple(classes or SCHEMES["binary"].classes)
    for scheme in SCHEMES.values():
        if scheme.classes == names:
            return scheme
    raise ValueError(f"unknown class list {list(names)} (known: {[list(s.classes) for s in SCHEMES.values()]})")


def halo_px(border_m: float, contact_m: float, gsd_m: float | None) -> int:
    """Pixels of context a window needs so that border and contact classes near its edge are exact."""
    if gsd_m is None or gsd_m <= 0:
        gsd_m = 1.0
    return int(math.ceil(max(border_m, contact_m) / gsd_m)) + 2


def _edges(ids: np.ndarray) -> np.ndarray:
    """Building pixels with a 4-neighbour of another id (background or another building). The window's own
    edge is not an outline (edge padding), so a building cut by the window keeps no false border there."""
    p = np.pad(ids, 1, mode="edge")
    c = p[1:-1, 1:-1]
    e = (c != p[:-2, 1:-1]) | (c != p[2:, 1:-1]) | (c != p[1:-1, :-2]) | (c != p[1:-1, 2:])
    return e & (ids > 0)


def _contact(ids: np.ndarray, gsd_m: float, contact_m: float) -> np.ndarray:
    """Background pixels whose centre lies within `contact_m` of the outlines of two or more buildings."""
    h, w = ids.shape
    near = np.zeros((h, w), dtype=np.uint8)
    pad = int(math.ceil(contact_m / gsd_m)) + 2
    for i, sl in enumerate(ndimage.find_objects(ids)):
        if sl is None:
            continue
        r0, r1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
        c0, c1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
        inside = ids[r0:r1, c0:c1] == i + 1
        # distance from a pixel centre to the building's nearest pixel edge (half a pixel nearer than centres)
        d = ndimage.distance_transform_edt(~inside) * gsd_m - 0.5 * gsd_m
        near[r0:r1, c0:c1] += (d <= contact_m) & ~inside
    return (near >= 2) & (ids == 0)


def instance_target(ids: np.ndarray, scheme: ClassScheme, gsd_m: float | None, border_m: float = 1.0,
                    contact_m: float = 2.0) -> np.ndarray:
    """Class mask (uint8) of instance ids (int, 0 = background, one id per building) under `scheme`.

    `gsd_m` is the pixel size in metres (None in pixel space: distances are then taken as pixels).
    """
    gsd = float(gsd_m) if gsd_m else 1.0
    building = ids > 0
    out = np.zeros(ids.shape, dtype=np.uint8)
    out[building] = 1
    if scheme.name in ("border", "contact"):
        inner = building & ~_edges(ids)
        # distance from a building pixel's centre to the outline: its distance to the nearest edge pixel's
        # centre, plus half a pixel
        d = ndimage.distance_transform_edt(inner) * gsd + 0.5 * gsd
        out[building & (d <= border_m)] = 2
    if scheme.name == "contact":
        out[_contact(ids, gsd, contact_m)] = 3
    return out


def building_of(target: np.ndarray, scheme: ClassScheme) -> np.ndarray:
    """The 0/1/255 building mask of a class mask (255 stays ignore)."""
    out = np.isin(target, scheme.building).astype(np.uint8)
    out[target == IGNORE] = IGNORE
    return out
