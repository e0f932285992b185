"""Stage `features`: class-balanced pixel samples and their VGG16 zoom-out hypercolumns.

For every patch of the tile manifest, `features.per_class` pixels of each class (background 0, building 1)
are drawn without replacement from the patch mask (never an ignore/nodata pixel; a patch without
buildings still gives background samples), seeded by the run seed and the patch id so that any shard can
be recomputed alone. Patches go through the frozen backbone in batches on the device, and only the
sampled pixels' columns are gathered (`footprints.model.hypercolumns`). Patches are read from the patch store
(`footprints.contracts.patches`; GeoTIFFs for scenes tiled without one) and sampled, on CUDA by a reader
thread ahead of the device (pinned memory, non-blocking copies), on the CPU in line; a patch with no valid labelled pixel is
never sent to the backbone. Each sample carries `w`, the number of
mask pixels it stands for (the class's pixel count in its patch divided by the samples drawn of it:
weighting by `w` turns sampled-pixel counts into unbiased estimates of dense counts).

Outputs (`footprints.contracts.features_store`): shards `<split>_<shard:04d>.npz`, `stats.npz` (train
mean/std merged from the shards' partial statistics: no second pass) and `meta.json`, the run's freshness
record, written last. A shard is written atomically; on a rerun, shards whose fingerprint (settings +
patch ids) matches are kept, others are recomputed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..contracts import features_store
from ..contracts.freshness import digest, is_fresh, unmark, write_record
from ..contracts.manifest import PATCH_COLUMNS, SPLITS, read_manifest
from ..contracts.patches import PatchStore
from ..contracts.paths import RunPaths
from ..contracts.tile_records import read_scene_record, read_tile_classes
from ..errors import InputError, StageError
from ..model.backbone import LAYER_CHANNELS, hypercolumn_channels, load_backbone, resolve_layers
from ..model.device import resolve_device
from ..model.hypercolumns import RunningStats, gather_hypercolumns, patch_rng, sample_pixels
from ..polygons.blocks import prefetched

log = logging.getLogger(__name__)

# the classifier learns on train and is selected on val; the test split is judged on whole scenes by
# predict and evaluate, so sampling its pixels would only cost time
FEATURE_SPLITS = ("train", "val")


@contextlib.contextmanager
def host_threads(device: torch.device, n: int = 1) -> Iterator[None]:
    """torch's intra-op threads limited to `n` on the CPU (a no-op for CUDA): for a few hundred small
    gathers, one thread beats a parallel region each."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _settings(cfg: Config, layers: list[str]) -> dict[str, Any]:
    return {
        "format": features_store.FORMAT_VERSION,
        "seed": cfg.seed,
        "per_class": cfg.features.per_class,
        "layers": layers,
        "backbone": {"weights": cfg.backbone.weights, "normalization": cfg.backbone.normalization},
    }


def _shard_fingerprint(settings: dict[str, Any], rows: list[dict[str, Any]], scene_keys: dict[str, str]) -> str:
    """What a shard depends on: the settings, its patches, and how their scenes were tiled."""
    ids = [str(r["patch_id"]) for r in rows]
    tiled = sorted({(str(r["scene_id"]), scene_keys.get(str(r["scene_id"]), "")) for r in rows})
    return digest({"settings": settings, "patches": ids, "tiled": tiled})


