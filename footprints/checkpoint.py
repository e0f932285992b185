"""Training checkpoints: atomic writes, safe loads, and the random-number state of every generator.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(..., weights_only=True)`: a file from elsewhere can never execute code on load. It is written
to a temporary file in the same folder, flushed to disk and renamed over the old one, so a process killed
at any moment (SIGKILL, a node failure) leaves either the previous checkpoint or the new one, never a
truncated file under the final name.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .errors import InputError

# test hook (FOOTPRINTS_TEST_SIGNAL, see footprints.training): called between writing the temporary
# file and the rename, so a test can kill the process exactly there and check that the old one survives
_before_rename_hook: Any = None


def capture_rng() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (when in use) the current CUDA device's generator."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
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
    return state


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


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` with torch.save to a temporary file beside `path`, fsync it, and rename it onto `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            # the rename must never reach the disk before the data does (power loss, node crash)
            os.fsync(fh.fileno())
        if _before_rename_hook is not None:
            _before_rename_hook(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (`weights_only=True`); a bad file is an `InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or code-carrying pickles all land here
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(path, f"not a loadable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(path, "not a footprints checkpoint (expected a dict with a 'model' state dict)")
    return state
