"""Stage 6, evaluate: pixel metrics (xView2 style) and polygon metrics (SpaceNet style) on the test split.

Pixel metrics: per scene, the predicted mask (`p >= threshold` on `<scene>_prob.tif`, the same rule as the
vectorisation) against the truth mask on the same grid, nodata left out; TP/FP/FN/TN are summed over all
scenes before the ratios are taken (as the xView2 scorer does), giving building IoU, precision, recall,
F1 (= the xView2 localisation F1) and the two-class mean IU.

Polygon metrics: the footprints of `<scene>.gpkg` against the truth polygons (label JSON, GeoJSON, or the
mask raster vectorised like the predictions), both in the scene's projected CRS (its UTM zone for lon/lat scenes). Matching is
SpaceNet's: greedy and one-to-one, candidate pairs from an STRtree, taken in order of decreasing IoU; a
pair is a match (true positive) when **IoU >= 0.5** (`evaluate.iou_threshold`; the comparison allows a
relative 1e-9 so that an IoU of exactly 0.5 computed in floating point counts). Unmatched predictions are
false positives, unmatched truths false negatives; precision, recall and F1 per scene and overall (counts
summed over scenes).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.windows import Window

from .atomic import atomic_path, write_json, write_text
from .config import Config
from .errors import InputError, StageError, as_input_error
from .metrics import confusion, pixel_metrics
from .vectorize import gpkg_crs_for_raster, polygons_from_probability, threshold_mask

log = logging.getLogger(__name__)

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


def _geom_array(geoms: Any) -> np.ndarray:
    if isinstance(geoms, (gpd.GeoDataFrame, gpd.GeoSeries)):
        geoms = geoms.geometry.values if isinstance(geoms, gpd.GeoDataFrame) else geoms.values
    arr = np.asarray(list(geoms) if not isinstance(geoms, np.ndarray) else geoms, dtype=object)
    return arr.reshape(-1)


def iou_candidates(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All intersecting (pred index, truth index, IoU > 0) pairs, found with an STRtree on the truths."""
    p, t = _geom_array(pred), _geom_array(truth)
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
    p, t = _geom_array(pred), _geom_array(truth)
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


# ---------------------------------------------------------------------------------------------------
# one scene


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




def read_predicted_polygons(path: Path, target_crs: Any) -> np.ndarray:
    """Footprints of a scene's GeoPackage, in `target_crs` (pixel space when both have no CRS)."""
    import pyogrio

    try:
        gdf = pyogrio.read_dataframe(path)
    except Exception as err:  # noqa: BLE001 - any GDAL failure is a bad input file
        raise InputError(path, f"cannot read footprints ({' '.join(str(err).split())[:160]})") from None
    if len(gdf) and target_crs is not None:
        if gdf.crs is None:
            raise InputError(path, "footprints have no CRS but the scene has one")
        gdf = gdf.to_crs(target_crs)
    return _geom_array(gdf.geometry)


def _pixel_counts(reader: Any, prob_path: Path, threshold: float, block_size: int) -> tuple[int, int, int, int]:
    tp = fp = fn = tn = 0
    try:
        ds = rasterio.open(prob_path)
    except rasterio.errors.RasterioError as err:
        raise InputError(prob_path, f"cannot open probability raster ({' '.join(str(err).split())[:160]})") from None
    with ds:
        if (ds.width, ds.height) != (reader.width, reader.height):
            raise InputError(prob_path, f"size {ds.width}x{ds.height} differs from the scene grid "
                                        f"{reader.width}x{reader.height} (predicted with another tile config?)")
        for r in range(0, ds.height, block_size):
            for c in range(0, ds.width, block_size):
                win = Window(c, r, min(block_size, ds.width - c), min(block_size, ds.height - r))
                pred = threshold_mask(ds.read(1, window=win), threshold)
                truth = reader.truth_mask(win).copy()
                truth[ds.read_masks(1, window=win) == 0] = 255  # nodata in the prediction: left out
                a, b, cnt, d = confusion(pred, truth, ignore=255)
                tp, fp, fn, tn = tp + a, fp + b, fn + cnt, tn + d
    return tp, fp, fn, tn


