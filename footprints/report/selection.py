"""Which scenes a report page shows: at most `MAX_SCENES`, however many the run has.

A page inlines its scenes' footprints whole, so a page of every scene of a large run (xView2's test split)
would grow with the run, and the report process would hold them all (to see by how much: the `bytes` of
`write_report`'s summary with `max_scenes` raised to the run's scene count). So the page shows a fixed number of
scenes, chosen deterministically from the small per-scene records alone (no footprint file is opened for
a scene that is not shown):

- evaluated scenes with the most polygon errors (FP + FN) first: where a reader should look, and what the
  metrics table explains; ties by scene id;
- then scenes without metrics (not evaluated, or `predict --input` outputs) in the order of a hash of
  their id: a fixed sample that depends neither on the naming (xView2 ids sort by disaster) nor on the
  other scenes of the run.

The page says how many scenes the run has and how many it shows; the "all scenes" metrics cover all.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Mapping
from typing import Any

MAX_SCENES = 50


def polygon_errors(metrics: Mapping[str, Any] | None) -> int | None:
    """FP + FN of a scene's evaluation entry, None when it has none."""
    pg = (metrics or {}).get("polygon") or {}
    if pg.get("fp") is None and pg.get("fn") is None:
        return None
    return int(pg.get("fp") or 0) + int(pg.get("fn") or 0)


def _rank(item: tuple[str, Mapping[str, Any] | None]) -> tuple[int, int, str]:
    scene_id, metrics = item
    errors = polygon_errors(metrics)
    if errors is not None:
        return (0, -errors, scene_id)
    return (1, 0, hashlib.sha256(scene_id.encode("utf-8")).hexdigest())


def choose_scenes(scenes: Iterable[tuple[str, Mapping[str, Any] | None]], limit: int = MAX_SCENES) -> list[str]:
    """The ids of the (at most `limit`) scenes a page shows, in scene-id order; `scenes`: (id, evaluate's
    per-scene entry or None). Time linear in the number of scenes, memory in `limit`."""
    return sorted(sid for sid, _ in heapq.nsmallest(max(int(limit), 0), scenes, key=_rank))


def describe(total: int, shown: int, evaluated: bool) -> str:
    """The sentence the page says about the scenes it shows (`evaluated`: the run has per-scene metrics)."""
    if shown >= total:
        return f"All {total} scene{'s' if total != 1 else ''} of the run are shown."
    if evaluated:
        how = "those with the most polygon errors, FP + FN, first"
        rest = (f"The metrics row “all {total} scenes” covers every scene; each scene's metrics are in "
                "evaluate/metrics.json and evaluate/report.md.")
    else:
        how = "a fixed sample, ordered by a hash of the scene id"
        rest = "Every scene's footprints are in the merged GeoJSON and GeoPackage."
    return f"The run has {total} scenes; this page shows {shown} of them ({how}) to stay small. {rest}"