def _load_batch(
    store: PatchStore, positions: list[int], per_class: int, seed: int, k: int, pin: bool
) -> tuple[torch.Tensor | None, list[tuple[Any, ...]], np.ndarray]:
    """Read the patches of one batch and sample their pixels: (images uint8 (n, 3, H, W) of the patches
    that have a sampled pixel, pinned on CUDA; their samples; class pixel counts of all). A patch with
    no valid labelled pixel is never sent to the backbone."""
    class_px = np.zeros(k, dtype=np.int64)
    try:
        images, masks = store.read(positions)
        ok = list(range(len(positions)))
    except InputError:  # a broken GeoTIFF patch (no store): read one by one, log and skip the bad ones
        pairs, ok = [], []
        for i, pos in enumerate(positions):
            try:
                pairs.append(store.read([pos]))
                ok.append(i)
            except InputError as err:
                log.error("%s", err)
        if not pairs:
            return None, [], class_px
        images, masks = np.concatenate([a for a, _ in pairs]), np.concatenate([m for _, m in pairs])
    keep, samples = [], []
    for j, i in enumerate(ok):
        row, mask = store.rows[positions[i]], masks[j]
        counts = np.bincount(mask[mask < k].ravel(), minlength=k).astype(np.int64)
        class_px += counts
        r, c, lab = sample_pixels(mask, per_class, patch_rng(seed, row["patch_id"]), k)
        if lab.size == 0:  # all nodata (or unlabelled): nothing to learn from, no backbone pass
            continue
        drawn = np.bincount(lab, minlength=k)
        w = (counts / np.maximum(drawn, 1))[lab].astype(np.float32)  # mask pixels each sample stands for
        keep.append(j)
        samples.append((str(row["patch_id"]), r, c, lab, w))
    if not keep:
        return None, [], class_px
    x = torch.from_numpy(np.ascontiguousarray(images[keep]))
    return (x.pin_memory() if pin else x), samples, class_px


def _extract_batch(
    images: torch.Tensor, samples: list[tuple[Any, ...]], model: torch.nn.Module, layers: list[str],
    device: torch.device,
) -> torch.Tensor:
    """Hypercolumns (n, C) float32 of the sampled pixels of one batch of patches, left on the device (the
    caller collects them after queueing the next batch, so the device never waits for the host)."""
    height, width = images.shape[-2:]
    x = images.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
    r_all = np.concatenate([s[1] for s in samples])
    c_all = np.concatenate([s[2] for s in samples])
    b_all = np.concatenate([np.full(len(s[1]), i) for i, s in enumerate(samples)])
    with torch.inference_mode():
        acts = model(x, layers)
        with host_threads(device):
            feats = gather_hypercolumns(acts, layers, r_all, c_all, (height, width), batch=b_all)
    return feats.float()


