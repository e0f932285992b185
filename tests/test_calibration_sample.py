"""Calibration on a bounded, seeded sample of the validation scenes (`predict.calibration_scenes`).

The per-scene scoring (`calibrate_source`: predict one validation scene, then vectorise and match it at
every grid point) is replaced by a stand-in that records which scenes it was asked for, so that these tests
count the scenes scored on 70 validation scenes in well under a second instead of running inference.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from footprints.config import Config, DataConfig
from footprints.contracts.manifest import MANIFEST_COLUMNS, write_rows
from footprints.contracts.paths import RunPaths
from footprints.prediction import calibration as calibration_store
from footprints.prediction.calibration import calibration_sample, resolve_calibration
from footprints.scenes.sources import SceneSource
from footprints.stages.predict import build_settings


def _run(tmp_path: Path, n_val: int, cap: int, seed: int = 0) -> Config:
    """A run folder whose tile manifest puts `n_val` scenes in val (and one in test); the image files are
    placeholders that only discovery sees (the stand-in scorer never opens them)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids = [f"v{i:03d}" for i in range(n_val)] + ["t000"]
    for sid in ids:
        (root / "images" / f"{sid}.tif").write_bytes(b"")
    cfg = Config()
    cfg.output_root = str(tmp_path / "outputs")
    cfg.cluster.workers = 0
    cfg.seed = seed
    cfg.predict.calibration_scenes = cap
    cfg.predict.threshold_grid = [0.4, 0.6]
    cfg.predict.seed_threshold_grid = [0.7]
    cfg.predict.min_area_grid = [0.0, 10.0]
    cfg.data = DataConfig(root=str(root), format="geotiff", label_format="vector")
    tile_dir = RunPaths.of(cfg).stage("tile")
    tile_dir.mkdir(parents=True)
    rows = [{"scene_id": sid, "split": "test" if sid.startswith("t") else "val", "labelled": True} for sid in ids]
    write_rows(tile_dir / "manifest.csv", rows, MANIFEST_COLUMNS)
    return cfg


@pytest.fixture
def scored(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the scenes scored, in call order: `calibrate_source` replaced by a counting stand-in
    whose counts make threshold 0.4 with minimum area 10 the best point on any scene."""
    calls: list[str] = []

    def fake_calibrate_source(source: SceneSource, *, thresholds, seed_thresholds, min_areas, **_: Any):
        calls.append(source.scene_id)
        pixel = [[float(t), 80, 20, 20, 880] for t in thresholds]
        polygon = [[float(t), s, float(a), 9 if (t, a) == (0.4, 10.0) else 5, 1, 1]
                   for t in thresholds for s in seed_thresholds for a in min_areas]
        return {"scene_id": source.scene_id, "pixel": pixel, "polygon": polygon}

    monkeypatch.setattr(calibration_store, "calibrate_source", fake_calibrate_source)
    return calls


def _calibrate(cfg: Config) -> dict[str, Any]:
    settings = build_settings(cfg, None, {"tile_size": 64}, {}, "injected-model")
    return resolve_calibration(cfg, settings, None)


def test_calibration_scores_only_a_sample_of_calibration_scenes(tmp_path: Path, scored: list[str], caplog):
    cfg = _run(tmp_path, n_val=70, cap=8)
    with caplog.at_level(logging.INFO, logger="footprints"):
        cal = _calibrate(cfg)
    assert len(scored) == 8 and len(set(scored)) == 8  # each sampled scene scored once, no other scene
    assert sorted(scored) == cal["scenes"] and all(s.startswith("v") for s in scored)
    assert (cal["threshold"], cal["min_area_m2"]) == (0.4, 10.0)
    assert "on 8 of 70 validation scenes (a seeded sample, predict.calibration_scenes)" in caplog.text
    stored = json.loads(RunPaths.of(cfg).calibration.read_text())
    assert stored["scenes"] == sorted(scored) and stored["validation_scenes"] == 70


def test_calibration_sample_is_the_same_for_the_same_seed_and_differs_for_another(tmp_path: Path,
                                                                                  scored: list[str]):
    first = _calibrate(_run(tmp_path / "a", n_val=70, cap=8, seed=0))["scenes"]
    again = _calibrate(_run(tmp_path / "b", n_val=70, cap=8, seed=0))["scenes"]
    other = _calibrate(_run(tmp_path / "c", n_val=70, cap=8, seed=1))["scenes"]
    assert len(scored) == 24 and first == again and other != first and len(other) == 8


def test_calibration_sample_ignores_the_order_of_the_scenes_and_grows_by_adding():
    sources = [SceneSource(Path(f"/nowhere/s{i:03d}.tif")) for i in range(70)]
    sample = [s.scene_id for s in calibration_sample(sources, 8, seed=3)]
    shuffled = sources[:]
    random.Random(5).shuffle(shuffled)
    assert [s.scene_id for s in calibration_sample(shuffled, 8, seed=3)] == sample
    assert sample == sorted(sample) and len(set(sample)) == 8
    # a larger cap keeps the scenes of a smaller one (their probability rasters are reused)
    assert set(sample) <= {s.scene_id for s in calibration_sample(sources, 16, seed=3)}
    assert [s.scene_id for s in calibration_sample(sources, 8, seed=4)] != sample


def test_calibration_uses_every_scene_when_there_are_no_more_than_the_cap(tmp_path: Path, scored: list[str],
                                                                          caplog):
    cfg = _run(tmp_path, n_val=5, cap=8)
    with caplog.at_level(logging.INFO, logger="footprints"):
        cal = _calibrate(cfg)
    assert sorted(scored) == cal["scenes"] == [f"v{i:03d}" for i in range(5)]
    assert "on 5 of 5 validation scenes" in caplog.text and "seeded sample" not in caplog.text
    assert json.loads(RunPaths.of(cfg).calibration.read_text())["validation_scenes"] == 5


def test_changing_the_cap_calibrates_again(tmp_path: Path, scored: list[str]):
    cfg = _run(tmp_path, n_val=70, cap=8)
    first = _calibrate(cfg)
    assert len(scored) == 8
    again = _calibrate(cfg)  # fresh: read back, nothing scored
    assert len(scored) == 8 and again["source"].endswith("calibration.json") and again["scenes"] == first["scenes"]
    cfg.predict.calibration_scenes = 12
    wider = _calibrate(cfg)
    assert len(scored) == 20 and len(wider["scenes"]) == 12 and set(first["scenes"]) <= set(wider["scenes"])
