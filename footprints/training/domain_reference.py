"""The out-of-domain reference a classifier checkpoint stores: what its training pixels looked like.

train-classifier calls `build_reference` once the MLP is chosen: a seeded sample of `REFERENCE_PIXELS` rows of
the features stage's training hypercolumns, drawn in proportion to `w` (the mask pixels each sample stands
for, so that the class-balanced samples count as the training scenes' pixels do: predict samples a scene's
pixels uniformly), standardised with the model's own normaliser, goes to `footprints.model.domain.fit_reference`
(only the channels of its shallow layers are kept).
Only `w` of every shard and the drawn rows are read, never the whole split. train-segmenter carries the
reference into its `meta` (`footprints.training.build`); predict scores each scene against it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import features_store
from ..model.domain import (
    channels_of,
    coordinates,
    fit_reference,
    nearest_distances,
    shallow_layers,
    standardise,
    with_scene_means,
    with_validation_scores,
)

log = logging.getLogger("footprints.stages.train_classifier")

REFERENCE_PIXELS = 8000  # the sample the principal directions are fitted on
MIN_SCENE_SAMPLES = 100  # a training scene with fewer samples gives no mean of its own
MAX_SCENES = 10_000  # training scene means kept (16 floats each)
_PATCH_ID = re.compile(r"^(.*)_r\d{5,}_c\d{5,}$")


def weighted_rows(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct row indices drawn with probability proportional to `weights` (Efraimidis and Spirakis'
    keys u**(1/w): one pass, no loop over draws), sorted; every positive-weight row when there are fewer."""
    w = np.asarray(weights, np.float64)
    positive = np.flatnonzero(w > 0)
    if positive.size <= n:
        return positive
    keys = np.log(rng.random(positive.size)) / w[positive]  # log(u) / w: the largest n are the draw
    return np.sort(positive[np.argpartition(keys, -n)[-n:]])


def training_sample(feature_dir: Path, n: int, seed: int) -> np.ndarray:
    """Hypercolumns (<= n, C) float32 of the train split drawn by `weighted_rows`, read row by row."""
    reader = features_store.SplitReader(feature_dir, "train")
    weights = []
    for path in reader.paths:  # only the `w` member of each (uncompressed) shard is read
        with np.load(path, allow_pickle=False) as shard:
            weights.append(shard["w"].astype(np.float64))
    if not weights:
        return np.zeros((0, reader.channels), np.float32)
    picks = weighted_rows(np.concatenate(weights), n, np.random.default_rng([seed, 25]))
    starts = np.cumsum([0, *reader.sizes])
    out = np.empty((len(picks), reader.channels), np.float32)
    for i, row in enumerate(picks):
        k = int(np.searchsorted(starts, row, side="right") - 1)
        local = int(row - starts[k])
        reader.read((k, local, local + 1), out=out[i : i + 1])
    return out


def scene_of(patch_id: str) -> str:
    """The scene of a patch id (`footprints.contracts.patches.patch_name`: `<scene>_rRRRRR_cCCCCC`); an id
    of another form is its own group."""
    match = _PATCH_ID.match(patch_id)
    return match.group(1) if match else patch_id


def scene_means(feature_dir: Path, reference: dict[str, Any], mean: np.ndarray, std: np.ndarray,
                seed: int, split: str = "train") -> np.ndarray:
    """The mean coordinates (S, k) of every scene's features in `split` (each sample weighted by `w`, as the
    scene's pixels count), in one pass over the train split, piece by piece: memory holds one piece and S x k
    sums. Scenes with fewer than `MIN_SCENE_SAMPLES` samples are left out (their means are noise) unless none
    has that many; at most `MAX_SCENES` (a seeded choice) are kept."""
    reader = features_store.SplitReader(Path(feature_dir), split)
    used = int(reference["channels"])
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    counts: dict[str, int] = {}
    shard, scenes = -1, np.zeros(0, dtype=str)
    for chunk in reader.chunks():  # in file order: a shard's pieces one after another
        if chunk[0] != shard:
            shard = chunk[0]
            with np.load(reader.paths[shard], allow_pickle=False) as npz:  # the patch ids: a small member
                scenes = np.array([scene_of(str(p)) for p in npz["patch_id"]])
        piece = reader.read(chunk)
        coords = coordinates(standardise(piece["X"][:, :used], mean[:used], std[:used]), reference)
        w = piece["w"].astype(np.float64)
        names, index = np.unique(scenes[chunk[1] : chunk[2]], return_inverse=True)
        part = np.zeros((len(names), coords.shape[1]))
        np.add.at(part, index, coords * w[:, None])
        part_w = np.bincount(index, weights=w, minlength=len(names))
        part_n = np.bincount(index, minlength=len(names))
        for j, name in enumerate(names.tolist()):
            sums[name] = sums.get(name, 0.0) + part[j]
            weights[name] = weights.get(name, 0.0) + float(part_w[j])
            counts[name] = counts.get(name, 0) + int(part_n[j])
    kept = [name for name in sorted(sums) if counts[name] >= MIN_SCENE_SAMPLES and weights[name] > 0]
    kept = kept or [name for name in sorted(sums) if weights[name] > 0]
    if len(kept) > MAX_SCENES:
        kept = sorted(np.random.default_rng([seed, 26]).choice(kept, MAX_SCENES, replace=False).tolist())
    return np.stack([sums[name] / weights[name] for name in kept]) if kept else np.zeros((0, 0))


def describe_scores(scores: Any) -> str:
    """'0.03-0.09' (the range of a score tensor), or 'nothing' when it is empty."""
    values = np.asarray(scores, np.float64)
    return f"{values.min():.3f}-{values.max():.3f}" if values.size else "nothing"


def build_reference(feature_dir: Path, layers: Sequence[str], mean: np.ndarray, std: np.ndarray, seed: int,
                    pixels: int = REFERENCE_PIXELS) -> dict[str, Any] | None:
    """The reference of the training features of the model's `layers`, standardised with (`mean`, `std`),
    the model's normaliser: principal directions from a weighted sample, then every training scene's mean.
    None (with a line) when the train split has too few samples to describe."""
    t0 = time.perf_counter()
    x = training_sample(Path(feature_dir), pixels, seed)
    if len(x) < 64:
        log.info("train-classifier: %d training samples are too few for an out-of-domain reference; predict will "
                 "give no domain score", len(x))
        return None
    used = channels_of(shallow_layers(layers))
    reference = fit_reference(standardise(x[:, :used], mean[:used], std[:used]), used, seed=seed)
    del x
    means = scene_means(Path(feature_dir), reference, mean, std, seed)
    if len(means):
        reference = with_scene_means(reference, means)
    # the validation scenes' own scores: how far scenes of the training place may lie (predict's warning
    # threshold is never below the largest of them, `footprints.model.domain.warn_threshold`)
    validation = scene_means(Path(feature_dir), reference, mean, std, seed, split="val")
    reference = with_validation_scores(reference, nearest_distances(validation, reference))
    log.info("train-classifier: out-of-domain reference from %d training pixels (%d channels, %d principal "
             "directions) and the means of %d training scene(s) in %.1f s; %d validation scene(s) score %s",
             reference["pixels"], used, reference["basis"].shape[0], len(means), time.perf_counter() - t0,
             len(validation), describe_scores(reference["validation_scores"]))
    return reference
