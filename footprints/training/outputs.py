"""The files of train-segmenter besides its checkpoints: the learning curve, validation overlays, the
stage's summary, and clearing an earlier run's outputs before training again."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts.patches import IGNORE
from ..scoring.plots import write_learning_curve, write_overlay

# what a run writes in <run>/train-segmenter (besides the `overlays` folder): cleared before a fresh run
OUTPUT_FILES = ("last.pt", "best.pt", "history.json", "metrics.json", "learning_curve.png")

Overlay = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # (val row index, image, truth, prediction)


def clear_outputs(out_dir: Path) -> None:
    """Delete an earlier run's outputs (before a fresh run: none of them may describe another model)."""
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "overlays", ignore_errors=True)


def write_overlays(folder: Path, rows: Any, label: int, overlays: list[Overlay]) -> None:
    """One image | truth | prediction PNG per overlay, named by `label` (the epoch) and the patch id."""
    for index, image, truth, pred in overlays:
        patch_id = str(rows.iloc[index].get("patch_id", index))
        title = f"epoch {label}  {patch_id}  image | truth | prediction"
        write_overlay(folder / f"epoch{label:03d}_{patch_id}.png", image, truth, pred, title,
                      ignore=truth == IGNORE)


def write_history_curve(path: Path, history: list[dict[str, Any]]) -> None:
    """The learning curve of `history` (history.json's entries): losses and validation building IoU."""
    h = history
    write_learning_curve(
        path, [e["epoch"] for e in h],
        {"train": [e["train_loss"] for e in h], "validation": [e.get("val_loss") for e in h]},
        {"validation building IoU": [(e.get("val") or {}).get("building_iou") for e in h]},
        "class-weighted cross entropy", "building IoU", "train-segmenter learning curve",
    )  # fmt: skip


def stage_summary(status: str, out_dir: Path, last: Path, best_path: Path, history: list[dict[str, Any]],
            best: dict[str, Any]) -> dict[str, Any]:
    """The stage's result: its status, checkpoints and the best epoch's validation building IoU."""
    best_entry = next((h for h in history if h["epoch"] == best.get("epoch")), None)
    return {
        "status": status,
        "last": str(last),
        "best": str(best_path),
        "epochs": history[-1]["epoch"] if history else 0,  # trained (entry 0: the conversion)
        "best_epoch": best.get("epoch"),
        "best_val_building_iou": ((best_entry or {}).get("val") or {}).get("building_iou"),
        "history": str(out_dir / "history.json"),
        "learning_curve": str(out_dir / "learning_curve.png"),
    }
