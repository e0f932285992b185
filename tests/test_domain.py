"""The out-of-domain check: the reference a classifier stores, the score predict gives each scene, where the
score goes (scene record, footprint properties, HTML report) and the one-line warning.

The model is the tiny real red checkpoint (tests/checkpoint_fixtures.py: its head reads only the `input`
layer, the normalised image), given a reference made from windows of one synthetic scene: its hypercolumns
are the pixels' colours, so a scene painted like the training scene must score near 0, and a constant
colour or an inverted copy far above it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_fixtures import red_checkpoint, sibling_folder
from test_inference import UTM, _write_tif

from footprints.benchmarks.scale import write_synthetic_features
from footprints.config import Config
from footprints.contracts.checkpoints import load_checkpoint, save_checkpoint
from footprints.contracts.features_store import load_features
from footprints.contracts.predict_records import (
    PredictSceneRecord,
    read_predict_scene_record,
    write_predict_scene_record,
)
from footprints.model.domain import (
    REFERENCE_KEY,
    domain_score,
    fit_reference,
    nearest_distances,
    scene_features,
    standardise,
    usable_reference,
    warn_threshold,
    with_validation_scores,
)
from footprints.model.segmenter import load_segmenter
from footprints.prediction.domain import domain_warning, scene_domain_score, window_offsets
from footprints.stages.predict import run as run_predict
from footprints.training.build import carry_domain_reference
from footprints.training.domain_reference import build_reference, scene_of, training_sample, weighted_rows

SIZE = 64  # the red checkpoint's tile size


def _ground(seed: int, h: int = 128, w: int = 128) -> np.ndarray:
    """Green-grey noisy ground with a few red roofs (the red model's buildings): one 'place'."""
    rng = np.random.default_rng(seed)
    rgb = np.clip(rng.normal((70, 100, 60), 18, size=(h, w, 3)), 1, 255).astype(np.uint8).transpose(2, 0, 1).copy()
    for _ in range(6):
        r, c = rng.integers(0, h - 16), rng.integers(0, w - 16)
        rgb[:, r : r + 14, c : c + 12] = np.array([230, 50, 40], np.uint8)[:, None, None]
    return rgb


class _Array:
    """A reader over an in-memory (3, h, w) image, every pixel valid: what `scene_domain_score` reads."""

    def __init__(self, rgb: np.ndarray):
        self.rgb, self.height, self.width = rgb, rgb.shape[1], rgb.shape[2]

    def read(self, window):
        r, c = int(window.row_off), int(window.col_off)
        out = np.zeros((3, int(window.height), int(window.width)), np.uint8)
        part = self.rgb[:, r : r + out.shape[1], c : c + out.shape[2]]
        out[:, : part.shape[1], : part.shape[2]] = part
        valid = np.zeros(out.shape[1:], bool)
        valid[: part.shape[1], : part.shape[2]] = True
        return out, valid


@pytest.fixture(scope="module")
def red(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = red_checkpoint(tmp_path_factory.mktemp("red"))
    return path, load_segmenter(path)[0]


def _reference(model: torch.nn.Module) -> dict:
    """The reference of the training scene `_ground(0)`: its four windows' pixels, as train-classifier
    would describe them (standardised with the model's normaliser)."""
    rgb = _ground(0)
    windows = np.stack([rgb[:, r : r + SIZE, c : c + SIZE] for r in (0, SIZE) for c in (0, SIZE)])
    feats = scene_features(model, windows, np.ones(windows.shape[:1] + windows.shape[2:], bool), 4000,
                           np.random.default_rng(1))
    z = standardise(feats, model.head.mean.numpy(), model.head.std.numpy())
    return fit_reference(z, z.shape[1], seed=0)


def test_a_scene_of_the_training_place_scores_near_zero_and_other_ones_far_above(red):
    _, model = red
    reference = _reference(model)
    assert usable_reference(reference, 3) is reference and reference["scene_means"].shape == (1, 3)
    score = {name: scene_domain_score(_Array(rgb), model, reference, SIZE)
             for name, rgb in {"same place": _ground(7), "inverted": 255 - _ground(7),
                               "constant": np.broadcast_to(np.array([200, 200, 255], np.uint8)[:, None, None],
                                                           (3, 128, 128)).copy()}.items()}
    assert score["same place"] < 0.2, score
    assert score["inverted"] > 2 and score["constant"] > 2, score
    assert domain_warning("x", score["same place"], 0.5) is None
    assert domain_warning("x", score["inverted"], 0.5) == (
        f"x: looks unlike the model's training scenes (domain score {score['inverted']:.2f} > threshold 0.5): "
        "expect poor footprints")
    assert domain_warning("x", None, 0.5) is None and domain_warning("x", 9.0, None) is None
    # seeded: the same scene gives the same score
    assert scene_domain_score(_Array(_ground(7)), model, reference, SIZE) == score["same place"]


def test_the_warning_threshold_is_the_configured_one_unless_the_model_validation_scenes_lie_farther(red):
    _, model = red
    reference = _reference(model)  # no validation scenes
    assert warn_threshold(reference, 0.16) == 0.16 and warn_threshold(reference, None) is None
    # a place whose own validation scenes score up to 0.3 (the demo's synthetic scenes do): 0.3
    varied = with_validation_scores(reference, nearest_distances(np.array([[0.1, 0, 0], [0, 0.3 * 3**0.5, 0]]),
                                                                 reference))
    assert varied["validation_scores"].numpy() == pytest.approx([0.1 / 3**0.5, 0.3], rel=1e-5)
    assert warn_threshold(varied, 0.16) == 0.3 and warn_threshold(varied, 0.5) == 0.5
    assert warn_threshold(varied, None) is None and usable_reference(varied, 3) is varied


def test_windows_stay_inside_a_large_scene_and_are_at_most_the_count_asked():
    rng = np.random.default_rng(0)
    offsets = window_offsets(1000, 300, 256, 8, rng)
    assert len(offsets) == 8 and all(0 <= r <= 1000 - 256 and 0 <= c <= 300 - 256 for r, c in offsets)
    assert window_offsets(100, 90, 256, 8, rng) == [(0, 0)]  # smaller than a window: one, padded


def test_training_sample_draws_rows_in_proportion_to_their_weight_and_reads_those_rows(tmp_path):
    feature_dir = tmp_path / "features"
    write_synthetic_features(feature_dir, 1400, seed=3, layers=["input", "conv1_1"], shard_samples=300)
    whole = load_features(feature_dir, "train")
    weights = np.where(np.arange(len(whole["w"])) % 2 == 0, 9.0, 1.0)
    picks = weighted_rows(weights, 200, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 200 and np.mean(picks % 2 == 0) > 0.8  # 9:1 odds
    assert np.array_equal(weighted_rows(weights, 5000, np.random.default_rng(0)), np.arange(len(weights)))
    sample = training_sample(feature_dir, 100, seed=0)
    rows = {row.tobytes() for row in whole["X"]}
    assert sample.shape == (100, 67) and all(row.tobytes() in rows for row in sample)
    # the reference: the input and conv1_1 channels (both shallow), 16 directions, the mean of every training
    # group of patches (here a shard: the synthetic patch ids name no scene), each scoring 0 against itself
    mean, std = whole["X"].mean(0), whole["X"].std(0)
    reference = build_reference(feature_dir, ["input", "conv1_1"], mean, std, seed=0)
    assert reference is not None and reference["channels"] == 67 and reference["basis"].shape == (16, 67)
    groups = sorted(set(whole["patch_id"].tolist()))
    assert reference["scene_means"].shape == (len(groups), 16) and len(groups) == 4
    own = whole["X"][whole["patch_id"] == groups[1]]
    assert domain_score(standardise(own, mean, std), reference) == pytest.approx(0.0, abs=1e-5)
    # the validation split's group (its last shard) is scored as predict scores a scene: its mean's distance
    val = load_features(feature_dir, "val")
    assert reference["validation_scores"].shape == (1,)
    assert float(reference["validation_scores"][0]) == pytest.approx(
        domain_score(standardise(val["X"], mean, std), reference), rel=1e-4)
    assert scene_of("a_b_r00256_c01024") == "a_b" and scene_of("synthetic_3") == "synthetic_3"


def _checkpoint_with_reference(red_path: Path, model: torch.nn.Module, folder: Path) -> Path:
    """The red checkpoint with a reference in its meta, as train-segmenter writes it (`carry_domain_reference`)."""
    state = load_checkpoint(red_path, kind="segmenter")
    meta = dict(state["meta"])
    carry_domain_reference(meta, _reference(model), train_backbone=False)
    assert usable_reference(meta[REFERENCE_KEY], 3) is not None
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(folder / "scored.pt", {**state, "meta": meta})


def test_predict_records_the_score_in_the_record_the_footprints_and_the_report_and_warns(tmp_path, red, caplog):
    red_path, model = red
    ckpt = _checkpoint_with_reference(red_path, model, sibling_folder(tmp_path))
    _write_tif(tmp_path / "in" / "like.tif", _ground(7), UTM, "EPSG:32631")
    _write_tif(tmp_path / "in" / "far.tif", np.full((3, 128, 128), 250, np.uint8), UTM, "EPSG:32631")  # all white
    cfg = Config()
    cfg.output_root, cfg.cluster.workers = str(tmp_path / "outputs"), 0
    cfg.predict.threshold, cfg.predict.min_area_m2, cfg.predict.domain_warn = 0.5, 0.0, 1.0
    with caplog.at_level(logging.WARNING, logger="footprints"):
        out = run_predict(cfg, checkpoint=ckpt, inputs=[str(tmp_path / "in")], output=str(tmp_path / "fp.geojson"))
    assert out["scenes"] == 2 and out["failed"] == 0
    scenes = tmp_path / "fp_scenes"
    like, far = (read_predict_scene_record(scenes / f"{s}.json") for s in ("like", "far"))
    assert like.domain_score < 0.2 and far.domain_score > 2
    warned = [r.getMessage() for r in caplog.records if "looks unlike" in r.getMessage()]
    assert warned == [f"predict: far: looks unlike the model's training scenes (domain score "
                      f"{far.domain_score:.2f} > threshold 1): expect poor footprints"]
    # every footprint of a scene carries its score, in the scene's files and the merged one
    for sid, record in (("like", like), ("far", far)):
        feats = json.loads((scenes / f"{sid}.geojson").read_text())["features"]
        assert feats and all(f["properties"]["domain_score"] == record.domain_score for f in feats)
    merged = json.loads((tmp_path / "fp.geojson").read_text())["features"]
    assert {f["properties"]["scene"]: f["properties"]["domain_score"] for f in merged} == {
        "like": like.domain_score, "far": far.domain_score}
    # the report: a column of the per-scene table and the scenes' data
    page = Path(out["report"]).read_text()
    assert '<th scope="col">domain score</th>' in page and f"<td>{far.domain_score:.2f}</td>" in page
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    assert {s["id"]: s["domain_score"] for s in data["scenes"]} == {"like": like.domain_score,
                                                                     "far": far.domain_score}
    # a rerun keeps the scores (the probability rasters and the records are reused)
    again = run_predict(cfg, checkpoint=ckpt, inputs=[str(tmp_path / "in")], output=str(tmp_path / "fp.geojson"))
    assert again["skipped"] == 2 and read_predict_scene_record(scenes / "far.json").domain_score == far.domain_score


def test_an_old_checkpoint_gives_no_score_no_column_and_no_warning(tmp_path, red, caplog):
    red_path, _ = red
    _write_tif(tmp_path / "in" / "far.tif", np.full((3, 96, 96), 250, np.uint8), UTM, "EPSG:32631")
    cfg = Config()
    cfg.output_root, cfg.cluster.workers = str(tmp_path / "outputs"), 0
    cfg.predict.threshold, cfg.predict.min_area_m2 = 0.5, 0.0
    with caplog.at_level(logging.INFO, logger="footprints"):
        out = run_predict(cfg, checkpoint=red_path, inputs=[str(tmp_path / "in")], output=str(tmp_path / "fp.geojson"))
    assert out["scenes"] == 1 and "looks unlike" not in caplog.text and "no out-of-domain reference" in caplog.text
    record_path = tmp_path / "fp_scenes" / "far.json"
    assert read_predict_scene_record(record_path).domain_score is None
    assert "domain_score" not in json.loads(record_path.read_text())  # written as before the check
    feats = json.loads((tmp_path / "fp_scenes" / "far.geojson").read_text())["features"]
    assert feats and "domain_score" not in feats[0]["properties"]
    assert '<th scope="col">domain score</th>' not in Path(out["report"]).read_text()


def test_records_without_the_field_read_back_and_a_reference_of_another_format_is_ignored(tmp_path):
    path = tmp_path / "s.json"
    write_predict_scene_record(path, PredictSceneRecord("s", "k", {"a": 1}), [])
    assert read_predict_scene_record(path).domain_score is None
    assert usable_reference({"format": 99}) is None and usable_reference(None) is None
    meta: dict = {}
    carry_domain_reference(meta, {"format": 1}, train_backbone=True)  # a trained backbone: no reference
    assert meta == {}
