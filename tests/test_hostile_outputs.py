"""Hostile and unusual input, round two (issue 23): where predict, evaluate and report write, and what they load.

Every case holds the rules of the bad-input table: one line naming the file(s) and the reason, never a
traceback; good inputs of the same run still complete; nothing the run did not create is overwritten or
deleted; outputs go to a temporary name and are renamed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
import torch
from affine import Affine
from checkpoint_fixtures import red_checkpoint, sibling_folder
from test_inference import TILE, _write_tif

from footprints.cli import main
from footprints.config import Config, DataConfig, load_config
from footprints.contracts.manifest import MANIFEST_COLUMNS, write_rows
from footprints.contracts.paths import RunPaths
from footprints.errors import FootprintsError, InputError, StageError
from footprints.report import ReportScene, report_for_predictions, write_report
from footprints.stages.predict import build_settings
from footprints.stages.predict import run as run_predict

UTM31 = Affine(0.5, 0, 448000.0, 0, -0.5, 5411000.0)  # 0.5 m pixels near Paris
MISSOURI = ("EPSG:32615", Affine(0.5, 0, 412000.0, 0, -0.5, 4206000.0))  # lon -94, lat 38
PORTUGAL = ("EPSG:32629", Affine(0.5, 0, 535000.0, 0, -0.5, 4372000.0))  # lon -8.6, lat 39.5


# ---------------------------------------------------------------------------------------------- helpers
def red_scene(path: Path, offset: int = 20, transform: Affine = UTM31, crs: str = "EPSG:32631") -> Path:
    """A 96 x 96 px scene with one red 20 x 20 px building (the red checkpoint finds exactly it)."""
    rgb = np.full((3, 96, 96), 30, np.uint8)
    rgb[0, offset : offset + 20, offset : offset + 20] = 230
    return _write_tif(path, rgb, transform, crs)


def red_model(tmp_path: Path) -> Path:
    """The model: a real checkpoint whose building probability is red / 255 (tests/checkpoint_fixtures.py),
    beside `tmp_path` (these tests list and snapshot its files)."""
    return red_checkpoint(sibling_folder(tmp_path))


def quick_cfg(tmp_path: Path, *extra: str) -> Config:
    """Files given without a config file (the defaults with --set), fixed threshold: no calibration."""
    return load_config(None, [f"output_root={tmp_path / 'outputs'}", "cluster.workers=0", "predict.threshold=0.5",
                              "predict.min_area_m2=0", "predict.batch_size=4", "predict.instances=components",
                              "predict.regularize=false", f"predict.checkpoint={red_model(tmp_path)}", *extra])


def predict(cfg: Config, inputs: list[Path], output: Path | None = None, **kw: Any) -> dict[str, Any]:
    return run_predict(cfg, inputs=[str(p) for p in inputs], output=str(output) if output else None, **kw)


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under `folders` with its bytes: what must be the same after a refused run."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def report_scene_ids(page: Path) -> list[str]:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page.read_text(), re.S)
    assert m, "no embedded report data"
    return sorted(s["id"] for s in json.loads(m.group(1))["scenes"])


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def labelled_scene(root: Path, name: str = "scene") -> tuple[Path, Path]:
    """`root/images/<name>.tif` and its hand-drawn labels `root/labels/<name>.geojson` (found by predict)."""
    image = red_scene(root / "images" / f"{name}.tif")
    label = root / "labels" / f"{name}.geojson"
    label.parent.mkdir(parents=True, exist_ok=True)
    t = UTM31
    gpd.GeoDataFrame({"drawn_by": ["ana"]}, geometry=[shapely.box(t.c + 10, t.f - 20, t.c + 20, t.f - 10)],
                     crs="EPSG:32631").to_file(label, driver="GeoJSON")
    return image, label


def segmenter_checkpoint(path: Path, config: dict[str, Any] | None = None, nan: bool = False) -> Path:
    """A tiny real segmenter checkpoint (random VGG pool layers, hidden 8), optionally with a NaN weight."""
    from train_fixtures import tiny_segmenter

    model, meta = tiny_segmenter(8, TILE)
    state = model.state_dict()
    if nan:
        name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "meta": meta, "config": config or {}}, path)
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str, **stage_options: Any) -> tuple[int, str]:
    """`footprints ARGV` in this process: (exit code, the one `footprints: error:` line or "")."""
    capsys.readouterr()
    try:
        code = main(list(argv), **stage_options)
    finally:  # main() logs to this test's captured stderr: leave no handler behind for the next tests
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "footprints", False)]:
            root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("footprints: error:")]
    assert len(lines) <= 1, err[-3000:]
    return code, lines[0] if lines else ""


# ------------------------------------------------------------------ 1. per-scene names vs the run's files
def test_1_a_scene_named_footprints_keeps_its_own_outputs_beside_the_merged_layer(tmp_path: Path):
    images = tmp_path / "images"
    red_scene(images / "footprints.tif", offset=10)
    red_scene(images / "other.tif", offset=50)
    cfg = quick_cfg(tmp_path)
    out = predict(cfg, [images])  # no --output: <run>/predict/input/footprints.geojson
    merged, scene_dir = Path(out["geojson"]), Path(out["scene_dir"])
    assert merged == RunPaths.of(cfg).predict / "input" / "footprints.geojson"
    assert scene_dir == merged.with_name("footprints_scenes")  # the scenes in their own folder, as with --output
    assert sorted(pyogrio.read_dataframe(merged)["scene"]) == ["footprints", "other"]
    own = pyogrio.read_dataframe(scene_dir / "footprints.geojson")
    assert list(own["scene"]) == ["footprints"]  # the scene's own layer, not the merged one
    assert list(pyogrio.read_dataframe(scene_dir / "footprints.gpkg", layer="footprints")["scene"]) == ["footprints"]
    assert json.loads((scene_dir / "footprints.json").read_text())["scene_id"] == "footprints"
    assert out["report"] and Path(out["report"]).is_file()
    again = predict(cfg, [images])  # the scenes' records are intact: nothing is redone
    assert again["skipped"] == 2


def _run_with_test_split(tmp_path: Path, ids: list[str]) -> Config:
    root = tmp_path / "data"
    for i, sid in enumerate(ids):
        red_scene(root / "images" / f"{sid}.tif", offset=10 + 20 * i)
    cfg = quick_cfg(tmp_path, f"data.root={root}", "data.format=geotiff", "data.label_format=vector")
    tile = RunPaths.of(cfg).tile
    tile.mkdir(parents=True)
    write_rows(tile / "manifest.csv", [{"scene_id": sid, "split": "test", "labelled": False} for sid in ids],
               MANIFEST_COLUMNS)
    return cfg


@pytest.mark.parametrize("reserved", ["summary", "Footprints", "calibration"])
def test_1_in_the_run_folder_a_scene_named_like_a_run_file_is_refused_and_the_others_complete(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, reserved: str):
    cfg = _run_with_test_split(tmp_path, [reserved, "good"])
    with caplog.at_level(logging.ERROR):
        out = run_predict(cfg)
    assert (out["scenes"], out["failed"]) == (1, 1)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{reserved}.tif: scene id '{reserved}'" in errors[0] and "rename" in errors[0]
    predict_dir = RunPaths.of(cfg).predict
    summary = json.loads((predict_dir / "summary.json").read_text())
    assert summary["split"] == "test" and summary["scenes"] == 1  # the run's record, not a scene's
    assert list(pyogrio.read_dataframe(predict_dir / "footprints.geojson")["scene"]) == ["good"]
    assert not (predict_dir / "calibration.json").exists()


# ------------------------------------------------------------------ 2. outputs never land on an input
@pytest.mark.parametrize("how", ["the label itself", "the GeoPackage beside it", "a link to it", "the image"])
def test_2_output_onto_an_input_or_its_labels_is_refused_naming_both(tmp_path: Path, how: str):
    image, label = labelled_scene(tmp_path)
    if how == "the GeoPackage beside it":  # --output labels/scene.json puts the GeoPackage on labels/scene.gpkg
        gpd.read_file(label).to_file(label.with_suffix(".gpkg"), driver="GPKG")
        label.unlink()
        label = label.with_suffix(".gpkg")
        output = label.with_suffix(".json")
    elif how == "a link to it":
        output = tmp_path / "out.geojson"
        output.symlink_to(label)
    elif how == "the image":  # a GeoTIFF given by a .json name, and --output on it
        image = image.rename(image.with_suffix(".json"))
        output = label = image
    else:
        output = label
    before = snapshot(tmp_path)
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [image], output=output)
    line = one_line(err.value)
    assert str(output) in line and str(label) in line and "scene" in line, line
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced


def test_2_every_output_path_is_checked_the_report_and_the_scenes_folder_too(tmp_path: Path):
    # the report of --output fp.geojson is fp_report.html: here an input (a GeoTIFF given by that name)
    image = red_scene(tmp_path / "fp_report.html")
    before = snapshot(tmp_path)
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [image], output=tmp_path / "fp.geojson")
    assert str(image) in one_line(err.value) and "report" in str(err.value)
    assert snapshot(tmp_path) == before
    # the scenes folder holding the inputs (re-predicting a folder of an earlier run): refused
    scenes = tmp_path / "fp_scenes"
    a = red_scene(scenes / "a.tif")
    red_scene(scenes / "a_prob.tif", offset=40)  # scene a would write its probabilities here
    before = snapshot(scenes)
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [scenes], output=tmp_path / "fp.geojson")
    assert str(scenes) in one_line(err.value) and "holds the input" in str(err.value)
    assert snapshot(scenes) == before and a.is_file()


def test_2_through_the_command_line_it_is_one_line_and_exit_2(tmp_path: Path, capsys):
    image, label = labelled_scene(tmp_path)
    before = label.read_bytes()
    code, line = cli(capsys, "predict", "--set", f"output_root={tmp_path / 'o'}", "--set", "cluster.workers=0",
                     "--checkpoint", str(red_model(tmp_path)), "--input", str(image), "--output", str(label))
    assert code == 2 and str(label) in line and "scene" in line
    assert label.read_bytes() == before


# ------------------------------------------------------------------ 3. report --output
def test_3_report_output_must_be_html_and_never_replaces_a_file_it_did_not_write(tmp_path: Path, capsys):
    keep = red_scene(tmp_path / "keep.tif")
    notes = tmp_path / "notes.html"
    notes.write_text("<!DOCTYPE html><html><head><title>mine</title></head><body>field notes</body></html>")
    before = snapshot(tmp_path)
    base = ["report", "--set", f"output_root={tmp_path / 'outputs'}"]
    for target, why in ((keep, ".html"), (notes, "not a report footprints wrote"), (tmp_path, "a folder")):
        code, line = cli(capsys, *base, "--output", str(target))
        assert code == 2 and str(target) in line and why in line, line
    assert snapshot(tmp_path) == before
    # its own report is replaced (a rerun), and .htm is an HTML page too
    for name in ("mine.html", "mine.html", "page.htm"):
        code, line = cli(capsys, *base, "--output", str(tmp_path / name))
        assert code == 0 and not line
    assert "footprints report" in (tmp_path / "page.htm").read_text()[:4096]


def test_3_report_of_predictions_that_do_not_exist_is_one_line(tmp_path: Path, capsys):
    code, line = cli(capsys, "report", "--predictions", str(tmp_path / "nothing.geojson"))
    assert code == 2 and str(tmp_path / "nothing.geojson") in line and "no such GeoJSON" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 4. --set does not change predict's mode
def _demo_run_with_a_validation_scene(tmp_path: Path) -> Path:
    """./outputs/demo (the defaults' run) with a labelled validation scene in ./data/demo."""
    from footprints.synth.dataset import write_synthetic_dataset

    demo = tmp_path / "data" / "demo"
    write_synthetic_dataset(demo, n_scenes=2, seed=0, size=128, geotiff=False)
    # a scene with buildings (their label vertices georeference it)
    sid = next(p.stem for p in sorted((demo / "labels").glob("*.json"))
               if json.loads(p.read_text())["features"]["xy"])
    tile = tmp_path / "outputs" / "demo" / "tile"
    tile.mkdir(parents=True)
    write_rows(tile / "manifest.csv", [{"scene_id": sid, "split": "val", "labelled": True}], MANIFEST_COLUMNS)
    return tile


def test_4_a_set_changes_only_its_key_the_checkpoint_keeps_its_bands_and_stretch():
    stored = {"data": {"format": "geotiff", "bands": [3, 2, 1], "stretch_percentiles": [1.0, 99.0]}}
    s = build_settings(load_config(None, ["predict.batch_size=4"]), None, {"tile_size": TILE}, stored, "ck")
    assert s.data.bands == [3, 2, 1] and s.data.stretch_percentiles == [1.0, 99.0] and s.batch_size == 4
    s = build_settings(load_config(None, ["data.bands=[2, 2, 2]"]), None, {"tile_size": TILE}, stored, "ck")
    assert s.data.bands == [2, 2, 2] and s.data.stretch_percentiles == [1.0, 99.0]  # only the key --set


@pytest.mark.parametrize("how", ["--set", "--config"])
def test_4_checkpoint_with_input_never_calibrates_nor_rewrites_a_calibration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str):
    monkeypatch.chdir(tmp_path)
    tile = _demo_run_with_a_validation_scene(tmp_path)
    ckpt = segmenter_checkpoint(tmp_path / "models" / "best.pt",
                                config={"data": {"format": "geotiff", "bands": [1, 2, 3]}})
    beside = ckpt.with_name("best.calibration.json")
    beside.write_text(json.dumps({"threshold": 0.35, "seed_threshold": None, "min_area_m2": 0.0,
                                  "checkpoint_key": "stored-with-the-model", "key": "x", "files": {}}))
    before = beside.read_bytes()
    scene = red_scene(tmp_path / "mine" / "scene.tif")
    if how == "--set":
        cfg = load_config(None, ["predict.batch_size=4", "cluster.workers=0", "predict.instances=components",
                                 "predict.regularize=false"])
    else:
        (tmp_path / "demo.yaml").write_text("cluster:\n  workers: 0\npredict:\n  instances: components\n"
                                            "  regularize: false\n")
        cfg = load_config(tmp_path / "demo.yaml")
    out = run_predict(cfg, checkpoint=str(ckpt), inputs=[str(scene)], output=str(tmp_path / "o" / "fp.geojson"))
    assert out["scenes"] == 1 and out["threshold"] == 0.35 and out["calibration"] == str(beside)
    assert beside.read_bytes() == before
    assert not (tmp_path / "outputs" / "demo" / "predict").exists()  # no calibration.json, no val predictions
    assert sorted(p.name for p in tile.iterdir()) == ["manifest.csv"]


