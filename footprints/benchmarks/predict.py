"""`footprints bench predict`: whole-scene inference on a large synthetic scene, three ways in one run.

- `km2_per_hour`: end to end, the real segmenter (random weights, all 14 layers, hidden 1024, the classes of
  `tile.target`): reading, inference, blending, the probability COG, and vectorising (`predict.instances`:
  the seeded watershed for K-class models) while the COG is written, as the predict stage does.
  Regularisation (a per-polygon post-process) is not included.
- `model_only_km2_per_hour`: the network alone (forward + sync, same autocast and batch) on the same windows,
  already on the device: what the pipeline could reach if everything around the model were free. Like the I/O
  rate, the better of two passes (one before and one after the end-to-end run).
- `io_km2_per_hour`: the same pipeline with a null model (fixed logits, no computation): reading, window
  copies, probabilities, blending, writing the COG and vectorising alone, over the whole scene.

The scene is `predict.bench_scene_px` square at 0.5 m (UTM), a tiled, deflate-compressed 3-band GeoTIFF made by
the bench: textured ground and bright roofs (about 900 per km2). The real network runs on the top-left
`predict.bench_model_px` square of it (0 = all of it: on a 2-core CPU the whole 8192 px scene costs the
model ~15 minutes per pass, hence the option). Windows of 256 px at `predict.overlap`, batches of
`predict.batch_size`, blocks of `predict.block_size`, autocast per `predict.amp` on CUDA.
"""

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
from rasterio.windows import Window

from ..backbone import hypercolumn_channels, resolve_layers
from ..config import Config, DataConfig, TileConfig
from ..device import resolve_device
from ..inference import amp_dtype, predict_scene, window_origins, window_stride
from ..scenes import open_scene
from ..segmenter import build_segmenter, compile_segmenter
from ..sources import SceneSource
from ..targets import SCHEMES, ClassScheme
from ..vectorize import polygons_from_probability
from . import sync

log = logging.getLogger(__name__)
GSD, TILE = 0.5, 256


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


