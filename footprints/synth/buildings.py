"""Buildings of the synthetic scenes: their footprints, where they stand, and how their roofs are shaded.

Every building is one instance polygon in pixel coordinates (x = column, y = row), as xView2 ships its
labels. `place_buildings` draws groups, each from the scene's own generator (so the same seed gives the
same scene), until the scene has its share of building pixels. Each scene first draws how built up it is:
detached buildings are 40-95 % of the groups it draws (a town centre to a suburb), the rest split about
evenly among semis, terraces and near-touching neighbours (scenes under 90 px draw detached ones only):

- detached buildings: rotated rectangles, L-shapes (the rectangle minus a corner block) and, for about one
  in seven (scenes of 120 px or more), courtyard buildings (a rectangle with a rectangular hole of open
  ground, 16-40 m across, wings 5-9 m: one instance with an interior ring, roofed flat or as a hipped
  ring); one cut by the image edge keeps its part inside (half of it at least);
- semi-detached pairs: two houses of about the same width (6-10 m) sharing one wall;
- terraces: rows of 3-6 houses 4-9 m wide sharing their side walls; about one joint in seven is instead a
  0.5-1.5 m passage, and some houses have a rear extension (an L-shaped house);
- near-touching neighbours: two or three houses 0.5-1.5 m apart, one pair of them sometimes a semi.

Groups keep 1-4 m from each other and 1.5 m from roads. A group whose houses leave the image keeps only the
houses wholly inside it. The houses of a group are laid out in one local frame (u along the row, v across
it, in pixels) and mapped to the image by one affine map; each house's ring carries its neighbour's wall
end points as vertices, so two neighbours share the wall segment vertex for vertex: their intersection has
zero area and their union no gap, and rasterising them (pixel centres inside) gives no pixel to both and
leaves none out.

Neighbours look alike or not, as in real rows: 45 % of semis and terraces have one roof over the whole row
(one colour, one ridge, hip or flat roof across every house: the walls between them show only if drawn),
the rest vary house by house (the same colour a quarter of the time, a slightly different one, now and
then another colour; a ridge turned across the row for some houses; staggered fronts and depths). A third
of the shared walls are drawn as a thin dark line (a gap between roofs) or light line (a parapet) on the
roofs; the rest show only where the roofs on either side differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, Polygon, box

GSD_M = 0.5  # metres per pixel of every synthetic scene
PX = 1.0 / GSD_M  # pixels per metre
MAX_BUILDING_FRACTION = 0.145
ROOF_KINDS = ("gable", "hip", "flat", "ring")
GROUP_KINDS = ("single", "semi", "terrace", "near")
ROW_P = np.array([0.33, 0.34, 0.33])  # semi, terrace, near: how the non-detached groups divide

# Roof colours: greys and browns like the ground, terracotta, white, dark shingle, blue-grey metal.
ROOF_COLOURS = np.array(
    [[150, 146, 140], [120, 118, 114], [136, 114, 90], [170, 160, 136], [92, 86, 78], [160, 96, 72],
     [206, 204, 198], [112, 124, 134], [96, 104, 80], [182, 170, 150], [70, 68, 66], [140, 130, 110]],
    dtype=np.float32,
)


@dataclass
class Building:
    poly: Polygon  # pixel coordinates, inside the image
    cx: float  # the building's own oriented box: centre, direction of its u axis (radians), half sizes
    cy: float
    angle: float
    half_len: float
    half_wid: float
    colour: np.ndarray
    roof: str  # one of ROOF_KINDS
    height_m: float
    shade: tuple[float, float, float, float, float] | None = None  # roof frame (cx, cy, angle, hl, hw)
    court: tuple[float, float, float, float] | None = None  # courtyard (u0, u1, v0, v1) in the roof frame
    in_row: bool = False  # one house of a row: its yard runs only to the front and back

    def frame(self) -> tuple[float, float, float, float, float]:
        """The frame its roof is shaded in: the whole row's for one roof over a row, else its own box."""
        return self.shade or (self.cx, self.cy, self.angle, self.half_len, self.half_wid)


@dataclass
class Wall:
    line: LineString  # the shared wall, pixel coordinates, its end points vertices of both polygons
    factor: float  # multiplies the roof pixels the line touches; 1.0 draws nothing
    pair: tuple[int, int]  # indices of the two buildings


def _roof_colour(rng: np.random.Generator) -> np.ndarray:
    return (ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))] * rng.uniform(0.85, 1.12) + rng.normal(0, 6, 3)
            ).astype(np.float32)


