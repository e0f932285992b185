"""Several labelled sources in one run (`data.sources`): the config's rules, scene ids that carry the source's
name, splits and folds per source, per-source counts in the tile summary and per-source figures in evaluate."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import Window

from footprints.config import Config, ConfigError, load_config
from footprints.contracts.footprint_files import write_geojson, write_gpkg
from footprints.contracts.freshness import write_record
from footprints.contracts.manifest import read_manifest, split_sources
from footprints.contracts.patches import store_dir
from footprints.contracts.paths import RunPaths, ScenePaths
from footprints.contracts.tile_records import read_scene_record
from footprints.errors import InputError, StageError
from footprints.polygons.vectorize import polygons_from_probability
from footprints.scenes.geo import metric_crs_for
from footprints.scenes.reader import open_scene
from footprints.scenes.sources import SceneSource, scene_config
from footprints.stages import tile as tile_stage
from footprints.stages.evaluate import run as run_evaluate
from footprints.stages.tile import assign_folds, assign_splits
from footprints.synth.dataset import write_synthetic_dataset


def sources_set(data: Path, gt_keys: str = "") -> str:
    """The xView2 layout of a synthetic set (with its exact transforms: no scene skipped) and its GeoTIFF +
    GeoJSON variant (the same stems) as two sources, `xv` and `gt` (with `gt_keys` added to its entry)."""
    return (f"data.sources=[{{name: xv, root: {data}, geotransforms: {data / 'truth_transforms.json'}}}, "
            f"{{name: gt, root: {data / 'geotiff'}, format: geotiff, label_format: vector{gt_keys}}}]")


def two_sources(data: Path, out: Path, *sets: str) -> Config:
    return load_config(None, [sources_set(data), "name=two", f"output_root={out}", "cluster.workers=0",
                              "tile.size=64", "tile.stride=64", "tile.patch_geotiffs=false", *sets])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources") / "data"
    write_synthetic_dataset(root, n_scenes=6, seed=0, size=128, geotiff=True)
    return root


@pytest.fixture(scope="module")
def tiled(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    # 0.8 m: both sources (0.5 m scenes, one a lon/lat PNG, one a UTM GeoTIFF) resampled to one GSD
    cfg = two_sources(data, tmp_path_factory.mktemp("run") / "out", "tile.target_gsd=0.8")
    tile_stage.run(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# the config


def test_config_errors_are_one_line_naming_the_source_key(tmp_path: Path) -> None:
    ok = load_config(None, ["data.sources=[{name: a, root: x}, {name: b-2, root: y, format: geotiff, bands: [1]}]"])
    assert [s.name for s in ok.data.sources] == ["a", "b-2"] and ok.data.sources[1].bands == [1]
    cases = {
        "[{name: a, root: x}, {name: a, root: y}]": r"data.sources\[1\].name: 'a' is also the name of data.sources\[0\]",
        "[{name: a, root: x, label_formt: mask}]": r"unknown key 'data.sources\[0\].label_formt'; did you mean "
                                                  "'label_format'",
        "[{name: a__b, root: x}]": r"data.sources\[0\].name: must be a plain id",
        "[{name: 'a/b', root: x}]": r"data.sources\[0\].name: must be a plain id",
        "[{root: x}]": r"data.sources\[0\].name: must be a plain id .*got ''",
        "[{name: a}]": r"data.sources\[0\].root: required",
        "[{name: a, root: x, mask_threshold: 0}]": r"data.sources\[0\].mask_threshold: must be in \[1, inf\]",
        "[{name: a, root: x, format: tif}]": r"data.sources\[0\].format: expected one of 'xview2', 'geotiff'",
        "[a, b]": r"data.sources\[0\]: expected a mapping",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, [f"data.sources={value}"])
        assert "\n" not in str(err.value)
    # data.root beside data.sources is the error (each source names its own root)
    with pytest.raises(ConfigError, match="data.root and data.sources are both set"):
        load_config(None, ["data.root=elsewhere", "data.sources=[{name: a, root: x}]"])


def test_a_missing_root_is_named_with_its_source(data: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.sources=[{{name: xv, root: {data}}}, {{name: far, root: {tmp_path / 'nope'}}}]",
                             f"output_root={tmp_path / 'out'}", "cluster.workers=0"])
    with pytest.raises(InputError, match=r"nope: root of data source 'far' \(data.sources\[1\].root\) not found"):
        tile_stage.run(cfg)
    # a source whose root holds no scene stops the stage (a wrong folder, not a smaller run)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    cfg.data.sources[1].root = str(tmp_path / "empty")
    with pytest.raises(StageError, match=r"empty: no scenes found \(data.sources\[1\].images_dir 'images'"):
        tile_stage.run(cfg)


# ---------------------------------------------------------------------------------------------------
# splits


def _fake(source: str | None, n: int) -> list[SceneSource]:
    return [SceneSource(Path(f"/d/img{i:02d}.png"), source_name=source) for i in range(n)]


def test_folds_and_splits_are_per_source_and_a_single_root_is_split_as_before() -> None:
    scenes = _fake("big", 7) + _fake("small", 4)
    assert len({s.scene_id for s in scenes}) == 11 and scenes[0].scene_id == "big__img00"
    tested: Counter[str] = Counter()
    for k in range(3):
        cfg = load_config(None, ["tile.split_mode=kfold", "tile.folds=3", f"tile.fold={k}", "seed=4"])
        split = tile_stage._split_for(scenes, cfg)
        for source in ("big", "small"):  # every source in every fold's train, val and test
            assert {v for sid, v in split.items() if sid.startswith(f"{source}__")} == {"train", "val", "test"}
        tested.update(sid for sid, v in split.items() if v == "test")
    assert tested == Counter({s.scene_id: 1 for s in scenes})  # every scene tested once over the folds
    cfg = load_config(None, ["seed=4"])  # split_ratios per source: each gets its val and test scene
    split = tile_stage._split_for(scenes, cfg)
    for source, n in (("big", 7), ("small", 4)):
        counts = Counter(v for sid, v in split.items() if sid.startswith(f"{source}__"))
        assert counts["val"] >= 1 and counts["test"] >= 1 and sum(counts.values()) == n
    # sources smaller than the folds: spread over the folds (each fold tests something), none refused
    tiny = _fake("a", 2) + _fake("b", 2) + _fake("c", 1)
    cfg = load_config(None, ["tile.split_mode=kfold", "tile.folds=5"])
    tests = [sid for k in range(5) for sid, v in tile_stage._split_for(tiny, _fold(cfg, k)).items() if v == "test"]
    assert sorted(tests) == sorted(s.scene_id for s in tiny)
    # one root (no source name): the split of the whole list, as the code before sources gave it
    plain = _fake(None, 9)
    locations = [s.location_id for s in plain]
    assert plain[0].scene_id == "img00"
    assert tile_stage._split_for(plain, load_config(None, ["seed=3"])) == assign_splits(locations, [0.7, 0.15, 0.15], 3)
    kcfg = load_config(None, ["tile.split_mode=kfold", "tile.folds=3", "tile.fold=1", "seed=3"])
    assert tile_stage._split_for(plain, kcfg) == assign_folds(locations, 3, 1, 3)


def _fold(cfg: Config, k: int) -> Config:
    cfg.tile.fold = k
    return cfg


# ---------------------------------------------------------------------------------------------------
# the tile stage


def test_tile_holds_both_sources_with_prefixed_ids_and_per_source_counts(tiled: Config, data: Path) -> None:
    paths = RunPaths.of(tiled)
    manifest = read_manifest(paths.tile)
    ids = sorted(set(manifest["scene_id"]))
    stems = sorted(p.stem for p in (data / "images").glob("*.png"))
    assert ids == sorted([f"gt__{s}" for s in stems] + [f"xv__{s}" for s in stems])
    summary = json.loads(paths.tile_summary.read_text())
    assert list(summary["sources"]) == ["xv", "gt"]
    for name, fmt in (("xv", "xview2"), ("gt", "geotiff")):
        mine = manifest[manifest["scene_id"].str.startswith(f"{name}__")]
        s = summary["sources"][name]
        assert (s["format"], s["scenes_found"], s["scenes_read"], s["scenes_skipped"]) == (fmt, 6, 6, 0)
        assert s["patches"] == len(mine) > 0
        for split in ("train", "val", "test"):  # every source in every split, counted as the manifest has it
            rows = mine[mine["split"] == split]
            assert s["splits"][split]["scenes"] == rows["scene_id"].nunique() >= 1
            assert s["splits"][split]["patches"] == len(rows)
            assert s["splits"][split]["building_px"] == rows["building_px"].sum()
    assert sum(s["patches"] for s in summary["sources"].values()) == summary["patches"] == len(manifest)
    assert manifest.groupby("scene_id")["split"].nunique().max() == 1  # splits by scene
    for sid in ids:  # each scene read with its source's settings, all at the one GSD
        record = read_scene_record(paths.scene_record(sid))
        assert record.data_source == sid.split("__")[0]
        assert record.scene["gsd_m"] == pytest.approx(0.8, rel=1e-3)
    # the later stages find each split's scenes again, each with its source's settings
    found = split_sources(paths.tile, tiled.data, "test")
    assert {s.source_name for s in found} == {"xv", "gt"}
    assert all(s.data.format == ("geotiff" if s.source_name == "gt" else "xview2") for s in found)


def test_each_source_is_read_with_its_own_settings(data: Path, tmp_path: Path) -> None:
    """The two layouts hold the same pixels: with the bands reversed for one source only, its patches are the
    other's with the channels reversed (a source's key overrides the `data:` section's for its scenes)."""
    cfg = load_config(None, [sources_set(data, ", bands: [3, 2, 1]"), f"output_root={tmp_path}", "cluster.workers=0",
                             "tile.size=64", "tile.stride=64", "tile.patch_geotiffs=false", "data.bands=[1, 2, 3]"])
    tile_stage.run(cfg)
    tile_dir = RunPaths.of(cfg).tile
    stem = sorted(p.stem for p in (data / "images").glob("*.png"))[0]
    xv = np.load(store_dir(tile_dir, f"xv__{stem}") / "images.npy")
    gt = np.load(store_dir(tile_dir, f"gt__{stem}") / "images.npy")
    assert xv.shape == gt.shape and xv.std() > 0 and not np.array_equal(xv, xv[:, ::-1])
    assert np.array_equal(gt, xv[:, ::-1])
    params = {sid: read_scene_record(RunPaths.of(cfg).scene_record(sid)).params["bands"]
              for sid in (f"xv__{stem}", f"gt__{stem}")}
    assert params == {f"xv__{stem}": [1, 2, 3], f"gt__{stem}": [3, 2, 1]}  # and in each scene's key


