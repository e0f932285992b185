"""Synthetic xView2-layout scenes: plausible enough that colour alone does not find the buildings.

`write_synthetic_dataset` writes the real xView2 layout (``images/<disaster>_<8-digit id>_pre_disaster.png``
and ``labels/<same stem>.json`` with ``features.xy`` / ``features.lng_lat`` WKT and ``metadata``), the exact
pixel -> WGS84 geotransform of every scene (``truth_transforms.json``, the format of ``data.geotransforms``),
and optionally a GeoTIFF variant of the same pixels in the scene's UTM zone with EPSG:4326 GeoJSON labels
(``geotiff/images/<stem>.tif``, ``geotiff/labels/<stem>.geojson``), so that the tile stage has to reproject.

Each scene is drawn from its own generator seeded by (seed, scene index): the same seed gives the same bytes.
A scene is textured ground made of a few blended land-cover colours, yards, paved lots and small clutter
in roof and ground colours (hard negatives), roads, trees, and buildings (`synth.buildings`): detached
rectangles, L-shapes and courtyard buildings (a polygon with a hole), semi-detached pairs and terraces of
3-6 houses that share walls, and neighbours 0.5-1.5 m apart. Every building is its own instance polygon,
as in xView2: touching houses are separate polygons sharing the wall's edge exactly (no pixel belongs to
both, none between them is lost). Roof colours include ground-like browns and greys, with a ridge or
gradient and a shadow cast away from the sun given in the metadata; a shared wall shows sometimes (a
colour or ridge change, a thin dark or light line), not always; then blur and sensor noise. Pixel
coordinates follow xView2: x = column, y = row, (0, 0) the top-left image corner, so the centre of pixel
(row r, col c) is (c + 0.5, r + 0.5). Label WKT carries courtyards as interior rings (in `xy` and `lng_lat`
alike; GeoJSON holes are clockwise, exteriors counter-clockwise, RFC 7946).

The files a data set is written as (xView2 layout, GeoTIFF variant, georeference) are `synth.dataset`'s.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import shapely
from rasterio.features import rasterize
from scipy.ndimage import gaussian_filter
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon, box

from .buildings import (
    GSD_M,
    MAX_BUILDING_FRACTION,  # noqa: F401 - still importable from here, as before the split
    ROOF_COLOURS,
    Building,
    Wall,
    place_buildings,
    roof_shading,
)

log = logging.getLogger(__name__)


# Real xBD events (name, scene-centre latitude, longitude, disaster type): scenes sit near them.
PLACES: tuple[tuple[str, float, float, str], ...] = (
    ("hurricane-harvey", 29.7604, -95.3698, "flooding"),
    ("hurricane-michael", 30.1588, -85.6602, "wind"),
    ("palu-tsunami", -0.8917, 119.8707, "tsunami"),
    ("santa-rosa-wildfire", 38.4741, -122.7286, "fire"),
    ("mexico-earthquake", 19.3467, -99.1617, "earthquake"),
    ("joplin-tornado", 37.0629, -94.4991, "tornado"),
    ("guatemala-volcano", 14.4747, -90.8806, "volcano"),
    ("pinery-bushfire", -34.2970, 138.3210, "fire"),
    ("portugal-wildfire", 39.9495, -8.1980, "fire"),
    ("hurricane-matthew", 18.6500, -74.1167, "wind"),
)
SENSORS = ("WORLDVIEW02", "WORLDVIEW03_VNIR", "GEOEYE01", "QUICKBIRD02")

# Land-cover colours (RGB): grass, dry grass, bare soil, sand, pavement, dark soil.
GROUND_COLOURS = np.array(
    [[88, 104, 66], [142, 134, 96], [134, 112, 88], [176, 164, 134], [146, 144, 138], [96, 86, 70]],
    dtype=np.float32,
)
ROAD_COLOURS = np.array([[84, 84, 86], [110, 108, 104], [164, 160, 152], [140, 122, 100]], dtype=np.float32)
TREE_COLOURS = np.array([[52, 70, 38], [64, 82, 46], [44, 58, 36], [76, 88, 52]], dtype=np.float32)


# ----------------------------------------------------------------------------------------------- noise
def _lattice_weights(n_out: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower lattice index and smoothstep weight of each of n_out pixel centres (lattice spacing `cell`)."""
    pos = (np.arange(n_out) + 0.5) / cell
    i0 = np.floor(pos).astype(np.int64)
    t = pos - i0
    return i0, (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def value_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """One octave of smooth value noise (size, size) in about [-1, 1], lattice spacing `cell` pixels."""
    n_grid = int(math.ceil(size / cell)) + 2
    grid = rng.uniform(-1.0, 1.0, (n_grid, n_grid)).astype(np.float32)
    i0, t = _lattice_weights(size, cell)
    rows = grid[i0] * (1.0 - t)[:, None] + grid[i0 + 1] * t[:, None]  # (size, n_grid), separable
    return rows[:, i0] * (1.0 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def fractal_noise(rng: np.random.Generator, size: int, base_cell: float, octaves: int = 4,
                  persistence: float = 0.5) -> np.ndarray:
    """Multi-octave value noise, normalised to unit standard deviation."""
    out = np.zeros((size, size), dtype=np.float32)
    amp, cell = 1.0, float(base_cell)
    for _ in range(octaves):
        out += amp * value_noise(rng, size, max(cell, 1.5))
        amp *= persistence
        cell /= 2.0
    return out / (out.std() + 1e-6)


# ------------------------------------------------------------------------------------------- geometry
def _roads(rng: np.random.Generator, size: int, base_angle: float) -> tuple[list[Polygon], list[np.ndarray]]:
    """A few straight or gently bent roads across the scene, aligned with the dominant building angle."""
    n = int(rng.integers(1, 6))
    polys: list[Polygon] = []
    colours: list[np.ndarray] = []
    diag = size * 1.5
    for i in range(n):
        ang = math.radians(base_angle + (90.0 if i % 2 else 0.0) + rng.normal(0, 4))
        if rng.random() < 0.25:
            ang = rng.uniform(0, math.pi)
        px, py = rng.uniform(0, size, 2)
        dx, dy = math.cos(ang), math.sin(ang)
        pts = [(px - dx * diag, py - dy * diag), (px, py)]
        bend = math.radians(rng.normal(0, 10))
        dx2, dy2 = math.cos(ang + bend), math.sin(ang + bend)
        pts.append((px + dx2 * diag, py + dy2 * diag))
        width = rng.uniform(8.0, 24.0) if size >= 128 else rng.uniform(3.0, 6.0)
        polys.append(LineString(pts).buffer(width / 2.0, cap_style="flat"))
        colours.append(ROAD_COLOURS[rng.integers(len(ROAD_COLOURS))] * rng.uniform(0.9, 1.1))
    return polys, colours


def _trees(rng: np.random.Generator, size: int, buildings: list[Building]) -> list[tuple[float, float, float]]:
    """Tree crowns (cx, cy, radius): random clumps plus some next to buildings."""
    scale = size / 1024.0
    out: list[tuple[float, float, float]] = []
    n_clumps = int(rng.integers(2, 14) * max(scale, 0.1) + 0.5)
    for _ in range(n_clumps):
        cx, cy = rng.uniform(0, size, 2)
        spread = rng.uniform(10, 70) * max(scale, 0.15)
        for _ in range(int(rng.integers(3, 30))):
            out.append((cx + rng.normal(0, spread), cy + rng.normal(0, spread), rng.uniform(3.0, 11.0)))
    for b in buildings:
        if rng.random() < 0.5:
            for _ in range(int(rng.integers(1, 4))):
                # around the building: crowns shade yards; buildings are drawn over any crown they touch
                ang = rng.uniform(0, 2 * math.pi)
                dist = max(b.half_len, b.half_wid) + rng.uniform(2.0, 12.0)
                out.append((b.cx + dist * math.cos(ang), b.cy + dist * math.sin(ang), rng.uniform(3.0, 9.0)))
    return out


def _burn(geoms: list[Any], size: int, values: list[int] | None = None, dtype: str = "uint8") -> np.ndarray:
    """Rasterise geometries onto the (size, size) pixel grid (pixel centres inside; later ones on top)."""
    if not geoms:
        return np.zeros((size, size), dtype=dtype)
    shapes = zip(geoms, values, strict=True) if values is not None else ((g, 1) for g in geoms)
    return rasterize(shapes, out_shape=(size, size), fill=0, dtype=dtype)


def _paint(img: np.ndarray, geoms: list[Any], colours: list[np.ndarray], texture: np.ndarray) -> None:
    """Fill geometries (later ones on top) with their colours, modulated by (1 + texture), in place."""
    if not geoms:
        return
    ids = _burn(geoms, img.shape[0], list(range(1, len(geoms) + 1)), "int32")
    on = ids > 0
    lut = np.asarray(colours, dtype=np.float32).reshape(-1, 3)
    img[on] = lut[ids[on] - 1] * (1.0 + texture[on])[:, None]


# ---------------------------------------------------------------------------------------------- scene
def make_scene(rng: np.random.Generator, size: int = 1024, empty: bool | None = None,
               sun_azimuth: float | None = None, sun_elevation: float | None = None
               ) -> tuple[np.ndarray, list[Polygon]]:
    """Draw one scene: (rgb uint8 (size, size, 3), building polygons in pixel coordinates).

    `empty=True` forces a scene without buildings, `empty=False` one with buildings; None draws it (about
    one scene in six has none). Building pixels are 3-15 % of a scene that has buildings. The sun angles
    (degrees) set the shadow direction and length.
    """
    rgb, buildings, _ = draw_scene(rng, size, empty, sun_azimuth, sun_elevation)
    return rgb, buildings


def draw_scene(rng: np.random.Generator, size: int, empty: bool | None, sun_azimuth: float | None,
               sun_elevation: float | None) -> tuple[np.ndarray, list[Polygon], dict[str, float]]:
    """`make_scene`, and the sun angles it drew (`sun_azimuth`, `sun_elevation`: the label metadata)."""
    if empty is None:
        empty = bool(rng.random() < 1.0 / 6.0)
    az = float(rng.uniform(100.0, 260.0) if sun_azimuth is None else sun_azimuth)
    el = float(rng.uniform(40.0, 75.0) if sun_elevation is None else sun_elevation)
    # shadows fall away from the sun: image x is east, y is south
    shadow_dir = np.array([-math.sin(math.radians(az)), math.cos(math.radians(az))])
    shadow_px_per_m = 1.0 / math.tan(math.radians(el)) / GSD_M
    base_angle = float(rng.uniform(0, 180))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # ground: soft blend of 3-4 land covers, textured by multi-octave noise and speckle
    n_cover = int(rng.integers(3, 5))
    cover = GROUND_COLOURS[rng.choice(len(GROUND_COLOURS), n_cover, replace=False)]
    cover = cover * rng.uniform(0.9, 1.1, (n_cover, 1)).astype(np.float32)
    fields = np.stack([fractal_noise(rng, size, rng.uniform(150, 400) * size / 1024 + 8, 3)
                       for _ in range(n_cover)])
    w = np.exp(3.0 * (fields - fields.max(0, keepdims=True)))
    w /= w.sum(0, keepdims=True)
    img = np.einsum("khw,kc->hwc", w, cover)
    tex = fractal_noise(rng, size, 24.0, 4, 0.6)
    fine = value_noise(rng, size, 2.0)
    speckle = value_noise(rng, size, 1.0)
    img *= (1.0 + 0.10 * tex + 0.07 * fine + 0.05 * speckle)[..., None]

    road_polys, road_cols = _roads(rng, size, base_angle)

    # buildings (geometry first: yards and trees are placed around them)
    buildings: list[Building] = []
    walls: list[Wall] = []
    if not empty:
        frac = float(rng.uniform(0.045, 0.13))
        buildings, walls = place_buildings(rng, size, base_angle, frac, road_polys)

    # hard negatives: yards around buildings, paved lots in roof greys, and small clutter (cars, debris,
    # bare patches) in roof and ground colours; none of them casts a building shadow
    yards, yard_cols = [], []
    for b in buildings:
        if rng.random() < 0.45:
            m = rng.uniform(4.0, 14.0)
            mu = 0.0 if b.in_row else m  # the houses of a row have gardens in front and behind
            rect = box(-b.half_len - mu, -b.half_wid - m, b.half_len + mu, b.half_wid + m)
            yards.append(affinity.translate(affinity.rotate(rect, b.angle, origin=(0, 0), use_radians=True),
                                            b.cx, b.cy))
            yard_cols.append(GROUND_COLOURS[rng.integers(len(GROUND_COLOURS))] * rng.uniform(0.85, 1.15))
    scale = size / 1024.0
    for _ in range(int(rng.poisson(2.5 * scale + 0.3))):
        lx, ly = rng.uniform(0, size, 2)
        lw, lh = rng.uniform(20, 110, 2) * max(scale, 0.25)
        rect = affinity.rotate(box(lx - lw / 2, ly - lh / 2, lx + lw / 2, ly + lh / 2),
                               base_angle + rng.normal(0, 3))
        yards.append(rect)
        yard_cols.append(ROOF_COLOURS[rng.choice([0, 1, 3, 9, 11])] * rng.uniform(0.9, 1.1))
    _paint(img, yards, yard_cols, 0.06 * tex + 0.05 * fine)
    _paint(img, road_polys, road_cols, 0.05 * tex + 0.04 * fine)  # roads cut through yards and lots
    n_clutter = int(rng.integers(150, 600) * scale * scale) + 2
    cxy = rng.uniform(0, size, (n_clutter, 2))
    cwh = rng.uniform(1.5, 5.0, (n_clutter, 2))
    cang = rng.uniform(0, 180, n_clutter)
    # rotated rectangles built as arrays: thousands of shapely affine calls would dominate the run time
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    ca, sa = np.cos(np.radians(cang)), np.sin(np.radians(cang))
    lx_ = corners[None, :, 0] * cwh[:, None, 0]
    ly_ = corners[None, :, 1] * cwh[:, None, 1]
    ring = np.stack([cxy[:, None, 0] + lx_ * ca[:, None] - ly_ * sa[:, None],
                     cxy[:, None, 1] + lx_ * sa[:, None] + ly_ * ca[:, None]], axis=-1)
    clutter = list(shapely.polygons(ring))
    palette = np.vstack([ROOF_COLOURS, GROUND_COLOURS, ROAD_COLOURS])
    clutter_cols = palette[rng.integers(len(palette), size=n_clutter)] * rng.uniform(0.8, 1.2, (n_clutter, 1))
    _paint(img, clutter, list(clutter_cols), 0.05 * fine)
    trees = _trees(rng, size, buildings)

    # shadows of trees and buildings darken the ground (the sweep of the outline along the sun direction)
    shadow_geoms: list[Any] = []
    for tx, ty, r in trees:
        d = r * 1.4 * shadow_px_per_m * GSD_M
        shadow_geoms.append(Point(tx + shadow_dir[0] * d, ty + shadow_dir[1] * d).buffer(r, 8))
    for b in buildings:
        d = b.height_m * shadow_px_per_m
        moved = affinity.translate(b.poly, shadow_dir[0] * d, shadow_dir[1] * d)
        shadow_geoms.append(moved)
        # the sweep of every wall along the sun direction (exact for L-shapes, unlike a convex hull; the
        # courtyard walls shade the courtyard)
        for ring in (b.poly.exterior.coords, *(r.coords for r in b.poly.interiors)):
            for a, c in zip(ring[:-1], ring[1:], strict=True):
                quad = Polygon([a, c, (c[0] + shadow_dir[0] * d, c[1] + shadow_dir[1] * d),
                                (a[0] + shadow_dir[0] * d, a[1] + shadow_dir[1] * d)])
                if quad.area > 1e-6:
                    shadow_geoms.append(quad)
    shadow = _burn(shadow_geoms, size).astype(bool)
    shade = rng.uniform(0.45, 0.6)
    img[shadow] *= np.array([shade, shade * 1.03, shade * 1.12], np.float32)

    # tree crowns: dark green blobs, lit on the sun side
    if trees:
        # lumpy crowns: each a main disc plus two smaller lobes
        lobes = rng.normal(0, 0.45, (len(trees), 2, 2))
        crowns = [shapely.union_all([Point(tx, ty).buffer(r, 8)]
                                    + [Point(tx + r * dx_, ty + r * dy_).buffer(0.6 * r, 6) for dx_, dy_ in lb])
                  for (tx, ty, r), lb in zip(trees, lobes, strict=True)]
        ids = _burn(crowns, size, list(range(1, len(crowns) + 1)), "int32")
        on = ids > 0
        t = np.asarray(trees, np.float32)
        k = ids[on] - 1
        col = TREE_COLOURS[rng.integers(len(TREE_COLOURS), size=len(trees))] * \
            rng.uniform(0.85, 1.15, (len(trees), 1)).astype(np.float32)
        dx = (xx[on] - t[k, 0]) / t[k, 2]
        dy = (yy[on] - t[k, 1]) / t[k, 2]
        lit = 1.0 - 0.25 * (dx * shadow_dir[0] + dy * shadow_dir[1])  # darker on the shadow side
        img[on] = col[k] * (lit * (1.0 + 0.15 * fine[on] + 0.12 * speckle[on] + 0.08 * tex[on]))[:, None]

    # roofs: per-building colour with a ridge (gable), a soft gradient (hip), a parapet (flat) or hipped
    # wings around a courtyard (ring); a row under one roof is shaded as one
    polys = [b.poly for b in buildings]
    if buildings:
        ids = _burn(polys, size, list(range(1, len(polys) + 1)), "int32")
        on = ids > 0
        k = ids[on] - 1
        col = np.stack([b.colour for b in buildings])[k]
        factor = roof_shading(buildings, k, xx[on], yy[on], shadow_dir)
        img[on] = col * (factor * (1.0 + 0.04 * fine[on] + 0.03 * tex[on]))[:, None]
        # a thin lighter/darker rim on flat roofs (parapets) and at every roof edge (eaves)
        inside = on.copy()
        edge = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1)
                          & np.roll(inside, -1, 1))
        img[edge] *= rng.uniform(0.85, 1.1)
        # some shared walls show as a thin dark gap or light parapet line between the two roofs
        drawn = [w for w in walls if w.factor != 1.0]
        if drawn:
            line_ids = rasterize(((w.line, i + 1) for i, w in enumerate(drawn)), out_shape=(size, size),
                                 fill=0, all_touched=True, dtype="int32")
            hit = (line_ids > 0) & on
            img[hit] *= np.array([w.factor for w in drawn], np.float32)[line_ids[hit] - 1][:, None]

    # sensor: a slight blur (MTF), a per-scene gain/haze, and noise
    for c in range(3):
        img[..., c] = gaussian_filter(img[..., c], sigma=float(rng.uniform(0.5, 0.9)))
    # atmosphere: muted colours, a slight tint, haze lifting the blacks
    grey = img.mean(-1, keepdims=True)
    img = grey + rng.uniform(0.55, 0.85) * (img - grey)
    gain = (rng.uniform(0.92, 1.08) * (1.0 + rng.normal(0.0, 0.02, 3))).astype(np.float32)
    haze = rng.uniform(5.0, 25.0)
    img = img * gain * (1.0 - haze / 255.0) + haze
    img += rng.normal(0.0, rng.uniform(1.5, 4.0), img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return rgb, polys, {"sun_azimuth": az, "sun_elevation": el}
