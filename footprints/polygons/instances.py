"""Building instances at predict time: one label per building by a seeded watershed, seamless across blocks.

`instance_pieces(read, height, width, threshold, seed_threshold, block_size, halo_px, max_component_px)`
labels the buildings of a probability raster and returns their polygons in scene pixel coordinates with
per-label statistics (`footprints.polygons.vectorize.polygons_from_probability(..., seed_threshold=...)` cleans and
georeferences them). `label_pieces` (a label image -> one polygon and sum/count/max per label) is shared
with the connected-component path of `footprints.polygons.vectorize`.

Definitions: region = (p >= threshold) & valid; seeds = (seed score >= seed_threshold) & region. Markers are
the 4-connected components of the seeds. A 4-connected component of the region with two or more markers is
split by `skimage.segmentation.watershed(-seed, markers, mask=component, connectivity=1)`; one with one or
no marker is one building. Watershed labels are 4-connected (every pixel is flooded from a 4-neighbour of
its own label), so each label gives exactly one polygon from `rasterio.features.shapes`.

Seamless, bounded memory. The watershed inside a component depends on nothing outside it, so the unit of
work is a whole component:
- Pass 1 reads the raster block by block, labels the region's components of each block and joins those
  that continue across a block border (union-find over the border rows and columns,
  `scipy.sparse.csgraph.connected_components`). Kept: per component its bounding box and its first pixel
  in raster order (a few numbers per component; no label image outlives its block).
- Pass 2 handles every component once, in the block whose core holds its first pixel: from one read of
  the union of the bounding boxes of the block's components that lie inside its window (core + `halo_px`
  on every side), else from a read of its own bounding box. The watershed runs on the component's
  bounding box with everything outside the component masked, so its input, hence its result, is the same
  whatever window it was read in: the result equals a single-block run for any block size.
- The cap: a component whose bounding box holds more than `max_component_px` pixels is not split (one
  warning per scene): every block gives its pieces of it, dissolved afterwards exactly like the pieces of
  the connected-component path. Whether a component is over the cap depends only on the component, so the
  output stays independent of the block size. Peak memory: a block window (block + 2 halo)^2 or one
  bounding box of at most `max_component_px` pixels, each with its label images.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..contracts.probability import threshold_raw
from .blocks import iter_blocks, prefetched

log = logging.getLogger(__name__)

# read(window, with_seed) -> (values, valid or None, seed score or None); values/seed as stored (uint8/float)
InstanceReader = Callable[[Window, bool], tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]]
FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as rasterio.features.shapes(connectivity=4)
MAX_COMPONENT_PX = 1 << 24  # 16.8 Mpx: a 2 km x 2 km bounding box at 0.5 m is no building


def polygons_from_rings(polys: list[list]) -> np.ndarray:
    """GeoJSON-like polygon coordinates (shell first, then holes) -> shapely Polygons, in one vectorised
    call (a Python `Polygon(...)` per building costs as much as GDAL's polygonize itself)."""
    rings = [r for p in polys for r in p]
    owner = np.repeat(np.arange(len(polys)), [len(p) for p in polys])
    lens = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    coords = np.array(list(itertools.chain.from_iterable(rings)), dtype=np.float64).reshape(-1, 2)
    lr = shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), lens))
    return shapely.polygons(lr, indices=owner)