def test_folds_with_validation_bands_find_each_sources_bands_again(data: Path, tmp_path: Path) -> None:
    """k-fold per source with `tile.val_band`: both sources in train, val and test, and the later stages find
    each band again in its own source (the two sources hold images of the same names)."""
    cfg = two_sources(data, tmp_path, "tile.val_band=0.25", "tile.split_mode=kfold", "tile.folds=3", "tile.fold=1")
    tile_stage.run(cfg)
    for split in ("train", "val", "test"):
        found = split_sources(RunPaths.of(cfg).tile, cfg.data, split)
        assert {s.source_name for s in found} == {"xv", "gt"}
        assert all(s.scene_id.startswith(f"{s.source_name}__") for s in found)
        assert all((s.rows is not None) == (split != "test") for s in found)
        assert all(s.data.format == ("geotiff" if s.source_name == "gt" else "xview2") for s in found)


def test_a_single_root_keeps_its_scene_ids_records_and_summary(data: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={data / 'geotiff'}", "data.format=geotiff", "data.label_format=vector",
                             f"output_root={tmp_path}", "cluster.workers=0", "tile.size=64", "tile.stride=64",
                             "tile.patch_geotiffs=false"])
    summary = tile_stage.run(cfg)
    paths = RunPaths.of(cfg)
    ids = sorted(set(read_manifest(paths.tile)["scene_id"]))
    assert ids == sorted(p.stem for p in (data / "images").glob("*.png"))  # bare stems
    assert "sources" not in summary and "sources" not in json.loads(paths.tile_summary.read_text())
    record = json.loads(paths.scene_record(ids[0]).read_text())
    assert "data_source" not in record and record["location_id"] == ids[0].removesuffix("_pre_disaster")


