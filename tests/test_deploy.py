"""A model to deploy: a run with no test split still calibrates, and predict reads scenes at the model's GSD.

- Train on everything: a tiny run (synthetic GeoTIFF scenes, random backbone, `tile.split_ratios: [1, 0, 0]`
  with `tile.val_band`) goes through `footprints all`; predict calibrates on the validation bands and stores
  the calibration beside the checkpoint, evaluate says there is no test split, and `predict --checkpoint
  --input` on a new scene uses that calibration, not the defaults.
- Scale follows the model: with the red checkpoint (tests/checkpoint_fixtures.py, pointwise, so a resampled
  scene shows in its probability raster's pixel size) given a `training_gsd`, a scene of another GSD is read
  at the model's, said in the log; `predict.match_model_gsd=false`, a scene within the tolerance and a
  checkpoint without the record read it as it is; evaluate scores a resampled split on predict's grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from checkpoint_fixtures import red_checkpoint
from test_inference import _write_tif
from test_predict import _calibration_dataset, _cfg

from footprints.cli import main
from footprints.contracts.checkpoints import save_checkpoint
from footprints.contracts.paths import RunPaths
from footprints.stages.evaluate import run as run_evaluate
from footprints.stages.predict import run as run_predict
from footprints.synth.dataset import write_synthetic_dataset

# ---------------------------------------------------------------------------------------------------
# train on everything, then deploy


def _deploy_config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "deploy.yaml"
    # the grids leave out predict's fallback values (threshold 0.5, seed threshold 0.9 = the last of the
    # default seed grid, min area 0): whatever validation chooses differs from them
    cfg.write_text(
        f"""
