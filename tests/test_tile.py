"""The tile stage: coverage, georeferencing to 0.5 px, masks equal to direct rasterisation, leak-free
splits, resume/skip/overwrite, and one-line messages for bad inputs while good scenes complete."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio import features
from shapely import affinity
from shapely import wkt as shp_wkt

from footprints.benchmarks.tile import bench_tile
from footprints.config import Config, load_config
from footprints.contracts.manifest import read_manifest
from footprints.contracts.patches import load_patch
from footprints.contracts.paths import RunPaths
from footprints.errors import StageError
from footprints.stages import tile as tile_stage
from footprints.stages.tile import assign_splits, patch_offsets, patch_windows, valid_window
from footprints.synth.dataset import write_synthetic_dataset

run_tile = tile_stage.run


def make_cfg(tmp_path: Path, root: Path, **sets) -> Config:
    # the binary target: these tests compare masks with direct rasterisation of the outlines
    overrides = [f"data.root={root}", f"output_root={tmp_path / 'out'}", "cluster.workers=0",
                 "tile.size=64", "tile.stride=64", "tile.target=binary"]
    overrides += [f"{k}={v}" for k, v in sets.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def xview2_data(tmp_path_factory) -> Path:
    """Six 256 px synthetic xView2 scenes (two of them without buildings) with their GeoTIFF variant."""
    root = tmp_path_factory.mktemp("xv") / "data"
    info = write_synthetic_dataset(root, n_scenes=6, seed=0, size=256, geotiff=True)
    assert info["empty_scenes"] == 2  # seed 0: scenes 1 and 3 have no buildings
    return root


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corner_error_px(patch_t: Affine, truth: Affine, row_off: int, col_off: int, size: int) -> float:
    """Largest distance (scene pixels) between patch corners from the patch's own transform and the truth."""
    worst = 0.0
    for dr, dc in ((0, 0), (0, size), (size, 0), (size, size)):
        x, y = patch_t @ (dc, dr)
        col, row = ~truth @ (x, y)
        worst = max(worst, float(np.hypot(col - (col_off + dc), row - (row_off + dr))))
    return worst


def padded_cut(full: np.ndarray, row: int, col: int, size: int, fill: int) -> np.ndarray:
    """`full[..., row:row+size, col:col+size]` with `fill` beyond the edges (what a boundless read gives)."""
    out = np.full(full.shape[:-2] + (size, size), fill, dtype=full.dtype)
    h, w = full.shape[-2:]
    part = full[..., row : min(row + size, h), col : min(col + size, w)]
    out[..., : part.shape[-2], : part.shape[-1]] = part
    return out


# --------------------------------------------------------------------------------------------------
# pure functions


def test_windows_cover_everything_and_pad_the_edge() -> None:
    assert patch_offsets(1024, 256, 256) == [0, 256, 512, 768]
    assert len(patch_windows(1024, 1024, 256, 256)) == 16
    assert patch_offsets(438, 256, 128) == [0, 128, 256]  # last window overhangs: padded, not dropped
    assert patch_offsets(100, 256, 256) == [0]  # smaller than one patch: one padded patch
    assert patch_offsets(257, 256, 256) == [0, 256]
    assert patch_offsets(0, 256, 256) == []
    wins = patch_windows(438, 406, 256, 128)
    covered = np.zeros((406, 438), dtype=int)
    for w in wins:
        covered[int(w.row_off) : int(w.row_off) + 256, int(w.col_off) : int(w.col_off) + 256] += 1
    assert covered.min() >= 1
    assert valid_window(wins[-1], 438, 406) == (0, 0, 406 - 256, 438 - 256)


def test_assign_splits_deterministic_and_complete() -> None:
    ids = [f"s{i}" for i in range(20)]
    a = assign_splits(ids, [0.7, 0.15, 0.15], seed=3)
    assert a == assign_splits(list(reversed(ids)), [0.7, 0.15, 0.15], seed=3)
    assert a != assign_splits(ids, [0.7, 0.15, 0.15], seed=4)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 3, "test": 3}
    # few scenes: train gets one, val and test one each from three scenes on
    for n in (1, 2, 3, 4):
        got = list(assign_splits([f"s{i}" for i in range(n)], [0.7, 0.15, 0.15], seed=0).values())
        assert got.count("train") >= 1
        if n >= 3:
            assert got.count("val") == 1 and got.count("test") == 1
    assert set(assign_splits(ids, [1, 0, 0], 0).values()) == {"train"}


# --------------------------------------------------------------------------------------------------
# synthetic xView2: georeference and masks


def test_validation_bands_count_as_one_scene_and_a_skipped_band_is_named(tmp_path, xview2_data) -> None:
    cfg = make_cfg(tmp_path, xview2_data)
    cfg.tile.val_band = 0.25
    summary = run_tile(cfg)
    # the two building-free scenes are skipped whole (every band of theirs), the four others read once each
    assert (summary["scenes_found"], summary["scenes_read"], summary["scenes_skipped"]) == (6, 4, 2)
    bands = [s.get("band") for s in summary["skipped"]]
    assert set(bands) <= {None, "rows 0-75%", "rows 75-100%"} and any(bands)  # a band says which rows it is
    assert len({(s["file"], s.get("band")) for s in summary["skipped"]}) == len(summary["skipped"])