# ---------------------------------------------------------------------------------------------------
# evaluate


def _predict(cfg: Config, good: str) -> list[str]:
    """Predictions for the test scenes: the truth for source `good`, nothing for the other."""
    paths = RunPaths.of(cfg)
    pred_dir = paths.stage("predict")
    pred_dir.mkdir(parents=True, exist_ok=True)
    layers, ids = [], []
    vector = {"threshold": 0.5, "min_area_m2": 0.0, "hole_area_m2": 4.0, "simplify_px": 1.0}
    for src in split_sources(paths.tile, cfg.data, "test"):
        with open_scene(src, scene_config(src, cfg.data), cfg.tile) as r:
            truth = r.truth_mask(Window(0, 0, r.width, r.height))
            perfect = src.source_name == good
            prob = np.where((truth == 1) & perfect, 255, 0).astype(np.uint8)
            with rasterio.open(pred_dir / f"{r.scene_id}_prob.tif", "w", driver="GTiff", width=r.width,
                               height=r.height, count=1, dtype="uint8", crs=r.crs, transform=r.transform) as dst:
                dst.write(prob, 1)
            gdf = polygons_from_probability(np.zeros_like(prob), r.transform, r.crs, scene=r.scene_id)
            if perfect:
                gdf = r.truth_polygons().assign(scene=r.scene_id, area_m2=1.0, mean_prob=1.0, max_prob=1.0)
            write_gpkg(gdf, pred_dir / f"{r.scene_id}.gpkg", crs=metric_crs_for(r.transform, r.crs, r.width, r.height))
            layers.append(gdf.to_crs(4326))
        sp = ScenePaths(pred_dir, src.scene_id)
        write_record(sp.record, "test", [sp.prob, sp.gpkg], scene_id=src.scene_id, vector=vector)
        ids.append(src.scene_id)
    write_geojson(pd.concat(layers, ignore_index=True), pred_dir / "footprints.geojson")
    (pred_dir / "summary.json").write_text(json.dumps({"split": "test", "calibration": "test"}))
    return ids


