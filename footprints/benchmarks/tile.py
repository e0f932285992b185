"""`footprints bench tile`: the tile stage's throughput against the I/O floor of the same windows."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from ..config import Config, DataConfig
from ..contracts.patches import PATCH_PROFILE
from ..contracts.paths import RunPaths
from ..stages.tile import patch_windows
from ..stages.tile import run as run_tile
from ..synth.dataset import write_synthetic_dataset

log = logging.getLogger(__name__)


def bench_tile(cfg: Config, n_scenes: int = 4, scene_size: int = 1024) -> dict[str, Any]:
    """Tile stage throughput vs the I/O floor (plain windowed read + GeoTIFF write of the same windows).

    Builds `n_scenes` synthetic `scene_size` px GeoTIFF scenes with GeoJSON labels in a temp dir; times the
    stage in-process (workers=0) and the floor in the same run; returns patches per second of each and the ratio.
    """
    with tempfile.TemporaryDirectory(prefix="bench_tile_") as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "data", n_scenes=n_scenes, seed=cfg.seed, size=scene_size, geotiff=True)
        bcfg = copy.deepcopy(cfg)
        bcfg.name, bcfg.output_root = "bench", str(root / "out")
        bcfg.data = DataConfig(root=str(root / "data" / "geotiff"), format="geotiff", label_format="vector")
        bcfg.cluster.workers, bcfg.cluster.kind = 0, "local"
        size, stride = bcfg.tile.size, bcfg.tile.stride
        images = sorted((root / "data" / "geotiff" / "images").glob("*.tif"))

        def floor() -> int:
            out, n = root / "floor", 0
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for img in images:
                with rasterio.Env(), rasterio.open(img) as ds:
                    for win in patch_windows(ds.width, ds.height, size, stride):
                        rgb = ds.read([1, 2, 3], window=win, boundless=True, fill_value=0)
                        mask = np.zeros((1, size, size), dtype=np.uint8)
                        t = ds.window_transform(win)
                        name = f"{img.stem}_r{int(win.row_off):05d}_c{int(win.col_off):05d}"
                        # plain writes under the final names: no temporary file, no rename
                        for path, arr, nd in ((out / f"{name}.tif", rgb, None), (out / f"{name}_mask.tif", mask, 255)):
                            with rasterio.open(path, "w", **PATCH_PROFILE, width=size, height=size, count=arr.shape[0],
                                               dtype="uint8", transform=t, crs=ds.crs, nodata=nd) as dst:
                                dst.write(arr)
                        n += 1
            return n

        def stage() -> int:
            shutil.rmtree(RunPaths.of(bcfg).tile, ignore_errors=True)
            return run_tile(bcfg, overwrite=True)["patches"]

        floor()  # warm-up: imports, GDAL driver, page cache
        t_stage, t_floor = [], []
        for _ in range(3):  # interleaved so that neither side gets a warmer machine; best of 3 each
            t = time.perf_counter()
            n_floor = floor()
            t_floor.append(time.perf_counter() - t)
            t = time.perf_counter()
            n_stage = stage()
            t_stage.append(time.perf_counter() - t)
    pps, floor_pps = n_stage / min(t_stage), n_floor / min(t_floor)
    ratio = pps / floor_pps
    log.info("bench tile: %d scenes of %d px, %d patches of %d px: stage %.1f patches/s, I/O floor %.1f "
             "patches/s, ratio %.2f (target >= 0.5)", n_scenes, scene_size, n_stage, size, pps, floor_pps, ratio)
    return {"bench": "tile", "patches_per_s": round(pps, 2), "floor_patches_per_s": round(floor_pps, 2),
            "ratio": round(ratio, 3), "patches": n_stage, "floor_patches": n_floor, "scenes": n_scenes, "scene_size": scene_size,
            "patch_size": size}