def _overlay(reader: Any, truth: np.ndarray, pred: np.ndarray, metric_crs: Any, path: Path,
             max_side: int = 1024) -> None:
    """PNG: the image (a centred crop of at most `max_side` px), truth outlines green, predictions red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    w, h = min(reader.width, max_side), min(reader.height, max_side)
    c0, r0 = (reader.width - w) // 2, (reader.height - h) // 2
    rgb, _ = reader.read(Window(c0, r0, w, h))
    inv = ~reader.transform

    def segments(geoms: np.ndarray) -> list[np.ndarray]:
        if len(geoms) == 0:
            return []
        if reader.crs is not None and metric_crs is not None:
            geoms = gpd.GeoSeries(geoms, crs=metric_crs).to_crs(reader.crs).values
        rings = shapely.get_rings(shapely.get_parts(np.asarray(geoms)))
        out = []
        for ring in rings:
            xy = shapely.get_coordinates(ring)
            col = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c - c0
            row = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f - r0
            out.append(np.column_stack([col, row]))
        return out

    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1)), dpi=100)
    ax.imshow(np.transpose(rgb, (1, 2, 0)), extent=(0, w, h, 0), interpolation="nearest")
    ax.add_collection(LineCollection(segments(truth), colors="#00ff66", linewidths=1.2, label="truth"))
    ax.add_collection(LineCollection(segments(pred), colors="#ff2a2a", linewidths=0.9, label="predicted"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.legend(loc="lower right", fontsize=8, framealpha=0.7)
    ax.set_title(f"{reader.scene_id}: truth (green), predicted (red)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def scene_truth_polygons(reader: Any, source: Any, hole_area_m2: float = 0.0, simplify_px: float = 1.0,
                         block_size: int = 2048) -> gpd.GeoDataFrame:
    """Truth polygons in the scene CRS: the label file's, or a mask raster vectorised block by block with the
    same settings as the predictions (hole filling, simplification; no area filter: truth is truth).

    Pass the predict settings (`predict.hole_area_m2`, `.simplify_px`, `.block_size`).
    """
    if getattr(source, "mask", None) is None or getattr(source, "label", None) is not None:
        return reader.truth_polygons()

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        t = reader.truth_mask(win)
        return np.where(t == 1, 255, 0).astype(np.uint8), t != 255

    return polygons_from_probability(
        read, reader.transform, reader.crs, threshold=0.5, min_area_m2=0.0,
        hole_area_m2=hole_area_m2, simplify_px=simplify_px, block_size=block_size, scene=reader.scene_id,
        pixel_size_m=reader.gsd_m,
        shape=(reader.height, reader.width),
    )


def evaluate_scene(source: Any, cfg: Config, pred_dir: str, out_dir: str, threshold: float,
                   overlay: bool) -> dict[str, Any]:
    """Pixel counts and polygon matches of one scene (top-level: runs on dask workers)."""
    from .scenes import open_scene

    pred_dir_p = Path(pred_dir)
    with open_scene(source, cfg.data, cfg.tile) as reader:
        sid = reader.scene_id
        prob_path = pred_dir_p / f"{sid}_prob.tif"
        gpkg_path = pred_dir_p / f"{sid}.gpkg"
        for p in (prob_path, gpkg_path):
            if not p.is_file():
                raise InputError(p, "missing prediction (run the predict stage on this split)")
        if not reader.has_labels:
            raise InputError(source.image, "no labels: nothing to evaluate against")
        counts = _pixel_counts(reader, prob_path, threshold, cfg.predict.block_size)
        metric_crs = gpkg_crs_for_raster(reader.transform, reader.crs, reader.width, reader.height)
        truth_gdf = scene_truth_polygons(reader, source, cfg.predict.hole_area_m2, cfg.predict.simplify_px,
                                         cfg.predict.block_size)
        if metric_crs is not None and len(truth_gdf):
            truth_gdf = truth_gdf.to_crs(metric_crs)
        truth = clean_truth(_geom_array(truth_gdf.geometry))
        pred = read_predicted_polygons(gpkg_path, metric_crs)
        match = match_polygons(pred, truth, cfg.evaluate.iou_threshold)
        overlay_path = None
        if overlay:
            overlay_path = Path(out_dir) / f"overlay_{sid}.png"
            _overlay(reader, truth, pred, metric_crs, overlay_path)
    tp, fp, fn, tn = counts
    return {
        "scene_id": sid,
        "pixel": pixel_metrics(tp, fp, fn, tn),
        "polygon": {**polygon_scores(match.tp, match.fp, match.fn), "n_truth": len(truth), "n_pred": len(pred),
                    "mean_matched_iou": float(np.mean([m[2] for m in match.pairs])) if match.pairs else None},
        "overlay": str(overlay_path) if overlay_path else None,
    }


def _evaluate_item(item: tuple[Any, bool], **kwargs: Any) -> dict[str, Any]:
    """(source, draw an overlay?) -> evaluate_scene; top-level so that dask can pickle it."""
    return evaluate_scene(item[0], overlay=item[1], **kwargs)


# ---------------------------------------------------------------------------------------------------
# the stage


def _thresholds(cfg: Config, pred_dir: Path) -> dict[str, Any]:
    import json

    cal_path = pred_dir / "calibration.json"
    cal: dict[str, Any] = {}
    if cal_path.is_file():
        try:
            cal = json.loads(cal_path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(cal_path, f"unreadable calibration ({err})") from None
    threshold = cfg.predict.threshold if cfg.predict.threshold is not None else cal.get("threshold")
    if threshold is None:
        log.warning("%s: no calibration and no predict.threshold; using 0.5", cal_path)
        threshold = 0.5
    min_area = cfg.predict.min_area_m2 if cfg.predict.min_area_m2 is not None else cal.get("min_area_m2")
    return {"threshold": float(threshold), "min_area_m2": min_area,
            "source": "config" if cfg.predict.threshold is not None else ("calibration" if cal else "default")}


def _test_sources(cfg: Config) -> list[Any]:
    from .scenes import discover_scenes
    from .tiling import read_manifest

    manifest = read_manifest(cfg.stage_dir("tile"))
    ids = set(manifest.loc[manifest["split"] == cfg.predict.split, "scene_id"])
    if not ids:
        raise StageError(f"no scenes in split {cfg.predict.split!r} of the tile manifest")
    sources = [s for s in discover_scenes(cfg.data) if s.scene_id in ids]
    missing = ids - {s.scene_id for s in sources}
    if missing:
        log.warning("%d %s scenes of the manifest are no longer under %s: %s", len(missing), cfg.predict.split,
                    cfg.data.root, ", ".join(sorted(missing)[:5]))
    return sorted(sources, key=lambda s: s.scene_id)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def render_report(result: dict[str, Any]) -> str:
    """Markdown report: settings, overall table, one row per scene."""
    o = result["overall"]
    px, pg = o["pixel"], o["polygon"]
    lines = [
        f"# Evaluation: {result['name']} ({result['split']} split, {len(result['per_scene'])} scenes)",
        "",
        f"Threshold {result['threshold']:.3f} ({result['threshold_source']}), minimum area "
        f"{_fmt(result['min_area_m2'])} m2; polygon match: greedy one-to-one by IoU, match when "
        f"IoU >= {result['iou_threshold']}. Pixel counts are summed over scenes (xView2); the xView2 "
        "localisation F1 is the pixel F1.",
        "",
        "| | building IoU | precision | recall | F1 | mean IU (2 classes) |",
        "|---|---|---|---|---|---|",
        f"| pixels | {_fmt(px['building_iou'])} | {_fmt(px['precision'])} | {_fmt(px['recall'])} | "
        f"{_fmt(px['f1'])} | {_fmt(px['mean_iu'])} |",
        "",
        "| | truth | predicted | TP | FP | FN | precision | recall | F1@IoU0.5 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| polygons | {pg['n_truth']} | {pg['n_pred']} | {pg['tp']} | {pg['fp']} | {pg['fn']} | "
        f"{_fmt(pg['precision'])} | {_fmt(pg['recall'])} | {_fmt(pg['f1'])} |",
        "",
        "## Per scene",
        "",
        "| scene | pixel IoU | pixel P | pixel R | pixel F1 | truth | pred | TP | FP | FN | poly P | poly R "
        "| poly F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sid, s in sorted(result["per_scene"].items()):
        p, g = s["pixel"], s["polygon"]
        lines.append(
            f"| {sid} | {_fmt(p['building_iou'])} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | "
            f"{_fmt(p['f1'])} | {g['n_truth']} | {g['n_pred']} | {g['tp']} | {g['fp']} | {g['fn']} | "
            f"{_fmt(g['precision'])} | {_fmt(g['recall'])} | {_fmt(g['f1'])} |"
        )
    if result.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s['scene']}: {s['reason']}" for s in result["skipped"]]
    overlays = [Path(s["overlay"]).name for s in result["per_scene"].values() if s.get("overlay")]
    if overlays:
        lines += ["", "## Overlays", ""] + [f"![{n}]({n})" for n in overlays]
    return "\n".join(lines) + "\n"


def overall_metrics(per_scene: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pixel and polygon metrics from counts summed over scenes."""
    keys = ("tp", "fp", "fn", "tn")
    pix = {k: sum(s["pixel"][k] for s in per_scene.values()) for k in keys}
    poly = {k: sum(s["polygon"][k] for s in per_scene.values()) for k in ("tp", "fp", "fn", "n_truth", "n_pred")}
    pixel = pixel_metrics(pix["tp"], pix["fp"], pix["fn"], pix["tn"])
    pixel["xview2_localization_f1"] = pixel["f1"]
    polygon = {**polygon_scores(poly["tp"], poly["fp"], poly["fn"]), "n_truth": poly["n_truth"],
               "n_pred": poly["n_pred"]}
    return {"pixel": pixel, "polygon": polygon}


