"""`footprints bench scale`: how every stage's time, memory, disk and file count grow with the data set.

The whole pipeline runs on synthetic scenes in the official xView2 layout (`train`, `hold`, `test` subset
folders, mapped to the train/val/test splits as `configs/xview2.yaml` does) at three sizes, N, 4N and 16N
scenes (`SIZES`) of 256 px, one patch each. Each stage runs as its own process (`footprints <stage> --config ...`), so that its peak
resident memory is its own: the largest of the process and of the dask workers it started (the kernel's
`ru_maxrss` of the stage process as reaped, which covers its reaped children), never a sum. Per stage and
size: wall time per scene, peak resident memory, and the bytes and files the stage wrote per scene. This
measures growth, not accuracy: the backbone is random and truncated (`BENCH_LAYERS`), and the training
stages run one epoch.

Two summary keys in the last line: `rss_growth`, the largest over stages of peak memory at 16N / at N, and
`time_per_scene_growth`, the same for wall time per scene. `marginal_seconds_per_scene` gives each stage's
time per added scene between 4N and 16N and between N and 4N (the fixed start-up cost cancels there): a
stage whose work per scene grew with the number of scenes would show it there first.

`footprints bench scale --classifier-gb G` instead writes G GB of synthetic feature shards (in the features
stage's own format, learnable: two classes apart on a few channels) under `output_root` and runs
`train-classifier` on them: `features_gb` and `classifier_peak_rss_gb` (G above this machine's memory shows
that the stage streams).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import Config

log = logging.getLogger(__name__)

BASE_SCENES = 4  # N: the sizes are N, 4N and 16N scenes
SIZES = (BASE_SCENES, 4 * BASE_SCENES, 16 * BASE_SCENES)
SCENE_PX = 256  # one patch of 256 px per scene: xView2's 1024 px scenes are 16 (scale per patch)
BENCH_LAYERS = ["input", "conv1_2", "conv2_2", "conv3_3"]  # the backbone up to its third block
STAGES = ("tile", "features", "train-classifier", "train-segmenter", "predict", "evaluate", "report")


def _subsets(n: int) -> dict[str, int]:
    """Scene counts per xView2 subset folder for `n` scenes: half train, a quarter each hold and test."""
    return {"train": n // 2, "hold": n // 4, "test": n - n // 2 - n // 4}


def _bench_config(cfg: Config, root: Path, data: Path, n: int) -> dict[str, Any]:
    """The run's config as a dict: the user's config with the data, the sizes and the cheap model of the
    benchmark set (every stage still does its real work)."""
    d = copy.deepcopy(cfg.to_dict())
    d["name"], d["output_root"] = f"scale-{n}", str(root / "out")
    # the exact transforms synth wrote: scenes without buildings (no vertices to fit one to) stay in
    d["data"].update(root=str(data), format="xview2", subsets=["train", "hold", "test"],
                     geotransforms=str(data / "truth_transforms.json"),
                     images_dir="images", labels_dir="labels", label_format="json", image_glob="")
    d["tile"].update(size=256, stride=256, split_mode="subset", val_band=0.0, target_gsd=None,
                     subset_splits={"train": "train", "hold": "val", "test": "test"})
    d["backbone"].update(weights="random", layers=BENCH_LAYERS)
    # a shard is what the features stage holds in memory: 2 patches, so that the smallest size fills one
    d["features"].update(per_class=16, device="cpu", shard_patches=2)
    d["classifier"].update(epochs=1, hidden=64, baseline=False, device="cpu")
    # batches of 2: the smallest size (2 training patches) has a full batch, like every larger one
    d["segmenter"].update(epochs=1, batch_size=2, num_workers=0, overlays=1, device="cpu", checkpoint_every=0,
                          max_steps_per_epoch=0, amp=False, compile=False)
    # calibration on at most 2 of the 1 / 4 / 16 validation scenes: the cap is reached at 4N and 16N
    d["predict"].update(calibration_scenes=2, batch_size=4, device="cpu", block_size=2048,
                        threshold_grid=[0.3, 0.5, 0.7], seed_threshold_grid=[0.5, 0.8],
                        min_area_grid=[0.0, 20.0], checkpoint="", compile=False)
    d["evaluate"].update(overlays=1)
    d["cluster"].update(kind="local", workers=2, threads_per_worker=1)
    return d


def _run_measured(argv: list[str], log_path: Path) -> tuple[float, float, int]:
    """Run `footprints ARGV` as a child process: (seconds, peak resident MB of it or any child it reaped,
    exit code)."""
    cmd = [sys.executable, "-m", "footprints.cli", *argv]
    t0 = time.perf_counter()
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024.0, proc.returncode  # ru_maxrss is in KB on Linux


def _disk(folder: Path) -> tuple[int, int]:
    """(bytes, files) under `folder`."""
    total = files = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            files += 1
    return total, files


def bench_scale(cfg: Config, classifier_gb: float | None = None) -> dict[str, Any]:
    """Every stage at N, 4N and 16N synthetic scenes (or, with `classifier_gb`, train-classifier on that
    many GB of synthetic features); returns the figures (the CLI prints them as the last line)."""
    if classifier_gb is not None:
        return bench_classifier_memory(cfg, classifier_gb)
    from ..synth.dataset import write_synthetic_dataset

    root = Path(cfg.output_root) / "bench-scale"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    figures: dict[str, dict[str, dict[str, float]]] = {s: {} for s in STAGES}
    failed: list[str] = []
    t_all = time.perf_counter()
    try:
        for n in SIZES:
            data = root / f"data-{n}"
            write_synthetic_dataset(data, n_scenes=n, seed=cfg.seed, size=SCENE_PX, geotiff=False, subsets=_subsets(n))
            config_path = root / f"scale-{n}.yaml"
            config_path.write_text(yaml.safe_dump(_bench_config(cfg, root, data, n), sort_keys=False))
            run_dir = root / "out" / f"scale-{n}"
            for stage in STAGES:
                seconds, rss_mb, rc = _run_measured([stage, "--config", str(config_path)], root / f"scale-{n}.log")
                stage_dir = run_dir / stage
                size_bytes, files = _disk(stage_dir)
                figures[stage][str(n)] = {
                    "seconds": round(seconds, 2), "seconds_per_scene": round(seconds / n, 3),
                    "peak_rss_mb": round(rss_mb, 1), "bytes_per_scene": int(size_bytes / n),
                    "files_per_scene": round(files / n, 2),
                }
                log.info("bench scale: %3d scenes  %-16s %7.1f s (%.2f s/scene)  peak RSS %7.1f MB  %9.0f B/scene  "
                         "%5.2f files/scene%s", n, stage, seconds, seconds / n, rss_mb, size_bytes / n, files / n,
                         "" if rc == 0 else f"  FAILED (exit {rc}; see {root / f'scale-{n}.log'})")
                if rc != 0:
                    failed.append(f"{stage} at {n} scenes (exit {rc})")
                    break
            if failed:
                break
        result = _summarise(figures)
    finally:
        if not failed:
            shutil.rmtree(root, ignore_errors=True)
    result.update(sizes=list(SIZES), scene_px=SCENE_PX, layers=BENCH_LAYERS, failed=failed,
                  seconds=round(time.perf_counter() - t_all, 1))
    return result


def _summarise(figures: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Growth per stage from the smallest to the largest size, and the two summary keys."""
    small, mid, large = (str(n) for n in SIZES)
    rss_growth: dict[str, float] = {}
    time_growth: dict[str, float] = {}
    marginal: dict[str, list[float]] = {}
    for stage, by_size in figures.items():
        if not all(s in by_size for s in (small, mid, large)):
            continue
        a, b, c = by_size[small], by_size[mid], by_size[large]
        rss_growth[stage] = round(c["peak_rss_mb"] / a["peak_rss_mb"], 3)
        time_growth[stage] = round(c["seconds_per_scene"] / a["seconds_per_scene"], 3)
        marginal[stage] = [round((b["seconds"] - a["seconds"]) / (SIZES[1] - SIZES[0]), 3),
                           round((c["seconds"] - b["seconds"]) / (SIZES[2] - SIZES[1]), 3)]
        log.info("bench scale: %-16s peak RSS x%.2f, time per scene x%.2f, seconds per added scene %.3f "
                 "(N->4N) %.3f (4N->16N)", stage, rss_growth[stage], time_growth[stage], *marginal[stage])
    return {
        "stages": figures,
        "rss_growth_by_stage": rss_growth,
        "time_per_scene_growth_by_stage": time_growth,
        "marginal_seconds_per_scene": marginal,
        "rss_growth": max(rss_growth.values()) if rss_growth else None,
        "time_per_scene_growth": max(time_growth.values()) if time_growth else None,
    }


