"""Instance-aware targets: border and contact classes in metres, exact at window edges, and the tile stage."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

import footprints.scenes.reader as scenes_module
from footprints.config import DataConfig, TileConfig, load_config
from footprints.contracts.manifest import class_pixels, read_manifest
from footprints.contracts.patches import load_patch
from footprints.contracts.paths import RunPaths
from footprints.runner import run_stage
from footprints.scenes.reader import open_scene
from footprints.scenes.sources import discover_scenes
from footprints.scenes.targets import SCHEMES, building_of, instance_target, scheme_for
from footprints.synth.dataset import write_synthetic_dataset


def _two_houses(gap_px: int) -> np.ndarray:
    """Two 10 x 8 px houses side by side, `gap_px` apart (0: sharing a wall), on a 20 x 40 grid."""
    ids = np.zeros((20, 40), np.int32)
    ids[5:15, 5:13] = 1
    ids[5:15, 13 + gap_px : 21 + gap_px] = 2
    return ids


def test_border_is_a_band_in_metres_inside_every_outline_including_shared_walls():
    ids = _two_houses(0)
    t = instance_target(ids, SCHEMES["border"], gsd_m=0.5, border_m=1.0)
    # 1 m at 0.5 m/px: the outermost two pixel rings of each house are border, the rest interior
    assert set(np.unique(t)) == {0, 1, 2}
    assert (t[ids == 0] == 0).all()
    assert (t[5:7, 5:21] == 2).all() and (t[13:15, 5:21] == 2).all()
    assert (t[:, 11:15][5:15] == 2).all()  # both sides of the shared wall are border
    assert (t[7:13, 7:11] == 1).all() and (t[7:13, 15:19] == 1).all()
    # the same metres at a finer GSD make a wider band in pixels
    fine = instance_target(np.kron(ids, np.ones((2, 2), np.int32)), SCHEMES["border"], gsd_m=0.25, border_m=1.0)
    assert (fine[10:14, 14:18] == 2).all() and fine[14, 14] == 1
    # the two-class target is the building mask
    assert np.array_equal(instance_target(ids, SCHEMES["binary"], 0.5), (ids > 0).astype(np.uint8))


def test_contact_marks_narrow_gaps_between_two_buildings_only():
    ids = _two_houses(2)  # a 1 m gap
    t = instance_target(ids, SCHEMES["contact"], gsd_m=0.5, border_m=1.0, contact_m=2.0)
    assert (t[5:15, 13:15] == 3).all()  # the gap between the houses
    assert (t[0, :] == 0).all() and (t[:, 30:] == 0).all()  # over 2 m from one of them, or near only one
    lone = np.zeros((20, 20), np.int32)
    lone[5:15, 5:13] = 1
    assert 3 not in instance_target(lone, SCHEMES["contact"], gsd_m=0.5)
    assert building_of(t, SCHEMES["contact"]).sum() == (ids > 0).sum()


def test_schemes_are_found_by_their_class_names():
    assert scheme_for(None).name == "binary"
    assert scheme_for(["background", "interior", "border"]).name == "border"
    with pytest.raises(ValueError, match="unknown class list"):
        scheme_for(["background", "roof"])


def test_windowed_targets_equal_the_whole_scene_target(tmp_path, monkeypatch):
    """Large scenes are labelled window by window with a halo: border and contact near a window's edge are
    those of the whole scene."""
    data = tmp_path / "data"
    write_synthetic_dataset(data, n_scenes=2, seed=3, size=256, geotiff=False)
    cfg = DataConfig(root=str(data), geotransforms=str(data / "truth_transforms.json"))
    scheme = SCHEMES["contact"]
    for src in discover_scenes(cfg):  # a scene with buildings
        with open_scene(src, cfg, TileConfig()) as r:
            whole = r.target(Window(0, 0, r.width, r.height), scheme, 1.0, 2.0)
        if np.isin(whole, (1, 2)).any():
            break
    assert np.isin(whole, (1, 2)).any()
    monkeypatch.setattr(scenes_module, "IN_MEMORY_MAX_PX", 0)  # force window-by-window reading
    with open_scene(src, cfg, TileConfig()) as r:
        assert r._rgb is None
        for win in (Window(0, 0, 100, 100), Window(90, 37, 80, 120), Window(200, 200, 100, 100)):
            got = r.target(win, scheme, 1.0, 2.0)
            c0, r0 = int(win.col_off), int(win.row_off)
            want = np.full((int(win.height), int(win.width)), 255, np.uint8)
            part = whole[r0 : r0 + int(win.height), c0 : c0 + int(win.width)]
            want[: part.shape[0], : part.shape[1]] = part
            np.testing.assert_array_equal(got, want)


def test_tile_stage_writes_class_masks_and_per_class_counts(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, n_scenes=2, seed=3, size=128, geotiff=False)
    cfg = load_config(None, [f"data.root={data}", f"output_root={tmp_path / 'out'}", "cluster.workers=0",
                             f"data.geotransforms={data / 'truth_transforms.json'}", "tile.size=64",
                             "tile.stride=64", "tile.target=border"])
    summary = run_stage("tile", cfg)
    assert summary["classes"] == ["background", "interior", "border"]
    df = read_manifest(RunPaths.of(cfg).tile)
    totals = np.zeros(3, np.int64)
    for _, row in df.iterrows():
        _, mask = load_patch(RunPaths.of(cfg).tile, row)
        counts = np.bincount(mask[mask != 255], minlength=3)
        assert counts.tolist() == [int(v) for v in row["class_px"].split()]
        assert row["building_px"] == counts[1] + counts[2] and row["background_px"] == counts[0]
        totals += counts
    assert class_pixels(df) == totals.tolist() and totals[2] > 0 and totals[1] > 0
