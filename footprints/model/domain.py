"""How unlike a model's training scenes a scene looks: the out-of-domain check, in hypercolumn space.

What is compared: the mean of a scene's sampled hypercolumns with each training scene's mean, in the
training features' principal directions, each in units of the training pixels' standard deviation along
it. The score is the root mean square of those standardised offsets over the `COMPONENTS` top directions,
from the nearest training scene: near 0 is a scene whose average pixel is that of a training scene; 1 is
one training standard deviation away along every direction. The nearest scene, not the pooled training
mean: a model trained on several places would otherwise find its own training scenes far from their
blend. Only the shallow layers' channels are used (the normalised image and conv1_x-conv3_x,
`SHALLOW_SCALE`: colour and texture): measured on real scenes, the deep layers' channels and per-pixel
distances varied about as much between parts of one place's scenes as between places, and the mean of the
shallow ones did not (the figures are with `predict.domain_warn`).

The reference (`fit_reference` and `with_scene_means`, made by train-classifier from its training
hypercolumns, `footprints.training.domain_reference`) is small: the number of leading channels used, their
training mean, the principal directions and their variances, and every training scene's mean in those
coordinates (S x `COMPONENTS` floats). Features are first standardised with the model's own normaliser (the
MLP's mean/std), so that no channel dominates by its units.

At predict, `scene_features` runs the model's backbone on windows of the scene only as deep as those
layers and gathers the sampled pixels' columns with `gather_hypercolumns`, as the features stage does for
training patches; `domain_score` scores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .backbone import LAYER_CHANNELS, LAYER_SCALE
from .hypercolumns import gather_hypercolumns

REFERENCE_KEY = "domain_reference"  # its key in a classifier checkpoint and in a segmenter's meta
REFERENCE_FORMAT = 1  # bumped when the score or the stored fields change: predict ignores other formats
COMPONENTS = 16  # principal directions compared
SHALLOW_SCALE = 4  # layers at most this many times coarser than the image (input .. conv3_3) are compared
FLOOR = 1e-6  # the smallest variance a direction is divided by


def shallow_layers(layers: Sequence[str]) -> list[str]:
    """The layers the score compares: the shallow ones of `layers`, or all of them when none is shallow."""
    shallow = [name for name in layers if LAYER_SCALE[name] <= SHALLOW_SCALE]
    return shallow or list(layers)


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per channel in float32, with the MLP's rule for a constant channel (std 1)."""
    scale = np.where(np.asarray(std) > 1e-6, std, 1.0).astype(np.float32)
    return ((np.asarray(x, np.float32) - np.asarray(mean, np.float32)) / scale).astype(np.float32, copy=False)