def _roof_kind(rng: np.random.Generator) -> str:
    return ("gable", "hip", "flat")[int(rng.choice(3, p=[0.45, 0.2, 0.35]))]


# ------------------------------------------------------------------------------------------- detached
def _courtyard(rng: np.random.Generator, max_side: float) -> tuple[Polygon, float, float, tuple] | None:
    """A rectangle with a rectangular hole (local frame, centred); None when it does not fit max_side."""
    length = rng.uniform(32.0, max(max_side, 32.0))  # 16-40 m
    width = float(np.clip(length * rng.uniform(0.65, 1.0), 32.0, max_side))
    length = min(length, max_side)
    wing = rng.uniform(10.0, 18.0)  # 5-9 m
    hl, hw = length / 2.0, width / 2.0
    shift = rng.uniform(-0.2, 0.2) * wing
    u0, u1, v0, v1 = -hl + wing + shift, hl - wing + shift, -hw + wing, hw - wing
    if u1 - u0 < 8.0 or v1 - v0 < 8.0:  # the courtyard must be at least 4 m across
        return None
    outer = box(-hl, -hw, hl, hw)
    hole = box(u0, v0, u1, v1)
    return Polygon(outer.exterior.coords, [hole.exterior.coords]), hl, hw, (u0, u1, v0, v1)


def _detached(rng: np.random.Generator, cx: float, cy: float, angle_deg: float, max_side: float
              ) -> tuple[Polygon, float, float, tuple | None]:
    """A rotated rectangle, L-shape or courtyard building near (cx, cy): (polygon, hl, hw, courtyard)."""
    court = None
    shape = None
    if max_side >= 40.0 and rng.random() < 0.15:
        made = _courtyard(rng, max_side)
        if made is not None:
            shape, hl, hw, court = made
    if shape is None:
        lo = min(12.0, max_side * 0.5)  # 6 m at 0.5 m/px, smaller only in tiny test scenes
        length = float(np.clip(lo * np.exp(rng.uniform(0.0, math.log(max(max_side / lo, 1.0001)))), lo,
                               max_side))
        width = float(np.clip(length * rng.uniform(0.45, 1.0), lo, max_side))
        hl, hw = length / 2.0, width / 2.0
        shape = box(-hl, -hw, hl, hw)
        if rng.random() < 0.3 and width > 14:
            # L-shape: the rectangle minus one corner block
            cut_l = rng.uniform(0.35, 0.6) * length
            cut_w = rng.uniform(0.35, 0.6) * width
            sx, sy = (1 if rng.random() < 0.5 else -1), (1 if rng.random() < 0.5 else -1)
            corner = box(min(sx * hl, sx * (hl - cut_l)), min(sy * hw, sy * (hw - cut_w)),
                         max(sx * hl, sx * (hl - cut_l)), max(sy * hw, sy * (hw - cut_w)))
            cut = shape.difference(corner)
            if isinstance(cut, Polygon):
                shape = shapely.Polygon(cut.exterior.coords)
    shape = affinity.rotate(shape, angle_deg, origin=(0, 0))
    return affinity.translate(shape, cx, cy), hl, hw, court


# ----------------------------------------------------------------------------------------------- rows
@dataclass
class _House:
    a: float  # u extent
    b: float
    lo: float  # v extent (front at lo)
    hi: float
    ext: tuple[float, float, float] | None = None  # rear extension: u0, u1, depth


