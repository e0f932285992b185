"""Damage grades (issue 26): pairs on one grid, per-building vectors, the grade classifier, grading files."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import shapely.affinity
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window

from footprints.cli import main
from footprints.config import DamageConfig, DataConfig
from footprints.errors import InputError
from footprints.model.backbone import load_backbone
from footprints.model.damage_features import (
    POOLED,
    blocks,
    colour_statistics,
    combine,
    feature_width,
    pixel_rows,
    pooled_hypercolumns,
)
from footprints.prediction.damage import damage_checkpoint
from footprints.scenes.grades import DAMAGE_KEY, GRADES, PROBABILITY_KEYS
from footprints.scenes.pairs import graded_buildings, open_pair
from footprints.scenes.sources import SceneSource
from footprints.scoring.damage import damage_scores, grade_confusion
from footprints.training.damage import (
    BASELINES,
    baseline_grades,
    building_votes,
    grade_folds,
    graded_buildings_of,
    probabilities,
    train_damage_mlp,
)

UTM = CRS.from_epsg(32615)  # Joplin's zone
ORIGIN = (363000.0, 4105000.0)


def _pattern(size: int, seed: int = 0) -> np.ndarray:
    """RGB (3, size, size) uint8 with structure at several scales (so that resampling errors show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0)
    return np.stack([base + rng.normal(0, 5, base.shape) + 20 * c for c in range(3)]).clip(1, 255).astype(np.uint8)


def _write_tif(path: Path, rgb: np.ndarray, crs: CRS, transform) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[2], height=rgb.shape[1], count=3, dtype="uint8",
                       crs=crs, transform=transform, nodata=0) as ds:
        ds.write(rgb)
    return path


