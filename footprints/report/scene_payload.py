"""A scene as the page's data: its vectors read and slimmed (`prepare`), then its JSON entry (`scene_payload`).

`prepare` decides whether a scene is georeferenced (lon/lat on the map) or in pixel space (its own grid,
y up, laid beside the other pixel-space scenes), and reads its footprints and matches; `scene_payload`
joins them with the scene's rendered overlays (`scene_rasters.render_scene`) in the map's coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affine import Affine

from . import rasters
from .scene import ReportScene, note
from .scene_rasters import RasterPlacement, SceneRasters, safe_raster_placement
from .vectors import DAMAGE_PROPS, FeatureStore, bbox, slim_feature

log = logging.getLogger(__name__)

COORD_DECIMALS = 7  # degrees: ~1 cm (the GeoJSON outputs' own precision)
PIXEL_DECIMALS = 3


@dataclass
class PreparedScene:
    """A scene ready for the page: where its rasters lie, whether it is georeferenced, its slimmed vectors
    (`damage`: its graded footprints, None when the run has no damage layer)."""

    scene: ReportScene
    placement: RasterPlacement | None
    geo: bool
    pred: list[dict[str, Any]]
    truth: list[dict[str, Any]]
    has_matches: bool
    damage: list[dict[str, Any]] | None = None


def prepare(scene: ReportScene, cache: FeatureStore) -> PreparedScene:
    """Place `scene` and read its footprints and matches from `cache`; what is missing is noted on it."""
    placement = safe_raster_placement(scene, scene.prob, "probability raster")
    if placement is None and scene.prob is not None and Path(scene.prob).is_file():
        scene.prob = None  # unreadable: not rendered either
    if placement is not None:
        geo = placement.crs is not None
    elif scene.image_crs is not None:
        geo = bool(scene.image_crs)
    elif scene.image is not None and Path(scene.image).is_file():
        placement = safe_raster_placement(scene, scene.image, "imagery")  # the image's own grid places it
        geo = placement is not None and placement.crs is not None  # (and sizes a pixel-space scene)
        if placement is None:
            scene.image = None
    else:
        geo = True  # only vectors: RFC 7946 GeoJSON is lon/lat
    decimals = COORD_DECIMALS if geo else PIXEL_DECIMALS
    raw = cache.features(scene.footprints, scene.scene_id)
    pred = [f for f in (slim_feature(x, decimals) for x in raw or []) if f is not None]
    truth: list[dict[str, Any]] = []
    has_matches = False
    matches = cache.features(scene.matches, scene.scene_id)
    if matches is not None:
        m_pred = [
            f
            for f in (
                slim_feature(x, decimals)
                for x in matches
                if (x.get("properties") or {}).get("kind", "pred") == "pred"
            )
            if f is not None
        ]
        truth = [
            f
            for f in (
                slim_feature(x, decimals)
                for x in matches
                if (x.get("properties") or {}).get("kind") == "truth"
            )
            if f is not None
        ]
        if raw is None or len(m_pred) == len(pred):
            pred, has_matches = m_pred, True
        else:
            log.warning(
                "report: %s: %d predictions in %s but %d in %s; colouring by probability instead of TP/FP",
                scene.scene_id,
                len(m_pred),
                scene.matches,
                len(pred),
                scene.footprints,
            )
            note(
                scene,
                f"matches ({len(m_pred)} predictions) disagree with the footprints ({len(pred)}): "
                "coloured by probability",
            )
    if raw is None and scene.footprints is not None:
        note(scene, f"footprints not found: {scene.footprints}")
    damage = None
    if scene.damage is not None:
        graded = cache.features(scene.damage, scene.scene_id)
        if graded is None:
            note(scene, f"damage grades not found: {scene.damage}")
        damage = [f for f in (slim_feature(x, decimals, DAMAGE_PROPS) for x in graded or []) if f is not None]
    return PreparedScene(scene, placement, geo, pred, truth, has_matches, damage)


def scene_payload(p: PreparedScene, r: SceneRasters, dx: float) -> dict[str, Any]:
    """The scene's entry in the page's data; a pixel-space scene is flipped y up and shifted `dx` right."""
    s = p.scene
    bounds = None
    for ov in (r.prob, r.image):
        if ov is not None:
            bounds = [list(ov.bounds[0]), list(ov.bounds[1])]
            break
    frame = {"flip": False, "dx": 0.0}
    if not p.geo:
        t = (
            p.placement.prob_transform
            if p.placement is not None and p.placement.prob_transform is not None
            else Affine.identity()
        )
        frame = {"flip": t.e > 0, "dx": dx}
        if bounds is not None:  # scene coordinates -> map coordinates (y up, scenes side by side)
            (y0, x0), (y1, x1) = bounds
            ys = sorted(-y if frame["flip"] else y for y in (y0, y1))
            bounds = [[ys[0], x0 + dx], [ys[1], x1 + dx]]
    if bounds is None:
        bb = bbox(p.pred + p.truth + (p.damage or []))
        if bb is not None:
            x0, y0, x1, y1 = bb
            if not p.geo:
                ys = sorted(-y if frame["flip"] else y for y in (y0, y1))
                bounds = [[ys[0], x0 + dx], [ys[1], x1 + dx]]
            else:
                bounds = [[y0, x0], [y1, x1]]

    def ov_json(ov: rasters.Overlay | None) -> dict[str, Any] | None:
        if ov is None:
            return None
        d = ov.as_json()
        if not p.geo:
            (y0, x0), (y1, x1) = ov.bounds
            ys = sorted(-y if frame["flip"] else y for y in (y0, y1))
            d["bounds"] = [[ys[0], x0 + dx], [ys[1], x1 + dx]]
        return d

    entry: dict[str, Any] = {
        "id": s.scene_id,
        "kind": "geo" if p.geo else "pixel",
        "split": s.split,
        "bounds": bounds,
        "frame": frame,
        "image": ov_json(r.image),
        "prob": ov_json(r.prob),
        "footprints": p.pred,
        "truth": p.truth,
        "has_matches": p.has_matches,
        "notes": list(s.notes),
        "domain_score": s.domain_score,
    }
    if p.damage is not None:  # only in a run with a damage layer: other pages stay as they were
        entry["damage"] = p.damage
    if r.post is not None:  # a damage run's post-disaster imagery, on the image's place
        entry["post"] = ov_json(r.post)
    return entry


def pixel_width(p: PreparedScene) -> float:
    """How wide a pixel-space scene is in its own units (its raster's, or its vectors' extent)."""
    pl = p.placement
    if pl is not None and pl.prob_size is not None and pl.prob_transform is not None:
        return abs(pl.prob_transform.a) * pl.prob_size[0]
    bb = bbox(p.pred + p.truth + (p.damage or []))
    return (bb[2] - bb[0]) if bb else 0.0
