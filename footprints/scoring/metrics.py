"""Pixel metrics from confusion counts, shared by train-classifier, train-segmenter and evaluate.

Two functions:

- `confusion(pred, truth, ignore=255, weight=None) -> (tp, fp, fn, tn)`: counts of the building class
  (label 1) against background (label 0), leaving out pixels whose truth is `ignore` (nodata/padding).
  Accepts numpy arrays or torch tensors (on any device; the counts come back as Python numbers), so
  callers can accumulate counts over many patches and call `pixel_metrics` once at the end.
- `pixel_metrics(tp, fp, fn, tn) -> dict`: building IoU (Jaccard of class 1), F1, precision, recall,
  accuracy, background IoU and the two-class mean IU, plus the counts themselves.

The formulas are scikit-learn's (`jaccard_score`, `f1_score`, `precision_score`, `recall_score`,
`accuracy_score` with `pos_label=1`); tests check them against scikit-learn. Counts are computed with
`bincount` rather than `sklearn.metrics.confusion_matrix` because dense masks have millions of pixels.
A ratio whose denominator is zero (e.g. precision when nothing is predicted) is `zero_division`, 0.0 by
default as in scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Counts = tuple[float, float, float, float]


def confusion(pred: Any, truth: Any, ignore: int | None = 255, weight: Any = None) -> Counts:
    """(tp, fp, fn, tn) of building (1) vs background (0) over pixels whose truth is not `ignore`.

    `pred` holds 0/1 labels (or booleans), `truth` 0/1 with `ignore` for pixels left out, same shape.
    `weight` (optional, same shape) counts each pixel that many times, e.g. the number of pixels a sampled
    pixel stands for; the counts are then floats. Integers are returned when no weight is given.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(pred, torch.Tensor):
        return _confusion_torch(pred, torch.as_tensor(truth, device=pred.device), ignore, weight)
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"confusion: pred {pred.shape} and truth {truth.shape} differ in shape")
    valid = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    p = (pred[valid] != 0).astype(np.int64)
    t = (truth[valid] == 1).astype(np.int64)
    w = None if weight is None else np.asarray(weight, dtype=np.float64)[valid]
    # index 2*truth + pred: 0 = tn, 1 = fp, 2 = fn, 3 = tp
    c = np.bincount(2 * t + p, weights=w, minlength=4)
    cast = float if weight is not None else int
    return cast(c[3]), cast(c[1]), cast(c[2]), cast(c[0])


def _confusion_torch(pred: Any, truth: Any, ignore: int | None, weight: Any) -> Counts:
    import torch

    if pred.shape != truth.shape:
        raise ValueError(f"confusion: pred {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    valid = truth != ignore if ignore is not None else torch.ones_like(truth, dtype=torch.bool)
    p = (pred[valid] != 0).long()
    t = (truth[valid] == 1).long()
    if weight is None:
        c = torch.bincount(2 * t + p, minlength=4).tolist()
        return int(c[3]), int(c[1]), int(c[2]), int(c[0])
    w = torch.as_tensor(weight, device=pred.device)[valid].double()
    c = torch.bincount(2 * t + p, weights=w, minlength=4).tolist()
    return float(c[3]), float(c[1]), float(c[2]), float(c[0])


def _ratio(num: float, den: float, zero_division: float) -> float:
    return float(num) / float(den) if den > 0 else float(zero_division)


def pixel_metrics(tp: float, fp: float, fn: float, tn: float, zero_division: float = 0.0) -> dict[str, float]:
    """Building IoU, F1, precision, recall, accuracy, background IoU and mean IU from confusion counts.

    `building_iou` = tp / (tp + fp + fn) is the number to select models on (buildings are a few percent
    of pixels); `mean_iu` is the two-class mean of building and background IoU, the figure the seed
    project reported, which looks much better because background IoU is close to 1.
    """
    precision = _ratio(tp, tp + fp, zero_division)
    recall = _ratio(tp, tp + fn, zero_division)
    building_iou = _ratio(tp, tp + fp + fn, zero_division)
    background_iou = _ratio(tn, tn + fn + fp, zero_division)
    return {
        "building_iou": building_iou,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "precision": precision,
        "recall": recall,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, zero_division),
        "background_iou": background_iou,
        "mean_iu": (building_iou + background_iou) / 2,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def metrics_from_labels(pred: Any, truth: Any, ignore: int | None = 255, weight: Any = None) -> dict[str, float]:
    """`pixel_metrics(*confusion(pred, truth, ignore, weight))` in one call."""
    return pixel_metrics(*confusion(pred, truth, ignore, weight))
