"""What dense training starts from: the segmenter converted from the classifier, or last.pt restored.

`build_model` makes the model, optimizer, scheduler and AMP scaler, either fresh (the exact 1x1-conv
conversion of the classifier, its meta completed with the class weights of the training patches, the
classifier's file digest, its out-of-domain reference and, for a fine-tuned classifier, its `parent`) or
from a checkpoint (every state put back, random generators included), and returns where the epoch loop
starts. The order of its steps is part of exactness: the generators are restored after the optimizer exists
and before anything else draws from them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..contracts.checkpoints import load_checkpoint, restore_rng
from ..contracts.manifest import class_pixels
from ..contracts.model_gsd import TRAINING_GSD, training_gsd
from ..contracts.paths import RunPaths
from ..errors import InputError, StageError
from ..model.domain import REFERENCE_KEY
from ..model.losses import resolve_class_weights
from ..model.segmenter import build_segmenter, scheme_of, segmenter_from_classifier
from ..polygons.inference import amp_dtype
from .data import derive_seed
from .distributed import DistInfo

# the stage's logger: the lines keep the name they had before the trainer left the stage module
log = logging.getLogger("footprints.stages.train_segmenter")

# config keys that may change between a run and its resume without making the resume inexact
RESUME_FREE_KEYS = {"epochs", "checkpoint_every", "num_workers", "device", "overlays", "max_steps_per_epoch"}


@dataclass
class Built:
    """The model being trained and what updates it."""

    model: nn.Module  # wrapped in DistributedDataParallel when distributed
    net: nn.Module  # what runs the batches: the model, or its torch.compile'd wrapper (same state dict)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler under fp16 autocast, else None
    amp_dtype: torch.dtype | None
    meta: dict[str, Any]  # the checkpoint's model description
    class_weight: torch.Tensor
    scheme: Any  # the label scheme (`footprints.model.segmenter.scheme_of`)
    building: torch.Tensor  # the building classes' indices


@dataclass
class StartPoint:
    """Where the epoch loop starts: epoch 0 for a fresh model, else where the checkpoint stopped."""

    epoch: int = 0  # completed epochs
    position: int = 0  # samples of this epoch's permutation already trained on
    step: int = 0  # completed steps within `epoch`
    progress: dict[str, float] = field(default_factory=dict)  # the epoch's running loss sums
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "score": -math.inf})


def class_weights(cfg: Config, paths: RunPaths, train_rows: Any, k: int) -> list[float]:
    """The configured weights, or those of the training patches' class pixels (manifest `class_px`)."""
    counts = class_pixels(train_rows)
    if len(counts) != k:
        raise StageError(f"{paths.manifest}: patches labelled with {len(counts)} classes, the classifier "
                         f"has {k}: rerun tile and features with the same tile.target")
    scfg = cfg.segmenter
    weights, _ = resolve_class_weights(scfg.class_weights, counts, scfg.class_weighting, "segmenter.class_weights")
    return [float(w) for w in weights]


def warn_if_objective_changes(cfg: Config, classifier: list[float] | None, dense: list[float]) -> None:
    """Dense training starts from the classifier: with other class weights it optimises another objective
    from the first step and shifts the probabilities (measure it by training a segmenter with another
    `segmenter.class_weighting` than the classifier's and comparing the test metrics of the epoch chosen on
    validation with those of the conversion, `segmenter.epochs: 0`). Relative weights are compared, since
    both come from slightly different pixel counts."""
    scfg = cfg.segmenter
    if not classifier or scfg.epochs == 0 or len(classifier) != len(dense):
        return
    a, b = np.asarray(classifier, float), np.asarray(dense, float)
    if not np.allclose(a / a.mean(), b / b.mean(), rtol=0.2):
        log.warning("segmenter class weights %s differ from the classifier's %s: dense training changes the "
                    "objective the converted model was fit to; set segmenter.class_weighting (now %s) as the "
                    "classifier's", [round(w, 3) for w in dense], [round(w, 3) for w in classifier],
                    scfg.class_weighting)


def log_config_changes(cfg: Config, old: dict[str, Any]) -> None:
    """Say which settings changed since the checkpoint, and warn of those that make a resume inexact."""
    old_seg = old.get("segmenter", {})
    changed = {
        k: (old_seg.get(k), v)
        for k, v in cfg.to_dict()["segmenter"].items()
        if k in old_seg and old_seg.get(k) != v
    }
    exactness = {k: v for k, v in changed.items() if k not in RESUME_FREE_KEYS}
    if changed:
        log.info("config changed since the checkpoint: %s", {k: f"{a} -> {b}" for k, (a, b) in changed.items()})
    if exactness:
        log.warning("these changes make the resumed run differ from an uninterrupted one: %s", sorted(exactness))
    if old.get("seed", cfg.seed) != cfg.seed:
        log.warning("seed changed since the checkpoint (%s -> %s)", old.get("seed"), cfg.seed)


