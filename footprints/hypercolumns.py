"""Stage `features`: class-balanced pixel samples and their VGG16 zoom-out hypercolumns.

For every patch of the tile manifest, `features.per_class` pixels of each class (background 0, building 1)
are drawn without replacement from the patch mask (never an ignore/nodata pixel; a patch without
buildings still gives background samples), seeded by the run seed and the patch id so that any shard can
be recomputed alone. Patches go through the frozen backbone in batches on the device, and only the
sampled pixels' columns are gathered from each layer's activation with the bilinear weights of
`F.interpolate(mode="bilinear", align_corners=False)` to the patch size: the full-resolution hypercolumn
of a patch (4,227 x 256 x 256 floats) is never built.

Outputs in `outputs/<name>/features/`:

- `<split>_<shard:04d>.npz`: `X` float32 (n, C), `y` int64 (n,), `patch_id` str (n,), `rc` int32 (n, 2)
  (row, col in the patch), `w` float32 (n,) the number of mask pixels each sample stands for (the class's
  pixel count in its patch divided by the samples drawn of it: weighting by `w` turns sampled-pixel
  counts into unbiased estimates of dense counts), plus the shard's `class_px` [background, building]
  and its partial statistics (`stat_n`, `stat_mean`, `stat_m2`, float64) and a `fingerprint`.
- `stats.npz`: `mean`, `std` (population std) float64 (C,) of the train split, merged from the shards'
  partial statistics (Chan et al.'s parallel update), so no second pass over images or features.
- `meta.json` (written last: its presence with a matching fingerprint means the stage is complete).

A shard is written atomically; on a rerun, shards whose fingerprint (settings + patch ids) matches are
kept, others are recomputed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_path, write_json
from .backbone import LAYER_CHANNELS, hypercolumn_channels, load_backbone, resolve_layers
from .config import Config
from .device import resolve_device
from .errors import InputError, StageError

log = logging.getLogger(__name__)

IGNORE = 255
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# pure functions: sampling and gathering


def sample_pixels(mask: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Draw up to `per_class` pixels of each class (0, then 1) from `mask` without replacement.

    Pixels whose value is neither 0 nor 1 (255 = nodata/padding) are never drawn. A class with fewer
    pixels than `per_class` gives all of them. Returns `(rows, cols, labels)`, int64 arrays.
    """
    if mask.ndim != 2:
        raise ValueError(f"sample_pixels: expected a 2-D mask, got shape {mask.shape}")
    flat = mask.reshape(-1)
    width = mask.shape[1]
    picked: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for cls in (0, 1):
        idx = np.flatnonzero(flat == cls)
        k = min(per_class, idx.size)
        if k == 0:
            continue
        picked.append(rng.choice(idx, size=k, replace=False))
        labels.append(np.full(k, cls, dtype=np.int64))
    if not picked:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    flat_idx = np.concatenate(picked).astype(np.int64)
    return flat_idx // width, flat_idx % width, np.concatenate(labels)