# ------------------------------------------------------------------ 5. several UTM zones in one GeoPackage
def test_5_scenes_in_utm_zones_far_apart_are_merged_in_lon_lat_with_their_own_areas(tmp_path: Path):
    red_scene(tmp_path / "in" / "missouri.tif", 10, MISSOURI[1], MISSOURI[0])
    red_scene(tmp_path / "in" / "portugal.tif", 40, PORTUGAL[1], PORTUGAL[0])
    out = predict(quick_cfg(tmp_path), [tmp_path / "in"], output=tmp_path / "fp.geojson")
    info = pyogrio.read_info(out["gpkg"], layer="footprints")
    assert info["crs"] == "EPSG:4326" and info["features"] == 2
    merged = pyogrio.read_dataframe(out["gpkg"], layer="footprints").set_index("scene")
    for sid, (crs, _) in (("missouri", MISSOURI), ("portugal", PORTUGAL)):
        own = pyogrio.read_dataframe(Path(out["scene_dir"]) / f"{sid}.gpkg", layer="footprints")
        assert own.crs == crs  # each scene's own GeoPackage in its own zone
        assert merged.loc[sid, "area_m2"] == pytest.approx(own["area_m2"].iloc[0])  # 100 m2, kept
        true_area = gpd.GeoSeries([merged.loc[sid, "geometry"]], crs=4326).to_crs(crs).area.iloc[0]
        assert true_area == pytest.approx(own.geometry.area.iloc[0], rel=1e-2)  # the shape itself undistorted
    # a single-zone run keeps its zone
    red_scene(tmp_path / "one" / "a.tif", 10)
    red_scene(tmp_path / "one" / "b.tif", 40, UTM31 * Affine.translation(300, 0))
    one = predict(quick_cfg(tmp_path), [tmp_path / "one"], output=tmp_path / "one.geojson")
    assert pyogrio.read_info(one["gpkg"], layer="footprints")["crs"] == "EPSG:32631"


