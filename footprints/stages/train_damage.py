"""Stage `train-damage` (a config with a `damage:` section): the damage classifier, from the training scenes'
labelled buildings -> train-damage/best.pt.

Which scenes: the pre-disaster scenes of the run's train and validation splits (the tile manifest's; a scene
cut into bands by `tile.val_band` counts once, whole), each with its post-disaster twin (`footprints.scenes.
pairs`). A pair whose post label has no grades is left out of training (said once); a bad pair (post scene
missing, of another size, not overlapping, labels of buildings the pre label lacks) is one error line naming
the file, and the other scenes go on. Test scenes are never read here.

Per scene, on the dask cluster of `cluster:` as the other per-scene stages (`footprints.runtime.cluster`), the
buildings' pooled zoom-out hypercolumns and colour statistics (`footprints.prediction.damage.pair_pooled`; with
`damage.classify: pixel` also `damage.train_pixels` of each building's pixels, the training rows) are
written to `train-damage/features/<scene>.npz` with the key of what made them (the scene's
files, the backbone, the damage settings, the seed): a rerun reuses a scene whose key holds, so a killed
stage resumes scene by scene; `--overwrite` redoes everything. The classifier (`footprints.training.damage`)
is then trained and selected on the validation buildings' damage F1; metrics.json is its freshness record.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, DamageConfig
from ..contracts.checkpoints import save_checkpoint
from ..contracts.features_store import write_shard
from ..contracts.freshness import digest, is_fresh, read_record, unmark, write_record
from ..contracts.paths import RunPaths
from ..errors import StageError, as_input_error, printable
from ..model.backbone import resolve_layers
from ..model.damage_features import POOLED, combine, pixel_rows
from ..model.device import resolve_device
from ..prediction.damage import (
    backbone_for,
    damage_checkpoint,
    labelled_buildings,
    pair_pooled,
    pair_stamp,
    pre_disaster_scenes,
)
from ..runtime.cluster import map_scenes
from ..scenes.grades import GRADES
from ..scenes.pairs import open_pair
from ..scenes.sources import SceneSource
from ..training.damage import graded_buildings_of, train_damage_mlp

log = logging.getLogger(__name__)


def _scene_key(src: SceneSource, settings: dict[str, Any]) -> str:
    return digest({"files": pair_stamp(src), "settings": settings})


def _read_scene(path: Path, key: str, arrays: bool = True) -> dict[str, np.ndarray] | None:
    """A scene's feature file when it holds `key` (its arrays; with `arrays` false only that it does: the
    key alone is read), else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in z.files if k != "key"} if arrays else {}
    except Exception:  # noqa: BLE001 - absent, damaged or foreign: the scene is simply redone
        return None


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """The `train-damage` stage; returns metrics.json's content."""
    d = cfg.damage
    if d is None:
        raise StageError("train-damage: the config has no damage: section (add one to grade damage)")
    paths = RunPaths.of(cfg)
    t0 = time.perf_counter()
    layers = resolve_layers(d.layers)
    backbone_cfg = {"weights": cfg.backbone.weights, "normalization": cfg.backbone.normalization}
    settings = {"layers": layers, "pixels_per_building": d.pixels_per_building, "context_m": d.context_m,
                "block_size": d.block_size, "backbone": backbone_cfg, "seed": cfg.seed,
                "target_gsd": cfg.tile.target_gsd, "pooled": POOLED}  # POOLED: a file of other moments is redone
    if kept := _kept_pixels(d):  # the files keep training pixels too
        settings["keep_pixels"] = kept
    scenes = pre_disaster_scenes(cfg.data, paths.tile, ("train", "val"))
    keys = {s.scene_id: _scene_key(s, settings) for s in scenes}
    train_settings = {k: getattr(d, k) for k in ("inputs", "hidden", "dropout", "epochs", "batch_size", "lr", "weight_decay",
                                                 "class_weighting", "val_folds", "classify")}
    key = digest({"scenes": keys, "train": train_settings, "seed": cfg.seed})
    metrics_path = paths.train_damage / "metrics.json"
    if not overwrite and is_fresh(metrics_path, key):
        log.info("train-damage: %s is complete (same scenes and settings); skipping", paths.train_damage)
        return {**(read_record(metrics_path) or {}), "skipped": True}
    unmark(metrics_path)
    if not scenes:
        raise StageError(f"train-damage: no pre-disaster training scene (<name>_pre_disaster) in {paths.tile}'s "
                         "train and validation splits")

    paths.damage_features.mkdir(parents=True, exist_ok=True)
    files = {s.scene_id: paths.damage_features / f"{s.scene_id}.npz" for s in scenes}
    todo = [s for s in scenes if overwrite or _read_scene(files[s.scene_id], keys[s.scene_id], arrays=False) is None]
    skipped = []
    # each pair on the cluster (dask workers, `cluster:`), its buildings' features written to its own file
    func = functools.partial(_features_item, cfg=cfg, layers=layers, keys=keys, folder=str(paths.damage_features))
    for src, graded, err in map_scenes(cfg.cluster, func, todo, desc="train-damage"):
        if err is not None:
            reason = printable(as_input_error(err, src.image))
            log.error("train-damage: %s", reason)
            skipped.append({"scene": src.scene_id, "reason": reason})
        else:
            log.info("train-damage: %s: %d graded buildings", src.scene_id, graded)
    failed = {s["scene"] for s in skipped}
    parts, trained_on, unlabelled = [], [], []
    for src in scenes:
        if src.scene_id in failed:
            continue
        part = _read_scene(files[src.scene_id], keys[src.scene_id])
        if part is None:  # written a moment ago: only a file system losing it gets here
            raise StageError(f"{files[src.scene_id]}: missing or unreadable just after it was written")
        if not bool(part["labelled"]):
            unlabelled.append(src.scene_id)
        elif len(part["y"]):
            parts.append(part)
            trained_on.append(src.scene_id)
    if unlabelled:
        log.info("train-damage: %d scene(s) without damage grades left out of training (e.g. %s)", len(unlabelled),
                 unlabelled[0])
    train, y, scene_of = graded_buildings_of(parts)
    del parts  # the scenes' arrays, now stacked: at xView2's size the training pixels are many GB
    owner = train.get("pixel_owner") if d.classify == "pixel" else None  # the rows: pixels of the buildings
    if not len(y):
        x = np.zeros((0, 1), np.float32)
    elif owner is not None:  # the stacked pixels freed once their rows are made
        x = pixel_rows(train.pop("pixel_pre"), train.pop("pixel_post"), train["outline_m2"][owner], d.inputs)
    else:
        x = combine(train, d.inputs)
    if len(np.unique(y)) < 2:
        raise StageError(f"train-damage: the training scenes hold {len(y)} graded building(s) of "
                         f"{len(np.unique(y))} grade(s); at least two grades are needed")
    log.info("train-damage: %d buildings (%s) from %d scene(s)", len(y),
             ", ".join(f"{g} {int((y == k).sum())}" for k, g in enumerate(GRADES)), len(scenes) - len(skipped))
    model, record = train_damage_mlp(d, x, y, cfg.seed, scenes=scene_of, owner=owner)
    ckpt_path = paths.damage_checkpoint
    # the backbone's parameters the layers use go in the checkpoint, so that it grades footprints anywhere
    # (`footprints damage`); the weights file is named for the record
    weights = Path(cfg.backbone.weights)
    stored = {**backbone_cfg, "weights": str(weights.resolve()) if weights.is_file() else cfg.backbone.weights}
    # the features' own device key: the backbone they were pooled with is reused when they ran in this process
    device = resolve_device(d.device, key="damage.device")
    backbone = backbone_for(cfg.backbone.weights, cfg.backbone.normalization, str(device))
    save_checkpoint(ckpt_path, damage_checkpoint(model, d, layers, stored, cfg.seed, record, cfg.to_dict(), backbone))
    if "val" in record:
        log.info("train-damage: %d epochs, chosen on %d validation folds of its %s: damage F1 %.3f, "
                 "damaged/undamaged macro F1 %.3f -> %s", record["epoch"], record["val_folds"], record["val_folds_of"],
                 record["val"]["damage_f1"], record["val"]["binary"]["macro_f1"], ckpt_path)
    metrics = {"settings": {**settings, **train_settings}, "scenes": len(scenes) - len(skipped), "skipped": skipped,
               "unlabelled_scenes": unlabelled, "train_scenes": trained_on, **record,
               "seconds": round(time.perf_counter() - t0, 2)}
    if cfg.backbone.weights == "random":
        metrics["warning"] = "BACKBONE WEIGHTS ARE RANDOM: these metrics do not reflect ImageNet features"
    # a scene that failed is retried by the next run (the others' features are reused from their files)
    return write_record(metrics_path, "" if skipped else key, [ckpt_path], **metrics)


