"""The on-disk contracts: the freshness rule, checkpoint kinds, and the test fixtures' fidelity to them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_tiles import write_fake_tiles

from footprints.config import load_config
from footprints.contracts.checkpoints import load_checkpoint, save_checkpoint
from footprints.contracts.freshness import is_fresh, read_record, unmark, write_record
from footprints.contracts.manifest import MANIFEST_COLUMNS, read_manifest
from footprints.contracts.paths import RunPaths
from footprints.errors import InputError, StageError
from footprints.runner import run_stage
from footprints.synth.dataset import write_synthetic_dataset


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_fake_manifest_has_the_real_schema(tmp_path: Path) -> None:
    """tests/fake_tiles.py writes the manifest by hand: it must be the tile stage's, column for column."""
    write_synthetic_dataset(tmp_path / "data", n_scenes=2, seed=0, size=64, geotiff=False)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'out'}",
                             f"data.geotransforms={tmp_path / 'data' / 'truth_transforms.json'}",
                             "tile.size=32", "tile.stride=32", "cluster.workers=0"])
    run_stage("tile", cfg)
    real = _header(RunPaths.of(cfg).manifest)
    fake_dir = write_fake_tiles(tmp_path / "fake", [("s0", "train", np.zeros((32, 32, 3), np.uint8),
                                                     np.zeros((32, 32), np.uint8))], 32)
    assert real == MANIFEST_COLUMNS
    assert _header(fake_dir / "manifest.csv") == real
    assert len(read_manifest(fake_dir)) == 1  # and the strict reader accepts it


def test_a_manifest_of_another_schema_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("scene_id,split\na,train\n")
    with pytest.raises(StageError, match=r"manifest.csv: not a tile manifest .*missing columns \['patch_id'"):
        read_manifest(tmp_path)


def test_freshness_is_decided_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # paths relative to the working directory, as `output_root: outputs` gives
    (tmp_path / "run").mkdir()
    out = Path("run") / "unit.bin"
    out.write_bytes(b"x" * 100)
    record = Path("run") / "unit.json"
    assert not is_fresh(record, "k1")  # no record: not done
    write_record(record, "k1", [out], note="extra fields are kept")
    assert read_record(record)["files"] == {"unit.bin": 100} and read_record(record)["note"]
    assert is_fresh(record, "k1")
    assert not is_fresh(record, "k2")  # other settings or inputs
    out.write_bytes(b"x" * 60)  # truncated: the record's size no longer matches
    assert not is_fresh(record, "k1")
    out.write_bytes(b"x" * 100)
    assert is_fresh(record, "k1")
    out.unlink()
    assert not is_fresh(record, "k1")
    out.write_bytes(b"x" * 100)
    unmark(record)
    assert not is_fresh(record, "k1") and not record.exists()
    record.write_text("{not json")  # a damaged record is no record
    assert read_record(record) is None and not is_fresh(record, "k1")


def test_checkpoint_kinds_are_checked_naming_the_file(tmp_path: Path) -> None:
    clf = tmp_path / "clf.pt"
    save_checkpoint(clf, {"model": {"w": torch.ones(1)}, "in_channels": 3, "layers": ["input"], "backbone": {}})
    assert load_checkpoint(clf, kind="classifier")["in_channels"] == 3
    with pytest.raises(InputError, match=r"clf.pt: not a segmenter checkpoint .*\(a classifier checkpoint\?\)"):
        load_checkpoint(clf, kind="segmenter")
    with pytest.raises(InputError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_tile_scene_record_reads_and_rewrites_every_version_unchanged(tmp_path: Path) -> None:
    """`tile/scenes/<scene>.json` through its one reader and writer: the stage's record and an older one
    (no `patch_geotiffs`: it has the GeoTIFFs) rewrite to the same bytes; the freshness rule is the same."""
    from footprints.contracts.tile_records import read_scene_record, read_tile_classes, write_scene_record

    write_synthetic_dataset(tmp_path / "data", n_scenes=2, seed=0, size=64, geotiff=False)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", f"output_root={tmp_path / 'out'}",
                             f"data.geotransforms={tmp_path / 'data' / 'truth_transforms.json'}",
                             "tile.size=32", "tile.stride=32", "cluster.workers=0"])
    run_stage("tile", cfg)
    paths = RunPaths.of(cfg)
    path = sorted((paths.tile / "scenes").glob("*.json"))[0]
    raw = read_record(path)
    record = read_scene_record(path)
    assert record is not None and record.key == raw["key"] and record.files == raw["files"]
    assert record.image_file == raw["image_file"] and record.rows is None and record.has_geotiffs
    assert list(raw)[-6:] == ["params", "patches", "location_id", "patch_geotiffs", "key", "files"]
    assert record.is_fresh(path, raw["key"]) and not record.is_fresh(path, "another key")
    before = path.read_bytes()
    covered = [path.parent / name for name in raw["files"]]
    write_scene_record(path, record, covered)
    assert path.read_bytes() == before

    old = {k: v for k, v in raw.items() if k != "patch_geotiffs"}  # a record from before the option
    path.write_text(json.dumps(old, indent=2) + "\n")
    before = path.read_bytes()
    record = read_scene_record(path)
    assert record is not None and record.patch_geotiffs is None and record.has_geotiffs
    write_scene_record(path, record, covered)
    assert path.read_bytes() == before  # not given a field it never had
    assert run_stage("tile", cfg)["scenes_already_done"] == 2 and path.read_bytes() == before

    assert record.lists_intact(path, [f"{path.stem}.csv"]) and not record.lists_intact(path, ["absent.npy"])
    (path.parent / f"{path.stem}.csv").write_text("truncated")
    assert not read_scene_record(path).is_fresh(path, raw["key"]) and not is_fresh(path, raw["key"])
    path.write_text("{not json")
    assert read_scene_record(path) is None and read_scene_record(tmp_path / "absent.json") is None

    assert read_tile_classes(paths.tile_summary) == read_record(paths.tile_summary)["classes"]
    assert read_tile_classes(tmp_path / "absent.json") == ["background", "building"]  # tiled before K classes
