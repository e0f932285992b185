"""Whole-scene inference: overlapping windows, blended without seams, block by block (bounded memory),
pipelined so that the device never waits for the disk.

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

Nodata: a window none of whose pixels is valid is never run (it could only blend into invalid pixels),
nor is any window of a block none of whose own pixels is valid; invalid pixels get probability 0 and the
mask band marks them. A 99.8% empty scene costs its reading, not its area.

Pipeline (`predict_scene`): a reader thread reads the next blocks' halos (GDAL releases the GIL) into
pinned memory on CUDA; this thread copies them to the device without blocking, runs the windows in
batches under bf16/fp16 autocast on CUDA (`amp`), blends them on the device in float32 (the same operations
in the same order for every block layout: blocked == whole scene) and hands the block's probabilities to a
writer thread (encoding, GeoTIFF writing), which the next block's inference does not wait for; the
COG copy then runs on a thread of its own while the caller's `alongside` work (predict's vectorising) reads
the finished intermediate. Progress:
a bar over windows on a terminal, a log line every 30 s otherwise, for scenes of more than a few blocks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from ..atomic import atomic_path
from ..contracts.probability import encode_probability, raster_profile, to_cog
from ..model.segmenter import building_and_seed
from ..scenes.targets import SCHEMES, ClassScheme
from .blocks import iter_blocks, prefetched

BINARY = SCHEMES["binary"]
log = logging.getLogger(__name__)
READ_AHEAD = 1  # blocks read ahead of the one being inferred (one is enough to hide the reading)
WRITE_BEHIND = 2  # blocks waiting to be written
PROGRESS_LOG_S = 30.0


def bands_of(scheme: ClassScheme) -> int:
    """Bands of a scheme's probability raster: building (and the seed score when it differs)."""
    return 1 if scheme.seed == scheme.building else 2

# A model maps rgb float (B, 3, H, W) in 0..255 to logits (B, K, H, W); any callable will do (tests).
Model = Callable[[torch.Tensor], torch.Tensor]


