"""Whole-scene inference: overlapping windows, blended without seams, block by block (bounded memory).

The scene is covered by a fixed, scene-anchored grid of `tile_size` windows whose origins are `stride`
apart (`stride = floor(tile_size * (1 - overlap))`, the last window flush with the right/bottom edge).
Each window's probabilities are multiplied by a tapered weight (a linear ramp over the overlap on every
side, 1 in the middle) and accumulated with the weights; the blended value is `sum(w * p) / sum(w)`, so no
seam shows where windows meet.

The scene is processed in blocks of `block_size` pixels. A block reads once the union of all windows
that touch it (its halo), accumulates exactly those windows in the same global order as a whole-scene
run, and keeps only its own pixels: the result equals a one-block run, and memory is bounded by the block
size (plus the probabilities of the windows that straddle the next block row, kept by `WindowCache` so
that no window runs twice), whatever the scene size. Blocks are written one by one into a tiled GeoTIFF,
which is then copied to a Cloud-Optimised GeoTIFF (`footprints.contracts.probability`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from tqdm import tqdm

from .atomic import atomic_path
from .blocks import iter_blocks
from .contracts.probability import encode_probability, raster_profile, to_cog
from .segmenter import building_and_seed
from .targets import SCHEMES, ClassScheme

BINARY = SCHEMES["binary"]


def bands_of(scheme: ClassScheme) -> int:
    """Bands of a scheme's probability raster: building (and the seed score when it differs)."""
    return 1 if scheme.seed == scheme.building else 2

# A model maps rgb float (B, 3, H, W) in 0..255 to logits (B, K, H, W); any callable will do (tests).
Model = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# the window grid and its weights (pure functions)


def window_stride(tile_size: int, overlap: float) -> int:
    """Distance between window origins for a fractional `overlap` in [0, 1)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return max(1, int(math.floor(tile_size * (1.0 - overlap))))


def window_origins(length: int, tile_size: int, stride: int) -> np.ndarray:
    """Origins along one axis: 0, stride, ... and a last window flush with the edge.

    A scene shorter than one window gets a single window at 0 (padded by the boundless read).
    """
    if length <= tile_size:
        return np.zeros(1, dtype=np.int64)
    origins = list(range(0, length - tile_size, stride))
    origins.append(length - tile_size)
    return np.asarray(origins, dtype=np.int64)


def ramp_weights(tile_size: int, stride: int) -> np.ndarray:
    """A (tile, tile) float64 weight: linear ramp over the overlap width on each side, 1 inside.

    With a regular grid the ramps of neighbouring windows sum to one across the overlap (a partition of
    unity); the weights never reach 0, so an edge pixel covered by one window keeps that window's value.
    """
    ramp = max(1, tile_size - stride)
    i = np.arange(tile_size, dtype=np.float64)
    w1 = np.minimum(np.minimum(i + 0.5, tile_size - i - 0.5) / ramp, 1.0)
    return np.outer(w1, w1)


def _touching(origins: np.ndarray, start: int, stop: int, tile_size: int) -> np.ndarray:
    """Origins of the windows that overlap [start, stop)."""
    return origins[(origins < stop) & (origins + tile_size > start)]


# ---------------------------------------------------------------------------------------------------
# inference


@torch.inference_mode()
def predict_batch(model: Model, rgb: np.ndarray, device: torch.device, tta_flips: bool = False,
                  scheme: ClassScheme = BINARY) -> np.ndarray:
    """Probability bands (B, bands, H, W) float32 for uint8 rgb (B, 3, H, W): the building probability,
    and the watershed seed score for schemes with an interior class (`building_and_seed`); flips averaged
    when asked."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device=device, dtype=torch.float32)

    def prob(t: torch.Tensor) -> torch.Tensor:
        return building_and_seed(model(t), scheme)

    p = prob(x)
    if tta_flips:
        p = p + prob(x.flip(-1)).flip(-1) + prob(x.flip(-2)).flip(-2)
        p = p / 3.0
    return p.cpu().numpy().astype(np.float32, copy=False)