class NullModel(torch.nn.Module):
    """A model that costs nothing: the same logits for every window, made once per batch shape (16 px roofs
    every 64 px, ~980 per km2 at 0.5 m like the scene's; blended windows agree, the vectoriser has
    buildings to trace)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.shape[-2], x.shape[-1], x.device)
        if key not in self._cache:
            r = torch.arange(x.shape[-2], device=x.device)[:, None] % 64 < 16
            c = torch.arange(x.shape[-1], device=x.device)[None, :] % 64 < 16
            z = torch.where(r & c, 4.0, -4.0)
            self._cache[key] = torch.stack([-z] + [z] * (self.k - 1)).expand(x.shape[0], -1, -1, -1)
        return self._cache[key]


class _Crop:
    """The top-left `size` x `size` pixels of a scene reader, as a reader."""

    def __init__(self, reader: Any, size: int):
        self.reader, self.width, self.height = reader, min(size, reader.width), min(size, reader.height)
        self.transform, self.crs, self.scene_id = reader.transform, reader.crs, f"{reader.scene_id}_crop"

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        rgb, valid = self.reader.read(window)
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = np.arange(r0, r0 + rgb.shape[1])[:, None] < self.height
        cols = np.arange(c0, c0 + rgb.shape[2])[None, :] < self.width
        inside = rows & cols
        return np.where(inside, rgb, 0).astype(np.uint8), valid & inside


def write_scene(path: Path, size: int, seed: int = 0) -> None:
    """The synthetic scene, written strip by strip (bounded memory)."""
    rng = np.random.default_rng(seed)
    transform = rasterio.transform.from_origin(680000.0, 7460000.0, GSD, GSD)
    n_roofs = int(size * size * GSD * GSD / 1e6 * 900)
    roofs = np.column_stack([rng.integers(0, size - 40, n_roofs), rng.integers(0, size - 40, n_roofs),
                             rng.integers(8, 30, n_roofs), rng.integers(8, 30, n_roofs),
                             rng.integers(160, 250, n_roofs)])
    strip = 512
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32723", transform=transform, tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate", zlevel=1, predictor=2) as dst:
        for r0 in range(0, size, strip):
            h = min(strip, size - r0)
            rgb = rng.integers(40, 120, size=(3, h, size), dtype=np.uint8)
            for r, c, rh, rw, v in roofs[(roofs[:, 0] < r0 + h) & (roofs[:, 0] + roofs[:, 2] > r0)]:
                a, b = max(r - r0, 0), min(r + rh - r0, h)
                rgb[:, a:b, c : c + rw] = v
            dst.write(rgb, window=Window(0, r0, size, h))


def _end_to_end(reader: Any, model: torch.nn.Module, out: Path, cfg: Config, scheme: ClassScheme,
                device: torch.device) -> dict[str, Any]:
    """Probability COG and polygons of one scene, vectorised as predict does (alongside the COG's writing);
    returns timings and counts."""
    pcfg = cfg.predict
    watershed = pcfg.instances == "watershed" and scheme.needs_instances
    seed_t = (pcfg.seed_threshold if pcfg.seed_threshold is not None else 0.7) if watershed else None
    vectorise_s = 0.0

    def vectorise(path: Path) -> Any:
        nonlocal vectorise_s
        t = time.perf_counter()
        polys = polygons_from_probability(path, threshold=pcfg.threshold or 0.5,
                                          min_area_m2=pcfg.min_area_m2 or 0.0, hole_area_m2=pcfg.hole_area_m2,
                                          simplify_px=pcfg.simplify_px, block_size=pcfg.block_size, scene="bench",
                                          pixel_size_m=GSD, seed_threshold=seed_t)
        vectorise_s = time.perf_counter() - t
        return polys

    t0 = time.perf_counter()
    summary = predict_scene(reader, model, out, tile_size=TILE, overlap=pcfg.overlap, batch_size=pcfg.batch_size,
                            block_size=pcfg.block_size, device=device, scheme=scheme, amp=pcfg.amp, progress=False,
                            alongside=vectorise)
    seconds = time.perf_counter() - t0
    km2 = reader.width * reader.height * GSD * GSD / 1e6
    return {"seconds": seconds, "vectorise_s": vectorise_s, "polygons": len(summary["alongside"]),
            "windows": summary["windows"], "km2": km2, "km2_per_hour": km2 / (seconds / 3600.0)}


def _model_only(reader: Any, model: torch.nn.Module, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The network alone on every window of `reader`'s grid, the pixels already on the device."""
    stride = window_stride(TILE, cfg.predict.overlap)
    rows = window_origins(reader.height, TILE, stride)
    cols = window_origins(reader.width, TILE, stride)
    rgb, _ = reader.read(Window(0, 0, reader.width, reader.height))
    scene = torch.from_numpy(rgb).to(device)
    origins = [(int(r), int(c)) for r in rows for c in cols]
    autocast = amp_dtype(device, cfg.predict.amp)
    bs = cfg.predict.batch_size
    with torch.inference_mode():
        warm = torch.stack([scene[:, r : r + TILE, c : c + TILE] for r, c in origins[:bs]]).float()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            model(warm)
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(origins), bs):
            x = torch.stack([scene[:, r : r + TILE, c : c + TILE] for r, c in origins[i : i + bs]]).float()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                model(x)
        sync(device)
        seconds = time.perf_counter() - t0
    km2 = reader.width * reader.height * GSD * GSD / 1e6
    return {"seconds": seconds, "windows": len(origins), "km2_per_hour": km2 / (seconds / 3600.0)}


