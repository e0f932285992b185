"""Stage `train-segmenter`: dense training of the converted MLP, resumable bit for bit, preemption-proof,
single process or DDP.

What makes a resume exact (same final weights as an uninterrupted run, on CPU with
`segmenter.deterministic: true`):

- The patch order and each sample's augmentation are functions of (seed, epoch, position)
  (`footprints.training_data`), so the sampler's state is just a position in the epoch's permutation.
  The loader only reads (whole batches from the memory-mapped patch store, in persistent workers with
  pinned memory on CUDA); the augmentation codes travel with the batch and are applied on the device to
  the whole batch, with the same result as per sample: what a step sees depends on neither the workers
  nor the device.
- The global torch generator (dropout) is reseeded at every step from `(seed, epoch, step, rank)`, so no
  earlier consumer of random numbers (validation, data-loader start-up, a restart) can shift a mask.
  The generators' states are still captured in each checkpoint and restored on resume.
- Model, optimizer, scheduler, AMP scaler, the epoch's running loss sums and the history are saved after
  a completed step, atomically (`footprints.contracts.checkpoints`); loading a checkpoint puts every one
  of them back.

Data-parallel training (DDP, `footprints.distributed`): `segmenter.batch_size` is the GLOBAL batch. Each
global batch is split across ranks by position, and the loss is a sum over the rank's pixels divided by
the all-reduced class-weight total of the whole global batch (times the world size, which DDP's gradient
averaging divides out). The gradient is therefore that of the weighted mean over the global batch, as in
one process, whatever the number of ranks; only float summation order differs. Dropout masks are drawn per
rank, so W ranks and one process agree exactly only with dropout 0.

`hooks` (a `TrainingHooks`) lets a caller act at chosen points (tests kill the process there to prove
the resume exact); the default does nothing.

Long: one class holds the trainer's state machine (set-up, resume, epoch loop, validation, preemption,
checkpoints); its parts share that state and would only pass it around if split.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_json
from ..config import Config
from ..contracts.checkpoints import (
    TRAINING_FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from ..contracts.freshness import file_digest
from ..contracts.manifest import PATCH_COLUMNS, class_pixels, read_manifest
from ..contracts.patches import IGNORE
from ..contracts.paths import RunPaths
from ..device import resolve_device
from ..distributed import DistInfo, all_sum, barrier, dist_from_env, init_distributed, shutdown
from ..errors import InputError, Preempted, StageError
from ..inference import amp_dtype
from ..losses import resolve_class_weights, weighted_ce_sums
from ..plots import write_learning_curve, write_overlay
from ..segmenter import build_segmenter, building_and_seed, scheme_of, segmenter_from_classifier
from ..signals import StopSignals
from ..training_data import (
    GlobalBatchSampler,
    HostBuffers,
    PatchDataset,
    derive_seed,
    epoch_permutation,
    make_loader,
    to_device,
)

log = logging.getLogger(__name__)

# config keys that may change between a run and its resume without making the resume inexact
_RESUME_FREE_KEYS = {"epochs", "checkpoint_every", "num_workers", "device", "overlays", "max_steps_per_epoch"}


class TrainingHooks:
    """Points where a caller may act during training (tests); every method does nothing by default."""

    def after_step(self, global_step: int) -> None:
        """After an optimizer step, before its checkpoint."""

    def at_validation(self, global_step: int) -> None:
        """At each validation batch."""

    def before_checkpoint_rename(self, global_step: int) -> None:
        """Between writing a checkpoint's temporary file and renaming it."""


