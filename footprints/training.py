"""Dense training of the segmenter: resumable bit for bit, preemption-proof, single process or DDP.

What makes a resume exact (same final weights as an uninterrupted run, on CPU with
`segmenter.deterministic: true`):

- The order of the training patches in epoch `e` is a permutation drawn from a generator seeded with
  `(seed, e)`, so the sampler's state is just a position in that permutation (`sampler.position`).
- Each sample's augmentation (one of the 8 flips/rotations) is drawn from a generator seeded with
  `(seed, epoch, position)`: independent of batch layout, worker processes and ranks.
- The global torch generator (dropout) is reseeded at every step from `(seed, epoch, step, rank)`, so no
  earlier consumer of random numbers (validation, data-loader start-up, a restart) can shift a mask.
  The generators' states are still captured in each checkpoint and restored on resume.
- Model, optimizer, scheduler, AMP scaler, the epoch's running loss sums and the history are saved after
  a completed step, atomically; loading a checkpoint puts every one of them back.

Data-parallel training (DDP): `segmenter.batch_size` is the GLOBAL batch. Each global batch of the
permutation is split across ranks by position (rank r takes positions r, r+W, ...), and the loss is a sum
over the rank's pixels divided by the all-reduced class-weight total of the whole global batch (times the
world size, which DDP's gradient averaging divides out). The gradient is therefore that of the weighted
mean over the global batch, as in one process, whatever the number of ranks; only float summation order
differs. Dropout masks are drawn per rank, so W ranks and one process agree exactly only with dropout 0.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import re
import signal
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_io
from .atomic import atomic_path, write_json
from .config import Config
from .device import resolve_device
from .errors import FootprintsError, InputError, Preempted, StageError
from .signals import StopSignals

log = logging.getLogger(__name__)

STAGE = "train-segmenter"
IGNORE_INDEX = 255
CHECKPOINT_FORMAT = "footprints-segmenter-v1"
# test hook: "STEP:SIGNAME[:WHERE]" makes the process send itself SIGNAME once its global step count
# reaches STEP, WHERE being "step" (after the optimizer step, before its checkpoint), "checkpoint"
# (between writing the temporary file and renaming it) or "validation" (at a validation batch)
DEBUG_SIGNAL_ENV = "FOOTPRINTS_TEST_SIGNAL"
# config keys that may change between a run and its resume without making the resume inexact
_RESUME_FREE_KEYS = {"epochs", "checkpoint_every", "num_workers", "device", "overlays", "max_steps_per_epoch"}


# ---------------------------------------------------------------------------------------------------
# seeds


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from `parts` (ints or strings), the same in every process and on every platform."""
    ints = [int(p) % 2**32 if not isinstance(p, str) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the `n` training patches in `epoch` (0-based): a function of (seed, epoch) only."""
    return np.random.default_rng(derive_seed(seed, "permutation", epoch)).permutation(n)


def augment_code(seed: int, epoch: int, position: int) -> int:
    """Which of the 8 dihedral transforms the sample at `position` of `epoch` gets (0 = identity)."""
    return int(np.random.default_rng(derive_seed(seed, "augment", epoch, position)).integers(8))


def apply_augment(image: np.ndarray, mask: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by `code % 4` quarter turns, then mirror left-right if `code >= 4`; same on image and mask."""
    k = code % 4
    if image.shape[-1] != image.shape[-2] and k % 2:
        k = 2  # a quarter turn would change the shape of a non-square patch; a half turn keeps it
    if k:
        image = np.rot90(image, k, axes=(-2, -1))
        mask = np.rot90(mask, k, axes=(-2, -1))
    if code >= 4:
        image = image[..., ::-1]
        mask = mask[..., ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ---------------------------------------------------------------------------------------------------
# distributed set-up


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a data-parallel job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env(env: dict[str, str] | None = None) -> DistInfo:
    """Rank and world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, ...).

    Inside an sbatch script the batch shell itself is one process even when the job has several tasks;
    only `srun` starts one process per task (and sets SLURM_STEP_NUM_TASKS), so the SLURM world size is
    read from the step, not from the job's SLURM_NTASKS.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world > 1:
            return DistInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), "slurm")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NUM_TASKS" not in env:
        log.warning(
            "SLURM_NTASKS=%s but this process was not started by srun: training in one process "
            "(run.sh starts one process per task with srun)",
            env["SLURM_NTASKS"],
        )
    return DistInfo()


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as `gpu[03-05,07],cpu1` -> `gpu03`."""
    first = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist.strip())
    if not first:
        raise FootprintsError(f"cannot parse SLURM node list {nodelist!r}")
    text = first.group(0)
    if "[" not in text:
        return text
    prefix, ranges = text.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def rendezvous(env: dict[str, str] | None = None) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT: from the environment, else derived from the SLURM job, else local."""
    env = dict(os.environ) if env is None else env
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        addr = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    port = env.get("MASTER_PORT")
    if not port:
        job = env.get("SLURM_JOB_ID")
        # a port per job, so that two jobs sharing a node do not meet at the same address
        port = str(15000 + int(job) % 20000) if job and job.isdigit() else "29500"
    return addr, port


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    addr, port = rendezvous()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # W processes on one CPU each taking every core would thrash: share the cores (or the task's CPUs)
        per_task = os.environ.get("SLURM_CPUS_PER_TASK")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or info.world)
        threads = int(per_task) if per_task and per_task.isdigit() else (os.cpu_count() or 1) // max(1, local_world)
        torch.set_num_threads(max(1, threads))
    log.info("DDP: rank %d of %d (%s, %s) via %s:%s", info.rank, info.world, info.source, backend, addr, port)
    dist.init_process_group(
        backend, init_method="env://", rank=info.rank, world_size=info.world, timeout=datetime.timedelta(minutes=30)
    )


# ---------------------------------------------------------------------------------------------------
# data


class PatchDataset(torch.utils.data.Dataset):
    """Patches of one split; an item key is `(row index, epoch, position, real)`.

    `position` seeds the augmentation; `real` is 0 for the stand-in item a rank receives when a short
    last batch has nothing left for it (it runs forward/backward to keep DDP in step, with no weight).
    """

    def __init__(self, tile_dir: str | Path, rows: Any, augment: bool, seed: int):
        self.tile_dir = Path(tile_dir)
        self.rows = rows.reset_index(drop=True)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        from .tiling import load_patch

        index, epoch, position, real = key
        image, mask = load_patch(self.tile_dir, self.rows.iloc[index])
        if self.augment:
            image, mask = apply_augment(image, mask, augment_code(self.seed, epoch, position))
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask)), index, real


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of `order[start:stop]`, as PatchDataset keys."""

    def __init__(self, order: Sequence[int], batch_size: int, start: int, stop: int, epoch: int, info: DistInfo):
        self.order = np.asarray(order)
        self.batch_size = batch_size
        self.start, self.stop, self.epoch, self.info = start, stop, epoch, info

    def __len__(self) -> int:
        return max(0, math.ceil((self.stop - self.start) / self.batch_size))

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        for pos in range(self.start, self.stop, self.batch_size):
            positions = list(range(pos, min(pos + self.batch_size, self.stop)))
            mine = positions[self.info.rank :: self.info.world]
            if mine:
                yield [(int(self.order[p]), self.epoch, p, 1) for p in mine]
            else:
                yield [(int(self.order[positions[0]]), self.epoch, positions[0], 0)]


def _loader(dataset: PatchDataset, sampler: GlobalBatchSampler, device: torch.device, workers: int) -> Any:
    on_cuda = device.type == "cuda"
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers if on_cuda else 0,
        pin_memory=on_cuda,
        # an own generator: the loader's start-up draw must not touch the global one
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )


