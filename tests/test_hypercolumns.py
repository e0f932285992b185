"""Stage `features` and `footprints.model.hypercolumns`: sampling, sparse hypercolumn gathering, streaming stats, shards and resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_tiles import write_fake_tiles

from footprints.config import load_config
from footprints.contracts.features_store import load_features
from footprints.contracts.paths import RunPaths
from footprints.model.backbone import CONV_LAYERS, hypercolumn_channels, load_backbone
from footprints.model.hypercolumns import RunningStats, gather_hypercolumns, patch_rng, sample_pixels
from footprints.stages.features import run as extract_features

ALL = ["input", *CONV_LAYERS]


def naive_hypercolumns(acts: dict[str, torch.Tensor], layers: list[str], size: tuple[int, int]) -> torch.Tensor:
    """The seed's way: upsample every activation to full size and concatenate: (B, C, H, W)."""
    return torch.cat(
        [F.interpolate(acts[n], size=size, mode="bilinear", align_corners=False) for n in layers], dim=1
    )


@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_gather_equals_naive_full_hypercolumn(size):
    torch.manual_seed(0)
    model = load_backbone("random", "torchvision")
    rgb = torch.rand(2, 3, *size) * 255
    with torch.no_grad():
        acts = model(rgb, ALL)
        full = naive_hypercolumns(acts, ALL, size)
    g = torch.Generator().manual_seed(1)
    n = 300
    b = torch.randint(0, 2, (n,), generator=g)
    r = torch.randint(0, size[0], (n,), generator=g)
    c = torch.randint(0, size[1], (n,), generator=g)
    # corners and edges are where clamping matters
    b = torch.cat([b, torch.tensor([0, 0, 1, 1])])
    r = torch.cat([r, torch.tensor([0, size[0] - 1, 0, size[0] - 1])])
    c = torch.cat([c, torch.tensor([0, size[1] - 1, size[1] - 1, 0])])
    got = gather_hypercolumns(acts, ALL, r, c, size, batch=b)
    want = full[b, :, r, c]
    assert got.shape == (len(b), 4227) == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    # the 3-d (single image) form gives the same columns
    one = gather_hypercolumns({k: v[1] for k, v in acts.items()}, ALL, r[b == 1], c[b == 1], size)
    assert torch.allclose(one, want[b == 1], atol=1e-5, rtol=0)
    # channels-last activations (how the features stage runs the backbone): the very same numbers
    nhwc = {k: v.contiguous(memory_format=torch.channels_last) for k, v in acts.items()}
    assert torch.equal(gather_hypercolumns(nhwc, ALL, r, c, size, batch=b), got)


def test_sample_pixels_respects_ignore_and_counts():
    mask = np.full((20, 20), 255, np.uint8)
    mask[2:18, 2:18] = 0
    mask[5:8, 5:8] = 1  # 9 building pixels
    rows, cols, labels = sample_pixels(mask, 5, np.random.default_rng(0))
    assert (mask[rows, cols] == labels).all()
    assert np.bincount(labels, minlength=2).tolist() == [5, 5]
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 10  # without replacement
    # fewer pixels than asked: all of them
    rows, cols, labels = sample_pixels(mask, 50, np.random.default_rng(0))
    assert np.bincount(labels, minlength=2).tolist() == [50, 9]
    assert (mask[rows, cols] != 255).all()
    # no building: background only; all ignore: nothing
    empty = np.where(mask == 1, 0, mask).astype(np.uint8)
    _, _, labels = sample_pixels(empty, 7, np.random.default_rng(0))
    assert labels.tolist() == [0] * 7
    assert sample_pixels(np.full((8, 8), 255, np.uint8), 7, np.random.default_rng(0))[0].size == 0
    # seeded: same patch id, same pixels; another id, others
    a = sample_pixels(mask, 5, patch_rng(0, "p1"))
    assert all(np.array_equal(x, y) for x, y in zip(a, sample_pixels(mask, 5, patch_rng(0, "p1")), strict=True))
    assert not np.array_equal(a[0], sample_pixels(mask, 5, patch_rng(0, "p2"))[0])


