"""Whole-scene inference (`footprints.polygons.inference`): the window grid and its weights, blending without seams,
blocked == whole scene, the COG, bounded memory, nodata never run, progress.

The tests give `predict_scene` stand-in models (plain nn.Modules, rgb float (B, 3, H, W) in 0..255 -> logits
(B, 2, H, W)) so that they do not depend on training; tests/test_predict.py runs the stage with checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.windows import Window
from torch import nn

from footprints.config import DataConfig, TileConfig
from footprints.contracts.probability import read_probability
from footprints.polygons.inference import (
    WindowGrid,
    predict_block,
    predict_scene,
    ramp_weights,
    window_origins,
    window_stride,
)
from footprints.scenes.reader import open_scene
from footprints.scenes.sources import SceneSource

TILE = 64  # test windows: small and fast

# ---------------------------------------------------------------------------------------------------
# stand-in models: rgb float (B, 3, H, W) in 0..255 -> logits (B, 2, H, W)


def _logits(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


class ConstantModel(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(torch.full_like(x[:, 0], self.p))


class RedModel(nn.Module):
    """p = red / 255, pixel by pixel (a painted building comes back exactly where it was painted)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(x[:, 0] / 255.0)


class ContextModel(nn.Module):
    """Depends on a 9x9 neighbourhood with zero padding, so a window's border pixels differ by window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = nn.functional.avg_pool2d(x[:, :1], 9, stride=1, padding=4, count_include_pad=True)[:, 0]
        return _logits(torch.sigmoid((m - 100.0) / 30.0))


class PositionModel(nn.Module):
    """p grows from 0.2 to 0.8 left to right inside every window: an unblended mosaic jumps at each seam."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        ramp = 0.2 + 0.6 * torch.arange(w, dtype=torch.float32) / (w - 1)
        return _logits(ramp.expand(x.shape[0], x.shape[-2], w).clone())


# ---------------------------------------------------------------------------------------------------
# scenes


def _write_tif(path: Path, rgb: np.ndarray, transform: Affine, crs: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": rgb.shape[2], "height": rgb.shape[1], "count": 3, "dtype": "uint8",
               "transform": transform}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb)
    return path


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 255, size=(3, h, w), dtype=np.uint8)  # no 0: 0 is nodata


def _reader(path: Path):
    return open_scene(SceneSource(path), DataConfig(format="geotiff"), TileConfig(size=TILE, stride=TILE))



UTM = Affine(0.5, 0, 448000.0, 0, -0.5, 5411000.0)  # 0.5 m pixels, UTM 31N (near Paris)


# ---------------------------------------------------------------------------------------------------
# the grid and the weights


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 1024])
def test_window_grid_covers_every_pixel_with_the_overlap_asked(length: int):
    stride = window_stride(TILE, 0.25)
    assert stride == 48  # 25% of 64 px overlap
    o = window_origins(length, TILE, stride)
    assert o[0] == 0
    assert o[-1] == max(0, length - TILE)  # the last window is flush with the edge (or the only one)
    assert np.all(np.diff(o) <= stride) and np.all(np.diff(o) > 0)
    covered = np.zeros(length, bool)
    for r in o:
        covered[r : r + TILE] = True
    assert covered.all()


