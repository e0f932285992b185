"""A pre/post pair's buildings as damage-classifier inputs, and footprints graded by a damage model.

Shared by the `train-damage` stage (the labelled buildings of the training scenes), the `damage` stage (the
run's footprints and truth buildings of its test scenes) and `footprints damage` (any footprints on any pair).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DamageConfig, DataConfig
from ..contracts.checkpoints import load_checkpoint
from ..contracts.freshness import file_stamp
from ..contracts.manifest import whole_scene_splits
from ..errors import InputError
from ..model.backbone import VGG16Features, backbone_from_state, features_state, load_backbone, resolve_layers
from ..model.damage_features import (
    POOLED,
    PixelClassifier,
    combine,
    feature_width,
    pixel_rows,
    pooled_hypercolumns,
    rings,
    scene_seed,
)
from ..model.mlp import MLP
from ..scenes.grades import DAMAGE_KEY, GRADES, PROBABILITY_KEYS
from ..scenes.pairs import GradedBuilding, OpenPair, graded_buildings, post_source
from ..scenes.sources import SceneSource, discover_scenes
from ..training.damage import probabilities

log = logging.getLogger(__name__)


def pair_pooled(pair: OpenPair, polygon_sets: Sequence[Sequence[Any]], backbone: VGG16Features,
                layers: Sequence[str], cfg: DamageConfig, seed: int, device: str | torch.device = "cpu",
                keep_pixels: int = 0, pixel_classifier: PixelClassifier | None = None,
                ) -> list[dict[str, np.ndarray]]:
    """`pooled_hypercolumns` of sets of buildings given on the pre scene's pixel grid (`combine` makes the
    vectors; `keep_pixels` and `pixel_classifier` as there), one backbone pass for all of them."""
    pre = pair.pre
    sets = [list(s) for s in polygon_sets]
    if cfg.context_m > 0:  # each set's rings as sets of their own, in the same backbone pass
        sets += [rings(s, cfg.context_m / float(pre.gsd_m or 1.0)) for s in sets]
    pooled = pooled_hypercolumns(backbone, layers, pre.read, pair.post_on_grid.read, sets, pre.width,
                                 pre.height, cfg.pixels_per_building, scene_seed(seed, pre.scene_id),
                                 cfg.block_size, device, gsd_m=pre.gsd_m, keep_pixels=keep_pixels,
                                 pixel_classifier=pixel_classifier)
    n = len(polygon_sets)
    if cfg.context_m > 0:
        for own, ring in zip(pooled[:n], pooled[n:], strict=True):
            own.update({f"ring_{k}": ring[k] for k in POOLED})
    return pooled[:n]


def pre_disaster_scenes(data_cfg: DataConfig, tile_dir: Path, splits: tuple[str, ...]) -> list[SceneSource]:
    """The run's pre-disaster scenes (named `<x>_pre_disaster`) of `splits` of the tile manifest, whole (a scene
    cut into bands by `tile.val_band` once), in discovery order."""
    by_scene = whole_scene_splits(tile_dir)
    return [s for s in discover_scenes(data_cfg) if by_scene.get(s.scene_id) in splits and post_source(s) is not None]


def pair_stamp(pre_src: SceneSource) -> list[Any]:
    """The identity of a pair's four files (`file_stamp`): a changed scene or label redoes what was made of it."""
    post = post_source(pre_src)
    return [file_stamp(p) for p in (pre_src.image, pre_src.label, post.image if post else None,
                                    post.label if post else None)]


def labelled_buildings(pair: OpenPair) -> list[GradedBuilding] | None:
    """The graded buildings of the pair's post label (None: it has no grades)."""
    return graded_buildings(pair.post, pair.pre)


# ---------------------------------------------------------------------------------------------------
# the model


@dataclass
class DamageModel:
    mlp: MLP
    layers: list[str]
    cfg: DamageConfig
    backbone: VGG16Features
    seed: int
    device: torch.device
    checkpoint: dict[str, Any]

    def pooled(self, pair: OpenPair, polygon_sets: Sequence[Sequence[Any]]) -> list[dict[str, np.ndarray]]:
        """`pair_pooled` with this model's layers and settings (a per-pixel model votes as the pixels are read)."""
        voter = self.pixel_probabilities if self.cfg.classify == "pixel" else None
        return pair_pooled(pair, polygon_sets, self.backbone, self.layers, self.cfg, self.seed, self.device,
                           pixel_classifier=voter)

    def pixel_probabilities(self, pre: np.ndarray, post: np.ndarray, outline_m2: np.ndarray) -> np.ndarray:
        """(m, 4) grade probabilities of m pixels (a `damage.classify: pixel` model)."""
        return probabilities(self.mlp, pixel_rows(pre, post, outline_m2, self.cfg.inputs))

    def probabilities(self, pooled: dict[str, np.ndarray]) -> np.ndarray:
        """(n, 4) grade probabilities of pooled buildings (a per-pixel model's: its votes)."""
        if self.cfg.classify == "pixel":
            return pooled["vote"] if "vote" in pooled else np.zeros((len(pooled["pixels"]), len(GRADES)), np.float32)
        return probabilities(self.mlp, combine(pooled, self.cfg.inputs))

    def grade(self, pair: OpenPair, polygons: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, 4), valid pixels (n,)) of buildings on the pre scene's pixel grid."""
        pooled, = self.pooled(pair, [polygons])
        return self.probabilities(pooled), pooled["pixels"]


