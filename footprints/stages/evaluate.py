"""Stage 6, evaluate: pixel metrics (xView2 style) and polygon metrics (SpaceNet style) on the predicted scenes.

Reads what the predict stage wrote (`predict/summary.json`, and per scene `<scene>_prob.tif`, `<scene>.gpkg`
and `<scene>.json`, whose record holds the threshold and cleaning settings used) and the truth of those
scenes; writes `evaluate/metrics.json` (its freshness record), `report.md` and `overlay_<scene>.png`.

Pixel metrics: per scene, the predicted mask (`p >= threshold` on `<scene>_prob.tif`, the rule of the
vectorisation) against the truth mask on the same grid, nodata left out; TP/FP/FN/TN are summed over all
scenes before the ratios are taken (as the xView2 scorer does), giving building IoU, precision, recall,
F1 (= the xView2 localisation F1) and the two-class mean IU.

Polygon metrics: the footprints of `<scene>.gpkg` against the truth polygons (`footprints.scoring.scene`), matched
one-to-one at IoU >= `evaluate.iou_threshold` (`footprints.scoring.matching`); precision, recall and F1 per scene
and overall (counts summed over scenes).

Several data sources (`data.sources`): every figure also per source (`per_source`, counts summed over the
source's scenes), in metrics.json and report.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.windows import Window

from ..atomic import write_text
from ..config import Config
from ..contracts.footprint_files import (
    SceneLayer,
    empty_footprints,
    merge_scene_layers,
    read_footprints,
    write_geojson,
)
from ..contracts.freshness import digest, file_digest, is_fresh, read_record, unmark, write_record
from ..contracts.manifest import split_scene_ids, split_sources
from ..contracts.paths import RunPaths, ScenePaths, reserved_scene_id
from ..contracts.predict_records import PredictSummary, read_predict_scene_record, read_predict_summary
from ..errors import InputError, StageError, as_input_error
from ..runtime.cluster import map_scenes
from ..scenes.sources import scene_config
from ..scoring.matching import match_polygons, polygon_scores, split_merge_counts
from ..scoring.metrics import pixel_metrics
from ..scoring.plots import polygon_rings, write_overlay
from ..scoring.scene import metric_crs, pixel_counts, truth_polygons

log = logging.getLogger(__name__)

BLOCK = 2048  # rows/cols of a scene scored at once (bounded memory)
OVERLAY_MAX_SIDE = 1024


def _overlay(reader: Any, truth: np.ndarray, pred: np.ndarray, crs: Any, path: Path) -> None:
    """The image (a centred crop of at most OVERLAY_MAX_SIDE px), truth outlines green, predictions red."""
    import geopandas as gpd

    w, h = min(reader.width, OVERLAY_MAX_SIDE), min(reader.height, OVERLAY_MAX_SIDE)
    c0, r0 = (reader.width - w) // 2, (reader.height - h) // 2
    rgb, _ = reader.read(Window(c0, r0, w, h))

    def rings(geoms: np.ndarray) -> list[np.ndarray]:
        if len(geoms) and reader.crs is not None and crs is not None:
            geoms = gpd.GeoSeries(geoms, crs=crs).to_crs(reader.crs).values
        return polygon_rings(geoms, ~reader.transform, c0, r0)

    write_overlay(path, rgb, rings(truth), rings(pred), f"{reader.scene_id}: truth (green), predicted (red)")


def evaluate_scene(source: Any, cfg: Config, pred_dir: str, out_dir: str, overlay: bool) -> dict[str, Any]:
    """Pixel counts and polygon matches of one scene (top-level: runs on dask workers)."""
    from ..scenes.reader import open_scene

    reserved = reserved_scene_id(source.scene_id)
    if reserved is not None:  # predict refused it: its record would be the run's summary.json
        raise InputError(source.image, reserved)
    sp = ScenePaths(Path(pred_dir), source.scene_id)
    for p in (sp.prob, sp.gpkg, sp.record):
        if not p.is_file():
            raise InputError(p, "missing prediction (run the predict stage on this split)")
    record = read_predict_scene_record(sp.record)
    vector = record.vector if record is not None else None
    if vector is None:
        raise InputError(sp.record, "unfinished prediction (rerun the predict stage)")
    # the grid predict read the scene on: the model's GSD when predict resampled it (predict.match_model_gsd)
    gsd = record.prob.get("target_gsd_m") if record is not None else None
    tile = dataclasses.replace(cfg.tile, target_gsd=float(gsd)) if gsd else cfg.tile
    with open_scene(source, scene_config(source, cfg.data), tile) as reader:
        if not reader.has_labels:
            raise InputError(source.image, "no labels: nothing to evaluate against")
        threshold = float(vector.threshold)
        tp, fp, fn, tn = pixel_counts(reader, sp.prob, [threshold], BLOCK)[threshold].tolist()
        crs = metric_crs(reader)
        truth = truth_polygons(reader, float(vector.hole_area_m2), float(vector.simplify_px), BLOCK)
        pred_layer = read_footprints(sp.gpkg, crs)
        pred = np.asarray(pred_layer.geometry.values, dtype=object)
        match = match_polygons(pred, truth, cfg.evaluate.iou_threshold)
        matches_path = Path(out_dir) / "matches" / f"{reader.scene_id}.geojson"
        write_geojson(_matches_layer(pred_layer, truth, match, crs, reader.scene_id), matches_path)
        overlay_path = None
        if overlay:
            overlay_path = Path(out_dir) / f"overlay_{reader.scene_id}.png"
            _overlay(reader, truth, pred, crs, overlay_path)
    return {
        "scene_id": source.scene_id,
        **({"source": source.source_name} if source.source_name else {}),  # its data source, when several
        "threshold": threshold,
        "seed_threshold": vector.seed_threshold,
        "min_area_m2": vector.min_area_m2,
        "pixel": pixel_metrics(tp, fp, fn, tn),
        "polygon": {**polygon_scores(match.tp, match.fp, match.fn), "n_truth": len(truth), "n_pred": len(pred),
                    "mean_matched_iou": float(np.mean([m[2] for m in match.pairs])) if match.pairs else None,
                    **split_merge_counts(pred, truth)},
        "matches": str(matches_path),
        "crs": "" if crs is None else crs.to_string(),  # "": pixel space (the merged layers leave it out)
        "overlay": str(overlay_path) if overlay_path else None,
    }


def _matches_layer(pred: Any, truth: np.ndarray, match: Any, crs: Any, scene_id: str) -> Any:
    """Predictions (kind `pred`, status TP/FP) and truths (kind `truth`, status TP/FN) with their IoU: what
    the HTML report and QGIS colour."""
    import geopandas as gpd
    import pandas as pd

    pred_iou = np.zeros(len(pred))
    truth_iou = np.zeros(len(truth))
    for i, j, iou in match.pairs:
        pred_iou[i], truth_iou[j] = iou, iou
    matched_p = {i for i, _, _ in match.pairs}
    matched_t = {j for _, j, _ in match.pairs}
    p = pred.assign(kind="pred", status=["TP" if i in matched_p else "FP" for i in range(len(pred))],
                    iou=pred_iou)
    t = gpd.GeoDataFrame({
        "scene": scene_id, "area_m2": shapely.area(truth) if crs is not None else np.nan, "mean_prob": np.nan,
        "max_prob": np.nan, "kind": "truth", "status": ["TP" if j in matched_t else "FN" for j in range(len(truth))],
        "iou": truth_iou}, geometry=gpd.GeoSeries(truth, crs=pred.crs if pred.crs is not None else crs))
    layer = gpd.GeoDataFrame(pd.concat([p, t], ignore_index=True), geometry="geometry", crs=t.crs)
    return layer


def _evaluate_item(item: tuple[Any, bool], **kwargs: Any) -> dict[str, Any]:
    """(source, draw an overlay?) -> evaluate_scene; top-level so that dask can pickle it."""
    return evaluate_scene(item[0], overlay=item[1], **kwargs)


# ---------------------------------------------------------------------------------------------------
# the stage


def _predicted(paths: RunPaths) -> PredictSummary:
    """The predict stage's summary of the run (which split, which threshold)."""
    summary = read_predict_summary(paths.predict_summary)
    if summary is None:
        raise StageError(f"{paths.predict_summary}: no predictions (run the predict stage first)")
    if summary.split is None:
        raise StageError(f"{paths.predict_summary}: no split recorded (rerun the predict stage)")
    return summary


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
        "| | truth | predicted | TP | FP | FN | precision | recall | F1@IoU0.5 | merges | splits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| polygons | {pg['n_truth']} | {pg['n_pred']} | {pg['tp']} | {pg['fp']} | {pg['fn']} | "
        f"{_fmt(pg['precision'])} | {_fmt(pg['recall'])} | {_fmt(pg['f1'])} | {_fmt(pg.get('merges'))} | "
        f"{_fmt(pg.get('splits'))} |",
        "",
        "A merge: one predicted polygon covering half or more of each of two or more true buildings; a split: "
        "a true building holding two or more predicted polygons that each lie mostly inside it.",
        "",
        "## Per scene",
        "",
        "| scene | pixel IoU | pixel P | pixel R | pixel F1 | truth | pred | TP | FP | FN | poly P | poly R "
        "| poly F1 | merges | splits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sid, s in sorted(result["per_scene"].items()):
        p, g = s["pixel"], s["polygon"]
        lines.append(
            f"| {sid} | {_fmt(p['building_iou'])} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | "
            f"{_fmt(p['f1'])} | {g['n_truth']} | {g['n_pred']} | {g['tp']} | {g['fp']} | {g['fn']} | "
            f"{_fmt(g['precision'])} | {_fmt(g['recall'])} | {_fmt(g['f1'])} | {_fmt(g.get('merges'))} | "
            f"{_fmt(g.get('splits'))} |"
        )
    lines += _source_lines(result.get("per_source") or {})
    lines += damage_lines(result.get("damage"))
    if result.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s['scene']}: {s['reason']}" for s in result["skipped"]]
    overlays = [Path(s["overlay"]).name for s in result["per_scene"].values() if s.get("overlay")]
    if overlays:
        lines += ["", "## Overlays", ""] + [f"![{n}]({n})" for n in overlays]
    return "\n".join(lines) + "\n"


