"""Class weights and the class-weighted cross entropy, shared by the classifier and the segmenter.

Class weights: `class_weights_from_counts` gives each class the weight N / (K * n_c) (N = all labelled
training pixels, n_c those of class c, K classes; scikit-learn's `class_weight='balanced'` formula):
inverse frequency, normalised so that the pixel-weighted mean weight is 1 (sum_c n_c * w_c = N, so the
loss keeps the scale of the unweighted one). They come from the training masks, or from the config.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import StageError

IGNORE_INDEX = 255


def class_weights_from_counts(background_px: float, building_px: float) -> np.ndarray:
    """Inverse-frequency weights [background, building] = N / (2 * n_c), N = n_0 + n_1.

    e.g. 900 background and 100 building pixels give [0.556, 5.0].
    """
    counts = np.array([background_px, building_px], dtype=np.float64)
    if (counts <= 0).any():
        raise StageError(
            f"class weights: the training masks hold {int(counts[0])} background and {int(counts[1])} building "
            "pixels; both classes are needed (or set the class_weights of the classifier/segmenter)"
        )
    return counts.sum() / (2.0 * counts)


def resolve_class_weights(override: Sequence[float] | None, background_px: float, building_px: float,
                          key: str) -> tuple[np.ndarray, str]:
    """The configured override (config key `key`), or the inverse-frequency weights; and their source."""
    if override is not None:
        return np.asarray(override, dtype=np.float64), f"config {key}"
    return class_weights_from_counts(background_px, building_px), "inverse frequency of the training masks"


def weighted_ce_sums(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor,
                     sample_weight: torch.Tensor | None = None,
                     ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted cross entropy, sum of the weights) over the labelled elements.

    Each element counts with `class_weight[target] * sample_weight` (`sample_weight`: e.g. the mask
    pixels a sampled pixel stands for); elements whose target is `ignore_index` count 0. `sum / weights`
    is `F.cross_entropy(..., weight=class_weight, ignore_index=...)` (mean reduction); keeping the two
    apart lets DDP divide by the weight total of the whole global batch. logits (N, K[, H, W]) with
    target (N[, H, W]).
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    per = F.cross_entropy(logits.float(), safe, reduction="none")
    weight = class_weight[safe] * valid
    if sample_weight is not None:
        weight = weight * sample_weight
    return (per * weight).sum(), weight.sum()
