"""Typed, validated configuration: one small dataclass per stage, loaded from YAML.

Every key has a type and a default; an unknown key or a value of the wrong type is a one-line
`ConfigError` naming the file and the dotted key. Relative paths are resolved against the current
working directory (run.sh runs from the repository root, SLURM jobs from the submit directory).

Long: every stage's config dataclass, their value ranges and the validation of hostile YAML live together,
so that one file says what a config may hold (issue 24 splits the validation from the dataclasses).
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and the key."""


@dataclass
class DataConfig:
    root: str = "data/demo"
    format: Literal["xview2", "geotiff"] = "xview2"
    # xView2 layout: <root>/<subset>/{images,labels}; an empty list means <root>/{images,labels}
    subsets: list[str] = field(default_factory=list)
    images_dir: str = "images"
    labels_dir: str = "labels"
    # GeoTIFF labels: "vector" (GeoJSON/GPKG in labels_dir, any CRS) or "mask" (raster in masks_dir)
    label_format: Literal["json", "vector", "mask"] = "json"
    masks_dir: str = "masks"
    # mask rasters: pixel values >= this are buildings (SpaceNet masks use 255)
    mask_threshold: int = 1
    image_glob: str = ""  # "" = *.png for xview2, *.tif for geotiff
    use_post_disaster: bool = False
    geotransforms: str | None = None  # JSON {"<img_name>": [6 GDAL geotransform numbers]}
    max_residual_px: float = 1.0
    bands: list[int] = field(default_factory=lambda: [1, 2, 3])
    stretch_percentiles: list[float] = field(default_factory=lambda: [2.0, 98.0])
    nodata: float | None = None  # overrides the raster's declared nodata value
    # the layer of a multi-layer vector label file (e.g. a GeoPackage) that holds the buildings (a file
    # without it is refused, naming its layers); None = the file's only layer, or of several the one polygon
    # layer named like building/footprint (or the only polygon layer), said in a warning, else refused
    label_layer: str | None = None


@dataclass
class TileConfig:
    size: int = 256
    stride: int = 256
    target_gsd: float | None = None  # metres; None keeps the native resolution
    # "random": scene-level split by split_ratios and seed; "subset": xView2 subsets map to splits;
    # "kfold": scenes shuffled by seed into `folds` folds, fold `fold` is test, the next one val
    split_mode: Literal["random", "subset", "kfold"] = "random"
    folds: int = 5
    fold: int = 0
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    # > 0: the validation split is the bottom `val_band` of the rows of every training scene (for datasets
    # of a few large scenes, e.g. two xView2 scenes tested one against the other)
    val_band: float = 0.0
    # what the models learn per pixel (footprints.targets): "binary" (background, building), "border"
    # (background, interior, border), "contact" (border + the gaps between close buildings)
    target: Literal["binary", "border", "contact"] = "border"
    border_m: float = 1.0  # width of the border class inside each outline, metres
    contact_m: float = 2.0  # background within this distance of two buildings is contact, metres
    subset_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "tier3": "train", "hold": "val", "test": "test"}
    )
    # also write the patch store (contiguous uint8 arrays per scene, read by training and features)
    patch_store: bool = True
    # also write two GeoTIFFs per patch (image and mask, for GIS users); nothing that trains or predicts
    # reads them when the patch store is on. Off for xView2: ~300,000 small files on a shared file system
    patch_geotiffs: bool = True


@dataclass
class BackboneConfig:
    # "imagenet" (torchvision, when it imports), "random", or a path to a state dict (.pth)
    weights: str = "random"
    normalization: Literal["torchvision", "caffe"] = "torchvision"
    # "all" (input + 13 conv layers), "pool" (the 5 layers before each pooling), or a list of names
    layers: Any = "all"


@dataclass
class FeaturesConfig:
    per_class: int = 16
    batch_size: int = 8  # patches per backbone batch
    shard_patches: int = 256  # patches per output shard
    device: str = "auto"  # auto | cpu | cuda
    prefetch: int = 2  # batches read and sampled ahead by the reader thread while the device works


@dataclass
class ClassifierConfig:
    hidden: int = 1024
    dropout: float = 0.5
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    step_size: int = 10
    gamma: float = 0.5
    class_weights: list[float] | None = None  # override: one weight per class of tile.target
    # weights from the training masks' class frequencies: inverse (N / (K n_c)), its square root, or none
    class_weighting: Literal["inverse", "sqrt", "none"] = "sqrt"
    baseline: bool = True  # scikit-learn logistic regression beside the MLP
    device: str = "auto"
    # samples held in memory at once while training (shuffle buffer, filled from feature shards read in a
    # seeded order): bounds the stage's memory whatever the number of samples (4,227 float32 = 16.9 KB each)
    shuffle_buffer: int = 65536