def _geotiff_pair(tmp_path: Path, size: int = 96, post_crs: CRS | None = None, shift_m: float = 0.0) -> tuple[Path, Path]:
    """A pre GeoTIFF in UTM (0.5 m) and its post: the same pixels reprojected to `post_crs` (default lon/lat)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rgb = _pattern(size)
    pre_t = from_origin(ORIGIN[0], ORIGIN[1], 0.5, 0.5)
    pre = _write_tif(images / "place_pre_disaster.tif", rgb, UTM, pre_t)
    dst_crs = post_crs or CRS.from_epsg(4326)
    from rasterio.warp import calculate_default_transform

    src_t = from_origin(ORIGIN[0] + shift_m, ORIGIN[1], 0.5, 0.5)
    t, w, h = calculate_default_transform(UTM, dst_crs, size, size, *rasterio.transform.array_bounds(size, size, src_t))
    out = np.zeros((3, h, w), np.uint8)
    reproject(rgb, out, src_transform=src_t, src_crs=UTM, dst_transform=t, dst_crs=dst_crs,
              resampling=Resampling.bilinear)
    post = _write_tif(images / "place_post_disaster.tif", out, dst_crs, t)
    return pre, post


def test_a_post_scene_in_another_crs_is_resampled_onto_the_pre_grid(tmp_path: Path) -> None:
    pre, post = _geotiff_pair(tmp_path)
    cfg = DataConfig(format="geotiff")
    pair = open_pair(SceneSource(pre), SceneSource(post), cfg, None)
    try:
        assert pair.post_on_grid.resample
        window = Window(16, 16, 64, 64)
        got, ok = pair.post_on_grid.read(window)
        want, _ = pair.pre.read(window)
    finally:
        pair.close()
    assert ok.all()
    # twice resampled (to lon/lat and back): close to the pre pixels, far closer than another place's pixels
    err = np.abs(got.astype(float) - want.astype(float)).mean()
    other = np.abs(_pattern(96, seed=1)[:, 16:80, 16:80].astype(float)[:, ::-1] - want.astype(float)).mean()
    assert err < 6.0 and err < other / 3, (err, other)


def test_a_post_scene_that_does_not_overlap_is_refused_naming_it(tmp_path: Path) -> None:
    pre, post = _geotiff_pair(tmp_path, shift_m=5000.0)
    with pytest.raises(InputError) as err:
        open_pair(SceneSource(pre), SceneSource(post), DataConfig(format="geotiff"), None)
    assert "place_post_disaster.tif" in str(err.value) and "does not overlap" in str(err.value)


def test_a_missing_post_scene_is_named(tmp_path: Path) -> None:
    pre, post = _geotiff_pair(tmp_path)
    post.unlink()
    with pytest.raises(InputError) as err:
        open_pair(SceneSource(pre), None, DataConfig(format="geotiff"), None)
    assert "place_post_disaster.tif" in str(err.value) and "missing" in str(err.value)


def _xview2_label(path: Path, polys: list, grades: list[str | None], uids: list[str], size: int) -> None:
    def props(g: str | None, u: str) -> dict:
        return {"feature_type": "building", "uid": u, **({"subtype": g} if g else {})}

    # lon/lat vertices paired with the pixel ones: what georeferences an xView2 PNG
    lnglat = [shapely.affinity.affine_transform(p, [3e-6, 0, 0, -3e-6, -94.5, 37.08]) for p in polys]
    xy = [{"properties": props(g, u), "wkt": p.wkt} for p, g, u in zip(polys, grades, uids, strict=True)]
    ll = [{"properties": props(g, u), "wkt": p.wkt} for p, g, u in zip(lnglat, grades, uids, strict=True)]
    path.write_text(json.dumps({"features": {"xy": xy, "lng_lat": ll},
                                "metadata": {"width": size, "height": size, "img_name": path.stem + ".png"}}))


def _png_pair(tmp_path: Path, post_size: int = 64, post_uids: list[str] | None = None,
              grades: list[str | None] | None = None) -> SceneSource:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    polys = [shapely.box(4, 4, 20, 20), shapely.box(30, 30, 50, 44)]
    uids = ["a", "b"]
    for name, size in (("pre", 64), ("post", post_size)):
        with rasterio.open(images / f"x_{name}_disaster.png", "w", driver="PNG", width=size, height=size, count=3,
                           dtype="uint8") as ds:
            ds.write(_pattern(size))
    _xview2_label(labels / "x_pre_disaster.json", polys, [None, None], uids, 64)
    _xview2_label(labels / "x_post_disaster.json", polys, grades or ["destroyed", "no-damage"], post_uids or uids,
                  post_size)
    return SceneSource(images / "x_pre_disaster.png", labels / "x_pre_disaster.json", label_kind="xview2")


def test_an_xview2_pair_shares_the_pre_grid_and_gives_its_grades(tmp_path: Path) -> None:
    pair = open_pair(_png_pair(tmp_path), None, DataConfig(), None)
    try:
        assert not pair.post_on_grid.resample
        buildings = graded_buildings(pair.post, pair.pre)
    finally:
        pair.close()
    assert [(b.uid, b.grade) for b in buildings] == [("a", "destroyed"), ("b", "no-damage")]
    assert buildings[1].polygon.bounds == (30.0, 30.0, 50.0, 44.0)


def test_an_empty_post_label_shares_the_pre_georeference_and_grades_no_building(tmp_path: Path) -> None:
    """A post label without buildings has no vertices to georeference its PNG: the pair's grid is the pre's."""
    src = _png_pair(tmp_path)
    (tmp_path / "labels" / "x_post_disaster.json").write_text(json.dumps(
        {"features": {"xy": [], "lng_lat": []}, "metadata": {"width": 64, "height": 64}}))
    pair = open_pair(src, None, DataConfig(), None)
    try:
        assert pair.post.transform == pair.pre.transform and pair.post.crs == pair.pre.crs
        assert graded_buildings(pair.post, pair.pre) == []
    finally:
        pair.close()


def test_a_post_png_of_another_size_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        open_pair(_png_pair(tmp_path, post_size=48), None, DataConfig(), None)
    assert "x_post_disaster.png" in str(err.value) and "48x48" in str(err.value)


def test_post_labels_of_buildings_the_pre_label_lacks_are_refused(tmp_path: Path) -> None:
    pair = open_pair(_png_pair(tmp_path, post_uids=["a", "zz-not-there"]), None, DataConfig(), None)
    try:
        with pytest.raises(InputError) as err:
            graded_buildings(pair.post, pair.pre)
    finally:
        pair.close()
    assert "x_post_disaster.json" in str(err.value) and "zz-not-there" in str(err.value)


def test_an_unknown_grade_is_refused(tmp_path: Path) -> None:
    pair = open_pair(_png_pair(tmp_path, grades=["flattened", "no-damage"]), None, DataConfig(), None)
    try:
        with pytest.raises(InputError, match="unknown damage grade 'flattened'"):
            graded_buildings(pair.post, pair.pre)
    finally:
        pair.close()


def reader(rgb: np.ndarray):
    """A scene in memory as `pooled_hypercolumns` reads one: window -> (RGB, every pixel valid)."""
    return lambda w: (rgb[:, w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width],
                      np.ones((w.height, w.width), bool))


def test_pooled_features_do_not_depend_on_the_block_size() -> None:
    """A building cut by blocks gets the mean of all its pixels, as when the scene is one block (the halo
    covers this small scene, so the activations are the same)."""
    backbone = load_backbone("random", "torchvision")
    layers = ["conv1_2", "conv2_2"]
    pre, post = _pattern(80), _pattern(80, seed=3)

    polys = [shapely.box(10, 10, 50, 30), shapely.box(60, 60, 75, 78), shapely.box(200, 200, 210, 210)]
    one, again = pooled_hypercolumns(backbone, layers, reader(pre), reader(post), [polys, polys[:1]], 80, 80,
                                     10_000, 0, block=1024)
    many, = pooled_hypercolumns(backbone, layers, reader(pre), reader(post), [polys], 80, 80, 10_000, 0, block=64)
    np.testing.assert_allclose(again["post"][0], one["post"][0], rtol=1e-5)  # two sets, one backbone pass
    assert len(blocks(80, 80, 64)) == 4
    assert list(one["pixels"]) == [800, 15 * 18, 0]  # the third lies outside the scene
    for key in ("pre", "post", "absdiff", "pre_std", "post_std", "colour_pre", "colour_post"):
        np.testing.assert_allclose(one[key], many[key], rtol=1e-4, atol=1e-4)
    x = combine(one, "diff+post")
    assert x.shape == (3, feature_width(layers, "diff+post"))
    np.testing.assert_allclose(x[:, :192], one["post"] - one["pre"], rtol=1e-5, atol=1e-5)


def _box_columns(backbone, layers: list[str], pre: np.ndarray, post: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hypercolumns before and after of every pixel of box(8, 10, 30, 22) in 48 px scenes, computed
    directly (the whole scene through the backbone, every pixel gathered)."""
    from footprints.model.hypercolumns import gather_hypercolumns

    rows, cols = np.meshgrid(np.arange(10, 22), np.arange(8, 30), indexing="ij")
    r, c = torch.from_numpy(np.tile(rows.ravel(), 2)), torch.from_numpy(np.tile(cols.ravel(), 2))
    with torch.inference_mode():
        acts = backbone(torch.from_numpy(np.stack([pre, post])).float(), layers)
        columns = gather_hypercolumns(acts, layers, r, c, (48, 48), batch=np.repeat([0, 1], rows.size)).double().numpy()
    return columns[: rows.size], columns[rows.size :]