def damage_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What evaluate keeps of the damage stage's metrics.json: the pooled scores and counts, the baselines'."""
    return {k: metrics.get(k) for k in ("per_building", "pixel", "xview2", "counts", "truth_counts", "scenes",
                                        "baselines")}


def damage_lines(damage: dict[str, Any] | None) -> list[str]:
    """The report's damage section: xView2's figures, and per grade on the truth buildings."""
    if not damage:
        return []
    counts = ", ".join(f"{g} {n}" for g, n in (damage.get("counts") or {}).items())
    lines = ["", "## Damage", "", f"Graded footprints: {counts}."]
    if damage.get("per_building") is None:
        return lines + ["", "The test scenes' post-disaster labels carry no grades: nothing to score."]
    x, b = damage["xview2"], damage["per_building"]
    lines += ["", "xView2's figures over the truth buildings' pixels, each graded by the footprint over it "
              f"(a pixel under none is a miss): localisation F1 {_fmt(x['localisation_f1'])}, damage F1 "
              f"{_fmt(x['damage_f1'])} (harmonic mean of the four grades' F1), score {_fmt(x['score'])} "
              "(0.3 x localisation + 0.7 x damage).", "",
              "Per building, the truth outlines graded (each building once; un-classified left out): damage F1 "
              f"**{_fmt(b['damage_f1'])}**, damaged/undamaged macro F1 **{_fmt(b['binary']['macro_f1'])}**.", "",
              "| grade | buildings | precision | recall | F1 |", "|---|---|---|---|---|"]
    for grade, g in b["per_grade"].items():
        lines.append(f"| {grade} | {int(g['support'])} | {_fmt(g['precision'])} | {_fmt(g['recall'])} | "
                     f"{_fmt(g['f1'])} |")
    grades = list(b["per_grade"])
    lines += ["", "Confusion per building (rows: truth, columns: predicted):", "",
              "| truth \\ predicted | " + " | ".join(grades) + " |", "|---" * (len(grades) + 1) + "|"]
    for grade, row in zip(grades, b["confusion"], strict=True):
        lines.append(f"| {grade} | " + " | ".join(str(int(v)) for v in row) + " |")
    if damage.get("baselines"):
        lines += ["", "Beside the model, baselines fitted on its training buildings and scored on the same truth "
                  "buildings: the majority grade, the same classifier on the pre-disaster scene alone, colour "
                  "statistics in a class-balanced random forest.", "",
                  "| grader | damage F1 | damaged/undamaged macro F1 | " + " | ".join(f"{g} F1" for g in grades) + " |",
                  "|---" * (len(grades) + 3) + "|"]
        for name, scores in [("**the model**", b), *damage["baselines"].items()]:
            lines.append(f"| {name} | {_fmt(scores['damage_f1'])} | {_fmt(scores['binary']['macro_f1'])} | "
                         + " | ".join(_fmt(scores["per_grade"][g]["f1"]) for g in grades) + " |")
    return lines


def _source_lines(per_source: dict[str, dict[str, Any]]) -> list[str]:
    """The report's per-source table (several data sources): each source's counts pooled over its scenes."""
    if not per_source:
        return []
    lines = ["", "## Per source", "", "Counts summed over each source's scenes, as the overall figures are.", "",
             "| source | scenes | pixel IoU | pixel P | pixel R | pixel F1 | truth | pred | TP | FP | FN | poly P "
             "| poly R | poly F1 | merges | splits |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in per_source.items():
        p, g = s["pixel"], s["polygon"]
        lines.append(
            f"| {name} | {s['scenes']} | {_fmt(p['building_iou'])} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | "
            f"{_fmt(p['f1'])} | {g['n_truth']} | {g['n_pred']} | {g['tp']} | {g['fp']} | {g['fn']} | "
            f"{_fmt(g['precision'])} | {_fmt(g['recall'])} | {_fmt(g['f1'])} | {_fmt(g.get('merges'))} | "
            f"{_fmt(g.get('splits'))} |")
    return lines


def source_metrics(per_scene: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`overall_metrics` of each data source's scenes (`source` of a scene's result), in order of first
    appearance, with their number of scenes; empty when the scenes come from one `data.root`."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for sid, s in per_scene.items():
        if s.get("source"):
            groups.setdefault(s["source"], {})[sid] = s
    return {name: {"scenes": len(group), **overall_metrics(group)} for name, group in groups.items()}


def overall_metrics(per_scene: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pixel and polygon metrics from counts summed over scenes."""
    keys = ("tp", "fp", "fn", "tn")
    pix = {k: sum(s["pixel"][k] for s in per_scene.values()) for k in keys}
    poly = {k: sum(s["polygon"][k] for s in per_scene.values()) for k in ("tp", "fp", "fn", "n_truth", "n_pred")}
    pixel = pixel_metrics(pix["tp"], pix["fp"], pix["fn"], pix["tn"])
    pixel["xview2_localization_f1"] = pixel["f1"]
    polygon = {**polygon_scores(poly["tp"], poly["fp"], poly["fn"]), "n_truth": poly["n_truth"],
               "n_pred": poly["n_pred"]}
    for k in ("splits", "merges", "merged_truths"):  # when every scene has them (older results may not)
        if all(k in s["polygon"] for s in per_scene.values()):
            polygon[k] = sum(s["polygon"][k] for s in per_scene.values())
    return {"pixel": pixel, "polygon": polygon}


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate the run's predictions on the split they were made for."""
    paths = RunPaths.of(cfg)
    pred_dir, out_dir, metrics_path = paths.predict, paths.evaluate, paths.metrics
    predicted = _predicted(paths)
    split = predicted.split
    sources = split_sources(paths.tile, cfg.data, split)
    if not sources and not split_scene_ids(paths.tile, split):
        # a run with no test split (a model to deploy: every labelled scene trains or validates)
        log.info("evaluate %s: the run has no %s split (no scene of the tile manifest is in it): nothing to "
                 "evaluate", cfg.name, split)
        return {"name": cfg.name, "split": split, "scenes": 0, "evaluated": False}
    if not sources:
        raise StageError(f"no scenes in split {split!r} of the tile manifest")
    records = {s.scene_id: ScenePaths(pred_dir, s.scene_id).record for s in sources}
    damage_file = paths.damage_metrics if cfg.damage is not None and paths.damage_metrics.is_file() else None
    key = digest({"iou_threshold": cfg.evaluate.iou_threshold, "overlays": cfg.evaluate.overlays,
                  "predictions": {sid: file_digest(p) if p.is_file() else None for sid, p in records.items()},
                  **({"damage": file_digest(damage_file)} if damage_file is not None else {})})
    if not overwrite and is_fresh(metrics_path, key):
        log.info("evaluate: %s is up to date (use --overwrite to redo)", metrics_path)
        saved = read_record(metrics_path) or {}
        _summary(saved)
        if not paths.report.is_file():
            _html_report(paths)
        return saved
    unmark(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_ids = {s.scene_id for s in sources[: max(cfg.evaluate.overlays, 0)]}
    per_scene: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    func = functools.partial(_evaluate_item, cfg=cfg, pred_dir=str(pred_dir), out_dir=str(out_dir))
    items = [(s, s.scene_id in overlay_ids) for s in sources]
    for (src, _), res, err in map_scenes(cfg.cluster, func, items, desc="evaluate"):
        if err is not None:
            reason = str(as_input_error(err, src.image))
            log.error("evaluate: %s: %s", src.scene_id, reason)
            skipped.append({"scene": src.scene_id, "reason": reason})
            continue
        per_scene[res["scene_id"]] = res
    if not per_scene:
        raise StageError(f"evaluate: no scene of the {split} split could be evaluated "
                         f"({len(skipped)} skipped; see the log)")
    per_scene = dict(sorted(per_scene.items()))
    _merge_matches(per_scene, paths)
    first = next(iter(per_scene.values()))
    result: dict[str, Any] = {
        "name": cfg.name,
        "split": split,
        "threshold": first["threshold"],
        "seed_threshold": first.get("seed_threshold"),
        "threshold_source": predicted.calibration or "config",
        "min_area_m2": first["min_area_m2"],
        "iou_threshold": cfg.evaluate.iou_threshold,
        "match_rule": f"greedy one-to-one by decreasing IoU, match when IoU >= {cfg.evaluate.iou_threshold}",
        "overall": overall_metrics(per_scene),
        **({"per_source": by_source} if (by_source := source_metrics(per_scene)) else {}),
        "per_scene": per_scene,
        "skipped": skipped,
        "geojson": str(predicted.geojson if predicted.geojson is not None else paths.footprints_geojson),
        "metrics_path": str(metrics_path),
        "report": str(out_dir / "report.md"),
    }
    if damage_file is not None:  # the damage stage's scores, beside the footprints' (a damage: section)
        result["damage"] = damage_summary(read_record(damage_file) or {})
    write_text(out_dir / "report.md", render_report(result))
    overlays = [s["overlay"] for s in per_scene.values() if s.get("overlay")]
    result = write_record(metrics_path, key, [out_dir / "report.md", paths.matches, *overlays], **result)
    _summary(result)
    _html_report(paths)
    return result


def _merge_matches(per_scene: dict[str, Any], paths: RunPaths) -> None:
    """`evaluate/matches.geojson` (RFC 7946) and `matches.gpkg` (styled by status for QGIS): every scene's,
    streamed a scene at a time from `evaluate/matches/<scene>.geojson` (`merge_scene_layers`, the rules of
    predict's merged layers: the GeoPackage in the UTM zone of the layer's centre)."""
    import pandas as pd

    schema = empty_footprints(4326).assign(kind=pd.Series(dtype=object), status=pd.Series(dtype=object),
                                           iou=pd.Series(dtype="float64"))
    # results without "crs" (older runs) were all merged as lon/lat
    scenes = [SceneLayer(sid, Path(s["matches"]), georeferenced=bool(s.get("crs", True)))
              for sid, s in per_scene.items()]
    merge_scene_layers(scenes, paths.matches, paths.matches.with_suffix(".gpkg"), layer="matches", schema=schema)


def _html_report(paths: RunPaths) -> None:
    """The run's offline HTML map (`report/index.html`): a view of the files, so it never fails the stage."""
    from ..report import report_for_run

    try:
        print(f"HTML report: {report_for_run(paths.root)['path']}", flush=True)
    except Exception as err:  # noqa: BLE001 - the report is a view; it must not fail the evaluation
        log.warning("evaluate: no HTML report (%s: %s)", type(err).__name__, err)


def _summary(result: dict[str, Any]) -> None:
    px, pg = result["overall"]["pixel"], result["overall"]["polygon"]
    text = (
        f"evaluate {result['name']}: {len(result['per_scene'])} {result['split']} scenes | pixel building IoU "
        f"{px['building_iou']:.3f}, F1 (xView2 localisation) {px['f1']:.3f}, precision {px['precision']:.3f}, "
        f"recall {px['recall']:.3f}, mean IU {px['mean_iu']:.3f} | polygon F1@IoU>={result['iou_threshold']} "
        f"{pg['f1']:.3f} (P {pg['precision']:.3f}, R {pg['recall']:.3f}; {pg['tp']} TP, {pg['fp']} FP, "
        f"{pg['fn']} FN; {pg.get('merges', '-')} merges, {pg.get('splits', '-')} splits)"
    )
    for name, s in (result.get("per_source") or {}).items():
        text += (f"\n  source {name}: {s['scenes']} scenes | pixel building IoU {s['pixel']['building_iou']:.3f}, "
                 f"F1 {s['pixel']['f1']:.3f} | polygon F1 {s['polygon']['f1']:.3f} (P {s['polygon']['precision']:.3f}, "
                 f"R {s['polygon']['recall']:.3f}; {s['polygon']['tp']} TP, {s['polygon']['fp']} FP, "
                 f"{s['polygon']['fn']} FN)")
    log.info("%s", text)
    print(text, flush=True)
    print(f"metrics: {result['metrics_path']}", flush=True)
    print(f"footprints GeoJSON: {result['geojson']}", flush=True)