def carry_domain_reference(meta: dict[str, Any], reference: Any, train_backbone: bool) -> None:
    """The classifier's out-of-domain reference (`footprints.training.domain_reference`) into the segmenter's
    meta, for predict; not for a segmenter that trains its backbone, whose features then drift from those
    the reference describes (predict gives its scenes no score rather than a wrong one)."""
    if reference is None:
        return
    if train_backbone:
        log.info("segmenter.train_backbone: the classifier's out-of-domain reference describes the frozen "
                 "backbone's features; predict gives this model's scenes no domain score")
        return
    meta[REFERENCE_KEY] = reference


def build_model(cfg: Config, info: DistInfo, device: torch.device, paths: RunPaths, train_rows: Any,
                resume: dict[str, Any] | None, classifier_digest: str | None) -> tuple[Built, StartPoint]:
    """The model to train and where to start: converted from the classifier (`resume` None) or restored
    from the training checkpoint `resume` (last.pt's contents)."""
    scfg = cfg.segmenter
    last_path = paths.last_checkpoint
    if resume is None:
        clf = paths.classifier_checkpoint
        if not clf.is_file():
            raise StageError(f"{clf}: not found; run train-classifier first")
        # a random backbone (backbone.weights: random) must come out the same on every rank and rerun
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        clf_state = load_checkpoint(clf, kind="classifier", mmap=True)  # read once: conversion and meta
        model, meta = segmenter_from_classifier(clf_state, scfg.stride, scfg.train_backbone, where=clf)
        meta = dict(meta)
        meta["classifier_digest"] = classifier_digest
        # a fine-tuned classifier's parent (classifier.init_from) is the segmenter's ancestor too
        parent = clf_state.get("parent")
        if parent:
            meta["parent"] = dict(parent)
        carry_domain_reference(meta, clf_state.get(REFERENCE_KEY), scfg.train_backbone)
        clf_weights = meta["class_weights"]
        meta["class_weights"] = class_weights(cfg, paths, train_rows, int(meta["num_classes"]))
        warn_if_objective_changes(cfg, clf_weights, meta["class_weights"])
        meta["train_backbone"] = bool(scfg.train_backbone)
        meta.setdefault("target_gsd", cfg.tile.target_gsd)
        meta.setdefault("tile_size", cfg.tile.size)
        # the GSD of this run's training scenes (footprints.contracts.model_gsd), as the classifier records it
        meta[TRAINING_GSD] = training_gsd(paths.tile)
    else:
        meta = dict(resume["meta"])
        model = build_segmenter(meta, train_backbone=bool(meta.get("train_backbone", False)))
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as err:
            raise InputError(last_path, f"weights do not fit its meta ({str(err).splitlines()[0]})") from None
        log_config_changes(cfg, resume.get("config", {}))
    class_weight = torch.tensor(meta["class_weights"], dtype=torch.float32, device=device)
    scheme = scheme_of(meta)
    building = torch.tensor(scheme.building, device=device)

    model.to(device)
    on_cuda = device.type == "cuda"
    if on_cuda and scfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise StageError("the segmenter has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=scfg.lr, weight_decay=scfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=scfg.step_size, gamma=scfg.gamma)
    dtype = amp_dtype(device, scfg.amp)  # predict's rule: bf16 where the GPU has it, else fp16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start = StartPoint()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        restore_rng(resume["rng"])
        sampler = resume.get("sampler", {})
        start = StartPoint(
            epoch=int(resume["epoch"]),
            position=int(sampler.get("position", 0)),
            step=int(resume.get("step", 0)),
            progress=dict(resume.get("progress", {})),
            global_step=int(resume.get("global_step", 0)),
            history=list(resume.get("history", [])),
            best=dict(resume.get("best", start.best)),
        )  # fmt: skip
        if sampler.get("n_train", len(train_rows)) != len(train_rows) and start.position:
            log.warning(
                "the train split changed since the checkpoint (%s -> %d patches): resuming, not exactly",
                sampler.get("n_train"), len(train_rows),
            )  # fmt: skip
        log.info(
            "resuming from %s: epoch %d of %d, step %d (global step %d)",
            last_path, start.epoch + 1, scfg.epochs, start.step, start.global_step,
        )  # fmt: skip
    n_trainable = sum(p.numel() for p in params)
    log.info(
        "segmenter: %d trainable parameters (backbone %s), class weights %s, device %s%s",
        n_trainable, "trained" if meta.get("train_backbone") else "frozen",
        [round(w, 4) for w in meta["class_weights"]], device,
        f", AMP {str(dtype).removeprefix('torch.')}" if dtype else "",
    )  # fmt: skip

    size = int(meta.get("tile_size") or cfg.tile.size)
    model.prepare((size, size), device)  # interpolation matrices, outside any traced path
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    net = torch.compile(model) if scfg.compile else model
    return Built(model, net, optimizer, scheduler, scaler, dtype, meta, class_weight, scheme, building), start