# ------------------------------------------------------------------ 6. a bad file costs only itself in the report
def test_6_an_unreadable_file_among_good_ones_does_not_cost_them_the_html_report(tmp_path: Path, caplog):
    images = tmp_path / "images"
    red_scene(images / "good.tif")
    red_scene(images / "fine.tif", offset=50)
    (images / "._good.tif").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    (images / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    with caplog.at_level(logging.WARNING):
        out = predict(quick_cfg(tmp_path), [images], output=tmp_path / "fp.geojson")
    # broken.tif fails alone; ._good.tif too, unless scene discovery leaves macOS metadata files out
    assert out["scenes"] == 2 and out["failed"] in (1, 2)
    assert out["report"] is not None, caplog.text
    assert report_scene_ids(Path(out["report"])) == ["fine", "good"]  # the failed files have nothing to show


def test_6_an_unreadable_image_in_the_report_is_a_note_on_its_scene(tmp_path: Path):
    good = red_scene(tmp_path / "good.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 truncated")
    out = write_report(tmp_path / "r.html", [ReportScene("good", image=good), ReportScene("bad", image=bad)])
    assert out["scenes"] == 2
    assert "imagery not shown" in (tmp_path / "r.html").read_text()
    # and the predictions report: an image of a scene that was not predicted is one scene's note, not a failure
    (tmp_path / "fp_scenes").mkdir()
    summary = report_for_predictions(tmp_path / "fp.geojson", scene_dir=tmp_path / "fp_scenes",
                                     images={"good": good, "bad": bad})
    assert Path(summary["path"]).is_file()


# ------------------------------------------------------------------ 7. more hostile outputs and checkpoints
def test_7_output_that_is_an_existing_folder_is_refused_before_any_scene(tmp_path: Path):
    scene = red_scene(tmp_path / "images" / "s.tif")
    folder = tmp_path / "out.geojson"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [scene], output=folder)
    assert str(folder) in one_line(err.value) and "a folder" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.geojson"]  # no out_scenes/, nothing