def damage_checkpoint(mlp: MLP, cfg: DamageConfig, layers: Sequence[str], backbone: dict[str, Any], seed: int,
                      record: dict[str, Any], config: dict[str, Any],
                      backbone_model: VGG16Features | None = None) -> dict[str, Any]:
    """What train-damage saves (`footprints.contracts.checkpoints`: a plain dict, weights_only-loadable). With
    `backbone_model`, the backbone parameters the layers depend on go in too (`features_state`): the
    checkpoint then grades footprints on a machine without the weights file (a laptop after SLURM training)."""
    ckpt = {"model": mlp.state_dict(), "in_channels": int(mlp.in_channels),
            "hidden": int(mlp.hidden), "dropout": float(mlp.dropout_p), "grades": list(GRADES),
            "layers": list(layers), "backbone": dict(backbone), "damage": dataclasses.asdict(cfg), "seed": int(seed),
            "epoch": int(record["epoch"]), "config": config}
    if backbone_model is not None:
        ckpt["backbone_state"] = features_state(backbone_model, layers)
    return ckpt


_MODELS: dict[tuple[str, str], DamageModel] = {}  # one loaded model per process (dask workers grade many scenes)
_BACKBONES: dict[tuple[str, str, str], VGG16Features] = {}


def backbone_for(weights: str, normalization: str, device: str = "cpu") -> VGG16Features:
    """`load_backbone` once per process (a dask worker reads many pairs)."""
    key = (weights, normalization, device)
    if key not in _BACKBONES:
        _BACKBONES.clear()
        _BACKBONES[key] = load_backbone(weights, normalization, device)
    return _BACKBONES[key]


def damage_model_for(path: str | Path, digest: str, device: str = "cpu") -> DamageModel:
    """`load_damage_model` once per process and checkpoint content (`digest`: the file's)."""
    key = (str(path), digest)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_damage_model(path, device)
    return _MODELS[key]


def load_damage_model(path: str | Path, device: str | torch.device = "cpu") -> DamageModel:
    """The damage model of a train-damage checkpoint; a clear error for another kind of checkpoint."""
    ckpt = load_checkpoint(path, kind="damage")
    if list(ckpt["grades"]) != list(GRADES):
        raise InputError(Path(path), f"damage checkpoint of other grades {list(ckpt['grades'])[:6]}")
    known = {f.name for f in dataclasses.fields(DamageConfig)}
    # a later version's keys left out; a checkpoint from before `classify` grades whole buildings
    cfg = DamageConfig(**{"classify": "building", **{k: v for k, v in ckpt["damage"].items() if k in known}})
    layers = resolve_layers(ckpt["layers"])
    if feature_width(layers, cfg.inputs, cfg.context_m > 0 and cfg.classify == "building") != int(ckpt["in_channels"]):
        raise InputError(Path(path), f"damage checkpoint is inconsistent: {ckpt['in_channels']} inputs for layers "
                         f"{layers} and inputs {cfg.inputs!r}")
    mlp = MLP(int(ckpt["in_channels"]), int(ckpt["hidden"]), float(ckpt["dropout"]), num_classes=len(GRADES))
    try:
        mlp.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise InputError(Path(path), "damage checkpoint's weights do not fit its model "
                         f"({str(err).splitlines()[0]})") from None
    device = torch.device(device)
    normalization = ckpt["backbone"]["normalization"]
    if "backbone_state" in ckpt:  # the backbone travels with the model
        backbone = backbone_from_state(ckpt["backbone_state"], layers, normalization, path, device)
    else:  # a checkpoint of an earlier version: the weights file it names
        weights = str(ckpt["backbone"]["weights"])
        if weights not in ("random", "imagenet") and not Path(weights).is_file():
            raise InputError(Path(path), f"the damage model needs the backbone weights it was trained with, "
                             f"{weights}, which are not there")
        backbone = load_backbone(weights, normalization, device)
    return DamageModel(mlp.eval().to(device), layers, cfg, backbone, int(ckpt.get("seed", 0)), device, ckpt)


def graded_columns(prob: np.ndarray, pixels: np.ndarray) -> dict[str, list[Any]]:
    """The properties a graded footprint gains: `damage` (the likeliest grade; None where the building has no
    valid pixel in both scenes) and one probability per grade (4 decimals)."""
    out: dict[str, list[Any]] = {DAMAGE_KEY: [GRADES[int(i)] if p > 0 else None
                                              for i, p in zip(prob.argmax(1) if len(prob) else [], pixels, strict=True)]}
    for k, grade in enumerate(GRADES):
        out[PROBABILITY_KEYS[grade]] = [round(float(v), 4) if p > 0 else None
                                        for v, p in zip(prob[:, k] if len(prob) else [], pixels, strict=True)]
    return out