def test_xview2_patches_lie_on_the_scene_and_masks_match(tmp_path, xview2_data) -> None:
    cfg = make_cfg(tmp_path, xview2_data)
    summary = run_tile(cfg)
    truth = json.loads((xview2_data / "truth_transforms.json").read_text())
    # the two building-free scenes cannot be georeferenced from their labels: skipped, saying why
    assert summary["scenes_read"] == 4 and summary["scenes_skipped"] == 2
    assert all("cannot georeference" in s["reason"] for s in summary["skipped"])
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    assert len(df) == 4 * 16
    for sid, rows in df.groupby("scene_id"):
        label = json.loads((xview2_data / "labels" / f"{sid}.json").read_text())
        polys = [shp_wkt.loads(f["wkt"]) for f in label["features"]["xy"]]
        scene_mask = features.rasterize([(p, 1) for p in polys], out_shape=(256, 256), dtype=np.uint8)
        with rasterio.open(xview2_data / "images" / f"{sid}.png") as ds:
            scene_rgb = ds.read()
        t_truth = Affine.from_gdal(*truth[f"{sid}.png"])
        meta = json.loads((tile_dir / "scenes" / f"{sid}.json").read_text())
        assert meta["georef_rms_px"] < 0.01
        for _, row in rows.iterrows():
            with rasterio.open(tile_dir / row["image_path"]) as ds:
                assert ds.crs.to_epsg() == 4326 and ds.count == 3 and ds.dtypes[0] == "uint8"
                err = corner_error_px(ds.transform, t_truth, row["row_off"], row["col_off"], 64)
            assert err < 0.5, f"{row['patch_id']}: corners {err:.3f} px off"
            image, mask = load_patch(tile_dir, row)
            np.testing.assert_array_equal(image, padded_cut(scene_rgb, row["row_off"], row["col_off"], 64, 0))
            np.testing.assert_array_equal(mask, padded_cut(scene_mask, row["row_off"], row["col_off"], 64, 255))
            assert row["building_px"] == int((mask == 1).sum())
    assert df["building_px"].sum() > 0
    assert set(df["crs"]) == {"EPSG:4326"}


@pytest.mark.slow
def test_1024_scene_gives_16_patches_at_defaults(tmp_path) -> None:
    root = tmp_path / "data"
    write_synthetic_dataset(root, n_scenes=1, seed=0, size=1024, geotiff=False)  # no buildings: needs override
    cfg = load_config(None, [f"data.root={root}", f"output_root={tmp_path / 'out'}", "cluster.workers=0",
                             f"data.geotransforms={root / 'truth_transforms.json'}"])
    summary = run_tile(cfg)
    assert summary["patches"] == 16 and summary["scenes_read"] == 1
    df = read_manifest(RunPaths.of(cfg).stage("tile"))
    assert sorted(zip(df.row_off, df.col_off, strict=True)) == [(r, c) for r in (0, 256, 512, 768) for c in (0, 256, 512, 768)]
    assert (df.valid_height == 256).all() and (df.nodata_frac == 0).all()
    truth = Affine.from_gdal(*json.loads((root / "truth_transforms.json").read_text())[df.scene_id[0] + ".png"])
    for _, row in df.iterrows():
        with rasterio.open(RunPaths.of(cfg).stage("tile") / row["mask_path"]) as ds:
            assert ds.transform.almost_equals(truth @ Affine.translation(row["col_off"], row["row_off"]))
            assert ds.read(1).max() == 0  # building-free scene, all background


def test_geotiff_geojson_labels_reprojected(tmp_path, xview2_data) -> None:
    """UTM GeoTIFFs with EPSG:4326 GeoJSON labels: corners to 0.5 px, masks = direct rasterisation."""
    root = xview2_data / "geotiff"
    cfg = make_cfg(tmp_path, root, **{"data.format": "geotiff", "data.label_format": "vector",
                                      "tile.size": 96, "tile.stride": 80})
    summary = run_tile(cfg)
    assert summary["scenes_read"] == 6 and summary["scenes_skipped"] == 0  # georeferenced: empty scenes fine
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    assert len(df) == 6 * 9  # offsets 0, 80, 160 on 256 px
    for sid, rows in df.groupby("scene_id"):
        with rasterio.open(root / "images" / f"{sid}.tif") as ds:
            t_scene, crs, scene_rgb = ds.transform, ds.crs, ds.read()
        gdf = gpd.read_file(root / "labels" / f"{sid}.geojson")
        if len(gdf):
            gdf = gdf.to_crs(crs)
        shapes = [(g, 1) for g in gdf.geometry]
        scene_mask = (features.rasterize(shapes, out_shape=(256, 256), transform=t_scene, dtype=np.uint8)
                      if shapes else np.zeros((256, 256), np.uint8))
        for _, row in rows.iterrows():
            image, mask = load_patch(tile_dir, row)
            with rasterio.open(tile_dir / row["image_path"]) as ds:
                assert ds.crs == crs
                assert corner_error_px(ds.transform, t_scene, row["row_off"], row["col_off"], 96) < 0.5
            np.testing.assert_array_equal(image, padded_cut(scene_rgb, row["row_off"], row["col_off"], 96, 0))
            expected = padded_cut(scene_mask, row["row_off"], row["col_off"], 96, 255)
            np.testing.assert_array_equal(mask, expected)
        edge = rows[rows.row_off == 160].iloc[0]
        assert edge["valid_height"] == 96 and edge["valid_row_off"] == 0
        edge = rows[(rows.row_off == 160) & (rows.col_off == 160)].iloc[0]
        assert edge["valid_height"] == 96 and edge["valid_width"] == 96  # 160 + 96 = 256: exactly inside