@dataclass
class SegmenterConfig:
    epochs: int = 18
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    step_size: int = 6
    gamma: float = 0.5
    stride: int = 2  # stride of the first two 1x1 convs (the seed's head); 1 allowed
    train_backbone: bool = False
    augment: bool = True
    class_weights: list[float] | None = None
    class_weighting: Literal["inverse", "sqrt", "none"] = "sqrt"
    num_workers: int = 0  # data-loader worker processes (CUDA only)
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # CUDA only
    deterministic: bool = False
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = end of epoch only
    overlays: int = 3  # validation overlays written per epoch
    device: str = "auto"
    max_steps_per_epoch: int = 0  # 0 = a full pass; >0 caps an epoch (benchmarks, smoke runs)
    compile: bool = False  # torch.compile the segmenter (the head has no graph break)


# the grid (predict.<value>) that calibration searches for each setting it chooses (predict.<key>)
GRID_KEYS = {"threshold": "threshold_grid", "seed_threshold": "seed_threshold_grid", "min_area_m2": "min_area_grid"}


@dataclass
class PredictConfig:
    checkpoint: str = ""  # "" = outputs/<name>/train-segmenter/best.pt
    split: str = "test"
    overlap: float = 0.25
    batch_size: int = 8
    block_size: int = 2048  # rows/cols of scene processed at once (bounded memory)
    tta_flips: bool = False
    threshold: float | None = None  # None = chosen on the validation split
    min_area_m2: float | None = None  # None = chosen on the validation split
    # at most this many validation scenes (a seeded sample) are predicted and vectorised for calibration
    calibration_scenes: int = 32
    # below 0.3 (and seed_threshold_grid below 0.5): on both real datasets validation chose 0.3 and 0.5 at the
    # lower edges of grids that stopped there (README, Joplin)
    threshold_grid: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    min_area_grid: list[float] = field(default_factory=lambda: [0.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0])
    # one polygon per building: a seeded watershed splits touching buildings ("components": no split)
    instances: Literal["watershed", "components"] = "watershed"
    seed_threshold: float | None = None  # None = chosen on the validation split
    seed_threshold_grid: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    regularize: bool = True  # right angles and aligned walls (buildingregulariser); raw outlines kept
    hole_area_m2: float = 4.0
    simplify_px: float = 1.0
    prob_dtype: Literal["uint8", "float16"] = "uint8"
    device: str = "auto"
    amp: bool = True  # bf16 (else fp16) autocast on CUDA; ignored on CPU
    compile: bool = False  # torch.compile the segmenter for inference
    # `footprints bench predict`: side of the synthetic scene, and of the top-left part of it the real
    # network runs on (end to end and model alone; 0 = the whole scene); the null-model pass covers it all
    bench_scene_px: int = 8192
    bench_model_px: int = 0


@dataclass
class EvaluateConfig:
    iou_threshold: float = 0.5
    overlays: int = 3


@dataclass
class SlurmClusterConfig:
    queue: str | None = None
    account: str | None = None
    cores: int = 4
    processes: int = 1
    memory: str = "16GB"
    walltime: str = "01:00:00"
    job_extra_directives: list[str] = field(default_factory=list)
    job_script_prologue: list[str] = field(default_factory=list)
    local_directory: str | None = None
    log_directory: str = "logs/dask"
    jobs: int = 2
    adaptive_min: int | None = None
    adaptive_max: int | None = None
    python: str | None = None  # interpreter on the compute nodes; None = this one
    # network interface of the scheduler and workers (e.g. "ib0"; "lo" for a one-node cluster); None = default
    interface: str | None = None
    job_name: str = "footprints-dask"
    # seconds to wait for the first worker job to start before giving up with a clear error; 0 = forever
    startup_timeout: float = 1800.0


@dataclass
class ClusterConfig:
    kind: Literal["local", "slurm"] = "local"
    workers: int = 2  # LocalCluster workers; 0 = run in this process (debugging)
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    slurm: SlurmClusterConfig = field(default_factory=SlurmClusterConfig)