def _process_shard(
    rows: list[dict[str, Any]],
    tile_dir: Path,
    model: torch.nn.Module,
    layers: list[str],
    cfg: Config,
    device: torch.device,
    fingerprint: str,
    path: Path,
    bar: tqdm,
    k: int,
) -> dict[str, Any]:
    """Sample, extract and write one shard; returns its header (as `read_shard_header`).

    On CUDA a reader thread reads (from the patch store: a memory-mapped gather) and samples the next
    `features.prefetch` batches while the device runs the current one (on the CPU: in line, `prefetched`);
    the host collects a batch's
    hypercolumns only after the next batch is queued on the device.
    """
    channels = hypercolumn_channels(layers)
    per_class = cfg.features.per_class
    xs, ys, ids, rcs, ws = [], [], [], [], []
    class_px = np.zeros(k, dtype=np.int64)
    stats = RunningStats(channels)
    store = PatchStore(tile_dir, rows)
    bs = max(1, cfg.features.batch_size)
    chunks = [list(range(start, min(start + bs, len(rows)))) for start in range(0, len(rows), bs)]
    pin = device.type == "cuda"
    sizes = {(int(r["size"])) for r in rows if "size" in r}
    if len(sizes) > 1:
        raise StageError(f"{tile_dir}: patches of different sizes in one shard: {sorted(sizes)}")

    def collect(feats: torch.Tensor, samples: list[tuple[Any, ...]]) -> None:
        feats_np = feats.cpu().numpy()
        if not np.isfinite(feats_np).all():
            raise StageError(f"non-finite hypercolumn values in patches {[s[0] for s in samples]}")
        stats.update(feats_np)
        xs.append(feats_np)
        ys.append(np.concatenate([s[3] for s in samples]))
        ids.extend(pid for pid, r, *_ in samples for _ in range(len(r)))
        rcs.append(np.concatenate([np.stack([s[1], s[2]], axis=1) for s in samples]).astype(np.int32))
        ws.append(np.concatenate([s[4] for s in samples]))

    # on CPU the backbone's threads already use every core, and a reader thread woken between them stalls
    # their parallel regions more than its (memory-mapped, cheap) reads save: read in line there
    batches = prefetched(chunks, lambda c: _load_batch(store, c, per_class, cfg.seed, k, pin),
                         max(1, cfg.features.prefetch), threaded=device.type == "cuda", name="features-read")
    with contextlib.closing(batches):
        queued: tuple[torch.Tensor, list[tuple[Any, ...]]] | None = None
        for chunk, (images, samples, counts) in zip(chunks, batches, strict=True):
            class_px += counts
            bar.update(len(chunk))
            if images is not None:
                feats = _extract_batch(images, samples, model, layers, device)
                if queued is not None:
                    collect(*queued)
                queued = (feats, samples)
        if queued is not None:
            collect(*queued)
    arrays = {
        "X": np.concatenate(xs) if xs else np.zeros((0, channels), np.float32),
        "y": np.concatenate(ys) if ys else np.zeros(0, np.int64),
        "patch_id": np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1"),
        "rc": np.concatenate(rcs) if rcs else np.zeros((0, 2), np.int32),
        "w": np.concatenate(ws) if ws else np.zeros(0, np.float32),
        "class_px": class_px,
        "stat_n": np.int64(stats.n),
        "stat_mean": stats.mean,
        "stat_m2": stats.m2,
        "fingerprint": np.array(fingerprint),
    }
    features_store.write_shard(path, arrays)
    return {
        "fingerprint": fingerprint,
        "n": int(len(arrays["y"])),
        "class_px": class_px,
        "stat_n": stats.n,
        "stat_mean": stats.mean,
        "stat_m2": stats.m2,
    }


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """The `features` stage: outputs/<name>/tile/ -> outputs/<name>/features/; returns meta.json's content."""
    paths = RunPaths.of(cfg)
    tile_dir, out_dir = paths.tile, paths.features
    manifest = read_manifest(tile_dir, PATCH_COLUMNS)
    layers = resolve_layers(cfg.backbone.layers)
    channels = hypercolumn_channels(layers)
    classes = read_tile_classes(paths.tile_summary)  # the classes the tile stage labelled the patches with
    k = len(classes)
    settings = {**_settings(cfg, layers), "classes": classes}
    shard_size = max(1, cfg.features.shard_patches)
    scene_keys = _scene_keys(paths, manifest)

    # the shard plan: each split's patches in manifest order, cut every shard_patches; a shard's rows are
    # made into records only when it is computed (xView2's whole manifest as dicts would be ~0.5 GB)
    frames = {split: manifest[manifest["split"] == split].reset_index(drop=True) for split in FEATURE_SPLITS}
    del manifest

    def shard_rows(split: str, start: int) -> list[dict[str, Any]]:
        return frames[split].iloc[start : start + shard_size].to_dict("records")

    def shard_len(split: str, start: int) -> int:
        return min(shard_size, len(frames[split]) - start)

    plan: list[tuple[str, str, int, str]] = []  # (split, file, first row, fingerprint)
    for split, rows in frames.items():
        for index, start in enumerate(range(0, len(rows), shard_size)):
            fp = _shard_fingerprint(settings, shard_rows(split, start), scene_keys)
            plan.append((split, features_store.shard_name(split, index), start, fp))
    if not any(split == "train" for split, *_ in plan):
        raise StageError(f"{paths.manifest}: no patch in the train split; nothing to train on")
    run_key = digest({"settings": settings, "shards": [p[3] for p in plan]})

    meta_path = paths.features_meta
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = {p[1] for p in plan}
    for old in out_dir.glob("*_[0-9][0-9][0-9][0-9].npz"):
        if overwrite or old.name not in planned:  # a shard of another plan must not be read later
            old.unlink()
    if not overwrite and is_fresh(meta_path, run_key):
        log.info("features: %s is complete (same settings and patches); skipping", out_dir)
        return {**features_store.read_meta(out_dir), "skipped": True}
    unmark(meta_path)

    headers: dict[str, dict[str, Any]] = {}
    todo = []
    for split, name, start, fp in plan:
        head = features_store.read_shard_header(out_dir / name)
        if head is not None and head["fingerprint"] == fp:
            headers[name] = head
        else:
            todo.append((split, name, start, fp))
    if headers:
        log.info("features: resuming; %d of %d shards already done", len(headers), len(plan))

    t0 = time.perf_counter()
    device = resolve_device(cfg.features.device, key="features.device")
    if todo:
        if cfg.backbone.weights == "random":
            log.warning("features: BACKBONE WEIGHTS ARE RANDOM (backbone.weights: random)")
        # channels last: each pixel's channels contiguous, so gathering the sampled pixels reads a few cache
        # lines per sample instead of one per channel (and oneDNN's convolutions prefer it)
        model = load_backbone(cfg.backbone.weights, cfg.backbone.normalization, device)
        model = model.to(memory_format=torch.channels_last)
        log.info(
            "features: %d layers (%d channels), %d per class per patch, device %s, %d shard(s) to do",
            len(layers), channels, cfg.features.per_class, device, len(todo),
        )
        with tqdm(total=sum(shard_len(split, start) for split, _, start, _ in todo), desc="features",
                  unit="patch") as bar:
            for split, name, start, fp in todo:
                headers[name] = _process_shard(shard_rows(split, start), tile_dir, model, layers, cfg, device, fp,
                                               out_dir / name, bar, k)
    elapsed = time.perf_counter() - t0

    stats = RunningStats(channels)
    class_px = np.zeros(k, dtype=np.int64)
    samples = {s: 0 for s in SPLITS}
    patches = {s: 0 for s in SPLITS}
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split, name, start, _ in plan:
        head = headers[name]
        samples[split] += head["n"]
        patches[split] += shard_len(split, start)
        shards[split].append(name)
        if split == "train":
            stats.merge(head["stat_n"], head["stat_mean"], head["stat_m2"])
            class_px += head["class_px"]
    if stats.n == 0:
        raise StageError(f"{out_dir}: the train split gave no valid pixel to sample (all nodata?)")
    features_store.write_stats(paths.features_stats, stats.mean, stats.std, stats.n)
    meta: dict[str, Any] = {
        "layers": layers,
        "channels": channels,
        "layer_channels": {n: LAYER_CHANNELS[n] for n in layers},
        "per_class": cfg.features.per_class,
        "seed": cfg.seed,
        "backbone": settings["backbone"],
        "classes": classes,
        "class_pixels": {c: int(n) for c, n in zip(classes, class_px, strict=True)},
        "n": samples,
        "patches": patches,
        "shards": shards,
        "stats": paths.features_stats.name,
        "device": str(device),
        "seconds": round(elapsed, 2),
    }
    if cfg.backbone.weights == "random":
        meta["warning"] = "backbone.weights is random: hypercolumns carry no ImageNet knowledge"
    meta = write_record(meta_path, run_key, [out_dir / p[1] for p in plan] + [paths.features_stats], **meta)
    log.info(
        "features: %s samples (train/val/test %d/%d/%d), train class pixels %s, %.1f s",
        sum(samples.values()), samples["train"], samples["val"], samples["test"], meta["class_pixels"], elapsed,
    )
    return meta


def _scene_keys(paths: RunPaths, manifest: Any) -> dict[str, str]:
    """The tile record key of every scene in the manifest: re-tiled patches invalidate their shards."""
    keys = {}
    for sid in manifest["scene_id"].unique():
        record = read_scene_record(paths.scene_record(sid))
        keys[str(sid)] = record.key if record is not None else ""
    return keys