@pytest.mark.parametrize("bad", ["fp\x00.geojson", "fp\n.geojson", "a\nb/fp.geojson", "fp\r.geojson"])
def test_7_output_with_a_nul_or_a_newline_is_refused_in_one_line(tmp_path: Path, bad: str, capsys):
    scene = red_scene(tmp_path / "images" / "s.tif")
    code, line = cli(capsys, "predict", "--set", f"output_root={tmp_path / 'o'}", "--checkpoint",
                     str(red_model(tmp_path)), "--input", str(scene), "--output", str(tmp_path / bad))
    assert code == 2 and "control character" in line and repr(str(tmp_path / bad)) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_7_output_into_folders_that_do_not_exist_yet_makes_them(tmp_path: Path):
    scene = red_scene(tmp_path / "images" / "s.tif")
    out = predict(quick_cfg(tmp_path), [scene], output=tmp_path / "new" / "deeper" / "fp.geojson")
    assert out["polygons"] == 1 and (tmp_path / "new" / "deeper" / "fp_scenes" / "s.gpkg").is_file()
    leftovers = [p for p in (tmp_path / "new").rglob(".*")]
    assert leftovers == []  # written to temporary names and renamed


def test_7_output_into_a_read_only_folder_is_one_line_before_any_scene(tmp_path: Path,
                                                                       read_only_dir: tuple[Path, str],
                                                                       monkeypatch: pytest.MonkeyPatch):
    scene = red_scene(tmp_path / "images" / "s.tif")
    ro, reason = read_only_dir

    from footprints.model.segmenter import Segmenter

    calls = []  # the windows of every forward pass of the checkpoint's model
    forward = Segmenter.forward

    def counting(model: Segmenter, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return forward(model, x)

    monkeypatch.setattr(Segmenter, "forward", counting)
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [scene], output=ro / "fp.geojson")
    line = one_line(err.value)
    assert str(ro) in line and reason in line, line
    assert calls == []  # refused before the model ran on any scene
    predict(quick_cfg(tmp_path), [scene], output=tmp_path / "fp.geojson")
    assert calls  # the same run into a folder that can be written runs it