name: deploy
output_root: {tmp_path / "outputs"}
seed: 3
data: {{root: {data}, format: geotiff, label_format: vector}}
tile: {{size: 64, stride: 64, split_ratios: [1, 0, 0], val_band: 0.5}}
backbone: {{weights: random, normalization: torchvision, layers: [input, conv1_1]}}
features: {{per_class: 8, batch_size: 8}}
classifier: {{epochs: 1, batch_size: 64, hidden: 16, baseline: false}}
segmenter: {{epochs: 0, batch_size: 4}}  # best.pt: the converted classifier
predict: {{threshold_grid: [0.3, 0.6], seed_threshold_grid: [0.5], min_area_grid: [15.0, 30.0]}}
cluster: {{kind: local, workers: 0}}
"""
    )
    return cfg


def test_a_run_without_test_split_calibrates_and_its_checkpoint_predicts_with_that_calibration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # predict without a config: its default run folder is ./outputs
    write_synthetic_dataset(tmp_path / "data", n_scenes=2, seed=5, size=128)
    write_synthetic_dataset(tmp_path / "new", n_scenes=1, seed=11, size=128)
    cfg = _deploy_config(tmp_path, tmp_path / "data" / "geotiff")
    with caplog.at_level(logging.INFO, logger="footprints"):
        assert main(["all", "--config", str(cfg)]) == 0
    run = RunPaths(tmp_path / "outputs" / "deploy")
    assert "split 'test' of" in caplog.text and "has no scenes (a run with no test split): nothing to predict" in caplog.text
    assert "evaluate deploy: the run has no test split" in caplog.text
    assert not run.metrics.exists()  # nothing evaluated, nothing pretended
    summary = json.loads(run.predict_summary.read_text())
    assert (summary["split"], summary["scenes"]) == ("test", 0)

    # calibrated on the validation bands, stored beside the checkpoint with the run's copy
    beside = run.best_checkpoint.with_name("best.calibration.json")
    stored = json.loads(beside.read_text())
    assert stored["validation_scenes"] == 2 and stored["checkpoint_key"]
    chosen = (stored["threshold"], stored["seed_threshold"], stored["min_area_m2"])
    assert chosen[0] in (0.3, 0.6) and chosen[1] == 0.5 and chosen[2] in (15.0, 30.0)
    assert json.loads(run.calibration.read_text())["threshold"] == chosen[0]
    # the checkpoint records its training scenes' GSD (the synthetic GeoTIFFs: 0.5 m)
    meta = torch.load(run.best_checkpoint, weights_only=True, map_location="cpu")["meta"]
    assert meta["training_gsd"] == {"median_m": 0.5, "min_m": 0.5, "max_m": 0.5, "scenes": 2}

    # a rerun finds predict complete
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        assert main(["predict", "--config", str(cfg)]) == 0
    assert "grid search" not in caplog.text

    # a new scene with the checkpoint alone: the stored calibration, not predict's fallback values
    caplog.clear()
    out = tmp_path / "deployed" / "fp.geojson"
    with caplog.at_level(logging.INFO, logger="footprints"):
        assert main(["predict", "--checkpoint", str(run.best_checkpoint), "--input",
                     str(tmp_path / "new" / "geotiff" / "images"), "--output", str(out),
                     "--set", "cluster.workers=0"]) == 0
    assert "chosen for this checkpoint" in caplog.text and "no stored calibration" not in caplog.text
    (record,) = (json.loads(p.read_text()) for p in (tmp_path / "deployed" / "fp_scenes").glob("*.json"))
    used = record["vector"]
    assert (used["threshold"], used["seed_threshold"], used["min_area_m2"]) == chosen
    assert chosen != (0.5, 0.9, 0.0)


# ---------------------------------------------------------------------------------------------------
# scale follows the model


def _red_at(folder: Path, training_gsd: dict | None) -> Path:
    """The red checkpoint with `meta.training_gsd` set (None: a checkpoint made before the record)."""
    state = torch.load(red_checkpoint(folder), weights_only=True, map_location="cpu")
    state["meta"] = {**state["meta"], "training_gsd": training_gsd}
    return save_checkpoint(folder / f"red_{0 if training_gsd is None else training_gsd['median_m']}.pt", state)


def _building_scene(path: Path, gsd: float) -> Path:
    """A 100 x 100 px scene at `gsd` metres with a 30 x 20 px building painted red (p 0.9) on dark ground."""
    rgb = np.full((3, 100, 100), 40, np.uint8)
    rgb[0, 40:60, 30:60] = 230
    return _write_tif(path, rgb, Affine(gsd, 0, 448000.0, 0, -gsd, 5411000.0), "EPSG:32631")


def _predict(tmp_path: Path, ckpt: Path, scenes: list[Path], tag: str, **predict) -> dict[str, tuple]:
    """Predict `scenes` with `ckpt`: {scene: (probability raster's transform, its shape, building area m2)}."""
    cfg = _cfg(tmp_path, **{"threshold": 0.5, "min_area_m2": 0.0, **predict})
    out = run_predict(cfg, checkpoint=str(ckpt), inputs=[str(s) for s in scenes],
                      output=str(tmp_path / tag / "fp.geojson"))
    assert out["scenes"] == len(scenes) and out["polygons"] == len(scenes)
    areas = {f["properties"]["scene"]: f["properties"]["area_m2"]
             for f in json.loads(Path(out["geojson"]).read_text())["features"]}
    got = {}
    for scene in scenes:
        with rasterio.open(Path(out["scene_dir"]) / f"{scene.stem}_prob.tif") as src:
            got[scene.stem] = (src.transform, src.shape, areas[scene.stem])
    return got


def test_a_scene_of_another_gsd_is_read_at_the_model_gsd_unless_turned_off(tmp_path: Path, caplog) -> None:
    model = _red_at(tmp_path / "model", {"median_m": 0.5, "min_m": 0.5, "max_m": 0.5, "scenes": 3})
    coarse = _building_scene(tmp_path / "images" / "coarse.tif", 0.75)
    near = _building_scene(tmp_path / "images" / "near.tif", 0.52)  # within the 5% tolerance: as it is
    with caplog.at_level(logging.INFO, logger="footprints"):
        got = _predict(tmp_path, model, [coarse, near], "matched")
    (transform, shape, area) = got["coarse"]
    assert transform.a == pytest.approx(0.5) and shape == (150, 150)  # read at the model's 0.5 m
    assert area == pytest.approx(30 * 20 * 0.75**2, rel=0.05)  # the same building in metres
    assert got["near"][0].a == pytest.approx(0.52) and got["near"][1] == (100, 100)
    (note,) = [r.getMessage() for r in caplog.records if "read at" in r.getMessage()]  # one line, one scene
    assert "coarse: ground sample distance 0.75 m" in note and "read at 0.5 m" in note

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="footprints"):
        transform, shape, area_off = _predict(tmp_path, model, [coarse], "off", match_model_gsd=False)["coarse"]
    assert transform.a == pytest.approx(0.75) and shape == (100, 100)
    assert "read at" not in caplog.text
    assert area_off == pytest.approx(area, rel=0.05)

    # a checkpoint made before the record: read as it is, as before; with neither a stored calibration nor
    # the config's values, the warning names the fallback values used (it once named the grid's 0.20)
    caplog.clear()
    old = _red_at(tmp_path / "model", None)
    with caplog.at_level(logging.WARNING, logger="footprints"):
        transform, shape, _ = _predict(tmp_path, old, [coarse], "old", threshold=None, min_area_m2=None)["coarse"]
    assert transform.a == pytest.approx(0.75) and shape == (100, 100)
    (line,) = [r.getMessage() for r in caplog.records if "no stored calibration" in r.getMessage()]
    used = json.loads((tmp_path / "old" / "fp_scenes" / "coarse.json").read_text())["vector"]
    assert (used["threshold"], used["min_area_m2"]) == (0.5, 0.0)
    assert f"threshold 0.50, seed threshold {used['seed_threshold']:.2f}, min area 0.0 m2" in line


def test_a_split_read_at_the_model_gsd_is_calibrated_and_evaluated_on_that_grid(tmp_path: Path, caplog) -> None:
    """val and test scenes at 0.5 m, a model trained at 0.3 m: both read at 0.3 m; evaluate reads the test
    scene's truth on the grid its probabilities are on (the crafted best calibration finds every building)."""
    cfg = _calibration_dataset(tmp_path)
    cfg.predict.checkpoint = str(_red_at(tmp_path / "model", {"median_m": 0.3, "min_m": 0.3, "max_m": 0.3,
                                                              "scenes": 1}))
    with caplog.at_level(logging.INFO, logger="footprints"):
        out = run_predict(cfg)
    assert "calibration: val1: ground sample distance 0.5 m" in caplog.text
    assert "predict: test1: ground sample distance 0.5 m" in caplog.text
    assert (out["threshold"], out["min_area_m2"]) == (0.5, 5.0) and out["polygons"] == 4
    with rasterio.open(RunPaths.of(cfg).predict / "test1_prob.tif") as src:
        assert src.transform.a == pytest.approx(0.3, rel=0.01) and src.shape == (167, 167)  # whole pixels
    metrics = run_evaluate(cfg)
    assert metrics["overall"]["polygon"]["f1"] == 1.0
    assert metrics["overall"]["pixel"]["building_iou"] > 0.8
