"""Damage grades scored as xView2 scores them (issue 26), from a confusion matrix of the four grades.

xView2's damage score is the harmonic mean of the four grades' F1 (no-damage, minor, major, destroyed),
each counted over the truth buildings' pixels; its overall score is 0.3 x localisation F1 + 0.7 x damage F1.
`un-classified` truth is left out, as xView2 leaves it out. The same counts per building (each building
once, `weights` None) give the per-building figures; with each building's pixel count as its weight they are
xView2's pixel figures (a building's grade painted over its truth pixels). Beside them: the binary
damaged/undamaged macro F1 (no-damage against the three damaged grades).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..scenes.grades import GRADES, UNCLASSIFIED

LOCALISATION_WEIGHT = 0.3  # xView2's overall score: 0.3 x localisation F1 + 0.7 x damage F1


def grade_index(grade: str | int) -> int | None:
    """The index of a grade name (or an index already), None for `un-classified`; a clear error otherwise."""
    if isinstance(grade, (int, np.integer)):
        if not 0 <= int(grade) < len(GRADES):
            raise ValueError(f"damage grade index {grade} is not in 0..{len(GRADES) - 1}")
        return int(grade)
    if grade == UNCLASSIFIED:
        return None
    try:
        return GRADES.index(grade)
    except ValueError:
        raise ValueError(f"unknown damage grade {grade!r} (expected one of {', '.join(GRADES)} or "
                         f"{UNCLASSIFIED})") from None


def grade_confusion(truth: Sequence[str | int], predicted: Sequence[str | int],
                    weights: Sequence[float] | None = None) -> np.ndarray:
    """(4, 4) float64 counts, rows the truth grade, columns the predicted one; each pair counts its weight
    (1 per building, or its pixel count). Pairs whose truth is `un-classified` are left out."""
    if len(truth) != len(predicted) or (weights is not None and len(weights) != len(truth)):
        raise ValueError(f"grade_confusion: {len(truth)} truths, {len(predicted)} predictions"
                         + ("" if weights is None else f", {len(weights)} weights"))
    out = np.zeros((len(GRADES), len(GRADES)))
    for i, (t, p) in enumerate(zip(truth, predicted, strict=True)):
        row = grade_index(t)
        if row is None:
            continue
        col = grade_index(p)
        if col is None:
            raise ValueError("grade_confusion: a prediction cannot be un-classified")
        out[row, col] += 1.0 if weights is None else float(weights[i])
    return out


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def damage_scores(confusion: np.ndarray) -> dict[str, Any]:
    """Per-grade precision, recall, F1 and support, xView2's damage F1 (the harmonic mean of the four F1: 0
    when a grade's F1 is 0) and the damaged/undamaged macro F1, from `grade_confusion`'s matrix (4, 4), or
    (4, 5) whose last column counts truth that no prediction covered (xView2's pixels outside every
    predicted building: a miss of the truth grade)."""
    c = np.asarray(confusion, np.float64)
    per_grade: dict[str, dict[str, float]] = {}
    for k, grade in enumerate(GRADES):
        tp, fp, fn = c[k, k], c[:, k].sum() - c[k, k], c[k, :].sum() - c[k, k]
        per_grade[grade] = {"precision": tp / (tp + fp) if tp + fp > 0 else 0.0,
                            "recall": tp / (tp + fn) if tp + fn > 0 else 0.0,
                            "f1": _f1(tp, fp, fn), "support": float(c[k, :].sum())}
    f1s = [per_grade[g]["f1"] for g in GRADES]
    damage_f1 = len(f1s) / sum(1 / f for f in f1s) if all(f > 0 for f in f1s) else 0.0
    # no-damage (index 0) against the three damaged grades; a fifth column (truth not found) is a miss of both
    n = len(GRADES)
    missed = c[:, n:].sum(1) if c.shape[1] > n else np.zeros(n)
    undamaged_tp, damaged_tp = c[0, 0], c[1:, 1:n].sum()
    predicted_undamaged, predicted_damaged = c[1:, 0].sum(), c[0, 1:n].sum()  # each the other's false positives
    binary = {"undamaged_f1": _f1(undamaged_tp, predicted_undamaged, predicted_damaged + missed[0]),
              "damaged_f1": _f1(damaged_tp, predicted_damaged, predicted_undamaged + missed[1:].sum())}
    binary["macro_f1"] = (binary["undamaged_f1"] + binary["damaged_f1"]) / 2
    return {"per_grade": per_grade, "damage_f1": damage_f1, "binary": binary,
            "confusion": c.tolist(), "grades": list(GRADES)}


def xview2_score(localisation_f1: float, damage_f1: float) -> float:
    """xView2's overall score: 0.3 x localisation F1 + 0.7 x damage F1."""
    return LOCALISATION_WEIGHT * localisation_f1 + (1 - LOCALISATION_WEIGHT) * damage_f1


