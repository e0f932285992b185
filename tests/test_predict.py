"""Predict: window grid and blending, blocked == whole, COG output, georeference round trip, calibration.

Most tests inject stand-in models (plain nn.Modules) so that they do not depend on training; one runs
the real Segmenter (tiny: pool layers, hidden 16) through a checkpoint file.
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
from pyproj import Transformer
from rasterio import features
from rasterio.windows import Window
from shapely.geometry import Polygon, box, mapping
from torch import nn

from footprints.calibration import choose_calibration
from footprints.config import Config, DataConfig, TileConfig
from footprints.contracts.manifest import MANIFEST_COLUMNS, write_rows
from footprints.contracts.paths import RunPaths
from footprints.contracts.probability import read_probability
from footprints.inference import (
    Grid,
    predict_block,
    predict_scene,
    ramp_weights,
    window_origins,
    window_stride,
)
from footprints.scenes import open_scene
from footprints.sources import SceneSource
from footprints.stages.predict import build_settings, resolve_calibration
from footprints.stages.predict import run as run_predict

TILE = 64  # test windows: small and fast

# ---------------------------------------------------------------------------------------------------
# stand-in models: rgb float (B, 3, H, W) in 0..255 -> logits (B, 2, H, W)


def _logits(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


class ConstantModel(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(torch.full_like(x[:, 0], self.p))


class RedModel(nn.Module):
    """p = red / 255, pixel by pixel (a painted building comes back exactly where it was painted)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(x[:, 0] / 255.0)


class ContextModel(nn.Module):
    """Depends on a 9x9 neighbourhood with zero padding, so a window's border pixels differ by window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = nn.functional.avg_pool2d(x[:, :1], 9, stride=1, padding=4, count_include_pad=True)[:, 0]
        return _logits(torch.sigmoid((m - 100.0) / 30.0))


class PositionModel(nn.Module):
    """p grows from 0.2 to 0.8 left to right inside every window: an unblended mosaic jumps at each seam."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        ramp = 0.2 + 0.6 * torch.arange(w, dtype=torch.float32) / (w - 1)
        return _logits(ramp.expand(x.shape[0], x.shape[-2], w).clone())


# ---------------------------------------------------------------------------------------------------
# scenes


def _write_tif(path: Path, rgb: np.ndarray, transform: Affine, crs: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": rgb.shape[2], "height": rgb.shape[1], "count": 3, "dtype": "uint8",
               "transform": transform}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb)
    return path


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 255, size=(3, h, w), dtype=np.uint8)  # no 0: 0 is nodata


def _reader(path: Path):
    return open_scene(SceneSource(path), DataConfig(format="geotiff"), TileConfig(size=TILE, stride=TILE))


def _cfg(tmp_path: Path, **predict) -> Config:
    cfg = Config()
    cfg.output_root = str(tmp_path / "outputs")
    cfg.cluster.workers = 0
    cfg.predict.overlap = 0.25
    cfg.predict.batch_size = 4
    for k, v in predict.items():
        setattr(cfg.predict, k, v)
    return cfg


UTM = Affine(0.5, 0, 448000.0, 0, -0.5, 5411000.0)  # 0.5 m pixels, UTM 31N (near Paris)


# ---------------------------------------------------------------------------------------------------
# the grid and the weights


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 1024])
def test_window_grid_covers_every_pixel_with_the_overlap_asked(length: int):
    stride = window_stride(TILE, 0.25)
    assert stride == 48  # 25% of 64 px overlap
    o = window_origins(length, TILE, stride)
    assert o[0] == 0
    assert o[-1] == max(0, length - TILE)  # the last window is flush with the edge (or the only one)
    assert np.all(np.diff(o) <= stride) and np.all(np.diff(o) > 0)
    covered = np.zeros(length, bool)
    for r in o:
        covered[r : r + TILE] = True
    assert covered.all()