def bench_predict(cfg: Config) -> dict[str, Any]:
    """The three rates of the module docstring, on one synthetic scene, in one run (`footprints bench predict`)."""
    pcfg = cfg.predict
    size = pcfg.bench_scene_px
    model_px = pcfg.bench_model_px or size
    device = resolve_device(pcfg.device)
    scheme = SCHEMES[cfg.tile.target]
    layers = resolve_layers("all")
    meta = {"layers": layers, "in_channels": hypercolumn_channels(layers), "hidden": 1024, "stride": 2,
            "num_classes": scheme.k, "classes": list(scheme.classes),
            "backbone": {"weights": "random", "normalization": "torchvision"}}
    torch.manual_seed(0)
    model: Any = build_segmenter(meta).to(device).eval()
    if pcfg.compile:
        model = compile_segmenter(model, (TILE, TILE), device)
    null = NullModel(scheme.k)
    with tempfile.TemporaryDirectory(prefix="footprints-bench-predict-") as tmp:
        scene_path = Path(tmp) / "images" / "bench.tif"
        scene_path.parent.mkdir()
        t0 = time.perf_counter()
        write_scene(scene_path, size, cfg.seed)
        log.info("bench predict: %d px scene written in %.1f s", size, time.perf_counter() - t0)
        data_cfg = DataConfig(root=tmp, format="geotiff")
        tile_cfg = TileConfig(size=TILE, stride=TILE)

        def io() -> dict[str, Any]:
            with open_scene(SceneSource(scene_path), data_cfg, tile_cfg) as reader:
                return _end_to_end(reader, null, Path(tmp) / "null_prob.tif", cfg, scheme, device)

        io_runs = [io()]
        log.info("bench predict: null model %.1f s (%.0f km2/h)", io_runs[0]["seconds"], io_runs[0]["km2_per_hour"])
        with open_scene(SceneSource(scene_path), data_cfg, tile_cfg) as reader:
            region = _Crop(reader, model_px) if model_px < size else reader
            alone_runs = [_model_only(region, model, cfg, device)]
            log.info("bench predict: model alone %.1f s on %d windows (%.1f km2/h)", alone_runs[0]["seconds"],
                     alone_runs[0]["windows"], alone_runs[0]["km2_per_hour"])
            e2e = _end_to_end(region, model, Path(tmp) / "prob.tif", cfg, scheme, device)
            log.info("bench predict: end to end %.1f s (%.1f km2/h)", e2e["seconds"], e2e["km2_per_hour"])
            alone_runs.append(_model_only(region, model, cfg, device))
            log.info("bench predict: model alone again %.1f s (%.1f km2/h)", alone_runs[1]["seconds"],
                     alone_runs[1]["km2_per_hour"])
        io_runs.append(io())  # again after the model
    # the better of two for both rates: on a shared machine a run is only ever slowed down by others
    best_io = max(io_runs, key=lambda r: r["km2_per_hour"])
    alone = max(alone_runs, key=lambda r: r["km2_per_hour"])
    autocast = amp_dtype(device, pcfg.amp)
    result = {
        "bench": "predict",
        "device": _device_name(device),
        "scene_px": [size, size],
        "model_px": [model_px, model_px],
        "gsd_m": GSD,
        "window_px": TILE,
        "overlap": pcfg.overlap,
        "batch_size": pcfg.batch_size,
        "block_size": pcfg.block_size,
        "classes": list(scheme.classes),
        "autocast": str(autocast).removeprefix("torch.") if autocast is not None else None,
        "compile": pcfg.compile,
        "windows": e2e["windows"],
        "seconds": round(e2e["seconds"], 2),
        "vectorise_s": round(e2e["vectorise_s"], 2),
        "model_only_seconds": [round(r["seconds"], 2) for r in alone_runs],
        "io_seconds": [round(r["seconds"], 2) for r in io_runs],
        "io_vectorise_s": round(best_io["vectorise_s"], 2),
        "io_polygons": best_io["polygons"],
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "io_over_model_only": round(best_io["km2_per_hour"] / alone["km2_per_hour"], 1),
        "km2_per_hour": round(e2e["km2_per_hour"], 2),
        "model_only_km2_per_hour": round(alone["km2_per_hour"], 2),
        "io_km2_per_hour": round(best_io["km2_per_hour"], 1),
    }
    log.info("predict: end to end %.1f km2/h, model alone %.1f km2/h, I/O with a null model %.0f km2/h (%.0fx the "
             "model) on %s", result["km2_per_hour"], result["model_only_km2_per_hour"], result["io_km2_per_hour"],
             result["io_over_model_only"], result["device"])
    return result
