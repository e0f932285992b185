"""The trainer of train-segmenter: set-up, the epoch loop, validation, checkpoints and preemption,
resumable bit for bit, single process or DDP.

What makes a resume exact (same final weights as an uninterrupted run, on CPU with
`segmenter.deterministic: true`; `tests/test_resume.py` kills runs at chosen points and compares):

- The patch order and each sample's augmentation are functions of (seed, epoch, position)
  (`footprints.training.data`), so the sampler's state is just a position in the epoch's permutation.
  The loader only reads (whole batches from the memory-mapped patch store, in persistent workers with
  pinned memory on CUDA); the augmentation codes travel with the batch and are applied on the device to
  the whole batch, with the same result as per sample: what a step sees depends on neither the workers
  nor the device.
- The global torch generator (dropout) is reseeded at every step from `(seed, epoch, step, rank)`, so no
  earlier consumer of random numbers (validation, data-loader start-up, a restart) can shift a mask.
  The generators' states are still captured in each checkpoint and restored on resume.
- Model, optimizer, scheduler, AMP scaler, the epoch's running loss sums and the history are saved after
  a completed step, atomically (`footprints.contracts.checkpoints`); loading a checkpoint puts every one
  of them back (`footprints.training.build`).

Data-parallel training (DDP, `footprints.training.distributed`): `segmenter.batch_size` is the GLOBAL batch. Each
global batch is split across ranks by position, and the loss is a sum over the rank's pixels divided by
the all-reduced class-weight total of the whole global batch (times the world size, which DDP's gradient
averaging divides out). The gradient is therefore that of the weighted mean over the global batch, as in
one process, whatever the number of ranks; only float summation order differs. Dropout masks are drawn per
rank, so W ranks and one process agree exactly only with dropout 0.

Whether to start fresh, resume or do nothing is `footprints.training.resume.decide`; `setup` reads the
facts it needs from disk and acts on its answer. `hooks` (a `TrainingHooks`) lets a caller act at chosen
points (tests kill the process there to prove the resume exact); the default does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
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
from ..contracts.checkpoints import TRAINING_FORMAT, capture_rng, load_checkpoint, save_checkpoint
from ..contracts.freshness import file_digest
from ..contracts.manifest import PATCH_COLUMNS, read_manifest
from ..contracts.patches import IGNORE
from ..contracts.paths import RunPaths
from ..errors import Preempted, StageError
from ..model.losses import weighted_ce_sums
from ..model.segmenter import building_and_seed
from .build import build_model
from .data import (
    GlobalBatchSampler,
    HostBuffers,
    PatchDataset,
    derive_seed,
    epoch_permutation,
    make_loader,
    to_device,
)
from .distributed import DistInfo, all_sum, barrier
from .outputs import Overlay, clear_outputs, stage_summary, write_history_curve, write_overlays
from .resume import Action, Facts, LastCheckpoint, decide
from .signals import StopSignals

# the stage's logger: the lines keep the name they had before the trainer left the stage module
log = logging.getLogger("footprints.stages.train_segmenter")


class TrainingHooks:
    """Points where a caller may act during training (tests); every method does nothing by default."""

    def after_step(self, global_step: int) -> None:
        """After an optimizer step, before its checkpoint."""

    def at_validation(self, global_step: int) -> None:
        """At each validation batch."""

    def before_checkpoint_rename(self, global_step: int) -> None:
        """Between writing a checkpoint's temporary file and renaming it."""


