"""Stage `train-segmenter`: dense training of the converted MLP, resumable bit for bit, preemption-proof,
single process or DDP.

This module is the stage's wiring: the process settings (determinism, cuDNN, logging per rank), the
distributed process group and the signal handlers around one `footprints.training.trainer.Trainer`. What
the trainer does, and what makes a resume exact, is in `footprints.training` (the resume decision:
`footprints.training.resume`; the model set-up: `footprints.training.build`).

`hooks` (a `TrainingHooks`) lets a caller act at chosen points (tests kill the process there to prove
the resume exact); the default does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch

from ..config import Config
from ..model.device import resolve_device
from ..training.distributed import dist_from_env, init_distributed, shutdown
from ..training.signals import StopSignals
from ..training.trainer import Trainer, TrainingHooks

__all__ = ["TrainingHooks", "run"]  # TrainingHooks: what callers of `run` subclass (tests/train_hooks.py)


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
            trainer = Trainer(cfg, info, device, stop, hooks)
            done = trainer.setup(overwrite, load_saved_model)
            result = done if done is not None else trainer.run()
            completed = True
            return result
    finally:
        _set_deterministic(was_deterministic, warn_only=was_warn_only)
        pkg_log.setLevel(old_level)
        shutdown(info, completed)