def test_the_change_parts_are_each_pixels_change_and_the_spreads_change() -> None:
    """absdiff is the mean over the building's pixels of |post - pre| (not |mean post - mean pre|), stddiff
    the change of each channel's std: checked against every pixel's hypercolumn computed directly."""
    backbone = load_backbone("random", "torchvision")
    layers = ["conv1_2", "conv2_2"]
    pre, post = _pattern(48), _pattern(48, seed=5)

    pooled, = pooled_hypercolumns(backbone, layers, reader(pre), reader(post), [[shapely.box(8, 10, 30, 22)]],
                                  48, 48, 10_000, 0)
    before, after = _box_columns(backbone, layers, pre, post)
    assert pooled["pixels"][0] == len(before)
    np.testing.assert_allclose(pooled["absdiff"][0], np.abs(after - before).mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled["post_std"][0], after.std(0), rtol=1e-3, atol=1e-3)
    x = combine(pooled, "diff+absdiff+stddiff")
    assert x.shape == (1, feature_width(layers, "diff+absdiff+stddiff")) == (1, 3 * 192 + 1)
    np.testing.assert_allclose(x[0, 192:384], pooled["absdiff"][0], rtol=1e-6)
    np.testing.assert_allclose(x[0, 384:576], after.std(0) - before.std(0), rtol=1e-3, atol=1e-3)
    assert (x[0, 192:384] >= np.abs(x[0, :192]) - 1e-5).all()  # |change| averaged is at least the mean's change


