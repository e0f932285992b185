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


def test_pooling_per_source_sums_each_source_over_the_folds() -> None:
    """With several data sources every figure is pooled per source too (counts summed over the source's test
    scenes of every fold); without, the pooled figures alone, as before."""
    a = _fold_result({"rio__s1": (10, 0, 10, 80, 1, 0, 1), "jop__s1": (5, 5, 0, 90, 1, 1, 0)})
    b = _fold_result({"rio__s2": (30, 30, 0, 40, 3, 3, 0), "jop__s2": (5, 0, 5, 90, 0, 0, 2)})
    for result in (a, b):
        for sid, scene in result["per_scene"].items():
            scene["source"] = sid.split("__")[0]
    pooled = pool_folds([a, b])
    rio, jop = pooled["per_source"]["rio"], pooled["per_source"]["jop"]
    assert (rio["scenes"], jop["scenes"]) == (2, 2)
    assert (rio["pixel"]["tp"], rio["pixel"]["fp"], rio["pixel"]["fn"]) == (40, 30, 10)
    assert rio["pixel"]["building_iou"] == pytest.approx(40 / 80)
    assert jop["pixel"]["building_iou"] == pytest.approx(10 / 20)
    assert (jop["polygon"]["tp"], jop["polygon"]["fp"], jop["polygon"]["fn"]) == (1, 1, 2)
    assert jop["polygon"]["f1"] == pytest.approx(2 / 5)
    for key in ("tp", "fp", "fn", "tn"):  # the pooled figures are the sums of the sources'
        assert pooled["pooled"]["pixel"][key] == rio["pixel"][key] + jop["pixel"][key]
    assert "per_source" not in pool_folds([_fold_result({"s1": (1, 0, 0, 9, 1, 0, 0)})])


def test_fold_offsets_spread_small_sources_and_keep_each_source_tested_once() -> None:
    scenes = [f"s{i}" for i in range(4)]
    for offset in (0, 1, 6):
        tested = Counter(s for k in range(3) for s, v in assign_folds(scenes, 3, k, 5, offset).items() if v == "test")
        assert tested == Counter({s: 1 for s in scenes})
    # the offset moves the source's first scene (in the seed's order) to fold `offset % folds`
    first = [s for s, v in assign_folds(scenes, 3, 0, 5).items() if v == "test"]
    assert [s for s, v in assign_folds(scenes, 3, 1, 5, offset=1).items() if v == "test"] == first
    assert assign_folds(scenes, 3, 2, 5, offset=0) == assign_folds(scenes, 3, 2, 5)


def test_cv_summary_and_report_carry_the_per_source_figures(tmp_path, capsys) -> None:
    import json

    from footprints.runner import _cv_summary
    from footprints.stages.evaluate import overall_metrics

    results = []
    for k, scenes in enumerate(({"rio__a": (10, 0, 10, 80, 1, 0, 1), "jop__a": (5, 5, 0, 90, 1, 1, 0)},
                                {"rio__b": (30, 30, 0, 40, 3, 3, 0)})):
        r = _fold_result(scenes)
        for sid, scene in r["per_scene"].items():
            scene["source"] = sid.split("__")[0]
        results.append({**r, "name": f"cv-fold{k}", "threshold": 0.5, "min_area_m2": 0.0,
                        "overall": overall_metrics(r["per_scene"])})
    cfg = load_config(None, ["name=cv", f"output_root={tmp_path}", "tile.folds=2", "tile.val_band=0.2"])
    summary = _cv_summary(cfg, results)
    saved = json.loads((tmp_path / "cv" / "cv" / "metrics.json").read_text())
    assert saved["per_source"] == summary["per_source"] and list(saved["per_source"]) == ["rio", "jop"]
    assert saved["per_source"]["jop"]["scenes"] == 1 and saved["per_source"]["jop"]["polygon"]["fp"] == 1
    report = (tmp_path / "cv" / "cv" / "report.md").read_text()
    assert "| pooled, source **rio** | 2 | 0.500 |" in report and "| pooled, source **jop** | 1 | 0.500 |" in report
    assert "source jop: 1 test scenes pooled" in capsys.readouterr().out


def test_cv_summary_pools_the_folds_damage_and_prints_it_with_the_baselines(tmp_path, capsys) -> None:
    import numpy as np

    from footprints.runner import _cv_summary
    from footprints.scenes.grades import GRADES
    from footprints.scoring.damage import damage_scores, grade_confusion, pool_damage
    from footprints.stages.evaluate import overall_metrics

    def fold_damage(predicted, majority):
        scores = damage_scores(grade_confusion(GRADES, predicted))
        return pool_damage([{"counts": dict.fromkeys(GRADES, 1), "truth_counts": dict.fromkeys(GRADES, 1),
                             "per_building": scores["confusion"], "pixel": np.zeros((4, 5)).tolist(),
                             "localisation": [4, 0, 0],
                             "baselines": {"majority": grade_confusion(GRADES, majority).tolist()}}])

    results = []
    for k, (predicted, majority) in enumerate((([0, 1, 2, 3], [3] * 4), ([0, 1, 3, 3], [3] * 4))):
        r = _fold_result({f"s{k}": (10, 0, 10, 80, 1, 0, 1)})
        results.append({**r, "name": f"cv-fold{k}", "threshold": 0.5, "min_area_m2": 0.0,
                        "overall": overall_metrics(r["per_scene"]), "damage": fold_damage(predicted, majority)})
    cfg = load_config(None, ["name=cv", f"output_root={tmp_path}", "tile.folds=2", "tile.val_band=0.2"])
    damage = _cv_summary(cfg, results)["damage"]
    # the confusions summed over the folds, then the scores: major-damage found once in two
    assert damage["per_building"]["per_grade"]["major-damage"]["recall"] == 0.5
    assert damage["baselines"]["majority"]["damage_f1"] == 0.0
    out = capsys.readouterr().out
    assert f"damage, per truth building: damage F1 {damage['per_building']['damage_f1']:.3f}" in out
    assert "baseline majority on the same truth buildings: damage F1 0.000" in out
