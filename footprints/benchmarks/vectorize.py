"""`footprints bench vectorize`: the whole vectorisation against bare `rasterio.features.shapes`, and beside
it the same raster split into buildings (seeded watershed) and regularised."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import rasterio.features
from affine import Affine

from ..polygons.regularize import regularize_footprints
from ..polygons.vectorize import polygons_from_probability

log = logging.getLogger(__name__)


def synthetic_probability(size: int = 4096, n_blobs: int = 3000, seed: int = 0, pair_fraction: float = 0.3,
                          with_seed: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """uint8 probability raster with `n_blobs` building-like blobs (rectangles, some with holes/notches);
    a `pair_fraction` of them have a second building built against their right wall (one blob, two
    buildings). `with_seed`: also the seed score band, the interior probability a model with an interior
    class gives (each building's body 2 px inside its outline), as (prob, seed)."""
    rng = np.random.default_rng(seed)
    prob = (rng.random((size, size), dtype=np.float32) * 60).astype(np.uint8)  # background noise < 0.25
    interior = np.zeros((size, size), np.uint8)
    for _ in range(n_blobs):
        h, w = rng.integers(6, 40, size=2)
        w2 = int(rng.integers(6, 40)) if rng.random() < pair_fraction else 0
        r, c = rng.integers(0, size - h), rng.integers(0, size - w - w2)
        for cc, ww in ((c, w), (c + w, w2)) if w2 else ((c, w),):
            prob[r:r + h, cc:cc + ww] = rng.integers(140, 255)
            interior[r + 2:r + h - 2, cc + 2:cc + ww - 2] = rng.integers(180, 255)
        if h > 12 and w > 12 and rng.random() < 0.3:  # a courtyard
            prob[r + 4:r + h - 4, c + 4:c + w - 4] = 30
            interior[r + 2:r + h - 2, c + 2:c + w - 2] = 0
        if rng.random() < 0.5:  # an L-shaped notch so outlines are not all rectangles
            prob[r:r + h // 3, c:c + w // 3] = 20
            interior[r:r + h // 3 + 2, c:c + w // 3 + 2] = 0
    return (prob, interior) if with_seed else prob


def blobs_for(size: int) -> int:
    """The bench's number of blobs on a `size` px raster: 3,000 on 4096 px, the same density elsewhere."""
    return round(3000 * (size / 4096) ** 2)


def bench_vectorize(cfg: Any, repeats: int = 3, size: int = 4096) -> dict[str, Any]:
    """Pixels/s of `polygons_from_probability` (all cleaning, `predict.block_size` blocks) vs bare `shapes`.

    All run on the same `size` x `size` synthetic raster (3,000 blobs on 4096 px, as dense on others) in one process, interleaved `repeats` times; the best
    time of each is kept (the machine is shared, the minimum is the least disturbed). The bare baseline is
    only `rasterio.features.shapes` on the precomputed mask (thresholding not even counted); ours starts
    from the probabilities. ratio = ours / bare pixels per second (target >= 0.5), connected components,
    no regularisation. Beside it: `watershed_ratio`, the same with touching buildings split by the seeded
    watershed (seed band: each building's interior), and `regularized_ratio`, watershed + regularisation
    of its polygons (`footprints.polygons.regularize`, one core; timed once, it is the slow part).
    """
    prob, seed_band = synthetic_probability(size=size, n_blobs=blobs_for(size), seed=0, with_seed=True)
    transform = Affine(0.5, 0, 680000.0, 0, -0.5, 7460000.0)  # 0.5 m pixels in UTM 23S (Rio de Janeiro)
    crs = "EPSG:32723"
    pcfg = getattr(cfg, "predict", None)
    hole = float(getattr(pcfg, "hole_area_m2", 4.0))
    simp = float(getattr(pcfg, "simplify_px", 1.0))
    block = int(getattr(pcfg, "block_size", 2048))
    args = dict(threshold=128 / 255, min_area_m2=5.0, hole_area_m2=hole, simplify_px=simp, block_size=block,
                scene="bench")
    mask = prob >= 128
    mask_u8 = mask.astype(np.uint8)
    t_bare = t_ours = t_ws = math.inf
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        bare = list(rasterio.features.shapes(mask_u8, mask=mask, connectivity=4, transform=transform))
        t_bare = min(t_bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        gdf = polygons_from_probability(prob, transform, crs, **args)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        ws = polygons_from_probability(prob, transform, crs, seed_threshold=0.5, seed=seed_band, **args)
        t_ws = min(t_ws, time.perf_counter() - t0)
    t0 = time.perf_counter()
    reg = regularize_footprints(ws, pixel_size_m=0.5)
    t_reg = time.perf_counter() - t0
    px = size * size
    result = {
        "bench": "vectorize",
        "ratio": round(t_bare / t_ours, 3),
        "pixels_per_s": round(px / t_ours),
        "bare_pixels_per_s": round(px / t_bare),
        "pixels": px,
        "bare_polygons": len(bare),
        "polygons": len(gdf),
        "block_size": block,
        "seconds": round(t_ours, 3),
        "bare_seconds": round(t_bare, 3),
        "watershed_ratio": round(t_bare / t_ws, 3),
        "watershed_pixels_per_s": round(px / t_ws),
        "watershed_polygons": len(ws),
        "watershed_seconds": round(t_ws, 3),
        "regularized_ratio": round(t_bare / (t_ws + t_reg), 3),
        "regularized_pixels_per_s": round(px / (t_ws + t_reg)),
        "regularize_seconds": round(t_reg, 3),
        "regularize_ms_per_polygon": round(1e3 * t_reg / max(len(ws), 1), 3),
        "regularized_kept_raw": int(reg.attrs["regularize"]["kept_raw"]),
        "regularized_median_iou": round(float(np.median(reg["reg_iou"])), 3) if len(reg) else None,
    }
    log.info(
        "vectorize: %.2f Mpx/s with threshold, components, shapes, block merge, hole fill, simplify, "
        "make_valid, area filter in m2 and stats (%d polygons, best of %d: %.2f s); bare "
        "rasterio.features.shapes: %.2f Mpx/s (%d polygons, %.2f s); ratio %.2f. With the seeded watershed: "
        "%.2f Mpx/s (%d polygons, %.2f s), ratio %.2f; regularised too: %.2f Mpx/s (%.2f s, %.2f ms per "
        "polygon, raw kept for %d), ratio %.3f",
        px / t_ours / 1e6, len(gdf), repeats, t_ours, px / t_bare / 1e6, len(bare), t_bare, t_bare / t_ours,
        px / t_ws / 1e6, len(ws), t_ws, t_bare / t_ws, px / (t_ws + t_reg) / 1e6, t_reg,
        result["regularize_ms_per_polygon"], result["regularized_kept_raw"], t_bare / (t_ws + t_reg),
    )
    return result
