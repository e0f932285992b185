"""`footprints bench vectorize`: the whole vectorisation against bare `rasterio.features.shapes`."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import rasterio.features
from affine import Affine

from ..vectorize import polygons_from_probability

log = logging.getLogger(__name__)


def synthetic_probability(size: int = 4096, n_blobs: int = 3000, seed: int = 0) -> np.ndarray:
    """uint8 probability raster with `n_blobs` building-like blobs (rectangles, some with holes/notches)."""
    rng = np.random.default_rng(seed)
    prob = (rng.random((size, size), dtype=np.float32) * 60).astype(np.uint8)  # background noise < 0.25
    for _ in range(n_blobs):
        h, w = rng.integers(6, 40, size=2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        prob[r:r + h, c:c + w] = rng.integers(140, 255)
        if h > 12 and w > 12 and rng.random() < 0.3:  # a courtyard
            prob[r + 4:r + h - 4, c + 4:c + w - 4] = 30
        if rng.random() < 0.5:  # an L-shaped notch so outlines are not all rectangles
            prob[r:r + h // 3, c:c + w // 3] = 20
    return prob


def bench_vectorize(cfg: Any, repeats: int = 3) -> dict[str, Any]:
    """Pixels/s of `polygons_from_probability` (all cleaning, `predict.block_size` blocks) vs bare `shapes`.

    Both run on the same 4096 x 4096 synthetic raster in one process, interleaved `repeats` times; the best
    time of each is kept (the machine is shared, the minimum is the least disturbed). The bare baseline is
    only `rasterio.features.shapes` on the precomputed mask (thresholding not even counted); ours starts
    from the probabilities. ratio = ours / bare pixels per second (target >= 0.5).
    """
    size = 4096
    prob = synthetic_probability(size=size, n_blobs=3000, seed=0)
    transform = Affine(0.5, 0, 680000.0, 0, -0.5, 7460000.0)  # 0.5 m pixels in UTM 23S (Rio de Janeiro)
    crs = "EPSG:32723"
    pcfg = getattr(cfg, "predict", None)
    hole = float(getattr(pcfg, "hole_area_m2", 4.0))
    simp = float(getattr(pcfg, "simplify_px", 1.0))
    block = int(getattr(pcfg, "block_size", 2048))
    mask = prob >= 128
    mask_u8 = mask.astype(np.uint8)
    t_bare = t_ours = math.inf
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        bare = list(rasterio.features.shapes(mask_u8, mask=mask, connectivity=4, transform=transform))
        t_bare = min(t_bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        gdf = polygons_from_probability(prob, transform, crs, threshold=128 / 255, min_area_m2=5.0,
                                        hole_area_m2=hole, simplify_px=simp, block_size=block, scene="bench")
        t_ours = min(t_ours, time.perf_counter() - t0)
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
    }
    log.info(
        "vectorize: %.2f Mpx/s with threshold, components, shapes, block merge, hole fill, simplify, "
        "make_valid, area filter in m2 and stats (%d polygons, best of %d: %.2f s); bare "
        "rasterio.features.shapes: %.2f Mpx/s (%d polygons, %.2f s); ratio %.2f",
        px / t_ours / 1e6, len(gdf), repeats, t_ours, px / t_bare / 1e6, len(bare), t_bare, t_bare / t_ours,
    )
    return result
