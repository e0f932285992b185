"""Synthetic post-disaster scenes: the pre-disaster scene after an event, every building graded as xView2 grades.

`grade_buildings` places the event and grades the buildings; `draw_post_scene` draws the post-disaster image
from the pre-disaster one. Both draw from the generator they are given (`synth.dataset` gives them a stream
of their own, so the pre-disaster scene is the same with or without its post-disaster one).

The event is a track (a tornado's path, a storm surge's band: a random line near one of the buildings) or a
centre (a fire, a flood, an epicentre); `Event.severity` is 1 on it and falls off as a Gaussian of the
distance, e^-1 at 10-35 % (track) or 20-50 % (centre) of the scene's side. Tornadoes and wind storms always
take a track, the other events one time in 2.5. Buildings are ranked by their severity plus noise
and the most exposed take the worst grades, so damage clusters along the event with a fuzzy edge. Each scene
draws its grade shares around no-damage 42 %, minor 21 %, major 16 %, destroyed 21 % (a Dirichlet draw, so
scenes range from untouched to ruined), then 5 % of the buildings, at random, are labelled `un-classified`
(drawn as the grade they were given: the grade is just unknown).

The post-disaster image is the pre-disaster one (the same ground, the same buildings in the same places)
with, per building, by its drawn grade:

- no-damage: the roof unchanged;
- minor-damage: 6-22 % of the roof in small scattered patches: a blue tarp, missing shingles (dark) or light
  debris, partly blended with the roof;
- major-damage: 40-70 % of the roof in one or two blobs replaced by rubble (grey-brown fragments with some
  roof material, noisy), and for most of them a little debris spilling 1-2.5 m outside the outline;
- destroyed: the whole roof replaced by rubble and bare ground (a slab or soil), the outline broken by
  debris scattered up to 2.5-7 m around it.

Around the event the ground gets debris specks, and for floods and tsunamis a muddy tint, for fires and
volcanoes a scorched one. Last comes a mild global change: an illumination and colour shift (gain, offset,
a soft gradient), sometimes a slightly softer sensor, and fresh noise, so that even undamaged roofs differ
from the pre-disaster image a little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

from ..scenes.grades import GRADES, UNCLASSIFIED
from .scenes import _burn, value_noise

# the grade shares drawn around (no-damage, minor, major, destroyed), before 5 % become un-classified
GRADE_SHARES = np.array([0.40, 0.20, 0.15, 0.20]) / 0.95
SHARE_CONCENTRATION = 10.0  # Dirichlet concentration: how much the shares vary from scene to scene
UNCLASSIFIED_P = 0.05
# rubble: broken roofing, concrete, timber and soil; bare ground left by a destroyed building: slab, soil
RUBBLE_COLOURS = np.array([[90, 80, 68], [104, 96, 86], [128, 118, 104], [140, 124, 100], [150, 140, 124],
                           [166, 156, 140]], dtype=np.float32)  # dark to light: fragments of a smooth field
BARE_COLOURS = np.array([[176, 172, 164], [134, 112, 88], [152, 142, 122], [118, 106, 92]], dtype=np.float32)
TARP = np.array([62, 104, 168], dtype=np.float32)
GROUND_TINTS = {"flooding": np.array([118, 102, 78], np.float32), "tsunami": np.array([118, 102, 78], np.float32),
                "fire": np.array([58, 56, 54], np.float32), "volcano": np.array([70, 66, 62], np.float32)}


@dataclass
class Event:
    """Where the disaster struck a scene: a track (a line) or a centre, and how wide its damage reaches."""

    kind: str  # "track" or "centre"
    x: float  # a point of the track, or the centre (pixels)
    y: float
    angle: float  # the track's direction (radians); unused for a centre
    width: float  # pixels: severity exp(-(d / width)^2) at distance d

    def severity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """1 on the track or centre, falling off with distance."""
        dx, dy = x - self.x, y - self.y
        if self.kind == "track":
            d = np.abs(-dx * math.sin(self.angle) + dy * math.cos(self.angle))
        else:
            d = np.hypot(dx, dy)
        return np.exp(-((d / self.width) ** 2))


def place_event(rng: np.random.Generator, size: int, polys: list[Polygon], disaster_type: str) -> Event:
    """A track (most storms, all tornadoes) or a centre, through one of the buildings when there are some."""
    if polys:
        c = polys[int(rng.integers(len(polys)))].centroid
        x, y = c.x + rng.normal(0, 0.05 * size), c.y + rng.normal(0, 0.05 * size)
    else:
        x, y = rng.uniform(0.2, 0.8, 2) * size
    track = disaster_type in ("tornado", "wind") or rng.random() < 0.4
    angle = float(rng.uniform(0, math.pi))
    width = float(rng.uniform(0.10, 0.35) if track else rng.uniform(0.2, 0.5)) * size
    return Event("track" if track else "centre", float(x), float(y), angle, width)


def grade_buildings(rng: np.random.Generator, polys: list[Polygon], event: Event) -> tuple[list[str], list[str]]:
    """(label grade, drawn grade) of every building: the most exposed to `event` the most damaged; 5 % are
    labelled `un-classified` but drawn as the grade they were given."""
    n = len(polys)
    if n == 0:
        return [], []
    cen = shapely.get_coordinates(shapely.centroid(np.asarray(polys, dtype=object)))
    score = event.severity(cen[:, 0], cen[:, 1]) + rng.normal(0.0, 0.15, n)
    shares = rng.dirichlet(SHARE_CONCENTRATION * GRADE_SHARES)
    # the most exposed first: destroyed, then major, minor, and the rest no-damage
    order = np.argsort(-score, kind="stable")
    bounds = np.rint(np.cumsum(shares[::-1]) * n).astype(int)
    drawn_idx = np.zeros(n, dtype=int)
    start = 0
    for g, stop in zip((3, 2, 1, 0), bounds, strict=True):
        drawn_idx[order[start:stop]] = g
        start = stop
    drawn = [GRADES[g] for g in drawn_idx]
    unknown = rng.random(n) < UNCLASSIFIED_P
    label = [UNCLASSIFIED if u else d for u, d in zip(unknown, drawn, strict=True)]
    return label, drawn


def _rank_in_building(k: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Each pixel's rank of `values` among its building's pixels (building index `k`), as a fraction in (0, 1)."""
    order = np.lexsort((values, k))
    counts = np.bincount(k, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(k), dtype=np.float64)
    rank[order] = np.arange(len(k)) - starts[k[order]]
    return (rank + 0.5) / counts[k]


