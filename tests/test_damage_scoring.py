"""xView2's damage figures from grades (footprints.scoring.damage), checked against counts worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from footprints.scenes.grades import GRADES
from footprints.scoring.damage import (
    damage_headlines,
    damage_part,
    damage_scores,
    grade_confusion,
    pool_damage,
    xview2_score,
)


def test_a_perfect_grading_scores_one_everywhere():
    truth = list(GRADES) * 2
    scores = damage_scores(grade_confusion(truth, truth))
    assert scores["damage_f1"] == 1.0 and scores["binary"]["macro_f1"] == 1.0
    assert all(g["f1"] == 1.0 and g["support"] == 2 for g in scores["per_grade"].values())


def test_counts_per_building_by_hand_unclassified_left_out_and_a_zero_grade_zeroes_the_harmonic_mean():
    truth = ["no-damage", "no-damage", "minor-damage", "major-damage", "destroyed", "destroyed", "un-classified"]
    pred = ["no-damage", "minor-damage", "minor-damage", "destroyed", "destroyed", "major-damage", "no-damage"]
    c = grade_confusion(truth, pred)
    assert c.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]]  # the un-classified pair is out
    s = damage_scores(c)
    f1 = {g: v["f1"] for g, v in s["per_grade"].items()}
    assert f1 == pytest.approx({"no-damage": 2 / 3, "minor-damage": 2 / 3, "major-damage": 0.0, "destroyed": 0.5})
    assert s["per_grade"]["no-damage"]["recall"] == 0.5 and s["per_grade"]["minor-damage"]["precision"] == 0.5
    assert s["damage_f1"] == 0.0  # xView2's harmonic mean: a grade never found scores the whole 0
    # no-damage vs damaged: 1 of 2 undamaged found, all 4 damaged called damaged, 1 undamaged called damaged
    assert s["binary"]["undamaged_f1"] == pytest.approx(2 / 3) and s["binary"]["damaged_f1"] == pytest.approx(8 / 9)
    assert s["binary"]["macro_f1"] == pytest.approx(7 / 9)


def test_pixel_weights_give_xview2s_pixel_figures_and_the_overall_score():
    truth = ["no-damage", "minor-damage", "major-damage", "destroyed", "minor-damage"]
    pred = [0, 1, 2, 3, 0]  # indices are grades too
    c = grade_confusion(truth, pred, weights=[10, 20, 30, 40, 5])  # each building's pixel count
    assert np.array_equal(c, [[10, 0, 0, 0], [5, 20, 0, 0], [0, 0, 30, 0], [0, 0, 0, 40]])
    s = damage_scores(c)
    assert s["damage_f1"] == pytest.approx(4 / (1 / 0.8 + 1 / (40 / 45) + 1 + 1))
    assert xview2_score(0.8, 0.5) == pytest.approx(0.3 * 0.8 + 0.7 * 0.5)


@pytest.mark.parametrize("truth,pred,message", [
    (["collapsed"], ["destroyed"], "unknown damage grade 'collapsed'"),
    (["destroyed"], ["un-classified"], "a prediction cannot be un-classified"),
    (["destroyed"], [7], "damage grade index 7"),
    (["destroyed", "destroyed"], ["destroyed"], "2 truths, 1 predictions"),
])
def test_bad_grades_are_named(truth, pred, message):
    with pytest.raises(ValueError, match=message):
        grade_confusion(truth, pred)


def test_folds_pool_the_baselines_confusions_beside_the_models():
    """A cross-validation sums each fold's baseline confusions, as it sums the model's."""
    def fold(model, majority):
        c, m = grade_confusion(GRADES, model), grade_confusion(GRADES, majority)
        scores = damage_scores(c)
        return damage_part({"counts": dict.fromkeys(GRADES, 1), "truth_counts": dict.fromkeys(GRADES, 1),
                            "per_building": scores, "pixel": scores,
                            "xview2": {"localisation_counts": [4, 0, 0]}, "baselines": {"majority": damage_scores(m)}})

    pooled = pool_damage([fold([0, 1, 2, 3], [3, 3, 3, 3]), fold([0, 1, 3, 3], [1, 1, 1, 1])])
    assert pooled["per_building"]["confusion"] == (grade_confusion(GRADES * 2, [0, 1, 2, 3, 0, 1, 3, 3])).tolist()
    majority = pooled["baselines"]["majority"]
    assert majority["confusion"] == grade_confusion(GRADES * 2, [3] * 4 + [1] * 4).tolist()
    assert majority["per_grade"]["destroyed"]["recall"] == 0.5 and majority["damage_f1"] == 0.0
    without = pool_damage([{k: v for k, v in fold([0, 1, 2, 3], [0] * 4).items() if k != "baselines"}])
    assert "baselines" not in without

    # the summary lines the stage logs and cv prints: the model's figures, then one line per baseline
    model, baseline = damage_headlines(pooled)
    assert f"damage F1 {pooled['per_building']['damage_f1']:.3f}" in model and "score" in model
    assert "baseline majority" in baseline and "damage F1 0.000" in baseline
    assert len(damage_headlines(without)) == 1 and damage_headlines({"counts": {}, "per_building": None}) == []