def test_ramp_weights_sum_to_one_across_a_regular_overlap():
    stride = window_stride(TILE, 0.25)
    w = ramp_weights(TILE, stride)[TILE // 2]  # one row through the middle
    total = np.zeros(stride * 4 + TILE)
    for k in range(5):
        total[k * stride : k * stride + TILE] += w
    inner = total[TILE : stride * 4]  # where two windows always meet or one covers alone
    np.testing.assert_allclose(inner, 1.0, atol=1e-12)
    assert w.min() > 0 and w.max() == 1.0


# ---------------------------------------------------------------------------------------------------
# seams, blocks, COG


@pytest.mark.parametrize("prob_dtype", ["uint8", "float16"])
def test_constant_model_gives_constant_raster_across_blocks_and_windows(tmp_path: Path, prob_dtype: str):
    scene = _write_tif(tmp_path / "s.tif", _texture(230, 170), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        out = predict_scene(reader, ConstantModel(0.6), tmp_path / "p.tif", tile_size=TILE, overlap=0.25,
                            batch_size=3, block_size=50, prob_dtype=prob_dtype)
    assert out["grid_windows"] == 5 * 4 and out["windows"] == 20  # 20 blocks, yet every window runs once
    with rasterio.open(tmp_path / "p.tif") as src:
        raw = src.read(1)
    if prob_dtype == "uint8":
        assert raw.dtype == np.uint8 and np.all(raw == 153)  # 0.6 * 255, every pixel
    else:
        assert np.all(np.abs(raw - 0.6) < 1e-3) and np.ptp(raw) == 0  # float16 storage, one value


def test_scene_smaller_than_a_window_and_flips_averaged(tmp_path: Path):
    scene = _write_tif(tmp_path / "s.tif", _texture(20, 30), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        out = predict_scene(reader, PositionModel(), tmp_path / "p.tif", tile_size=TILE, tta_flips=True,
                            prob_dtype="float16")
    assert out["windows"] == 1
    prob, valid = read_probability(tmp_path / "p.tif")
    assert prob.shape == (20, 30) and valid.all()
    ramp = 0.2 + 0.6 * np.arange(TILE) / (TILE - 1)
    want = (2 * ramp + ramp[::-1]) / 3  # identity and vertical flip see the ramp, the horizontal flip reverses it
    np.testing.assert_allclose(prob[7], want[:30], atol=1e-3)


def test_tapered_blending_leaves_no_seam_where_an_unblended_mosaic_jumps(tmp_path: Path):
    scene = _write_tif(tmp_path / "s.tif", _texture(64, 300), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        predict_scene(reader, PositionModel(), tmp_path / "p.tif", tile_size=TILE, overlap=0.25, block_size=128,
                      prob_dtype="float16")
    prob, _ = read_probability(tmp_path / "p.tif")
    step = np.abs(np.diff(prob[32].astype(np.float64)))
    # inside a window the model rises 0.6/63 per px; the seams of a mosaic would jump by ~0.45
    assert step.max() < 0.05, step.max()
    np.testing.assert_allclose(prob, np.broadcast_to(prob[:1], prob.shape), atol=1e-3)  # rows agree
    # the same windows with flat weights (a plain average) keep a step at every window border
    with _reader(scene) as reader:
        grid = WindowGrid(300, 64, TILE, window_stride(TILE, 0.25))
        flat, _, _ = predict_block(reader, PositionModel(), Window(0, 0, 300, 64), grid,
                                   weights=np.ones((TILE, TILE)))
    assert flat.shape == (1, 64, 300)  # one band: the building probability of a two-class model
    assert np.abs(np.diff(flat[0, 32].astype(np.float64))).max() > 0.1


def test_blocked_result_equals_whole_scene_result(tmp_path: Path):
    rgb = _texture(210, 190, seed=3)
    rgb[:, :30, :40] = 0  # a nodata corner
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    outs = {}
    for block in (4096, 70, 97):
        with _reader(scene) as reader:
            predict_scene(reader, ContextModel(), tmp_path / f"b{block}.tif", tile_size=TILE, overlap=0.3,
                          batch_size=5, block_size=block, prob_dtype="float16", tta_flips=True)
        outs[block] = read_probability(tmp_path / f"b{block}.tif")
    whole, valid = outs[4096]
    assert np.ptp(whole[valid]) > 0.2  # a non-trivial probability field
    assert not valid[:30, :40].any() and valid[30:, :].all() and valid[:, 40:].all()
    for block in (70, 97):
        np.testing.assert_array_equal(outs[block][0], whole)
        np.testing.assert_array_equal(outs[block][1], valid)


def test_work_alongside_the_cog_sees_what_the_cog_holds(tmp_path: Path):
    """`alongside` (predict vectorises there while the COG is written) reads the same probabilities, mask,
    transform and CRS as the finished COG; its result comes back, and nothing temporary is left."""
    from footprints.polygons.vectorize import polygons_from_probability

    rgb = _texture(300, 260, seed=5)
    rgb[:, :40, :50] = 0  # a nodata corner: the mask must come through too
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    seen = {}

    def alongside(path: Path):
        with rasterio.open(path) as src:
            seen.update(values=src.read(), mask=src.read_masks(1), transform=src.transform, crs=src.crs)
        return polygons_from_probability(path, threshold=0.5)

    with _reader(scene) as reader:
        out = predict_scene(reader, ContextModel(), tmp_path / "p.tif", tile_size=TILE, block_size=128,
                            alongside=alongside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif", "s.tif"]
    with rasterio.open(tmp_path / "p.tif") as src:
        np.testing.assert_array_equal(seen["values"], src.read())
        np.testing.assert_array_equal(seen["mask"], src.read_masks(1))
        assert seen["transform"] == src.transform and seen["crs"] == src.crs
    assert not seen["mask"][:40, :50].any() and seen["mask"][40:].all()
    from_cog = polygons_from_probability(tmp_path / "p.tif", threshold=0.5)
    assert len(from_cog) > 0 and len(out["alongside"]) == len(from_cog)
    assert shapely.equals(from_cog.geometry.union_all(), out["alongside"].geometry.union_all())


def test_probability_raster_is_a_cog_on_the_scene_grid(tmp_path: Path):
    scene = _write_tif(tmp_path / "s.tif", _texture(600, 1100), UTM, "EPSG:32631")
    with _reader(scene) as reader:
        predict_scene(reader, ConstantModel(0.25), tmp_path / "p.tif", tile_size=TILE, block_size=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif", "s.tif"]  # no temporary left behind
    with rasterio.open(tmp_path / "p.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile["tiled"] and src.block_shapes[0] == (512, 512)
        assert src.overviews(1)  # 1100 px > one 512 px block: overviews exist
        assert src.crs.to_epsg() == 32631
        assert src.transform.almost_equals(UTM)
        assert (src.width, src.height) == (1100, 600)
        assert src.dtypes[0] == "uint8" and np.all(src.read(1) == 64)  # round(0.25 * 255)



# ---------------------------------------------------------------------------------------------------
# bounded memory


class SyntheticReader:
    """A large scene generated on the fly (no file): rgb from the pixel coordinates, all valid."""

    def __init__(self, size: int):
        self.width = self.height = size
        self.transform, self.crs, self.scene_id = UTM, rasterio.crs.CRS.from_epsg(32631), "big"

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        r = np.arange(int(window.row_off), int(window.row_off + window.height))[:, None]
        c = np.arange(int(window.col_off), int(window.col_off + window.width))[None, :]
        v = ((r * 7 + c * 3) % 251).astype(np.uint8)
        return np.broadcast_to(v, (3, *v.shape)).copy(), np.ones(v.shape, bool)


def _peak_bytes(size: int, path: Path) -> tuple[int, dict]:
    import tracemalloc

    tracemalloc.start()
    try:
        # blocks of 576 px, a multiple of the window stride (96): every interior block reads the same halo,
        # so the two scenes below differ in area only, not in the largest halo a block reads
        out = predict_scene(SyntheticReader(size), RedModel(), path, tile_size=128, overlap=0.25, batch_size=16,
                            block_size=576)
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_block_not_the_scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import footprints.polygons.inference as inference

    size = 2880
    # one block at a time (no read-ahead, no write-behind): how many blocks the pipeline's threads hold at
    # a given moment depends on timing, and a 4-block scene does not always fill the queues
    with monkeypatch.context() as m:
        m.setattr(inference, "READ_AHEAD", 0)
        m.setattr(inference, "WRITE_BEHIND", 0)
        small, _ = _peak_bytes(1152, tmp_path / "small_sync.tif")
        big, _ = _peak_bytes(size, tmp_path / "big_sync.tif")
    # 6.25 times the pixels, the same peak (numpy/torch allocations: block + halo buffers, one batch)
    assert big < 1.3 * small, (big, small)
    # pipelined (the defaults): at most READ_AHEAD + WRITE_BEHIND blocks more than one at a time
    peak, out = _peak_bytes(size, tmp_path / "big.tif")
    assert peak < (1 + inference.READ_AHEAD + inference.WRITE_BEHIND) * small, (peak, small)
    assert peak < size * size * 4 / 1.5  # less than the scene's float32 probabilities alone
    assert out["valid_px"] == size * size
    with rasterio.open(tmp_path / "big.tif") as src:
        assert src.overviews(1) and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        corner = src.read(1, window=Window(size - 96, size - 96, 96, 96))
    rc = np.arange(size - 96, size)
    want = ((rc[:, None] * 7 + rc[None, :] * 3) % 251).astype(np.uint8)
    assert np.abs(corner.astype(int) - want).max() <= 1  # pointwise model: blending returns the value


# ---------------------------------------------------------------------------------------------------
# nodata is skipped, progress is reported


class CountingModel(nn.Module):
    """RedModel that counts the windows it sees."""

    def __init__(self):
        super().__init__()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return _logits(x[:, 0] / 255.0)


def test_windows_and_blocks_without_a_valid_pixel_are_never_run(tmp_path: Path):
    rgb = np.zeros((3, 700, 900), np.uint8)  # nodata (0) everywhere but one small patch of ground
    rgb[:, 300:340, 610:660] = _texture(40, 50, seed=5)
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    outs = {}
    for block in (4096, 128):
        model = CountingModel()
        with _reader(scene) as reader:
            out = predict_scene(reader, model, tmp_path / f"b{block}.tif", tile_size=TILE, overlap=0.25,
                                block_size=block, prob_dtype="float16")
        outs[block] = read_probability(tmp_path / f"b{block}.tif")
        grid = WindowGrid(900, 700, TILE, window_stride(TILE, 0.25))
        touching = sum(1 for r in grid.rows for c in grid.cols if r < 340 and r + TILE > 300 and c < 660
                       and c + TILE > 610)
        assert model.windows == out["windows"] == touching  # only the windows that see the valid patch
        assert out["skipped_windows"] == grid.n_windows - touching and out["valid_px"] == 40 * 50
        if block == 128:
            assert out["empty_blocks"] > 30  # most blocks read, none of their windows run
    prob, valid = outs[4096]
    assert valid.sum() == 40 * 50 and valid[300:340, 610:660].all()
    assert np.all(prob[~valid] == 0)  # invalid pixels: probability 0, masked
    np.testing.assert_array_equal(outs[128][0], prob)
    np.testing.assert_array_equal(outs[128][1], valid)


def test_progress_is_logged_for_scenes_of_several_blocks_when_stderr_is_no_terminal(tmp_path, caplog,
                                                                                      monkeypatch):
    import footprints.polygons.inference as inference

    monkeypatch.setattr(inference, "PROGRESS_LOG_S", 0.0)
    with caplog.at_level(logging.INFO, logger="footprints.polygons.inference"):
        predict_scene(SyntheticReader(512), RedModel(), tmp_path / "p.tif", tile_size=TILE, block_size=128)
    lines = [r.getMessage() for r in caplog.records if r.name == "footprints.polygons.inference"]
    assert any("of 121 windows" in m and "skipped as nodata" in m for m in lines), lines
    assert lines[-1].startswith("big: 121 windows run, 0 skipped")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="footprints.polygons.inference"):  # one block: nothing to report
        predict_scene(SyntheticReader(200), RedModel(), tmp_path / "q.tif", tile_size=TILE, block_size=512)
    assert not [r for r in caplog.records if r.name == "footprints.polygons.inference"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_autocast_pipeline_blocked_equals_whole_scene(tmp_path: Path):
    from footprints.model.backbone import hypercolumn_channels, resolve_layers
    from footprints.model.segmenter import build_segmenter

    layers = resolve_layers("pool")
    meta = {"layers": layers, "in_channels": hypercolumn_channels(layers), "hidden": 16, "stride": 2,
            "backbone": {"weights": "random", "normalization": "torchvision"}}
    torch.manual_seed(0)
    model = build_segmenter(meta).cuda().eval()
    rgb = _texture(300, 260, seed=3)
    rgb[:, :40, :60] = 0
    scene = _write_tif(tmp_path / "s.tif", rgb, UTM, "EPSG:32631")
    outs = {}
    for block in (4096, 96):
        with _reader(scene) as reader:
            out = predict_scene(reader, model, tmp_path / f"b{block}.tif", tile_size=TILE, overlap=0.25,
                                batch_size=4, block_size=block, prob_dtype="float16", device="cuda")
        assert out["autocast"] in ("bfloat16", "float16")
        outs[block] = read_probability(tmp_path / f"b{block}.tif")
    # the same windows in other batches: autocast kernels may round differently per batch; blending is exact
    assert np.abs(outs[96][0] - outs[4096][0]).max() <= 2e-2
    np.testing.assert_array_equal(outs[96][1], outs[4096][1])
