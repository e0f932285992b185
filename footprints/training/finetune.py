"""Fine-tuning from a model: the parent checkpoint that train-classifier starts from (`classifier.init_from`).

A parent is a train-classifier `best.pt` (the MLP itself) or a train-segmenter `best.pt`/`last.pt`, whose
head is the MLP as 1x1 convolutions (`DenseHead.from_mlp`): conv weights are the fc weights and the
normaliser's mean/std are buffers beside them, so converting back is exact (a head saved before the
buffers existed has the normaliser folded into conv1, i.e. mean 0 and std 1: the same function).

What the parent fixes. The MLP reads hypercolumns of one backbone (weights and input normalisation), of
given layers, and predicts one class scheme: a run whose features differ in any of these would feed it
other inputs or ask it for other classes, so such a run is refused in one line naming the key and both
values (`check_compatible`). The hidden width is the parent's architecture, refused the same way. The
feature normaliser (the mean/std of the parent's training hypercolumns, inside its state dict) is kept:
fc1 was fit to inputs standardised by those statistics, so the fine-tuned MLP starts as exactly the
parent's function; this run's `stats.npz` only feeds the logistic-regression baseline. A segmenter whose
backbone was trained is refused: the features stage computes hypercolumns with `backbone.weights`, not
with that trained backbone, so its head would read inputs it never saw.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contracts.checkpoints import REQUIRED, load_checkpoint
from ..contracts.freshness import file_digest
from ..errors import FootprintsError, InputError
from ..model.backbone import LAYER_PRESETS, hypercolumn_channels, resolve_layers
from ..model.mlp import mlp_from_checkpoint
from ..scenes.targets import SCHEMES, scheme_for

log = logging.getLogger(__name__)

# the segmenter head's parameters and the MLP's they are (the head's conv weights carry two trailing 1s)
HEAD_TO_MLP = {"conv1": "fc1", "conv2": "fc2", "conv3": "fc3"}


@dataclass(frozen=True)
class Parent:
    """A parent checkpoint, as the MLP it holds and what that MLP reads and predicts."""

    path: Path
    digest: str  # the file's digest (`freshness.file_digest`): its identity in records and freshness keys
    kind: str  # "classifier" or "segmenter"
    state: dict[str, torch.Tensor]  # an MLP state dict: mean, std, fc1..fc3
    layers: list[str]
    backbone: dict[str, str]  # {weights, normalization}
    classes: list[str]
    hidden: int
    in_channels: int

    def record(self) -> dict[str, str]:
        """What a checkpoint and metrics.json record of the parent."""
        return {"path": str(self.path), "digest": self.digest, "kind": self.kind}


def _mlp_state_of_head(state: Mapping[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """The MLP state dict of a segmenter state dict's head (exact: a reshape, no arithmetic)."""
    out: dict[str, torch.Tensor] = {}
    if not isinstance(state, Mapping):
        raise InputError(where, "not a footprints checkpoint (its 'model' is not a mapping)")
    for conv, fc in HEAD_TO_MLP.items():
        for part in ("weight", "bias"):
            t = state.get(f"head.{conv}.{part}")
            if not isinstance(t, torch.Tensor):
                raise InputError(where, f"not a segmenter checkpoint with a dense head (no head.{conv}.{part})")
            out[f"{fc}.{part}"] = t.reshape(t.shape[0], -1) if part == "weight" else t
    c = out["fc1.weight"].shape[1]
    # a head saved before the normaliser buffers existed has it folded into conv1: mean 0 and std 1
    out["mean"] = state.get("head.mean", torch.zeros(c))
    out["std"] = state.get("head.std", torch.ones(c))
    return out