def top_directions(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` principal directions (k, C) of the centred rows `x` and the variance along each, by a
    seeded randomised SVD (Halko et al. 2011): a few (n, k + 16) products instead of the SVD of the whole
    sample or its C x C covariance. Seeded by `rng`, never by torch's global generator, so that training
    draws the same random numbers with or without the check."""
    x = np.asarray(x, np.float32)
    width = min(k + 16, *x.shape)
    q, _ = np.linalg.qr(x @ rng.standard_normal((x.shape[1], width)).astype(np.float32))
    for _ in range(iterations):  # power iterations sharpen the top of the spectrum
        q, _ = np.linalg.qr(x @ (x.T @ q))
    _, s, vt = np.linalg.svd((q.T @ x).astype(np.float64), full_matrices=False)
    return vt[:k], s[:k] ** 2 / max(len(x), 1)


def coordinates(z: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """Rows of standardised features (n, >= channels) in the reference's whitened principal coordinates (n, k):
    their offset from the training mean along each direction, in training standard deviations."""
    used = int(reference["channels"])
    z = np.asarray(z, np.float64)[:, :used] - reference["center"].double().numpy()
    return (z @ reference["basis"].double().numpy().T) / np.sqrt(np.maximum(reference["variances"].double().numpy(),
                                                                             FLOOR))


def fit_reference(z: np.ndarray, channels: int, seed: int = 0, components: int = COMPONENTS) -> dict[str, Any]:
    """The reference's mean and principal directions from standardised training features `z` (n, C), of
    which the first `channels` are compared, and (until `with_scene_means` sets the training scenes' own)
    one training mean, theirs. Plain tensors and numbers, so that it loads with `torch.load(weights_only=True)`
    inside a checkpoint."""
    z = np.asarray(z, np.float32)[:, :channels]
    if len(z) < 4:
        raise ValueError(f"fit_reference: {len(z)} training pixels are too few")
    center = z.astype(np.float64).mean(axis=0)
    k = int(min(components, len(z) - 1, channels))
    basis, variances = top_directions(z - center.astype(np.float32), k, np.random.default_rng([seed, 1]))
    return {
        "format": REFERENCE_FORMAT,
        "pixels": len(z),
        "channels": int(channels),
        "center": torch.from_numpy(center.astype(np.float32)),
        "basis": torch.from_numpy(basis.astype(np.float32)),
        "variances": torch.from_numpy(variances.astype(np.float32)),
        "scene_means": torch.zeros((1, k)),  # the training mean itself, in its own coordinates
    }


def with_scene_means(reference: dict[str, Any], means: np.ndarray) -> dict[str, Any]:
    """The reference with the training scenes' mean coordinates (S, k) as what scenes are compared with."""
    means = np.asarray(means, np.float32)
    if means.ndim != 2 or means.shape[1] != reference["basis"].shape[0] or not len(means):
        raise ValueError(f"with_scene_means: expected (S, {reference['basis'].shape[0]}) means, got {means.shape}")
    return {**reference, "scene_means": torch.from_numpy(means)}


def with_validation_scores(reference: dict[str, Any], scores: np.ndarray) -> dict[str, Any]:
    """The reference with its validation scenes' scores (V,): how far scenes of the training place lie."""
    return {**reference, "validation_scores": torch.as_tensor(np.asarray(scores, np.float32).reshape(-1))}


def nearest_distances(means: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """Each of the scene means `means` (n, k) (in the reference's coordinates): the RMS offset from the
    nearest training scene's mean (n,), the score of a scene whose mean it is."""
    means = np.asarray(means, np.float64).reshape(-1, reference["scene_means"].shape[1])
    offsets = means[:, None, :] - reference["scene_means"].double().numpy()[None]
    return np.sqrt((offsets**2).mean(axis=2)).min(axis=1) if len(means) else np.zeros(0)


def warn_threshold(reference: Mapping[str, Any], floor: float | None) -> float | None:
    """The score above which predict warns: `floor` (`predict.domain_warn`, chosen on real scenes), raised
    to the largest validation scene's score where the model's own validation scenes lie farther (scenes of
    one place that vary more than those it was chosen on); None: never warn."""
    if floor is None:
        return None
    scores = reference.get("validation_scores")
    highest = float(scores.max()) if isinstance(scores, torch.Tensor) and scores.numel() else 0.0
    return round(max(float(floor), highest), 4)


def usable_reference(reference: Any, channels: int | None = None) -> Mapping[str, Any] | None:
    """The reference when this code reads it (its format, shapes that fit a model of `channels` hypercolumn
    channels), else None: a checkpoint made before the check, or of another format, has no score."""
    if not isinstance(reference, Mapping) or reference.get("format") != REFERENCE_FORMAT:
        return None
    basis, center, means = reference.get("basis"), reference.get("center"), reference.get("scene_means")
    if not all(isinstance(t, torch.Tensor) for t in (basis, center, means)) or basis.dim() != 2 or means.dim() != 2:
        return None
    used = reference.get("channels")
    if not isinstance(used, int) or basis.shape[1] != used or center.shape != (used,):
        return None
    if means.shape[1] != basis.shape[0] or means.shape[0] == 0 or (channels is not None and used > channels):
        return None
    return reference


def domain_score(z: np.ndarray, reference: Mapping[str, Any]) -> float | None:
    """The score of a scene's standardised features `z` (n, >= channels): the RMS over the principal
    directions of the offset of their mean from the nearest training scene's mean, in training standard
    deviations; None without a pixel."""
    if len(z) == 0:
        return None
    return float(nearest_distances(coordinates(z, reference).mean(axis=0), reference)[0])


def channels_of(layers: Sequence[str]) -> int:
    """How many leading hypercolumn channels `layers` (in the model's order) give."""
    return sum(LAYER_CHANNELS[name] for name in layers)


def scene_features(
    model: Any,
    images: np.ndarray,
    valid: np.ndarray,
    pixels: int,
    rng: np.random.Generator,
    batch_size: int = 4,
    layers: Sequence[str] | None = None,
) -> np.ndarray:
    """Hypercolumns (m, C) float32 of `layers` (default: the model's) of up to `pixels` valid pixels, drawn
    evenly from the windows `images` (n, 3, s, s) uint8 RGB (`valid` (n, s, s)): the backbone of `model` (a
    Segmenter) runs only as deep as those layers, and `gather_hypercolumns` reads the sampled pixels, as the
    features stage computes them for training patches."""
    layers = list(model.layers if layers is None else layers)
    n = len(images)
    per_window = -(-int(pixels) // max(n, 1))
    picks: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n):
        idx = np.flatnonzero(np.asarray(valid[i]).ravel())
        take = rng.choice(idx, size=min(per_window, idx.size), replace=False) if idx.size else idx
        picks.append((take // images.shape[-1], take % images.shape[-1]))
    device = next(model.parameters()).device
    step = max(1, int(batch_size))
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, n, step):
            chunk = range(start, min(start + step, n))
            if not any(len(picks[i][0]) for i in chunk):
                continue
            x = torch.from_numpy(np.ascontiguousarray(images[start : chunk.stop])).to(device).float()
            acts = model.backbone(x, layers)
            rows = np.concatenate([picks[i][0] for i in chunk])
            cols = np.concatenate([picks[i][1] for i in chunk])
            batch = np.concatenate([np.full(len(picks[i][0]), i - start) for i in chunk])
            feats = gather_hypercolumns(acts, layers, rows, cols, tuple(images.shape[-2:]), batch=batch)
            out.append(feats.float().cpu().numpy())
    if not out:
        return np.zeros((0, channels_of(layers)), np.float32)
    return np.concatenate(out)
