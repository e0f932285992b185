"""Pixel metrics from confusion counts agree with scikit-learn; ignore pixels and weights count right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from footprints.scoring.metrics import confusion, metrics_from_labels, pixel_metrics


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    truth = (rng.random((64, 64)) < 0.1).astype(np.uint8)
    pred = np.where(rng.random((64, 64)) < 0.8, truth, 1 - truth).astype(np.uint8)
    truth[:5] = 255  # ignore rows
    return pred, truth


def test_confusion_matches_sklearn_and_skips_ignore(labels):
    pred, truth = labels
    keep = truth != 255
    tn, fp, fn, tp = confusion_matrix(truth[keep], pred[keep], labels=[0, 1]).ravel()
    assert confusion(pred, truth) == (tp, fp, fn, tn)
    assert sum(confusion(pred, truth)) == keep.sum()
    # torch path (any device) gives the same integers
    assert confusion(torch.from_numpy(pred), torch.from_numpy(truth)) == (tp, fp, fn, tn)
    # booleans work as predictions
    assert confusion(pred.astype(bool), truth) == (tp, fp, fn, tn)


def test_pixel_metrics_match_sklearn(labels):
    pred, truth = labels
    keep = truth != 255
    t, p = truth[keep], pred[keep]
    m = metrics_from_labels(pred, truth)
    assert m["building_iou"] == pytest.approx(jaccard_score(t, p))
    assert m["f1"] == pytest.approx(f1_score(t, p))
    assert m["precision"] == pytest.approx(precision_score(t, p))
    assert m["recall"] == pytest.approx(recall_score(t, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(t, p))
    per_class = jaccard_score(t, p, average=None)
    assert m["background_iou"] == pytest.approx(per_class[0])
    assert m["mean_iu"] == pytest.approx(per_class.mean())
    assert m["building_iou"] < m["mean_iu"]  # why building IoU is reported on its own


def test_weights_count_pixels_that_many_times(labels):
    pred, truth = labels
    w = np.random.default_rng(1).integers(1, 5, pred.shape)
    rep_p = np.repeat(pred.ravel(), w.ravel())
    rep_t = np.repeat(truth.ravel(), w.ravel())
    assert confusion(pred, truth, weight=w) == pytest.approx(confusion(rep_p, rep_t))
    got = confusion(torch.from_numpy(pred), torch.from_numpy(truth), weight=torch.from_numpy(w))
    assert got == pytest.approx(confusion(rep_p, rep_t))


def test_zero_division_and_hand_values():
    m = pixel_metrics(0, 0, 0, 10)  # no building anywhere, none predicted
    assert m["building_iou"] == 0.0 and m["precision"] == 0.0 and m["accuracy"] == 1.0
    assert pixel_metrics(0, 0, 0, 10, zero_division=1.0)["building_iou"] == 1.0
    m = pixel_metrics(tp=6, fp=2, fn=4, tn=88)
    assert m["building_iou"] == pytest.approx(6 / 12)
    assert m["precision"] == pytest.approx(6 / 8) and m["recall"] == pytest.approx(6 / 10)
    assert m["f1"] == pytest.approx(12 / 18) and m["accuracy"] == pytest.approx(94 / 100)
    assert m["mean_iu"] == pytest.approx((6 / 12 + 88 / 94) / 2)
    with pytest.raises(ValueError):
        confusion(np.zeros(3), np.zeros(4))
