"""The predict stage: georeference round trip, pixel-space scenes, calibration, reruns, real checkpoints.

The stage loads real segmenter checkpoints: `RedModel`'s twin (tests/checkpoint_fixtures.py: building
probability = red / 255, checked against `RedModel` below) and a tiny random one (pool layers, hidden 16).
Inference itself (windows, blending, blocks) is tests/test_inference.py's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from checkpoint_fixtures import red_checkpoint
from pyproj import Transformer
from rasterio import features
from shapely.geometry import Polygon, box, mapping
from test_inference import TILE, UTM, RedModel, _reader, _texture, _write_tif

from footprints.config import Config, DataConfig
from footprints.contracts.manifest import MANIFEST_COLUMNS, write_rows
from footprints.contracts.paths import RunPaths
from footprints.contracts.probability import read_probability
from footprints.polygons.inference import predict_scene
from footprints.prediction.calibration import resolve_calibration
from footprints.scoring.calibration import choose_calibration
from footprints.stages.predict import checkpoint_settings
from footprints.stages.predict import run as run_predict


def _cfg(tmp_path: Path, **predict) -> Config:
    cfg = Config()
    cfg.output_root = str(tmp_path / "outputs")
    cfg.cluster.workers = 0
    cfg.predict.overlap = 0.25
    cfg.predict.batch_size = 4
    for k, v in predict.items():
        setattr(cfg.predict, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------------
# georeference round trip through the whole stage (the red checkpoint), in UTM and in lon/lat


L_SHAPE_PX = Polygon([(20, 30), (90, 30), (90, 60), (50, 60), (50, 110), (20, 110)])  # (col, row)


def _painted_scene(path: Path, transform: Affine, crs: str) -> Polygon:
    """A scene with L_SHAPE_PX painted red (p = 0.9 under the red checkpoint) on dark ground (p ~ 0.16)."""
    rgb = np.full((3, 140, 150), 40, np.uint8)
    inside = features.rasterize([(mapping(L_SHAPE_PX), 1)], out_shape=(140, 150), transform=Affine.identity())
    rgb[0][inside == 1] = 230
    _write_tif(path, rgb, transform, crs)
    return shapely.affinity.affine_transform(L_SHAPE_PX, [transform.a, transform.b, transform.d, transform.e,
                                                          transform.c, transform.f])


@pytest.mark.parametrize(
    "crs,transform",
    [("EPSG:32631", UTM), ("EPSG:4326", Affine(4.5e-6, 0, 2.35, 0, -4.5e-6, 48.85))],  # ~0.5 m in Paris
    ids=["utm", "lonlat"],
)
def test_georeference_round_trip_within_one_pixel(tmp_path: Path, crs: str, transform: Affine):
    truth = _painted_scene(tmp_path / "images" / "scene.tif", transform, crs)
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0, checkpoint=str(red_checkpoint(tmp_path / "model")))
    out = run_predict(cfg, inputs=[str(tmp_path / "images" / "scene.tif")], output=str(tmp_path / "fp.geojson"))
    assert out["scenes"] == 1 and out["polygons"] == 1 and out["failed"] == 0
    raw = json.loads(Path(out["geojson"]).read_text())
    assert "crs" not in raw and len(raw["features"]) == 1
    ring = np.asarray(raw["features"][0]["geometry"]["coordinates"][0])
    assert shapely.Polygon(ring).exterior.is_ccw  # RFC 7946 winding
    # back to metres (UTM 31N) and compare with the truth there: every vertex within one pixel
    to_utm = Transformer.from_crs(4326, 32631, always_xy=True)
    got = Polygon(np.column_stack(to_utm.transform(ring[:, 0], ring[:, 1])))
    tr = Transformer.from_crs(crs, 32631, always_xy=True)
    want = shapely.transform(truth, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    (x0, x1, x2), (y0, y1, y2) = tr.transform(*(np.array([transform @ p for p in [(0, 0), (1, 0), (0, 1)]]).T))
    pixel_m = min(math.hypot(x1 - x0, y1 - y0), math.hypot(x2 - x0, y2 - y0))  # the shorter pixel side
    assert 0.3 < pixel_m < 0.55
    assert got.hausdorff_distance(want) <= pixel_m
    assert abs(got.area - want.area) / want.area < 0.02
    props = raw["features"][0]["properties"]
    assert props["scene"] == "scene" and abs(props["area_m2"] - want.area) / want.area < 0.02
    assert props["mean_prob"] == pytest.approx(230 / 255, abs=0.01)
    # the per-scene GeoPackage is projected (UTM for the lon/lat scene) and the COG keeps the scene grid
    assert pyogrio.read_info(out["gpkg"], layer="footprints")["crs"] == "EPSG:32631"
    with rasterio.open(Path(out["scene_dir"]) / "scene_prob.tif") as src:
        assert src.crs == rasterio.crs.CRS.from_string(crs) and src.transform.almost_equals(transform)


def test_png_without_labels_gives_pixel_space_output_and_a_warning(tmp_path: Path, caplog):
    rgb = np.full((3, 100, 120), 40, np.uint8)
    rgb[0, 20:50, 30:90] = 230
    (tmp_path / "images").mkdir()
    with rasterio.open(tmp_path / "images" / "x_pre_disaster.png", "w", driver="PNG", width=120, height=100,
                       count=3, dtype="uint8") as dst:
        dst.write(rgb)
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0, checkpoint=str(red_checkpoint(tmp_path / "model")))
    with caplog.at_level(logging.WARNING):
        out = run_predict(cfg, inputs=[str(tmp_path / "images")])
    assert any("polygons are in pixel coordinates" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and r.name == "footprints.prediction.scene")
    raw = json.loads(Path(out["geojson"]).read_text())
    assert len(raw["features"]) == 1
    got = Polygon(raw["features"][0]["geometry"]["coordinates"][0])
    assert got.hausdorff_distance(box(30, 20, 90, 50)) <= 1.0  # pixel coordinates (col, row)
    with rasterio.open(Path(out["scene_dir"]) / "x_pre_disaster_prob.tif") as src:
        assert src.crs is None


# ---------------------------------------------------------------------------------------------------
# calibration, reruns, bad scenes


def test_choose_calibration_takes_the_best_polygon_f1_then_ties():
    pixel = [[0.3, 90, 50, 10, 850], [0.5, 80, 20, 20, 880], [0.7, 40, 5, 60, 895]]
    polygon = [  # threshold, seed threshold, min area, tp, fp, fn
        [0.3, None, 0.0, 8, 12, 2], [0.3, None, 10.0, 8, 6, 2],
        [0.5, None, 0.0, 9, 9, 1], [0.5, None, 10.0, 9, 1, 1],  # F1 0.9: the best
        [0.7, None, 0.0, 5, 2, 5], [0.7, None, 10.0, 5, 0, 5],
    ]  # fmt: skip
    cal = choose_calibration(pixel, polygon)
    assert (cal["threshold"], cal["seed_threshold"], cal["min_area_m2"]) == (0.5, None, 10.0)
    assert cal["best"]["polygon_f1"] == pytest.approx(0.9)
    assert len(cal["grid"]) == 6
    # a tie on polygon F1 goes to the better pixel F1, then to the smaller minimum area
    tie = [[0.3, None, 0.0, 9, 1, 1], [0.5, None, 0.0, 9, 1, 1], [0.5, None, 10.0, 9, 1, 1]]
    assert (choose_calibration(pixel, tie)["threshold"], choose_calibration(pixel, tie)["min_area_m2"]) == (0.5, 0.0)
    assert cal["at_grid_edge"] == {}  # 0.5 lies inside; two areas are too few to call 10 an edge


def test_choose_calibration_says_when_the_choice_is_at_the_edge_of_its_grid():
    pixel = [[0.3, 90, 50, 10, 850], [0.5, 80, 20, 20, 880], [0.7, 40, 5, 60, 895]]
    polygon = [[t, s, a, 5, 5, 5] for t in (0.3, 0.5, 0.7) for s in (None, 0.5, 0.7, 0.9) for a in (0.0, 10.0, 40.0)]
    best = polygon.index([0.3, 0.9, 40.0, 5, 5, 5])
    polygon[best] = [0.3, 0.9, 40.0, 9, 1, 1]
    cal = choose_calibration(pixel, polygon)
    # the lowest threshold, the highest seed threshold and the largest minimum area: each may be beaten outside
    assert cal["at_grid_edge"] == {"threshold": [0.3, 0.5, 0.7], "seed_threshold": [0.5, 0.7, 0.9],
                                   "min_area_m2": [0.0, 10.0, 40.0]}
    polygon[best] = [0.3, 0.9, 40.0, 5, 5, 5]
    polygon[polygon.index([0.5, 0.7, 0.0, 5, 5, 5])] = [0.5, 0.7, 0.0, 9, 1, 1]
    assert choose_calibration(pixel, polygon)["at_grid_edge"] == {}  # no minimum area is a floor, not an edge


def _calibration_dataset(tmp_path: Path) -> Config:
    """val and test GeoTIFF scenes with vector labels: 4 buildings painted red 140 (p 0.55) and 6 small
    3x3 px blobs painted 230 (p 0.9) that are not buildings."""
    root = tmp_path / "data"
    buildings = [box(10, 10, 22, 22), box(40, 10, 52, 24), box(10, 50, 24, 62), box(60, 60, 75, 72)]
    blobs = [box(c, r, c + 3, r + 3) for r, c in [(30, 70), (80, 10), (85, 40), (5, 85), (45, 80), (90, 90)]]
    for sid in ("val1", "test1"):
        rgb = np.full((3, 100, 100), 20, np.uint8)
        for geoms, value in ((buildings, 140), (blobs, 230)):
            m = features.rasterize([(mapping(g), 1) for g in geoms], out_shape=(100, 100))
            rgb[0][m == 1] = value
        _write_tif(root / "images" / f"{sid}.tif", rgb, UTM, "EPSG:32631")
        t = UTM
        polys = [shapely.affinity.affine_transform(g, [t.a, t.b, t.d, t.e, t.c, t.f]) for g in buildings]
        import geopandas as gpd

        (root / "labels").mkdir(exist_ok=True)
        gpd.GeoDataFrame(geometry=polys, crs="EPSG:32631").to_file(root / "labels" / f"{sid}.geojson",
                                                                    driver="GeoJSON")
    cfg = _cfg(tmp_path, threshold_grid=[0.5, 0.7], min_area_grid=[0.0, 1.0, 5.0], hole_area_m2=0.0)
    cfg.data = DataConfig(root=str(root), format="geotiff", label_format="vector")
    tile_dir = RunPaths.of(cfg).stage("tile")
    tile_dir.mkdir(parents=True)
    # a manifest with the contract's columns that only says which scene is in which split
    write_rows(tile_dir / "manifest.csv", [{"scene_id": "val1", "split": "val", "labelled": True},
                                           {"scene_id": "test1", "split": "test", "labelled": True}], MANIFEST_COLUMNS)
    return cfg


def test_calibration_grid_search_on_val_picks_the_crafted_best_and_is_used(tmp_path: Path, caplog):
    cfg = _calibration_dataset(tmp_path)
    cfg.predict.checkpoint = str(red_checkpoint(tmp_path / "model"))
    with caplog.at_level(logging.WARNING, logger="footprints"):
        out = run_predict(cfg)
    cal = json.loads((RunPaths.of(cfg).stage("predict") / "calibration.json").read_text())
    # 0.5 finds the 4 buildings (p 0.55), 5 m2 drops the 2.25 m2 blobs; 0.7 would keep only blobs
    assert (cal["threshold"], cal["min_area_m2"]) == (0.5, 5.0)
    # 5 m2 is the largest of the grid's three areas: the user is told to widen it
    assert cal["at_grid_edge"] == {"min_area_m2": [0.0, 1.0, 5.0]}
    assert "min_area_m2 5.0 is at the edge of predict.min_area_grid [0.0, 1.0, 5.0]" in caplog.text
    assert cal["best"]["polygon_f1"] == 1.0 and cal["scenes"] == ["val1"]
    by_point = {(r["threshold"], r["min_area_m2"]): r for r in cal["grid"]}
    assert by_point[(0.5, 0.0)]["polygon_fp"] == 6 and by_point[(0.7, 5.0)]["polygon_tp"] == 0
    assert (out["threshold"], out["min_area_m2"]) == (0.5, 5.0)
    assert out["scenes"] == 1 and out["polygons"] == 4  # the test scene, with the calibrated settings
    summary = json.loads(RunPaths.of(cfg).predict_summary.read_text())
    assert summary == out  # the run's split: the stage returns its record
    assert list(summary) == ["geojson", "gpkg", "scenes", "failed", "skipped", "polygons", "threshold", "seed_threshold",
                             "min_area_m2", "calibration", "scene_dir", "seconds", "split", "key", "files"]
    assert len(pyogrio.read_dataframe(out["gpkg"], layer="footprints")) == 4
    # stored: a second resolution reads the file instead of searching again
    ckpt = Path(cfg.predict.checkpoint)
    again = resolve_calibration(cfg, checkpoint_settings(cfg, ckpt), ckpt)
    assert again["source"] == str(RunPaths.of(cfg).calibration) and again["threshold"] == 0.5


def test_rerun_skips_done_scenes_revectorises_on_new_threshold_and_reports_a_bad_scene(tmp_path: Path, caplog):
    images = tmp_path / "images"
    for i in range(2):
        _painted_scene(images / f"s{i}.tif", UTM @ Affine.translation(200 * i, 0), "EPSG:32631")
    (images / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0, checkpoint=str(red_checkpoint(tmp_path / "model")))
    kw = {"inputs": [str(images)]}
    with caplog.at_level(logging.ERROR):
        first = run_predict(cfg, **kw)
    assert (first["scenes"], first["failed"], first["skipped"]) == (2, 1, 0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "broken.tif" in errors[0] and "\n" not in errors[0]
    assert len(pyogrio.read_dataframe(first["geojson"])) == 2  # merged: one building per scene
    prob = Path(first["scene_dir"]) / "s0_prob.tif"
    mtime = prob.stat().st_mtime_ns
    second = run_predict(cfg, **kw)
    assert second["skipped"] == 2 and prob.stat().st_mtime_ns == mtime
    cfg.predict.threshold = 0.95  # above every pixel: polygons redone from the stored probabilities
    third = run_predict(cfg, **kw)
    assert third["skipped"] == 0 and third["polygons"] == 0 and prob.stat().st_mtime_ns == mtime
    marker = json.loads((Path(third["scene_dir"]) / "s0.json").read_text())
    assert marker["prob_reused"] is True and marker["vector"]["threshold"] == 0.95
    # the record's layout is that of earlier versions (their runs stay fresh)
    assert list(marker) == ["scene_id", "prob_key", "prob", "vector", "polygons", "crs", "area_km2", "vector_seconds",
                            "geojson", "gpkg", "prob_reused", "key", "files"]
    assert list(marker["vector"]) == ["threshold", "seed_threshold", "min_area_m2", "hole_area_m2", "simplify_px",
                                      "regularize"]
    assert pyogrio.read_info(third["gpkg"], layer="footprints")["features"] == 0  # an empty but valid merged layer
    fourth = run_predict(cfg, overwrite=True, **kw)
    assert fourth["skipped"] == 0 and prob.stat().st_mtime_ns != mtime


def test_predict_amp_and_compile_reach_the_model_and_full_precision_is_another_raster(tmp_path: Path, monkeypatch):
    """`predict.amp` goes to every window's autocast and `predict.compile` compiles the model once per process
    (the predict stage used to honour neither; only `bench predict` did)."""
    import footprints.model.segmenter as segmenter_module
    import footprints.prediction.scene as scene_module

    amps, compiled = [], []
    monkeypatch.setattr(scene_module, "predict_scene", lambda *a, **kw: amps.append(kw["amp"]) or predict_scene(*a, **kw))
    monkeypatch.setattr(segmenter_module, "compile_segmenter",
                        lambda model, size, device=None: compiled.append(size) or model)  # no compiler on CI
    _painted_scene(tmp_path / "images" / "s.tif", UTM, "EPSG:32631")
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0, checkpoint=str(red_checkpoint(tmp_path / "model")))
    first = run_predict(cfg, inputs=[str(tmp_path / "images")])
    assert amps == [True] and compiled == [] and first["polygons"] == 1
    key = json.loads((Path(first["scene_dir"]) / "s.json").read_text())["prob_key"]
    cfg.predict.amp, cfg.predict.compile = False, True
    second = run_predict(cfg, inputs=[str(tmp_path / "images")])
    assert amps == [True, False] and compiled == [(TILE, TILE)] and second["skipped"] == 0
    assert json.loads((Path(second["scene_dir"]) / "s.json").read_text())["prob_key"] != key


# ---------------------------------------------------------------------------------------------------
# the real segmenter, from a checkpoint file


def test_the_red_checkpoint_is_red_model_on_every_8_bit_value(tmp_path: Path):
    """The checkpoint the stage tests load gives the probability raster RedModel gives, byte for byte, on a
    scene holding every red value (and every green and blue one, which both ignore)."""
    from footprints.model.segmenter import load_segmenter

    rgb = np.stack([np.tile(np.arange(256, dtype=np.uint8), (96, 1)), _texture(96, 256, 1)[1],
                    _texture(96, 256, 2)[2]])
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    model, meta = load_segmenter(red_checkpoint(tmp_path / "model"))
    assert meta["tile_size"] == TILE
    for name, m in (("red", RedModel()), ("checkpoint", model)):
        with _reader(scene) as reader:
            predict_scene(reader, m, tmp_path / f"{name}.tif", tile_size=TILE, overlap=0.25, block_size=64)
    with rasterio.open(tmp_path / "red.tif") as a, rasterio.open(tmp_path / "checkpoint.tif") as b:
        want, got = a.read(1), b.read(1)
    assert sorted(np.unique(want)) == list(range(256))  # p = red / 255: every 8-bit probability
    np.testing.assert_array_equal(got, want)


def test_real_segmenter_checkpoint_predicts_and_blocks_agree(tmp_path: Path):
    from train_fixtures import tiny_segmenter

    model, meta = tiny_segmenter(16, TILE)
    model.eval()
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "meta": meta, "config": {}}, ckpt)
    scene = _write_tif(tmp_path / "images" / "real.tif", _texture(112, 100, seed=7), UTM, "EPSG:32631")
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0, block_size=48)
    out = run_predict(cfg, checkpoint=str(ckpt), inputs=[str(scene)], output=str(tmp_path / "o" / "fp.geojson"))
    assert out["scenes"] == 1 and out["failed"] == 0
    blocked, valid = read_probability(Path(out["scene_dir"]) / "real_prob.tif")
    assert valid.all() and blocked.shape == (112, 100)
    with _reader(scene) as reader:
        predict_scene(reader, model, tmp_path / "whole.tif", tile_size=TILE, overlap=0.25, batch_size=4,
                      block_size=4096)
    whole, _ = read_probability(tmp_path / "whole.tif")
    # same windows, other batches: equal up to float rounding in the convolutions (one uint8 step)
    assert np.abs(blocked - whole).max() <= 1 / 255 + 1e-6
