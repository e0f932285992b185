"""Class weights and the class-weighted cross entropy, shared by the classifier and the segmenter.

Class weights come from the training masks' class frequencies (or from the config):

- `inverse`: w_c = N / (K n_c) (N = all labelled training pixels, n_c those of class c, K classes;
  scikit-learn's `class_weight='balanced'`): every class carries the same share of the loss.
- `sqrt`: w_c proportional to (N / n_c) ** 0.5: tempered; a rare class is still weighted up, but a model
  trained with it over-predicts buildings far less (inverse frequency weights the building class by the
  background-to-building pixel ratio, large where buildings are a few percent of the pixels, and the
  predicted building areas come out too large on unseen scenes). train-classifier logs the weights and the
  training mask pixels per class (`class_weights`, `class_pixels` in its metrics.json); compare the summed
  `area_m2` of the predicted footprints with the truth's on test scenes to see the over-prediction
  (configs/xview2-joplin.md keeps the figures behind the default).
- `none`: w_c = 1.

Every scheme is normalised so that the pixel-weighted mean weight is 1 (sum_c n_c w_c = N): the loss keeps
the scale of the unweighted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import StageError

IGNORE_INDEX = 255


def class_weights_from_counts(counts: Sequence[float], mode: str = "inverse") -> np.ndarray:
    """Class weights of training pixel `counts` (one per class) under `mode` (see the module docstring).

    e.g. 900 background and 100 building pixels give [0.556, 5.0] (inverse), [0.75, 2.25] (sqrt).
    """
    n = np.asarray(counts, dtype=np.float64)
    if (n <= 0).any():
        raise StageError(
            f"class weights: the training masks hold {[int(v) for v in n]} pixels per class; every class is "
            "needed (or set the class_weights of the classifier/segmenter)"
        )
    if mode == "inverse":
        w = 1.0 / n
    elif mode == "sqrt":
        w = 1.0 / np.sqrt(n)
    elif mode == "none":
        w = np.ones_like(n)
    else:
        raise ValueError(f"class weighting must be inverse, sqrt or none, got {mode!r}")
    return w * n.sum() / (n * w).sum()


def resolve_class_weights(override: Sequence[float] | None, counts: Sequence[float], mode: str,
                          key: str) -> tuple[np.ndarray, str]:
    """The configured override (config key `key`), or the weights of the training pixel counts; and
    their source."""
    if override is not None:
        return np.asarray(override, dtype=np.float64), f"config {key}"
    return class_weights_from_counts(counts, mode), f"{mode} frequency of the training masks"


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
