"""Polygon matching (SpaceNet's rule), shared by calibration and evaluation.

Greedy and one-to-one: candidate pairs from an STRtree, taken in order of decreasing IoU; a pair is a
match (true positive) when IoU >= the threshold (0.5; the comparison allows a relative 1e-9 so that an
IoU of exactly 0.5 computed in floating point counts). Unmatched predictions are false positives,
unmatched truths false negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

IOU_RTOL = 1e-9  # an IoU of exactly the threshold counts, whatever the rounding of the areas


# ---------------------------------------------------------------------------------------------------
# polygon matching (pure functions)


@dataclass
class PolygonMatch:
    """Result of matching predicted to true polygons: counts and the matched pairs (pred, truth, IoU)."""

    tp: int
    fp: int
    fn: int
    pairs: list[tuple[int, int, float]] = field(default_factory=list)


def geom_array(geoms: Any) -> np.ndarray:
    if isinstance(geoms, (gpd.GeoDataFrame, gpd.GeoSeries)):
        geoms = geoms.geometry.values if isinstance(geoms, gpd.GeoDataFrame) else geoms.values
    arr = np.asarray(list(geoms) if not isinstance(geoms, np.ndarray) else geoms, dtype=object)
    return arr.reshape(-1)


def iou_candidates(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All intersecting (pred index, truth index, IoU > 0) pairs, found with an STRtree on the truths."""
    p, t = geom_array(pred), geom_array(truth)
    if len(p) == 0 or len(t) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    tree = shapely.STRtree(t)
    pi, ti = tree.query(p, predicate="intersects")
    inter = shapely.area(shapely.intersection(p[pi], t[ti]))
    union = shapely.area(p[pi]) + shapely.area(t[ti]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    keep = iou > 0
    return pi[keep], ti[keep], iou[keep]


def match_polygons(pred: Any, truth: Any, iou_threshold: float = 0.5) -> PolygonMatch:
    """Greedy one-to-one matching by decreasing IoU; a pair matches when IoU >= `iou_threshold`.

    Ties are broken by prediction index, then truth index, so the result does not depend on the tree.
    """
    p, t = geom_array(pred), geom_array(truth)
    pi, ti, iou = iou_candidates(p, t)
    ok = iou >= iou_threshold * (1.0 - IOU_RTOL)
    pi, ti, iou = pi[ok], ti[ok], iou[ok]
    order = np.lexsort((ti, pi, -iou))
    used_p = np.zeros(len(p), dtype=bool)
    used_t = np.zeros(len(t), dtype=bool)
    pairs: list[tuple[int, int, float]] = []
    for k in order:
        a, b = pi[k], ti[k]
        if used_p[a] or used_t[b]:
            continue
        used_p[a] = used_t[b] = True
        pairs.append((int(a), int(b), float(iou[k])))
    tp = len(pairs)
    return PolygonMatch(tp=tp, fp=len(p) - tp, fn=len(t) - tp, pairs=pairs)


def polygon_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, F1 of polygon counts. With neither truths nor predictions all three are 1
    (nothing to find, nothing claimed); otherwise an empty denominator gives 0."""
    if tp + fp + fn == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}



def clean_truth(geoms: np.ndarray) -> np.ndarray:
    """Truth outlines ready to match: missing/empty ones dropped, invalid ones repaired (polygonal part)."""
    geoms = geoms[~shapely.is_missing(geoms)]
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms = geoms.copy()
        geoms[bad] = shapely.make_valid(geoms[bad])
        # keep the polygonal part of each repaired outline as one truth object
        geoms[bad] = [
            shapely.union_all([g for g in shapely.get_parts(x) if g.geom_type in ("Polygon", "MultiPolygon")])
            for x in geoms[bad]
        ]
    return geoms[~shapely.is_empty(geoms) & (shapely.area(geoms) > 0)]




def split_merge_counts(pred: Any, truth: Any, cover: float = 0.5, inside: float = 0.5,
                       part: float = 0.1) -> dict[str, int]:
    """How buildings were merged or split by the prediction (beside F1: pixel IoU barely moves when two
    houses merge, polygon recall halves).

    - `merges`: predictions that cover at least `cover` of the area of each of two or more truths;
      `merged_truths`: the truths involved.
    - `splits`: truths holding two or more predictions that each lie at least `inside` within the truth
      and cover at least `part` of it.
    """
    p, t = geom_array(pred), geom_array(truth)
    out = {"merges": 0, "merged_truths": 0, "splits": 0}
    if len(p) == 0 or len(t) == 0:
        return out
    pi, ti = shapely.STRtree(t).query(p, predicate="intersects")
    inter = shapely.area(shapely.intersection(p[pi], t[ti]))
    of_truth = inter / np.maximum(shapely.area(t[ti]), 1e-12)
    of_pred = inter / np.maximum(shapely.area(p[pi]), 1e-12)
    covers = of_truth >= cover
    merged_truths: set[int] = set()
    for k in np.unique(pi[covers]):
        truths = ti[covers & (pi == k)]
        if len(truths) >= 2:
            out["merges"] += 1
            merged_truths.update(truths.tolist())
    out["merged_truths"] = len(merged_truths)
    piece = (of_pred >= inside) & (of_truth >= part)
    out["splits"] = int(sum(1 for j in np.unique(ti[piece]) if np.count_nonzero(piece & (ti == j)) >= 2))
    return out