def load_parent(path: str | Path, own: Sequence[Path] = ()) -> Parent:
    """Read a parent checkpoint (classifier or segmenter); every failure is one line naming the file.

    `own`: the folders this run's training writes; a parent inside one is refused, since the run would
    replace its own parent (and a changed parent makes the run stale again: it would never settle)."""
    path = Path(path)
    for folder in own:
        if path.resolve().is_relative_to(Path(folder).resolve()):
            raise InputError(path, f"is inside this run's own {Path(folder).name}/ folder, which the run rewrites; "
                                   "copy it elsewhere, or fine-tune into a run of another name")
    ckpt = load_checkpoint(path, check_finite=True)
    if "meta" in ckpt:
        if not isinstance(ckpt["meta"], Mapping):
            raise InputError(path, "not a footprints checkpoint (its 'meta' is not a mapping)")
        meta = dict(ckpt["meta"])
        if meta.get("train_backbone"):
            raise InputError(path, "its backbone was trained (segmenter.train_backbone: true), but this run's "
                                   "features come from backbone.weights: its head would read other features; "
                                   "fine-tune from its train-classifier best.pt or from a frozen-backbone segmenter")
        kind = "segmenter"
        state = _mlp_state_of_head(ckpt["model"], path)
        layers_spec, backbone = meta.get("layers"), meta.get("backbone") or {}
        classes = meta.get("classes")
    else:
        missing = [k for k in REQUIRED["classifier"] if k not in ckpt]
        if missing:
            raise InputError(path, f"not a classifier or segmenter checkpoint (missing {missing})")
        kind = "classifier"
        state = ckpt["model"]
        layers_spec, backbone, classes = ckpt["layers"], ckpt["backbone"], ckpt.get("classes")
    if not isinstance(backbone, Mapping) or not isinstance(state, Mapping):
        raise InputError(path, "not a footprints checkpoint (its 'backbone' or 'model' is not a mapping)")
    try:
        layers = resolve_layers(layers_spec)
        scheme = scheme_for(classes)
    except (FootprintsError, ValueError, TypeError) as err:
        raise InputError(path, f"unreadable model description ({err})") from None
    w1 = state.get("fc1.weight")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise InputError(path, "the classifier's weights have no fc1 layer")
    hidden, in_channels = int(w1.shape[0]), int(w1.shape[1])
    if in_channels != hypercolumn_channels(layers):
        raise InputError(path, f"the model reads {in_channels} channels, its layers {_layers_text(layers)} give "
                               f"{hypercolumn_channels(layers)}")
    # the same checks and message as every other reader of a classifier (weights that do not fit, wrong shapes)
    mlp = mlp_from_checkpoint({"model": state, "in_channels": in_channels, "hidden": hidden, "dropout": 0.0}, path)
    if mlp.fc3.out_features != scheme.k:
        raise InputError(path, f"the model predicts {mlp.fc3.out_features} classes, its class list "
                               f"{list(scheme.classes)} has {scheme.k}")
    return Parent(
        path=path, digest=file_digest(path), kind=kind, state={k: v.clone() for k, v in mlp.state_dict().items()},
        layers=layers, classes=list(scheme.classes), hidden=hidden, in_channels=in_channels,
        backbone={"weights": str(backbone.get("weights", "random")),
                  "normalization": str(backbone.get("normalization", "torchvision"))},
    )  # fmt: skip


def _layers_text(layers: Sequence[str]) -> str:
    """A layer list as the config would say it: a preset's name when it is one."""
    for name, preset in LAYER_PRESETS.items():
        if list(preset) == list(layers):
            return repr(name)
    return str(list(layers))


def _scheme_text(classes: Sequence[str]) -> str:
    for name, scheme in SCHEMES.items():
        if list(scheme.classes) == list(classes):
            return repr(name)
    return str(list(classes))


def same_weights(a: str, b: str) -> bool:
    """Two `backbone.weights` values name the same weights: the same string, or the same file (the same
    bytes under two paths count: a checkpoint trained elsewhere names the file where it was trained)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    if not (pa.is_file() and pb.is_file()):
        return False
    return pa.resolve() == pb.resolve() or file_digest(pa) == file_digest(pb)


def check_compatible(parent: Parent, features_meta: Mapping[str, Any], hidden: int) -> None:
    """Refuse, in one line naming the key and both values, a run whose features (backbone weights,
    normalisation, layers, classes) or classifier width differ from the parent's."""
    run_bb = features_meta.get("backbone") or {}
    run_layers = resolve_layers(features_meta.get("layers") or "all")
    run_classes = list(features_meta.get("classes") or SCHEMES["binary"].classes)
    checks = [
        ("backbone.weights", same_weights(str(run_bb.get("weights")), parent.backbone["weights"]),
         repr(run_bb.get("weights")), repr(parent.backbone["weights"])),
        ("backbone.normalization", run_bb.get("normalization") == parent.backbone["normalization"],
         repr(run_bb.get("normalization")), repr(parent.backbone["normalization"])),
        ("backbone.layers", run_layers == parent.layers, _layers_text(run_layers), _layers_text(parent.layers)),
        ("tile.target", run_classes == parent.classes, _scheme_text(run_classes), _scheme_text(parent.classes)),
        ("classifier.hidden", int(hidden) == parent.hidden, str(hidden), str(parent.hidden)),
    ]  # fmt: skip
    for key, same, ours, theirs in checks:
        if not same:
            raise InputError(parent.path, f"the parent model was trained with {key} {theirs}, this run has {ours}: "
                                          f"fine-tuning keeps the parent's; set {key} to {theirs} (classifier.init_from)")


def describe_shift(parent: Parent, mean: np.ndarray, std: np.ndarray) -> str:
    """How far this run's training features sit from the parent's normaliser: the median over channels of
    |mean_run - mean_parent| / std_parent, and of std_run / std_parent (for the log)."""
    pm = parent.state["mean"].double().numpy()
    ps = np.where(parent.state["std"].double().numpy() > 1e-6, parent.state["std"].double().numpy(), 1.0)
    shift = float(np.median(np.abs(np.asarray(mean, float) - pm) / ps))
    scale = float(np.median(np.asarray(std, float) / ps))
    return f"median |mean shift| {shift:.3f} parent std, median std ratio {scale:.3f}"
