"""The report page's HTML: its template, the metrics table and the size note, around the page's data.

The page is one document that loads nothing: Leaflet and the report's own CSS/JS are inlined from
`assets/`, the data (scenes, overlays, footprints) is one JSON script element, and the Content-Security-
Policy (`CSP`) forbids any fetch. `GENERATOR_META` marks a page as one footprints wrote (so that it may be
replaced: `html.is_footprints_report`).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from ..config import GRID_KEYS
from .pins import ASSETS
from .pins import VERSION as LEAFLET_VERSION
from .scene_payload import PreparedScene
from .scene_rasters import SceneRasters

# the page may load nothing: only its own inline code and data: images (a fetch would be refused and logged)
CSP = "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
# in the head of every page: what says that an existing file is a report footprints wrote (and may be
# replaced); pages written before it carried the CSP line alone
GENERATOR_META = '<meta name="generator" content="footprints report">'
LEGACY_META = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'


def asset(name: str) -> str:
    """A checked-in asset's text (`assets/`, see `build_assets.py`)."""
    return (ASSETS / name).read_text(encoding="utf-8")


def json_for_script(obj: Any) -> str:
    """JSON safe inside <script>: no '<' at all, so neither '</script>' nor '<!--' can occur."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).replace("<", "\\u003c")


def fmt(x: Any, nd: int = 3) -> str:
    """A table cell: a dash for a missing or non-finite value, `nd` decimals for a float, escaped text else."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def metrics_row(
    label: str, m: Mapping[str, Any] | None, n_fp: int | None, cols: Sequence[str], attrs: str = "",
    domain: float | None = None,
) -> str:
    """One row of the metrics table: `label`, then the `cols` of evaluate's metrics `m` (pixel, polygon) and
    predict's `domain` score."""
    px = (m or {}).get("pixel") or {}
    pg = (m or {}).get("polygon") or {}
    cells = {
        "footprints": fmt(n_fp),
        "truth": fmt(pg.get("n_truth")),
        "pixel IoU": fmt(px.get("building_iou")),
        "pixel F1": fmt(px.get("f1")),
        "polygon P": fmt(pg.get("precision")),
        "polygon R": fmt(pg.get("recall")),
        "polygon F1": fmt(pg.get("f1")),
        "TP": fmt(pg.get("tp")),
        "FP": fmt(pg.get("fp")),
        "FN": fmt(pg.get("fn")),
        "splits": fmt(pg.get("splits")),
        "merges": fmt(pg.get("merges")),
        "domain score": fmt(domain, 2),
    }
    tds = "".join(f"<td>{cells[c]}</td>" for c in cols)
    return f'<tr{attrs}><th scope="row">{label}</th>{tds}</tr>'


def human_bytes(n: int) -> str:
    """A size as the page says it: MB from 0.1 MB up, kB below."""
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def downsampling_note(shrunk: Sequence[tuple[str, SceneRasters]], max_side: int, max_bytes: int, size: int) -> str:
    """What the page says of its rasters' downsampling (each scene's source and shown size) and its own size
    (`size` 0: not known yet, while the page is first assembled)."""
    parts = []
    for sid, r in shrunk:
        ov = r.image or r.prob
        if ov is None:
            continue
        parts.append(
            f"{html.escape(sid)}: {ov.source_width}×{ov.source_height} px → {ov.width}×{ov.height} px"
        )
    detail = "; ".join(parts) if parts else "no rasters"
    size_text = f"This file is {human_bytes(size)}" if size else "This file is"
    return (
        f"Imagery and probability rasters are downsampled to keep this page small: at most {max_side} px "
        f"on the longest side, less where the {human_bytes(max_bytes)} bound needs it, reprojected to web "
        f"Mercator ({detail}). Footprint outlines are not downsampled. {size_text} "
        f"(bound {human_bytes(max_bytes)})."
    )