def masked_target(mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The target with every pixel of a stand-in sample (`real` 0) set to ignore."""
    keep = real.view(-1, 1, 1).to(torch.bool)
    return torch.where(keep, mask, torch.full_like(mask, IGNORE))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class Trainer:
    """One run of dense training: `setup` (data, resume decision, model), then `run` (the epochs)."""

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
        # last.pt is not read under --overwrite: it is replaced whatever it holds (even unreadable)
        found = None if overwrite or not self.last_path.is_file() else load_checkpoint(self.last_path, kind="training")
        decision = decide(self._facts(overwrite, load_saved_model, found))
        if decision.action is Action.REFUSE:
            raise StageError(decision.message)
        if decision.message:
            log.log(decision.level, decision.message)
        if decision.clear_outputs:  # --overwrite or a stale last.pt: no file of the earlier run may stay
            if self.info.is_main:
                clear_outputs(self.out_dir)
            self.barrier()
        if decision.action is Action.DONE:
            self.history = list(found.get("history", []))
            self.best = dict(found.get("best", self.best))
            return self.summary(status="complete")
        self._build(found if decision.action is Action.RESUME else None)
        return None

    def _facts(self, overwrite: bool, load_saved_model: bool, found: dict[str, Any] | None) -> Facts:
        """What the resume decision depends on: the flags, the output folder and the current inputs."""
        last = None if found is None else LastCheckpoint(int(found["epoch"]), int(found["step"]), found["meta"])
        return Facts(
            overwrite=overwrite, load_saved_model=load_saved_model, out_dir=self.out_dir,
            last_path=self.last_path, last=last, has_best=self.best_path.is_file(),
            has_history=(self.out_dir / "history.json").is_file(), epochs=self.scfg.epochs,
            stride=self.scfg.stride, train_backbone=self.scfg.train_backbone,
            classifier_path=self.paths.classifier_checkpoint, classifier_digest=self.classifier_digest,
        )  # fmt: skip

    @functools.cached_property
    def classifier_digest(self) -> str | None:
        """The classifier checkpoint's file digest (None when there is none), read once per run."""
        clf = self.paths.classifier_checkpoint
        return file_digest(clf) if clf.is_file() else None

    def _build(self, resume: dict[str, Any] | None) -> None:
        built, start = build_model(self.cfg, self.info, self.device, self.paths, self.train_set.rows, resume,
                                   self.classifier_digest)
        self.model, self.net, self.meta = built.model, built.net, built.meta
        self.optimizer, self.scheduler, self.scaler = built.optimizer, built.scheduler, built.scaler
        self.amp_dtype, self.class_weight = built.amp_dtype, built.class_weight
        self.scheme, self.building = built.scheme, built.building
        self.history, self.best, self.global_step = start.history, start.best, start.global_step
        self.start = start

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
        resuming = epoch == self.start.epoch
        position = self.start.position if resuming else 0
        step = self.start.step if resuming else 0
        progress = dict(self.start.progress) if resuming and self.start.progress else {"loss_sum": 0.0, "weight_sum": 0.0}
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
            target = masked_target(mask, real)
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
        self.start.progress = {}
        return {"position": position, "step": step, "trained_steps": len(sampler), **progress}

    @torch.no_grad()
    def validate(self, epoch: int, done: dict[str, Any], label: int | None = None) -> dict[str, Any] | None:
        """Validation loss and pixel metrics over the val split; overlays of the first few patches, named by
        `label` (default epoch + 1; 0 for the converted classifier before any training)."""
        from ..scoring.metrics import confusion, pixel_metrics

        if len(self.val_set) == 0:
            return None
        self.model.eval()
        sums = np.zeros(6)  # loss_sum, weight_sum, tp, fp, fn, tn
        overlays: list[Overlay] = []
        for batch in self.val_loader:
            self.hooks.at_validation(self.global_step)
            if self.any_rank_stopping():
                self.preempt(epoch, done["position"], done["step"], done["progress"])
            x, mask, index, real_d, image = to_device(batch, self.device, self.scfg.channels_last,
                                                      self.val_buffers)
            real = batch[3]
            target = masked_target(mask, real_d)
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
            write_overlays(self.out_dir / "overlays", self.val_set.rows, epoch + 1 if label is None else label,
                           overlays)
        return metrics

    def evaluate_conversion(self) -> None:
        """Validate the model dense training starts from, the exact conversion of the classifier: history entry
        0 and the first best.pt, so that an epoch must beat the classifier to replace it (dense epochs can score
        below the conversion: compare history.json's entry 0 with the later ones)."""
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
            if self.start.epoch == 0 and self.start.position == 0 and not self.history:
                self.evaluate_conversion()
                val = self.history[0]["val"]
                if val:
                    log.info("epoch 0 (the converted classifier): val building IoU %.4f (F1 %.4f)",
                             val["building_iou"], val["f1"])
            for epoch in range(self.start.epoch, scfg.epochs):
                if self.any_rank_stopping():
                    # the signal came before a step started (e.g. while loading): save where we stand
                    first = epoch == self.start.epoch
                    self.preempt(epoch, self.start.position if first else 0, self.start.step if first else 0,
                                 self.start.progress if first else {})  # fmt: skip
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
                    write_history_curve(self.out_dir / "learning_curve.png", self.history)
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

    def summary(self, status: str) -> dict[str, Any]:
        return stage_summary(status, self.out_dir, self.last_path, self.best_path, self.history, self.best)
