"""Scene discovery and reading (shared by tile and predict): layouts, georeference, bands, nodata, GSD."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window
from shapely import wkt as shp_wkt

from footprints.config import DataConfig, TileConfig
from footprints.errors import InputError
from footprints.scenes.reader import open_scene
from footprints.scenes.sources import SceneSource, discover_scenes, sources_from_paths
from footprints.synth.dataset import write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sc") / "data"
    write_synthetic_dataset(root, n_scenes=3, seed=0, size=128, geotiff=True)
    return root


def _write_tif(path: Path, data: np.ndarray, **profile) -> Path:
    prof = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
            "dtype": data.dtype.name, "crs": "EPSG:32633", "transform": Affine(0.5, 0, 500000, 0, -0.5, 4e6)}
    prof.update(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


def test_discover_xview2_layout(synth, tmp_path) -> None:
    root = tmp_path / "xv"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("geotiff"))
    pre = sorted((root / "images").glob("*.png"))
    shutil.copy(pre[0], root / "images" / pre[0].name.replace("_pre_", "_post_"))
    found = discover_scenes(DataConfig(root=str(root)))
    assert [s.image for s in found] == pre  # post-disaster left out by default
    assert all(s.label == root / "labels" / f"{s.scene_id}.json" and s.label_kind == "xview2" for s in found)
    both = discover_scenes(DataConfig(root=str(root), use_post_disaster=True))
    assert len(both) == len(pre) + 1
    assert len({s.location_id for s in both}) == len(pre)  # a pre/post pair is one location
    (root / "labels" / f"{pre[1].stem}.json").unlink()
    missing = {s.scene_id: s for s in discover_scenes(DataConfig(root=str(root)))}[pre[1].stem]
    assert missing.label is not None and not missing.label.exists()  # kept: opening names the missing file
    with pytest.raises(InputError, match="label JSON missing") as err:
        open_scene(missing, DataConfig(root=str(root)))
    assert f"{pre[1].stem}.json" in str(err.value)
    shutil.rmtree(root / "labels")  # no labels folder at all: an unlabelled dataset
    assert all(s.label is None for s in discover_scenes(DataConfig(root=str(root))))
    with pytest.raises(InputError, match="images folder not found"):
        discover_scenes(DataConfig(root=str(root), subsets=["nope"]))


def test_discover_geotiff_layouts(tmp_path) -> None:
    data = np.full((3, 8, 8), 9, np.uint8)
    for name in ("a", "b"):
        _write_tif(tmp_path / "images" / f"{name}.tif", data)
        _write_tif(tmp_path / "masks" / f"{name}.tif", data[:1])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.gpkg").write_text("")
    masks = discover_scenes(DataConfig(root=str(tmp_path), format="geotiff", label_format="mask"))
    assert [(s.scene_id, s.mask.name, s.label) for s in masks] == [("a", "a.tif", None), ("b", "b.tif", None)]
    vec = discover_scenes(DataConfig(root=str(tmp_path), format="geotiff", label_format="vector"))
    assert [s.label.name for s in vec] == ["a.gpkg", "b.geojson"]
    paths = sources_from_paths([tmp_path / "images"], DataConfig(format="geotiff", label_format="mask"))
    assert [s.mask.name for s in paths] == ["a.tif", "b.tif"]


def test_xview2_scene_fit_polygons_and_boundless_reads(synth) -> None:
    cfg = DataConfig(root=str(synth))
    truth = json.loads((synth / "truth_transforms.json").read_text())
    src = next(s for s in discover_scenes(cfg)
               if json.loads(s.label.read_text())["features"]["xy"])
    label = json.loads(src.label.read_text())
    with open_scene(src, cfg, TileConfig()) as scene:
        assert scene.crs.to_epsg() == 4326 and (scene.width, scene.height) == (128, 128)
        assert scene.georef_rms_px < 1e-3 and scene.gsd_m == pytest.approx(0.5, rel=1e-3)
        t = Affine.from_gdal(*truth[src.image.name])
        for corner in ((0, 0), (128, 0), (0, 128), (128, 128)):
            col, row = ~t @ (scene.transform @ corner)
            assert np.hypot(col - corner[0], row - corner[1]) < 0.01
        polys = scene.truth_polygons()
        assert polys.crs.to_epsg() == 4326 and len(polys) == len(label["features"]["lng_lat"])
        for got, feat in zip(polys.geometry, label["features"]["lng_lat"], strict=True):
            want = shp_wkt.loads(feat["wkt"])
            assert got.symmetric_difference(want).area < 1e-3 * want.area
        rgb, valid = scene.read(Window(-10, 120, 32, 32))  # hangs over the left and bottom edges
        assert rgb.shape == (3, 32, 32) and valid[:8, 10:].all() and not valid[8:].any() and not valid[:, :10].any()
        assert (rgb[:, ~valid] == 0).all()
        mask = scene.truth_mask(Window(-10, 120, 32, 32))
        assert (mask[~valid] == 255).all() and set(np.unique(mask[valid])) <= {0, 1}


def test_geotransforms_override_places_unlabelled_png(synth, tmp_path) -> None:
    root = tmp_path / "xv"
    shutil.copytree(synth / "images", root / "images")
    gt_file = synth / "truth_transforms.json"
    cfg = DataConfig(root=str(root), geotransforms=str(gt_file))
    src = discover_scenes(cfg)[0]
    with open_scene(src, cfg) as scene:
        assert scene.crs.to_epsg() == 4326 and not scene.has_labels
        assert scene.transform.almost_equals(Affine.from_gdal(*json.loads(gt_file.read_text())[src.image.name]))
        assert scene.truth_mask(Window(0, 0, 4, 4)) is None and scene.truth_polygons() is None
    with open_scene(src, DataConfig(root=str(root))) as scene:
        assert scene.crs is None and scene.gsd_m is None and "pixel space" in scene.warnings[0]


def test_uint16_single_band_stretch_and_nodata(tmp_path) -> None:
    data = np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64) + 1000
    data[0, :4, :] = 65535  # declared nodata rows
    path = _write_tif(tmp_path / "pan.tif", data, nodata=65535)
    cfg = DataConfig(format="geotiff", stretch_percentiles=[0.0, 100.0])
    with open_scene(SceneSource(path), cfg) as scene:
        rgb, valid = scene.read(Window(0, 0, 64, 64))
    assert rgb.dtype == np.uint8 and (rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all()  # repeated band
    assert not valid[:4].any() and valid[4:].all() and (rgb[:, :4] == 0).all()
    assert rgb[0, 4, 0] == 0 and rgb[0, -1, -1] == 255  # percentiles over valid pixels only
    assert (np.diff(rgb[0, 4:].ravel().astype(int)) >= 0).all()
    # nodata override: a user-declared value wins over the file's
    assert data[0, 4, 0] == 1256
    with open_scene(SceneSource(path), DataConfig(format="geotiff", nodata=1256)) as scene:
        _, valid = scene.read(Window(0, 0, 64, 64))
    assert valid[:4].all() and not valid[4, 0] and valid[4, 1:].all() and valid.sum() == 64 * 64 - 1


def test_emptiness_of_a_large_8bit_scene_is_exact(tmp_path, monkeypatch) -> None:
    """A scene too large for memory, 8-bit: no decimated read (it would decode every block), strips until the
    first valid pixel instead; a scene valid in its last row only is not empty, an all-nodata one is."""
    import footprints.scenes.reader as scenes_mod

    monkeypatch.setattr(scenes_mod, "IN_MEMORY_MAX_PX", 0)
    monkeypatch.setattr(scenes_mod.SceneReader, "_read_raw_decimated", lambda self: pytest.fail("decimated read"))
    data = np.zeros((3, 1100, 64), np.uint8)  # three strips of 512 rows
    empty = _write_tif(tmp_path / "empty.tif", data)
    data[1, -1, 7] = 5
    last_row = _write_tif(tmp_path / "last_row.tif", data)
    cfg = DataConfig(format="geotiff")
    with open_scene(SceneSource(last_row), cfg) as scene:
        assert scene._rgb is None and scene._stretch is None
        _, valid = scene.read(Window(0, 1099, 64, 1))
        assert valid.sum() == 1 and valid[0, 7]
    with pytest.raises(InputError, match="empty scene: every pixel is nodata"):
        open_scene(SceneSource(empty), cfg)


def test_band_selection_and_errors(tmp_path) -> None:
    data = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30, 40)])
    path = _write_tif(tmp_path / "rgbn.tif", data)
    with open_scene(SceneSource(path), DataConfig(format="geotiff", bands=[4, 3, 2])) as scene:
        rgb, _ = scene.read(Window(0, 0, 16, 16))
    assert rgb[:, 0, 0].tolist() == [40, 30, 20]
    with pytest.raises(InputError, match=r"band\(s\) \[5\]"):
        open_scene(SceneSource(path), DataConfig(format="geotiff", bands=[5, 3, 2]))
    mask = _write_tif(tmp_path / "m.tif", np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(InputError, match="size mismatch") as err:
        open_scene(SceneSource(path, mask=mask), DataConfig(format="geotiff", label_format="mask"))
    assert "m.tif" in str(err.value)


def test_target_gsd_on_geographic_scene(shared_dir) -> None:
    root = shared_dir / "data" / "spacenet-rio"
    cfg = DataConfig(root=str(root), format="geotiff", label_format="mask", mask_threshold=128)
    src = discover_scenes(cfg)[0]
    with open_scene(src, cfg, TileConfig()) as native:
        assert native.gsd_m == pytest.approx(0.48, abs=0.02)  # EPSG:4326, measured at the scene centre
        w, h = native.width, native.height
    with open_scene(src, cfg, TileConfig(target_gsd=1.0)) as scene:
        assert scene.gsd_m == pytest.approx(1.0, rel=0.01)
        assert scene.width == round(w * native.gsd_m) and scene.height == round(h * native.gsd_m)
        mask = scene.truth_mask(Window(0, 0, scene.width, scene.height))
        assert mask.shape == (scene.height, scene.width) and (mask == 1).any() and (mask == 0).any()
        polys = scene.truth_polygons()  # mask labels vectorised on the output grid
        assert polys.crs.to_epsg() == 4326 and len(polys) > 0


@pytest.mark.parametrize("target_gsd", [None, 0.8])
def test_windowed_path_equals_in_memory_path(synth, monkeypatch, target_gsd) -> None:
    """Large scenes are read window by window; the result must be the in-memory result, pixel for pixel."""
    import footprints.scenes.reader as scenes_mod

    root = synth / "geotiff"
    cfg = DataConfig(root=str(root), format="geotiff", label_format="vector")
    tile = TileConfig(target_gsd=target_gsd)
    src = next(s for s in discover_scenes(cfg) if json.loads(s.label.read_text())["features"])
    with open_scene(src, cfg, tile) as scene:
        assert scene._rgb is not None
        windows = [Window(-7, -3, 40, 50), Window(30, 60, 64, 64), Window(100, 100, 64, 64),
                   Window(0, 0, scene.width, scene.height), Window(-1, -1, scene.width + 2, scene.height + 2)]
        expected = [(*scene.read(w), scene.truth_mask(w)) for w in windows]
        size = (scene.width, scene.height)
    monkeypatch.setattr(scenes_mod, "IN_MEMORY_MAX_PX", 0)
    with open_scene(src, cfg, tile) as scene:
        assert scene._rgb is None and (scene.width, scene.height) == size
        for w, (rgb, valid, mask) in zip(windows, expected, strict=True):
            got_rgb, got_valid = scene.read(w)
            np.testing.assert_array_equal(got_rgb, rgb)
            np.testing.assert_array_equal(got_valid, valid)
            np.testing.assert_array_equal(scene.truth_mask(w), mask)
    assert any((m == 1).any() for _, _, m in expected)  # the comparison covered building pixels