def render_html(
    title: str,
    payload: Mapping[str, Any],
    prepared: Sequence[PreparedScene],
    overall: Mapping[str, Any] | None,
    charts: Sequence[tuple[str, str]],
    calibration: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None,
    n_footprints: int,
    n_truth_fn: int,
    any_matches: bool,
    size_note: str,
    totals: tuple[int, int | None, str],
    damage_html: str = "",
    damage_text: str = "",
) -> str:
    """The page: header (counts, `info`), the map(s), the metrics table, the damage grades (`damage_html`,
    `damage_text` after the footprint count: `damage.py`, only for a run with damage grades), the charts,
    the licences, and the data (`payload`) and code (Leaflet, report.js) that draw the map, all inline."""
    e = html.escape
    n_scenes, all_footprints, scenes_note = totals
    n_geo = sum(p.geo for p in prepared)
    n_pix = len(prepared) - n_geo
    polys = [(p.scene.metrics or {}).get("polygon") or {} for p in prepared]
    cols = [
        "footprints",
        "truth",
        "pixel IoU",
        "pixel F1",
        "polygon P",
        "polygon R",
        "polygon F1",
        "TP",
        "FP",
        "FN",
    ]
    if any("splits" in pg for pg in polys):
        cols.append("splits")
    if any("merges" in pg for pg in polys):
        cols.append("merges")
    if not any(p.scene.metrics for p in prepared) and not overall:
        cols = ["footprints"]
    if any(p.scene.domain_score is not None for p in prepared):
        cols.append("domain score")  # predict's out-of-domain check: near 0 = like the model's training scenes
    head = "".join(f'<th scope="col">{e(c)}</th>' for c in cols)
    rows = []
    if overall:
        every = all_footprints if all_footprints is not None else n_footprints if n_scenes == len(prepared) else None
        rows.append(metrics_row(f"all {n_scenes} scenes", overall, every, cols, ' class="overall"'))
    for p in prepared:
        s = p.scene
        notes = f'<div class="note">{e("; ".join(s.notes))}</div>' if s.notes else ""
        split = f' <span class="split">{e(s.split)}</span>' if s.split else ""
        label = f'<span class="sid">{e(s.scene_id)}</span>{split}{notes}'
        attrs = f' data-scene="{e(s.scene_id, quote=True)}" tabindex="0" title="zoom the map to this scene"'
        rows.append(metrics_row(label, s.metrics, len(p.pred), cols, attrs, s.domain_score))
    info_items = "".join(
        f"<div><dt>{e(str(k))}</dt><dd>{e(str(v))}</dd></div>"
        for k, v in (info or {}).items()
        if v is not None and v != ""
    )
    cal_text = ""
    if calibration and calibration.get("threshold") is not None:
        best = calibration.get("best") or {}
        extra = (
            f" (validation polygon F1 {best['polygon_f1']:.3f}, pixel F1 {best['pixel_f1']:.3f})"
            if "polygon_f1" in best and "pixel_f1" in best
            else ""
        )
        seed = calibration.get("seed_threshold")
        seed_text = f", seed threshold {float(seed):g}" if seed is not None else ""
        edges = [
            f"{e(k)} {float(calibration[k]):g} of predict.{GRID_KEYS[k]} [{', '.join(f'{v:g}' for v in values)}]"
            for k, values in (calibration.get("at_grid_edge") or {}).items()
        ]
        edge_text = (
            f"<p>At the edge of its grid: {'; '.join(edges)}. A wider grid may do better on validation.</p>"
            if edges
            else ""
        )
        cal_text = (
            f"<p>Threshold {float(calibration['threshold']):g}, minimum area "
            f"{float(calibration.get('min_area_m2') or 0):g} m²{seed_text}{extra}.</p>{edge_text}"
        )
    figures = "".join(
        f'<figure><img alt="{e(c, quote=True)}" src="{u}"><figcaption>{e(c)}</figcaption></figure>'
        for c, u in charts
    )
    charts_html = (
        (
            f'<section id="charts"><h2>Training and calibration</h2>{cal_text}'
            f'<div class="figures">{figures}</div></section>'
        )
        if figures or cal_text
        else ""
    )
    colouring = (
        "TP (matched, green) / FP (unmatched, red) predictions; missed truth (FN) dashed orange"
        if any_matches
        else "predicted footprints coloured by mean probability"
    )
    fn_text = f", {n_truth_fn} missed truth outlines" if any_matches else ""
    maps = []
    if n_geo:
        maps.append('<div id="map" class="map" role="region" aria-label="map of the scenes"></div>')
    if n_pix:
        maps.append(
            f'<h2>Scenes without georeference ({n_pix})</h2><p class="note">Shown side by side in '
            "pixel coordinates (no CRS: they cannot be placed on the earth).</p>"
            '<div id="map-pixel" class="map" role="region" aria-label="pixel-space scenes"></div>'
        )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    plural = "s" if len(prepared) != 1 else ""
    of = f" (of {n_scenes})" if n_scenes > len(prepared) else ""
    count_text = (f"in {len(prepared)} scene{plural}{of}{fn_text}: {e(colouring)}.{e(damage_text)} Click a footprint "
                  "for its area, probability and scene; click a scene row to zoom to it.")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
{GENERATOR_META}
<link rel="icon" href="data:,">
<title>{e(title)}</title>
<style>{asset("leaflet.css")}</style>
<style>{asset("report.css")}</style>
</head>
<body>
<header>
<h1>{e(title)}</h1>
<p id="footprint-count" data-count="{n_footprints}"><strong>{n_footprints} footprints</strong>
{count_text}</p>
<p id="scene-count" data-total="{n_scenes}" data-shown="{len(prepared)}">{e(scenes_note)}</p>
<dl class="info">{info_items}<div><dt>generated</dt><dd>{generated}</dd></div></dl>
</header>
<main>
{"".join(maps)}
<p id="size-note" class="note">{size_note}</p>
<section id="metrics"><h2>Per-scene metrics</h2>
<table id="scene-table"><thead><tr><th scope="col">scene</th>{head}</tr></thead><tbody>
{"".join(rows)}
</tbody></table></section>
{damage_html}{charts_html}
</main>
<footer>
<details id="licences"><summary>Licences</summary>
<p>Map: <a href="https://leafletjs.com">Leaflet</a> {e(LEAFLET_VERSION)}, inlined in this page, under this
licence:</p>
<pre>{e(asset("LICENSE-leaflet.txt"))}</pre>
<p>Imagery and labels keep their own licences (e.g. xBD: CC BY-NC-SA 4.0; SpaceNet: CC BY-SA 4.0).</p>
</details>
</footer>
<script type="application/json" id="report-data">{json_for_script(payload)}</script>
<script>{asset("leaflet.js")}</script>
<script>{asset("report.js")}</script>
</body>
</html>
"""
