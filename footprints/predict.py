"""Stage 5, predict: whole scenes -> blended building probabilities (COG) -> footprint polygons.

The scene is covered by a fixed, scene-anchored grid of `tile_size` windows whose origins are `stride`
apart (`stride = floor(tile_size * (1 - overlap))`, the last window flush with the right/bottom edge).
Each window's probabilities are multiplied by a tapered weight (a linear ramp over the overlap on every
side, 1 in the middle) and accumulated with the weights; the blended value is `sum(w * p) / sum(w)`, so no
seam shows where windows meet.

The scene is processed in blocks of `block_size` pixels. A block reads once the union of all windows
that touch it (its halo), accumulates exactly those windows in the same global order as a whole-scene
run, and keeps only its own pixels: the result equals a one-block run, and memory is bounded by the block
size (plus the probabilities of the windows that straddle the next block row, kept by `WindowCache` so
that no window runs twice), whatever the scene size. Blocks are written one by one into a tiled GeoTIFF, which is then copied to a
Cloud-Optimised GeoTIFF (GDAL's COG driver: tiled, overviews, the COG layout). Invalid pixels (nodata,
outside the scene) are flagged in an internal mask band, so uint8 keeps the full 0-255 range
(probability = value / 255) and float16 stores the probability itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.transform
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from tqdm import tqdm

from .atomic import atomic_path, write_json
from .cluster import map_scenes
from .config import Config, DataConfig, TileConfig, config_from_dict
from .device import resolve_device
from .errors import FootprintsError, InputError, StageError, as_input_error
from .scenes import SceneSource

log = logging.getLogger(__name__)

# A model maps rgb float (B, 3, H, W) in 0..255 to logits (B, 2, H, W); any callable will do (tests).
Model = Callable[[torch.Tensor], torch.Tensor]

COG_BLOCK = 512  # internal tile size of the probability COG
UINT8_SCALE = 255.0


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


def iter_blocks(width: int, height: int, block_size: int) -> Iterator[Window]:
    """Row-major blocks of at most `block_size` x `block_size` pixels covering the scene."""
    block_size = max(1, int(block_size))
    for r in range(0, height, block_size):
        for c in range(0, width, block_size):
            yield Window(c, r, min(block_size, width - c), min(block_size, height - r))


def _touching(origins: np.ndarray, start: int, stop: int, tile_size: int) -> np.ndarray:
    """Origins of the windows that overlap [start, stop)."""
    return origins[(origins < stop) & (origins + tile_size > start)]


# ---------------------------------------------------------------------------------------------------
# inference


@torch.inference_mode()
def predict_batch(model: Model, rgb: np.ndarray, device: torch.device, tta_flips: bool = False) -> np.ndarray:
    """Building probability (B, H, W) float32 for uint8 rgb (B, 3, H, W); flips averaged when asked."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device=device, dtype=torch.float32)

    def prob(t: torch.Tensor) -> torch.Tensor:
        logits = model(t)
        return torch.softmax(logits.float(), dim=1)[:, 1]

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
) -> tuple[np.ndarray, np.ndarray, int]:
    """Blended probability of one block: (prob float32 (h, w), valid bool (h, w), windows run).

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
    acc = np.zeros((hh, hw), dtype=np.float64)
    wsum = np.zeros((hh, hw), dtype=np.float64)
    origins = [(int(r), int(c)) for r in rows for c in cols]
    probs: dict[tuple[int, int], np.ndarray] = {}
    todo = [o for o in origins if cache is None or not cache.has(o)]
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start : start + batch_size]
        batch = np.stack([rgb[:, r - hr0 : r - hr0 + t, c - hc0 : c - hc0 + t] for r, c in chunk])
        probs.update(zip(chunk, predict_batch(model, batch, device, tta_flips), strict=True))
    for o in origins:  # accumulate in global order, whether computed now or earlier
        p = probs[o] if o in probs else cache.take(o)  # type: ignore[union-attr]
        if cache is not None and o in probs:
            cache.offer(o, p)
        r, c = o[0] - hr0, o[1] - hc0
        acc[r : r + t, c : c + t] += weights * p
        wsum[r : r + t, c : c + t] += weights
    if cache is not None:
        cache.block_done()
    # keep the block's own pixels
    br, bc = r0 - hr0, c0 - hc0
    acc = acc[br : br + block.height, bc : bc + block.width]
    wsum = wsum[br : br + block.height, bc : bc + block.width]
    prob = (acc / np.maximum(wsum, 1e-12)).astype(np.float32)
    np.clip(prob, 0.0, 1.0, out=prob)
    valid = np.asarray(valid, dtype=bool)[br : br + block.height, bc : bc + block.width] & (wsum > 0)
    return prob, valid, len(todo)


def encode_probability(prob: np.ndarray, prob_dtype: str) -> np.ndarray:
    """Probability in [0, 1] -> stored values: uint8 round(p * 255), or float16 (stored as 16-bit float)."""
    if prob_dtype == "uint8":
        return np.rint(prob * UINT8_SCALE).astype(np.uint8)
    if prob_dtype == "float16":
        return prob.astype(np.float16).astype(np.float32)
    raise ValueError(f"prob_dtype must be 'uint8' or 'float16', got {prob_dtype!r}")


def read_probability(path: str | Path, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probability float32 in [0, 1], valid bool) of a probability raster written by `predict_scene`."""
    with rasterio.open(path) as src:
        values = src.read(1, window=window)
        valid = src.read_masks(1, window=window) > 0
    prob = values.astype(np.float32)
    if values.dtype == np.uint8:
        prob /= UINT8_SCALE
    return prob, valid


