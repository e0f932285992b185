"""Predict's out-of-domain check: a scene's domain score, and the line that warns of a scene far outside.

`scene_domain_score(reader, model, reference)` reads up to `WINDOWS` windows of the model's tile size
(seeded, spread over the scene, inside it where the scene is larger than a window), draws up to `PIXELS`
valid pixels from them, and scores their shallow hypercolumns against the checkpoint's reference
(`footprints.model.domain`): near 0 is like the model's training pixels. A scene without a valid pixel, or
a model without a usable reference (a checkpoint made before the check), has no score (None).

`score_for_predict` is the stage's use of it in a worker (a scene whose probability raster is reused keeps
its score); `domain_warning` is the one line the stage logs for a scene above `predict.domain_warn`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from rasterio.windows import Window

from ..contracts.predict_records import PredictSceneRecord
from ..model.domain import (
    REFERENCE_KEY,
    domain_score,
    scene_features,
    shallow_layers,
    standardise,
    usable_reference,
)
from .scene import PredictSettings, meta_for, model_for

PIXELS = 2000  # pixels sampled per scene
WINDOWS = 8  # windows read per scene (a backbone pass each)
SEED = 0  # the sample is the same at every run of a scene


def window_offsets(height: int, width: int, size: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to `count` (row, col) offsets of `size` px windows, drawn from a grid over the scene; along an
    axis longer than `size` the windows stay inside the scene (no padding seen)."""

    def axis(n: int) -> list[int]:
        if n <= size:
            return [0]
        steps = math.ceil(n / size)
        return sorted({round(i * (n - size) / (steps - 1)) for i in range(steps)}) if steps > 1 else [0]

    grid = [(r, c) for r in axis(height) for c in axis(width)]
    if len(grid) > count:
        grid = [grid[i] for i in sorted(rng.choice(len(grid), size=count, replace=False))]
    return grid


def scene_domain_score(reader: Any, model: Any, reference: Mapping[str, Any], size: int,
                       batch_size: int = 4, pixels: int = PIXELS, windows: int = WINDOWS) -> float | None:
    """The domain score of the scene `reader` reads (on the grid the model reads it at), with the segmenter
    `model` (its backbone, layers and normaliser) and the checkpoint's `reference`; None without a valid pixel."""
    rng = np.random.default_rng(SEED)
    offsets = window_offsets(reader.height, reader.width, size, windows, rng)
    images, valid = [], []
    for r, c in offsets:
        rgb, ok = reader.read(Window(c, r, size, size))
        if ok.any():
            images.append(rgb)
            valid.append(ok)
    if not images:
        return None
    layers = shallow_layers(model.layers)
    feats = scene_features(model, np.stack(images), np.stack(valid), pixels, rng, batch_size, layers)
    used = feats.shape[1]
    if used != int(reference["channels"]):  # a reference of other layers than the model's
        return None
    mean, std = (t.detach().cpu().numpy()[:used] for t in (model.head.mean, model.head.std))
    score = domain_score(standardise(feats, mean, std), reference)
    return None if score is None else round(score, 4)


def score_for_predict(reader: Any, settings: PredictSettings, previous: PredictSceneRecord | None) -> float | None:
    """predict's score of a scene (in the worker, on the grid `open_for_model` gave): the previous record's
    when its probability raster was made as now (same model, same reading: `prob_key`), else computed with
    the worker's model; None for a model without a usable reference."""
    if not settings.domain:
        return None
    if previous is not None and previous.prob_key == settings.prob_key and previous.domain_score is not None:
        return previous.domain_score
    model = model_for(settings)
    reference = usable_reference(meta_for(settings).get(REFERENCE_KEY), int(model.head.in_channels))
    if reference is None:
        return None
    return scene_domain_score(reader, model, reference, settings.tile.size, settings.batch_size)


def domain_warning(scene_id: str, score: float | None, threshold: float | None) -> str | None:
    """The line for a scene whose score is above `threshold` (None: no line; no score or no threshold)."""
    if score is None or threshold is None or not score > threshold:
        return None
    return (f"{scene_id}: looks unlike the model's training scenes (domain score {score:.2f} > threshold "
            f"{threshold:g}): expect poor footprints")