def test_running_stats_merge_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(1000.0, 0.01, (500, 4))).astype(np.float32)  # large mean, tiny spread
    total = RunningStats(4)
    for part in np.array_split(x, 7):
        s = RunningStats(4)
        s.update(part)
        total.merge(s.n, s.mean, s.m2)
    x64 = x.astype(np.float64)
    assert total.n == 500
    assert np.allclose(total.mean, x64.mean(0), rtol=0, atol=1e-9)
    assert np.allclose(total.std, x64.std(0), rtol=1e-7)


def _scenes(size: int = 48):
    """Three little scenes: bright squares (buildings) on noise, with nodata borders; one without buildings."""
    rng = np.random.default_rng(3)
    out = []
    for i, split in enumerate(["train", "train", "val"]):
        rgb = rng.integers(40, 120, (size, size, 3)).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if i != 1:
            for _ in range(3):
                r, c = rng.integers(0, size - 10, 2)
                mask[r : r + 8, c : c + 8] = 1
                rgb[r : r + 8, c : c + 8] = 220
        mask[:, :3] = 255  # a nodata strip
        rgb[:, :3] = 0
        out.append((f"s{i}", split, rgb, mask))
    return out


@pytest.fixture
def tiles(tmp_path):
    cfg = load_config(None, [f"output_root={tmp_path / 'out'}", "name=t", "tile.size=32", "tile.stride=32",
                             "features.per_class=6", "features.batch_size=3", "features.shard_patches=3",
                             "features.device=cpu", "cluster.workers=0"])
    write_fake_tiles(RunPaths.of(cfg).stage("tile"), _scenes(), 32)
    return cfg


def test_features_stage_shards_stats_and_resume(tiles, caplog):
    cfg = tiles
    meta = extract_features(cfg)
    out = RunPaths.of(cfg).stage("features")
    # 48x48 scenes in 32-px patches: 4 patches each; 8 train patches in shards of 3 -> 3 shards; 4 val -> 2
    assert meta["shards"] == {"train": ["train_0000.npz", "train_0001.npz", "train_0002.npz"],
                              "val": ["val_0000.npz", "val_0001.npz"], "test": []}
    assert meta["channels"] == hypercolumn_channels(ALL) == 4227
    assert "warning" in meta  # random backbone
    train = load_features(out, "train")
    X, y, rc, w, pid = train["X"], train["y"], train["rc"], train["w"], train["patch_id"]
    assert X.dtype == np.float32 and X.shape == (len(y), 4227)
    assert np.isfinite(X).all()
    # labels agree with the masks, never an ignore pixel, per_class per class per patch at most
    import rasterio

    tile_dir = RunPaths.of(cfg).stage("tile")
    class_px = np.zeros(2, np.int64)
    for p in np.unique(pid):
        scene = p.split("_")[0]
        with rasterio.open(tile_dir / "patches" / scene / f"{p}_mask.tif") as src:
            m = src.read(1)
        class_px += [(m == 0).sum(), (m == 1).sum()]
        sel = pid == p
        assert (m[rc[sel, 0], rc[sel, 1]] == y[sel]).all()
        counts = np.bincount(y[sel], minlength=2)
        assert counts.tolist() == [min(6, (m == 0).sum()), min(6, (m == 1).sum())]
        # each sample stands for its class's pixels: the weights add up to the mask counts
        for k in (0, 1):
            assert np.isclose(w[sel & (y == k)].sum(), (m == k).sum()) or counts[k] == 0
    assert meta["class_pixels"] == {"background": int(class_px[0]), "building": int(class_px[1])}
    assert meta["n"]["train"] == len(y) and meta["n"]["val"] == len(load_features(out, "val")["y"])
    # the scene without buildings still gave background samples
    assert any(p.startswith("s1_") for p in pid)
    # stats: exactly the train features' mean/std (population)
    with np.load(out / "stats.npz") as z:
        assert np.allclose(z["mean"], X.astype(np.float64).mean(0), atol=1e-6, rtol=1e-6)
        assert np.allclose(z["std"], X.astype(np.float64).std(0), atol=1e-6, rtol=1e-5)
    # the stored columns are the naive full hypercolumn's at those pixels
    model = load_backbone("random", "torchvision")
    first = pid == pid[0]
    with rasterio.open(tile_dir / "patches" / pid[0].split("_")[0] / f"{pid[0]}.tif") as src:
        img = torch.from_numpy(src.read()).float()[None]
    with torch.no_grad():
        full = naive_hypercolumns(model(img, ALL), ALL, (32, 32))[0]
    ref = full[:, torch.from_numpy(rc[first, 0]).long(), torch.from_numpy(rc[first, 1]).long()].T.numpy()
    assert np.allclose(X[first], ref, atol=1e-4, rtol=1e-5)

    # rerun: complete, skipped
    assert extract_features(cfg)["skipped"] is True
    # interrupted run: one shard and meta.json gone -> only that shard is recomputed, bit-identical
    keep = {p: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name != "train_0001.npz"}
    before = np.load(out / "train_0001.npz")["X"]
    (out / "train_0001.npz").unlink()
    (out / "meta.json").unlink()
    meta2 = extract_features(cfg)
    assert "skipped" not in meta2
    assert np.array_equal(np.load(out / "train_0001.npz")["X"], before)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name != "train_0001.npz"}.keys() == keep.keys()
    for p, t in keep.items():
        if p.name != "stats.npz":
            assert p.stat().st_mtime_ns == t, p
    assert meta2["class_pixels"] == meta["class_pixels"] and meta2["n"] == meta["n"]
    with np.load(out / "stats.npz") as z:
        assert np.allclose(z["mean"], X.astype(np.float64).mean(0), atol=1e-6, rtol=1e-6)