def _inputs_newer(metrics_path: Path, pred_dir: Path) -> bool:
    if not metrics_path.is_file():
        return True
    t = metrics_path.stat().st_mtime
    return any(p.stat().st_mtime > t for p in pred_dir.glob("*") if p.is_file())


def run_evaluate(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate the predictions of `outputs/<name>/predict/` on the split they were made for."""
    import json

    from .cluster import map_scenes

    pred_dir = cfg.stage_dir("predict")
    out_dir = cfg.stage_dir("evaluate")
    metrics_path = out_dir / "metrics.json"
    geojson = pred_dir / "footprints.geojson"
    if not pred_dir.is_dir():
        raise StageError(f"{pred_dir}: no predictions (run the predict stage first)")
    th = _thresholds(cfg, pred_dir)
    if not overwrite and not _inputs_newer(metrics_path, pred_dir):
        try:
            saved = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            saved = {}
        same = (saved.get("split"), saved.get("iou_threshold"), saved.get("threshold")) == (
            cfg.predict.split, cfg.evaluate.iou_threshold, th["threshold"])
        if same and "overall" in saved:
            log.info("evaluate: %s is up to date (use --overwrite to redo)", metrics_path)
            _summary(saved)
            return saved
    sources = _test_sources(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_ids = {s.scene_id for s in sources[: max(cfg.evaluate.overlays, 0)]}
    per_scene: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    func = functools.partial(_evaluate_item, cfg=cfg, pred_dir=str(pred_dir), out_dir=str(out_dir),
                             threshold=th["threshold"])
    items = [(s, s.scene_id in overlay_ids) for s in sources]
    for (src, _), res, err in map_scenes(cfg.cluster, func, items, desc="evaluate"):
        if err is not None:
            reason = str(as_input_error(err, src.image))
            log.error("evaluate: %s: %s", src.scene_id, reason)
            skipped.append({"scene": src.scene_id, "reason": reason})
            continue
        per_scene[res["scene_id"]] = res
    if not per_scene:
        raise StageError(f"evaluate: no scene of the {cfg.predict.split} split could be evaluated "
                         f"({len(skipped)} skipped; see the log)")
    per_scene = dict(sorted(per_scene.items()))
    result: dict[str, Any] = {
        "name": cfg.name,
        "split": cfg.predict.split,
        "threshold": th["threshold"],
        "threshold_source": th["source"],
        "min_area_m2": th["min_area_m2"],
        "iou_threshold": cfg.evaluate.iou_threshold,
        "match_rule": f"greedy one-to-one by decreasing IoU, match when IoU >= {cfg.evaluate.iou_threshold}",
        "overall": overall_metrics(per_scene),
        "per_scene": per_scene,
        "skipped": skipped,
        "geojson": str(geojson),
        "metrics_path": str(metrics_path),
        "report": str(out_dir / "report.md"),
    }
    write_text(out_dir / "report.md", render_report(result))
    write_json(metrics_path, result)
    _summary(result)
    return result


def _summary(result: dict[str, Any]) -> None:
    px, pg = result["overall"]["pixel"], result["overall"]["polygon"]
    text = (
        f"evaluate {result['name']}: {len(result['per_scene'])} {result['split']} scenes | pixel building IoU "
        f"{px['building_iou']:.3f}, F1 (xView2 localisation) {px['f1']:.3f}, precision {px['precision']:.3f}, "
        f"recall {px['recall']:.3f}, mean IU {px['mean_iu']:.3f} | polygon F1@IoU>={result['iou_threshold']} "
        f"{pg['f1']:.3f} (P {pg['precision']:.3f}, R {pg['recall']:.3f}; {pg['tp']} TP, {pg['fp']} FP, "
        f"{pg['fn']} FN)"
    )
    log.info("%s", text)
    print(text, flush=True)
    print(f"metrics: {result['metrics_path']}", flush=True)
    print(f"footprints GeoJSON: {result['geojson']}", flush=True)