def _masked_target(mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The target with every pixel of a stand-in sample (`real` 0) set to ignore."""
    keep = real.view(-1, 1, 1).to(torch.bool)
    return torch.where(keep, mask, torch.full_like(mask, IGNORE))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class _Trainer:
    def __init__(self, cfg: Config, info: DistInfo, device: torch.device, stop: StopSignals, hooks: TrainingHooks):
        self.cfg = cfg
        self.scfg = cfg.segmenter
        self.info = info
        self.device = device
        self.paths = RunPaths.of(cfg)
        self.out_dir = self.paths.segmenter
        self.last_path = self.paths.last_checkpoint
        self.best_path = self.paths.best_checkpoint
        self.stop = stop
        self.hooks = hooks
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "score": -math.inf}
        self.amp_dtype: torch.dtype | None = None
        self.scaler: Any = None

    # ----- collectives
    def all_sum(self, values: Sequence[float]) -> list[float]:
        return all_sum(self.info, values, self.device)

    def barrier(self) -> None:
        barrier(self.info)

    def _stop_flag(self) -> float:
        """1.0 when this rank was asked to stop (a signal, or the stop file run.sh writes), for a sum over ranks."""
        return 1.0 if self.stop.signame else 0.0

    def any_rank_stopping(self) -> bool:
        """Whether any rank was asked to stop; a collective: every rank calls it at the same point."""
        return self.all_sum([self._stop_flag()])[0] > 0

    # ----- state
    def state(self, epoch: int, position: int, step: int, progress: dict[str, float]) -> dict[str, Any]:
        return {
            "format": TRAINING_FORMAT,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": epoch,  # completed epochs
            "step": step,  # completed steps within epoch `epoch` (0-based: the one in progress)
            "global_step": self.global_step,
            "sampler": {
                "seed": self.cfg.seed,
                "epoch": epoch,
                "position": position,  # samples of this epoch's permutation already trained on
                "batch_size": self.scfg.batch_size,
                "n_train": len(self.train_set),
                "world_size": self.info.world,
            },
            "progress": dict(progress),
            "rng": capture_rng(),
            "history": list(self.history),
            "best": dict(self.best),
            "config": self.cfg.to_dict(),
            "meta": self.meta,
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        if self.info.is_main:
            save_checkpoint(path, state, before_rename=lambda _tmp: self.hooks.before_checkpoint_rename(self.global_step))

    # ----- set-up
    def setup(self, overwrite: bool, load_saved_model: bool) -> dict[str, Any] | None:
        """Load data, build or restore the model; returns a summary when there is nothing to do."""
        tile_dir = self.paths.tile
        manifest = read_manifest(tile_dir, PATCH_COLUMNS)
        if "labelled" in manifest:
            manifest = manifest[manifest["labelled"]]  # scenes without labels (xView2 test PNGs) teach nothing
        train_rows = manifest[manifest["split"] == "train"]
        val_rows = manifest[manifest["split"] == "val"]
        if len(train_rows) == 0:
            raise StageError(f"{tile_dir / 'manifest.csv'}: no patches in the train split")
        self.train_set = PatchDataset(tile_dir, train_rows, self.scfg.augment, self.cfg.seed)
        self.val_set = PatchDataset(tile_dir, val_rows, False, self.cfg.seed)
        if len(val_rows) == 0:
            log.warning("no validation patches: best.pt is chosen on the training loss instead of val IoU")
        stored = self.train_set.store.stored_fraction
        if stored < 1.0:
            log.warning("%.0f%% of the training patches have no patch store (tiled before it existed): they are "
                        "decoded from GeoTIFF, slower; rerun `footprints tile` to add it", 100 * (1 - stored))
        # one loader per split for the whole run (persistent workers on CUDA); the samplers are reset per epoch
        self.train_sampler = GlobalBatchSampler([], self.scfg.batch_size, 0, 0, 0, self.info)
        self.val_sampler = GlobalBatchSampler(np.arange(len(self.val_set)), self.scfg.batch_size, 0,
                                              len(self.val_set), -1, self.info)
        self.train_loader = make_loader(self.train_set, self.train_sampler, self.device, self.scfg.num_workers)
        self.val_loader = make_loader(self.val_set, self.val_sampler, self.device, self.scfg.num_workers)
        # the batch tensors of each loop, reused step to step on the CPU (a step is done with them first)
        self.train_buffers, self.val_buffers = HostBuffers(), HostBuffers()

        if self.info.is_main:
            # temporary files of checkpoint writes cut short by a SIGKILL
            for stale in self.out_dir.glob(".*.pt.part"):
                stale.unlink(missing_ok=True)
        resume: dict[str, Any] | None = None
        found = None if overwrite or not self.last_path.is_file() else load_checkpoint(self.last_path, kind="training")
        stale = self._stale_because(found["meta"]) if found is not None else ""
        if stale:  # like any stage's output whose inputs changed: made again (resuming it would mix models)
            log.warning("%s: %s; training again from the current classifier%s", self.last_path, stale,
                        " (--load_saved_model cannot continue it)" if load_saved_model else "")
        if overwrite or stale:
            if overwrite and load_saved_model:
                log.info("--overwrite: starting fresh (--load_saved_model is ignored)")
            if self.info.is_main:
                self._clear_outputs()
            self.barrier()
        elif found is not None:
            done = int(found["epoch"]) >= self.scfg.epochs
            if done:
                log.info(
                    "%s: already trained %d epoch(s) (segmenter.epochs = %d): nothing to do "
                    "(--overwrite retrains; raise segmenter.epochs and pass --load_saved_model to go on)",
                    self.last_path, found["epoch"], self.scfg.epochs,
                )  # fmt: skip
                self.history = list(found.get("history", []))
                self.best = dict(found.get("best", self.best))
                return self.summary(status="complete")
            if not load_saved_model:
                raise StageError(
                    f"{self.last_path}: holds a run trained for {found['epoch']} of {self.scfg.epochs} epoch(s)"
                    + (f" and {found['step']} step(s)" if found["step"] else "")
                    + "; pass --load_saved_model to continue it or --overwrite to start again"
                )
            resume = found
        elif self.best_path.is_file() or (self.out_dir / "history.json").is_file():
            # an earlier run's results without its last.pt: starting again would silently replace them
            raise StageError(f"{self.out_dir}: holds the results of an earlier run (best.pt, history.json) but "
                             f"no last.pt to resume from; pass --overwrite to train again")
        elif load_saved_model:
            log.warning("--load_saved_model: no checkpoint at %s; starting fresh", self.last_path)

        self._build(resume)
        return None

    @functools.cached_property
    def classifier_digest(self) -> str | None:
        """The classifier checkpoint's file digest (None when there is none), read once per run."""
        clf = self.paths.classifier_checkpoint
        return file_digest(clf) if clf.is_file() else None

    def _stale_because(self, meta: dict[str, Any]) -> str:
        """Why a checkpoint's model is not the one this config makes ("" when it is): another classifier
        (its file digest, recorded at the conversion; checkpoints from before it are taken as they are), or
        another head stride or backbone training."""
        recorded = meta.get("classifier_digest")
        if recorded is not None and self.classifier_digest is not None and recorded != self.classifier_digest:
            return f"converted from another classifier than {self.paths.classifier_checkpoint}"
        for key, now in (("stride", self.scfg.stride), ("train_backbone", self.scfg.train_backbone)):
            if key in meta and meta[key] != now:
                return f"trained with segmenter.{key} = {meta[key]}, the config says {now}"
        return ""

    def _clear_outputs(self) -> None:
        import shutil

        for name in ("last.pt", "best.pt", "history.json", "metrics.json", "learning_curve.png"):
            (self.out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / "overlays", ignore_errors=True)

    def _class_weights(self, k: int) -> list[float]:
        """The configured weights, or those of the training patches' class pixels (manifest `class_px`)."""
        counts = class_pixels(self.train_set.rows)
        if len(counts) != k:
            raise StageError(f"{self.paths.manifest}: patches labelled with {len(counts)} classes, the classifier "
                             f"has {k}: rerun tile and features with the same tile.target")
        weights, _ = resolve_class_weights(self.scfg.class_weights, counts, self.scfg.class_weighting,
                                           "segmenter.class_weights")
        return [float(w) for w in weights]

    def _warn_if_objective_changes(self, classifier: list[float] | None, dense: list[float]) -> None:
        """Dense training starts from the classifier: with other class weights it optimises another objective
        from the first step and shifts the probabilities (Rio fold 1, classifier `none`, segmenter `sqrt`: the
        epoch chosen on validation had test precision 0.41 and polygon F1 0.055, against 0.181 for the
        conversion). Relative weights are compared, since both come from slightly different pixel counts."""
        if not classifier or self.scfg.epochs == 0 or len(classifier) != len(dense):
            return
        a, b = np.asarray(classifier, float), np.asarray(dense, float)
        if not np.allclose(a / a.mean(), b / b.mean(), rtol=0.2):
            log.warning("segmenter class weights %s differ from the classifier's %s: dense training changes the "
                        "objective the converted model was fit to; set segmenter.class_weighting (now %s) as the "
                        "classifier's", [round(w, 3) for w in dense], [round(w, 3) for w in classifier],
                        self.scfg.class_weighting)

    def _build(self, resume: dict[str, Any] | None) -> None:
        scfg = self.scfg
        if resume is None:
            clf = self.paths.classifier_checkpoint
            if not clf.is_file():
                raise StageError(f"{clf}: not found; run train-classifier first")
            # a random backbone (backbone.weights: random) must come out the same on every rank and rerun
            torch.manual_seed(derive_seed(self.cfg.seed, "init"))
            model, meta = segmenter_from_classifier(clf, scfg.stride, scfg.train_backbone)
            meta = dict(meta)
            meta["classifier_digest"] = self.classifier_digest
            clf_weights = meta["class_weights"]
            meta["class_weights"] = self._class_weights(int(meta["num_classes"]))
            self._warn_if_objective_changes(clf_weights, meta["class_weights"])
            meta["train_backbone"] = bool(scfg.train_backbone)
            meta.setdefault("target_gsd", self.cfg.tile.target_gsd)
            meta.setdefault("tile_size", self.cfg.tile.size)
        else:
            meta = dict(resume["meta"])
            model = build_segmenter(meta, train_backbone=bool(meta.get("train_backbone", False)))
            try:
                model.load_state_dict(resume["model"])
            except RuntimeError as err:
                raise InputError(self.last_path, f"weights do not fit its meta ({str(err).splitlines()[0]})") from None
            self._log_config_changes(resume.get("config", {}))
        self.meta = meta
        self.class_weight = torch.tensor(meta["class_weights"], dtype=torch.float32, device=self.device)
        self.scheme = scheme_of(meta)
        self.building = torch.tensor(self.scheme.building, device=self.device)

        model.to(self.device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and scfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise StageError("the segmenter has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=scfg.lr, weight_decay=scfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=scfg.step_size, gamma=scfg.gamma)
        self.amp_dtype = amp_dtype(self.device, scfg.amp)  # predict's rule: bf16 where the GPU has it, else fp16
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

        self.start_epoch, self.start_position, self.start_step = 0, 0, 0
        self.start_progress: dict[str, float] = {}
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            if self.scaler is not None and resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            restore_rng(resume["rng"])
            self.history = list(resume.get("history", []))
            self.best = dict(resume.get("best", self.best))
            self.global_step = int(resume.get("global_step", 0))
            sampler = resume.get("sampler", {})
            self.start_epoch = int(resume["epoch"])
            self.start_step = int(resume.get("step", 0))
            self.start_position = int(sampler.get("position", 0))
            self.start_progress = dict(resume.get("progress", {}))
            if sampler.get("n_train", len(self.train_set)) != len(self.train_set) and self.start_position:
                log.warning(
                    "the train split changed since the checkpoint (%s -> %d patches): resuming, not exactly",
                    sampler.get("n_train"), len(self.train_set),
                )  # fmt: skip
            log.info(
                "resuming from %s: epoch %d of %d, step %d (global step %d)",
                self.last_path, self.start_epoch + 1, scfg.epochs, self.start_step, self.global_step,
            )  # fmt: skip
        n_trainable = sum(p.numel() for p in params)
        log.info(
            "segmenter: %d trainable parameters (backbone %s), class weights %s, device %s%s",
            n_trainable, "trained" if meta.get("train_backbone") else "frozen",
            [round(w, 4) for w in meta["class_weights"]], self.device,
            f", AMP {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else "",
        )  # fmt: skip

        size = int(meta.get("tile_size") or self.cfg.tile.size)
        model.prepare((size, size), self.device)  # interpolation matrices, outside any traced path
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if on_cuda else None)
        self.model = model
        # what runs the batches: the model, or its torch.compile'd wrapper (same parameters, same state dict)
        self.net = torch.compile(model) if scfg.compile else model

    def _log_config_changes(self, old: dict[str, Any]) -> None:
        old_seg = old.get("segmenter", {})
        changed = {
            k: (old_seg.get(k), v)
            for k, v in self.cfg.to_dict()["segmenter"].items()
            if k in old_seg and old_seg.get(k) != v
        }
        exactness = {k: v for k, v in changed.items() if k not in _RESUME_FREE_KEYS}
        if changed:
            log.info("config changed since the checkpoint: %s", {k: f"{a} -> {b}" for k, (a, b) in changed.items()})
        if exactness:
            log.warning("these changes make the resumed run differ from an uninterrupted one: %s", sorted(exactness))
        if old.get("seed", self.cfg.seed) != self.cfg.seed:
            log.warning("seed changed since the checkpoint (%s -> %s)", old.get("seed"), self.cfg.seed)

    # ----- training
    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def epoch_length(self) -> int:
        n = len(self.train_set)
        cap = self.scfg.max_steps_per_epoch
        return min(n, cap * self.scfg.batch_size) if cap > 0 else n

    def preempt(self, epoch: int, position: int, step: int, progress: dict[str, float], write: bool = True) -> None:
        if write:
            self.save(self.last_path, self.state(epoch, position, step, progress))
        self.barrier()  # no rank may exit (and make srun kill the others) before the checkpoint is on disk
        msg = (
            f"stopped by {self.stop.signame or 'a signal on another rank'} at epoch {epoch + 1}/{self.scfg.epochs}, "
            f"step {step}: checkpoint {self.last_path}; resume with --load_saved_model"
        )
        log.warning(msg)
        raise Preempted(msg)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        scfg = self.scfg
        stop_at = self.epoch_length()
        resuming = epoch == self.start_epoch
        position = self.start_position if resuming else 0
        step = self.start_step if resuming else 0
        progress = dict(self.start_progress) if resuming and self.start_progress else {"loss_sum": 0.0, "weight_sum": 0.0}
        order = epoch_permutation(len(self.train_set), self.cfg.seed, epoch)
        sampler = self.train_sampler.reset(order, position, stop_at, epoch)
        self.model.train()
        from tqdm import tqdm

        bar = tqdm(
            self.train_loader, total=len(sampler), desc=f"epoch {epoch + 1}/{scfg.epochs}", unit="step",
            disable=not self.info.is_main, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )  # fmt: skip
        for batch in bar:
            # dropout masks depend on (seed, epoch, step, rank) only: exact on resume whatever ran before
            torch.manual_seed(derive_seed(self.cfg.seed, "step", epoch, step, self.info.rank))
            x, mask, _index, real, _ = to_device(batch, self.device, scfg.channels_last,
                                                 self.train_buffers)
            target = _masked_target(mask, real)
            with self.autocast():
                logits = self.net(x)
            loss_sum, weight_sum = weighted_ce_sums(logits, target, self.class_weight)
            # the stop flags travel with the step's loss sums: one collective per step
            g_loss, g_weight, g_flag = self.all_sum([loss_sum.detach(), weight_sum.detach(), self._stop_flag()])
            if self.scaler is None and not math.isfinite(g_loss):  # (fp16's scaler skips such steps itself)
                raise StageError(
                    f"train-segmenter: the loss became {g_loss} at epoch {epoch + 1}, step {step + 1}; "
                    f"lower segmenter.lr (now {self.optimizer.param_groups[0]['lr']:.3g}) and resume or retrain"
                )
            loss = loss_sum * (self.info.world / max(g_weight, 1e-12))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            step += 1
            position = min(position + scfg.batch_size, stop_at)
            self.global_step += 1
            progress["loss_sum"] += g_loss
            progress["weight_sum"] += g_weight
            bar.set_postfix(loss=f"{g_loss / max(g_weight, 1e-12):.4f}", refresh=False)
            self.hooks.after_step(self.global_step)
            stop_now = g_flag > 0 or (not self.info.enabled and self.stop.signame is not None)
            if stop_now:
                bar.close()
                self.preempt(epoch, position, step, progress)
            if scfg.checkpoint_every > 0 and self.global_step % scfg.checkpoint_every == 0:
                self.save(self.last_path, self.state(epoch, position, step, progress))
        bar.close()
        self.start_progress = {}
        return {"position": position, "step": step, "trained_steps": len(sampler), **progress}

    @torch.no_grad()
    def validate(self, epoch: int, done: dict[str, Any], label: int | None = None) -> dict[str, Any] | None:
        """Validation loss and pixel metrics over the val split; overlays of the first few patches, named by
        `label` (default epoch + 1; 0 for the converted classifier before any training)."""
        from ..metrics import confusion, pixel_metrics

        if len(self.val_set) == 0:
            return None
        self.model.eval()
        sums = np.zeros(6)  # loss_sum, weight_sum, tp, fp, fn, tn
        overlays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for batch in self.val_loader:
            self.hooks.at_validation(self.global_step)
            if self.any_rank_stopping():
                self.preempt(epoch, done["position"], done["step"], done["progress"])
            x, mask, index, real_d, image = to_device(batch, self.device, self.scfg.channels_last,
                                                      self.val_buffers)
            real = batch[3]
            target = _masked_target(mask, real_d)
            with self.autocast():
                logits = self.net(x)
            loss_sum, weight_sum = weighted_ce_sums(logits, target, self.class_weight)
            # building pixels: the building classes' probabilities sum to 0.5 or more (predict's rule)
            pred = (building_and_seed(logits, self.scheme)[:, 0] >= 0.5).long()
            truth = torch.where(target == IGNORE, target, torch.isin(target, self.building).long())
            keep = real_d.bool()
            tp, fp, fn, tn = confusion(pred[keep], truth[keep], ignore=IGNORE) if keep.any() else (0, 0, 0, 0)
            sums += [float(loss_sum), float(weight_sum), tp, fp, fn, tn]
            if self.info.is_main and len(overlays) < self.scfg.overlays:
                for i in range(image.shape[0]):
                    if real[i] and len(overlays) < self.scfg.overlays:
                        overlays.append((int(index[i]), image[i].numpy(), truth[i].cpu().numpy(),
                                         pred[i].cpu().numpy()))
        loss_sum, weight_sum, tp, fp, fn, tn = self.all_sum(sums.tolist())
        metrics = pixel_metrics(tp, fp, fn, tn)
        metrics["loss"] = loss_sum / max(weight_sum, 1e-12)
        if self.info.is_main:
            self._write_overlays(epoch + 1 if label is None else label, overlays)
        return metrics

    def _write_overlays(self, label: int, overlays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        folder = self.out_dir / "overlays"
        for index, image, truth, pred in overlays:
            patch_id = str(self.val_set.rows.iloc[index].get("patch_id", index))
            title = f"epoch {label}  {patch_id}  image | truth | prediction"
            write_overlay(folder / f"epoch{label:03d}_{patch_id}.png", image, truth, pred, title,
                          ignore=truth == IGNORE)

    def evaluate_conversion(self) -> None:
        """Validate the model dense training starts from, the exact conversion of the classifier: history entry
        0 and the first best.pt, so that an epoch must beat the classifier to replace it (on Joplin, 3 dense
        epochs on the CPU gave val building IoU 0.575 against the conversion's 0.595, and a lower test F1)."""
        val = self.validate(0, {"position": 0, "step": 0, "progress": {}}, label=0)
        entry = {"epoch": 0, "train_loss": None, "val_loss": val["loss"] if val else None,
                 "val": {k: v for k, v in val.items() if k != "loss"} if val else None}
        self.history = [entry]
        if val is None and self.scfg.epochs > 0:
            return  # no validation: best.pt is chosen on the training loss, which the conversion has none of
        self.best = {"epoch": 0, "score": val["building_iou"] if val else 0.0}
        if self.info.is_main:
            state = self.state(0, 0, 0, {})
            write_json(self.out_dir / "history.json", self.history)
            write_json(self.out_dir / "metrics.json", {"best_epoch": 0, **entry})
            self.save(self.best_path, state)
            if self.scfg.epochs == 0:
                self.save(self.last_path, state)
        self.barrier()

    def run(self) -> dict[str, Any]:
        scfg = self.scfg
        if scfg.epochs == 0:
            # the exact 1x1-conv conversion of the classifier, without dense training: still a checkpoint
            # predict can use (and its validation metrics)
            log.info("segmenter.epochs is 0: best.pt is the exact conversion of the classifier, not trained "
                     "densely")
            self.evaluate_conversion()
            return self.summary(status="converted")
        with self.stop:
            if self.start_epoch == 0 and self.start_position == 0 and not self.history:
                self.evaluate_conversion()
                val = self.history[0]["val"]
                if val:
                    log.info("epoch 0 (the converted classifier): val building IoU %.4f (F1 %.4f)",
                             val["building_iou"], val["f1"])
            for epoch in range(self.start_epoch, scfg.epochs):
                if self.any_rank_stopping():
                    # the signal came before a step started (e.g. while loading): save where we stand
                    first = epoch == self.start_epoch
                    self.preempt(epoch, self.start_position if first else 0, self.start_step if first else 0,
                                 self.start_progress if first else {})  # fmt: skip
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                done = self.train_epoch(epoch)
                train_seconds = time.perf_counter() - t0
                progress = {"loss_sum": done["loss_sum"], "weight_sum": done["weight_sum"]}
                done["progress"] = progress
                val = self.validate(epoch, done)
                self.scheduler.step()
                train_loss = done["loss_sum"] / max(done["weight_sum"], 1e-12)
                entry = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "val_loss": val["loss"] if val else None,
                    "val": {k: v for k, v in val.items() if k != "loss"} if val else None,
                    "lr": lr,
                    "steps": done["step"],
                    "global_step": self.global_step,
                    "seconds": time.perf_counter() - t0,
                }
                # training throughput of this process's steps (validation and checkpoints not counted)
                entry["patches_per_s"] = done["trained_steps"] * scfg.batch_size / max(train_seconds, 1e-9)
                self.history.append(entry)
                score = val["building_iou"] if val else -train_loss
                improved = score > self.best["score"]
                if improved:
                    self.best = {"epoch": epoch + 1, "score": score}
                log.info(
                    "epoch %d/%d: train loss %.4f%s, lr %.3g, %d steps, %.1f s (training %.3g patches/s)%s",
                    epoch + 1, scfg.epochs, train_loss,
                    f", val loss {val['loss']:.4f}, val building IoU {val['building_iou']:.4f} "
                    f"(F1 {val['f1']:.4f}, mean IU {val['mean_iu']:.4f})" if val else "",
                    lr, done["step"], entry["seconds"], entry["patches_per_s"], "  * best" if improved else "",
                )  # fmt: skip
                state = self.state(epoch + 1, 0, 0, {})
                if self.info.is_main:
                    write_json(self.out_dir / "history.json", self.history)
                    self._write_learning_curve()
                    if improved:
                        write_json(self.out_dir / "metrics.json", {"best_epoch": epoch + 1, **entry})
                        # best before last: a kill in between re-runs this epoch's end and rewrites both
                        self.save(self.best_path, state)
                    self.save(self.last_path, state)
                self.barrier()
                # a signal during the epoch's end: last.pt above is already the state to resume from
                if self.any_rank_stopping() and epoch + 1 < scfg.epochs:
                    self.preempt(epoch + 1, 0, 0, {}, write=False)
        return self.summary(status="trained")

    def _write_learning_curve(self) -> None:
        h = self.history
        write_learning_curve(
            self.out_dir / "learning_curve.png", [e["epoch"] for e in h],
            {"train": [e["train_loss"] for e in h], "validation": [e.get("val_loss") for e in h]},
            {"validation building IoU": [(e.get("val") or {}).get("building_iou") for e in h]},
            "class-weighted cross entropy", "building IoU", "train-segmenter learning curve",
        )  # fmt: skip

    def summary(self, status: str) -> dict[str, Any]:
        best_entry = next((h for h in self.history if h["epoch"] == self.best.get("epoch")), None)
        return {
            "status": status,
            "last": str(self.last_path),
            "best": str(self.best_path),
            "epochs": self.history[-1]["epoch"] if self.history else 0,  # trained (entry 0: the conversion)
            "best_epoch": self.best.get("epoch"),
            "best_val_building_iou": ((best_entry or {}).get("val") or {}).get("building_iou"),
            "history": str(self.out_dir / "history.json"),
            "learning_curve": str(self.out_dir / "learning_curve.png"),
        }


def _set_deterministic(mode: bool, warn_only: bool = False) -> None:
    """torch.use_deterministic_algorithms without its import of torch._inductor (seconds of start-up,
    for torch.compile's settings, which this trainer does not use) unless that is loaded already."""
    if "torch._inductor" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def run(cfg: Config, overwrite: bool = False, load_saved_model: bool = False, stop: StopSignals | None = None,
        hooks: TrainingHooks | None = None) -> dict[str, Any]:
    """The train-segmenter stage: dense training of the converted MLP, resumable and preemption-safe.

    `stop`: signal handlers the caller installed early (before importing torch: `footprints.runner` does);
    a new set otherwise. `hooks`: see `TrainingHooks`.
    """
    stop = stop if stop is not None else StopSignals()
    hooks = hooks if hooks is not None else TrainingHooks()
    info = dist_from_env()
    device = resolve_device(cfg.segmenter.device, info.local_rank, key="segmenter.device")
    pkg_log = logging.getLogger("footprints")
    old_level = pkg_log.level
    if not info.is_main:
        pkg_log.setLevel(logging.WARNING)  # one rank logs; the others only warn
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.segmenter.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA's NLL-loss and bilinear backward have no deterministic kernels: warn there, exact on CPU
        _set_deterministic(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if info.enabled:
        init_distributed(info, device)
    completed = False
    try:
        with stop:
            trainer = _Trainer(cfg, info, device, stop, hooks)
            done = trainer.setup(overwrite, load_saved_model)
            result = done if done is not None else trainer.run()
            completed = True
            return result
    finally:
        _set_deterministic(was_deterministic, warn_only=was_warn_only)
        pkg_log.setLevel(old_level)
        shutdown(info, completed)