def test_spacenet_rio_masks_and_georeference(tmp_path, shared_dir) -> None:
    root = shared_dir / "data" / "spacenet-rio"
    cfg = load_config(None, [f"data.root={root}", f"output_root={tmp_path / 'out'}", "cluster.workers=0",
                             "data.format=geotiff", "data.label_format=mask", "data.mask_threshold=128",
                             "tile.size=256", "tile.stride=128", "tile.target=binary"])
    summary = run_tile(cfg)
    # img58 is entirely black: an empty scene, skipped with a reason; every other chip is tiled
    assert [s["scene_id"] for s in summary["skipped"]] == ["img58"]
    assert "empty scene" in summary["skipped"][0]["reason"]
    assert summary["scenes_read"] == 14
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    assert set(df["crs"]) == {"EPSG:4326"}
    for sid, rows in df.groupby("scene_id"):
        with rasterio.open(root / "images" / f"{sid}.tif") as ds:
            t_scene, scene_rgb = ds.transform, ds.read()
        with rasterio.open(root / "masks" / f"{sid}.tif") as ds:
            raw = ds.read(1)
        valid = scene_rgb.any(axis=0)  # image nodata: all-zero pixels
        scene_mask = np.where(valid, (raw >= 128).astype(np.uint8), 255).astype(np.uint8)
        h, w = raw.shape
        assert len(rows) == len(patch_offsets(h, 256, 128)) * len(patch_offsets(w, 256, 128))
        for _, row in rows.iterrows():
            image, mask = load_patch(tile_dir, row)
            with rasterio.open(tile_dir / row["mask_path"]) as ds:
                assert corner_error_px(ds.transform, t_scene, row["row_off"], row["col_off"], 256) < 0.5
            np.testing.assert_array_equal(mask, padded_cut(scene_mask, row["row_off"], row["col_off"], 256, 255))
            np.testing.assert_array_equal(image, padded_cut(scene_rgb, row["row_off"], row["col_off"], 256, 0))
            assert row["nodata_frac"] == pytest.approx((mask == 255).mean())
    # masks declare nodata=0, yet 0 is background: background pixels must be there, not ignored
    assert df["background_px"].sum() > 2 * df["building_px"].sum() > 0
    assert summary["splits"]["val"]["scenes"] >= 1 and summary["splits"]["test"]["scenes"] >= 1


def test_xview2_sample_unlabelled_pixel_space(tmp_path, shared_dir, caplog) -> None:
    root = shared_dir / "data" / "xview2-sample"
    cfg = load_config(None, [f"data.root={root}", f"output_root={tmp_path / 'out'}", "cluster.workers=0"])
    with caplog.at_level(logging.WARNING):
        summary = run_tile(cfg)
    assert summary["scenes_read"] == 1 and summary["patches"] == 16  # only the pre-disaster image
    assert any("pixel space" in r.getMessage() for r in caplog.records)
    df = read_manifest(RunPaths.of(cfg).stage("tile"))
    assert set(df["crs"]) == {""} and not df["labelled"].any()
    image, mask = load_patch(RunPaths.of(cfg).stage("tile"), df.iloc[5])
    assert (mask == 255).all() and image.shape == (3, 256, 256) and image.std() > 0
    cfg2 = load_config(None, [f"data.root={root}", f"output_root={tmp_path / 'out2'}", "cluster.workers=0",
                              "data.use_post_disaster=true"])
    assert run_tile(cfg2)["scenes_read"] == 2


# --------------------------------------------------------------------------------------------------
# splits, resume, overwrite


def test_no_scene_in_two_splits_and_pairs_share_a_split(tmp_path, xview2_data) -> None:
    root = copy_dataset(xview2_data, tmp_path / "data")
    # a post-disaster twin of every scene: with use_post_disaster the pair must share a split
    for png in list((root / "images").glob("*_pre_disaster.png")):
        post = png.name.replace("_pre_", "_post_")
        shutil.copy(png, root / "images" / post)
        shutil.copy(root / "labels" / png.with_suffix(".json").name,
                    root / "labels" / post.replace(".png", ".json"))
    cfg = make_cfg(tmp_path, root, **{"data.use_post_disaster": "true", "tile.split_ratios": "[0.5,0.25,0.25]"})
    run_tile(cfg)
    df = read_manifest(RunPaths.of(cfg).stage("tile"))
    assert df.groupby("scene_id")["split"].nunique().max() == 1
    loc = df.scene_id.str.replace("_pre_disaster", "").str.replace("_post_disaster", "")
    assert df.assign(loc=loc).groupby("loc")["split"].nunique().max() == 1
    assert df.scene_id.str.contains("_post_disaster").any()
    assert set(df["split"]) == {"train", "val", "test"}


