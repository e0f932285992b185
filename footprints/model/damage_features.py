"""Per-building zoom-out features of a pre/post-disaster pair: hypercolumns pooled over a building's pixels.

The damage classifier sees one vector per building, plus log(area): hypercolumns (`gather_hypercolumns`, the
features stage's reader) pooled over the building's pixels, in the parts `damage.inputs` names
(`DAMAGE_PARTS`): the mean post-disaster and pre-disaster hypercolumns, their difference, the mean of each
pixel's absolute change |post - pre| (a roof half darker and half brighter changes a lot and its mean not at
all), and the change of each channel's spread (std post - std pre: rubble is rougher than a roof). A per-pixel
classifier (`damage.classify: pixel`) sees each pixel's own parts instead (`pixel_rows`, `PIXEL_PARTS`) and
grades a building by its pixels' mean probability, voted as the blocks are read (`pixel_classifier`).

A scene is run through the backbone a block at a time (`block` rows and columns, with a halo of context
around it, so the activations near a block's edge see what lies beyond it); in each block at most
`per_building` pixels of every building (a seeded sample, `sample_pixels`' rule: all of them when it has
fewer) are read, and a building cut by blocks gets the pixel-weighted moments of its parts.
Memory is bounded by the block, never by the scene.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import shapely
import torch
from affine import Affine
from rasterio import features as rio_features
from rasterio.windows import Window
from shapely.geometry import box

from ..config.schema import damage_input_parts as input_parts
from .backbone import VGG16Features, hypercolumn_channels
from .hypercolumns import gather_hypercolumns

HALO_PX = 96  # context around a block: most of conv5_3's receptive field that matters
POOLED = ("pre", "post", "absdiff", "pre_std", "post_std")  # what `pooled_hypercolumns` returns per building

Read = Callable[[Window], tuple[np.ndarray, np.ndarray]]  # window -> (RGB uint8 (3, h, w), valid (h, w))
# (pre, post) hypercolumns (m, C) of m pixels and their buildings' outline areas (m,) -> probabilities (m, k)
PixelClassifier = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def feature_width(layers: Sequence[str], inputs: str, context: bool = False) -> int:
    """Channels of one building's vector: one hypercolumn per part (each of the ring around it too, with
    `context`), plus log(area)."""
    return hypercolumn_channels(layers) * len(input_parts(inputs)) * (2 if context else 1) + 1


def _part(pooled: dict[str, np.ndarray], prefix: str, name: str) -> np.ndarray:
    if name == "diff":
        return pooled[prefix + "post"] - pooled[prefix + "pre"]
    if name == "stddiff":
        return pooled[prefix + "post_std"] - pooled[prefix + "pre_std"]
    return pooled[prefix + name]


def pixel_rows(pre: np.ndarray, post: np.ndarray, area_m2: np.ndarray, inputs: str) -> np.ndarray:
    """The per-pixel classifier's input (`damage.classify: pixel`): each sampled pixel's parts of `inputs`
    (post, pre, diff = post - pre, absdiff = |post - pre|; `PIXEL_PARTS`) from its hypercolumns before and
    after, plus log(area) of its building (`area_m2`, one per pixel). In float16, the precision the feature
    files keep the pixels in, written part by part into one array: the training rows of many scenes are held
    in memory, and the MLP standardises them in float32."""
    names = input_parts(inputs)
    pre, post = np.asarray(pre), np.asarray(post)
    channels = pre.shape[1]
    rows = np.empty((len(pre), channels * len(names) + 1), np.float16)
    for i, name in enumerate(names):
        part = rows[:, i * channels : (i + 1) * channels]
        if name in ("pre", "post"):
            part[:] = pre if name == "pre" else post
        else:  # diff, absdiff: the difference taken in the inputs' precision, then stored
            np.subtract(post, pre, out=part)
            if name == "absdiff":
                np.abs(part, out=part)
    rows[:, -1] = np.log1p(np.asarray(area_m2, np.float64))
    return rows


def combine(pooled: dict[str, np.ndarray], inputs: str) -> np.ndarray:
    """The classifier's input (n, feature_width) from `pooled_hypercolumns`' pooled hypercolumns (and the
    ring's, `ring_<key>`, when pooled) and the buildings' areas."""
    chosen = []
    for prefix in ("", "ring_") if "ring_pre" in pooled else ("",):
        chosen += [_part(pooled, prefix, name) for name in input_parts(inputs)]
    area = np.log1p(np.asarray(pooled["area_m2"], np.float64))[:, None]
    return np.concatenate([*chosen, area], axis=1).astype(np.float32)


def rings(polygons: Sequence[Any], width_px: float) -> list[Any]:
    """The ring `width_px` wide around each polygon (its buffer less itself)."""
    shapes = np.asarray(list(polygons), dtype=object)
    if not len(shapes):
        return []
    return list(shapely.difference(shapely.buffer(shapes, width_px, join_style="mitre"), shapes))


def colour_statistics(pooled: dict[str, np.ndarray]) -> np.ndarray:
    """The colour baseline's input (n, 25): per building the mean and std of R, G, B and the gradient
    magnitude, pre and post (8 each), their differences (post - pre, all 8: a roof torn open changes its
    texture, the std, as much as its colour), log(1 + area)."""
    area = np.log1p(np.asarray(pooled["area_m2"], np.float64))[:, None]
    pre, post = pooled["colour_pre"], pooled["colour_post"]
    return np.concatenate([pre, post, post - pre, area], axis=1).astype(np.float32)


def blocks(width: int, height: int, block: int) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the scene's blocks, row by row."""
    return [(r, min(r + block, height), c, min(c + block, width))
            for r in range(0, height, block) for c in range(0, width, block)]


def pooled_hypercolumns(
    backbone: VGG16Features, layers: Sequence[str], read_pre: Read, read_post: Read,
    polygon_sets: Sequence[Sequence[Any]], width: int, height: int, per_building: int, seed: int, block: int = 1024,
    device: str | torch.device = "cpu", gsd_m: float | None = None, keep_pixels: int = 0,
    pixel_classifier: PixelClassifier | None = None,
) -> list[dict[str, np.ndarray]]:
    """For each set of n polygons (on the scene's pixel grid; several sets share one backbone pass, e.g. the
    predicted footprints and the truth buildings): `pre`, `post` (n, C) each building's mean hypercolumn before
    and after, `absdiff` the mean of its pixels' |post - pre|, `pre_std`, `post_std` each channel's std over
    its pixels; `pixels` (n,) how many of its pixels are valid in both scenes (0: outside the scene or in
    nodata; its rows are zeros); `area_m2` (n,) those pixels' area; `outline_m2` (n,) the polygon's own area
    (known before any pixel is read: the per-pixel classifier's); `colour_pre`, `colour_post` (n, 8) the mean
    and std of R, G, B and the gradient magnitude over all of them (the colour baseline's). Within a set, a
    later polygon wins a shared pixel.

    With `keep_pixels`, also the hypercolumns of at most that many of each building's sampled pixels per
    block (`pixel_pre`, `pixel_post` (m, C) float16, `pixel_owner` (m,) their building): a per-pixel
    classifier's training rows. With `pixel_classifier` ((pre, post, outline_m2) of m pixels -> (m, k)
    probabilities), `vote` (n, k): its probabilities averaged over each building's sampled pixels, computed
    block by block (zeros where a building has no valid pixel)."""
    m2_per_px = float(gsd_m or 1.0) ** 2
    pools = [_Pool(list(polys), hypercolumn_channels(layers), m2_per_px, keep_pixels) for polys in polygon_sets]
    for k, (r0, r1, c0, c1) in enumerate(blocks(width, height, block)):
        ids = [pool.ids(r0, r1, c0, c1) for pool in pools]
        if not any(i is not None for i in ids):
            continue
        h0, h1 = max(r0 - HALO_PX, 0), min(r1 + HALO_PX, height)
        w0, w1 = max(c0 - HALO_PX, 0), min(c1 + HALO_PX, width)
        window = Window(w0, h0, w1 - w0, h1 - h0)
        pre_rgb, pre_ok = read_pre(window)
        post_rgb, post_ok = read_post(window)
        core = (slice(r0 - h0, r1 - h0), slice(c0 - w0, c1 - w0))
        ok = (pre_ok & post_ok)[core]
        values = {key: np.concatenate([rgb[:, core[0], core[1]], _gradient(rgb)[None][:, core[0], core[1]]]).reshape(4, -1)
                  for key, rgb in (("pre", pre_rgb), ("post", post_rgb))}
        acts = None
        for j, (pool, block_ids) in enumerate(zip(pools, ids, strict=True)):
            if block_ids is None:
                continue
            block_ids = np.where(ok, block_ids, 0)
            pool.add_colour(block_ids, values)
            rows, cols, owner, weight = _sample(block_ids, per_building, np.random.default_rng([seed, k, j]))
            if not len(rows):
                continue
            if acts is None:  # once per block, whatever the number of sets
                rgb = torch.from_numpy(np.stack([pre_rgb, post_rgb])).to(device=device, dtype=torch.float32)
                with torch.inference_mode():
                    acts = backbone(rgb, layers)
            with torch.inference_mode():
                r = torch.from_numpy(np.concatenate([rows, rows]) + (r0 - h0))
                c = torch.from_numpy(np.concatenate([cols, cols]) + (c0 - w0))
                b = np.repeat([0, 1], len(rows))
                columns = gather_hypercolumns(acts, layers, r, c, (h1 - h0, w1 - w0), batch=b).double().cpu().numpy()
            pool.add_columns(owner, weight, columns, np.random.default_rng([seed, k, j, 1]))
            if pixel_classifier is not None:
                m = len(owner)
                pool.add_votes(owner, weight, pixel_classifier(columns[:m], columns[m:], pool.outline_m2[owner]))
    return [pool.result() for pool in pools]


class _Pool:
    """The running sums of one polygon set (`pooled_hypercolumns`)."""

    def __init__(self, polygons: list[Any], channels: int, m2_per_px: float, keep_pixels: int):
        n = len(polygons)
        self.polygons = polygons
        self.m2_per_px = m2_per_px
        self.outline_m2 = shapely.area(np.asarray(polygons, dtype=object)) * m2_per_px
        self.keep_pixels = keep_pixels
        self.kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (owner, pre, post) of kept pixels
        self.votes: np.ndarray | None = None  # weighted sums of the per-pixel classifier's probabilities
        self.tree = shapely.STRtree(polygons)  # a block's buildings without a pass over all of them
        # the first and second moments: sums of pre, post, |post - pre|, pre^2 and post^2 (weighted)
        self.sums = {k: np.zeros((n, channels), np.float64) for k in ("pre", "post", "absdiff", "pre2", "post2")}
        self.colour = {k: np.zeros((n, 8), np.float64) for k in ("pre", "post")}  # sums of 4 values and squares
        self.pixels = np.zeros(n, np.int64)

    def ids(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray | None:
        """int32 ids (index + 1) of the block's pixels, None when no building covers one."""
        hits = np.sort(self.tree.query(box(c0, r0, c1, r1), predicate="intersects"))  # sorted: a later one wins
        if not len(hits):
            return None
        # pixel-space polygons, integer translation: the pixels rasterising the whole scene would give
        ids = rio_features.rasterize([(self.polygons[i], int(i) + 1) for i in hits], out_shape=(r1 - r0, c1 - c0),
                                     transform=Affine.translation(c0, r0), fill=0, dtype="int32")
        return ids if ids.any() else None

    def add_colour(self, ids: np.ndarray, values: dict[str, np.ndarray]) -> None:
        labelled = ids.ravel() > 0
        owners = ids.ravel()[labelled] - 1
        for key, v in values.items():
            x = v[:, labelled].T.astype(np.float64)
            np.add.at(self.colour[key], owners, np.concatenate([x, x**2], axis=1))
        self.pixels += np.bincount(ids.ravel(), minlength=len(self.pixels) + 1)[1:]

    def add_columns(self, owner: np.ndarray, weight: np.ndarray, columns: np.ndarray,
                    rng: np.random.Generator) -> None:
        m = len(owner)
        pre, post = columns[:m], columns[m:]
        for key, part in (("pre", pre), ("post", post), ("absdiff", np.abs(post - pre)), ("pre2", pre**2),
                          ("post2", post**2)):
            np.add.at(self.sums[key], owner, part * weight[:, None])
        if self.keep_pixels:  # a seeded random `keep_pixels` of each building's sampled pixels
            order = np.lexsort((rng.random(m), owner))
            sorted_owner = owner[order]
            rank = np.arange(m) - np.searchsorted(sorted_owner, sorted_owner)  # place within its building
            kept = np.sort(order[rank < self.keep_pixels])
            self.kept.append((owner[kept], pre[kept].astype(np.float16), post[kept].astype(np.float16)))

    def add_votes(self, owner: np.ndarray, weight: np.ndarray, prob: np.ndarray) -> None:
        if self.votes is None:
            self.votes = np.zeros((len(self.polygons), prob.shape[1]), np.float64)
        np.add.at(self.votes, owner, np.asarray(prob, np.float64) * weight[:, None])

    def result(self) -> dict[str, np.ndarray]:
        safe = np.maximum(self.pixels, 1)[:, None]
        moments = {k: v / safe for k, v in self.sums.items()}
        out = {k: moments[k].astype(np.float32) for k in ("pre", "post", "absdiff")}
        for key in ("pre", "post"):
            out[f"{key}_std"] = np.sqrt(np.maximum(moments[key + "2"] - moments[key] ** 2, 0.0)).astype(np.float32)
        for key, acc in self.colour.items():
            mean = acc[:, :4] / safe
            std = np.sqrt(np.maximum(acc[:, 4:] / safe - mean**2, 0.0))
            out[f"colour_{key}"] = np.concatenate([mean, std], axis=1).astype(np.float32)
        out["pixels"] = self.pixels
        out["area_m2"] = self.pixels * self.m2_per_px
        out["outline_m2"] = self.outline_m2
        if self.keep_pixels:
            channels = self.sums["pre"].shape[1]
            parts = self.kept or [(np.zeros(0, np.int64), np.zeros((0, channels), np.float16),
                                   np.zeros((0, channels), np.float16))]
            for k, key in enumerate(("pixel_owner", "pixel_pre", "pixel_post")):
                out[key] = np.concatenate([part[k] for part in parts])
        if self.votes is not None:
            out["vote"] = (self.votes / safe).astype(np.float32)
        return out


def _gradient(rgb: np.ndarray) -> np.ndarray:
    """The gradient magnitude (Sobel) of the grey image of RGB (3, h, w)."""
    from scipy import ndimage

    grey = rgb.astype(np.float32).mean(0)
    return np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))


def _sample(ids: np.ndarray, per_building: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(rows, cols, building index, weight) of at most `per_building` pixels of every building in `ids`; the
    weight is how many of the building's pixels in this block each sampled pixel stands for."""
    flat = ids.ravel()
    where = np.flatnonzero(flat)
    order = where[np.argsort(flat[where], kind="stable")]
    labels, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    picked, owners, weights = [], [], []
    for label, start, count in zip(labels, starts, counts, strict=True):
        members = order[start : start + count]
        k = min(per_building, count)
        chosen = members if k == count else rng.choice(members, size=k, replace=False)
        picked.append(chosen)
        owners.append(np.full(k, label - 1))
        weights.append(np.full(k, count / k))
    if not picked:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    idx = np.concatenate(picked)
    w = ids.shape[1]
    return idx // w, idx % w, np.concatenate(owners), np.concatenate(weights)


def scene_seed(seed: int, scene_id: str) -> int:
    """A building sample's seed: the run's seed and the scene (the same pixels whatever else is run)."""
    return (int(seed) * 1_000_003 + zlib.crc32(scene_id.encode())) % (2**32)
