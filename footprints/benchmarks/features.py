"""`footprints bench features`: the `features` stage against the bare VGG16 forward of the same patches.

The overhead is everything the stage does beyond the backbone's forward pass: reading and sampling the
patches (a reader thread, from the patch store), gathering the sampled pixels' hypercolumns, statistics,
writing the shards and the record. The bare forward runs the same patches, already in memory as one
tensor, in the same batches, through the same backbone (up to the deepest layer the stage reads), in the
stage's memory layout (channels last, faster than torch's default on CPU; the default layout's time is
reported beside it).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..contracts.manifest import read_manifest
from ..contracts.patches import PatchStore
from ..model.backbone import load_backbone, resolve_layers
from ..model.device import resolve_device
from ..stages.features import FEATURE_SPLITS
from ..stages.features import run as run_features
from . import sync, tiled_synthetic

log = logging.getLogger(__name__)


def bench_features(cfg: Config) -> dict[str, Any]:
    """Tiles 3 synthetic 1024 px scenes into 256 px patches (48), then times 3 pairs, back to back: the bare
    backbone forward of the patches the stage sends to it, then the whole `features` stage (`--overwrite`;
    `features.batch_size`, `backbone.layers`, random weights). `overhead` is the median over the pairs of
    stage / bare - 1; `overhead_of_bests` compares the best of each."""
    device = resolve_device(cfg.features.device, key="features.device")
    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        bcfg, tile_dir = tiled_synthetic(cfg, Path(tmp), 3, 256, [0.67, 0.33, 0.0])
        rows = read_manifest(tile_dir)
        rows = rows[rows["split"].isin(FEATURE_SPLITS)]
        store = PatchStore(tile_dir, rows)
        images, masks = store.read(np.arange(len(rows)))
        sent = images[(masks != 255).reshape(len(rows), -1).any(axis=1)]  # the stage skips all-nodata patches
        layers = resolve_layers(bcfg.backbone.layers)
        model = load_backbone("random", bcfg.backbone.normalization, device)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        bs = max(1, bcfg.features.batch_size)

        def bare(channels_last: bool = True) -> float:
            """The forward alone, in the stage's memory layout (channels last) or torch's default."""
            net = model_cl if channels_last else model
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(sent), bs):
                    x = torch.from_numpy(sent[i : i + bs]).to(device).float().contiguous(memory_format=fmt)
                    net(x, layers)
            sync(device)
            return time.perf_counter() - t0

        def stage() -> float:
            t0 = time.perf_counter()
            run_features(bcfg, overwrite=True)
            return time.perf_counter() - t0

        stage()  # warm-up: imports, page cache, allocator
        t_stage, t_bare = [], []
        for _ in range(3):
            t_bare.append(bare())
            t_stage.append(stage())
        t_nchw = [bare(channels_last=False)]
    # each stage run is paired with the bare forward just before it: on a shared machine the load drifts
    # between pairs more than within one; the median of the paired ratios, and the ratio of the bests beside
    pairs = sorted(s / b for s, b in zip(t_stage, t_bare, strict=True))
    overhead = pairs[len(pairs) // 2] - 1.0
    result = {
        "bench": "features",
        "overhead": round(overhead, 4),
        "overhead_of_bests": round(min(t_stage) / min(t_bare) - 1.0, 4),
        "paired_ratios": [round(r, 4) for r in pairs],
        "stage_s": round(min(t_stage), 3),
        "bare_vgg_s": round(min(t_bare), 3),
        "stage_times_s": [round(t, 3) for t in t_stage],
        "bare_times_s": [round(t, 3) for t in t_bare],
        "bare_nchw_s": round(min(t_nchw), 3),  # the forward in torch's default layout, for reference
        "patches": len(rows),
        "patches_to_backbone": len(sent),
        "batch_size": bs,
        "layers": len(layers),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    log.info("bench features: stage %.2f s, bare VGG forward %.2f s of the same %d patches (bests): overhead "
             "%.1f%% (median of %d pairs; target <= 10%%)", min(t_stage), min(t_bare), len(sent), 100 * overhead,
             len(pairs))
    return result