def test_split_by_subset(tmp_path, xview2_data) -> None:
    root = tmp_path / "data"
    scenes = sorted(p.stem for p in (xview2_data / "images").glob("*.png"))
    for sub, names in (("train", scenes[:2]), ("hold", scenes[2:4]), ("test", scenes[4:])):
        for d in ("images", "labels"):
            (root / sub / d).mkdir(parents=True)
        for n in names:
            shutil.copy(xview2_data / "images" / f"{n}.png", root / sub / "images")
            shutil.copy(xview2_data / "labels" / f"{n}.json", root / sub / "labels")
    cfg = make_cfg(tmp_path, root, **{"data.subsets": "[train,hold,test]", "tile.split_mode": "subset",
                                      "data.geotransforms": xview2_data / "truth_transforms.json"})
    run_tile(cfg)
    df = read_manifest(RunPaths.of(cfg).stage("tile"))
    assert set(zip(df.subset, df.split, strict=True)) == {("train", "train"), ("hold", "val"), ("test", "test")}


def test_resume_skip_and_overwrite(tmp_path, xview2_data, monkeypatch) -> None:
    root = xview2_data / "geotiff"
    cfg = make_cfg(tmp_path, root, **{"data.format": "geotiff", "data.label_format": "vector"})
    tile_dir = RunPaths.of(cfg).stage("tile")

    # an interrupted run: the 40th patch write dies mid-scene
    real_write, calls = tile_stage.write_patch, {"n": 0}

    def dying_write(path, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 40:
            with open(str(path) + ".part", "wb"):  # what a killed writer would have started
                pass
            raise KeyboardInterrupt
        return real_write(path, *args, **kw)

    monkeypatch.setattr(tile_stage, "write_patch", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_tile(cfg)
    monkeypatch.setattr(tile_stage, "write_patch", real_write)
    done = sorted(p.stem for p in (tile_dir / "scenes").glob("*.csv"))
    assert len(done) == 1  # scene 1 (32 files = 16 patches) done, scene 2 interrupted, not marked done
    assert not (tile_dir / "manifest.csv").exists()

    first = run_tile(cfg)
    assert first["scenes_already_done"] == 1 and first["scenes_tiled_now"] == 5
    assert not list(tile_dir.rglob("*.part")) and not list(tile_dir.rglob(".*"))
    assert len(read_manifest(tile_dir)) == 6 * 16
    stamp = {p: p.stat().st_mtime_ns for p in tile_dir.glob("patches/*/*.tif")}

    again = run_tile(cfg)
    assert again["scenes_already_done"] == 6 and again["scenes_tiled_now"] == 0
    assert {p: p.stat().st_mtime_ns for p in tile_dir.glob("patches/*/*.tif")} == stamp

    redo = run_tile(cfg, overwrite=True)
    assert redo["scenes_tiled_now"] == 6
    new = {p: p.stat().st_mtime_ns for p in tile_dir.glob("patches/*/*.tif")}
    assert new.keys() == stamp.keys() and all(new[p] > stamp[p] for p in new)

    # a changed tiling parameter re-tiles without --overwrite, and stale patches go away
    cfg.tile.size = cfg.tile.stride = 128
    changed = run_tile(cfg)
    assert changed["scenes_tiled_now"] == 6 and changed["patches"] == 6 * 4
    assert len(list(tile_dir.glob("patches/*/*.tif"))) == 6 * 4 * 2


# --------------------------------------------------------------------------------------------------
# target GSD


def test_target_gsd_resamples_patches(tmp_path, xview2_data) -> None:
    root = xview2_data / "geotiff"
    cfg = make_cfg(tmp_path, root, **{"data.format": "geotiff", "data.label_format": "vector",
                                      "tile.target_gsd": 1.0})
    run_tile(cfg)
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    assert len(df) == 6 * 4  # 256 px at 0.5 m -> 128 px at 1 m -> 2 x 2 patches of 64
    sid = df.scene_id[0]
    with rasterio.open(root / "images" / f"{sid}.tif") as ds:
        src = ds.read().astype(float)
        t_scene = ds.transform
    row = df[(df.scene_id == sid) & (df.row_off == 64) & (df.col_off == 0)].iloc[0]
    image, mask = load_patch(tile_dir, row)
    with rasterio.open(tile_dir / row["image_path"]) as ds:
        assert ds.res == pytest.approx((1.0, 1.0))
        assert ds.transform.almost_equals(t_scene @ Affine.scale(2) @ Affine.translation(0, 64))
    # 2x2 block averages of the source (GDAL average resampling, integer-rounded)
    blocks = src[:, 128:256, 0:128].reshape(3, 64, 2, 64, 2).mean(axis=(2, 4))
    assert np.abs(image.astype(float) - blocks).max() <= 1.0
    assert set(np.unique(mask)) <= {0, 1}


# --------------------------------------------------------------------------------------------------
# bad inputs


def _label(root: Path, stem: str) -> dict:
    return json.loads((root / "labels" / f"{stem}.json").read_text())


def test_bad_inputs_one_line_each_while_good_scenes_complete(tmp_path, xview2_data, caplog) -> None:
    root = copy_dataset(xview2_data, tmp_path / "data")
    shutil.rmtree(root / "geotiff")
    stems = sorted(p.stem for p in (root / "images").glob("*.png"))
    good = [s for s in stems if _label(root, s)["features"]["xy"]]
    template = good[0]
    lab = _label(root, template)
    img = root / "images" / f"{template}.png"
    bad: dict[str, str] = {}  # stem -> expected file name in the message

    def add(stem: str, label: dict | str | None, png: bytes | None = None) -> None:
        (root / "images" / f"{stem}.png").write_bytes(img.read_bytes() if png is None else png)
        if isinstance(label, dict):
            (root / "labels" / f"{stem}.json").write_text(json.dumps(label))
        elif isinstance(label, str):
            (root / "labels" / f"{stem}.json").write_text(label)

    add("truncated_pre_disaster", lab, img.read_bytes()[: len(img.read_bytes()) // 2])
    bad["truncated_pre_disaster"] = "truncated_pre_disaster.png"
    add("nolabel_pre_disaster", None)
    bad["nolabel_pre_disaster"] = "nolabel_pre_disaster.json"
    add("malformed_pre_disaster", '{"features": {"xy": [')
    bad["malformed_pre_disaster"] = "malformed_pre_disaster.json"
    broken = json.loads(json.dumps(lab))
    broken["features"]["xy"][0]["wkt"] = "POLYGON ((1 2, 3 4"
    add("badwkt_pre_disaster", broken)
    bad["badwkt_pre_disaster"] = "badwkt_pre_disaster.json"
    wrong = json.loads(json.dumps(lab))
    wrong["metadata"]["width"] = 1024
    add("sizemismatch_pre_disaster", wrong)
    bad["sizemismatch_pre_disaster"] = "sizemismatch_pre_disaster.json"
    outside = json.loads(json.dumps(lab))
    for key in ("xy",):
        for f in outside["features"][key]:
            g = shp_wkt.loads(f["wkt"])
            f["wkt"] = shp_wkt.dumps(affinity.translate(g, 5000, 5000))
    # move lng_lat with the same pixel shift, so the fit is exact and only "outside" is wrong
    t = Affine.from_gdal(*json.loads((root / "truth_transforms.json").read_text())[f"{template}.png"])
    for f_xy, f_ll in zip(outside["features"]["xy"], outside["features"]["lng_lat"], strict=True):
        g = shp_wkt.loads(f_xy["wkt"])
        f_ll["wkt"] = shp_wkt.dumps(affinity.affine_transform(g, [t.a, t.b, t.d, t.e, t.c, t.f]))
    add("outside_pre_disaster", outside)
    bad["outside_pre_disaster"] = "outside_pre_disaster.json"
    noisy = json.loads(json.dumps(lab))
    rng = np.random.default_rng(0)
    for f in noisy["features"]["lng_lat"]:
        g = shp_wkt.loads(f["wkt"])
        f["wkt"] = shp_wkt.dumps(affinity.translate(g, rng.normal(0, 3e-5), rng.normal(0, 3e-5)))
    add("residual_pre_disaster", noisy)
    bad["residual_pre_disaster"] = "residual_pre_disaster.json"
    line = json.loads(json.dumps(lab))
    line["features"]["xy"] = [{"properties": {"uid": "a"}, "wkt": "POLYGON ((10 10, 20 20, 30 30, 10 10))"}]
    line["features"]["lng_lat"] = [{"properties": {"uid": "a"}, "wkt": "POLYGON ((1 1, 2 2, 3 3, 1 1))"}]
    add("collinear_pre_disaster", line)
    bad["collinear_pre_disaster"] = "collinear_pre_disaster.json"
    add("zerobytes_pre_disaster", lab, b"")
    bad["zerobytes_pre_disaster"] = "zerobytes_pre_disaster.png"
    black = np.zeros((256, 256, 3), np.uint8)
    with rasterio.open(root / "images" / "black_pre_disaster.png", "w", driver="PNG", width=256, height=256,
                       count=3, dtype="uint8") as ds:
        ds.write(np.moveaxis(black, -1, 0))
    (root / "labels" / "black_pre_disaster.json").write_text(json.dumps(lab))
    bad["black_pre_disaster"] = "black_pre_disaster.png"

    cfg = make_cfg(tmp_path, root)
    with caplog.at_level(logging.ERROR, logger="footprints.stages.tile"):
        summary = run_tile(cfg)
    assert summary["scenes_read"] == len(good)  # every good scene completes
    reasons = {s["scene_id"]: s for s in summary["skipped"]}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for stem, fname in bad.items():
        assert stem in reasons, f"{stem} not reported"
        assert reasons[stem]["file"].endswith(fname)
        lines = [m for m in errors if fname in m]
        assert len(lines) == 1 and "\n" not in lines[0], lines
    expect = {"truncated_pre_disaster": "truncated", "nolabel_pre_disaster": "missing",
              "malformed_pre_disaster": "malformed label JSON", "badwkt_pre_disaster": "invalid WKT",
              "sizemismatch_pre_disaster": "size mismatch", "outside_pre_disaster": "outside the image",
              "residual_pre_disaster": "residual", "collinear_pre_disaster": "collinear",
              "zerobytes_pre_disaster": "empty scene", "black_pre_disaster": "empty scene"}
    for stem, words in expect.items():
        assert words in reasons[stem]["reason"], (stem, reasons[stem]["reason"])


def test_bad_geotiffs(tmp_path, xview2_data, caplog) -> None:
    root = copy_dataset(xview2_data / "geotiff", tmp_path / "data")
    stem = sorted(p.stem for p in (root / "images").glob("*.tif"))[0]
    with rasterio.open(root / "images" / f"{stem}.tif") as ds:
        data, profile = ds.read(), ds.profile
    profile.pop("crs")
    with rasterio.open(root / "images" / "nocrs.tif", "w", **profile) as ds:
        ds.write(data)
    shutil.copy(root / "labels" / f"{stem}.geojson", root / "labels" / "nocrs.geojson")
    with rasterio.open(root / "images" / "allnodata.tif", "w", **{**profile, "crs": "EPSG:32615", "nodata": 7}) as ds:
        ds.write(np.full_like(data, 7))
    shutil.copy(root / "labels" / f"{stem}.geojson", root / "labels" / "allnodata.geojson")
    tif = (root / "images" / f"{stem}.tif").read_bytes()
    (root / "images" / "truncated.tif").write_bytes(tif[: len(tif) // 2])
    shutil.copy(root / "labels" / f"{stem}.geojson", root / "labels" / "truncated.geojson")
    (root / "labels" / "badjson.geojson").write_text("{ nope")
    shutil.copy(root / "images" / f"{stem}.tif", root / "images" / "badjson.tif")
    cfg = make_cfg(tmp_path, root, **{"data.format": "geotiff", "data.label_format": "vector"})
    with caplog.at_level(logging.ERROR, logger="footprints.stages.tile"):
        summary = run_tile(cfg)
    reasons = {s["scene_id"]: s["reason"] for s in summary["skipped"]}
    assert "no CRS" in reasons["nocrs"]
    assert "empty scene" in reasons["allnodata"]
    assert "unreadable vector labels" in reasons["badjson"]
    assert "truncated" in reasons["truncated"] or "cannot read pixels" in reasons["truncated"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name in ("nocrs.tif", "allnodata.tif", "badjson.geojson"):
        assert sum(name in m for m in errors) == 1
    assert summary["scenes_read"] == 6


def test_nothing_usable_is_a_stage_error(tmp_path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "x_pre_disaster.png").write_bytes(b"not a png")
    cfg = make_cfg(tmp_path, root)
    with pytest.raises(StageError, match="none of the 1 scenes"):
        run_tile(cfg)
    with pytest.raises(StageError, match="no scenes found"):
        run_tile(make_cfg(tmp_path, root / "labels", **{"data.images_dir": "."}))


@pytest.mark.slow
def test_bench_tile_reports_ratio() -> None:
    result = bench_tile(load_config(None, []), n_scenes=2, scene_size=512)
    # both sides did the same work: 2 scenes of 512 px in 4 patches of 256 px each
    assert result["bench"] == "tile" and result["patches"] == 8 and result["floor_patches"] == 8


def test_scene_smaller_than_a_patch_gives_one_padded_patch(tmp_path, xview2_data) -> None:
    cfg = make_cfg(tmp_path, xview2_data / "geotiff", **{"data.format": "geotiff", "data.label_format": "vector",
                                                         "tile.size": 400, "tile.stride": 400})
    run_tile(cfg)
    df = read_manifest(RunPaths.of(cfg).stage("tile"))
    assert len(df) == 6
    assert (df.valid_height == 256).all() and (df.valid_width == 256).all()
    assert df.nodata_frac.tolist() == pytest.approx([1 - 256**2 / 400**2] * 6)
    image, mask = load_patch(RunPaths.of(cfg).stage("tile"), df.iloc[0])
    assert image.shape == (3, 400, 400) and (mask[256:] == 255).all() and (mask[:, 256:] == 255).all()
    assert (image[:, 256:] == 0).all() and (mask[:256, :256] != 255).all()


def test_xview2_target_gsd_keeps_georeference(tmp_path, xview2_data) -> None:
    """0.5 m PNG scenes resampled to 1 m: patch corners still within 0.5 (output) px of the truth."""
    cfg = make_cfg(tmp_path, xview2_data, **{"tile.target_gsd": 1.0})
    run_tile(cfg)
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    truth = json.loads((xview2_data / "truth_transforms.json").read_text())
    assert len(df) == 4 * 4  # 256 px -> 128 px -> 2 x 2 patches of 64
    for _, row in df.iterrows():
        t_out = Affine.from_gdal(*truth[f"{row['scene_id']}.png"]) @ Affine.scale(2)
        with rasterio.open(tile_dir / row["image_path"]) as ds:
            assert corner_error_px(ds.transform, t_out, row["row_off"], row["col_off"], 64) < 0.5
        _, mask = load_patch(tile_dir, row)
        assert set(np.unique(mask)) <= {0, 1}
    assert df.building_px.sum() > 0


# --------------------------------------------------------------------------------------------------
# the patch store


def test_patch_store_holds_the_patches_and_is_covered_by_the_scene_record(tmp_path, xview2_data) -> None:
    from footprints.contracts.freshness import read_record
    from footprints.contracts.patches import PatchStore, store_is_intact, store_paths

    root = xview2_data / "geotiff"
    sets = {"data.format": "geotiff", "data.label_format": "vector", "tile.target": "border"}
    cfg = make_cfg(tmp_path, root, **sets)
    run_tile(cfg)
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    store = PatchStore(tile_dir, df)
    assert store.stored_fraction == 1.0
    order = np.random.default_rng(0).permutation(len(df))
    images, masks = store.read(order)
    assert images.shape == (len(df), 3, 64, 64) and masks.shape == (len(df), 64, 64)
    for k, i in enumerate(order):
        image, mask = load_patch(tile_dir, df.iloc[i])
        assert np.array_equal(images[k], image) and np.array_equal(masks[k], mask)
    sid = df.scene_id.iloc[0]
    record = read_record(RunPaths.of(cfg).scene_record(sid))
    assert all(f"../store/{sid}/{p.name}" in record["files"] for p in store_paths(tile_dir, sid))
    assert not list(tile_dir.rglob("*.part"))

    # a run tiled without the store (or before it existed) gets it on the next run, without re-tiling:
    # its records keep their keys, so nothing downstream (features, models) becomes stale
    run_tile(make_cfg(tmp_path, root, **sets, **{"tile.patch_store": "false"}), overwrite=True)
    assert not (tile_dir / "store").exists() or not any((tile_dir / "store").iterdir())
    keys = {s: read_record(RunPaths.of(cfg).scene_record(s))["key"] for s in df.scene_id.unique()}
    stamp = {p: p.stat().st_mtime_ns for p in tile_dir.glob("patches/*/*.tif")}
    again = run_tile(cfg)
    assert again["scenes_already_done"] == 6 and again["scenes_tiled_now"] == 0
    assert {s: read_record(RunPaths.of(cfg).scene_record(s))["key"] for s in keys} == keys
    assert {p: p.stat().st_mtime_ns for p in tile_dir.glob("patches/*/*.tif")} == stamp
    assert all(store_is_intact(tile_dir, s) for s in keys)
    assert np.array_equal(PatchStore(tile_dir, df).read(order)[1], masks)


# --------------------------------------------------------------------------------------------------
# tile.patch_geotiffs: false (xView2): the patch store alone, no two GeoTIFFs per patch

NO_TIFS = {"tile.patch_geotiffs": "false"}
CHEAP_FEATURES = {"backbone.layers": "[conv1_1]", "features.per_class": "2"}  # one conv layer: a fast backbone


def _store_arrays(tile_dir: Path, sid: str) -> list[np.ndarray]:
    from footprints.contracts.patches import store_paths

    return [np.load(p) for p in store_paths(tile_dir, sid)]


def test_scene_key_is_unchanged_by_patch_geotiffs(tmp_path, xview2_data) -> None:
    """Runs tiled with the defaults stay fresh: the key is today's, and the GeoTIFFs (an output format, not
    the pixels) do not enter it either way."""
    from footprints.contracts.freshness import digest
    from footprints.stages.tile import tiling_params

    default = make_cfg(tmp_path, xview2_data)
    assert default.tile.patch_geotiffs is True
    d, t = default.data, default.tile
    today = {  # the parameters as the scene key was computed before the option existed
        "size": t.size, "stride": t.stride, "target_gsd": t.target_gsd, "bands": list(d.bands),
        "stretch_percentiles": list(d.stretch_percentiles), "nodata": d.nodata,
        "mask_threshold": d.mask_threshold, "target": t.target, "border_m": t.border_m,
        "contact_m": t.contact_m, "max_residual_px": d.max_residual_px, "geotransforms": d.geotransforms,
    }
    assert digest(tiling_params(d, t)) == digest(today)
    off = make_cfg(tmp_path, xview2_data, **NO_TIFS)
    assert digest(tiling_params(off.data, off.tile)) == digest(today)


def test_without_patch_geotiffs_the_store_alone_feeds_features_and_training(tmp_path, xview2_data) -> None:
    from footprints.contracts.freshness import read_record
    from footprints.contracts.patches import PatchStore, store_is_intact
    from footprints.stages.features import run as extract_features
    from footprints.training.data import PatchDataset

    cfg = make_cfg(tmp_path, xview2_data, **NO_TIFS, **CHEAP_FEATURES)
    summary = run_tile(cfg)
    tile_dir = RunPaths.of(cfg).stage("tile")
    assert not list(tile_dir.rglob("*.tif")) and not (tile_dir / "patches").exists()
    df = read_manifest(tile_dir)
    assert summary["scenes_read"] == 4 and len(df) == summary["patches"] == 4 * 16
    assert (df.image_path == "").all() and (df.mask_path == "").all()
    for sid in df.scene_id.unique():
        record = read_record(RunPaths.of(cfg).scene_record(sid))
        assert record["patch_geotiffs"] is False and store_is_intact(tile_dir, sid)
        assert sorted(record["files"]) == sorted([f"{sid}.csv"] + [f"../store/{sid}/{n}" for n in
                                                                     ("images.npy", "masks.npy", "patch_ids.npy")])

    # the same rows and the same pixels as a default run (whose GeoTIFFs are the reference)
    ref_cfg = make_cfg(tmp_path / "ref", xview2_data)
    run_tile(ref_cfg)
    ref_dir = RunPaths.of(ref_cfg).stage("tile")
    ref = read_manifest(ref_dir)
    paths_ = ["image_path", "mask_path"]
    assert df.drop(columns=paths_).equals(ref.drop(columns=paths_))
    for sid in df.scene_id.unique():
        assert all(np.array_equal(a, b) for a, b in zip(_store_arrays(tile_dir, sid), _store_arrays(ref_dir, sid),
                                                         strict=True))

    # features read the store; so does train-segmenter's dataset, and both see the GeoTIFFs' pixels
    meta = extract_features(cfg)
    assert meta["patches"]["train"] == int((df.split == "train").sum()) > 0 and meta["n"]["train"] > 0
    train = df[df.split == "train"].reset_index(drop=True)
    dataset = PatchDataset(tile_dir, train, augment=False, seed=0)
    assert dataset.store.stored_fraction == 1.0
    images, masks, index, *_ = dataset[[(i, 0, i, 1) for i in range(len(train))]]
    for k, i in enumerate(index.tolist()):
        image, mask = load_patch(ref_dir, ref[ref.patch_id == train.patch_id[i]].iloc[0])
        assert np.array_equal(images[k].numpy(), image) and np.array_equal(masks[k].numpy(), mask)
    assert PatchStore(tile_dir, df).stored_fraction == 1.0


def test_a_scene_with_neither_store_nor_geotiffs_is_one_clear_line(tmp_path, xview2_data, capsys) -> None:
    from footprints.cli import main
    from footprints.contracts.patches import PatchStore, store_is_intact, store_paths
    from footprints.errors import InputError

    sets = {**NO_TIFS, **CHEAP_FEATURES}
    cfg = make_cfg(tmp_path, xview2_data, **sets)
    run_tile(cfg)
    tile_dir = RunPaths.of(cfg).stage("tile")
    df = read_manifest(tile_dir)
    first = df[df.split == "train"].iloc[0]
    sid = first.scene_id
    store_paths(tile_dir, sid)[0].unlink()  # a training scene's shard loses its images
    with pytest.raises(InputError) as err:
        PatchStore(tile_dir, df)
    assert sid in str(err.value) and "patch_geotiffs" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match=sid):
        load_patch(tile_dir, first)
    # through the command line: one line naming the scene, exit status 2, no traceback
    overrides = [f"data.root={xview2_data}", f"output_root={tmp_path / 'out'}", "cluster.workers=0",
                 "tile.size=64", "tile.stride=64", "tile.target=binary", *[f"{k}={v}" for k, v in sets.items()]]
    capsys.readouterr()
    assert main(["features", *[a for o in overrides for a in ("--set", o)]]) == 2
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if "error" in line]
    assert len(errors) == 1 and sid in errors[0] and "Traceback" not in printed.err + printed.out
    # the tile stage sees the lost shard: that scene alone is tiled again
    again = run_tile(cfg)
    assert again["scenes_tiled_now"] == 1 and again["scenes_already_done"] == 3
    assert store_is_intact(tile_dir, sid) and not list(tile_dir.rglob("*.tif"))


def test_turning_patch_geotiffs_on_writes_them_and_keeps_keys_and_features(tmp_path, xview2_data) -> None:
    """false -> true re-tiles the scenes under the same keys (same pixels): the GeoTIFFs appear and the
    features extracted before stay fresh. true -> false leaves a finished run alone."""
    from footprints.contracts.freshness import read_record
    from footprints.stages.features import run as extract_features

    off = make_cfg(tmp_path, xview2_data, **NO_TIFS, **CHEAP_FEATURES)
    run_tile(off)
    extract_features(off)
    tile_dir = RunPaths.of(off).stage("tile")
    sids = list(read_manifest(tile_dir).scene_id.unique())
    keys = {s: read_record(RunPaths.of(off).scene_record(s))["key"] for s in sids}

    on = make_cfg(tmp_path, xview2_data, **CHEAP_FEATURES)
    summary = run_tile(on)
    assert summary["scenes_tiled_now"] == 4 and summary["scenes_already_done"] == 0
    df = read_manifest(tile_dir)
    assert len(list(tile_dir.glob("patches/*/*.tif"))) == 2 * len(df) == 2 * 4 * 16
    assert all((tile_dir / p).is_file() for p in [*df.image_path, *df.mask_path])
    for s in sids:
        record = read_record(RunPaths.of(on).scene_record(s))
        assert record["key"] == keys[s] and record["patch_geotiffs"] is True
        assert sum(name.endswith(".tif") for name in record["files"]) == 2 * 16
    assert extract_features(on)["skipped"] is True  # same scene keys: nothing downstream is stale

    back = run_tile(off)
    assert back["scenes_already_done"] == 4 and back["scenes_tiled_now"] == 0
