"""Model checkpoints: one writer and one reader for every kind (classifier, segmenter, training state).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(..., weights_only=True)`: a file from elsewhere can never execute code on load. It is written
to a temporary file in the same folder, flushed to disk and renamed over the old one, so a process killed
at any moment (SIGKILL, a node failure) leaves either the previous checkpoint or the new one, never a
truncated file under the final name.

Kinds and the keys they must hold:

- `classifier` (train-classifier/best.pt): `model` (MLP state dict), `in_channels`, `layers`, `backbone`
  ({weights, normalization}), plus `hidden`, `dropout`, `class_weights`, `epoch`, `metrics`, `config`;
  a fine-tuned one (`classifier.init_from`) also `parent`: {path, digest (the file's), kind}; since the
  record exists, `training_gsd` (its training scenes' GSD: `footprints.contracts.model_gsd`, or None);
  since the out-of-domain check exists, `domain_reference` (what its training pixels looked like:
  `footprints.model.domain`; absent when there were too few).
- `segmenter` (train-segmenter/best.pt, last.pt): `model` (Segmenter state dict) and `meta` (everything
  needed to rebuild the architecture and to predict: layers, hidden, stride, classes, backbone, target GSD,
  tile size, class weights; `parent` when the classifier it was converted from was fine-tuned;
  `training_gsd` and `domain_reference`, absent from older checkpoints; no `domain_reference` when the backbone
  was trained), plus `config`.
- `damage` (train-damage/best.pt): the grade MLP (`model`, `in_channels`, `hidden`, `dropout`), `grades`,
  `layers`, `backbone`, `damage` (the damage: section it was trained with), `seed`, `epoch`, `config`.
- `training` (last.pt when resuming): a segmenter checkpoint that also holds `epoch`, `step`, `optimizer`,
  `scheduler`, `rng` (every generator's state), `sampler`, `progress`, `history`, `best`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import InputError

REQUIRED: dict[str, tuple[str, ...]] = {
    "classifier": ("model", "in_channels", "layers", "backbone"),
    "segmenter": ("model", "meta"),
    "training": ("model", "meta", "epoch", "step", "optimizer", "scheduler", "rng"),
    "damage": ("model", "in_channels", "layers", "backbone", "grades", "damage"),
}
TRAINING_FORMAT = "footprints-segmenter-v1"


def capture_rng() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (when in use) the current CUDA device's generator."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        # NumPy's key is a uint32 array; stored as int64 tensor because weights_only refuses ndarrays
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        # the current device only: get_rng_state_all() would open a context on every visible GPU from
        # every DDP rank; and nothing when CUDA was never used (a CPU run on a GPU node)
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back into the state `capture_rng` recorded."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": int(npy["pos"])},
            "has_gauss": int(npy["has_gauss"]),
            "gauss": float(npy["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_states[0].cpu())  # the current device, as captured


def save_checkpoint(path: str | Path, state: dict[str, Any],
                    before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write `state` with torch.save to a temporary file beside `path`, fsync it, and rename it onto `path`.

    `before_rename(tmp)` runs between the write and the rename (tests kill the process there to prove
    that the previous checkpoint survives).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            # the rename must never reach the disk before the data does (power loss, node crash)
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None, map_location: str | torch.device = "cpu",
                    mmap: bool = False, check_finite: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict safely (`weights_only=True`) and check it holds what `kind` needs.

    Every failure is an `InputError` naming the file: missing, a folder, empty, truncated, foreign,
    code-carrying, or a checkpoint of another kind (e.g. a classifier given where a segmenter is
    expected); with `check_finite`, a model with a NaN or infinite weight (a diverged training). `mmap`
    maps the tensors lazily (reading `meta` of a large checkpoint without loading its weights).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "a folder, not a checkpoint file (give the .pt file, e.g. train-segmenter/best.pt)")
    if not path.is_file():
        raise InputError(path, "checkpoint not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, "an empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or code-carrying pickles all land here
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(path, f"not a loadable checkpoint ({type(err).__name__}: {first[:160]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(path, "not a footprints checkpoint (expected a dict with a 'model' state dict)")
    if kind is not None:
        missing = [k for k in REQUIRED[kind] if k not in state]
        if missing:
            hint = " (a classifier checkpoint?)" if kind != "classifier" and "meta" in missing else ""
            raise InputError(path, f"not a {kind} checkpoint (missing {missing}){hint}")
    if check_finite:
        bad = non_finite_weights(state["model"])
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise InputError(path, f"the model has NaN or infinite weights ({bad[0]}{more}): a diverged "
                                   "training; use an earlier checkpoint")
    return state


def non_finite_weights(model_state: Any) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    if not isinstance(model_state, dict):
        return []
    return [str(name) for name, t in model_state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
