"""One self-contained HTML file that shows a run's footprints on its imagery, offline.

Everything the page needs is inside it: Leaflet (checked in under `assets/`, see `build_assets.py`), the
imagery and probability rasters as downsampled data-URI images placed exactly (see `rasters.py`), the
footprints as inline GeoJSON, the metrics and the charts. Nothing is fetched when it opens, so it can be
mailed, archived with the run, or opened on a field laptop without a network.

The size is bounded (`max_bytes`, 20 MB by default): vectors and charts are kept whole, and the rasters
share what is left, each scene's longest side shrinking from `max_side` until the page fits. What was
downsampled, and to what, is said in the page. A run of many scenes shows at most `max_scenes` of them
(`selection.py`: the most polygon errors first), and says so: memory, time and size follow the scenes shown.

This module holds the size bound and where a report may be written; the parts it joins are a scene's
input record (`scene.py`), its vectors and JSON entry (`scene_payload.py`), its rendered rasters
(`scene_rasters.py`) and the page's HTML (`page.py`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..contracts.paths import check_output_text
from ..errors import StageError, printable
from . import rasters
from .damage import damage_note, damage_payload, damage_section, has_damage
from .page import GENERATOR_META, LEGACY_META, downsampling_note, human_bytes, render_html
from .pins import VERSION as LEAFLET_VERSION
from .scene import ReportScene
from .scene_payload import pixel_width, prepare, scene_payload
from .scene_rasters import SceneRasters, render_scene
from .selection import MAX_SCENES, choose_scenes, describe
from .vectors import FeatureStore

log = logging.getLogger(__name__)

MAX_BYTES = 20_000_000
MAX_SIDE = 1024
MIN_SIDE = 64
CANVAS_ABOVE = 20_000  # more footprints than this are drawn on a canvas (SVG slows down)
REPORT_SUFFIXES = (".html", ".htm")

__all__ = ["MAX_BYTES", "MAX_SIDE", "ReportScene", "check_report_path", "is_footprints_report", "write_report"]


def is_footprints_report(path: str | Path) -> bool:
    """The existing file at `path` is an HTML report footprints wrote (its head carries `GENERATOR_META`,
    or, for pages of earlier versions, the report's exact Content-Security-Policy line)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192).decode("utf-8", errors="replace")
    except OSError:
        return False
    return head.lstrip().lower().startswith("<!doctype html>") and (GENERATOR_META in head or LEGACY_META in head)


def check_report_path(out_html: str | Path) -> Path:
    """Where a report may go: an `.html`/`.htm` path (no control characters) that is not a folder and holds
    no file, or holds a report footprints wrote; anything else is refused in one line, before any work."""
    path = check_output_text(out_html, "report --output")
    if path.is_dir():
        raise StageError(f"{printable(path)}: a folder; give the report's file name (e.g. {printable(path / 'report.html')})")
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise StageError(f"{printable(path)}: a report is an HTML page; give a path ending in .html")
    if (path.exists() or path.is_symlink()) and not is_footprints_report(path):
        raise StageError(f"{printable(path)}: exists and is not a report footprints wrote; it is left as it is "
                         "(choose another path, or move it away)")
    return path


def write_report(
    out_html: str | Path,
    scenes: Sequence[ReportScene],
    *,
    title: str = "footprints report",
    overall: Mapping[str, Any] | None = None,
    learning_curves: Mapping[str, str | Path] | None = None,
    calibration: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_BYTES,
    max_side: int = MAX_SIDE,
    image_format: str | None = None,
    max_scenes: int = MAX_SCENES,
    total_scenes: int | None = None,
    total_footprints: int | None = None,
    damage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the report to `out_html` (atomically) and return a summary: path, bytes, footprints, scenes
    (shown, and `scenes_total`), the longest raster side used, and whether the size bound held.

    `overall`: evaluate's overall metrics (`pixel`, `polygon`); `learning_curves`: caption -> PNG;
    `calibration`: predict's calibration dict (threshold, min_area_m2, grid); `info`: extra key/values
    listed in the header (run name, split, threshold ...). `image_format`: "webp" (default where Pillow
    has it: lossy colour, exact alpha; compare the summary's `bytes` with "png" to see what it saves) or "png". More than `max_scenes` scenes: the
    page shows `max_scenes` of them (`selection.choose_scenes`). `total_scenes`/`total_footprints`: the
    run's, when `scenes` is already a selection (the page says both). `damage`: the damage stage's
    `metrics.json` (counts, per-grade scores; see `damage.py`); the graded footprints themselves are each
    scene's `ReportScene.damage`. Without either, the page has no damage layer nor section.
    """
    t0 = time.perf_counter()
    out_html = check_report_path(out_html)
    fmt = image_format or ("webp" if rasters.webp_available() else "png")
    n_total = max(total_scenes or 0, len(scenes))
    if len(scenes) > max_scenes:
        keep = set(choose_scenes(((s.scene_id, s.metrics) for s in scenes), max_scenes))
        scenes = [s for s in scenes if s.scene_id in keep]
    wanted: dict[Path, set[str]] = {}
    for s in scenes:
        for path in (s.footprints, s.matches, s.damage):
            if path is not None:
                wanted.setdefault(Path(path), set()).add(s.scene_id)
    cache = FeatureStore(wanted)
    prepared = [prepare(s, cache) for s in scenes]
    del cache  # the slimmed features stay in `prepared`
    totals = (n_total, total_footprints, describe(n_total, len(prepared), any(s.metrics for s in scenes)))
    n_footprints = sum(len(p.pred) for p in prepared)
    n_truth_fn = sum(1 for p in prepared for f in p.truth if f["properties"].get("status") == "FN")
    any_matches = any(p.has_matches for p in prepared)
    with_damage = has_damage(prepared, damage)
    n_damage = sum(len(p.damage or []) for p in prepared)
    damage_html = damage_section(damage, prepared, len(prepared) >= n_total) if with_damage else ""

    # charts first: their size is fixed, the rasters get what is left
    from .charts import calibration_chart, image_data_uri

    charts: list[tuple[str, str]] = []
    for caption, path in (learning_curves or {}).items():
        if path is not None and Path(path).is_file():
            uri = image_data_uri(path)
            if uri:
                charts.append((caption, uri))
    cal_uri = calibration_chart(calibration) if calibration else None
    if cal_uri:
        charts.append(
            (
                "Calibration on the validation scenes: polygon F1 for each probability threshold and "
                "minimum area",
                cal_uri,
            )
        )

    # pixel-space scenes side by side on one pixel grid
    dxs: list[float] = []
    x = 0.0
    for p in prepared:
        dxs.append(0.0 if p.geo else x)
        if not p.geo:
            x += pixel_width(p) * 1.1

    def assemble(rendered: Sequence[SceneRasters], size_note: str) -> str:
        payload = {
            "title": title,
            "leaflet_version": LEAFLET_VERSION,
            "scenes": [scene_payload(p, r, dx) for p, r, dx in zip(prepared, rendered, dxs, strict=True)],
            "n_footprints": n_footprints,
            "use_canvas": n_footprints + n_damage > CANVAS_ABOVE,
            "has_matches": any_matches,
        }
        if with_damage:
            payload["damage"] = damage_payload(prepared)
        return render_html(
            title,
            payload,
            prepared,
            overall,
            charts,
            calibration,
            info,
            n_footprints,
            n_truth_fn,
            any_matches,
            size_note,
            totals,
            damage_html=damage_html,
            damage_text=damage_note(prepared) if with_damage else "",
        )

    empty = [SceneRasters() for _ in prepared]
    with_rasters = [
        i for i, p in enumerate(prepared) if p.scene.image is not None or p.scene.prob is not None
    ]
    note_room = "x" * (400 + sum(60 + len(prepared[i].scene.scene_id) for i in with_rasters))
    fixed = len(assemble(empty, note_room).encode("utf-8"))
    budget = max_bytes - fixed
    rendered = list(empty)
    side = max_side
    for attempt in range(4):
        per_scene = budget / max(len(with_rasters), 1)
        for i in with_rasters:
            p = prepared[i]
            r = render_scene(p.scene, p.placement, p.geo, side, fmt)
            while r.nbytes > per_scene and side > MIN_SIDE:
                side = max(MIN_SIDE, int(side * math.sqrt(per_scene / r.nbytes) * 0.95))
                r = render_scene(p.scene, p.placement, p.geo, side, fmt)
            rendered[i] = r
        total = fixed + sum(r.nbytes for r in rendered)
        if total <= max_bytes or side <= MIN_SIDE or attempt == 3:
            break
        budget -= total - max_bytes  # estimate was off: shrink and redo
    sides = [r.side for i, r in enumerate(rendered) if i in with_rasters]
    shrunk = [(prepared[i].scene.scene_id, rendered[i]) for i in with_rasters]
    text = assemble(rendered, downsampling_note(shrunk, max_side, max_bytes, 0))
    size = len(text.encode("utf-8"))
    text = assemble(rendered, downsampling_note(shrunk, max_side, max_bytes, size))
    size = len(text.encode("utf-8"))
    within = size <= max_bytes
    if not within:
        log.warning(
            "report: %s is %s, over the %s bound (the footprints alone take %s)",
            out_html,
            human_bytes(size),
            human_bytes(max_bytes),
            human_bytes(fixed),
        )
    write_text(out_html, text)
    summary = {
        "path": str(out_html),
        "bytes": size,
        "max_bytes": max_bytes,
        "within_bound": within,
        "footprints": n_footprints,
        "scenes": len(prepared),
        "scenes_total": n_total,
        "max_side_used": max(sides) if sides else None,
        "min_side_used": min(sides) if sides else None,
        "image_format": fmt,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info(
        "report: %s (%s, %d footprints, %d scenes, rasters <= %s px) in %.1f s",
        out_html,
        human_bytes(size),
        n_footprints,
        len(prepared),
        summary["max_side_used"],
        summary["seconds"],
    )
    return summary