def test_ramp_weights_sum_to_one_across_a_regular_overlap():
    stride = window_stride(TILE, 0.25)
    w = ramp_weights(TILE, stride)[TILE // 2]  # one row through the middle
    total = np.zeros(stride * 4 + TILE)
    for k in range(5):
        total[k * stride : k * stride + TILE] += w
    inner = total[TILE : stride * 4]  # where two windows always meet or one covers alone
    np.testing.assert_allclose(inner, 1.0, atol=1e-12)
    assert w.min() > 0 and w.max() == 1.0


# ---------------------------------------------------------------------------------------------------
# seams, blocks, COG


@pytest.mark.parametrize("prob_dtype", ["uint8", "float16"])
def test_constant_model_gives_constant_raster_across_blocks_and_windows(tmp_path: Path, prob_dtype: str):
    scene = _write_tif(tmp_path / "s.tif", _texture(230, 170), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        out = predict_scene(reader, ConstantModel(0.6), tmp_path / "p.tif", tile_size=TILE, overlap=0.25,
                            batch_size=3, block_size=50, prob_dtype=prob_dtype)
    assert out["grid_windows"] == 5 * 4 and out["windows"] == 20  # 20 blocks, yet every window runs once
    with rasterio.open(tmp_path / "p.tif") as src:
        raw = src.read(1)
    if prob_dtype == "uint8":
        assert raw.dtype == np.uint8 and np.all(raw == 153)  # 0.6 * 255, every pixel
    else:
        assert np.all(np.abs(raw - 0.6) < 1e-3) and np.ptp(raw) == 0  # float16 storage, one value


def test_scene_smaller_than_a_window_and_flips_averaged(tmp_path: Path):
    scene = _write_tif(tmp_path / "s.tif", _texture(20, 30), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        out = predict_scene(reader, PositionModel(), tmp_path / "p.tif", tile_size=TILE, tta_flips=True,
                            prob_dtype="float16")
    assert out["windows"] == 1
    prob, valid = read_probability(tmp_path / "p.tif")
    assert prob.shape == (20, 30) and valid.all()
    ramp = 0.2 + 0.6 * np.arange(TILE) / (TILE - 1)
    want = (2 * ramp + ramp[::-1]) / 3  # identity and vertical flip see the ramp, the horizontal flip reverses it
    np.testing.assert_allclose(prob[7], want[:30], atol=1e-3)


def test_tapered_blending_leaves_no_seam_where_an_unblended_mosaic_jumps(tmp_path: Path):
    scene = _write_tif(tmp_path / "s.tif", _texture(64, 300), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        predict_scene(reader, PositionModel(), tmp_path / "p.tif", tile_size=TILE, overlap=0.25, block_size=128,
                      prob_dtype="float16")
    prob, _ = read_probability(tmp_path / "p.tif")
    step = np.abs(np.diff(prob[32].astype(np.float64)))
    # inside a window the model rises 0.6/63 per px; the seams of a mosaic would jump by ~0.45
    assert step.max() < 0.05, step.max()
    np.testing.assert_allclose(prob, np.broadcast_to(prob[:1], prob.shape), atol=1e-3)  # rows agree
    # the same windows with flat weights (a plain average) keep a step at every window border
    with _reader(scene) as reader:
        grid = Grid(300, 64, TILE, window_stride(TILE, 0.25))
        flat, _, _ = predict_block(reader, PositionModel(), Window(0, 0, 300, 64), grid,
                                   weights=np.ones((TILE, TILE)))
    assert flat.shape == (1, 64, 300)  # one band: the building probability of a two-class model
    assert np.abs(np.diff(flat[0, 32].astype(np.float64))).max() > 0.1


def test_blocked_result_equals_whole_scene_result(tmp_path: Path):
    rgb = _texture(210, 190, seed=3)
    rgb[:, :30, :40] = 0  # a nodata corner
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    outs = {}
    for block in (4096, 70, 97):
        with _reader(scene) as reader:
            predict_scene(reader, ContextModel(), tmp_path / f"b{block}.tif", tile_size=TILE, overlap=0.3,
                          batch_size=5, block_size=block, prob_dtype="float16", tta_flips=True)
        outs[block] = read_probability(tmp_path / f"b{block}.tif")
    whole, valid = outs[4096]
    assert np.ptp(whole[valid]) > 0.2  # a non-trivial probability field
    assert not valid[:30, :40].any() and valid[30:, :].all() and valid[:, 40:].all()
    for block in (70, 97):
        np.testing.assert_array_equal(outs[block][0], whole)
        np.testing.assert_array_equal(outs[block][1], valid)


def test_work_alongside_the_cog_sees_what_the_cog_holds(tmp_path: Path):
    """`alongside` (predict vectorises there while the COG is written) reads the same probabilities, mask,
    transform and CRS as the finished COG; its result comes back, and nothing temporary is left."""
    from footprints.vectorize import polygons_from_probability

    rgb = _texture(300, 260, seed=5)
    rgb[:, :40, :50] = 0  # a nodata corner: the mask must come through too
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    seen = {}

    def alongside(path: Path):
        with rasterio.open(path) as src:
            seen.update(values=src.read(), mask=src.read_masks(1), transform=src.transform, crs=src.crs)
        return polygons_from_probability(path, threshold=0.5)

    with _reader(scene) as reader:
        out = predict_scene(reader, ContextModel(), tmp_path / "p.tif", tile_size=TILE, block_size=128,
                            alongside=alongside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif", "s.tif"]
    with rasterio.open(tmp_path / "p.tif") as src:
        np.testing.assert_array_equal(seen["values"], src.read())
        np.testing.assert_array_equal(seen["mask"], src.read_masks(1))
        assert seen["transform"] == src.transform and seen["crs"] == src.crs
    assert not seen["mask"][:40, :50].any() and seen["mask"][40:].all()
    from_cog = polygons_from_probability(tmp_path / "p.tif", threshold=0.5)
    assert len(from_cog) > 0 and len(out["alongside"]) == len(from_cog)
    assert shapely.equals(from_cog.geometry.union_all(), out["alongside"].geometry.union_all())


def test_probability_raster_is_a_cog_on_the_scene_grid(tmp_path: Path):
    scene = _write_tif(tmp_path / "s.tif", _texture(600, 1100), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        predict_scene(reader, ConstantModel(0.25), tmp_path / "p.tif", tile_size=TILE, block_size=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif", "s.tif"]  # no temporary left behind
    with rasterio.open(tmp_path / "p.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile["tiled"] and src.block_shapes[0] == (512, 512)
        assert src.overviews(1)  # 1100 px > one 512 px block: overviews exist
        assert src.crs.to_epsg() == 32631
        assert src.transform.almost_equals(UTM)
        assert (src.width, src.height) == (1100, 600)
        assert src.dtypes[0] == "uint8" and np.all(src.read(1) == 64)  # round(0.25 * 255)


# ---------------------------------------------------------------------------------------------------
# georeference round trip through the whole stage (stand-in model), in UTM and in lon/lat


L_SHAPE_PX = Polygon([(20, 30), (90, 30), (90, 60), (50, 60), (50, 110), (20, 110)])  # (col, row)


def _painted_scene(path: Path, transform: Affine, crs: str) -> Polygon:
    """A scene with L_SHAPE_PX painted red (p = 0.9 under RedModel) on dark ground (p ~ 0.16)."""
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
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0)
    out = run_predict(cfg, inputs=[str(tmp_path / "images" / "scene.tif")], output=str(tmp_path / "fp.geojson"),
                      model=RedModel(), meta={"tile_size": TILE})
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
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0)
    with caplog.at_level(logging.WARNING):
        out = run_predict(cfg, inputs=[str(tmp_path / "images")], model=RedModel(), meta={"tile_size": TILE})
    assert any("polygons are in pixel coordinates" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and r.name == "footprints.stages.predict")
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
    with caplog.at_level(logging.WARNING, logger="footprints"):
        out = run_predict(cfg, model=RedModel(), meta={"tile_size": TILE})
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
    assert len(pyogrio.read_dataframe(out["gpkg"], layer="footprints")) == 4
    # stored: a second resolution reads the file instead of searching again
    settings = build_settings(cfg, None, {"tile_size": TILE}, {}, "injected-model")
    again = resolve_calibration(cfg, settings, None, model=RedModel())
    assert again["source"].endswith("calibration.json") and again["threshold"] == 0.5


def test_rerun_skips_done_scenes_revectorises_on_new_threshold_and_reports_a_bad_scene(tmp_path: Path, caplog):
    images = tmp_path / "images"
    for i in range(2):
        _painted_scene(images / f"s{i}.tif", UTM @ Affine.translation(200 * i, 0), "EPSG:32631")
    (images / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    cfg = _cfg(tmp_path, threshold=0.5, min_area_m2=0.0)
    kw = {"inputs": [str(images)], "model": RedModel(), "meta": {"tile_size": TILE}}
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
    assert pyogrio.read_info(third["gpkg"], layer="footprints")["features"] == 0  # an empty but valid merged layer
    fourth = run_predict(cfg, overwrite=True, **kw)
    assert fourth["skipped"] == 0 and prob.stat().st_mtime_ns != mtime


# ---------------------------------------------------------------------------------------------------
# the real segmenter, from a checkpoint file


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


# ---------------------------------------------------------------------------------------------------
# bounded memory


class SyntheticReader:
    """A large scene generated on the fly (no file): rgb from the pixel coordinates, all valid."""

    def __init__(self, size: int):
        self.width = self.height = size
        self.transform, self.crs, self.scene_id = UTM, rasterio.crs.CRS.from_epsg(32631), "big"

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        r = np.arange(int(window.row_off), int(window.row_off + window.height))[:, None]
        c = np.arange(int(window.col_off), int(window.col_off + window.width))[None, :]
        v = ((r * 7 + c * 3) % 251).astype(np.uint8)
        return np.broadcast_to(v, (3, *v.shape)).copy(), np.ones(v.shape, bool)


def _peak_bytes(size: int, path: Path) -> tuple[int, dict]:
    import tracemalloc

    tracemalloc.start()
    try:
        # blocks of 576 px, a multiple of the window stride (96): every interior block reads the same halo,
        # so the two scenes below differ in area only, not in the largest halo a block reads
        out = predict_scene(SyntheticReader(size), RedModel(), path, tile_size=128, overlap=0.25, batch_size=16,
                            block_size=576)
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_block_not_the_scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import footprints.inference as inference

    size = 2880
    # one block at a time (no read-ahead, no write-behind): how many blocks the pipeline's threads hold at
    # a given moment depends on timing, and a 4-block scene does not always fill the queues
    with monkeypatch.context() as m:
        m.setattr(inference, "READ_AHEAD", 0)
        m.setattr(inference, "WRITE_BEHIND", 0)
        small, _ = _peak_bytes(1152, tmp_path / "small_sync.tif")
        big, _ = _peak_bytes(size, tmp_path / "big_sync.tif")
    # 6.25 times the pixels, the same peak (numpy/torch allocations: block + halo buffers, one batch)
    assert big < 1.3 * small, (big, small)
    # pipelined (the defaults): at most READ_AHEAD + WRITE_BEHIND blocks more than one at a time
    peak, out = _peak_bytes(size, tmp_path / "big.tif")
    assert peak < (1 + inference.READ_AHEAD + inference.WRITE_BEHIND) * small, (peak, small)
    assert peak < size * size * 4 / 1.5  # less than the scene's float32 probabilities alone
    assert out["valid_px"] == size * size
    with rasterio.open(tmp_path / "big.tif") as src:
        assert src.overviews(1) and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        corner = src.read(1, window=Window(size - 96, size - 96, 96, 96))
    rc = np.arange(size - 96, size)
    want = ((rc[:, None] * 7 + rc[None, :] * 3) % 251).astype(np.uint8)
    assert np.abs(corner.astype(int) - want).max() <= 1  # pointwise model: blending returns the value


# ---------------------------------------------------------------------------------------------------
# nodata is skipped, progress is reported


class CountingModel(nn.Module):
    """RedModel that counts the windows it sees."""

    def __init__(self):
        super().__init__()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return _logits(x[:, 0] / 255.0)


def test_windows_and_blocks_without_a_valid_pixel_are_never_run(tmp_path: Path):
    rgb = np.zeros((3, 700, 900), np.uint8)  # nodata (0) everywhere but one small patch of ground
    rgb[:, 300:340, 610:660] = _texture(40, 50, seed=5)
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    outs = {}
    for block in (4096, 128):
        model = CountingModel()
        with _reader(scene) as reader:
            out = predict_scene(reader, model, tmp_path / f"b{block}.tif", tile_size=TILE, overlap=0.25,
                                block_size=block, prob_dtype="float16")
        outs[block] = read_probability(tmp_path / f"b{block}.tif")
        grid = Grid(900, 700, TILE, window_stride(TILE, 0.25))
        touching = sum(1 for r in grid.rows for c in grid.cols if r < 340 and r + TILE > 300 and c < 660
                       and c + TILE > 610)
        assert model.windows == out["windows"] == touching  # only the windows that see the valid patch
        assert out["skipped_windows"] == grid.n_windows - touching and out["valid_px"] == 40 * 50
        if block == 128:
            assert out["empty_blocks"] > 30  # most blocks read, none of their windows run
    prob, valid = outs[4096]
    assert valid.sum() == 40 * 50 and valid[300:340, 610:660].all()
    assert np.all(prob[~valid] == 0)  # invalid pixels: probability 0, masked
    np.testing.assert_array_equal(outs[128][0], prob)
    np.testing.assert_array_equal(outs[128][1], valid)


def test_progress_is_logged_for_scenes_of_several_blocks_when_stderr_is_no_terminal(tmp_path, caplog,
                                                                                      monkeypatch):
    import footprints.inference as inference

    monkeypatch.setattr(inference, "PROGRESS_LOG_S", 0.0)
    with caplog.at_level(logging.INFO, logger="footprints.inference"):
        predict_scene(SyntheticReader(512), RedModel(), tmp_path / "p.tif", tile_size=TILE, block_size=128)
    lines = [r.getMessage() for r in caplog.records if r.name == "footprints.inference"]
    assert any("of 121 windows" in m and "skipped as nodata" in m for m in lines), lines
    assert lines[-1].startswith("big: 121 windows run, 0 skipped")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="footprints.inference"):  # one block: nothing to report
        predict_scene(SyntheticReader(200), RedModel(), tmp_path / "q.tif", tile_size=TILE, block_size=512)
    assert not [r for r in caplog.records if r.name == "footprints.inference"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_autocast_pipeline_blocked_equals_whole_scene(tmp_path: Path):
    from footprints.backbone import hypercolumn_channels, resolve_layers
    from footprints.segmenter import build_segmenter

    layers = resolve_layers("pool")
    meta = {"layers": layers, "in_channels": hypercolumn_channels(layers), "hidden": 16, "stride": 2,
            "backbone": {"weights": "random", "normalization": "torchvision"}}
    torch.manual_seed(0)
    model = build_segmenter(meta).cuda().eval()
    rgb = _texture(300, 260, seed=3)
    rgb[:, :40, :60] = 0
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    outs = {}
    for block in (4096, 96):
        with _reader(scene) as reader:
            out = predict_scene(reader, model, tmp_path / f"b{block}.tif", tile_size=TILE, overlap=0.25,
                                batch_size=4, block_size=block, prob_dtype="float16", device="cuda")
        assert out["autocast"] in ("bfloat16", "float16")
        outs[block] = read_probability(tmp_path / f"b{block}.tif")
    # the same windows in other batches: autocast kernels may round differently per batch; blending is exact
    assert np.abs(outs[96][0] - outs[4096][0]).max() <= 2e-2
    np.testing.assert_array_equal(outs[96][1], outs[4096][1])
