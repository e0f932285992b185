"""`footprints bench predict`: whole-scene inference throughput with the real segmenter (random weights)."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.transform
import torch

from ..backbone import hypercolumn_channels, resolve_layers
from ..config import Config, DataConfig, TileConfig
from ..device import resolve_device
from ..inference import predict_scene, window_stride
from ..scenes import open_scene
from ..segmenter import build_segmenter
from ..sources import SceneSource

log = logging.getLogger(__name__)


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