# ---------------------------------------------------------------------------------------------------
# loss, signals


def weighted_ce_sums(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of class-weighted cross entropy, sum of the weights) over the labelled pixels of real samples.

    `sum / weights` is exactly `F.cross_entropy(..., weight, ignore_index=255)` (mean reduction); keeping
    the two apart lets DDP divide by the whole global batch's weight total.
    """
    keep = real.view(-1, 1, 1).to(torch.bool)
    target = torch.where(keep, target, torch.full_like(target, IGNORE_INDEX))
    loss_sum = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = target != IGNORE_INDEX
    weight_sum = weight[torch.where(valid, target, torch.zeros_like(target))][valid].sum()
    return loss_sum, weight_sum


class _DebugSignal:
    """The FOOTPRINTS_TEST_SIGNAL hook (tests only): a deterministic self-signal at a chosen point."""

    def __init__(self, spec: str | None):
        self.step = -1
        if not spec:
            return
        parts = spec.split(":")
        self.step = int(parts[0])
        self.sig = getattr(signal, parts[1] if parts[1].startswith("SIG") else "SIG" + parts[1])
        self.where = parts[2] if len(parts) > 2 else "step"
        self.fired = False

    def maybe(self, where: str, global_step: int) -> None:
        if self.step >= 0 and not self.fired and where == self.where and global_step >= self.step:
            self.fired = True
            log.warning("test hook: sending %s to myself at %s, global step %d", self.sig.name, where, global_step)
            os.kill(os.getpid(), self.sig)

    def arm_checkpoint(self, get_step: Any) -> None:
        if self.step >= 0 and self.where == "checkpoint":
            ckpt_io._before_rename_hook = lambda _tmp: self.maybe("checkpoint", get_step())


# ---------------------------------------------------------------------------------------------------
# plots


def write_learning_curve(path: Path, history: list[dict[str, Any]]) -> None:
    """Train/val loss and val building IoU per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax1.plot(epochs, [h.get("val_loss") for h in history], "o-", label="validation")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("class-weighted cross entropy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if any(h.get("val") for h in history):
        ax2.plot(epochs, [(h.get("val") or {}).get("building_iou") for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation building IoU")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    fig.suptitle("train-segmenter learning curve")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def write_overlay(path: Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str) -> None:
    """Three panels side by side: the image, the truth (grey = ignored) and the prediction (white)."""
    from PIL import Image, ImageDraw

    rgb = np.transpose(image, (1, 2, 0)).astype(np.uint8)
    t = np.where(truth == IGNORE_INDEX, 96, np.where(truth == 1, 255, 0)).astype(np.uint8)
    p = np.where(pred == 1, 255, 0).astype(np.uint8)
    h, w = truth.shape
    scale = max(1, 256 // max(h, w, 1))  # small test patches are enlarged so that they can be seen
    panels = [Image.fromarray(a).resize((w * scale, h * scale), Image.NEAREST) for a in (rgb, t, p)]
    gap, bar = 4, 14
    img = Image.new("RGB", (3 * w * scale + 2 * gap, h * scale + bar), (40, 40, 40))
    for k, panel in enumerate(panels):
        img.paste(panel.convert("RGB"), (k * (w * scale + gap), bar))
    ImageDraw.Draw(img).text((2, 1), title, fill=(255, 255, 255))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------
# the trainer


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class _Trainer:
    def __init__(self, cfg: Config, info: DistInfo, device: torch.device, stop: StopSignals):
        self.cfg = cfg
        self.scfg = cfg.segmenter
        self.info = info
        self.device = device
        self.out_dir = cfg.stage_dir(STAGE)
        self.last_path = self.out_dir / "last.pt"
        self.best_path = self.out_dir / "best.pt"
        self.stop = stop
        self.debug = _DebugSignal(os.environ.get(DEBUG_SIGNAL_ENV))
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "score": -math.inf}
        self.amp_dtype: torch.dtype | None = None
        self.scaler: Any = None

    # ----- collectives
    def all_sum(self, values: Sequence[float]) -> list[float]:
        if not self.info.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.info.enabled:
            import torch.distributed as dist

            dist.barrier()

    # ----- state
    def state(self, epoch: int, position: int, step: int, progress: dict[str, float]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
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
            "rng": ckpt_io.capture_rng(),
            "history": list(self.history),
            "best": dict(self.best),
            "config": self.cfg.to_dict(),
            "meta": self.meta,
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        if self.info.is_main:
            ckpt_io.save_checkpoint(path, state)

    # ----- set-up
    def setup(self, overwrite: bool, load_saved_model: bool) -> dict[str, Any] | None:
        """Load data, build or restore the model; returns a summary when there is nothing to do."""
        from .tiling import read_manifest

        tile_dir = self.cfg.stage_dir("tile")
        if not (tile_dir / "manifest.csv").is_file():
            raise StageError(f"{tile_dir / 'manifest.csv'}: not found; run the tile stage first")
        manifest = read_manifest(tile_dir)
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

        if self.info.is_main:
            # temporary files of checkpoint writes cut short by a SIGKILL
            for stale in self.out_dir.glob(".*.pt.part"):
                stale.unlink(missing_ok=True)
        resume: dict[str, Any] | None = None
        if overwrite:
            if load_saved_model:
                log.info("--overwrite: starting fresh (--load_saved_model is ignored)")
            if self.info.is_main:
                self._clear_outputs()
            self.barrier()
        elif self.last_path.is_file():
            found = ckpt_io.load_checkpoint(self.last_path)
            missing = [k for k in ("epoch", "step", "optimizer", "scheduler", "meta", "rng") if k not in found]
            if missing:
                raise InputError(self.last_path, f"not a train-segmenter checkpoint (missing {missing})")
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
        elif load_saved_model:
            log.warning("--load_saved_model: no checkpoint at %s; starting fresh", self.last_path)

        self._build(resume)
        return None

    def _clear_outputs(self) -> None:
        import shutil

        for name in ("last.pt", "best.pt", "history.json", "metrics.json", "learning_curve.png"):
            (self.out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / "overlays", ignore_errors=True)

    def _class_weights(self) -> list[float]:
        if self.scfg.class_weights is not None:
            return [float(w) for w in self.scfg.class_weights]
        from .classifier import class_weights_from_counts

        rows = self.train_set.rows
        return [float(w) for w in class_weights_from_counts(rows["background_px"].sum(), rows["building_px"].sum())]

    def _build(self, resume: dict[str, Any] | None) -> None:
        from .segmenter import build_segmenter, segmenter_from_classifier

        scfg = self.scfg
        if resume is None:
            clf = self.cfg.stage_dir("train-classifier") / "best.pt"
            if not clf.is_file():
                raise StageError(f"{clf}: not found; run train-classifier first")
            # a random backbone (backbone.weights: random) must come out the same on every rank and rerun
            torch.manual_seed(derive_seed(self.cfg.seed, "init"))
            model, meta = segmenter_from_classifier(clf, scfg.stride, scfg.train_backbone)
            meta = dict(meta)
            meta["class_weights"] = self._class_weights()
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

        model.to(self.device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and scfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise StageError("the segmenter has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=scfg.lr, weight_decay=scfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=scfg.step_size, gamma=scfg.gamma)
        if on_cuda and scfg.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.amp_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")

        self.start_epoch, self.start_position, self.start_step = 0, 0, 0
        self.start_progress: dict[str, float] = {}
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            if self.scaler is not None and resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            ckpt_io.restore_rng(resume["rng"])
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

        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if on_cuda else None)
        self.model = model

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

    def to_input(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.device, non_blocking=True).float()
        if self.device.type == "cuda" and self.scfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

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
        sampler = GlobalBatchSampler(order, scfg.batch_size, position, stop_at, epoch, self.info)
        loader = _loader(self.train_set, sampler, self.device, scfg.num_workers)
        self.model.train()
        from tqdm import tqdm

        bar = tqdm(
            loader, total=len(sampler), desc=f"epoch {epoch + 1}/{scfg.epochs}", unit="step",
            disable=not self.info.is_main, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )  # fmt: skip
        for image, mask, _index, real in bar:
            # dropout masks depend on (seed, epoch, step, rank) only: exact on resume whatever ran before
            torch.manual_seed(derive_seed(self.cfg.seed, "step", epoch, step, self.info.rank))
            x = self.to_input(image)
            target = mask.to(self.device, non_blocking=True).long()
            real_d = real.to(self.device)
            with self.autocast():
                logits = self.model(x)
            loss_sum, weight_sum = weighted_ce_sums(logits, target, self.class_weight, real_d)
            flag = 1.0 if self.stop.signame else 0.0
            g_loss, g_weight, g_flag = self.all_sum([loss_sum.detach(), weight_sum.detach(), flag])
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
            self.debug.maybe("step", self.global_step)
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
    def validate(self, epoch: int, done: dict[str, Any]) -> dict[str, Any] | None:
        """Validation loss and pixel metrics over the val split; overlays of the first few patches."""
        from .metrics import confusion, pixel_metrics

        if len(self.val_set) == 0:
            return None
        self.model.eval()
        order = np.arange(len(self.val_set))
        sampler = GlobalBatchSampler(order, self.scfg.batch_size, 0, len(order), -1, self.info)
        loader = _loader(self.val_set, sampler, self.device, self.scfg.num_workers)
        sums = np.zeros(6)  # loss_sum, weight_sum, tp, fp, fn, tn
        overlays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for image, mask, index, real in loader:
            self.debug.maybe("validation", self.global_step)
            stop = self.all_sum([1.0 if self.stop.signame else 0.0])[0]
            if stop > 0:
                self.preempt(epoch, done["position"], done["step"], done["progress"])
            target = mask.to(self.device).long()
            real_d = real.to(self.device)
            with self.autocast():
                logits = self.model(self.to_input(image))
            loss_sum, weight_sum = weighted_ce_sums(logits, target, self.class_weight, real_d)
            pred = logits.argmax(1)
            keep = real_d.bool()
            tp, fp, fn, tn = confusion(pred[keep], target[keep], ignore=IGNORE_INDEX) if keep.any() else (0, 0, 0, 0)
            sums += [float(loss_sum), float(weight_sum), tp, fp, fn, tn]
            if self.info.is_main and len(overlays) < self.scfg.overlays:
                for i in range(image.shape[0]):
                    if real[i] and len(overlays) < self.scfg.overlays:
                        overlays.append((int(index[i]), image[i].numpy(), mask[i].numpy(), pred[i].cpu().numpy()))
        loss_sum, weight_sum, tp, fp, fn, tn = self.all_sum(sums.tolist())
        metrics = pixel_metrics(tp, fp, fn, tn)
        metrics["loss"] = loss_sum / max(weight_sum, 1e-12)
        if self.info.is_main:
            self._write_overlays(epoch, overlays)
        return metrics

    def _write_overlays(self, epoch: int, overlays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        folder = self.out_dir / "overlays"
        for index, image, truth, pred in overlays:
            patch_id = str(self.val_set.rows.iloc[index].get("patch_id", index))
            title = f"epoch {epoch + 1}  {patch_id}  image | truth | prediction"
            write_overlay(folder / f"epoch{epoch + 1:03d}_{patch_id}.png", image, truth, pred, title)

    def run(self) -> dict[str, Any]:
        scfg = self.scfg
        self.debug.arm_checkpoint(lambda: self.global_step)
        with self.stop:
            for epoch in range(self.start_epoch, scfg.epochs):
                if self.all_sum([1.0 if self.stop.signame else 0.0])[0] > 0:
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
                    write_learning_curve(self.out_dir / "learning_curve.png", self.history)
                    if improved:
                        write_json(self.out_dir / "metrics.json", {"best_epoch": epoch + 1, **entry})
                        # best before last: a kill in between re-runs this epoch's end and rewrites both
                        self.save(self.best_path, state)
                    self.save(self.last_path, state)
                self.barrier()
                # a signal during the epoch's end: last.pt above is already the state to resume from
                stop = self.all_sum([1.0 if self.stop.signame else 0.0])[0] > 0
                if stop and epoch + 1 < scfg.epochs:
                    self.preempt(epoch + 1, 0, 0, {}, write=False)
        return self.summary(status="trained")

    def summary(self, status: str) -> dict[str, Any]:
        best_entry = next((h for h in self.history if h["epoch"] == self.best.get("epoch")), None)
        return {
            "status": status,
            "last": str(self.last_path),
            "best": str(self.best_path),
            "epochs": len(self.history),
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


def train_segmenter(
    cfg: Config, overwrite: bool = False, load_saved_model: bool = False, stop: StopSignals | None = None
) -> dict[str, Any]:
    """The train-segmenter stage: dense training of the converted MLP, resumable and preemption-safe.

    `stop`: signal handlers the caller installed early (before importing torch); a new set otherwise.
    """
    stop = stop if stop is not None else StopSignals()
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
    try:
        with stop:
            trainer = _Trainer(cfg, info, device, stop)
            done = trainer.setup(overwrite, load_saved_model)
            return done if done is not None else trainer.run()
    finally:
        ckpt_io._before_rename_hook = None
        _set_deterministic(was_deterministic, warn_only=was_warn_only)
        pkg_log.setLevel(old_level)
        if info.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