def test_a_per_pixel_model_votes_over_every_sampled_pixel_and_training_keeps_a_seeded_few() -> None:
    """`keep_pixels` keeps that many of a building's pixels, each one's own hypercolumns; `pixel_classifier`
    is averaged over all of the building's pixels, whatever the blocks: both checked against every pixel's
    hypercolumn computed directly."""
    backbone = load_backbone("random", "torchvision")
    layers = ["conv1_2"]
    pre, post = _pattern(48), _pattern(48, seed=5)
    building = [shapely.box(8, 10, 30, 22)]

    def classify(before: np.ndarray, after: np.ndarray, outline_m2: np.ndarray) -> np.ndarray:
        logits = np.stack([after[:, 0] - before[:, 0], after[:, 1], before[:, 2], np.log(outline_m2)], 1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    one, = pooled_hypercolumns(backbone, layers, reader(pre), reader(post), [building], 48, 48, 10_000, 0,
                               keep_pixels=10, pixel_classifier=classify)
    cut, = pooled_hypercolumns(backbone, layers, reader(pre), reader(post), [building], 48, 48, 10_000, 0,
                               block=16, pixel_classifier=classify)
    before, after = _box_columns(backbone, layers, pre, post)
    assert one["outline_m2"][0] == 22 * 12
    expected = classify(before, after, np.full(len(before), 22 * 12.0)).mean(0)
    np.testing.assert_allclose(one["vote"][0], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cut["vote"][0], expected, rtol=1e-4, atol=1e-6)  # four blocks cut it
    assert "pixel_owner" not in cut and list(one["pixel_owner"]) == [0] * 10
    for kept_pre, kept_post in zip(one["pixel_pre"], one["pixel_post"], strict=True):  # each one of its pixels
        k = np.abs(before - kept_pre.astype(np.float64)).max(1).argmin()
        np.testing.assert_allclose(kept_pre, before[k], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(kept_post, after[k], rtol=2e-3, atol=2e-3)
    assert len({row.tobytes() for row in one["pixel_pre"]}) == 10  # ten different pixels
    again, = pooled_hypercolumns(backbone, layers, reader(pre), reader(post), [building], 48, 48, 10_000, 0,
                                 keep_pixels=10)
    np.testing.assert_array_equal(again["pixel_pre"], one["pixel_pre"])  # seeded
    x = pixel_rows(one["pixel_pre"], one["pixel_post"], one["outline_m2"][one["pixel_owner"]], "post+absdiff")
    assert x.shape == (10, feature_width(layers, "post+absdiff")) and x.dtype == np.float16  # as stored
    np.testing.assert_array_equal(x[:, :64], one["pixel_post"])
    absdiff = np.abs(one["pixel_post"].astype(np.float32) - one["pixel_pre"]).astype(np.float16)
    np.testing.assert_array_equal(x[:, 64:128], absdiff)
    np.testing.assert_allclose(x[:, -1], np.log1p(22 * 12.0), rtol=1e-3)


def test_stacked_scenes_keep_each_training_pixel_with_its_building() -> None:
    def part(grades: list[int], first_id: int) -> dict[str, np.ndarray]:
        n = len(grades)
        owner = np.repeat(np.arange(n), 2)  # two pixels a building, each holding its building's id
        ids = (first_id + owner).astype(np.float16)[:, None]
        return {"y": np.array(grades), "pixels": np.full(n, 2), "outline_m2": np.arange(n) + first_id + 0.5,
                "pixel_owner": owner, "pixel_pre": ids, "pixel_post": ids}

    stacked, y, scene = graded_buildings_of([part([0, -1, 2], 0), part([1, 3], 3)])  # building 1: un-classified
    assert y.tolist() == [0, 2, 1, 3] and scene.tolist() == [0, 0, 1, 1]
    assert stacked["outline_m2"].tolist() == [0.5, 2.5, 3.5, 4.5]
    assert stacked["pixel_owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert stacked["pixel_pre"][:, 0].tolist() == [0, 0, 2, 2, 3, 3, 4, 4]  # each pixel with its own building


def test_the_ring_around_a_building_is_pooled_beside_it() -> None:
    from footprints.model.damage_features import rings

    backbone = load_backbone("random", "torchvision")
    pre = np.full((3, 64, 64), 100, np.uint8)
    post = pre.copy()
    post[:, 8:40, 8:40] = 200  # debris around the building (20..28), the roof itself unchanged
    post[:, 20:28, 20:28] = 100

    building = [shapely.box(20, 20, 28, 28)]
    own, ring = pooled_hypercolumns(backbone, ["conv1_2"], reader(pre), reader(post),
                                    [building, rings(building, 4.0)], 64, 64, 1000, 0)
    assert ring["pixels"][0] == 16 * 16 - 64  # the mitred ring, 4 px wide
    assert ring["colour_post"][0, 0] == 200 and own["colour_post"][0, 0] == 100
    x = combine({**own, **{f"ring_{k}": ring[k] for k in POOLED}}, "diff+absdiff")
    assert x.shape == (1, feature_width(["conv1_2"], "diff+absdiff", context=True))


def test_validation_folds_are_drawn_per_grade() -> None:
    y = np.array([0] * 6 + [1] * 40 + [2] * 3 + [3] * 1)
    fold = grade_folds(y, 4, seed=0)
    for f in range(4):  # every fold holds its share of each grade, and leaves the rest for training
        assert (y[fold == f] == 1).sum() == 10 and 1 <= (y[fold == f] == 0).sum() <= 2
        assert ((y[fold != f] == 0).sum() >= 4) and (y[fold != f] == 2).sum() >= 2
    assert len(set(fold[y == 2])) == 3  # three buildings in three folds
    assert not np.array_equal(fold, grade_folds(y, 4, seed=1))  # seeded


def test_validation_folds_hold_whole_scenes_when_there_are_enough() -> None:
    rng = np.random.default_rng(0)
    scenes = np.repeat(np.arange(8), 25)
    y = rng.integers(0, 4, len(scenes))
    fold = grade_folds(y, 4, seed=0, scenes=scenes)
    assert set(fold) == {0, 1, 2, 3}
    assert all(len(set(fold[scenes == s])) == 1 for s in range(8))  # a scene is in one fold only
    few = grade_folds(y[:75], 4, seed=0, scenes=scenes[:75])  # three scenes: per grade, across scenes
    assert any(len(set(few[scenes[:75] == s])) > 1 for s in range(3))


def test_the_grade_classifier_learns_separable_grades_and_weights_the_rare_one() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (4, 12))
    counts = [20, 200, 60, 120]  # no-damage rare, as in Joplin
    y = np.concatenate([np.full(n, g) for g, n in enumerate(counts)])
    x = (centres[y] + rng.normal(0, 1, (len(y), 12))).astype(np.float32)
    test = np.arange(len(y)) % 5 == 0
    cfg = DamageConfig(epochs=30, hidden=32, lr=3e-3)
    model, record = train_damage_mlp(cfg, x[~test], y[~test], seed=0)
    assert record["val_folds"] == 4 and record["val"]["damage_f1"] > 0.9  # out-of-fold, at the chosen epoch
    assert len(record["history"]) == 30 and 1 <= record["epoch"] <= 30
    assert damage_scores(grade_confusion(y[test], probabilities(model, x[test]).argmax(1)))["damage_f1"] > 0.9
    weights = record["class_weights"]
    assert weights["no-damage"] > weights["minor-damage"]  # inverse frequency


def test_a_per_pixel_grade_classifier_learns_from_pixels_and_each_building_weighs_one() -> None:
    """Pixel rows of buildings (`owner`): folds and scores are per building, a building's grade its pixels'
    mean probability. A few large no-damage buildings hold most of the pixels, yet the small buildings'
    grades are still learnt: every building weighs one, not every pixel."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 4, (4, 10))
    y = np.repeat([0, 1, 2, 3], [12, 60, 30, 50])
    sizes = np.where(y == 0, 40, 3)  # no-damage: large buildings
    owner = np.repeat(np.arange(len(y)), sizes)
    x = (centres[y[owner]] + rng.normal(0, 1.5, (len(owner), 10))).astype(np.float16)  # as pixel_rows makes them
    test = np.arange(len(y)) % 4 == 0
    fit_rows, test_rows = ~test[owner], test[owner]
    local = np.cumsum(~test) - 1
    cfg = DamageConfig(epochs=20, hidden=16, lr=3e-3)
    model, record = train_damage_mlp(cfg, x[fit_rows], y[~test], seed=0, owner=local[owner[fit_rows]])
    assert record["val_folds"] == 4 and record["val"]["damage_f1"] > 0.9
    fit64 = x[fit_rows].astype(np.float64)  # the normaliser: the rows' moments, not float16's rounding of them
    np.testing.assert_allclose(model.mean.numpy(), fit64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.std.numpy(), fit64.std(0), rtol=1e-6)
    assert sum(record["train_buildings"].values()) == (~test).sum()  # buildings, not pixels
    test_local = (np.cumsum(test) - 1)[owner[test_rows]]
    voted = building_votes(probabilities(model, x[test_rows]), test_local, test.sum())
    np.testing.assert_allclose(voted.sum(1), 1, rtol=1e-5)
    assert damage_scores(grade_confusion(y[test], voted.argmax(1)))["damage_f1"] > 0.9


def test_the_grade_classifier_trains_without_validation_when_asked() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 10)
    x = (y[:, None] * 3 + rng.normal(0, 1, (20, 5))).astype(np.float32)
    model, record = train_damage_mlp(DamageConfig(epochs=7, hidden=8, val_folds=0), x, y, seed=0)
    assert record["epoch"] == 7 and "val" not in record and record["val_folds"] == 0


def test_the_baselines_fit_the_training_buildings_and_grade_each_test_part() -> None:
    """The colour forest reads the colour statistics (here the grade lies in them alone), the pre-only model
    the pre-disaster vectors (noise here), the majority the commonest training grade."""
    rng = np.random.default_rng(2)

    def pooled(y: np.ndarray) -> dict[str, np.ndarray]:
        n = len(y)
        colour = rng.normal(0, 0.3, (n, 8)) + y[:, None] * 2.0
        return {"pre": rng.normal(0, 1, (n, 6)).astype(np.float32), "colour_pre": rng.normal(0, 1, (n, 8)),
                "colour_post": colour.astype(np.float32), "area_m2": np.full(n, 100.0), "pixels": np.full(n, 50)}

    y = np.repeat([0, 1, 2, 3], [10, 40, 20, 30])
    tests = [np.repeat([0, 1, 2, 3], 5), np.array([3, 2])]
    grades = baseline_grades(DamageConfig(epochs=5, hidden=8), pooled(y), y, [pooled(t) for t in tests], seed=0)
    assert set(grades) == set(BASELINES)
    for name, parts in grades.items():
        assert [len(p) for p in parts] == [20, 2], name
    assert all((p == 1).all() for p in grades["majority"])
    assert all((p == t).all() for p, t in zip(grades["colour_forest"], tests, strict=True))
    assert all(p.min() >= 0 and p.max() < len(GRADES) for p in grades["pre_only"])
    # the forest's columns: pre, post, post - pre of all 8 statistics (the stds' change too), log(1 + area)
    one = pooled(np.array([2]))
    columns = colour_statistics(one)[0]
    assert columns.shape == (25,)
    np.testing.assert_allclose(columns[16:24], one["colour_post"][0] - one["colour_pre"][0], rtol=1e-5, atol=1e-5)
    assert columns[24] == pytest.approx(np.log1p(100.0))


def _damage_checkpoint(path: Path, layers: list[str], inputs: str = "diff+post", context_m: float = 0.0) -> Path:
    from footprints.contracts.checkpoints import save_checkpoint
    from footprints.model.mlp import MLP

    cfg = DamageConfig(layers=layers, inputs=inputs, pixels_per_building=32, block_size=64, context_m=context_m,
                       classify="building")
    torch.manual_seed(0)
    mlp = MLP(feature_width(layers, inputs, context_m > 0), hidden=8, num_classes=len(GRADES))
    from footprints.config import Config

    state = damage_checkpoint(mlp, cfg, layers, {"weights": "random", "normalization": "torchvision"}, 0,
                              {"epoch": 1}, Config().to_dict())
    save_checkpoint(path, state)
    return path


def test_a_checkpoint_from_before_per_pixel_models_grades_whole_buildings(tmp_path: Path) -> None:
    from footprints.prediction.damage import load_damage_model

    path = _damage_checkpoint(tmp_path / "old.pt", ["conv1_2"])
    state = torch.load(path, weights_only=True)
    del state["damage"]["classify"]  # the earlier version's checkpoint had no such key
    torch.save(state, path)
    assert DamageConfig().classify == "pixel" and load_damage_model(path).cfg.classify == "building"


def test_footprints_damage_grades_a_users_footprints_on_a_geotiff_pair(tmp_path: Path) -> None:
    pre, post = _geotiff_pair(tmp_path)
    # with the ring around each building pooled too (damage.context_m)
    ckpt = _damage_checkpoint(tmp_path / "damage.pt", ["conv1_2", "conv2_2"], context_m=2.0)
    # the user's footprints in lon/lat, with their own properties; one lies far outside the pair
    utm = [shapely.box(ORIGIN[0] + 5, ORIGIN[1] - 20, ORIGIN[0] + 15, ORIGIN[1] - 10),
           shapely.box(ORIGIN[0] + 20, ORIGIN[1] - 40, ORIGIN[0] + 30, ORIGIN[1] - 25),
           shapely.box(ORIGIN[0] + 9000, ORIGIN[1], ORIGIN[0] + 9010, ORIGIN[1] + 10)]
    users = gpd.GeoDataFrame({"osm_id": [11, 12, 13], "building": ["house", "yes", "shed"]}, geometry=utm,
                             crs=UTM).to_crs(4326)
    users.to_file(tmp_path / "osm.geojson", driver="GeoJSON")
    out = tmp_path / "graded.geojson"
    assert main(["damage", "--checkpoint", str(ckpt), "--pre", str(pre), "--post", str(post), "--footprints",
                 str(tmp_path / "osm.geojson"), "--output", str(out)]) == 0
    graded = gpd.read_file(out)
    assert list(graded["osm_id"]) == [11, 12, 13] and list(graded["building"]) == ["house", "yes", "shed"]
    assert "scene" not in graded.columns  # the user's columns, not the footprint schema's
    assert graded[DAMAGE_KEY].iloc[:2].isin(GRADES).all() and pd.isna(graded[DAMAGE_KEY].iloc[2])
    probs = graded[list(PROBABILITY_KEYS.values())].iloc[:2].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=2e-3)
    assert (tmp_path / "graded.gpkg").is_file()
    assert gpd.read_file(tmp_path / "graded.gpkg")[DAMAGE_KEY].iloc[:2].isin(GRADES).all()


def test_a_post_scene_covering_part_of_the_pre_scene_grades_the_buildings_it_covers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The warning says what happens to the rest: a building wholly outside the post scene keeps no grade, one
    partly outside is graded from its pixels inside."""
    pre, post = _geotiff_pair(tmp_path, post_crs=UTM, shift_m=20.0)  # post: 20-68 m east of the pre's 0-48 m
    ckpt = _damage_checkpoint(tmp_path / "damage.pt", ["conv1_2", "conv2_2"])
    boxes = [shapely.box(ORIGIN[0] + x0, ORIGIN[1] - 30, ORIGIN[0] + x1, ORIGIN[1] - 20) for x0, x1 in
             ((5, 15), (15, 25), (30, 40))]  # outside, across the edge, inside
    gpd.GeoDataFrame({"id": [1, 2, 3]}, geometry=boxes, crs=UTM).to_file(tmp_path / "fp.geojson", driver="GeoJSON")
    out = tmp_path / "graded.geojson"
    assert main(["damage", "--checkpoint", str(ckpt), "--pre", str(pre), "--post", str(post), "--footprints",
                 str(tmp_path / "fp.geojson"), "--output", str(out)]) == 0
    warning = next(r.getMessage() for r in caplog.records if "covers" in r.getMessage())
    assert "place_post_disaster.tif" in warning and "wholly outside it are left without a grade" in warning
    graded = gpd.read_file(out)
    assert pd.isna(graded[DAMAGE_KEY].iloc[0]) and graded[DAMAGE_KEY].iloc[1:].isin(GRADES).all()


def test_footprints_damage_refuses_a_classifier_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pre, post = _geotiff_pair(tmp_path)
    from footprints.contracts.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "cls.pt", {"model": {}, "in_channels": 3, "layers": ["conv1_2"],
                                           "backbone": {"weights": "random", "normalization": "torchvision"}})
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)], crs=4326).to_file(tmp_path / "f.geojson")
    code = main(["damage", "--checkpoint", str(tmp_path / "cls.pt"), "--pre", str(pre), "--post", str(post),
                 "--footprints", str(tmp_path / "f.geojson"), "--output", str(tmp_path / "o.geojson")])
    err = capsys.readouterr().err
    assert code == 2 and "cls.pt" in err and "not a damage checkpoint" in err and len(err.strip().splitlines()) == 1