def _row_houses(rng: np.random.Generator, kind: str, max_len: float) -> tuple[list[_House], list[float], bool]:
    """Houses of a semi, terrace or near-touching group along u (centred on 0), the gaps, one roof or not."""
    if kind == "semi":
        widths = rng.uniform(6.0, 10.0) * PX * rng.uniform(0.97, 1.03, 2)
        gaps = [0.0]
    elif kind == "terrace":
        n = int(rng.integers(3, 7))
        widths = rng.uniform(4.5, 7.5) * PX * rng.uniform(0.85, 1.2, n)
        gaps = [float(rng.uniform(0.5, 1.5) * PX) if rng.random() < 0.15 else 0.0 for _ in range(n - 1)]
    else:  # near-touching neighbours, sometimes a semi beside a detached house
        n = 3 if rng.random() < 0.5 else 2
        widths = rng.uniform(7.0, 12.0, n) * PX
        gaps = [float(rng.uniform(0.5, 1.5) * PX)] + ([0.0] if n == 3 else [])
        if n == 3 and rng.random() < 0.5:
            gaps = gaps[::-1]
    depth = rng.uniform(8.0, 13.0) * PX
    one_roof = kind != "near" and rng.random() < 0.45
    n = len(widths)
    while n > 1 and float(widths[:n].sum()) + sum(gaps[: n - 1]) > max_len:
        n -= 1
    widths, gaps = widths[:n], gaps[: n - 1]
    if one_roof:
        depths, offsets = np.full(n, depth), np.zeros(n)
    elif kind == "near":
        depths, offsets = depth * rng.uniform(0.8, 1.2, n), rng.uniform(-1.5, 1.5, n) * PX
    else:
        depths, offsets = depth * rng.uniform(0.92, 1.08, n), np.clip(rng.normal(0, 0.4, n), -1, 1) * PX
    total = float(widths.sum()) + sum(gaps)
    houses: list[_House] = []
    a = -total / 2.0
    for k in range(n):
        b = a + float(widths[k])
        h = _House(a, b, float(offsets[k] - depths[k] / 2), float(offsets[k] + depths[k] / 2))
        w = b - a
        if not one_roof and kind != "near" and w >= 10.0 and rng.random() < 0.3:
            ew = w * rng.uniform(0.35, 0.55)
            margin = rng.uniform(0.5, 1.5) * PX
            e0 = a + margin if rng.random() < 0.5 else b - margin - ew
            h.ext = (e0, e0 + ew, rng.uniform(2.5, 5.0) * PX)
        houses.append(h)
        a = b + (gaps[k] if k < n - 1 else 0.0)
    return houses, gaps, one_roof


def _ring(houses: list[_House], gaps: list[float], k: int) -> list[tuple[float, float]]:
    """House k's outline in the row frame, with its neighbours' wall ends on the walls it shares."""
    h = houses[k]
    pts = [(h.a, h.lo), (h.b, h.lo)]
    if k + 1 < len(houses) and gaps[k] == 0.0:
        nb = houses[k + 1]
        pts += [(h.b, v) for v in sorted({nb.lo, nb.hi}) if h.lo < v < h.hi]
    pts.append((h.b, h.hi))
    if h.ext is not None:
        e0, e1, ed = h.ext
        pts += [(e1, h.hi), (e1, h.hi + ed), (e0, h.hi + ed), (e0, h.hi)]
    pts.append((h.a, h.hi))
    if k > 0 and gaps[k - 1] == 0.0:
        nb = houses[k - 1]
        pts += [(h.a, v) for v in sorted({nb.lo, nb.hi}, reverse=True) if h.lo < v < h.hi]
    return pts


