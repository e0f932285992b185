"""Nothing lost, nothing silently wrong: the bad inputs and faults of issue 12, one test (or more) each.

Every case ends in one clear line naming the file or key and the reason (exit 2 for bad configuration,
exit 0 with per-scene errors for bad scenes), good scenes still complete, nothing written before is lost,
and no traceback reaches the terminal.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from checkpoint_fixtures import red_checkpoint
from rasterio.windows import Window
from train_fixtures import load, make_project

from footprints.config import ConfigError, DataConfig, TileConfig, load_config
from footprints.contracts.features_store import load_features
from footprints.contracts.paths import RunPaths
from footprints.errors import InputError, StageError, describe_failure
from footprints.runner import run_stage
from footprints.scenes.labels import PolygonLabels
from footprints.scenes.reader import open_scene
from footprints.scenes.sources import SceneSource
from footprints.stages.predict import build_settings
from footprints.stages.predict import run as run_predict

REPO = Path(__file__).resolve().parents[1]
UTM = Affine(0.5, 0, 448000.0, 0, -0.5, 5411000.0)


def cli(*args: str, cwd: Path | None = None, user: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m footprints.cli ARGS` in a fresh process (as another user when `user` is given)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "footprints.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: os.setuid(user)) if user is not None else None)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("footprints: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def write_tif(path: Path, rgb: np.ndarray, dtype: str = "uint8", nodata: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": rgb.shape[2], "height": rgb.shape[1], "count": 3, "dtype": dtype,
               "transform": UTM, "crs": "EPSG:32631"}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb.astype(dtype))
    return path


def bright_square_scene(path: Path, offset: int = 20) -> Path:
    rgb = np.full((3, 96, 96), 30, np.uint8)
    rgb[0, offset : offset + 20, offset : offset + 20] = 230  # one red building
    return write_tif(path, rgb)


def predict_cfg(tmp_path: Path):
    """The model: a real checkpoint whose building probability is red / 255 (tests/checkpoint_fixtures.py)."""
    return load_config(None, [f"output_root={tmp_path / 'outputs'}", "cluster.workers=0", "predict.threshold=0.5",
                              "predict.min_area_m2=0", "predict.overlap=0.25", "predict.batch_size=4",
                              "predict.instances=components", "predict.regularize=false",
                              f"predict.checkpoint={red_checkpoint(tmp_path / 'model')}"])


# ------------------------------------------------------------------------------------------ data lost


def test_1_same_file_name_in_two_input_folders_gives_two_scenes(tmp_path: Path, caplog):
    a = bright_square_scene(tmp_path / "A" / "scene.tif", offset=10)
    b = bright_square_scene(tmp_path / "B" / "scene.tif", offset=50)
    with caplog.at_level(logging.WARNING):
        out = run_predict(predict_cfg(tmp_path), inputs=[str(a.parent), str(b.parent)],
                          output=str(tmp_path / "fp.geojson"))
    assert out["scenes"] == 2 and out["polygons"] == 2
    merged = pyogrio.read_dataframe(tmp_path / "fp.geojson")
    assert sorted(merged["scene"]) == ["A__scene", "B__scene"]
    assert (tmp_path / "fp_scenes" / "A__scene.gpkg").is_file() and (tmp_path / "fp_scenes" / "B__scene.gpkg").is_file()
    assert "also named scene.tif" in caplog.text


def test_8_the_same_scene_given_twice_is_predicted_once(tmp_path: Path):
    a = bright_square_scene(tmp_path / "A" / "scene.tif")
    out = run_predict(predict_cfg(tmp_path), inputs=[str(a), str(a.parent), str(a)],
                      output=str(tmp_path / "fp.geojson"))
    assert out["scenes"] == 1 and out["polygons"] == 1


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    config = make_project(tmp_path, segmenter={"epochs": 1, "max_steps_per_epoch": 1})
    assert run_stage("train-segmenter", load_config(config))["status"] == "trained"
    return config


def test_2_results_without_last_pt_are_not_silently_replaced(trained: Path, tmp_path: Path):
    out = tmp_path / "outputs" / "t" / "train-segmenter"
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.glob("*.*") if p.is_file()}
    with pytest.raises(StageError, match="no last.pt to resume from; pass --overwrite"):
        run_stage("train-segmenter", load_config(trained))
    assert {p.name: p.read_bytes() for p in out.glob("*.*") if p.is_file()} == before


def test_3_overwrite_keeps_the_old_outputs_until_the_new_ones_exist(trained: Path, tmp_path: Path):
    out = tmp_path / "outputs" / "t" / "train-segmenter"
    best = (out / "best.pt").read_bytes()
    # a bad setting: refused at load, before anything is touched
    p = cli("train-segmenter", "--config", str(trained), "--overwrite", "--set", "segmenter.batch_size=0")
    assert p.returncode == 2 and "segmenter.batch_size" in one_error_line(p)
    assert (out / "best.pt").read_bytes() == best
    # a failure inside the stage (its input gone): the previous outputs come back
    (tmp_path / "outputs" / "t" / "train-classifier" / "best.pt").rename(tmp_path / "clf.pt")
    with pytest.raises(StageError, match="run train-classifier first"):
        run_stage("train-segmenter", load_config(trained), overwrite=True)
    assert (out / "best.pt").read_bytes() == best and (out / "last.pt").is_file()
    assert not (out.parent / ".train-segmenter.replaced").exists()


# ------------------------------------------------------------------------------------ silently wrong


def test_4_a_checkpoints_training_georeference_is_never_used_for_other_scenes():
    cfg = load_config(None)  # files given without a config: reading settings come from the checkpoint
    stored = {"data": {"geotransforms": "data/demo/truth_transforms.json", "bands": [1, 2, 3]}}
    settings = build_settings(cfg, None, {"tile_size": 64}, stored, "ckpt")
    assert settings.data.geotransforms is None and settings.data.bands == [1, 2, 3]


def test_5_nan_pixels_of_float_imagery_are_nodata_and_do_not_blank_the_scene(tmp_path: Path):
    rgb = np.random.default_rng(0).uniform(100, 2000, (3, 64, 64)).astype("float32")
    rgb[:, :10, :10] = np.nan  # not declared as nodata
    path = write_tif(tmp_path / "images" / "f.tif", rgb, dtype="float32")
    with open_scene(SceneSource(path), DataConfig(root=str(tmp_path), format="geotiff"), TileConfig()) as r:
        out, valid = r.read(Window(0, 0, 64, 64))
    assert not valid[:10, :10].any() and valid[10:, 10:].all()
    assert out[:, 10:, 10:].std() > 10  # the stretch ignored the NaNs: the band is not turned to 0


@pytest.mark.parametrize(("override", "key"), [
    ("tile.target_gsd=-1", "tile.target_gsd"), ("predict.threshold=2", "predict.threshold"),
    ("segmenter.batch_size=0", "segmenter.batch_size"), ("predict.overlap=1.0", "predict.overlap"),
    ("classifier.lr=0", "classifier.lr"), ("features.per_class=0", "features.per_class"),
])
def test_6_10_values_out_of_range_are_refused_at_load(override: str, key: str):
    with pytest.raises(ConfigError, match=f"{key}: must be in"):
        load_config(None, [override])


def test_6_segmenter_epochs_0_is_the_exact_conversion_with_a_checkpoint(tmp_path: Path, caplog):
    config = make_project(tmp_path, segmenter={"epochs": 0})
    with caplog.at_level(logging.INFO):
        result = run_stage("train-segmenter", load_config(config))
    assert result["status"] == "converted" and "exact conversion" in caplog.text
    best = load(tmp_path / "outputs" / "t" / "train-segmenter" / "best.pt")
    assert best["epoch"] == 0 and "meta" in best


def test_6_more_folds_than_scenes_is_refused(tmp_path: Path):
    from footprints.synth.dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "d", n_scenes=3, seed=0, size=64, geotiff=False)
    cfg = load_config(None, [f"data.root={tmp_path / 'd'}", f"output_root={tmp_path / 'o'}", "cluster.workers=0",
                             f"data.geotransforms={tmp_path / 'd' / 'truth_transforms.json'}",
                             "tile.split_mode=kfold", "tile.folds=5"])
    with pytest.raises(StageError, match="tile.folds 5 is more than the 3 scene location"):
        run_stage("tile", cfg)


def test_7_duplicate_keys_in_yaml_are_refused(tmp_path: Path):
    for text, key in (("tile:\n  size: 64\ntile:\n  stride: 32\n", "'tile'"), ("tile:\n  size: 64\n  size: 32\n", "'size'")):
        path = tmp_path / "dup.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"dup.yaml: key {key} appears twice"):
            load_config(path)


def test_9_self_intersecting_labels_keep_their_whole_area(tmp_path: Path, caplog):
    bowtie = shapely.Polygon([(0, 0), (20, 20), (20, 0), (0, 20)])  # two triangles of 100 px each
    assert not bowtie.is_valid
    with caplog.at_level(logging.WARNING):
        labels = PolygonLabels(tmp_path / "labels.json", [bowtie])
    assert "labels.json: 1 self-intersecting label polygon(s) repaired" in caplog.text
    assert abs(int(labels.burn(0, 20, 0, 20).sum()) - 200) <= 10  # both halves, not one


def test_9_the_real_joplin_bowtie_is_repaired(shared_dir: Path, caplog):
    data = shared_dir / "data" / "xview2-joplin"
    src = SceneSource(data / "images" / "joplin-tornado_00000001_pre_disaster.png",
                      data / "labels" / "joplin-tornado_00000001_pre_disaster.json", label_kind="xview2")
    with caplog.at_level(logging.WARNING), open_scene(src, DataConfig(root=str(data)), TileConfig()) as r:
        polys = r.labels.polygons()
    assert "1 self-intersecting label polygon(s) repaired" in caplog.text
    assert all(p.is_valid for p in polys) and len(polys) == 198


# ------------------------------------------------------------------------- one line, not a traceback


def test_10_batch_size_0_is_one_line_exit_2():
    p = cli("train-segmenter", "--set", "segmenter.batch_size=0")
    assert p.returncode == 2 and "segmenter.batch_size: must be in [1, inf], got 0" in one_error_line(p)


def test_11_tile_into_a_read_only_output_root_is_one_line(tmp_path: Path, read_only_dir: tuple[Path, str]):
    from footprints.synth.dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n_scenes=1, seed=0, size=64, geotiff=False)
    out, reason = read_only_dir
    p = cli("tile", "--set", f"data.root={tmp_path / 'data'}", "--set", f"output_root={out}",
            "--set", "cluster.workers=0", cwd=tmp_path)
    line = one_error_line(p)
    assert p.returncode == 2 and str(out) in line and reason in line, line


def test_12_a_truncated_shard_is_recomputed_and_never_read(tmp_path: Path):
    from fake_tiles import write_fake_tiles

    cfg = load_config(None, [f"output_root={tmp_path / 'out'}", "name=t", "tile.size=32", "tile.stride=32",
                             "tile.target=binary", "features.per_class=4", "features.device=cpu",
                             "backbone.layers=[input, conv1_1]", "cluster.workers=0"])
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 1
    write_fake_tiles(RunPaths.of(cfg).tile, [("s0", "train", rgb, mask), ("s1", "val", rgb, mask)], 32)
    run_stage("features", cfg)
    shard = RunPaths.of(cfg).features / "train_0000.npz"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="train_0000.npz: unreadable feature shard"):
        load_features(RunPaths.of(cfg).features, "train")
    again = run_stage("features", cfg)
    assert "skipped" not in again and shard.read_bytes() == good


def test_13_predict_on_a_png_without_georeference_is_pixel_space_with_a_warning(tmp_path: Path):
    from footprints.model.backbone import hypercolumn_channels, resolve_layers
    from footprints.model.segmenter import build_segmenter

    layers = resolve_layers("pool")
    meta = {"layers": layers, "in_channels": hypercolumn_channels(layers), "hidden": 8, "stride": 2,
            "backbone": {"weights": "random", "normalization": "torchvision"}, "target_gsd": None, "tile_size": 64}
    torch.manual_seed(0)
    torch.save({"model": build_segmenter(meta).state_dict(), "meta": meta, "config": {}}, tmp_path / "best.pt")
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(
        tmp_path / "images" / "x_pre_disaster.png")
    p = cli("predict", "--checkpoint", str(tmp_path / "best.pt"), "--input", str(tmp_path / "images"),
            "--output", str(tmp_path / "o" / "fp.geojson"), "--set", "predict.threshold=0.5",
            "--set", "predict.min_area_m2=0", "--set", "cluster.workers=0", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "pixel coordinates" in p.stderr
    assert (tmp_path / "o" / "fp.geojson").is_file()


def test_14_a_full_disk_says_so(tmp_path: Path):
    import errno

    assert describe_failure(OSError(errno.ENOSPC, "No space left on device", "x.tif")).startswith(
        "no space left on device")
    if os.geteuid() != 0 or subprocess.run(["mount", "--version"], capture_output=True).returncode != 0:
        pytest.skip("mounting a tiny file system needs root")
    from footprints.synth.dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n_scenes=2, seed=0, size=256, geotiff=False)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        p = cli("tile", "--set", f"data.root={tmp_path / 'data'}", "--set", f"output_root={small}",
                "--set", f"data.geotransforms={tmp_path / 'data' / 'truth_transforms.json'}",
                "--set", "cluster.workers=0", "--set", "tile.size=64", "--set", "tile.stride=64")
        assert "Traceback" not in p.stderr
        assert "no space left on device" in p.stderr, p.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(small)])


# ------------------------------------------------------------------------------- noise and leftovers


def test_15_a_bad_scene_on_dask_workers_is_one_line_without_dask_noise(tmp_path: Path):
    from footprints.synth.dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n_scenes=2, seed=0, size=64, geotiff=False)
    bad = next((tmp_path / "data" / "labels").glob("*.json"))
    bad.write_text("{broken")
    p = cli("tile", "--set", f"data.root={tmp_path / 'data'}", "--set", f"output_root={tmp_path / 'o'}",
            "--set", f"data.geotransforms={tmp_path / 'data' / 'truth_transforms.json'}",
            "--set", "cluster.workers=2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for noise in ("Traceback", "Compute Failed", "Failed to communicate with scheduler", "distributed.worker"):
        assert noise not in p.stderr, p.stderr[-3000:]
    assert f"{bad}: malformed label JSON" in p.stderr


def test_16_temporaries_of_a_killed_predict_are_removed_on_rerun(tmp_path: Path):
    scene = bright_square_scene(tmp_path / "images" / "scene.tif")
    out_dir = tmp_path / "fp_scenes"
    out_dir.mkdir()
    stale = [out_dir / ".scene_prob.x1y2.tif.part.blocks", out_dir / ".scene.q9.part.gpkg"]
    for f in stale:
        f.write_bytes(b"half a file")
    run_predict(predict_cfg(tmp_path), inputs=[str(scene)], output=str(tmp_path / "fp.geojson"))
    assert not any(f.exists() for f in stale)
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
    record = json.loads((out_dir / "scene.json").read_text())
    assert record["polygons"] == 1


def test_15_with_verbose_the_traceback_goes_to_the_debug_log_not_the_terminal(tmp_path: Path):
    from footprints.synth.dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n_scenes=2, seed=0, size=64, geotiff=False)
    bad = next((tmp_path / "data" / "labels").glob("*.json"))
    bad.write_text("{broken")
    p = cli("tile", "-v", "--set", f"data.root={tmp_path / 'data'}", "--set", f"output_root={tmp_path / 'o'}",
            "--set", f"data.geotransforms={tmp_path / 'data' / 'truth_transforms.json'}",
            "--set", "cluster.workers=0", cwd=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr and f"{bad}: malformed label JSON" in p.stderr
    debug = (tmp_path / "logs" / "footprints-debug.log").read_text()
    assert "Traceback (most recent call last)" in debug and "malformed label JSON" in debug