def pool_damage(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Damage scores over several scenes (or folds): confusions and localisation counts summed, then the scores.

    Each part: `counts` (graded footprints per grade) and, where its truth is graded, `truth_counts`,
    `per_building` and `pixel` (confusions, as `grade_confusion` and the pixel (4, 5) one) and `localisation`
    ([tp, fp, fn] building pixels). The result: `counts`, and `per_building`, `pixel` (`damage_scores`),
    `xview2` (localisation F1, damage F1, score and the summed localisation counts) and `truth_counts`, None
    where no part is graded; `baselines` (each one's `damage_scores` per building) when every graded part has
    the baselines' confusions (`baselines`: name -> confusion)."""
    out: dict[str, Any] = {"counts": {g: sum(int(p["counts"].get(g, 0)) for p in parts) for g in GRADES},
                           "per_building": None, "pixel": None, "xview2": None, "truth_counts": None}
    graded = [p for p in parts if p.get("per_building") is not None]
    if not graded:
        return out
    out["per_building"] = damage_scores(np.sum([p["per_building"] for p in graded], axis=0))
    out["pixel"] = damage_scores(np.sum([p["pixel"] for p in graded], axis=0))
    tp, fp, fn = (float(v) for v in np.sum([p["localisation"] for p in graded], axis=0))
    loc = _f1(tp, fp, fn)
    out["xview2"] = {"localisation_f1": loc, "damage_f1": out["pixel"]["damage_f1"],
                     "score": xview2_score(loc, out["pixel"]["damage_f1"]), "localisation_counts": [tp, fp, fn]}
    out["truth_counts"] = {g: sum(int(p["truth_counts"].get(g, 0)) for p in graded) for g in GRADES}
    if all(p.get("baselines") for p in graded):  # the same buildings graded by each baseline (the damage stage's)
        out["baselines"] = {name: damage_scores(np.sum([p["baselines"][name] for p in graded], axis=0))
                            for name in graded[0]["baselines"]}
    return out


def damage_part(pooled: dict[str, Any]) -> dict[str, Any]:
    """A `pool_damage` result as a part of a larger pool (a fold's damage in a cross-validation)."""
    if pooled.get("per_building") is None:
        return {"counts": pooled["counts"]}
    return {"counts": pooled["counts"], "truth_counts": pooled["truth_counts"],
            "per_building": pooled["per_building"]["confusion"], "pixel": pooled["pixel"]["confusion"],
            "localisation": pooled["xview2"]["localisation_counts"],
            "baselines": {name: b["confusion"] for name, b in (pooled.get("baselines") or {}).items()}}


def damage_headlines(pooled: dict[str, Any]) -> list[str]:
    """The one-line summaries of a `pool_damage` result with graded truth (none without): the model's per-building
    and xView2 figures, then each baseline's, for the damage stage's log and `footprints cv`'s output."""
    if pooled.get("per_building") is None:
        return []
    b, x = pooled["per_building"], pooled["xview2"]
    lines = [f"damage, per truth building: damage F1 {b['damage_f1']:.3f}, damaged/undamaged macro F1 "
             f"{b['binary']['macro_f1']:.3f} | xView2 pixels: localisation F1 {x['localisation_f1']:.3f}, damage F1 "
             f"{x['damage_f1']:.3f}, score {x['score']:.3f}"]
    return lines + [f"baseline {name} on the same truth buildings: damage F1 {s['damage_f1']:.3f}, macro F1 "
                    f"{s['binary']['macro_f1']:.3f}" for name, s in (pooled.get("baselines") or {}).items()]