def _raster_profile(width: int, height: int, transform: Any, crs: Any, prob_dtype: str) -> dict[str, Any]:
    block = COG_BLOCK if min(width, height) >= COG_BLOCK else 256
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": "uint8" if prob_dtype == "uint8" else "float32",
        "transform": transform,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if crs is not None:
        profile["crs"] = crs
    if prob_dtype == "float16":
        profile["nbits"] = 16  # IEEE half floats inside a Float32 band (GDAL has no Float16 type here)
    return profile


def to_cog(src_path: Path, dst_path: Path, prob_dtype: str) -> None:
    """Copy a tiled GeoTIFF to a Cloud-Optimised GeoTIFF (overviews averaged, mask band kept)."""
    opts: dict[str, Any] = {
        "driver": "COG",
        "compress": "DEFLATE",
        "blocksize": COG_BLOCK,
        "overview_resampling": "average",
        "BIGTIFF": "IF_SAFER",
    }
    if prob_dtype == "float16":
        opts["nbits"] = 16
    rasterio.shutil.copy(str(src_path), str(dst_path), **opts)


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
) -> dict[str, Any]:
    """Predict a whole scene into a probability COG at `out_path` (written atomically).

    `reader` is a `footprints.scenes.SceneReader` (or anything with `.width`, `.height`, `.transform`,
    `.crs` and `.read(window) -> (rgb uint8 (3, h, w), valid bool (h, w))`); `model` any callable from
    rgb float (B, 3, H, W) in 0..255 to logits (B, 2, H, W). Returns a small summary.
    """
    out_path = Path(out_path)
    width, height = int(reader.width), int(reader.height)
    stride = window_stride(tile_size, overlap)
    grid = Grid(width, height, tile_size, stride)
    weights = ramp_weights(tile_size, stride)
    profile = _raster_profile(width, height, reader.transform, reader.crs, prob_dtype)
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
                                cache=cache,
                            )  # fmt: skip
                            n_windows += n
                            valid_px += int(valid.sum())
                            dst.write(encode_probability(prob, prob_dtype), 1, window=block)
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


def file_fingerprint(path: str | Path) -> str:
    """SHA-1 of a checkpoint's bytes: a retrained model invalidates old probabilities and calibrations."""
    h = hashlib.sha1()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# the stage: per-scene work (run by footprints.cluster.map_scenes), calibration, merged outputs


@dataclass(frozen=True)
class PredictSettings:
    """What a worker needs to predict one scene: small and picklable (the model is loaded in the worker)."""

    checkpoint: str
    fingerprint: str  # identity of the checkpoint: a retrained model invalidates old probabilities
    data: DataConfig
    tile: TileConfig  # size = the model's tile size, target_gsd = the model's training GSD
    overlap: float = 0.25
    batch_size: int = 8
    block_size: int = 2048
    tta_flips: bool = False
    prob_dtype: str = "uint8"
    device: str = "auto"
    hole_area_m2: float = 4.0
    simplify_px: float = 1.0

    def prob_params(self) -> dict[str, Any]:
        """What a probability raster depends on; a change redoes it even without --overwrite."""
        d = self.data
        return json.loads(json.dumps({
            "checkpoint": self.fingerprint, "tile_size": self.tile.size, "target_gsd": self.tile.target_gsd,
            "overlap": self.overlap, "tta_flips": self.tta_flips, "prob_dtype": self.prob_dtype,
            "bands": list(d.bands), "stretch_percentiles": list(d.stretch_percentiles), "nodata": d.nodata,
            "geotransforms": d.geotransforms,
        }))  # fmt: skip


