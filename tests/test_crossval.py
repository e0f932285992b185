"""Cross-validation folds: every scene is tested exactly once, never by a model that trained on it."""

from __future__ import annotations

from collections import Counter

import pytest

from footprints.config import ConfigError, load_config
from footprints.runner import fold_config, pool_folds
from footprints.stages.tile import assign_folds


def test_every_scene_is_tested_once_and_never_trained_on_in_its_fold() -> None:
    scenes = [f"img{i:02d}" for i in range(14)]
    tested = Counter()
    for k in range(5):
        split = assign_folds(scenes, folds=5, fold=k, seed=7)
        assert set(split) == set(scenes)
        counts = Counter(split.values())
        assert counts["test"] in (2, 3) and counts["val"] in (2, 3) and counts["train"] >= 8
        tested.update(s for s, v in split.items() if v == "test")
    assert tested == Counter({s: 1 for s in scenes})
    # deterministic for a seed, different for another
    assert assign_folds(scenes, 5, 0, 7) == assign_folds(reversed(scenes), 5, 0, 7)
    assert assign_folds(scenes, 5, 0, 7) != assign_folds(scenes, 5, 0, 8)


def test_fold_config_names_each_fold_and_checks_bounds() -> None:
    cfg = load_config(None, ["name=rio", "tile.folds=4"])
    f2 = fold_config(cfg, 2)
    assert (f2.name, f2.tile.split_mode, f2.tile.fold, cfg.name) == ("rio-fold2", "kfold", 2, "rio")
    with pytest.raises(ConfigError, match="tile.fold"):
        load_config(None, ["tile.split_mode=kfold", "tile.folds=4", "tile.fold=4"])


def _fold_result(scenes: dict[str, tuple[int, int, int, int, int, int, int]]) -> dict:
    """An evaluate result with per-scene counts (pixel tp, fp, fn, tn; polygon tp, fp, fn)."""
    per_scene = {}
    for sid, (tp, fp, fn, tn, ptp, pfp, pfn) in scenes.items():
        per_scene[sid] = {"pixel": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
                          "polygon": {"tp": ptp, "fp": pfp, "fn": pfn, "n_truth": ptp + pfn, "n_pred": ptp + pfp}}
    return {"per_scene": per_scene}


def test_pooling_sums_counts_over_every_test_scene_before_the_ratios() -> None:
    a = _fold_result({"s1": (10, 0, 10, 80, 1, 0, 1)})  # fold 0: pixel IoU 0.5, polygon F1 2/3
    b = _fold_result({"s2": (30, 30, 0, 40, 3, 3, 0), "s3": (0, 0, 0, 100, 0, 0, 0)})
    pooled = pool_folds([a, b])
    assert pooled["scenes"] == 3
    px, pg = pooled["pooled"]["pixel"], pooled["pooled"]["polygon"]
    assert (px["tp"], px["fp"], px["fn"]) == (40, 30, 10)
    assert px["building_iou"] == pytest.approx(40 / 80)  # not the mean of the folds' IoUs (0.5 and 0.5 -> 0.5)
    assert (pg["tp"], pg["fp"], pg["fn"], pg["n_truth"], pg["n_pred"]) == (4, 3, 1, 5, 7)
    assert pg["f1"] == pytest.approx(8 / 12)  # 2 tp / (2 tp + fp + fn), not a mean of per-fold F1