def test_train_damage_names_a_bad_pair_in_one_line_and_trains_on_the_others(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from footprints.synth.dataset import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, n_scenes=4, seed=2, size=128, geotiff=False, damage=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: t
output_root: {tmp_path / "out"}
data: {{root: {data}, format: xview2, geotransforms: {data / "truth_transforms.json"}}}
tile: {{size: 64, stride: 64, split_ratios: [1, 0, 0], patch_geotiffs: false}}
backbone: {{weights: random, layers: [conv1_2]}}
damage: {{layers: [conv1_2, conv2_2], pixels_per_building: 8, hidden: 8, epochs: 2}}
cluster: {{kind: local, workers: 0}}
""")
    assert main(["tile", "--config", str(cfg)]) == 0
    posts = sorted((data / "images").glob("*_post_disaster.png"))
    posts[0].unlink()  # one pair without its post scene
    with rasterio.open(posts[1], "w", driver="PNG", width=100, height=128, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 128, 100), np.uint8))  # one of another size
    assert main(["train-damage", "--config", str(cfg)]) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert posts[0].name in errors[0] and "missing" in errors[0]
    assert posts[1].name in errors[1] and "100x128" in errors[1]
    metrics = json.loads((tmp_path / "out" / "t" / "train-damage" / "metrics.json").read_text())
    assert metrics["scenes"] == 2 and len(metrics["skipped"]) == 2
    assert (tmp_path / "out" / "t" / "train-damage" / "best.pt").is_file()


def _synth_geotiff_run(tmp_path: Path, name: str, weights: str = "random", n_scenes: int = 3,
                       damage: str = "") -> tuple[Path, Path, dict]:
    """synth's GeoTIFF variant with damage (`n_scenes` scenes of 128 px) and a config training on all of them
    (`damage`: more keys of its damage section): (config, data folder, synth's summary)."""
    from footprints.synth.dataset import write_synthetic_dataset

    data = tmp_path / "data"
    summary = write_synthetic_dataset(data, n_scenes=n_scenes, seed=4, size=128, geotiff=True, damage=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: {name}
output_root: {tmp_path / "out"}
data: {{root: {data / "geotiff"}, format: geotiff, label_format: vector}}
tile: {{size: 64, stride: 64, split_ratios: [1, 0, 0], patch_geotiffs: false}}
backbone: {{weights: {weights}, layers: [conv1_2]}}
damage: {{layers: [conv1_2], pixels_per_building: 8, hidden: 8, epochs: 2{damage}}}
cluster: {{kind: local, workers: 0}}
""")
    return cfg, data, summary


def test_train_damage_validates_on_whole_scenes_when_it_has_as_many_as_folds(tmp_path: Path) -> None:
    """Three graded training scenes (of five; two carry no grades): two folds hold whole scenes, so
    validation scores the model on scenes it never saw; four folds fall back to folds of buildings."""
    cfg, _, _ = _synth_geotiff_run(tmp_path, "s", n_scenes=5, damage=", val_folds: 2")
    assert main(["tile", "--config", str(cfg)]) == 0 and main(["train-damage", "--config", str(cfg)]) == 0
    metrics_path = tmp_path / "out" / "s" / "train-damage" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["scenes"] - len(metrics["unlabelled_scenes"]) == 3
    assert metrics["val_folds_of"] == "scenes" and metrics["val_folds"] == 2 and "damage_f1" in metrics["val"]
    assert main(["train-damage", "--config", str(cfg), "--set", "damage.val_folds=4"]) == 0  # features reused
    metrics = json.loads(metrics_path.read_text())
    assert metrics["val_folds_of"] == "buildings" and metrics["val_folds"] == 4


def test_train_damage_learns_from_geotiff_pairs_with_graded_vector_labels(tmp_path: Path) -> None:
    """synth's GeoTIFF variant: pre in UTM, post in lon/lat (resampled onto the pre grid), GeoJSON labels
    whose `subtype` grades each building."""
    cfg, _, summary = _synth_geotiff_run(tmp_path, "g")
    assert main(["tile", "--config", str(cfg)]) == 0
    manifest = (tmp_path / "out" / "g" / "tile" / "manifest.csv").read_text()
    assert "_post_disaster" not in manifest  # post scenes are not scenes to find buildings in
    assert main(["train-damage", "--config", str(cfg)]) == 0
    metrics = json.loads((tmp_path / "out" / "g" / "train-damage" / "metrics.json").read_text())
    graded = sum(n for g, n in summary["damage"].items() if g in GRADES)
    trained = sum(metrics["train_buildings"].values())
    assert metrics["scenes"] == 3 and not metrics["skipped"] and 0.9 * graded <= trained <= graded


def test_footprints_damage_never_writes_over_its_footprints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pre, post = _geotiff_pair(tmp_path)
    ckpt = _damage_checkpoint(tmp_path / "damage.pt", ["conv1_2"])
    theirs = tmp_path / "theirs.geojson"
    gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs=4326).to_file(theirs)
    before = theirs.read_bytes()
    code = main(["damage", "--checkpoint", str(ckpt), "--pre", str(pre), "--post", str(post), "--footprints",
                 str(theirs), "--output", str(theirs)])
    err = capsys.readouterr().err
    assert code == 2 and "theirs.geojson" in err and "is the --footprints file" in err
    assert theirs.read_bytes() == before


def test_the_damage_checkpoint_grades_without_the_weights_file_it_was_trained_with(tmp_path: Path) -> None:
    """Trained on a SLURM node, graded on a laptop: the checkpoint carries the backbone parameters its
    layers use (conv1_1 and conv1_2 here), so the weights file is not needed to grade."""
    weights = tmp_path / "vgg16.pth"
    torch.save(load_backbone("random", "torchvision").features.state_dict(), weights)
    cfg, data, _ = _synth_geotiff_run(tmp_path, "w", str(weights))
    assert main(["tile", "--config", str(cfg)]) == 0 and main(["train-damage", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "out" / "w" / "train-damage" / "best.pt"
    assert set(torch.load(ckpt, weights_only=True)["backbone_state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    pre = next((data / "geotiff" / "images").glob("*palu*_pre_disaster.tif"))
    with rasterio.open(pre) as ds:
        x, y = ds.xy(64, 64)
        crs = ds.crs
    gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.box(x - 4, y - 4, x + 4, y + 4)], crs=crs).to_file(
        tmp_path / "f.geojson")

    def grade(name: str) -> pd.DataFrame:
        args = ["damage", "--checkpoint", str(ckpt), "--pre", str(pre), "--post",
                str(pre).replace("_pre_disaster", "_post_disaster"), "--footprints", str(tmp_path / "f.geojson"),
                "--output", str(tmp_path / name)]
        assert main(args) == 0
        return gpd.read_file(tmp_path / name)

    before = grade("before.geojson")
    weights.unlink()  # the laptop has no weights file
    after = grade("after.geojson")
    assert after[DAMAGE_KEY].iloc[0] in GRADES
    cols = list(PROBABILITY_KEYS.values())
    np.testing.assert_allclose(after[cols].to_numpy(float), before[cols].to_numpy(float))


def test_a_per_pixel_damage_model_trains_on_kept_pixels_and_grades_a_users_footprints(tmp_path: Path) -> None:
    """`damage.classify: pixel` end to end: train-damage keeps `train_pixels` of each building in its scene's
    features and trains on them; `footprints damage` grades any footprints by their pixels' votes."""
    cfg, data, _ = _synth_geotiff_run(tmp_path, "px", damage=", classify: pixel, inputs: post+absdiff, train_pixels: 3")
    assert main(["tile", "--config", str(cfg)]) == 0 and main(["train-damage", "--config", str(cfg)]) == 0
    run = tmp_path / "out" / "px" / "train-damage"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["settings"]["classify"] == "pixel" and "damage_f1" in metrics["val"]
    graded = [dict(np.load(f)) for f in sorted((run / "features").glob("*.npz"))]
    graded = [z for z in graded if bool(z["labelled"])]  # the scenes whose post labels grade buildings
    assert graded
    for z in graded:
        owners = np.bincount(z["pixel_owner"], minlength=len(z["y"]))
        assert z["pixel_pre"].dtype == np.float16 and z["pixel_pre"].shape[1] == 64
        assert owners.max() <= 3 and (owners[z["pixels"] > 0] >= 1).all()  # a few of every building's pixels
    pre = next((data / "geotiff" / "images").glob("*_pre_disaster.tif"))
    with rasterio.open(pre) as ds:
        x, y = ds.xy(64, 64)
        crs = ds.crs
    gpd.GeoDataFrame({"id": [1, 2]}, geometry=[shapely.box(x - 4, y - 4, x + 4, y + 4),
                                               shapely.box(x + 1e5, y, x + 1e5 + 4, y + 4)], crs=crs).to_file(
        tmp_path / "f.geojson")
    assert main(["damage", "--checkpoint", str(run / "best.pt"), "--pre", str(pre), "--post",
                 str(pre).replace("_pre_disaster", "_post_disaster"), "--footprints", str(tmp_path / "f.geojson"),
                 "--output", str(tmp_path / "graded.geojson")]) == 0
    graded = gpd.read_file(tmp_path / "graded.geojson")
    assert graded[DAMAGE_KEY].iloc[0] in GRADES and pd.isna(graded[DAMAGE_KEY].iloc[1])  # the second lies outside
    assert graded[list(PROBABILITY_KEYS.values())].iloc[0].sum() == pytest.approx(1, abs=1e-3)