# one model per worker process, loaded on first use (map_scenes ships only the checkpoint path)
_MODELS: dict[tuple[str, str], Any] = {}


def _model_for(settings: PredictSettings) -> Model:
    key = (settings.checkpoint, settings.device)
    if key not in _MODELS:
        from .segmenter import load_segmenter

        _MODELS.clear()
        _MODELS[key] = load_segmenter(settings.checkpoint, resolve_device(settings.device))[0]
    return _MODELS[key]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ensure_probability(
    reader: Any, settings: PredictSettings, out_dir: Path, overwrite: bool, model: Model | None
) -> tuple[Path, dict[str, Any], bool]:
    """The scene's probability COG (reused when its marker says it was made with the same parameters)."""
    sid = reader.scene_id
    prob_path = out_dir / f"{sid}_prob.tif"
    marker = out_dir / f"{sid}.json"
    old = None if overwrite else _read_json(marker)
    params = settings.prob_params()
    if old and old.get("prob_params") == params and prob_path.is_file():
        return prob_path, old.get("prob") or {}, True
    if reader.crs is None:
        log.warning("%s: no georeference: probabilities and polygons are in pixel coordinates", sid)
    summary = predict_scene(
        reader, model if model is not None else _model_for(settings), prob_path,
        tile_size=settings.tile.size, overlap=settings.overlap, batch_size=settings.batch_size,
        block_size=settings.block_size, tta_flips=settings.tta_flips, prob_dtype=settings.prob_dtype,
        device=resolve_device(settings.device),
    )  # fmt: skip
    write_json(marker, {"scene_id": sid, "prob_params": params, "prob": summary, "vector": None})
    return prob_path, summary, False


def predict_source(
    source: SceneSource,
    settings: PredictSettings,
    out_dir: str,
    threshold: float,
    min_area_m2: float,
    overwrite: bool = False,
    model: Model | None = None,
) -> dict[str, Any]:
    """One scene: probability COG, then polygons as `<scene>.geojson` (RFC 7946) and `<scene>.gpkg`.

    Each file is written atomically and `<scene>.json` (the marker) last, so a rerun skips a finished
    scene, re-vectorises one whose threshold or minimum area changed, and redoes one whose model or
    inference parameters changed.
    """
    from .scenes import open_scene
    from .vectorize import gpkg_crs_for_raster, polygons_from_probability, write_geojson, write_gpkg

    out = Path(out_dir)
    sid = source.scene_id
    geojson, gpkg, marker = out / f"{sid}.geojson", out / f"{sid}.gpkg", out / f"{sid}.json"
    vector = {"threshold": threshold, "min_area_m2": min_area_m2, "hole_area_m2": settings.hole_area_m2,
              "simplify_px": settings.simplify_px}
    old = None if overwrite else _read_json(marker)
    if (old and old.get("prob_params") == settings.prob_params() and old.get("vector") == vector
            and geojson.is_file() and gpkg.is_file() and (out / f"{sid}_prob.tif").is_file()):
        return {**old, "skipped": True}
    with open_scene(source, settings.data, settings.tile) as reader:
        prob_path, prob_summary, reused = _ensure_probability(reader, settings, out, overwrite, model)
        t0 = time.perf_counter()
        gdf = polygons_from_probability(
            prob_path, threshold=threshold, min_area_m2=min_area_m2, hole_area_m2=settings.hole_area_m2,
            simplify_px=settings.simplify_px, block_size=settings.block_size, scene=sid,
            pixel_size_m=reader.gsd_m,
        )  # fmt: skip
        write_geojson(gdf, geojson)
        write_gpkg(gdf, gpkg, crs=gpkg_crs_for_raster(reader.transform, reader.crs, reader.width, reader.height))
        result = {
            "scene_id": sid,
            "prob_params": settings.prob_params(),
            "prob": prob_summary,
            "vector": vector,
            "polygons": len(gdf),
            "crs": "" if reader.crs is None else reader.crs.to_string(),
            "area_km2": _area_km2(reader),
            "vector_seconds": time.perf_counter() - t0,
            "geojson": str(geojson),
            "gpkg": str(gpkg),
            "prob_reused": reused,
        }
    write_json(marker, result)
    return {**result, "skipped": False}


def _area_km2(reader: Any) -> float | None:
    gsd = getattr(reader, "gsd_m", None)
    return None if gsd is None else reader.width * reader.height * gsd * gsd / 1e6