@dataclass
class Grid:
    """The scene-anchored window grid of one scene."""

    width: int
    height: int
    tile_size: int
    stride: int

    @property
    def rows(self) -> np.ndarray:
        return window_origins(self.height, self.tile_size, self.stride)

    @property
    def cols(self) -> np.ndarray:
        return window_origins(self.width, self.tile_size, self.stride)

    @property
    def n_windows(self) -> int:
        return len(self.rows) * len(self.cols)


class WindowCache:
    """Window probabilities that later blocks will need again (windows that straddle block borders).

    Blocks run in row-major order; a window is kept from the first block that runs it until the last
    block it touches, so no window is run twice. Holds about two rows of windows across the scene
    width (e.g. ~55 MB of float32 for a 20,000 px wide scene with 256 px windows): bounded by the
    width, never by the area.
    """

    def __init__(self, grid: Grid, block_size: int):
        self._last: dict[tuple[int, int], int] = {}
        self._store: dict[tuple[int, int], np.ndarray] = {}
        self._block = 0
        t = grid.tile_size
        for i, b in enumerate(iter_blocks(grid.width, grid.height, block_size)):
            rows = _touching(grid.rows, int(b.row_off), int(b.row_off + b.height), t)
            cols = _touching(grid.cols, int(b.col_off), int(b.col_off + b.width), t)
            for r in rows:
                for c in cols:
                    self._last[(int(r), int(c))] = i

    def has(self, origin: tuple[int, int]) -> bool:
        return origin in self._store

    def take(self, origin: tuple[int, int]) -> np.ndarray:
        p = self._store[origin]
        if self._last.get(origin, -1) <= self._block:
            del self._store[origin]
        return p

    def offer(self, origin: tuple[int, int], prob: np.ndarray) -> None:
        if self._last.get(origin, -1) > self._block:
            self._store[origin] = prob

    def block_done(self) -> None:
        self._block += 1

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._store.values())


