"""The figures every stage writes: learning curves and overlays of truth and prediction on the image.

Both are PNGs written atomically, with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = 100) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    _pyplot().close(fig)


def write_learning_curve(path: Path, epochs: Sequence[int], losses: Mapping[str, Sequence[float | None]],
                         scores: Mapping[str, Sequence[float | None]], loss_label: str, score_label: str,
                         title: str) -> None:
    """Two panels per epoch: the losses (e.g. train and validation) and the scores (e.g. building IoU)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, values in losses.items():
        if any(v is not None for v in values):
            ax1.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=label)
    for label, values in scores.items():
        if any(v is not None for v in values):
            ax2.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=label)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax1.set_ylabel(loss_label)
    ax2.set_ylabel(score_label)
    ax2.set_ylim(0, 1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=80)


Outline = np.ndarray | Sequence[np.ndarray]  # a 2-D 0/1 mask, or rings as (n, 2) pixel (col, row) arrays


def _rings(x: Outline) -> list[np.ndarray]:
    if isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype != object:
        from rasterio import features

        m = (x == 1).astype(np.uint8)
        return [np.asarray(ring, dtype=float) for geom, v in features.shapes(m, mask=m == 1) if v == 1
                for ring in geom["coordinates"]]
    return [np.asarray(r, dtype=float) for r in x]


def write_overlay(path: Path, rgb: np.ndarray, truth: Outline, pred: Outline, title: str,
                  ignore: np.ndarray | None = None) -> None:
    """The image (3, h, w) uint8 with the truth outlined in green and the prediction in red; pixels where
    `ignore` is true (nodata, no labels) are greyed out."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    h, w = rgb.shape[1:]
    img = np.transpose(rgb, (1, 2, 0)).astype(np.float32) / 255.0
    if ignore is not None and ignore.any():
        img[ignore] = 0.5 * img[ignore] + 0.25
    side = 8 if max(h, w) >= 256 else 4
    fig, ax = plt.subplots(figsize=(side, side * h / max(w, 1)), dpi=100)
    ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest")
    ax.add_collection(LineCollection(_rings(truth), colors="#00ff66", linewidths=1.2, label="truth"))
    ax.add_collection(LineCollection(_rings(pred), colors="#ff2a2a", linewidths=0.9, label="predicted"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.legend(loc="lower right", fontsize=8, framealpha=0.7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def polygon_rings(geoms: Any, inverse_transform: Any, col_off: float = 0.0, row_off: float = 0.0) -> list[np.ndarray]:
    """Rings of polygons (in a CRS) as pixel (col, row) arrays through `inverse_transform` (`~transform`)."""
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return []
    inv = inverse_transform
    out = []
    for ring in shapely.get_rings(shapely.get_parts(geoms)):
        xy = shapely.get_coordinates(ring)
        col = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c - col_off
        row = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f - row_off
        out.append(np.column_stack([col, row]))
    return out