# ---------------------------------------------------------------------------------------------------
# calibration: threshold x minimum area on the validation split


def calibration_counts(
    source: SceneSource,
    settings: PredictSettings,
    out_dir: str,
    thresholds: Sequence[float],
    min_areas: Sequence[float],
    iou_threshold: float = 0.5,
    overwrite: bool = False,
    model: Model | None = None,
) -> dict[str, Any]:
    """Confusion counts of one labelled validation scene at every grid point (summed by the caller).

    Pixel counts (tp, fp, fn, tn) per threshold over the scene's valid pixels; polygon counts (tp, fp,
    fn) per (threshold, min_area) from one-to-one matching of predicted to true polygons at IoU >= 0.5.
    """
    from .evaluate import clean_truth, match_polygons, scene_truth_polygons
    from .metrics import confusion
    from .scenes import open_scene
    from .vectorize import gpkg_crs_for_raster, polygons_from_probability, threshold_mask

    out = Path(out_dir)
    with open_scene(source, settings.data, settings.tile) as reader:
        if not reader.has_labels:
            raise InputError(source.image, "validation scene without labels: cannot calibrate on it")
        prob_path, _, _ = _ensure_probability(reader, settings, out, overwrite, model)
        pixel = {float(t): np.zeros(4, dtype=np.int64) for t in thresholds}
        with rasterio.open(prob_path) as src:
            for block in iter_blocks(reader.width, reader.height, settings.block_size):
                raw = src.read(1, window=block)
                ok = src.read_masks(1, window=block) > 0
                truth = reader.truth_mask(block)
                truth = np.where(ok, truth, 255)
                for t in thresholds:
                    pixel[float(t)] += np.asarray(confusion(threshold_mask(raw, t), truth, ignore=255))
        # match as the evaluate stage does: in the scene's projected CRS (its UTM zone for lon/lat scenes)
        metric_crs = gpkg_crs_for_raster(reader.transform, reader.crs, reader.width, reader.height)
        # the same truth as the evaluate stage: mask labels are vectorised with the predictions' cleaning
        truth_gdf = scene_truth_polygons(
            reader, source, settings.hole_area_m2, settings.simplify_px, settings.block_size
        )
        if metric_crs is not None and len(truth_gdf):
            truth_gdf = truth_gdf.to_crs(metric_crs)
        truth_geoms = clean_truth(np.asarray(truth_gdf.geometry.values, dtype=object))
        polygon: list[list[float]] = []
        for t in thresholds:
            gdf = polygons_from_probability(
                prob_path, threshold=float(t), min_area_m2=0.0, hole_area_m2=settings.hole_area_m2,
                simplify_px=settings.simplify_px, block_size=settings.block_size, scene=reader.scene_id,
                pixel_size_m=reader.gsd_m,
            )  # fmt: skip
            if metric_crs is not None and len(gdf):
                gdf = gdf.to_crs(metric_crs)
            area = gdf["area_m2"].to_numpy(dtype=np.float64)
            geoms = np.asarray(gdf.geometry.values, dtype=object)
            for a in min_areas:
                keep = ~(area < a)  # NaN area (pixel space without GSD) is never filtered
                m = match_polygons(geoms[keep], truth_geoms, iou_threshold)
                polygon.append([float(t), float(a), m.tp, m.fp, m.fn])
    return {
        "scene_id": source.scene_id,
        "pixel": [[float(t), *map(int, c)] for t, c in pixel.items()],
        "polygon": polygon,
    }


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def choose_calibration(pixel: Sequence[Sequence[float]], polygon: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The grid point with the best polygon F1 (ties: better pixel F1, smaller minimum area, threshold
    nearer 0.5). `pixel`: rows (threshold, tp, fp, fn, tn) summed over scenes; `polygon`: rows
    (threshold, min_area, tp, fp, fn) summed over scenes. Returns the choice and the whole table."""
    pix = {float(r[0]): r[1:] for r in pixel}
    table = []
    for t, a, tp, fp, fn in polygon:
        ptp, pfp, pfn, _ = pix[float(t)]
        table.append({
            "threshold": float(t), "min_area_m2": float(a),
            "polygon_f1": _f1(tp, fp, fn), "polygon_tp": int(tp), "polygon_fp": int(fp), "polygon_fn": int(fn),
            "pixel_f1": _f1(ptp, pfp, pfn),
            "pixel_iou": ptp / (ptp + pfp + pfn) if ptp + pfp + pfn > 0 else 0.0,
        })  # fmt: skip
    if not table:
        raise ValueError("choose_calibration: empty grid")
    best = max(table, key=lambda r: (r["polygon_f1"], r["pixel_f1"], -r["min_area_m2"], -abs(r["threshold"] - 0.5)))
    return {
        "threshold": best["threshold"],
        "min_area_m2": best["min_area_m2"],
        "criterion": "polygon F1 at IoU >= 0.5 (ties: pixel F1, then the smaller minimum area)",
        "best": best,
        "grid": table,
    }


def _sum_counts(parts: Sequence[dict[str, Any]]) -> tuple[list[list[float]], list[list[float]]]:
    pixel: dict[float, np.ndarray] = {}
    polygon: dict[tuple[float, float], np.ndarray] = {}
    for part in parts:
        for t, *c in part["pixel"]:
            pixel[t] = pixel.get(t, 0) + np.asarray(c, dtype=np.int64)
        for t, a, *c in part["polygon"]:
            polygon[(t, a)] = polygon.get((t, a), 0) + np.asarray(c, dtype=np.int64)
    return ([[t, *c.tolist()] for t, c in pixel.items()], [[t, a, *c.tolist()] for (t, a), c in polygon.items()])


def _log_scene_error(source: SceneSource, err: BaseException) -> None:
    log.error("%s", err if isinstance(err, FootprintsError) else as_input_error(err, source.image))


def resolve_calibration(
    cfg: Config,
    settings: PredictSettings,
    checkpoint: Path | None,
    overwrite: bool = False,
    model: Model | None = None,
    use_run: bool = True,
) -> dict[str, Any]:
    """Threshold and minimum area: from the config when both are set, else a stored calibration made for
    this checkpoint and grid, else a grid search on the validation split (stored in
    `outputs/<name>/predict/calibration.json` and beside the checkpoint), else 0.5 / 0 m2 with a warning.

    `use_run=False` (files given without a config) looks only beside the checkpoint, never at a run folder.
    """
    pcfg = cfg.predict
    if pcfg.threshold is not None and pcfg.min_area_m2 is not None:
        return {"threshold": pcfg.threshold, "min_area_m2": pcfg.min_area_m2, "source": "config"}
    thresholds = [pcfg.threshold] if pcfg.threshold is not None else [float(t) for t in pcfg.threshold_grid]
    areas = [pcfg.min_area_m2] if pcfg.min_area_m2 is not None else [float(a) for a in pcfg.min_area_grid]
    key = {"prob_params": settings.prob_params(), "threshold_grid": thresholds, "min_area_grid": areas,
           "hole_area_m2": settings.hole_area_m2, "simplify_px": settings.simplify_px,
           "iou_threshold": cfg.evaluate.iou_threshold}
    stage_path = cfg.stage_dir("predict") / "calibration.json"
    beside = checkpoint.with_name(checkpoint.stem + ".calibration.json") if checkpoint is not None else None
    stored = [(p, _read_json(p)) for p in (stage_path if use_run else None, beside) if p is not None]
    if not overwrite:
        for path, cal in stored:
            if cal and cal.get("key") == key:
                log.info("calibration: threshold %.2f, min area %.1f m2 (from %s)", cal["threshold"],
                         cal["min_area_m2"], path)
                return {**cal, "source": str(path)}
    val = _split_sources(cfg, "val") if use_run and (cfg.stage_dir("tile") / "manifest.csv").is_file() else []
    if not val:
        for path, cal in stored:
            if cal and "threshold" in cal:
                made_for = ((cal.get("key") or {}).get("prob_params") or {}).get("checkpoint")
                if made_for == settings.fingerprint:
                    log.info("calibration: threshold %.2f, min area %.1f m2, chosen for this checkpoint (%s)",
                             cal["threshold"], cal["min_area_m2"], path)
                else:
                    log.warning("calibration: no validation scenes here; using %s, made for another "
                                "checkpoint", path)
                return {**cal, "source": str(path)}
        log.warning("calibration: no validation scenes and no stored calibration: threshold %.2f, min area "
                    "%.1f m2 (set predict.threshold / predict.min_area_m2 to choose)", thresholds[0], areas[0])
        default_t = pcfg.threshold if pcfg.threshold is not None else 0.5
        default_a = pcfg.min_area_m2 if pcfg.min_area_m2 is not None else 0.0
        return {"threshold": default_t, "min_area_m2": default_a, "source": "default"}
    log.info("calibration: grid search over %d thresholds x %d minimum areas on %d validation scenes",
             len(thresholds), len(areas), len(val))
    func = partial(calibration_counts, settings=settings, out_dir=str(cfg.stage_dir("predict") / "val"),
                   thresholds=thresholds, min_areas=areas, iou_threshold=cfg.evaluate.iou_threshold,
                   overwrite=overwrite, model=model)
    parts = []
    for source, result, err in map_scenes(cfg.cluster, func, val, desc="calibrate"):
        if err is not None:
            _log_scene_error(source, err)
        else:
            parts.append(result)
    if not parts:
        raise StageError("calibration: no validation scene could be used (see the errors above); set "
                         "predict.threshold and predict.min_area_m2 to skip calibration")
    pixel, polygon = _sum_counts(parts)
    cal = choose_calibration(pixel, polygon)
    cal.update(key=key, scenes=sorted(p["scene_id"] for p in parts), checkpoint=str(checkpoint or ""))
    write_json(stage_path, cal)
    if beside is not None:
        try:
            write_json(beside, cal)
        except OSError as err:  # a read-only checkpoint folder: the stage copy is enough
            log.warning("calibration: cannot write %s (%s)", beside, err.strerror or err)
    b = cal["best"]
    log.info("calibration: threshold %.2f, min area %.1f m2 -> polygon F1 %.3f, pixel F1 %.3f on %d val scenes",
             cal["threshold"], cal["min_area_m2"], b["polygon_f1"], b["pixel_f1"], len(parts))
    return {**cal, "source": str(stage_path)}


def _split_sources(cfg: Config, split: str) -> list[SceneSource]:
    """The scenes of one split of the tile manifest, found again among `data.root`'s scenes."""
    from .scenes import discover_scenes
    from .tiling import read_manifest

    df = read_manifest(cfg.stage_dir("tile"))
    ids = list(dict.fromkeys(df.loc[df["split"] == split, "scene_id"]))
    if not ids:
        return []
    found = {s.scene_id: s for s in discover_scenes(cfg.data)}
    out = []
    for sid in ids:
        if sid in found:
            out.append(found[sid])
        else:
            log.error("%s: scene %s of the tile manifest is no longer under data.root", cfg.data.root, sid)
    return out


def _checkpoint_info(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, config) of a segmenter checkpoint, read lazily (mmap) without building the model."""
    if not path.is_file():
        raise StageError(f"{path}: no segmenter checkpoint (run train-segmenter first, or give --checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad or foreign file
        raise InputError(path, f"not a loadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "meta" not in ckpt:
        raise InputError(path, "not a segmenter checkpoint (no 'meta')")
    return dict(ckpt["meta"]), dict(ckpt.get("config") or {})


def build_settings(cfg: Config, checkpoint: Path | None, meta: dict[str, Any], ckpt_config: dict[str, Any],
                   fingerprint: str) -> PredictSettings:
    """Worker settings: the model's tile size and GSD from its meta; scene reading from the config given,
    or, when none was given, from the config stored in the checkpoint (band choice, stretch, nodata)."""
    data_cfg = cfg.data
    if cfg.source == "<defaults>" and ckpt_config.get("data"):
        data_cfg = config_from_dict({"data": ckpt_config["data"]}).data
    size = int(meta.get("tile_size") or cfg.tile.size)
    target_gsd = meta["target_gsd"] if "target_gsd" in meta else cfg.tile.target_gsd
    pcfg = cfg.predict
    return PredictSettings(
        checkpoint=str(checkpoint or ""), fingerprint=fingerprint, data=data_cfg,
        tile=TileConfig(size=size, stride=size, target_gsd=target_gsd), overlap=pcfg.overlap,
        batch_size=pcfg.batch_size, block_size=pcfg.block_size, tta_flips=pcfg.tta_flips,
        prob_dtype=pcfg.prob_dtype, device=pcfg.device, hole_area_m2=pcfg.hole_area_m2,
        simplify_px=pcfg.simplify_px,
    )  # fmt: skip


def merge_outputs(results: Sequence[dict[str, Any]], geojson_path: Path, gpkg_path: Path) -> int:
    """Merged GeoJSON (RFC 7946) and GeoPackage of all scenes; returns the number of polygons.

    The GeoPackage keeps the scenes' CRS when they share one, else the UTM zone of the merged layer's
    centre (`area_m2` stays the per-scene value measured in each scene's own UTM/projected CRS).
    Pixel-space scenes are merged only when every scene is in pixel space.
    """
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    from .vectorize import empty_footprints, write_geojson, write_gpkg

    results = sorted(results, key=lambda r: r["scene_id"])
    geo = [r for r in results if r.get("crs")]
    pixel = [r for r in results if not r.get("crs")]
    if geo and pixel:
        log.warning("merged footprints leave out %d scene(s) in pixel coordinates (%s); their own files remain",
                    len(pixel), ", ".join(r["scene_id"] for r in pixel[:5]))
    chosen = geo or pixel
    frames = [pyogrio.read_dataframe(r["geojson"]) for r in chosen]
    frames = [f for f in frames if len(f)]
    crs = 4326 if geo else None
    merged = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs) if frames
              else empty_footprints(crs))
    write_geojson(merged, geojson_path)
    gpkg_frames = [pyogrio.read_dataframe(r["gpkg"]) for r in chosen]
    crss = {f.crs.to_string() if f.crs is not None else "" for f in gpkg_frames}
    if len(crss) == 1:
        nonempty = [f for f in gpkg_frames if len(f)]
        one = gpkg_frames[0].crs
        layer = (gpd.GeoDataFrame(pd.concat(nonempty, ignore_index=True), geometry="geometry", crs=one)
                 if nonempty else empty_footprints(one))
        write_gpkg(layer, gpkg_path, crs=one)
    else:
        write_gpkg(merged, gpkg_path)
    return len(merged)


def run_predict(
    cfg: Config,
    overwrite: bool = False,
    checkpoint: str | Path | None = None,
    inputs: Sequence[str | Path] | None = None,
    output: str | Path | None = None,
    model: Model | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The predict stage: the test split (or `inputs`) -> probability COGs, per-scene and merged polygons.

    `model`/`meta` inject a model instead of loading the checkpoint (tests; the model must then be
    picklable when `cluster.workers > 0`). Returns {"geojson", "gpkg", "scenes", "failed", ...}.
    """
    t0 = time.perf_counter()
    pcfg = cfg.predict
    ckpt: Path | None = None
    ckpt_config: dict[str, Any] = {}
    if model is None:
        ckpt = Path(checkpoint or pcfg.checkpoint or cfg.stage_dir("train-segmenter") / "best.pt")
        meta, ckpt_config = _checkpoint_info(ckpt)
        fingerprint = file_fingerprint(ckpt)
    else:
        meta = dict(meta or {})
        fingerprint = str(meta.get("fingerprint", "injected-model"))
    settings = build_settings(cfg, ckpt, meta, ckpt_config, fingerprint)

    sources: list[SceneSource] = []
    bad_inputs = 0
    if inputs:
        from .scenes import sources_from_paths

        for item in inputs:
            try:
                sources += sources_from_paths([item], settings.data)
            except FootprintsError as err:
                log.error("%s", err)
                bad_inputs += 1
        geojson = Path(output) if output else cfg.stage_dir("predict") / "input" / "footprints.geojson"
        scene_dir = geojson.parent / f"{geojson.stem}_scenes" if output else geojson.parent
    else:
        sources = _split_sources(cfg, pcfg.split)
        scene_dir = cfg.stage_dir("predict")
        geojson = Path(output) if output else scene_dir / "footprints.geojson"
    if geojson.suffix.lower() not in (".geojson", ".json"):
        raise StageError(f"{geojson}: --output must be a .geojson path (the GeoPackage goes beside it)")
    gpkg = geojson.with_suffix(".gpkg")
    if not sources:
        where = "the inputs given" if inputs else f"split {pcfg.split!r} of {cfg.stage_dir('tile')}"
        raise StageError(f"predict: no scenes in {where}")
    log.info("predict: %d scene(s), tile %d px, overlap %.0f%%, block %d px -> %s", len(sources),
             settings.tile.size, 100 * settings.overlap, settings.block_size, scene_dir)

    # files given without a config: the run folders under ./outputs belong to some other run
    use_run = not (inputs and cfg.source == "<defaults>")
    cal = resolve_calibration(cfg, settings, ckpt, overwrite=overwrite, model=model, use_run=use_run)
    func = partial(predict_source, settings=settings, out_dir=str(scene_dir), threshold=float(cal["threshold"]),
                   min_area_m2=float(cal["min_area_m2"]), overwrite=overwrite, model=model)
    results, failed = [], bad_inputs
    for source, result, err in map_scenes(cfg.cluster, func, sources, desc="predict"):
        if err is not None:
            _log_scene_error(source, err)
            failed += 1
        else:
            results.append(result)
    if not results:
        raise StageError(f"predict: no scene could be predicted ({failed} failed; see the errors above)")
    n_polygons = merge_outputs(results, geojson, gpkg)
    skipped = sum(bool(r.get("skipped")) for r in results)
    summary = {
        "geojson": str(geojson),
        "gpkg": str(gpkg),
        "scenes": len(results),
        "failed": failed,
        "skipped": skipped,
        "polygons": n_polygons,
        "threshold": float(cal["threshold"]),
        "min_area_m2": float(cal["min_area_m2"]),
        "calibration": cal.get("source"),
        "scene_dir": str(scene_dir),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("predict: %d scene(s) (%d skipped as done, %d failed), %d polygons -> %s and %s", len(results),
             skipped, failed, n_polygons, geojson, gpkg)
    return summary


# ---------------------------------------------------------------------------------------------------
# benchmark


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible, {model})"


def bench_predict(cfg: Config) -> dict[str, Any]:
    """Whole-scene inference throughput with the real Segmenter (random weights, all 14 layers, hidden 1024).

    A synthetic 640 x 640 px GeoTIFF at 0.5 m (UTM) is read by the scene reader and predicted end to end
    (windows of 256 px at `predict.overlap`, batches of `predict.batch_size`, blending, block writing, COG).
    640 = 256 + 2 * 192 gives a regular 3 x 3 grid at 25% overlap, the same windows per pixel as a large
    scene's interior would need about (1.44 vs 1.78 for an infinite scene at 25% overlap): kept this small
    so the benchmark ends in about a minute on a 2-core CPU. Set `predict.device` for a GPU.
    """
    import tempfile

    from .backbone import hypercolumn_channels, resolve_layers
    from .scenes import SceneSource, open_scene
    from .segmenter import build_segmenter

    size, gsd, tile = 640, 0.5, 256
    device = resolve_device(cfg.predict.device)
    layers = resolve_layers("all")
    meta = {"layers": layers, "in_channels": hypercolumn_channels(layers), "hidden": 1024, "stride": 2,
            "backbone": {"weights": "random", "normalization": "torchvision"}}
    torch.manual_seed(0)
    model = build_segmenter(meta).to(device).eval()
    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 120, size=(3, size, size), dtype=np.uint8)
    for _ in range(40):  # bright roofs on textured ground
        r, c = rng.integers(0, size - 30, size=2)
        rgb[:, r : r + rng.integers(8, 30), c : c + rng.integers(8, 30)] = rng.integers(150, 250)
    transform = rasterio.transform.from_origin(680000.0, 7460000.0, gsd, gsd)
    with tempfile.TemporaryDirectory(prefix="footprints-bench-predict-") as tmp:
        scene = Path(tmp) / "images" / "bench.tif"
        scene.parent.mkdir()
        with rasterio.open(scene, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           crs="EPSG:32723", transform=transform) as dst:
            dst.write(rgb)
        data_cfg = DataConfig(root=tmp, format="geotiff")
        t0 = time.perf_counter()
        with open_scene(SceneSource(scene), data_cfg, TileConfig(size=tile, stride=tile)) as reader:
            summary = predict_scene(
                reader, model, Path(tmp) / "bench_prob.tif", tile_size=tile, overlap=cfg.predict.overlap,
                batch_size=cfg.predict.batch_size, block_size=cfg.predict.block_size, device=device,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
    km2 = size * size * gsd * gsd / 1e6
    result = {
        "bench": "predict",
        "km2_per_hour": round(km2 / (seconds / 3600.0), 3),
        "megapixels_per_s": round(size * size / seconds / 1e6, 4),
        "device": _device_name(device),
        "scene_px": [size, size],
        "gsd_m": gsd,
        "windows": summary["windows"],
        "window_px": tile,
        "overlap": cfg.predict.overlap,
        "batch_size": cfg.predict.batch_size,
        "seconds": round(seconds, 2),
        "seconds_per_window": round(seconds / summary["windows"], 3),
        # a large scene needs one window per stride x stride pixels: the steady-state rate from the time
        # per window measured here (derived, not timed on a large scene)
        "km2_per_hour_large_scene_est": round(
            window_stride(tile, cfg.predict.overlap) ** 2 * gsd * gsd / 1e6 / (seconds / summary["windows"]) * 3600, 3
        ),
    }
    log.info(
        "predict: %dx%d px scene at %.1f m (%.3f km2) in %.1f s on %s: %d windows of %d px at %.0f%% overlap, "
        "%.3f Mpx/s, %.2f km2/hour (reading, inference, blending, COG writing included)",
        size, size, gsd, km2, seconds, result["device"], summary["windows"], tile, 100 * cfg.predict.overlap,
        result["megapixels_per_s"], result["km2_per_hour"],
    )
    return result
