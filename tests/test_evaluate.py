"""Evaluation: SpaceNet polygon matching on hand-made cases, and the stage on perfect and empty predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.windows import Window

from footprints.config import load_config
from footprints.contracts.footprint_files import write_geojson, write_gpkg
from footprints.contracts.freshness import write_record
from footprints.contracts.manifest import read_manifest
from footprints.contracts.paths import RunPaths, ScenePaths
from footprints.polygons.vectorize import polygons_from_probability
from footprints.scenes.geo import metric_crs_for
from footprints.scenes.reader import open_scene
from footprints.scenes.sources import discover_scenes
from footprints.scoring.matching import match_polygons, polygon_scores
from footprints.scoring.scene import truth_polygons
from footprints.stages.evaluate import overall_metrics
from footprints.stages.evaluate import run as run_evaluate
from footprints.stages.tile import run as run_tile
from footprints.synth.dataset import write_synthetic_dataset


def finish_predictions(pred_dir: Path, ids: list[str], split: str = "test") -> None:
    """What the predict stage writes beside its files (the contract evaluate reads): a record per scene
    with the vectorisation settings, and the stage summary naming the split."""
    vector = {"threshold": 0.5, "min_area_m2": 0.0, "hole_area_m2": 4.0, "simplify_px": 1.0}
    for sid in ids:
        sp = ScenePaths(pred_dir, sid)
        write_record(sp.record, "test", [p for p in (sp.prob, sp.gpkg) if p.is_file()], scene_id=sid, vector=vector)
    (pred_dir / "summary.json").write_text(json.dumps({"split": split, "calibration": "test"}))

box = shapely.box


# ---------------------------------------------------------------------------------------------------
# matching


def test_iou_exactly_half_is_a_match_and_just_below_is_not():
    truth = [box(1, 0, 4, 1)]
    exact = match_polygons([box(0, 0, 3, 1)], truth)  # intersection 2, union 4: IoU 0.5
    assert (exact.tp, exact.fp, exact.fn) == (1, 0, 0)
    assert exact.pairs[0][2] == pytest.approx(0.5)
    below = match_polygons([box(0, 0, 2.999, 1)], truth)  # IoU 1.999 / 4 < 0.5
    assert (below.tp, below.fp, below.fn) == (0, 1, 1)
    # the same in real-world coordinates (UTM metres), where the areas are rounded
    x0, y0 = 684123.37, 7466011.91
    t = [box(x0 + 1.1, y0, x0 + 4.4, y0 + 1.3)]
    p = [box(x0, y0, x0 + 3.3, y0 + 1.3)]  # intersection 2.2 x 1.3, union 4.4 x 1.3: IoU 0.5
    assert match_polygons(p, t).tp == 1


def test_greedy_one_to_one():
    truth = [box(0, 0, 10, 10)]
    preds = [box(0, 0, 10, 9), box(0, 0, 10, 8)]  # both IoU >= 0.5 with the one truth
    m = match_polygons(preds, truth)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.pairs == [(0, 0, pytest.approx(0.9))]  # the better one is matched
    # greedy by IoU: the best pair first, so the second truth still finds its prediction
    truth2 = [box(0, 0, 10, 10), box(6, 0, 16, 10)]
    preds2 = [box(0, 0, 10, 10), box(5, 0, 15, 10)]
    m2 = match_polygons(preds2, truth2)
    assert (m2.tp, m2.fp, m2.fn) == (2, 0, 0)
    assert sorted((a, b) for a, b, _ in m2.pairs) == [(0, 0), (1, 1)]


def test_scores_of_perfect_empty_and_nothing():
    assert polygon_scores(5, 0, 0)["f1"] == 1.0
    empty = polygon_scores(0, 0, 5)
    assert (empty["precision"], empty["recall"], empty["f1"]) == (0.0, 0.0, 0.0)
    assert polygon_scores(0, 0, 0)["f1"] == 1.0  # nothing there, nothing claimed
    s = polygon_scores(3, 1, 2)
    assert s["precision"] == pytest.approx(0.75) and s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    m = match_polygons([], [box(0, 0, 1, 1)])
    assert (m.tp, m.fp, m.fn) == (0, 0, 1)
    m = match_polygons([box(0, 0, 1, 1)], [])
    assert (m.tp, m.fp, m.fn) == (0, 1, 0)


def test_overall_sums_counts_over_scenes():
    per = {
        "a": {"pixel": {"tp": 10, "fp": 0, "fn": 0, "tn": 90}, "polygon": {"tp": 1, "fp": 0, "fn": 0,
                                                                          "n_truth": 1, "n_pred": 1}},
        "b": {"pixel": {"tp": 0, "fp": 10, "fn": 10, "tn": 80}, "polygon": {"tp": 0, "fp": 1, "fn": 3,
                                                                           "n_truth": 3, "n_pred": 1}},
    }
    o = overall_metrics(per)
    assert o["pixel"]["building_iou"] == pytest.approx(10 / 30)  # summed, not the mean of 1.0 and 0.0
    assert o["pixel"]["xview2_localization_f1"] == pytest.approx(20 / 40)
    assert o["polygon"]["f1"] == pytest.approx(2 / (2 + 1 + 3))


# ---------------------------------------------------------------------------------------------------
# the stage


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ev")
    data = root / "data"
    write_synthetic_dataset(data, n_scenes=4, seed=2, size=160, geotiff=False)  # 3 usable, 2 for test
    cfg = load_config(None, [
        "name=ev", f"output_root={root / 'outputs'}", f"data.root={data}", "tile.size=64", "tile.stride=64",
        "tile.split_ratios=[0.25,0.0,0.75]", "cluster.workers=0", "evaluate.overlays=1", "predict.block_size=64",
    ])
    run_tile(cfg)
    return cfg


def _write_predictions(cfg, kind: str) -> list[str]:
    """Predictions for the test scenes: `perfect` (truth mask as probability, truth polygons) or `empty`."""
    pred_dir = RunPaths.of(cfg).stage("predict")
    pred_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(RunPaths.of(cfg).stage("tile"))
    ids = sorted(set(manifest.loc[manifest["split"] == "test", "scene_id"]))
    layers = []
    for src in discover_scenes(cfg.data):
        if src.scene_id not in ids:
            continue
        with open_scene(src, cfg.data, cfg.tile) as r:
            truth = r.truth_mask(Window(0, 0, r.width, r.height))
            prob = np.where(truth == 1, 255, 0).astype(np.uint8) if kind == "perfect" else np.zeros_like(truth)
            with rasterio.open(pred_dir / f"{r.scene_id}_prob.tif", "w", driver="GTiff", width=r.width,
                               height=r.height, count=1, dtype="uint8", crs=r.crs, transform=r.transform) as dst:
                dst.write(prob, 1)
                dst.write_mask(np.where(truth == 255, 0, 255).astype(np.uint8))
            gdf = polygons_from_probability(np.zeros_like(prob), r.transform, r.crs, scene=r.scene_id)
            if kind == "perfect":
                tp = r.truth_polygons()
                gdf = tp.assign(scene=r.scene_id, area_m2=1.0, mean_prob=1.0, max_prob=1.0)
            write_gpkg(gdf, pred_dir / f"{r.scene_id}.gpkg",
                       crs=metric_crs_for(r.transform, r.crs, r.width, r.height))
            layers.append(gdf.to_crs(4326))
    import pandas as pd

    write_geojson(pd.concat(layers, ignore_index=True), pred_dir / "footprints.geojson")
    finish_predictions(pred_dir, ids)
    return ids


def test_stage_on_perfect_then_empty_prediction(tiled, capsys: pytest.CaptureFixture[str]):
    cfg = tiled
    ids = _write_predictions(cfg, "perfect")
    assert len(ids) == 2
    res = run_evaluate(cfg, overwrite=True)
    px, pg = res["overall"]["pixel"], res["overall"]["polygon"]
    assert px["tp"] > 0 and px["fp"] == 0 and px["fn"] == 0
    assert px["building_iou"] == 1.0 and px["f1"] == 1.0 and px["mean_iu"] == 1.0
    assert pg["n_truth"] > 0 and pg["tp"] == pg["n_truth"] == pg["n_pred"] and pg["f1"] == 1.0
    assert sorted(res["per_scene"]) == ids
    ev = RunPaths.of(cfg).stage("evaluate")
    saved = json.loads((ev / "metrics.json").read_text())
    assert saved["overall"]["polygon"]["f1"] == 1.0 and res["metrics_path"] == str(ev / "metrics.json")
    report = (ev / "report.md").read_text()
    assert all(i in report for i in ids) and "IoU >= 0.5" in report
    overlays = sorted(ev.glob("overlay_*.png"))
    assert [p.name for p in overlays] == [f"overlay_{ids[0]}.png"]
    assert overlays[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "footprints.geojson" in out and "polygon F1" in out

    # up to date: a second run without --overwrite reads the saved result
    again = run_evaluate(cfg)
    assert again["overall"] == saved["overall"]
    cfg.evaluate.iou_threshold = 0.99  # a changed setting is not up to date
    strict = run_evaluate(cfg)
    assert strict["iou_threshold"] == 0.99 and strict["overall"]["polygon"]["tp"] == pg["tp"]  # IoU 1 still
    cfg.evaluate.iou_threshold = 0.5

    _write_predictions(cfg, "empty")
    res = run_evaluate(cfg)  # predictions are newer than metrics.json: recomputed without --overwrite
    px, pg = res["overall"]["pixel"], res["overall"]["polygon"]
    assert px["tp"] == 0 and px["fp"] == 0 and px["fn"] > 0
    assert px["building_iou"] == 0.0 and px["recall"] == 0.0 and px["f1"] == 0.0
    assert px["mean_iu"] == pytest.approx(px["background_iou"] / 2)
    assert pg["tp"] == 0 and pg["n_pred"] == 0 and pg["fn"] == pg["n_truth"] > 0
    assert pg["recall"] == 0.0 and pg["f1"] == 0.0


def test_missing_prediction_is_skipped_with_its_path(tiled):
    from footprints.errors import StageError

    cfg = tiled
    ids = _write_predictions(cfg, "perfect")
    pred_dir = RunPaths.of(cfg).stage("predict")
    (pred_dir / f"{ids[0]}.gpkg").unlink()
    res = run_evaluate(cfg, overwrite=True)
    assert list(res["per_scene"]) == ids[1:]
    assert res["skipped"] == [{"scene": ids[0], "reason": f"{pred_dir / ids[0]}.gpkg: missing prediction "
                                                          "(run the predict stage on this split)"}]
    assert ids[0] in (RunPaths.of(cfg).stage("evaluate") / "report.md").read_text().split("## Skipped")[1]
    (pred_dir / f"{ids[1]}_prob.tif").unlink()
    with pytest.raises(StageError, match="no scene"):  # nothing usable left: the stage fails
        run_evaluate(cfg, overwrite=True)


def test_mask_labels_are_vectorised_like_predictions(tmp_path: Path):
    """A GeoTIFF scene (UTM) with a mask raster: truth polygons get the predictions' cleaning."""
    from affine import Affine

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    tf = Affine(0.5, 0, 684000.0, 0, -0.5, 7466000.0)
    mask = np.zeros((96, 96), np.uint8)
    mask[10:50, 10:60] = 255  # a building with a 1 m2 hole (filled) and a 25 m2 courtyard (kept)
    mask[15:17, 15:17] = 0
    mask[30:40, 30:40] = 0
    mask[60:80, 70:90] = 255  # crosses the 64-px block border
    rgb = np.stack([np.where(mask > 0, 200, 60)] * 3).astype(np.uint8)
    for name, arr, count in (("images", rgb, 3), ("masks", mask[None], 1)):
        with rasterio.open(data / name / "s1.tif", "w", driver="GTiff", width=96, height=96, count=count,
                           dtype="uint8", crs="EPSG:32723", transform=tf) as dst:
            dst.write(arr)
    cfg = load_config(None, [
        "name=m", f"output_root={tmp_path / 'outputs'}", f"data.root={data}", "data.format=geotiff",
        "data.label_format=mask", "data.stretch_percentiles=[0,100]", "tile.size=64", "tile.stride=64",
        "tile.split_ratios=[0,0,1]", "cluster.workers=0", "predict.block_size=64", "predict.hole_area_m2=4.0",
    ])
    (src,) = discover_scenes(cfg.data)
    with open_scene(src, cfg.data, cfg.tile) as r:
        truth = truth_polygons(r, hole_area_m2=4.0, simplify_px=1.0, block_size=64)  # in the scene's UTM CRS
    assert len(truth) == 2
    interiors = sorted(len(g.interiors) for g in truth)
    assert interiors == [0, 1]  # the 1 m2 hole is filled, the courtyard kept
    expected = polygons_from_probability(mask, tf, "EPSG:32723", threshold=0.5, hole_area_m2=4.0, simplify_px=1.0)
    assert shapely.union_all(truth).equals(shapely.union_all(expected.geometry.values))

    # the stage on this scene: a prediction vectorised the same way matches every truth polygon
    run_tile(cfg)
    pred_dir = RunPaths.of(cfg).stage("predict")
    pred_dir.mkdir(parents=True)
    with rasterio.open(pred_dir / "s1_prob.tif", "w", driver="GTiff", width=96, height=96, count=1, dtype="uint8",
                       crs="EPSG:32723", transform=tf) as dst:
        dst.write(mask, 1)
    write_gpkg(expected.assign(scene="s1"), pred_dir / "s1.gpkg")
    finish_predictions(pred_dir, ["s1"])
    res = run_evaluate(cfg, overwrite=True)
    assert res["overall"]["polygon"]["f1"] == 1.0 and res["overall"]["polygon"]["tp"] == 2
    assert res["overall"]["pixel"]["building_iou"] == 1.0
    # the threshold is the one the predict stage recorded for the scene, and where it came from
    assert res["threshold"] == 0.5 and res["threshold_source"] == "test"