@pytest.mark.parametrize("kind", ["geojson", "gpkg"])
def test_7_output_onto_someone_elses_layer_is_refused_and_it_is_kept(tmp_path: Path, kind: str):
    scene = red_scene(tmp_path / "images" / "s.tif")
    roads = gpd.GeoDataFrame({"road": ["N7"]}, geometry=[shapely.LineString([(2.3, 48.8), (2.4, 48.9)])], crs=4326)
    theirs = tmp_path / f"roads.{kind}"
    roads.to_file(theirs, driver="GeoJSON" if kind == "geojson" else "GPKG")
    before = snapshot(tmp_path)
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [scene], output=tmp_path / "roads.geojson")
    assert str(theirs) in one_line(err.value) and "not a footprints layer" in str(err.value)
    assert snapshot(tmp_path) == before
    # footprints' own outputs are replaced on a rerun
    first = predict(quick_cfg(tmp_path), [scene], output=tmp_path / "fp.geojson")
    again = predict(quick_cfg(tmp_path), [scene], output=tmp_path / "fp.geojson", overwrite=True)
    assert first["polygons"] == again["polygons"] == 1


def test_7_a_scenes_folder_or_a_report_that_is_not_ours_is_left_alone(tmp_path: Path, caplog):
    scene = red_scene(tmp_path / "images" / "s.tif")
    mine = tmp_path / "fp_scenes"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 my photo")
    before = snapshot(tmp_path)
    with pytest.raises(StageError) as err:
        predict(quick_cfg(tmp_path), [scene], output=tmp_path / "fp.geojson")
    assert str(mine) in one_line(err.value) and "did not write" in str(err.value)
    assert snapshot(tmp_path) == before
    (mine / "holiday.jpg").unlink()
    mine.rmdir()
    report = tmp_path / "fp_report.html"
    report.write_text("<html><body>my own page</body></html>")
    with caplog.at_level(logging.WARNING):
        out = predict(quick_cfg(tmp_path), [scene], output=tmp_path / "fp.geojson")
    assert out["polygons"] == 1 and out["report"] is None  # predicted; the page is not replaced
    assert report.read_text() == "<html><body>my own page</body></html>"
    assert "is not a footprints report" in caplog.text


