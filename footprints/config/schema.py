"""What a config may hold: one small dataclass per stage, every key typed and with its default.

`build` turns a mapping into these dataclasses, `checks` bounds their values, `yaml_source` reads them from
YAML; the package's `__init__` re-exports the public names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and the key."""


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a labelled source with its own `name` (a plain id that prefixes its scene
    ids, `<name>__<scene>`) and `root`; every other key, when set, overrides the `data:` section's value for
    this source's scenes (None = the `data:` value)."""

    name: str = ""
    root: str = ""
    format: Literal["xview2", "geotiff"] | None = None
    subsets: list[str] | None = None
    images_dir: str | None = None
    labels_dir: str | None = None
    label_format: Literal["json", "vector", "mask"] | None = None
    masks_dir: str | None = None
    mask_threshold: int | None = None
    image_glob: str | None = None
    use_post_disaster: bool | None = None
    geotransforms: str | None = None
    max_residual_px: float | None = None
    bands: list[int] | None = None
    stretch_percentiles: list[float] | None = None
    nodata: float | None = None
    label_layer: str | None = None


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
    # several labelled sources in one run (footprints.scenes.sources): each with its own root, format and
    # label options; replaces `root` (a config sets one or the other). Empty: the one source under `root`
    sources: list[SourceConfig] = field(default_factory=list)


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
    # what the models learn per pixel (footprints.scenes.targets): "binary" (background, building), "border"
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
    # fine-tuning: start from this checkpoint's MLP (a train-classifier best.pt, or a train-segmenter
    # best.pt/last.pt whose head converts back exactly) instead of random weights; it must share this run's
    # backbone, layers and classes (footprints.training.finetune). None = train from scratch
    init_from: str | None = None


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
    # lower edges of grids that stopped there (configs/xview2-joplin.md)
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
    # read a scene whose GSD lies outside the model's training scenes' range (5% tolerance) at their median
    # GSD (the checkpoint's `training_gsd`, footprints.contracts.model_gsd); false: at its own GSD
    match_model_gsd: bool = True
    # warn when a scene's domain score (footprints.model.domain: how far its mean shallow hypercolumn lies from
    # the nearest training scene's, in training standard deviations; near 0 for the training scenes) is above
    # this; None: never warn (the score is still recorded). The geometric midpoint of the two groups measured
    # with both Joplin folds' models: 512 px chips of the unseen Joplin scene scored at most 0.115, SpaceNet
    # Rio chips and quarters of the xView2 hurricane-Matthew pair at least 0.217 (ROC AUC 1.0)
    domain_warn: float | None = 0.16


@dataclass
class EvaluateConfig:
    iou_threshold: float = 0.5
    overlays: int = 3


# the parts a building's damage vector can hold (`damage.inputs` joins them with '+'; footprints.model.damage_features)
DAMAGE_PARTS = ("post", "pre", "diff", "absdiff", "stddiff")
PIXEL_PARTS = ("post", "pre", "diff", "absdiff")  # those one pixel has (`damage.classify: pixel`)


def damage_input_parts(inputs: str) -> list[str]:
    """The parts of `damage.inputs` ("diff+absdiff+stddiff" -> three), checked: known, none twice."""
    parts = str(inputs).split("+")
    if any(p not in DAMAGE_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"expected parts of {', '.join(DAMAGE_PARTS)} joined by '+', each once; got {inputs!r}")
    return parts


@dataclass
class DamageConfig:
    """`damage:` a damage grade on every footprint from pre/post-disaster pairs (footprints.damage). The
    section turns the damage stages on (`footprints all` and `cv` run train-damage and damage after predict);
    without it the run has no damage stages."""

    # backbone layers whose hypercolumns are pooled over each building's pixels (a preset name or a list, as
    # backbone.layers; "shallow": conv1_2, conv2_2, conv3_3, 448 channels, the backbone run to conv3_3 only)
    layers: Any = "shallow"
    # what the classifier sees per building, parts of DAMAGE_PARTS joined by '+' (model/damage_features.py): the
    # mean post- and pre-disaster hypercolumns (post, pre), their difference (diff), the mean absolute change of
    # the building's pixels (absdiff), the change of each channel's spread (stddiff); log(area) is always added
    inputs: str = "post+absdiff"
    # what the classifier grades: "pixel" (each sampled pixel's `inputs` from its own hypercolumns, PIXEL_PARTS;
    # a building's grade is its pixels' mean probability: a roof half gone is half voted destroyed) or
    # "building" (one vector per building, `inputs` pooled over its pixels)
    classify: Literal["building", "pixel"] = "pixel"
    # "pixel": each training building's pixels kept in its scene's feature file as training rows (a seeded
    # sample of the pooled ones; the storage per building grows with it, float16)
    train_pixels: int = 32
    pixels_per_building: int = 256  # hypercolumns averaged per building (a seeded sample of its pixels)
    # also pool a ring this many metres wide around each building (debris and fallen walls lie outside the
    # outline); 0: the building's own pixels alone
    context_m: float = 0.0
    block_size: int = 1024  # scene rows/cols run through the backbone at once (plus a halo of context)
    hidden: int = 64
    dropout: float = 0.5
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # weights from the training buildings' grade counts (inverse, its square root, or none)
    class_weighting: Literal["inverse", "sqrt", "none"] = "inverse"
    # the number of epochs is chosen on this many validation folds (whole training scenes when there are that
    # many, else the labelled buildings drawn per grade, seeded), then the model is trained on every training
    # building for that many epochs; 0 or 1: no validation, every epoch run; test scenes are never used
    val_folds: int = 4
    # the damage stage also scores three baselines on the same truth buildings (training/damage.py
    # `baseline_grades`: the majority grade, the model on the pre-disaster scene alone, colour statistics in
    # a random forest), fitted on the model's training buildings
    baselines: bool = True
    device: str = "auto"


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
    damage: DamageConfig | None = None  # None: no damage stages
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