def draw_post_scene(rng: np.random.Generator, rgb: np.ndarray, polys: list[Polygon], drawn: list[str],
                    event: Event, disaster_type: str) -> np.ndarray:
    """The post-disaster image (uint8, like `rgb`) of the pre-disaster scene `rgb` whose buildings `polys`
    took the damage `drawn` (one of GRADES each) from `event`."""
    size = rgb.shape[0]
    img = rgb.astype(np.float32)
    n = len(polys)
    ids = _burn(polys, size, list(range(1, n + 1)), "int32")
    on = ids > 0
    fine = value_noise(rng, size, 1.5)  # debris specks
    chunk = value_noise(rng, size, 2.5)  # fragments of rubble; a minor damage's small patches
    blob = value_noise(rng, size, 7.0) + 0.5 * value_noise(rng, size, 3.5)  # where a roof breaks

    # the ground around the event: mud or ash, and debris specks
    yy, xx = np.ogrid[0:size, 0:size]
    sev = event.severity(xx.astype(np.float32) + 0.5, yy.astype(np.float32) + 0.5)
    ground = ~on
    tint = GROUND_TINTS.get(disaster_type)
    if tint is not None:
        low = value_noise(rng, size, max(size / 6.0, 4.0))
        a = np.float32(rng.uniform(0.25, 0.5)) * sev * (0.6 + 0.4 * low) * ground
        img += a[..., None] * (tint - img)
    specks = ground & (fine > 1.0 - 0.3 * sev)
    if specks.any():
        m = int(specks.sum())
        col = RUBBLE_COLOURS[rng.integers(len(RUBBLE_COLOURS), size=m)] * rng.uniform(0.8, 1.2, (m, 1))
        img[specks] = 0.3 * img[specks] + 0.7 * col

    if n:
        g = np.array([GRADES.index(d) for d in drawn])
        k = ids[on] - 1
        gk = g[k]
        # the damaged share of each roof, in patches: small scattered ones (minor) or large blobs
        frac = np.select([g == 1, g == 2, g == 3], [rng.uniform(0.06, 0.22, n), rng.uniform(0.4, 0.7, n),
                                                   np.ones(n)], 0.0)
        field = np.where(gk == 1, chunk[on], blob[on])
        hit = _rank_in_building(k, field, n) > 1.0 - frac[k]
        roof = img[on]
        # rubble: fragments of the rubble colours mixed with the roof's own material, noisy
        frag = np.clip(((chunk[on] + 1.0) * 0.5 * len(RUBBLE_COLOURS)).astype(int), 0, len(RUBBLE_COLOURS) - 1)
        mix = rng.uniform(0.5, 0.85, n)[k][:, None]
        rubble = (mix * RUBBLE_COLOURS[frag] + (1.0 - mix) * roof) * \
            (1.0 + 0.08 * fine[on] + 0.1 * rng.standard_normal(len(k)).astype(np.float32))[:, None]
        new = roof.copy()
        # minor: one style per building: a tarp, missing shingles, light debris
        style = rng.integers(0, 3, n)[k]
        alpha = rng.uniform(0.55, 0.9, n)[k][:, None]
        minor = np.select([style[:, None] == 0, style[:, None] == 1],
                          [np.broadcast_to(TARP, roof.shape), roof * 0.55 + 8.0],
                          np.broadcast_to(RUBBLE_COLOURS[5], roof.shape))
        sel = hit & (gk == 1)
        new[sel] = roof[sel] * (1.0 - alpha[sel]) + minor[sel] * alpha[sel]
        sel = hit & (gk == 2)
        new[sel] = rubble[sel]
        # destroyed: rubble, and bare ground (slab or soil) where the roof and walls are gone
        sel = gk == 3
        if sel.any():
            bare_col = (BARE_COLOURS[rng.integers(len(BARE_COLOURS), size=n)] * rng.uniform(0.9, 1.1, (n, 1)))[k]
            bare = (blob[on] > rng.uniform(-0.2, 0.6, n)[k]) & sel
            new[sel] = rubble[sel]
            new[bare] = bare_col[bare] * (1.0 + 0.06 * fine[on][bare])[:, None]
        img[on] = new

        # debris spilling out of the outline: a little around most major damage, much around the destroyed
        spill = np.flatnonzero((g == 3) | ((g == 2) & (rng.random(n) < 0.7)))
        if len(spill):
            reach = np.where(g[spill] == 3, rng.uniform(5.0, 14.0, len(spill)), rng.uniform(2.0, 5.0, len(spill)))
            geoms = np.asarray([polys[i] for i in spill], dtype=object)
            outer = list(shapely.buffer(geoms, reach, quad_segs=4))
            inner = list(shapely.buffer(geoms, reach * 0.4, quad_segs=4))
            dens_out = np.where(g[spill] == 3, 0.3, 0.12)
            dens_in = np.where(g[spill] == 3, 0.6, 0.3)
            ring_out = _burn(outer, size, list(range(1, len(spill) + 1)), "int32")
            ring_in = _burn(inner, size, list(range(1, len(spill) + 1)), "int32")
            density = np.zeros((size, size), np.float32)
            o = ring_out > 0
            density[o] = dens_out[ring_out[o] - 1]
            i_ = ring_in > 0
            density[i_] = dens_in[ring_in[i_] - 1]
            near = np.flatnonzero((ground & (density > 0)).ravel())
            debris = near[rng.random(len(near)) < density.ravel()[near]]
            if len(debris):
                m = len(debris)
                col = RUBBLE_COLOURS[rng.integers(len(RUBBLE_COLOURS), size=m)] * rng.uniform(0.75, 1.15, (m, 1))
                flat = img.reshape(-1, 3)
                flat[debris] = 0.25 * flat[debris] + 0.75 * col

    # a mild global change: another day's light and atmosphere, maybe a softer sensor, fresh noise
    if rng.random() < 0.5:
        # a 3-tap blur along rows and columns (a Gaussian of about 0.4-0.6 px, cheaper than one)
        w = np.float32(rng.uniform(0.08, 0.18))
        for axis in (0, 1):
            soft = img * (1 - 2 * w)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            soft[tuple(hi)] += w * img[tuple(lo)]
            soft[tuple(lo)] += w * img[tuple(hi)]
            first, last = [slice(None)] * 3, [slice(None)] * 3
            first[axis], last[axis] = slice(0, 1), slice(-1, None)
            soft[tuple(first)] += w * img[tuple(first)]  # edge pixels: their missing neighbour is themselves
            soft[tuple(last)] += w * img[tuple(last)]
            img = soft
    gain = (rng.uniform(0.88, 1.12) * (1.0 + rng.normal(0.0, 0.03, 3))).astype(np.float32)
    light = 1.0 + 0.05 * value_noise(rng, size, max(size / 2.0, 4.0))
    img = img * gain * light[..., None] + rng.normal(0.0, 4.0, 3).astype(np.float32)
    # sensor noise: uniform (cheaper to draw than Gaussian) of standard deviation 1.5-3 levels
    sd = np.float32(rng.uniform(1.5, 3.0) * math.sqrt(12.0))
    img += sd * (rng.random(img.shape, dtype=np.float32) - np.float32(0.5))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
