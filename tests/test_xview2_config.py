"""configs/xview2.yaml from end to end on a synthetic dataset in the official xView2 layout
(`<root>/{train,tier3,hold,test}/{images,labels}`), changing only where the data is, random backbone
weights, and sizes (epochs, samples, batches, workers, output root) small enough for a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pyogrio
import pytest

from footprints.cli import main
from footprints.config import load_config
from footprints.contracts.manifest import read_manifest
from footprints.contracts.patches import store_is_intact
from footprints.synth.dataset import write_synthetic_dataset

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "xview2.yaml"
SPLITS = ("train", "val", "test")
SUBSETS = {"train": 2, "tier3": 2, "hold": 2, "test": 2}


def test_synth_writes_the_official_xview2_layout_with_subset_folders(tmp_path: Path, capsys) -> None:
    out = tmp_path / "xv"
    assert main(["synth", "--out", str(out), "--subsets", "train=2,tier3=1,hold=1,test=1", "--size", "64",
                 "--seed", "3", "--no-geotiff"]) == 0
    names = {sub: sorted(p.name for p in (out / sub / "images").glob("*_pre_disaster.png")) for sub in SUBSETS}
    for sub, v in names.items():  # each with its post-disaster pair (the CLI's default)
        assert sorted(p.name for p in (out / sub / "images").glob("*_post_disaster.png")) == [
            n.replace("_pre_", "_post_") for n in v]
    assert {sub: len(v) for sub, v in names.items()} == {"train": 2, "tier3": 1, "hold": 1, "test": 1}
    ids = [name.split("_")[1] for v in names.values() for name in v]
    assert sorted(ids) == [f"{i:08d}" for i in range(1, 6)]  # unique across subsets
    for sub, v in names.items():
        assert all(name.endswith("_pre_disaster.png") for name in v)
        assert sorted(p.name for p in (out / sub / "labels").glob("*_pre_disaster.json")) == [
            n[:-4] + ".json" for n in v]
    assert set(json.loads((out / "truth_transforms.json").read_text())) == {n for v in names.values() for n in v}
    assert not (out / "images").exists() and not (out / "geotiff").exists()
    # scene i is the same scene as in the flat layout of the same seed
    flat = tmp_path / "flat"
    write_synthetic_dataset(flat, n_scenes=5, seed=3, size=64, geotiff=False)
    for sub, v in names.items():
        for name in v:
            assert (out / sub / "images" / name).read_bytes() == (flat / "images" / name).read_bytes()
    # --subsets sets the scene count: not with --scenes; a malformed list is a usage error
    capsys.readouterr()
    assert main(["synth", "--out", str(tmp_path / "x"), "--subsets", "train=1", "--scenes", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    for bad in ("train", "train=x", "../up=1", "train=1,train=2"):
        with pytest.raises(SystemExit) as exit_:
            main(["synth", "--out", str(tmp_path / "x"), "--subsets", bad])
        assert exit_.value.code == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_xview2_config_runs_end_to_end_on_the_xview2_layout(tmp_path: Path) -> None:
    data = tmp_path / "xview2"
    synth = write_synthetic_dataset(data, n_scenes=sum(SUBSETS.values()), seed=1, size=256, geotiff=False,
                                    subsets=SUBSETS, damage=True)
    # scenes without buildings cannot be georeferenced from their labels: the tile stage skips them
    buildings = {}
    for subset, names in synth["subsets"].items():
        for name in names:
            label = json.loads((data / subset / "labels" / name.replace(".png", ".json")).read_text())
            buildings[name.removesuffix(".png")] = (subset, len(label["features"]["xy"]))
    overrides = [
        f"data.root={data}", "backbone.weights=random",
        f"output_root={tmp_path / 'outputs'}", "cluster.workers=0",
        "features.per_class=4", "features.batch_size=4",
        "classifier.epochs=1", "classifier.batch_size=64",
        "segmenter.epochs=1", "segmenter.batch_size=2", "segmenter.max_steps_per_epoch=1",
        "segmenter.num_workers=0",
        "predict.batch_size=4", "predict.block_size=512", "predict.calibration_scenes=1",
        "damage.epochs=2", "damage.pixels_per_building=8",
    ]
    cfg = load_config(CONFIG, overrides)
    mapping = cfg.tile.subset_splits
    assert mapping == {"train": "train", "tier3": "train", "hold": "val", "test": "test"}
    assert not cfg.tile.patch_geotiffs and cfg.features.shard_patches == 512

    assert main(["all", "--config", str(CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 0
    out = tmp_path / "outputs" / "xview2"

    # tile: splits by subset folder, no GeoTIFF per patch, every scene's patch store intact
    usable = {sid: subset for sid, (subset, n) in buildings.items() if n > 0}
    expected = {split: sum(mapping[sub] == split for sub in usable.values()) for split in SPLITS}
    assert min(expected.values()) >= 1, expected  # this seed gives every split a usable scene
    summary = json.loads((out / "tile" / "summary.json").read_text())
    assert summary["scenes_found"] == len(buildings) and summary["scenes_read"] == len(usable)
    assert summary["scenes_skipped"] == len(buildings) - len(usable)
    for split in SPLITS:
        assert summary["splits"][split]["scenes"] == expected[split], split
        assert summary["splits"][split]["patches"] == expected[split]  # 256 px scenes, 256 px patches
    manifest = read_manifest(out / "tile")
    assert (manifest["split"] == manifest["subset"].map(mapping)).all()
    assert dict(zip(manifest["scene_id"], manifest["subset"], strict=True)) == usable
    assert not list((out / "tile").rglob("*.tif"))
    assert (manifest["image_path"] == "").all() and (manifest["mask_path"] == "").all()
    assert all(store_is_intact(out / "tile", sid) for sid in usable)

    # damage: trained on the train and hold scenes' graded twins, every test footprint graded
    assert (out / "train-damage" / "best.pt").is_file()
    assert json.loads((out / "damage" / "metrics.json").read_text())["per_building"] is not None

    # features, both models
    assert list((out / "features").glob("train_*.npz")) and list((out / "features").glob("val_*.npz"))
    assert (out / "train-classifier" / "best.pt").is_file()
    assert (out / "train-segmenter" / "best.pt").is_file()

    # predict: footprints of every test scene (and only those), merged in footprints.geojson
    test_ids = sorted(sid for sid, sub in usable.items() if mapping[sub] == "test")
    for sid in test_ids:
        info = pyogrio.read_info(out / "predict" / f"{sid}.geojson")
        assert info["crs"] in ("EPSG:4326", "OGC:CRS84")
    predicted = sorted(p.stem for p in (out / "predict").glob("*.geojson") if p.stem != "footprints")
    assert predicted == test_ids
    merged = pyogrio.read_info(out / "predict" / "footprints.geojson")["features"]

    # evaluate: metrics of the test scenes, with polygon figures against every labelled building
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert sorted(metrics["per_scene"]) == test_ids
    polygon = metrics["overall"]["polygon"]
    for key in ("f1", "precision", "recall", "tp", "fp", "fn", "n_pred", "n_truth", "merges", "splits"):
        assert key in polygon, key
    assert polygon["n_pred"] == merged == polygon["tp"] + polygon["fp"]
    # every building of the test scenes' labels is a truth polygon, matched or missed
    n_truth = sum(buildings[sid][1] for sid in test_ids)
    assert polygon["n_truth"] == polygon["tp"] + polygon["fn"] == n_truth > 0
    assert 0.0 <= metrics["overall"]["pixel"]["building_iou"] <= 1.0