def test_evaluate_gives_every_figure_per_source_and_pooled(tiled: Config, capsys: pytest.CaptureFixture[str]) -> None:
    ids = _predict(tiled, good="xv")
    res = run_evaluate(tiled, overwrite=True)
    assert sorted(res["per_scene"]) == sorted(ids)
    assert {s["source"] for s in res["per_scene"].values()} == {"xv", "gt"}
    xv, gt = res["per_source"]["xv"], res["per_source"]["gt"]
    assert xv["polygon"]["f1"] == 1.0 and xv["pixel"]["building_iou"] == 1.0 and xv["polygon"]["tp"] > 0
    assert gt["polygon"]["tp"] == gt["polygon"]["n_pred"] == 0 and gt["polygon"]["fn"] > 0
    assert gt["pixel"]["tp"] == 0 and gt["pixel"]["building_iou"] == 0.0
    assert xv["scenes"] + gt["scenes"] == len(ids)
    overall = res["overall"]
    for kind, keys in (("pixel", ("tp", "fp", "fn", "tn")), ("polygon", ("tp", "fp", "fn", "n_truth", "n_pred"))):
        for key in keys:  # the pooled figures are the sums of the sources' counts
            assert overall[kind][key] == xv[kind][key] + gt[kind][key]
    assert 0 < overall["polygon"]["f1"] < 1
    saved = json.loads(RunPaths.of(tiled).metrics.read_text())
    assert saved["per_source"] == res["per_source"]
    report = (RunPaths.of(tiled).stage("evaluate") / "report.md").read_text()
    section = report.split("## Per source")[1]
    assert "| xv | " in section and "| gt | " in section
    out = capsys.readouterr().out
    assert "source xv:" in out and "source gt:" in out