def test_features_settings_change_recomputes_and_meta(tiles):
    cfg = tiles
    extract_features(cfg)
    cfg.features.per_class = 2
    cfg.backbone.layers = "pool"
    meta = extract_features(cfg)
    assert "skipped" not in meta and meta["channels"] == 64 + 128 + 256 + 512 + 512
    train = load_features(RunPaths.of(cfg).stage("features"), "train")
    assert train["X"].shape[1] == meta["channels"]
    assert max(np.unique(train["patch_id"], return_counts=True)[1]) <= 4
    saved = json.loads((RunPaths.of(cfg).stage("features") / "meta.json").read_text())
    assert saved["per_class"] == 2 and saved["layers"] == ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"]



def test_features_read_the_patch_store_alike_and_never_send_nodata_patches_to_the_backbone(tiles, monkeypatch):
    """The same shards from the patch store as from the GeoTIFFs, and an all-nodata patch is read and counted
    but never goes through the backbone."""
    from store_fixtures import add_patch_store

    from footprints.stages import features as features_stage

    cfg = tiles
    tile_dir = RunPaths.of(cfg).stage("tile")
    extract_features(cfg)
    out = RunPaths.of(cfg).stage("features")
    from_tiffs = {p.name: dict(np.load(p)) for p in out.glob("*_0*.npz")}
    add_patch_store(tile_dir)
    # blank one train patch in the store (nodata image, ignore mask) and count what the backbone sees
    from footprints.contracts.manifest import read_manifest
    from footprints.contracts.patches import store_dir

    rows = read_manifest(tile_dir)
    victim = rows[rows.split == "train"].iloc[0]
    masks = np.load(store_dir(tile_dir, victim.scene_id) / "masks.npy", mmap_mode="r+")
    masks[0] = 255
    masks.flush()
    del masks
    seen: list[int] = []
    real = features_stage._extract_batch

    def counting(images, *args, **kwargs):
        seen.append(images.shape[0])
        return real(images, *args, **kwargs)

    monkeypatch.setattr(features_stage, "_extract_batch", counting)
    meta = extract_features(cfg, overwrite=True)
    n_feature_patches = int(rows.split.isin(["train", "val"]).sum())
    assert sum(seen) == n_feature_patches - 1  # the blanked patch never reached the backbone
    assert meta["patches"]["train"] == int((rows.split == "train").sum())  # but it was read and counted
    from_store = {p.name: dict(np.load(p)) for p in out.glob("*_0*.npz")}
    assert from_store.keys() == from_tiffs.keys()
    for name, arrays in from_tiffs.items():
        keep = from_store[name]["patch_id"] != victim.patch_id
        was = arrays["patch_id"] != victim.patch_id
        for key in ("X", "y", "rc", "w", "patch_id"):
            assert np.array_equal(from_store[name][key], arrays[key][was]), (name, key)
        assert keep.all()