def label_pieces(labels: np.ndarray, n: int, fg: np.ndarray, raw: np.ndarray, col_off: int,
                 row_off: int) -> dict[str, np.ndarray]:
    """One polygon per label 1..n (each present, each 4-connected) in scene pixel coordinates, and the
    sum, count and max of `raw` over each label's pixels. `fg` = labels > 0."""
    # statistics over the foreground pixels only (a few % of the block): no sort, no full-block pass
    where = np.flatnonzero(fg)
    lab = labels.ravel()[where] - 1
    vals = raw.ravel()[where]
    counts = np.bincount(lab, minlength=n)
    sums = np.bincount(lab, weights=vals, minlength=n)
    # every label 1..n has pixels, so after sorting by label each group starts where the label changes
    order = np.argsort(lab, kind="stable")
    starts = np.flatnonzero(np.r_[True, lab[order][1:] != lab[order][:-1]])
    maxs = np.maximum.reduceat(vals[order], starts).astype(np.float64)
    # scene pixel coordinates (integers, exact): pieces of neighbouring blocks share their border vertices
    # bit for bit, so the merge never leaves slivers; the scene affine is applied once, after the merge
    btf = Affine.translation(col_off, row_off)
    found = list(rasterio.features.shapes(labels, mask=fg, connectivity=4, transform=btf))
    owner = np.array([int(v) - 1 for _, v in found], dtype=np.int64)
    polys = polygons_from_rings([g["coordinates"] for g, _ in found])
    if len(found) == n:
        geoms = np.empty(n, dtype=object)
        geoms[owner] = polys
    else:  # a label in several 4-connected parts (not made here): one MultiPolygon, split when cleaned
        order = np.argsort(owner, kind="stable")
        geoms = shapely.multipolygons(polys[order], indices=owner[order])
    return {"geom": geoms, "sum": sums, "count": counts.astype(np.float64), "max": maxs}


def _region(raw: np.ndarray, valid: np.ndarray | None, thr: float) -> np.ndarray:
    fg = raw >= thr
    if valid is not None:
        fg &= valid
    return fg


def _first_pixels(labels: np.ndarray, n: int, fg: np.ndarray) -> np.ndarray:
    """Flat index (in `labels`) of the first pixel in raster order of each label 1..n."""
    where = np.flatnonzero(fg)
    first = np.full(n, labels.size, dtype=np.int64)
    np.minimum.at(first, labels.ravel()[where] - 1, where)
    return first


def _nodes(strip: np.ndarray, base: int) -> np.ndarray:
    """Labels of a block's border row/column -> scene-wide node ids (-1 = background)."""
    return np.where(strip > 0, strip.astype(np.int64) - 1 + base, -1)