def test_7_output_onto_the_checkpoints_calibration_is_refused(tmp_path: Path):
    scene = red_scene(tmp_path / "images" / "s.tif")
    ckpt = segmenter_checkpoint(tmp_path / "models" / "best.pt")
    cal = ckpt.with_name("best.calibration.json")
    cal.write_text(json.dumps({"threshold": 0.4, "min_area_m2": 0.0}))
    before = cal.read_bytes()
    with pytest.raises(StageError) as err:
        run_predict(quick_cfg(tmp_path), checkpoint=str(ckpt), inputs=[str(scene)], output=str(cal))
    assert str(cal) in one_line(err.value) and "calibration" in str(err.value)
    assert cal.read_bytes() == before and not (tmp_path / "models" / "best.calibration_scenes").exists()


def _bad_checkpoint(tmp_path: Path, what: str) -> Path:
    path = tmp_path / "ck.pt"
    if what == "a folder":
        path.mkdir()
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "a classifier":
        torch.save({"model": {"w": torch.ones(2)}, "in_channels": 3, "layers": ["input"], "backbone": {}}, path)
    elif what == "NaN weights":
        segmenter_checkpoint(path, nan=True)
    elif what == "truncated":
        segmenter_checkpoint(path)
        path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.mark.parametrize(("what", "says"), [("a folder", "a folder, not a checkpoint file"),
                                            ("empty", "empty file (0 bytes)"),
                                            ("a classifier", "not a segmenter checkpoint"),
                                            ("NaN weights", "NaN or infinite weights"),
                                            ("truncated", "not a loadable checkpoint")])
def test_7_a_checkpoint_that_is_not_a_usable_segmenter_is_one_line_before_any_scene(
        tmp_path: Path, capsys, what: str, says: str):
    scene = red_scene(tmp_path / "images" / "s.tif")
    ckpt = _bad_checkpoint(tmp_path, what)
    code, line = cli(capsys, "predict", "--set", f"output_root={tmp_path / 'o'}", "--set", "cluster.workers=0",
                     "--checkpoint", str(ckpt), "--input", str(scene), "--output", str(tmp_path / "fp.geojson"))
    assert code == 2 and str(ckpt) in line and says in line, line
    assert not (tmp_path / "fp.geojson").exists() and not (tmp_path / "fp_scenes").exists()