def predict_block(
    reader: Any,
    model: Model,
    block: Window,
    grid: Grid,
    *,
    batch_size: int = 8,
    tta_flips: bool = False,
    device: torch.device | str = "cpu",
    weights: np.ndarray | None = None,
    cache: WindowCache | None = None,
    scheme: ClassScheme = BINARY,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Blended probability of one block: (prob float32 (bands, h, w), valid bool (h, w), windows run).

    Reads the block's halo (the union of the windows touching it) once with `reader.read` (boundless),
    runs every touching window (or takes it from `cache`, when a previous block ran it), accumulates them
    in global row-major order and keeps the block's own pixels.
    """
    device = torch.device(device)
    t = grid.tile_size
    if weights is None:
        weights = ramp_weights(t, grid.stride)
    r0, c0 = int(block.row_off), int(block.col_off)
    r1, c1 = r0 + int(block.height), c0 + int(block.width)
    rows = _touching(grid.rows, r0, r1, t)
    cols = _touching(grid.cols, c0, c1, t)
    hr0, hc0 = int(rows[0]), int(cols[0])
    hh, hw = int(rows[-1]) + t - hr0, int(cols[-1]) + t - hc0
    rgb, valid = reader.read(Window(hc0, hr0, hw, hh))
    rgb = np.asarray(rgb)
    if rgb.shape != (3, hh, hw):
        raise ValueError(f"reader returned {rgb.shape} for a {hh}x{hw} window")
    acc = np.zeros((bands_of(scheme), hh, hw), dtype=np.float64)
    wsum = np.zeros((hh, hw), dtype=np.float64)
    origins = [(int(r), int(c)) for r in rows for c in cols]
    probs: dict[tuple[int, int], np.ndarray] = {}
    todo = [o for o in origins if cache is None or not cache.has(o)]
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start : start + batch_size]
        batch = np.stack([rgb[:, r - hr0 : r - hr0 + t, c - hc0 : c - hc0 + t] for r, c in chunk])
        probs.update(zip(chunk, predict_batch(model, batch, device, tta_flips, scheme), strict=True))
    for o in origins:  # accumulate in global order, whether computed now or earlier
        p = probs[o] if o in probs else cache.take(o)  # type: ignore[union-attr]
        if cache is not None and o in probs:
            cache.offer(o, p)
        r, c = o[0] - hr0, o[1] - hc0
        acc[:, r : r + t, c : c + t] += weights * p
        wsum[r : r + t, c : c + t] += weights
    if cache is not None:
        cache.block_done()
    # keep the block's own pixels
    br, bc = r0 - hr0, c0 - hc0
    acc = acc[:, br : br + block.height, bc : bc + block.width]
    wsum = wsum[br : br + block.height, bc : bc + block.width]
    prob = (acc / np.maximum(wsum, 1e-12)).astype(np.float32)
    np.clip(prob, 0.0, 1.0, out=prob)
    valid = np.asarray(valid, dtype=bool)[br : br + block.height, bc : bc + block.width] & (wsum > 0)
    return prob, valid, len(todo)


def predict_scene(
    reader: Any,
    model: Model,
    out_path: str | Path,
    *,
    tile_size: int,
    overlap: float = 0.25,
    batch_size: int = 8,
    block_size: int = 2048,
    tta_flips: bool = False,
    prob_dtype: str = "uint8",
    device: torch.device | str = "cpu",
    scheme: ClassScheme = BINARY,
) -> dict[str, Any]:
    """Predict a whole scene into a probability COG at `out_path` (written atomically).

    `reader` is a `footprints.scenes.SceneReader` (or anything with `.width`, `.height`, `.transform`,
    `.crs` and `.read(window) -> (rgb uint8 (3, h, w), valid bool (h, w))`); `model` any callable from
    rgb float (B, 3, H, W) in 0..255 to logits (B, K, H, W) of the classes of `scheme`. Band 1 is the
    building probability, band 2 (schemes with an interior class) the watershed seed score. Returns a small
    summary.
    """
    out_path = Path(out_path)
    width, height = int(reader.width), int(reader.height)
    stride = window_stride(tile_size, overlap)
    grid = Grid(width, height, tile_size, stride)
    weights = ramp_weights(tile_size, stride)
    profile = raster_profile(width, height, reader.transform, reader.crs, prob_dtype, bands_of(scheme))
    t0 = time.perf_counter()
    n_windows = 0
    valid_px = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel-space scenes: said once by the caller
        with atomic_path(out_path) as final_tmp:
            blocks_tmp = final_tmp.with_name(final_tmp.name + ".blocks")  # tiled intermediate, removed below
            try:
                with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
                    with rasterio.open(blocks_tmp, "w", **profile) as dst:
                        blocks = list(iter_blocks(width, height, block_size))
                        cache = WindowCache(grid, block_size) if len(blocks) > 1 else None
                        for block in tqdm(blocks, desc=f"{getattr(reader, 'scene_id', 'scene')} blocks",
                                          unit="block", leave=False, disable=len(blocks) < 4):
                            prob, valid, n = predict_block(
                                reader, model, block, grid,
                                batch_size=batch_size, tta_flips=tta_flips, device=device, weights=weights,
                                cache=cache, scheme=scheme,
                            )  # fmt: skip
                            n_windows += n
                            valid_px += int(valid.sum())
                            dst.write(encode_probability(prob, prob_dtype), window=block)
                            dst.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=block)
                    to_cog(blocks_tmp, final_tmp, prob_dtype)
            finally:
                blocks_tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {
        "prob": str(out_path),
        "width": width,
        "height": height,
        "windows": n_windows,
        "grid_windows": grid.n_windows,
        "valid_px": valid_px,
        "seconds": seconds,
    }