class _Components:
    """Pass 1: the region's 4-connected components over the whole scene, joined across block borders."""

    def __init__(self, read: InstanceReader, height: int, width: int, block_size: int, threshold: float):
        self.width, self.thr = width, None
        self.blocks = list(iter_blocks(width, height, block_size))
        self.offset = np.zeros(len(self.blocks) + 1, dtype=np.int64)  # node ids of block b: offset[b]..
        r0, r1, c0, c1, first, ea, eb = [], [], [], [], [], [], []
        bottoms: dict[int, np.ndarray] = {}  # block column offset -> bottom row node ids of the block above
        right = np.empty(0, dtype=np.int64)
        # the next block is read (decoded, the GIL released) while this one is labelled: one block ahead
        ahead = prefetched(self.blocks, lambda w: read(w, False), 1, name="components-read")
        with contextlib.closing(ahead) as reads:
            for b, (win, (raw, valid, _)) in enumerate(zip(self.blocks, reads, strict=True)):
                if self.thr is None:
                    self.thr = threshold_raw(raw.dtype, threshold)
                fg = _region(raw, valid, self.thr)
                lab, n = ndimage.label(fg, structure=FOUR)
                base = int(self.offset[b])
                self.offset[b + 1] = base + n
                if n:
                    sl = ndimage.find_objects(lab)
                    r0.append(np.fromiter((s[0].start for s in sl), np.int64, n) + win.row_off)
                    r1.append(np.fromiter((s[0].stop for s in sl), np.int64, n) + win.row_off)
                    c0.append(np.fromiter((s[1].start for s in sl), np.int64, n) + win.col_off)
                    c1.append(np.fromiter((s[1].stop for s in sl), np.int64, n) + win.col_off)
                    f = _first_pixels(lab, n, fg)
                    first.append((f // win.width + win.row_off) * width + f % win.width + win.col_off)
                top, left = _nodes(lab[0, :], base), _nodes(lab[:, 0], base)
                # 4-connectivity across a border: the same column (rows above/below) or the same row (left/right)
                if win.row_off > 0:
                    above = bottoms[win.col_off]
                    both = (above >= 0) & (top >= 0)
                    ea.append(above[both])
                    eb.append(top[both])
                if win.col_off > 0:
                    both = (right >= 0) & (left >= 0)
                    ea.append(right[both])
                    eb.append(left[both])
                bottoms[win.col_off], right = _nodes(lab[-1, :], base), _nodes(lab[:, -1], base)
        if self.thr is None:
            self.thr = threshold_raw(np.dtype(np.float32), threshold)
        total = int(self.offset[-1])
        if total == 0:
            self.gid = np.zeros(0, np.int64)
            self.r0 = self.r1 = self.c0 = self.c1 = self.first = np.zeros(0, np.int64)
            return
        a = np.concatenate(ea) if ea else np.zeros(0, np.int64)
        b_ = np.concatenate(eb) if eb else np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(len(a), np.int32), (a, b_)), shape=(total, total))  # duplicates sum
        m, self.gid = connected_components(graph, directed=False)
        self.gid = self.gid.astype(np.int64)
        big = np.iinfo(np.int64).max
        self.r0, self.c0, self.first = (np.full(m, big, np.int64) for _ in range(3))
        self.r1, self.c1 = (np.full(m, -1, np.int64) for _ in range(2))
        for agg, dst, src in ((np.minimum, self.r0, r0), (np.maximum, self.r1, r1), (np.minimum, self.c0, c0),
                              (np.maximum, self.c1, c1), (np.minimum, self.first, first)):
            agg.at(dst, self.gid, np.concatenate(src))

    def boxes(self, ids: np.ndarray, win: Window) -> np.ndarray:
        """Bounding boxes (r0, r1, c0, c1) of components `ids` in the coordinates of `win`."""
        return np.stack([self.r0[ids] - win.row_off, self.r1[ids] - win.row_off, self.c0[ids] - win.col_off,
                         self.c1[ids] - win.col_off], axis=1)

    def __len__(self) -> int:
        return len(self.first)


def _window_instances(raw: np.ndarray, valid: np.ndarray | None, seed: np.ndarray, win: Window,
                      firsts: np.ndarray, boxes: np.ndarray, thr: float, seed_thr: float
                      ) -> tuple[dict[str, np.ndarray], int]:
    """Label the components whose first pixels (flat, in window coordinates) are `firsts` and bounding boxes
    `boxes` (rows: r0, r1, c0, c1 in window coordinates); each lies entirely inside the window. Returns the
    pieces and the number of split components; `group` counts from 0 here (the caller offsets it). Pure: it
    runs on a worker thread (the watershed releases the GIL)."""
    fg = _region(raw, valid, thr)
    lab, n = ndimage.label(fg, structure=FOUR)
    own = lab.ravel()[firsts]
    seeds = (seed >= seed_thr) & fg
    sl_lab, ns = ndimage.label(seeds, structure=FOUR)
    n_seeds = np.zeros(n + 1, np.int64)
    if ns:
        n_seeds = np.bincount(lab.ravel()[_first_pixels(sl_lab, ns, seeds)], minlength=n + 1)
    single = own[n_seeds[own] <= 1]
    multi = own[n_seeds[own] >= 2]
    rs, re, cs, ce = boxes[:, 0].min(), boxes[:, 1].max(), boxes[:, 2].min(), boxes[:, 3].max()
    box_of = dict(zip(own.tolist(), boxes.tolist(), strict=True))
    lut = np.zeros(n + 1, np.int32)
    lut[single] = np.arange(1, len(single) + 1, dtype=np.int32)
    inst = lut[lab[rs:re, cs:ce]]
    group = [np.full(len(single), -1, np.int64)]
    nxt = len(single) + 1
    if len(multi):
        from skimage.segmentation import watershed

        for g, k in enumerate(multi):
            r0, r1, c0, c1 = box_of[int(k)]
            sl = (slice(r0, r1), slice(c0, c1))
            comp = lab[sl] == k
            # the component alone on its own bounding box: the same input whatever window it came from
            markers = np.where(comp, sl_lab[sl], 0)
            score = np.where(comp, -seed[sl].astype(np.float64), 0.0)
            ws = watershed(score, markers, mask=comp, connectivity=1)
            ids, inv = np.unique(ws[comp], return_inverse=True)
            sub = inst[sl[0].start - rs:sl[0].stop - rs, sl[1].start - cs:sl[1].stop - cs]
            sub[comp] = (nxt + inv).astype(np.int32)
            nxt += len(ids)
            group.append(np.full(len(ids), g, np.int64))
    p = label_pieces(inst, nxt - 1, inst > 0, raw[rs:re, cs:ce], win.col_off + cs, win.row_off + rs)
    p["group"] = np.concatenate(group)
    return p, len(multi)