def _source_index(dst: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, ...]:
    """Bilinear neighbours and weight along one axis, exactly as F.interpolate(align_corners=False)."""
    scale = in_size / out_size
    src = ((dst.to(torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    frac = src - i0.to(torch.float64)
    return i0, i1, frac


def gather_hypercolumns(
    activations: dict[str, torch.Tensor],
    layers: Sequence[str],
    rows: torch.Tensor | np.ndarray,
    cols: torch.Tensor | np.ndarray,
    size: int | tuple[int, int],
    batch: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Hypercolumns (n, C) of the pixels (rows[i], cols[i]) of image batch[i], never the full grid.

    `activations[name]` is (B, C_l, h_l, w_l) (or (C_l, h_l, w_l) for one image, then `batch` is None);
    each is read at the position it would have after `F.interpolate(..., size=size, mode="bilinear",
    align_corners=False)`, by blending its four neighbours, and the layers are concatenated in `layers`
    order. The result is on the activations' device, in their dtype.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    first = activations[layers[0]]
    device = first.device
    rows_t = torch.as_tensor(rows, device=device).long()
    cols_t = torch.as_tensor(cols, device=device).long()
    if batch is None:
        batch_t = torch.zeros_like(rows_t)
    else:
        batch_t = torch.as_tensor(batch, device=device).long()
    cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    parts = []
    for name in layers:
        act = activations[name]
        if act.dim() == 3:
            act = act.unsqueeze(0)
        h, w = act.shape[-2:]
        if (h, w) not in cache:
            y0, y1, fy = _source_index(rows_t, h, out_h)
            x0, x1, fx = _source_index(cols_t, w, out_w)
            cache[(h, w)] = (y0, y1, x0, x1, fy.unsqueeze(1), fx.unsqueeze(1))
        y0, y1, x0, x1, fy, fx = cache[(h, w)]
        # advanced indexing act[b, :, y, x] gives (n, C_l)
        top = act[batch_t, :, y0, x0] * (1 - fx).to(act.dtype) + act[batch_t, :, y0, x1] * fx.to(act.dtype)
        bottom = act[batch_t, :, y1, x0] * (1 - fx).to(act.dtype) + act[batch_t, :, y1, x1] * fx.to(act.dtype)
        parts.append(top * (1 - fy).to(act.dtype) + bottom * fy.to(act.dtype))
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------------
# streaming statistics


class RunningStats:
    """Per-channel count, mean and sum of squared deviations in float64, mergeable (Chan et al. 1979)."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add the rows of `x` (n, C)."""
        if len(x) == 0:
            return
        x64 = np.asarray(x, dtype=np.float64)
        mean = x64.mean(axis=0)
        m2 = ((x64 - mean) ** 2).sum(axis=0)
        self.merge(len(x64), mean, m2)

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge another partial (n, mean, m2) into this one."""
        n = int(n)
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0)."""
        return np.sqrt(self.m2 / max(self.n, 1))


# ---------------------------------------------------------------------------------------------------
# the stage


def patch_rng(seed: int, patch_id: str) -> np.random.Generator:
    """The sampling RNG of one patch: depends only on the run seed and the patch id."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(patch_id).encode())])


def _settings(cfg: Config, layers: list[str]) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "seed": cfg.seed,
        "per_class": cfg.features.per_class,
        "layers": layers,
        "backbone": {"weights": cfg.backbone.weights, "normalization": cfg.backbone.normalization},
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _shard_fingerprint(settings: dict[str, Any], patch_ids: list[str]) -> str:
    return _digest({"settings": settings, "patches": patch_ids})


def _read_shard_header(path: Path) -> dict[str, Any] | None:
    """Fingerprint and partial statistics of a finished shard, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {
                "fingerprint": str(z["fingerprint"]),
                "n": int(len(z["y"])),
                "class_px": z["class_px"].astype(np.int64),
                "stat_n": int(z["stat_n"]),
                "stat_mean": z["stat_mean"],
                "stat_m2": z["stat_m2"],
            }
    except Exception as err:  # noqa: BLE001 - a damaged shard is simply recomputed
        log.warning("%s: unreadable shard (%s); recomputing it", path, type(err).__name__)
        return None


def _tiling():
    from . import tiling

    return tiling


def _load_batch(
    chunk: list[dict[str, Any]], tile_dir: Path, per_class: int, seed: int
) -> tuple[list[np.ndarray], list[tuple[Any, ...]], np.ndarray]:
    """Read the patches of one batch and sample their pixels: (images, samples, class pixel counts)."""
    tiling = _tiling()
    images, samples = [], []
    class_px = np.zeros(2, dtype=np.int64)
    for row in chunk:
        try:
            image, mask = tiling.load_patch(tile_dir, row)
        except InputError as err:
            log.error("%s", err)
            continue
        counts = np.array([(mask == 0).sum(), (mask == 1).sum()], dtype=np.int64)
        class_px += counts
        r, c, lab = sample_pixels(mask, per_class, patch_rng(seed, row["patch_id"]))
        if lab.size == 0:  # all nodata: nothing to learn from
            continue
        drawn = np.bincount(lab, minlength=2)
        w = (counts / np.maximum(drawn, 1))[lab].astype(np.float32)  # mask pixels each sample stands for
        images.append(image)
        samples.append((str(row["patch_id"]), r, c, lab, w))
    return images, samples, class_px


def _extract_batch(
    images: list[np.ndarray], samples: list[tuple[Any, ...]], model: torch.nn.Module, layers: list[str],
    device: torch.device, tile_dir: Path,
) -> np.ndarray:
    """Hypercolumns (n, C) float32 of the sampled pixels of one batch of patches."""
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise StageError(f"{tile_dir}: patches of different shapes in one batch: {sorted(sizes)}")
    height, width = images[0].shape[1:]
    x = torch.from_numpy(np.stack(images)).to(device=device, dtype=torch.float32)
    r_all = np.concatenate([s[1] for s in samples])
    c_all = np.concatenate([s[2] for s in samples])
    b_all = np.concatenate([np.full(len(s[1]), i) for i, s in enumerate(samples)])
    with torch.inference_mode():
        acts = model(x, layers)
        feats = gather_hypercolumns(acts, layers, r_all, c_all, (height, width), batch=b_all)
    feats_np = feats.float().cpu().numpy()
    if not np.isfinite(feats_np).all():
        raise StageError(f"non-finite hypercolumn values in patches {[s[0] for s in samples]}")
    return feats_np


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
) -> dict[str, Any]:
    """Sample, extract and write one shard; returns its header (as `_read_shard_header`)."""
    channels = hypercolumn_channels(layers)
    per_class = cfg.features.per_class
    xs, ys, ids, rcs, ws = [], [], [], [], []
    class_px = np.zeros(2, dtype=np.int64)
    stats = RunningStats(channels)
    bs = max(1, cfg.features.batch_size)
    chunks = [rows[start : start + bs] for start in range(0, len(rows), bs)]
    # read and sample the next batch in a thread (GDAL releases the GIL) while the device works
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, chunks[0], tile_dir, per_class, cfg.seed) if chunks else None
        for i in range(len(chunks)):
            images, samples, counts = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(_load_batch, chunks[i + 1], tile_dir, per_class, cfg.seed)
            class_px += counts
            bar.update(len(chunks[i]))
            if images:
                feats_np = _extract_batch(images, samples, model, layers, device, tile_dir)
                stats.update(feats_np)
                xs.append(feats_np)
                ys.append(np.concatenate([s[3] for s in samples]))
                ids.extend(pid for pid, r, *_ in samples for _ in range(len(r)))
                rcs.append(np.concatenate([np.stack([s[1], s[2]], axis=1) for s in samples]).astype(np.int32))
                ws.append(np.concatenate([s[4] for s in samples]))
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
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return {
        "fingerprint": fingerprint,
        "n": int(len(arrays["y"])),
        "class_px": class_px,
        "stat_n": stats.n,
        "stat_mean": stats.mean,
        "stat_m2": stats.m2,
    }


def extract_features(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Run the `features` stage for `cfg`; returns a summary (also written as meta.json)."""
    tiling = _tiling()
    tile_dir = cfg.stage_dir("tile")
    out_dir = cfg.stage_dir("features")
    if not (tile_dir / "manifest.csv").is_file():
        raise StageError(f"{tile_dir / 'manifest.csv'}: missing; run the tile stage first")
    manifest = tiling.read_manifest(tile_dir)
    layers = resolve_layers(cfg.backbone.layers)
    channels = hypercolumn_channels(layers)
    settings = _settings(cfg, layers)
    shard_size = max(1, cfg.features.shard_patches)

    # the shard plan: each split's patches in manifest order, cut every shard_patches
    plan: list[tuple[str, str, list[dict[str, Any]], str]] = []  # (split, file, rows, fingerprint)
    for split in SPLITS:
        rows = manifest[manifest["split"] == split].to_dict("records")
        for k, start in enumerate(range(0, len(rows), shard_size)):
            part = rows[start : start + shard_size]
            fp = _shard_fingerprint(settings, [str(r["patch_id"]) for r in part])
            plan.append((split, f"{split}_{k:04d}.npz", part, fp))
    if not any(split == "train" for split, *_ in plan):
        raise StageError(f"{tile_dir / 'manifest.csv'}: no patch in the train split; nothing to train on")
    run_fp = _digest({"settings": settings, "shards": [p[3] for p in plan]})

    meta_path = out_dir / "meta.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = {p[1] for p in plan}
    for old in out_dir.glob("*_[0-9][0-9][0-9][0-9].npz"):
        if overwrite or old.name not in planned:  # a shard of another plan must not be read later
            old.unlink()
    if overwrite:
        meta_path.unlink(missing_ok=True)
    elif meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == run_fp and all((out_dir / p[1]).is_file() for p in plan):
            log.info("features: %s is complete (same settings and patches); skipping", out_dir)
            return {**meta, "skipped": True}

    headers: dict[str, dict[str, Any]] = {}
    todo = []
    for split, name, rows, fp in plan:
        head = _read_shard_header(out_dir / name)
        if head is not None and head["fingerprint"] == fp:
            headers[name] = head
        else:
            todo.append((split, name, rows, fp))
    if headers:
        log.info("features: resuming; %d of %d shards already done", len(headers), len(plan))

    t0 = time.perf_counter()
    device = resolve_device(cfg.features.device, key="features.device")
    if todo:
        if cfg.backbone.weights == "random":
            log.warning("features: BACKBONE WEIGHTS ARE RANDOM (backbone.weights: random)")
        model = load_backbone(cfg.backbone.weights, cfg.backbone.normalization, device)
        log.info(
            "features: %d layers (%d channels), %d per class per patch, device %s, %d shard(s) to do",
            len(layers), channels, cfg.features.per_class, device, len(todo),
        )
        with tqdm(total=sum(len(t[2]) for t in todo), desc="features", unit="patch") as bar:
            for _split, name, rows, fp in todo:
                headers[name] = _process_shard(rows, tile_dir, model, layers, cfg, device, fp, out_dir / name, bar)
    elapsed = time.perf_counter() - t0

    stats = RunningStats(channels)
    class_px = np.zeros(2, dtype=np.int64)
    samples = {s: 0 for s in SPLITS}
    patches = {s: 0 for s in SPLITS}
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split, name, rows, _ in plan:
        head = headers[name]
        samples[split] += head["n"]
        patches[split] += len(rows)
        shards[split].append(name)
        if split == "train":
            stats.merge(head["stat_n"], head["stat_mean"], head["stat_m2"])
            class_px += head["class_px"]
    if stats.n == 0:
        raise StageError(f"{out_dir}: the train split gave no valid pixel to sample (all nodata?)")
    with atomic_path(out_dir / "stats.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mean=stats.mean, std=stats.std, n=np.int64(stats.n))
    meta: dict[str, Any] = {
        "fingerprint": run_fp,
        "layers": layers,
        "channels": channels,
        "layer_channels": {n: LAYER_CHANNELS[n] for n in layers},
        "per_class": cfg.features.per_class,
        "seed": cfg.seed,
        "backbone": settings["backbone"],
        "class_pixels": {"background": int(class_px[0]), "building": int(class_px[1])},
        "n": samples,
        "patches": patches,
        "shards": shards,
        "stats": "stats.npz",
        "device": str(device),
        "seconds": round(elapsed, 2),
    }
    if cfg.backbone.weights == "random":
        meta["warning"] = "backbone.weights is random: hypercolumns carry no ImageNet knowledge"
    write_json(meta_path, meta)
    log.info(
        "features: %s samples (train/val/test %d/%d/%d), train class pixels background %d building %d, %.1f s",
        sum(samples.values()), samples["train"], samples["val"], samples["test"], class_px[0], class_px[1], elapsed,
    )
    return meta


def load_features(feature_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Concatenate the shards of `split` listed in meta.json: X, y, w, patch_id, rc."""
    meta_path = feature_dir / "meta.json"
    if not meta_path.is_file():
        raise StageError(f"{meta_path}: missing; run the features stage first")
    meta = json.loads(meta_path.read_text())
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("X", "y", "w", "patch_id", "rc")}
    for name in meta["shards"].get(split, []):
        path = feature_dir / name
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in parts:
                    parts[k].append(z[k])
        except (OSError, KeyError, ValueError) as err:
            raise InputError(path, f"unreadable feature shard ({err}); rerun features") from None
    channels = int(meta["channels"])
    if not parts["y"]:
        return {
            "X": np.zeros((0, channels), np.float32), "y": np.zeros(0, np.int64), "w": np.zeros(0, np.float32),
            "patch_id": np.zeros(0, dtype="<U1"), "rc": np.zeros((0, 2), np.int32),
        }
    return {k: np.concatenate(v) for k, v in parts.items()}
