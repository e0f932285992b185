"""Cross-validation folds: every scene is tested exactly once, never by a model that trained on it."""

from __future__ import annotations

from collections import Counter

import pytest

from footprints.config import ConfigError, load_config
from footprints.tiling import assign_folds
from pipelines.crossval import fold_config


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