def _kept_pixels(d: DamageConfig) -> int:
    """The pixels of each training building a scene's feature file keeps (a per-pixel model's rows; 0: none)."""
    return d.train_pixels if d.classify == "pixel" else 0


def _features_item(src: SceneSource, cfg: Config, layers: list[str], keys: dict[str, str], folder: str) -> int:
    """One training pair (top level: runs on dask workers): its buildings' pooled hypercolumns and colour
    statistics (`pooled_hypercolumns`), grades (-1: un-classified, or no valid pixel) and uids, written to
    `<folder>/<scene>.npz` with the scene's key; `labelled` false when the post label has no grades. Returns
    the number of graded buildings."""
    device = resolve_device(cfg.damage.device, key="damage.device")
    backbone = backbone_for(cfg.backbone.weights, cfg.backbone.normalization, str(device))
    pair = open_pair(src, None, cfg.data, cfg.tile)
    try:
        buildings = labelled_buildings(pair)
        if buildings is None:
            part = {"labelled": np.array(False), "y": np.zeros(0, np.int64)}
        else:
            pooled, = pair_pooled(pair, [[b.polygon for b in buildings]], backbone, layers, cfg.damage, cfg.seed,
                                  device, keep_pixels=_kept_pixels(cfg.damage))
            y = np.array([GRADES.index(b.grade) if b.grade is not None and p > 0 else -1
                          for b, p in zip(buildings, pooled["pixels"], strict=True)], np.int64)
            part = {**pooled, "y": y, "uid": np.array([b.uid for b in buildings]), "labelled": np.array(True)}
    finally:
        pair.close()
    write_shard(Path(folder) / f"{src.scene_id}.npz", {**part, "key": np.array(keys[src.scene_id])})
    return int((part["y"] >= 0).sum())
