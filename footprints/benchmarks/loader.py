"""`footprints bench loader`: patches per second the training data path delivers, without the model.

What is timed is what `train-segmenter` does per step before its forward pass: the sampler's keys, the
batch read from the patch store (a memory-mapped gather, in loader workers on CUDA), collation, the copy to
the device (pinned, non-blocking on CUDA), the augmentation of the whole batch on the device and the float
conversion of the input. The same loader over the GeoTIFF patches (what training read before the store)
is timed in the same run, for comparison.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..contracts.manifest import read_manifest
from ..model.device import resolve_device
from ..training.data import (
    GlobalBatchSampler,
    HostBuffers,
    PatchDataset,
    epoch_permutation,
    make_loader,
    to_device,
)
from ..training.distributed import DistInfo
from . import sync, tiled_synthetic

log = logging.getLogger(__name__)


def _epochs(dataset: PatchDataset, cfg: Config, device: torch.device, epochs: int) -> list[float]:
    """Patches per second of each of `epochs` passes over `dataset` through one persistent loader."""
    batch = cfg.segmenter.batch_size
    sampler = GlobalBatchSampler([], batch, 0, 0, 0, DistInfo())
    loader = make_loader(dataset, sampler, device, cfg.segmenter.num_workers)
    buffers = HostBuffers()
    rates = []
    for epoch in range(epochs):
        sampler.reset(epoch_permutation(len(dataset), cfg.seed, epoch), 0, len(dataset), epoch)
        n = 0
        sync(device)
        t0 = time.perf_counter()
        for b in loader:
            x, mask, _, real, _ = to_device(b, device, cfg.segmenter.channels_last, buffers)
            n += int(real.sum())
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def bench_loader(cfg: Config) -> dict[str, Any]:
    """Tiles 4 synthetic 1024 px scenes (256 px patches at stride 128: 196 patches, store and GeoTIFFs), then
    passes over every patch 6 times through the training loader (batch `segmenter.batch_size`,
    augmentation on, `segmenter.num_workers` workers on CUDA); the first pass is a warm-up, the figure is
    the median of the others. Then 2 passes over the GeoTIFF patches for comparison."""
    device = resolve_device(cfg.segmenter.device, key="segmenter.device")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        bcfg, tile_dir = tiled_synthetic(cfg, Path(tmp), 4, 128)
        rows = read_manifest(tile_dir)
        dataset = PatchDataset(tile_dir, rows, augment=True, seed=cfg.seed)
        assert dataset.store.stored_fraction == 1.0
        rates = _epochs(dataset, bcfg, device, 6)
        geotiff = PatchDataset(tile_dir, rows, augment=True, seed=cfg.seed)
        geotiff.store.index_of[:] = -1  # every patch decoded from its GeoTIFFs, as before the store
        geotiff_rates = _epochs(geotiff, bcfg, device, 2)
    steady = sorted(rates[1:])[len(rates[1:]) // 2]
    result = {
        "bench": "loader",
        "patches_per_s": round(steady, 1),
        "first_epoch_patches_per_s": round(rates[0], 1),
        "epochs_patches_per_s": [round(r, 1) for r in rates],
        "geotiff_patches_per_s": round(max(geotiff_rates), 1),
        "patches": len(rows),
        "patch_px": 256,
        "batch_size": cfg.segmenter.batch_size,
        "workers": cfg.segmenter.num_workers if device.type == "cuda" else 0,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    log.info("bench loader: %.0f patches/s from the patch store (GeoTIFF patches: %.0f patches/s), batch %d, %s",
             steady, result["geotiff_patches_per_s"], cfg.segmenter.batch_size, device)
    return result