@dataclass
class Config:
    name: str = "demo"
    version: int = CONFIG_VERSION
    output_root: str = "outputs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
    # the YAML file this config was loaded from (None: the built-in defaults, with or without --set)
    config_file: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/torch-checkpoint safe) of every key, without internal fields."""
        out = dataclasses.asdict(self)
        out.pop("source", None)
        out.pop("config_file", None)
        return out


# ---------------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _show(value: Any, limit: int = 60) -> str:
    """`repr(value)` for a one-line message: at most `limit` characters (a hostile value may be huge, or an
    integer too long for Python to print)."""
    try:
        text = repr(value) if not isinstance(value, (list, dict)) else reprlib.repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


INT64_MAX = 2**63 - 1  # numpy's and torch's integers: no integer key may exceed it
SEED_MAX = 2**32 - 1  # scikit-learn (random_state) and numpy's legacy RandomState take 32-bit seeds


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}: expected one of {allowed}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__} {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__} {_show(value)}")
        return {
            _coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: refused with the ranges (load_config)
            return math.inf
    if tp is str:
        if not isinstance(value, str):
            hint = " (write it in quotes to mean the text)" if isinstance(value, (bool, int, float)) else ""
            raise ConfigError(f"{source}: {key}: expected a string, got {_show(value)}{hint}")
        if "\x00" in value:
            raise ConfigError(f"{source}: {key}: must not contain a NUL byte, got {_show(value)}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _unknown_key_hint(key: Any, fields: dict[str, Any]) -> str:
    """What an unknown key probably meant: a look-alike non-ASCII letter, a near spelling."""
    import difflib
    import unicodedata

    text = str(key) if isinstance(key, str) else ""
    odd = next((c for c in text if not c.isascii() or not c.isprintable()), None)
    near = difflib.get_close_matches(text, list(fields), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    if odd is not None:
        name = unicodedata.name(odd, "a control character")
        hint += f" (it contains U+{ord(odd):04X} {name}, which is not an ASCII letter)"
    return hint


def _build(cls: type, values: Any, prefix: str, source: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        where = prefix or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(values).__name__} {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {_show(dotted, 80)}{_unknown_key_hint(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


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
    "classifier.hidden": (1, None), "classifier.dropout": (0, 0.99), "classifier.epochs": (1, None),
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
    "predict.bench_scene_px": (256, 65536), "predict.bench_model_px": (0, 65536),
    "evaluate.iou_threshold": (OPEN, 1), "evaluate.overlays": (0, 1000),
    "cluster.workers": (0, 1024), "cluster.threads_per_worker": (1, 1024), "cluster.slurm.cores": (1, None),
    "cluster.slurm.processes": (1, None), "cluster.slurm.jobs": (1, None), "cluster.slurm.adaptive_min": (0, None),
    "cluster.slurm.adaptive_max": (1, None), "cluster.slurm.startup_timeout": (0, None),
}


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_ranges(cfg: Config) -> None:
    """Every numeric key within its RANGES entry: finite, and integers within 64 bits (what numpy and torch
    hold). Only for configs being loaded (a checkpoint's stored config is rebuilt as it was)."""
    for key, (lo, hi) in RANGES.items():
        value = _get(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{cfg.source}: {key}: expected a finite number, got {_show(value)}")
            low_ok = lo is None or (v > 0 if lo == OPEN else v >= lo)
            if not low_ok or (hi is not None and v > hi):
                low = "-inf" if lo is None else ("0 (exclusive)" if lo == OPEN else _bound(lo))
                high = "inf" if hi is None else _bound(hi)
                raise ConfigError(f"{cfg.source}: {key}: must be in [{low}, {high}], got {_show(value)}")
            if isinstance(v, int) and not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise ConfigError(f"{cfg.source}: {key}: must fit in 64 bits (at most {INT64_MAX}), got {_show(value)}")


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


def _check(cfg: Config) -> None:
    """Value ranges, then cross-field checks that types alone cannot express."""
    _check_ranges(cfg)
    src = cfg.source
    _check_paths(cfg)
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
    if cfg.segmenter.stride not in (1, 2):
        raise ConfigError(f"{src}: segmenter.stride: must be 1 or 2, got {cfg.segmenter.stride}")
    if not 0 <= cfg.predict.overlap < 1:
        raise ConfigError(f"{src}: predict.overlap: must be in [0, 1), got {cfg.predict.overlap}")
    from .targets import SCHEMES

    classes = SCHEMES[cfg.tile.target].classes
    for key in ("classifier.class_weights", "segmenter.class_weights"):
        section, attr = key.split(".")
        weights = getattr(getattr(cfg, section), attr)
        if weights is not None and (len(weights) != len(classes) or min(weights) <= 0):
            raise ConfigError(f"{src}: {key}: expected {len(classes)} positive numbers {list(classes)} "
                              f"(tile.target {cfg.tile.target}), got {weights}")
    if cfg.features.per_class <= 0:
        raise ConfigError(f"{src}: features.per_class: must be positive, got {cfg.features.per_class}")


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# what a config may hold: far more than any real config, far less than a hostile one can make YAML build
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB of text
MAX_YAML_DEPTH = 32  # nesting of mappings and lists (a real config nests 4 deep)
MAX_YAML_NODES = 100_000  # values after expanding aliases (a "billion laughs" file expands to 10**9)


def _yaml_shape_problem(root: yaml.Node) -> str | None:
    """Why a composed YAML document is refused (recursive or exploding aliases, deep nesting), or None.

    Aliases share nodes, so the expanded size is counted once per node (memoised); a node met again on its
    own path is a recursive alias."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep")
        key = id(node)
        if key in on_path:
            raise _Refused("an alias refers to itself (recursive structure)")
        if key in sizes:
            return sizes[key]
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            on_path.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            for child in children:
                total += visit(child, depth + 1)
                if total > MAX_YAML_NODES:
                    raise _Refused(f"holds more than {MAX_YAML_NODES} values once its aliases are expanded "
                                   "(an alias bomb?)")
            on_path.discard(key)
        sizes[key] = total
        return total

    try:
        visit(root, 0)
    except _Refused as why:
        return str(why)
    return None


class _Refused(ValueError):
    pass


def _safe_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the safe loader, refusing duplicate keys, alias bombs, recursive
    aliases and deep nesting before any Python object is built; every failure is a one-line ConfigError."""
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _yaml_shape_problem(node)
        if problem is not None:
            raise ConfigError(f"{source}: YAML {problem}")
        return loader.construct_document(node)
    except _DuplicateKey as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.reader.ReaderError as err:  # a control character, a NUL byte
        raise ConfigError(f"{source}: invalid YAML (character #x{err.character:04x} at offset {err.position}: "
                          f"{err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or getattr(err, "context", None)
        why = f" ({' '.join(str(problem).split())[:120]})" if problem else ""
        raise ConfigError(f"{source}: invalid YAML{where}{why}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ConfigError:
        raise
    except ValueError as err:  # e.g. an integer of more than 4300 digits (Python refuses to read it)
        why = "a number of more than 4300 digits" if "digits" in str(err) else " ".join(str(err).split())[:120]
        raise ConfigError(f"{source}: invalid YAML value ({why})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_config_text(path: str | Path, source: str) -> str:
    """The text of a config file: a regular file (not a folder, FIFO or device, which could block or never
    end) of at most MAX_CONFIG_BYTES, in UTF-8 (or UTF-16 with its byte-order mark)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config ({err.strerror or err})") from None
    except ValueError as err:  # a NUL byte in the path
        raise ConfigError(f"{source}: cannot read config ({err})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{source}: is a folder, not a config file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{source}: not a regular file (a FIFO, device or socket); give a YAML file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file is a short YAML text")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not {encoding.upper()} text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), the value parsed as YAML like a file's."""
    if "=" not in text:
        raise ConfigError(f"--set {_show(text, 200)}: expected section.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if any(not k.strip() for k in keys):
        raise ConfigError(f"--set {_show(text, 200)}: expected section.key=value, with no empty part in the key")
    # YAML parsing gives numbers, booleans, null and lists their natural types
    value = _safe_yaml(raw, f"--set {_show(text, 200)}") if raw != "" else ""
    return [k.strip() for k in keys], value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or the defaults when `path` is None) and apply `section.key=value` overrides.

    Every problem, however hostile the file (random bytes, another encoding, an alias bomb, a FIFO), is a
    one-line ConfigError naming the file (or the --set) and the key."""
    source = str(path) if path is not None else "<defaults>"
    if any(not c.isprintable() for c in source):  # a line break or a NUL byte in the path: quoted, escaped
        source = repr(source)
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _safe_yaml(_read_config_text(path, source), source) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level: expected a mapping of sections")
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {_show(text, 200)}: '{k}' is not a section")
        node[keys[-1]] = value
    where = source if not overrides else f"{source} (with --set overrides)"
    try:
        cfg = _build(Config, raw, "", where)
    except RecursionError:  # pragma: no cover - _safe_yaml bounds the depth first
        raise ConfigError(f"{where}: nested too deeply") from None
    cfg.source = where
    cfg.config_file = None if path is None else str(path)
    _check(cfg)
    return cfg


def config_from_dict(values: dict[str, Any], source: str = "<checkpoint>") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = _build(Config, values, "", source)
    cfg.source = source
    return cfg