def amp_dtype(device: torch.device | str, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype of inference on `device`: bf16 where the GPU has it, else fp16; None on the CPU."""
    device = torch.device(device)
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


@dataclass
class WindowGrid:
    """The prediction windows of one scene: anchored at its top-left pixel, `stride` apart, the last window of
    each axis flush with the right/bottom edge (`window_origins`). Not the tile stage's patch grid."""

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
    width, never by the area. The probabilities stay where they were computed (on the device).
    """

    def __init__(self, grid: WindowGrid, block_size: int):
        self._last: dict[tuple[int, int], int] = {}
        self._store: dict[tuple[int, int], Any] = {}
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

    def take(self, origin: tuple[int, int]) -> Any:
        p = self._store[origin]
        if self._last.get(origin, -1) <= self._block:
            del self._store[origin]
        return p

    def offer(self, origin: tuple[int, int], prob: Any) -> None:
        if self._last.get(origin, -1) > self._block:
            # a copy: a view would keep its whole batch of windows alive (GBs for large batches on a GPU)
            self._store[origin] = prob.clone() if isinstance(prob, torch.Tensor) else np.array(prob)

    def block_done(self) -> None:
        self._block += 1

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._store.values())


# ---------------------------------------------------------------------------------------------------
# inference


def predict_tensor(model: Model, x: torch.Tensor, tta_flips: bool = False, scheme: ClassScheme = BINARY,
                   autocast: torch.dtype | None = None) -> torch.Tensor:
    """Probability bands (B, bands, H, W) float32 of rgb (B, 3, H, W) (uint8 or float in 0..255) on the
    model's device: the building probability and, for schemes with an interior class, the seed score
    (`building_and_seed`); flips averaged when asked. The network runs under `autocast` (a dtype) when set."""
    x = x.float()
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()

    def prob(t: torch.Tensor) -> torch.Tensor:
        with ctx:
            logits = model(t)
        return building_and_seed(logits, scheme)

    p = prob(x)
    if tta_flips:
        p = p + prob(x.flip(-1)).flip(-1) + prob(x.flip(-2)).flip(-2)
        p = p / 3.0
    return p


@dataclass
class _Halo:
    """What the reader thread hands over for one block: the halo's pixels and which windows to run."""

    block: Window
    r0: int  # halo origin (scene pixels)
    c0: int
    rows: np.ndarray  # window origins touching the block
    cols: np.ndarray
    rgb: torch.Tensor  # uint8 (3, hh, hw), pinned on CUDA
    valid: torch.Tensor  # bool (hh, hw)
    runs: dict[tuple[int, int], bool]  # window origin -> has a valid pixel (is run)
    valid_px: int  # valid pixels of the block itself (0: nothing of it is run)

    @property
    def empty(self) -> bool:
        return self.valid_px == 0


def _read_halo(reader: Any, block: Window, grid: WindowGrid, pin: bool = False) -> _Halo:
    t = grid.tile_size
    r0, c0 = int(block.row_off), int(block.col_off)
    rows = _touching(grid.rows, r0, r0 + int(block.height), t)
    cols = _touching(grid.cols, c0, c0 + int(block.width), t)
    hr0, hc0 = int(rows[0]), int(cols[0])
    hh, hw = int(rows[-1]) + t - hr0, int(cols[-1]) + t - hc0
    rgb, valid = reader.read(Window(hc0, hr0, hw, hh))
    rgb, valid = np.asarray(rgb), np.asarray(valid, dtype=bool)
    if rgb.shape != (3, hh, hw):
        raise ValueError(f"reader returned {rgb.shape} for a {hh}x{hw} window")
    br, bc = r0 - hr0, c0 - hc0
    valid_px = int(np.count_nonzero(valid[br : br + int(block.height), bc : bc + int(block.width)]))
    runs = {(int(r), int(c)): bool(valid[r - hr0 : r - hr0 + t, c - hc0 : c - hc0 + t].any())
            for r in rows for c in cols}
    rgb_t, valid_t = torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(np.ascontiguousarray(valid))
    if pin:
        rgb_t, valid_t = rgb_t.pin_memory(), valid_t.pin_memory()
    return _Halo(block, hr0, hc0, rows, cols, rgb_t, valid_t, runs, valid_px)


@torch.inference_mode()
def _infer_block(halo: _Halo, model: Model, grid: WindowGrid, weights: torch.Tensor, *, batch_size: int,
                 tta_flips: bool, scheme: ClassScheme, autocast: torch.dtype | None,
                 cache: WindowCache | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Blend one block on the device: (prob float32 (bands, h, w) with 0 on invalid pixels, valid bool
    (h, w), windows run now). `weights` is the (tile, tile) float32 taper on the device."""
    device, t = weights.device, grid.tile_size
    block = halo.block
    origins = [(int(r), int(c)) for r in halo.rows for c in halo.cols]
    bh, bw = int(block.height), int(block.width)
    br, bc = int(block.row_off) - halo.r0, int(block.col_off) - halo.c0
    if halo.empty:  # nothing of the block is valid: run nothing, forget what only this block needed
        if cache is not None:
            for o in origins:
                if cache.has(o):
                    cache.take(o)
            cache.block_done()
        return (torch.zeros((bands_of(scheme), bh, bw), dtype=torch.float32, device=device),
                torch.zeros((bh, bw), dtype=torch.bool, device=device), 0)
    rgb = halo.rgb.to(device, non_blocking=True)
    valid = halo.valid.to(device, non_blocking=True)
    todo = [o for o in origins if halo.runs[o] and (cache is None or not cache.has(o))]
    probs: dict[tuple[int, int], torch.Tensor] = {}
    bands = bands_of(scheme)
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start : start + batch_size]
        # the windows, converted to float in the same copy
        x = torch.empty((len(chunk), 3, t, t), dtype=torch.float32, device=device)
        for i, (r, c) in enumerate(chunk):
            x[i].copy_(rgb[:, r - halo.r0 : r - halo.r0 + t, c - halo.c0 : c - halo.c0 + t])
        probs.update(zip(chunk, predict_tensor(model, x, tta_flips, scheme, autocast), strict=True))
    hh, hw = halo.rgb.shape[-2:]
    acc = torch.zeros((bands, hh, hw), dtype=torch.float32, device=device)
    wsum = torch.zeros((hh, hw), dtype=torch.float32, device=device)
    tmp = torch.empty((bands, t, t), dtype=torch.float32, device=device)
    for o in origins:  # accumulate in global order, whether computed now or earlier
        if not halo.runs[o]:
            continue  # no valid pixel: it could only blend into pixels that are invalid anyway
        p = probs[o] if o in probs else cache.take(o)  # type: ignore[union-attr]
        if cache is not None and o in probs:
            cache.offer(o, p)
        r, c = o[0] - halo.r0, o[1] - halo.c0
        acc[:, r : r + t, c : c + t] += torch.mul(weights, p, out=tmp)  # w * p, then the sum: as whole
        wsum[r : r + t, c : c + t] += weights
    if cache is not None:
        cache.block_done()
    # keep the block's own pixels; every valid pixel lies in a window that ran, so wsum > 0 there
    acc = acc[:, br : br + bh, bc : bc + bw]
    wsum = wsum[br : br + bh, bc : bc + bw]
    ok = valid[br : br + bh, bc : bc + bw]
    prob = acc.div_(wsum.clamp_(min=1e-12)).clamp_(0.0, 1.0).mul_(ok)
    return prob, ok, len(todo)


def predict_block(
    reader: Any,
    model: Model,
    block: Window,
    grid: WindowGrid,
    *,
    batch_size: int = 8,
    tta_flips: bool = False,
    device: torch.device | str = "cpu",
    weights: np.ndarray | None = None,
    cache: WindowCache | None = None,
    scheme: ClassScheme = BINARY,
    amp: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Blended probability of one block: (prob float32 (bands, h, w), valid bool (h, w), windows run).

    Reads the block's halo (the union of the windows touching it) once with `reader.read` (boundless),
    runs every touching window that has a valid pixel (or takes it from `cache`, when a previous block ran
    it), accumulates them in global row-major order and keeps the block's own pixels. One block, in this
    thread; `predict_scene` pipelines the same steps.
    """
    device = torch.device(device)
    w = weights if weights is not None else ramp_weights(grid.tile_size, grid.stride)
    halo = _read_halo(reader, block, grid)
    prob, valid, n = _infer_block(halo, model, grid, torch.as_tensor(w, dtype=torch.float32, device=device),
                                  batch_size=batch_size, tta_flips=tta_flips, scheme=scheme,
                                  autocast=amp_dtype(device, amp), cache=cache)
    return prob.cpu().numpy(), valid.cpu().numpy(), n


# ---------------------------------------------------------------------------------------------------
# the pipeline


class _Progress:
    """Windows done in one scene: a bar on a terminal, a log line every 30 s otherwise (batch jobs)."""

    def __init__(self, name: str, total: int, enabled: bool):
        self.name, self.total, self.done, self.skipped = name, total, 0, 0
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{name} windows", unit="win", leave=False, mininterval=1.0)

    def update(self, windows: int, skipped: int) -> None:
        self.done += windows + skipped
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(windows + skipped)
        elif self.enabled and time.perf_counter() - self.last >= PROGRESS_LOG_S:
            self.last = time.perf_counter()
            log.info("%s: %d of %d windows (%.0f%%, %d skipped as nodata), %.0f s", self.name,
                     min(self.done, self.total), self.total, 100.0 * min(self.done, self.total) / self.total,
                     self.skipped, self.last - self.t0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied into pinned host memory without blocking (wait on an event before use)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _write_block(dst: Any, block: Window, prob: torch.Tensor, valid: torch.Tensor, done: Any,
                 prob_dtype: str) -> None:
    if done is not None:
        done.synchronize()  # the device-to-host copies of this block are complete
    dst.write(encode_probability(prob.numpy(), prob_dtype), window=block)
    dst.write_mask(valid.numpy().view(np.uint8) * np.uint8(255), window=block)


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
    amp: bool = True,
    progress: bool = True,
    alongside: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Predict a whole scene into a probability COG at `out_path` (written atomically).

    `reader` is a `footprints.scenes.reader.SceneReader` (or anything with `.width`, `.height`, `.transform`,
    `.crs` and `.read(window) -> (rgb uint8 (3, h, w), valid bool (h, w))`); it is read from one background
    thread only. `model` is any callable from rgb float (B, 3, H, W) in 0..255 to logits (B, K, H, W) of the
    classes of `scheme`, on `device`; `amp`: bf16/fp16 autocast on CUDA. Band 1 is the building probability,
    band 2 (schemes with an interior class) the watershed seed score. Returns a small summary.

    `alongside(path)` (e.g. vectorising) runs on the finished probabilities while the COG is written from
    them on another thread (GDAL releases the GIL): `path` is the tiled intermediate, the same values, mask,
    transform and CRS as the COG, valid during the call only. Its return value is `summary["alongside"]`.
    """
    out_path = Path(out_path)
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    width, height = int(reader.width), int(reader.height)
    stride = window_stride(tile_size, overlap)
    grid = WindowGrid(width, height, tile_size, stride)
    weights = torch.as_tensor(ramp_weights(tile_size, stride), dtype=torch.float32, device=device)
    profile = raster_profile(width, height, reader.transform, reader.crs, prob_dtype, bands_of(scheme))
    blocks = list(iter_blocks(width, height, block_size))
    cache = WindowCache(grid, block_size) if len(blocks) > 1 else None
    autocast = amp_dtype(device, amp)
    name = str(getattr(reader, "scene_id", "scene"))
    bar = _Progress(name, grid.n_windows, progress and len(blocks) >= 4)
    t0 = time.perf_counter()
    n_windows = valid_px = empty_blocks = 0
    seen: set[tuple[int, int]] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel-space scenes: said once by the caller
        with atomic_path(out_path) as final_tmp:
            blocks_tmp = final_tmp.with_name(final_tmp.name + ".blocks")  # tiled intermediate, removed below
            try:
                with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
                    with contextlib.ExitStack() as stack:
                        dst = stack.enter_context(rasterio.open(blocks_tmp, "w", **profile))
                        writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="predict-write"))
                        writes: deque[Future] = deque()
                        halos = stack.enter_context(contextlib.closing(
                            prefetched(blocks, lambda b: _read_halo(reader, b, grid, pin=on_cuda), READ_AHEAD,
                                       name="predict-read")))
                        for halo in halos:
                            prob, valid, n = _infer_block(
                                halo, model, grid, weights, batch_size=batch_size, tta_flips=tta_flips,
                                scheme=scheme, autocast=autocast, cache=cache,
                            )  # fmt: skip
                            new = [o for o in halo.runs if o not in seen]
                            seen.update(new)
                            bar.update(n, sum(not halo.runs[o] for o in new))
                            n_windows += n
                            empty_blocks += int(halo.empty)
                            valid_px += halo.valid_px
                            done = None
                            if on_cuda:  # to pinned host memory without blocking; the writer waits for it
                                prob = _to_host(prob)
                                valid = _to_host(valid)
                                done = torch.cuda.Event()
                                done.record()
                            writes.append(writer.submit(_write_block, dst, halo.block, prob, valid, done, prob_dtype))
                            while len(writes) > WRITE_BEHIND:
                                writes.popleft().result()
                        while writes:
                            writes.popleft().result()
                    if alongside is None:
                        to_cog(blocks_tmp, final_tmp, prob_dtype)
                    else:
                        # leaving the pool waits for the COG, also when `alongside` raises
                        with ThreadPoolExecutor(1, thread_name_prefix="predict-cog") as cog_writer:
                            cog = cog_writer.submit(to_cog, blocks_tmp, final_tmp, prob_dtype)
                            beside = alongside(blocks_tmp)
                        cog.result()
            finally:
                bar.close()
                blocks_tmp.unlink(missing_ok=True)
    # every window with a valid pixel ran exactly once; the others never did
    skipped = grid.n_windows - n_windows
    seconds = time.perf_counter() - t0
    if bar.enabled:
        log.info("%s: %d windows run, %d skipped as nodata (%d empty blocks), %.1f s", name, n_windows, skipped,
                 empty_blocks, seconds)
    summary = {
        "prob": str(out_path),
        "width": width,
        "height": height,
        "windows": n_windows,
        "grid_windows": grid.n_windows,
        "skipped_windows": skipped,
        "empty_blocks": empty_blocks,
        "valid_px": valid_px,
        "seconds": seconds,
        "autocast": str(autocast).removeprefix("torch.") if autocast is not None else None,
    }
    if alongside is not None:
        summary["alongside"] = beside
    return summary
