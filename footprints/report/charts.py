"""Pictures for the report: the run's learning curves (re-encoded smaller) and the calibration grid."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def image_data_uri(path: str | Path, max_width: int = 900) -> str | None:
    """A PNG data URI of an image file, shrunk to `max_width` px; None (logged) when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.width > max_width:
                img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
            if img.mode not in ("RGB", "RGBA", "L", "P"):
                img = img.convert("RGBA")
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError) as err:
        log.warning("report: cannot embed %s (%s)", path, err)
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def f1_by_area_and_threshold(
    grid: Sequence[Mapping[str, Any]],
) -> tuple[list[float], list[float], np.ndarray]:
    """(thresholds, minimum areas, polygon F1 (area x threshold)) of a calibration grid, each cell the best
    over the seed thresholds (so the chosen cell shows the chosen point's F1); NaN where the grid has none."""
    ts = sorted({float(r["threshold"]) for r in grid})
    areas = sorted({float(r["min_area_m2"]) for r in grid})
    f1 = np.full((len(areas), len(ts)), np.nan)
    for r in grid:
        i, j = areas.index(float(r["min_area_m2"])), ts.index(float(r["threshold"]))
        f1[i, j] = np.fmax(f1[i, j], float(r["polygon_f1"]))
    return ts, areas, f1


def calibration_chart(cal: Mapping[str, Any]) -> str | None:
    """Heatmap of polygon F1 over (threshold x minimum area) from `choose_calibration`'s grid, the chosen
    cell outlined, as a PNG data URI; None when the calibration has no grid (given in the config)."""
    grid = cal.get("grid") or []
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ts, areas, f1 = f1_by_area_and_threshold(grid)
    fig, ax = plt.subplots(figsize=(1.4 + 0.9 * len(ts), 1.2 + 0.5 * len(areas)), dpi=100)
    try:
        im = ax.imshow(
            f1,
            cmap="viridis",
            origin="lower",
            aspect="auto",
            vmin=0.0,
            vmax=max(float(np.nanmax(f1)) if np.isfinite(f1).any() else 1.0, 1e-6),
        )
        for i in range(len(areas)):
            for j in range(len(ts)):
                if np.isfinite(f1[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{f1[i, j]:.3f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if f1[i, j] < 0.6 * np.nanmax(f1) else "black",
                    )
        chosen = (cal.get("threshold"), cal.get("min_area_m2"))
        if chosen[0] is not None and float(chosen[0]) in ts and float(chosen[1]) in areas:
            j, i = ts.index(float(chosen[0])), areas.index(float(chosen[1]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(len(ts)), [f"{t:g}" for t in ts])
        ax.set_yticks(range(len(areas)), [f"{a:g}" for a in areas])
        ax.set_xlabel("probability threshold")
        ax.set_ylabel("minimum area (m²)")
        ax.set_title("validation polygon F1, best seed threshold (chosen: red)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