def _row_group(rng: np.random.Generator, kind: str, cx: float, cy: float, angle: float, max_len: float
               ) -> tuple[list[Building], list[tuple[LineString, int, int]]]:
    """The buildings of one row group centred at (cx, cy), u axis at `angle` (radians), and its shared walls."""
    houses, gaps, one_roof = _row_houses(rng, kind, max_len)
    n = len(houses)
    rings = [_ring(houses, gaps, k) for k in range(n)]
    walls_local = [(k, (houses[k].b, max(houses[k].lo, houses[k + 1].lo)),
                    (houses[k].b, min(houses[k].hi, houses[k + 1].hi))) for k in range(n - 1) if gaps[k] == 0.0]
    centres = [((h.a + h.b) / 2.0, (h.lo + h.hi) / 2.0) for h in houses]
    pts = np.array([p for r in rings for p in r] + [p for _, p0, p1 in walls_local for p in (p0, p1)]
                   + centres + [(0.0, 0.0)], dtype=np.float64)
    # one affine map for every vertex of the group: equal local coordinates give equal pixel coordinates
    c, s = math.cos(angle), math.sin(angle)
    x = cx + pts[:, 0] * c - pts[:, 1] * s
    y = cy + pts[:, 0] * s + pts[:, 1] * c
    world = np.column_stack([x, y])
    starts = np.cumsum([0] + [len(r) for r in rings])
    polys = [shapely.normalize(Polygon(world[starts[k]:starts[k + 1]])) for k in range(n)]
    j = int(starts[-1])
    walls = [(LineString(world[j + 2 * i : j + 2 * i + 2]), k, k + 1) for i, (k, _, _) in enumerate(walls_local)]
    cen = world[j + 2 * len(walls_local):]
    length = houses[-1].b - houses[0].a

    base = _roof_colour(rng)
    roof = _roof_kind(rng) if not one_roof else ("gable", "hip", "flat")[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    height = rng.uniform(5.0, 9.0)
    across = rng.random() < 0.3  # the ridges of this row run across it, not along it
    out = []
    for k, h in enumerate(houses):
        w, d = h.b - h.a, h.hi - h.lo
        colour, kind_k, hgt, shade = base, roof, height, None
        if one_roof:
            shade = (float(cen[-1, 0]), float(cen[-1, 1]), angle, length / 2.0, (h.hi - h.lo) / 2.0)
        else:
            r = rng.random()
            if kind == "near" or r > 0.85:
                colour = _roof_colour(rng)  # another roof altogether
            elif r > 0.25:
                colour = (base * rng.uniform(0.93, 1.07) + rng.normal(0, 3, 3)).astype(np.float32)
            if kind == "near" or rng.random() < 0.1:
                kind_k = _roof_kind(rng)
            hgt = rng.uniform(2.5, 7.0) if kind == "near" else height + rng.uniform(-0.5, 0.5)
            if across != (rng.random() < 0.15):
                shade = (float(cen[k, 0]), float(cen[k, 1]), angle + math.pi / 2, d / 2.0, w / 2.0)
        out.append(Building(polys[k], float(cen[k, 0]), float(cen[k, 1]), angle, w / 2.0, d / 2.0, colour,
                            kind_k, float(hgt), shade=shade, in_row=True))
    return out, walls


# ------------------------------------------------------------------------------------------ placement
def place_buildings(rng: np.random.Generator, size: int, base_angle: float, target_frac: float,
                    obstacles: list[Polygon]) -> tuple[list[Building], list[Wall]]:
    """Groups of buildings away from roads and from each other, until about target_frac of the pixels.

    Buildings never overlap; those of one group may share walls (returned as `Wall`s) or stand 0.5-1.5 m
    apart. Building pixels stay at or under MAX_BUILDING_FRACTION of the scene.
    """
    target_area = target_frac * size * size
    max_side = min(80.0, size / 3.0)  # 40 m
    max_len = min(0.7 * size, 90.0 * PX)
    frame = box(0, 0, size, size)
    placed: list[Building] = []
    walls: list[Wall] = []
    keepout: list[Polygon] = []  # footprints: no other group may come within its gap of them
    obstacle_union = shapely.union_all(obstacles) if obstacles else None
    if obstacle_union is not None:
        shapely.prepare(obstacle_union)
    area = 0.0
    attempts = 0
    # cluster buildings around a few centres so scenes have neighbourhoods and open land
    n_centres = int(rng.integers(1, 5))
    centres = rng.uniform(0, size, (n_centres, 2))
    spread = rng.uniform(0.15, 0.45, n_centres) * size
    # how built-up the scene is: from mostly detached houses (a suburb) to mostly rows (a town centre)
    rows = rng.uniform(0.05, 0.6) if max_side >= 30.0 else 0.0  # tiny test scenes: detached only
    group_p = np.concatenate([[1.0 - rows], rows * ROW_P])
    while area < target_area and attempts < 4000:
        attempts += 1
        k = int(rng.integers(n_centres))
        cx, cy = centres[k] + rng.normal(0, spread[k], 2)
        if not (0 <= cx < size and 0 <= cy < size):
            continue
        angle = base_angle + (90.0 if rng.random() < 0.3 else 0.0) + rng.normal(0, 5.0)
        if rng.random() < 0.2:
            angle = rng.uniform(0, 180)
        kind = GROUP_KINDS[int(rng.choice(len(GROUP_KINDS), p=group_p))]
        gap = rng.uniform(2.0, 8.0)
        if kind == "single":
            shape, hl, hw, court = _detached(rng, float(cx), float(cy), float(angle), max_side)
            group = [shape]
        else:
            members, shared = _row_group(rng, kind, float(cx), float(cy), math.radians(angle), max_len)
            group = [b.poly for b in members]
        union = group[0] if len(group) == 1 else shapely.union_all(group)
        zone = union.buffer(gap, join_style="mitre")
        if keepout and shapely.intersects(zone, np.asarray(keepout, dtype=object)).any():
            continue
        if obstacle_union is not None and obstacle_union.intersects(union.buffer(3.0)):
            continue
        if kind == "single":
            clipped = shape.intersection(frame) if not frame.contains(shape) else shape
            if not isinstance(clipped, Polygon) or clipped.area < 0.5 * shape.area:
                continue
            roof = "flat" if court is not None and rng.random() < 0.45 else \
                "ring" if court is not None else _roof_kind(rng)
            members = [Building(shapely.normalize(clipped), float(cx), float(cy), math.radians(angle), hl, hw,
                                _roof_colour(rng), roof, float(rng.uniform(2.5, 7.0)), court=court)]
            shared = []
        else:
            inside = [frame.contains(b.poly) for b in members]
            if not any(inside):
                continue
            index = {k: i for i, k in enumerate(np.flatnonzero(inside))}
            members = [b for b, ok in zip(members, inside, strict=True) if ok]
            shared = [(line, index[i], index[j]) for line, i, j in shared if i in index and j in index]
        new_area = sum(b.poly.area for b in members)
        if area + new_area > MAX_BUILDING_FRACTION * size * size:
            continue  # keep every scene's building pixels at or under 15 %
        n0 = len(placed)
        for line, i, j in shared:
            visible = rng.random() < 0.35
            factor = (rng.uniform(0.7, 0.88) if rng.random() < 0.7 else rng.uniform(1.08, 1.2)) if visible else 1.0
            walls.append(Wall(line, float(factor), (n0 + i, n0 + j)))
        placed.extend(members)
        keepout.extend(b.poly for b in members)
        area += new_area
    return placed, walls


# ----------------------------------------------------------------------------------------------- roofs
def roof_shading(buildings: list[Building], k: np.ndarray, x: np.ndarray, y: np.ndarray,
                 shadow_dir: np.ndarray) -> np.ndarray:
    """Brightness factor of roof pixels at pixel centres (x, y) of buildings `k`: a ridge (gable), a soft
    gradient (hip), a slight gradient (flat) or four hipped wings around a courtyard (ring)."""
    frames = np.array([b.frame() for b in buildings], np.float32)[k]
    cx, cy, ang, hl, hw = frames.T
    roof = np.array([ROOF_KINDS.index(b.roof) for b in buildings])[k]
    u = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
    v = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
    # which roof half faces the sun: its normal (perpendicular to the ridge) dotted with the sun side
    normal_sun = -(-np.sin(ang) * shadow_dir[0] + np.cos(ang) * shadow_dir[1])
    along_sun = -(np.cos(ang) * shadow_dir[0] + np.sin(ang) * shadow_dir[1])
    side = np.sign(v) * np.sign(normal_sun + 1e-6)
    gable = 1.0 + 0.12 * side + 0.06 * (np.abs(v) / hw) * side
    gable = np.where(np.abs(v) < 1.0, 1.12, gable)  # ridge line
    hip = 1.0 + 0.10 * np.clip(v / hw, -1, 1) * np.sign(normal_sun + 1e-6) + 0.05 * np.clip(u / hl, -1, 1)
    flat = 1.0 + 0.04 * np.clip(u / hl, -1, 1)
    ring = np.ones_like(u)
    is_ring = roof == 3
    if is_ring.any():
        # each pixel lies on the roof face of its nearest eave (outer wall) or courtyard wall
        court = np.array([b.court or (0.0, 0.0, 0.0, 0.0) for b in buildings], np.float32)[k[is_ring]]
        ur, vr, hlr, hwr = u[is_ring], v[is_ring], hl[is_ring], hw[is_ring]
        u0, u1, v0, v1 = court.T
        in_v, in_u = (vr >= v0) & (vr <= v1), (ur >= u0) & (ur <= u1)
        inf = np.float32(np.inf)
        dist = np.stack([ur + hlr, hlr - ur, vr + hwr, hwr - vr,
                         np.where(in_v & (ur <= u0), u0 - ur, inf), np.where(in_v & (ur >= u1), ur - u1, inf),
                         np.where(in_u & (vr <= v0), v0 - vr, inf), np.where(in_u & (vr >= v1), vr - v1, inf)])
        facing = np.array([-1, 1, -1, 1, 1, -1, 1, -1], np.float32)  # downslope along u (0-1, 4-5) or v
        face = dist.argmin(0)
        sun = np.where(np.isin(face, (0, 1, 4, 5)), along_sun[is_ring], normal_sun[is_ring])
        ring[is_ring] = 1.0 + 0.11 * facing[face] * np.sign(sun + 1e-6)
    return np.select([roof == 0, roof == 1, roof == 2], [gable, hip, flat], ring)