class _Instances:
    """Pass 2: windows labelled on `workers` threads, in flight at most 2 per worker, gathered in submission
    order; the group ids are offset by a running counter in that order, so the result is the same for any
    number of workers. The workers never read: a dataset handle must not be read from two threads at once
    (pass 1's one-block read-ahead has ended before pass 2 reads)."""

    def __init__(self, seed_threshold: float, workers: int):
        self.seed_threshold = seed_threshold
        self.pieces: list[dict[str, np.ndarray]] = []
        self.groups = 0
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="instances") if workers > 1 else None
        self.limit = 2 * workers
        self.pending: deque[Future] = deque()

    def window(self, raw: np.ndarray, valid: np.ndarray | None, seed: np.ndarray, win: Window,
               firsts: np.ndarray, boxes: np.ndarray, thr: float) -> None:
        args = (raw, valid, seed, win, firsts, boxes, thr, threshold_raw(seed.dtype, self.seed_threshold))
        if self.pool is None:
            self._add(*_window_instances(*args))
            return
        self.pending.append(self.pool.submit(_window_instances, *args))
        while len(self.pending) >= self.limit:
            self._add(*self.pending.popleft().result())

    def _add(self, p: dict[str, np.ndarray], n_groups: int) -> None:
        p["group"] = np.where(p["group"] >= 0, p["group"] + self.groups, -1)
        self.groups += n_groups
        self.pieces.append(p)

    def finish(self) -> list[dict[str, np.ndarray]]:
        while self.pending:
            self._add(*self.pending.popleft().result())
        return self.pieces

    def __enter__(self) -> _Instances:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.pending:  # an error on the way: nothing more to wait for
            f.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _expand(win: Window, halo: int, height: int, width: int) -> Window:
    r0, c0 = max(0, win.row_off - halo), max(0, win.col_off - halo)
    r1, c1 = min(height, win.row_off + win.height + halo), min(width, win.col_off + win.width + halo)
    return Window(c0, r0, c1 - c0, r1 - r0)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def instance_pieces(read: InstanceReader, height: int, width: int, threshold: float, seed_threshold: float,
                    block_size: int = 2048, halo_px: int = 256, max_component_px: int = MAX_COMPONENT_PX,
                    scene: str = "", workers: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Building instances of a raster, in scene pixel coordinates (see the module docstring).

    Returns (instances, oversized pieces): `instances` has `geom, sum, count, max, group` per building
    (`group` = -1 for a component that is one building, else an id shared by the buildings split out of one
    component: their polygons share walls); the oversized pieces (`geom, sum, count, max, edge`) are parts
    of components over the cap, to be dissolved like block pieces. Sums and maxima are of the stored
    values of band 1 (the building probability), over each building's pixels. `workers`: threads labelling
    the windows of pass 2 (default: up to 4, one per core); the result does not depend on it.
    """
    if halo_px < 0 or max_component_px <= 0:
        raise ValueError("halo_px must be >= 0 and max_component_px > 0")
    comps = _Components(read, height, width, block_size, threshold)
    thr = comps.thr
    if not len(comps):
        return {}, {}
    with _Instances(seed_threshold, min(4, os.cpu_count() or 1) if workers is None else max(1, workers)) as out:
        bs = max(1, int(block_size))
        n_bc = -(-width // bs)
        first_r, first_c = comps.first // width, comps.first % width
        owner = (first_r // bs) * n_bc + first_c // bs
        area = (comps.r1 - comps.r0) * (comps.c1 - comps.c0)
        over = area > max_component_px
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(comps.blocks) + 1))
        over_ids = np.flatnonzero(over)
        if len(over_ids):
            log.warning("%s: %d region component(s) over %d px are not split into buildings (largest %d px)",
                        scene or "scene", len(over_ids), max_component_px, int(area[over_ids].max()))
        fallback: list[dict[str, np.ndarray]] = []
        for b, win in enumerate(comps.blocks):
            mine = order[bounds[b]:bounds[b + 1]]
            mine = mine[~over[mine]]
            if len(mine):
                ww = _expand(win, halo_px, height, width)
                inside = ((comps.r0[mine] >= ww.row_off) & (comps.r1[mine] <= ww.row_off + ww.height)
                          & (comps.c0[mine] >= ww.col_off) & (comps.c1[mine] <= ww.col_off + ww.width))
                here = mine[inside]
                if len(here):
                    # read only as far as those components reach (a component has only background around
                    # it, so a tighter window labels it alike): less to read and label than block + halo
                    r0, c0 = int(comps.r0[here].min()), int(comps.c0[here].min())
                    reach = Window(c0, r0, int(comps.c1[here].max()) - c0, int(comps.r1[here].max()) - r0)
                    raw, valid, seed = read(reach, True)
                    firsts = (first_r[here] - reach.row_off) * reach.width + first_c[here] - reach.col_off
                    out.window(raw, valid, seed, reach, firsts, comps.boxes(here, reach), thr)
                for g in mine[~inside]:  # larger than the halo: its own bounding box, read alone
                    bw = Window(int(comps.c0[g]), int(comps.r0[g]), int(comps.c1[g] - comps.c0[g]),
                                int(comps.r1[g] - comps.r0[g]))
                    raw, valid, seed = read(bw, True)
                    first = np.array([(first_r[g] - bw.row_off) * bw.width + first_c[g] - bw.col_off])
                    out.window(raw, valid, seed, bw, first, comps.boxes(np.array([g]), bw), thr)
            if len(over_ids):
                hit = over_ids[(comps.r0[over_ids] < win.row_off + win.height) & (comps.r1[over_ids] > win.row_off)
                               & (comps.c0[over_ids] < win.col_off + win.width) & (comps.c1[over_ids] > win.col_off)]
                pieces = _oversized_pieces(read, win, comps, b, over, thr) if len(hit) else {}
                if pieces:
                    fallback.append(pieces)
        instances = out.finish()
    return _concat(instances), _concat(fallback)


def _oversized_pieces(read: InstanceReader, win: Window, comps: _Components, b: int, over: np.ndarray,
                      thr: float) -> dict[str, np.ndarray]:
    """This block's pieces of the components over the cap (labelled exactly as in pass 1)."""
    raw, valid, _ = read(win, False)
    fg = _region(raw, valid, thr)
    lab, n = ndimage.label(fg, structure=FOUR)
    keep = np.zeros(n + 1, bool)
    keep[1:] = over[comps.gid[comps.offset[b]:comps.offset[b] + n]]
    ids = np.flatnonzero(keep)
    if not len(ids):  # the bounding box overlaps this block, the component does not
        return {}
    lut = np.zeros(n + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    pl = lut[lab]
    p = label_pieces(pl, len(ids), pl > 0, raw, win.col_off, win.row_off)
    p["edge"] = np.ones(len(ids), bool)
    return p