class _Payload:
    """Pickled, it would run `touch <marker>` on load (unless the loader refuses code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_7_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    with ckpt.open("wb") as fh:
        pickle.dump({"model": _Payload(marker), "meta": {}}, fh)
    scene = red_scene(tmp_path / "images" / "s.tif")
    with pytest.raises(InputError) as err:
        run_predict(quick_cfg(tmp_path), checkpoint=str(ckpt), inputs=[str(scene)],
                    output=str(tmp_path / "fp.geojson"))
    assert str(ckpt) in one_line(err.value) and "not a loadable checkpoint" in str(err.value)
    assert not marker.exists()


def test_7_scene_ids_that_differ_only_by_case_get_distinct_files(tmp_path: Path, caplog):
    images = tmp_path / "images"
    red_scene(images / "Scene.tif", offset=10)
    red_scene(images / "scene.tif", offset=50)
    red_scene(tmp_path / "other" / "SCENE.tif", offset=30)
    with caplog.at_level(logging.WARNING):
        out = predict(quick_cfg(tmp_path), [images, tmp_path / "other"], output=tmp_path / "fp.geojson")
    assert (out["scenes"], out["polygons"]) == (3, 3)
    names = [p.name for p in Path(out["scene_dir"]).iterdir()]
    assert len({n.casefold() for n in names}) == len(names) == 3 * 4  # prob, geojson, gpkg, record each
    assert len(set(pyogrio.read_dataframe(out["geojson"])["scene"].str.casefold())) == 3
    assert "differs from another only by case" in caplog.text


def test_7_the_same_stem_in_two_folders_and_a_scene_given_twice(tmp_path: Path):
    a = red_scene(tmp_path / "A" / "scene.tif", offset=10)
    red_scene(tmp_path / "B" / "scene.tif", offset=50)
    out = predict(quick_cfg(tmp_path), [a, tmp_path / "A", tmp_path / "B", a], output=tmp_path / "fp.geojson")
    assert (out["scenes"], out["failed"], out["polygons"]) == (2, 0, 2)
    assert sorted(pyogrio.read_dataframe(out["geojson"])["scene"]) == ["A__scene", "B__scene"]


def test_7_an_input_path_with_a_newline_costs_only_itself(tmp_path: Path, caplog):
    good = red_scene(tmp_path / "images" / "s.tif")
    with caplog.at_level(logging.ERROR):
        out = predict(quick_cfg(tmp_path), [tmp_path / "x\n.tif", good], output=tmp_path / "fp.geojson")
    assert (out["scenes"], out["failed"]) == (1, 1)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "control character" in errors[0]


def test_7_run_mode_output_onto_a_scenes_own_file_is_refused(tmp_path: Path):
    cfg = _run_with_test_split(tmp_path, ["s1", "s2"])
    predict_dir = RunPaths.of(cfg).predict
    with pytest.raises(StageError) as err:
        run_predict(cfg, output=str(predict_dir / "s1.geojson"))
    assert "s1" in one_line(err.value) and "own output" in str(err.value)
    assert not predict_dir.exists() or not any(predict_dir.iterdir())
    with pytest.raises(StageError) as err:  # nor onto the run's summary
        run_predict(cfg, output=str(predict_dir / "summary.json"))
    assert "summary" in one_line(err.value)


def test_7_evaluate_names_a_reserved_scene_id_instead_of_a_missing_prediction(tmp_path: Path):
    from footprints.scenes.sources import SceneSource
    from footprints.stages.evaluate import evaluate_scene

    src = SceneSource(red_scene(tmp_path / "images" / "summary.tif"))
    cfg = Config()
    cfg.data = DataConfig(format="geotiff", label_format="vector")
    with pytest.raises(FootprintsError) as err:
        evaluate_scene(src, cfg, str(tmp_path / "predict"), str(tmp_path / "evaluate"), overlay=False)
    assert "scene id 'summary'" in one_line(err.value) and str(src.image) in str(err.value)
