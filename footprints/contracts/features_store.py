"""Hypercolumn shards: what `features` writes and `train-classifier` reads, in `outputs/<name>/features/`.

- `<split>_<shard:04d>.npz`: `X` float32 (n, C), `y` int64 (n,), `patch_id` str (n,), `rc` int32 (n, 2)
  (row, col in the patch), `w` float32 (n,) the number of mask pixels each sample stands for, plus the
  shard's `class_px` (mask pixels per class) and its partial statistics (`stat_n`, `stat_mean`, `stat_m2`,
  float64) and a `fingerprint` (settings + patch ids).
- `stats.npz`: `mean`, `std` (population std) float64 (C,) of the train split.
- `meta.json`: the run's description and its freshness record (`key`, and the size of every shard), written
  last: a truncated or missing shard makes the run stale.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError, StageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("X", "y", "w", "patch_id", "rc")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:04d}.npz"


def write_shard(path: Path, arrays: dict[str, Any]) -> None:
    """Write one shard atomically (numpy gets an open file: it would append `.npy` to a name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_shard_header(path: Path) -> dict[str, Any] | None:
    """Fingerprint, sample count and partial statistics of a finished shard; None when absent or damaged."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {
                "fingerprint": str(z["fingerprint"]),
                "n": int(len(z["y"])),
                "class_px": z["class_px"].astype(np.int64),
                "stat_n": int(z["stat_n"]),
                "stat_mean": z["stat_mean"],
                "stat_m2": z["stat_m2"],
            }
    except Exception as err:  # noqa: BLE001 - a damaged shard is simply recomputed
        log.warning("%s: unreadable shard (%s); recomputing it", path, type(err).__name__)
        return None


def read_meta(feature_dir: Path) -> dict[str, Any]:
    path = Path(feature_dir) / "meta.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run the features stage first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable features metadata ({err}); rerun features") from None


def load_features(feature_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Concatenate the shards of `split` listed in meta.json: X, y, w, patch_id, rc."""
    meta = read_meta(feature_dir)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    for name in meta["shards"].get(split, []):
        path = Path(feature_dir) / name
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in parts:
                    parts[k].append(z[k])
        except Exception as err:  # noqa: BLE001 - zip, OS and format errors alike: a damaged shard
            raise InputError(path, f"unreadable feature shard ({type(err).__name__}: {err}); rerun features "
                             "with --overwrite") from None
    if not parts["y"]:
        channels = int(meta["channels"])
        return {
            "X": np.zeros((0, channels), np.float32), "y": np.zeros(0, np.int64), "w": np.zeros(0, np.float32),
            "patch_id": np.zeros(0, dtype="<U1"), "rc": np.zeros((0, 2), np.int32),
        }
    return {k: np.concatenate(v) for k, v in parts.items()}


def write_stats(path: Path, mean: np.ndarray, std: np.ndarray, n: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mean=mean, std=std, n=np.int64(n))


def read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the train split's hypercolumns."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["mean"], z["std"]
    except Exception as err:  # noqa: BLE001
        raise InputError(path, f"unreadable feature statistics ({type(err).__name__}); rerun features") from None
