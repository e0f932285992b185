"""The checks that types alone cannot express: the range of every numeric key, the run name and output
folder, and cross-key rules (stride within size, folds, class weights per target class).

Only configs being loaded are checked (a checkpoint's stored config is rebuilt as it was).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .build import _show
from .schema import CONFIG_VERSION, PIXEL_PARTS, Config, ConfigError, DataConfig, damage_input_parts

INT64_MAX = 2**63 - 1  # numpy's and torch's integers: no integer key may exceed it
SEED_MAX = 2**32 - 1  # scikit-learn (random_state) and numpy's legacy RandomState take 32-bit seeds

# The allowed range of every numeric key (lists: of each element): (low, high), None = unbounded, both
# inclusive; `OPEN` marks an exclusive bound. tests/test_config.py checks that no numeric key is missing.
OPEN = 1e-12
RANGES: dict[str, tuple[float | None, float | None]] = {
    "version": (1, CONFIG_VERSION), "seed": (0, SEED_MAX),
    "data.mask_threshold": (1, None), "data.max_residual_px": (OPEN, None), "data.bands": (1, None),
    "data.stretch_percentiles": (0, 100), "data.nodata": (None, None),
    "tile.size": (16, 8192), "tile.stride": (1, None), "tile.target_gsd": (OPEN, None), "tile.folds": (2, 100),
    "tile.fold": (0, None), "tile.split_ratios": (0, None), "tile.val_band": (0, 0.9),
    "tile.border_m": (OPEN, 20), "tile.contact_m": (OPEN, 50),
    "features.per_class": (1, None), "features.batch_size": (1, None), "features.shard_patches": (1, None),
    "features.prefetch": (1, 64),
    "classifier.hidden": (1, None), "classifier.dropout": (0, 0.99), "classifier.epochs": (0, None),
    "classifier.batch_size": (1, None), "classifier.lr": (OPEN, 1), "classifier.weight_decay": (0, None),
    "classifier.step_size": (1, None), "classifier.gamma": (OPEN, 1), "classifier.class_weights": (OPEN, None),
    "classifier.shuffle_buffer": (1, None),
    "segmenter.epochs": (0, None), "segmenter.batch_size": (1, None), "segmenter.lr": (OPEN, 1),
    "segmenter.weight_decay": (0, None), "segmenter.step_size": (1, None), "segmenter.gamma": (OPEN, 1),
    "segmenter.stride": (1, 2), "segmenter.class_weights": (OPEN, None), "segmenter.num_workers": (0, 256),
    "segmenter.checkpoint_every": (0, None), "segmenter.overlays": (0, 1000),
    "segmenter.max_steps_per_epoch": (0, None),
    "predict.overlap": (0, 0.95), "predict.batch_size": (1, None), "predict.block_size": (64, None),
    "predict.threshold": (OPEN, 1), "predict.min_area_m2": (0, None), "predict.threshold_grid": (OPEN, 1),
    "predict.calibration_scenes": (1, None),
    "predict.min_area_grid": (0, None), "predict.seed_threshold": (OPEN, 1),
    "predict.seed_threshold_grid": (OPEN, 1), "predict.hole_area_m2": (0, None), "predict.simplify_px": (0, 10),
    "predict.domain_warn": (OPEN, None),
    "evaluate.iou_threshold": (OPEN, 1), "evaluate.overlays": (0, 1000),
    "damage.pixels_per_building": (1, None), "damage.context_m": (0, 100), "damage.block_size": (64, None), "damage.hidden": (1, None),
    "damage.dropout": (0, 0.99), "damage.epochs": (1, None), "damage.batch_size": (1, None),
    "damage.lr": (OPEN, 1), "damage.weight_decay": (0, None), "damage.val_folds": (0, 100), "damage.train_pixels": (1, None),
    "cluster.workers": (0, 1024), "cluster.threads_per_worker": (1, 1024), "cluster.slurm.cores": (1, None),
    "cluster.slurm.processes": (1, None), "cluster.slurm.jobs": (1, None), "cluster.slurm.adaptive_min": (0, None),
    "cluster.slurm.adaptive_max": (1, None), "cluster.slurm.startup_timeout": (0, None),
}


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
        if node is None:  # an optional section that is off (damage: absent)
            return None
    return node


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_ranges(cfg: Config) -> None:
    """Every numeric key within its RANGES entry: finite, and integers within 64 bits (what numpy and torch
    hold). Only for configs being loaded (a checkpoint's stored config is rebuilt as it was)."""
    for key, (lo, hi) in RANGES.items():
        _check_range(cfg.source, key, _get(cfg, key), lo, hi)
    # a data source's keys have the ranges of the `data:` keys they override
    for i, entry in enumerate(cfg.data.sources):
        for key, (lo, hi) in RANGES.items():
            section, _, attr = key.partition(".")
            if section == "data" and hasattr(entry, attr):
                _check_range(cfg.source, f"data.sources[{i}].{attr}", getattr(entry, attr), lo, hi)


def _check_range(source: str, key: str, value: Any, lo: float | None, hi: float | None) -> None:
    """`value` (a number, a list of them, or None) within [lo, hi] (`OPEN`: exclusive 0), finite, 64-bit."""
    for v in value if isinstance(value, list) else [value]:
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{source}: {key}: expected a finite number, got {_show(value)}")
        low_ok = lo is None or (v > 0 if lo == OPEN else v >= lo)
        if not low_ok or (hi is not None and v > hi):
            low = "-inf" if lo is None else ("0 (exclusive)" if lo == OPEN else _bound(lo))
            high = "inf" if hi is None else _bound(hi)
            raise ConfigError(f"{source}: {key}: must be in [{low}, {high}], got {_show(value)}")
        if isinstance(v, int) and not -INT64_MAX - 1 <= v <= INT64_MAX:
            raise ConfigError(f"{source}: {key}: must fit in 64 bits (at most {INT64_MAX}), got {_show(value)}")


NAME_MAX = 100  # characters of a run name (a folder name, with room for `-fold<k>` and the stage names)


def _check_paths(cfg: Config) -> None:
    """`name` is one plain folder name, so that every path derived from it stays inside `output_root`."""
    src = cfg.source
    name = cfg.name
    plain = all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    if not plain or not name or name.startswith(".") or len(name) > NAME_MAX:
        raise ConfigError(f"{src}: name: must be a plain folder name (ASCII letters, digits, '-', '_', '.'; no "
                          f"leading '.'; at most {NAME_MAX} characters), got {_show(name)}")
    root = cfg.output_root
    if not root.strip() or any(not c.isprintable() for c in root):
        raise ConfigError(f"{src}: output_root: must be a folder path without control characters, got {_show(root)}")
    if root.startswith("~"):
        raise ConfigError(f"{src}: output_root: '~' is not expanded here (it would make a folder named '~'); "
                          f"write the full path, got {_show(root)}")


# a data source's name: letters and digits, single '-' or '_' between them, so that the scene ids it prefixes
# (`<name>__<scene>`) are unambiguous and every path they name stays a plain file name
SOURCE_NAME = re.compile(r"[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*")


def _check_sources(cfg: Config) -> None:
    """`data.sources`: every entry named (a plain id, no two alike) and rooted; `data.root` left out."""
    src, sources = cfg.source, cfg.data.sources
    if not sources:
        return
    # with sources each names its own root: a `data.root` beside them would be silently ignored (it is told
    # from its default value: a config that spells out the default root is not caught)
    if cfg.data.root != DataConfig().root:
        raise ConfigError(f"{src}: data.root and data.sources are both set: each source names its own root "
                          f"(data.sources[i].root); leave data.root out (got {_show(cfg.data.root)})")
    seen: dict[str, int] = {}
    for i, entry in enumerate(sources):
        name = entry.name
        if not SOURCE_NAME.fullmatch(name) or len(name) > NAME_MAX:
            raise ConfigError(f"{src}: data.sources[{i}].name: must be a plain id (ASCII letters and digits, "
                              f"single '-' or '_' between them; at most {NAME_MAX} characters), got {_show(name)}")
        if name in seen:
            raise ConfigError(f"{src}: data.sources[{i}].name: {name!r} is also the name of data.sources"
                              f"[{seen[name]}]; give every source its own name")
        seen[name] = i
        if not entry.root.strip():
            raise ConfigError(f"{src}: data.sources[{i}].root: required (the folder of source {name!r})")


def _check(cfg: Config) -> None:
    """Value ranges, then cross-field checks that types alone cannot express."""
    _check_ranges(cfg)
    src = cfg.source
    _check_paths(cfg)
    _check_sources(cfg)
    if cfg.tile.size <= 0:
        raise ConfigError(f"{src}: tile.size: must be positive, got {cfg.tile.size}")
    if not 0 < cfg.tile.stride <= cfg.tile.size:
        raise ConfigError(f"{src}: tile.stride: must be in 1..tile.size ({cfg.tile.size}), got {cfg.tile.stride}")
    if len(cfg.tile.split_ratios) != 3 or any(r < 0 for r in cfg.tile.split_ratios) or sum(cfg.tile.split_ratios) <= 0:
        raise ConfigError(f"{src}: tile.split_ratios: expected three non-negative numbers (train, val, test)")
    # with validation bands inside the training scenes, two folds suffice (two scenes, each tested once)
    min_folds = 2 if cfg.tile.val_band > 0 else 3
    if cfg.tile.split_mode == "kfold" and not (cfg.tile.folds >= min_folds and 0 <= cfg.tile.fold < cfg.tile.folds):
        raise ConfigError(f"{src}: tile.fold: needs tile.folds >= {min_folds} and 0 <= fold < folds, got "
                          f"fold {cfg.tile.fold} of {cfg.tile.folds}")
    if not (cfg.tile.patch_store or cfg.tile.patch_geotiffs):
        raise ConfigError(f"{src}: tile.patch_store and tile.patch_geotiffs are both false: the patches would "
                          "be written nowhere (keep the patch store on)")
    if not 0 <= cfg.tile.val_band < 1:
        raise ConfigError(f"{src}: tile.val_band: must be in [0, 1), got {cfg.tile.val_band}")
    if cfg.damage is not None:
        try:
            parts = damage_input_parts(cfg.damage.inputs)
        except ValueError as err:
            raise ConfigError(f"{src}: damage.inputs: {err}") from None
        if cfg.damage.classify == "pixel" and not set(parts) <= set(PIXEL_PARTS):
            raise ConfigError(f"{src}: damage.inputs: a pixel has only {', '.join(PIXEL_PARTS)} (damage.classify: "
                              f"pixel); got {cfg.damage.inputs!r}")
        if cfg.damage.classify == "pixel" and cfg.damage.context_m > 0:
            raise ConfigError(f"{src}: damage.context_m: the ring around a building is pooled for damage.classify: "
                              "building only; set it to 0")
    if cfg.segmenter.stride not in (1, 2):
        raise ConfigError(f"{src}: segmenter.stride: must be 1 or 2, got {cfg.segmenter.stride}")
    if not 0 <= cfg.predict.overlap < 1:
        raise ConfigError(f"{src}: predict.overlap: must be in [0, 1), got {cfg.predict.overlap}")
    from ..scenes.targets import SCHEMES

    classes = SCHEMES[cfg.tile.target].classes
    for key in ("classifier.class_weights", "segmenter.class_weights"):
        section, attr = key.split(".")
        weights = getattr(getattr(cfg, section), attr)
        if weights is not None and (len(weights) != len(classes) or min(weights) <= 0):
            raise ConfigError(f"{src}: {key}: expected {len(classes)} positive numbers {list(classes)} "
                              f"(tile.target {cfg.tile.target}), got {weights}")
    if cfg.classifier.init_from is not None and not cfg.classifier.init_from.strip():
        raise ConfigError(f"{src}: classifier.init_from: expected a checkpoint path or null, got ''")
    # 0 epochs is a fine-tuning's parent as it is (evaluated on this run's validation split); from scratch it
    # would be an untrained model
    if cfg.classifier.epochs == 0 and cfg.classifier.init_from is None:
        raise ConfigError(f"{src}: classifier.epochs: must be in [1, inf] (0 only with classifier.init_from), got 0")
    if cfg.features.per_class <= 0:
        raise ConfigError(f"{src}: features.per_class: must be positive, got {cfg.features.per_class}")