# ---------------------------------------------------------------------------------------------------
# train-classifier on more features than memory


SHARD_SAMPLES = 32_768  # synthetic shard size: 32,768 x 4,227 float32 = 0.55 GB


def write_synthetic_features(feature_dir: Path, n_samples: int, seed: int, layers: Any = "all",
                             shard_samples: int = SHARD_SAMPLES) -> dict[str, Any]:
    """Feature shards in the features stage's format (`features_store`), `meta.json` and `stats.npz` last:
    two classes, standard normal noise with the building class shifted by 1 on the first 64 channels, split
    7:1 into train and val. Written shard by shard (memory: one shard); returns meta.json's content."""
    from ..contracts import features_store
    from ..contracts.freshness import digest, write_record
    from ..model.backbone import LAYER_CHANNELS, hypercolumn_channels, resolve_layers
    from ..model.hypercolumns import RunningStats

    names = resolve_layers(layers)
    channels = hypercolumn_channels(names)
    feature_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stats = RunningStats(channels)
    shards: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    counts = {"train": 0, "val": 0, "test": 0}
    class_px = np.zeros(2, dtype=np.int64)
    n_shards = max(2, -(-n_samples // shard_samples))
    for i in range(n_shards):
        split = "val" if i % 8 == 7 or (i == n_shards - 1 and not shards["val"]) else "train"
        n = min(shard_samples, max(1, n_samples - i * shard_samples))
        y = (rng.random(n) < 0.5).astype(np.int64)
        X = rng.standard_normal((n, channels), dtype=np.float32)
        X[:, :64] += y[:, None].astype(np.float32)
        w = np.ones(n, np.float32)
        part = RunningStats(channels)
        part.update(X)
        if split == "train":
            stats.merge(part.n, part.mean, part.m2)
            class_px += np.bincount(y, minlength=2)
        name = features_store.shard_name(split, len(shards[split]))
        features_store.write_shard(feature_dir / name, {
            "X": X, "y": y, "w": w, "patch_id": np.full(n, f"synthetic_{i}"), "rc": np.zeros((n, 2), np.int32),
            "class_px": np.bincount(y, minlength=2), "stat_n": np.int64(part.n), "stat_mean": part.mean,
            "stat_m2": part.m2, "fingerprint": np.array(f"synthetic-{seed}-{i}"),
        })
        shards[split].append(name)
        counts[split] += n
        del X
    features_store.write_stats(feature_dir / "stats.npz", stats.mean, stats.std, stats.n)
    meta = {
        "layers": names, "channels": channels, "layer_channels": {n: LAYER_CHANNELS[n] for n in names},
        "per_class": 0, "seed": seed, "backbone": {"weights": "random", "normalization": "torchvision"},
        "classes": ["background", "building"],
        "class_pixels": {"background": int(class_px[0]), "building": int(class_px[1])},
        "n": counts, "shards": shards, "stats": "stats.npz", "synthetic": True,
    }
    files = [feature_dir / s for names_ in shards.values() for s in names_] + [feature_dir / "stats.npz"]
    return write_record(feature_dir / "meta.json", digest({"synthetic": seed, "n": n_samples}), files, **meta)


def bench_classifier_memory(cfg: Config, gb: float) -> dict[str, Any]:
    """Write `gb` GB of synthetic features under `output_root`, run train-classifier on them in its own
    process (one epoch, a small hidden layer: this measures memory, not accuracy), report its peak memory."""
    from ..contracts.paths import RunPaths

    root = Path(cfg.output_root) / "bench-scale-classifier"
    shutil.rmtree(root, ignore_errors=True)
    d = copy.deepcopy(cfg.to_dict())
    d["name"], d["output_root"] = "classifier", str(root)
    d["backbone"]["layers"] = "all"
    d["classifier"].update(epochs=1, hidden=64, device="cpu", class_weights=None, class_weighting="sqrt")
    channels = 4227
    n_samples = int(gb * 1e9 / (channels * 4))
    try:
        t0 = time.perf_counter()
        meta = write_synthetic_features(RunPaths(root / "classifier").features, n_samples, cfg.seed)
        write_seconds = time.perf_counter() - t0
        features_gb = sum(p.stat().st_size for p in RunPaths(root / "classifier").features.glob("*.npz")) / 1e9
        log.info("bench scale: %.2f GB of synthetic features (%d train / %d val samples) written in %.0f s",
                 features_gb, meta["n"]["train"], meta["n"]["val"], write_seconds)
        config_path = root / "classifier.yaml"
        config_path.write_text(yaml.safe_dump(d, sort_keys=False))
        seconds, rss_mb, rc = _run_measured(["train-classifier", "--config", str(config_path)], root / "classifier.log")
        metrics: dict[str, Any] = {}
        if rc == 0:
            metrics = json.loads((RunPaths(root / "classifier").classifier_metrics).read_text())
        else:
            log.error("bench scale: train-classifier failed (exit %d); see %s", rc, root / "classifier.log")
        log.info("bench scale: train-classifier on %.2f GB of features: %.0f s, peak RSS %.2f GB, validation "
                 "building IoU %s", features_gb, seconds, rss_mb / 1024, metrics.get("mlp", {}).get("val", {}).get(
                     "building_iou"))
        return {
            "features_gb": round(features_gb, 3), "classifier_peak_rss_gb": round(rss_mb / 1024, 3),
            "classifier_seconds": round(seconds, 1), "exit_code": rc,
            "samples": meta["n"], "shuffle_buffer": cfg.classifier.shuffle_buffer,
            "val_building_iou": metrics.get("mlp", {}).get("val", {}).get("building_iou"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
