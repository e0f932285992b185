"""One self-contained HTML file that shows a run's footprints on its imagery, offline.

Everything the page needs is inside it: Leaflet (checked in under `assets/`, see `build_assets.py`), the
imagery and probability rasters as downsampled data-URI images placed exactly (see `rasters.py`), the
footprints as inline GeoJSON, the metrics and the charts. Nothing is fetched when it opens, so it can be
mailed, archived with the run, or opened on a field laptop without a network.

The size is bounded (`max_bytes`, 20 MB by default): vectors and charts are kept whole, and the rasters
share what is left, each scene's longest side shrinking from `max_side` until the page fits. What was
downsampled, and to what, is said in the page. A run of many scenes shows at most `max_scenes` of them
(`selection.py`: the most polygon errors first), and says so: memory, time and size follow the scenes shown.

Long: the page is one document; its payload (scenes, layers, metrics), the size bound that shares bytes
between them, and the HTML around them change together.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from affine import Affine
from rasterio.crs import CRS

from ..atomic import write_text
from ..config import GRID_KEYS
from ..contracts.paths import check_output_text
from ..errors import StageError, printable
from . import rasters
from .pins import ASSETS
from .pins import VERSION as LEAFLET_VERSION
from .selection import MAX_SCENES, choose_scenes, describe
from .vectors import FeatureStore, bbox, slim_feature

log = logging.getLogger(__name__)

MAX_BYTES = 20_000_000
MAX_SIDE = 1024
MIN_SIDE = 64
CANVAS_ABOVE = 20_000  # more footprints than this are drawn on a canvas (SVG slows down)
# the page may load nothing: only its own inline code and data: images (a fetch would be refused and logged)
CSP = "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
COORD_DECIMALS = 7  # degrees: ~1 cm (the GeoJSON outputs' own precision)
# in the head of every page: what says that an existing file is a report footprints wrote (and may be
# replaced); pages written before it carried the CSP line alone
GENERATOR_META = '<meta name="generator" content="footprints report">'
_LEGACY_META = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
REPORT_SUFFIXES = (".html", ".htm")
PIXEL_DECIMALS = 3


@dataclass
class ReportScene:
    """What the report shows of one scene; every path is optional.

    `footprints`: GeoJSON of predicted polygons (EPSG:4326, or pixel coordinates for a scene without
    CRS); a file holding several scenes is filtered on the `scene` property. `matches`: evaluate's
    matches GeoJSON (predictions with `status` TP/FP, truths with `kind` "truth" and `status` TP/FN),
    filtered on `scene`. `prob`: probability raster. `image`: the scene image; `image_transform`
    (an Affine or 6 GDAL numbers) and `image_crs` georeference an image file that carries none (xView2
    PNGs), for the image's own pixel grid; without them such an image is stretched over the probability
    raster's extent. `metrics`: evaluate's per-scene entry (`pixel`, `polygon`).
    """

    scene_id: str
    footprints: Path | None = None
    prob: Path | None = None
    image: Path | None = None
    image_transform: Affine | Sequence[float] | None = None
    image_crs: str | None = None
    matches: Path | None = None
    metrics: Mapping[str, Any] | None = None
    split: str | None = None
    notes: list[str] = field(default_factory=list)


def is_footprints_report(path: str | Path) -> bool:
    """The existing file at `path` is an HTML report footprints wrote (its head carries `GENERATOR_META`,
    or, for pages of earlier versions, the report's exact Content-Security-Policy line)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192).decode("utf-8", errors="replace")
    except OSError:
        return False
    return head.lstrip().lower().startswith("<!doctype html>") and (GENERATOR_META in head or _LEGACY_META in head)


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


# ---------------------------------------------------------------------------------------------- rasters
@dataclass
class _Grid:
    """Where a scene's rasters lie: georeferenced (crs) or pixel space."""

    crs: CRS | None
    prob_transform: Affine | None = None
    prob_size: tuple[int, int] | None = None


def _raster_grid(path: Path | None) -> _Grid | None:
    if path is None or not Path(path).is_file():
        return None
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return _Grid(src.crs, src.transform, (src.width, src.height))


def _image_georef(scene: ReportScene, grid: _Grid | None) -> tuple[Affine | None, CRS | None, str | None]:
    """(transform, crs, note) for the scene image; (None, None) means: use the file's own georeference."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    assert scene.image is not None
    if scene.image_transform is not None:
        t = scene.image_transform
        t = t if isinstance(t, Affine) else Affine.from_gdal(*[float(v) for v in t])
        crs = CRS.from_user_input(scene.image_crs) if scene.image_crs else None
        return t, crs, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(scene.image) as src:
            if src.crs is not None:
                return None, None, None
            size = (src.width, src.height)
    if grid is not None and grid.prob_transform is not None and grid.prob_size is not None:
        t = grid.prob_transform * Affine.scale(grid.prob_size[0] / size[0], grid.prob_size[1] / size[1])
        note = (
            "imagery placed on the probability raster's extent (the image file has no georeference)"
            if scene.prob is not None
            else None
        )
        return t, grid.crs, note
    return None, None, None


@dataclass
class _SceneRasters:
    image: rasters.Overlay | None = None
    prob: rasters.Overlay | None = None
    side: int = 0

    @property
    def nbytes(self) -> int:
        return (self.image.nbytes if self.image else 0) + (self.prob.nbytes if self.prob else 0)


def _render_scene(scene: ReportScene, grid: _Grid | None, geo: bool, side: int, fmt: str) -> _SceneRasters:
    out = _SceneRasters(side=side)
    if scene.image is not None and Path(scene.image).is_file():
        try:
            t, crs, note = _image_georef(scene, grid)
            rgba, tt, cc, size = rasters.read_rgba(scene.image, side, t, crs)
            if (cc is not None) != geo:  # e.g. a PNG without georeference beside lon/lat footprints
                _note(scene, "imagery not shown: it has no georeference and nothing to place it by")
            else:
                out.image = rasters.make_overlay(rgba, tt, cc, size, side, fmt)
                if note:
                    _note(scene, note)
        except Exception as err:  # a broken image must not cost the whole report
            log.warning("report: %s: cannot show the image %s (%s)", scene.scene_id, scene.image, err)
            _note(scene, f"imagery not shown: {err}")
    elif scene.image is not None:
        _note(scene, f"imagery not shown: {scene.image} not found")
    if scene.prob is not None and Path(scene.prob).is_file():
        try:
            out.prob = rasters.probability_overlay(scene.prob, side)
        except Exception as err:
            log.warning(
                "report: %s: cannot show the probability raster %s (%s)", scene.scene_id, scene.prob, err
            )
            _note(scene, f"probability raster not shown: {err}")
    return out


def _note(scene: ReportScene, text: str) -> None:
    if text not in scene.notes:
        scene.notes.append(text)


# ---------------------------------------------------------------------------------------------- assembly
def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _json_for_script(obj: Any) -> str:
    """JSON safe inside <script>: no '<' at all, so neither '</script>' nor '<!--' can occur."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).replace("<", "\\u003c")


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def _metrics_row(
    label: str, m: Mapping[str, Any] | None, n_fp: int | None, cols: Sequence[str], attrs: str = ""
) -> str:
    px = (m or {}).get("pixel") or {}
    pg = (m or {}).get("polygon") or {}
    cells = {
        "footprints": _fmt(n_fp),
        "truth": _fmt(pg.get("n_truth")),
        "pixel IoU": _fmt(px.get("building_iou")),
        "pixel F1": _fmt(px.get("f1")),
        "polygon P": _fmt(pg.get("precision")),
        "polygon R": _fmt(pg.get("recall")),
        "polygon F1": _fmt(pg.get("f1")),
        "TP": _fmt(pg.get("tp")),
        "FP": _fmt(pg.get("fp")),
        "FN": _fmt(pg.get("fn")),
        "splits": _fmt(pg.get("splits")),
        "merges": _fmt(pg.get("merges")),
    }
    tds = "".join(f"<td>{cells[c]}</td>" for c in cols)
    return f'<tr{attrs}><th scope="row">{label}</th>{tds}</tr>'


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


@dataclass
class _Prepared:
    scene: ReportScene
    grid: _Grid | None
    geo: bool
    pred: list[dict[str, Any]]
    truth: list[dict[str, Any]]
    has_matches: bool


def _safe_grid(scene: ReportScene, path: Path | None, what: str) -> _Grid | None:
    """`_raster_grid`, an unreadable file noted on its scene (and left out) instead of failing the page."""
    try:
        return _raster_grid(path)
    except Exception as err:  # noqa: BLE001 - one bad raster must not cost the other scenes their page
        log.warning("report: %s: cannot read the %s %s (%s)", scene.scene_id, what, path, " ".join(str(err).split()))
        _note(scene, f"{what} not shown: cannot read it")
        return None


def _prepare(scene: ReportScene, cache: FeatureStore) -> _Prepared:
    grid = _safe_grid(scene, scene.prob, "probability raster")
    if grid is None and scene.prob is not None and Path(scene.prob).is_file():
        scene.prob = None  # unreadable: not rendered either
    if grid is not None:
        geo = grid.crs is not None
    elif scene.image_crs is not None:
        geo = bool(scene.image_crs)
    elif scene.image is not None and Path(scene.image).is_file():
        grid = _safe_grid(scene, scene.image, "imagery")  # the image's own grid places it (and sizes a
        geo = grid is not None and grid.crs is not None  # pixel-space scene)
        if grid is None:
            scene.image = None
    else:
        geo = True  # only vectors: RFC 7946 GeoJSON is lon/lat
    decimals = COORD_DECIMALS if geo else PIXEL_DECIMALS
    raw = cache.features(scene.footprints, scene.scene_id)
    pred = [f for f in (slim_feature(x, decimals) for x in raw or []) if f is not None]
    truth: list[dict[str, Any]] = []
    has_matches = False
    matches = cache.features(scene.matches, scene.scene_id)
    if matches is not None:
        m_pred = [
            f
            for f in (
                slim_feature(x, decimals)
                for x in matches
                if (x.get("properties") or {}).get("kind", "pred") == "pred"
            )
            if f is not None
        ]
        truth = [
            f
            for f in (
                slim_feature(x, decimals)
                for x in matches
                if (x.get("properties") or {}).get("kind") == "truth"
            )
            if f is not None
        ]
        if raw is None or len(m_pred) == len(pred):
            pred, has_matches = m_pred, True
        else:
            log.warning(
                "report: %s: %d predictions in %s but %d in %s; colouring by probability instead of TP/FP",
                scene.scene_id,
                len(m_pred),
                scene.matches,
                len(pred),
                scene.footprints,
            )
            _note(
                scene,
                f"matches ({len(m_pred)} predictions) disagree with the footprints ({len(pred)}): "
                "coloured by probability",
            )
    if raw is None and scene.footprints is not None:
        _note(scene, f"footprints not found: {scene.footprints}")
    return _Prepared(scene, grid, geo, pred, truth, has_matches)


def _scene_payload(p: _Prepared, r: _SceneRasters, dx: float) -> dict[str, Any]:
    s = p.scene
    bounds = None
    for ov in (r.prob, r.image):
        if ov is not None:
            bounds = [list(ov.bounds[0]), list(ov.bounds[1])]
            break
    frame = {"flip": False, "dx": 0.0}
    if not p.geo:
        t = (
            p.grid.prob_transform
            if p.grid is not None and p.grid.prob_transform is not None
            else Affine.identity()
        )
        frame = {"flip": t.e > 0, "dx": dx}
        if bounds is not None:  # scene coordinates -> map coordinates (y up, scenes side by side)
            (y0, x0), (y1, x1) = bounds
            ys = sorted(-y if frame["flip"] else y for y in (y0, y1))
            bounds = [[ys[0], x0 + dx], [ys[1], x1 + dx]]
    if bounds is None:
        bb = bbox(p.pred + p.truth)
        if bb is not None:
            x0, y0, x1, y1 = bb
            if not p.geo:
                ys = sorted(-y if frame["flip"] else y for y in (y0, y1))
                bounds = [[ys[0], x0 + dx], [ys[1], x1 + dx]]
            else:
                bounds = [[y0, x0], [y1, x1]]

    def ov_json(ov: rasters.Overlay | None) -> dict[str, Any] | None:
        if ov is None:
            return None
        d = ov.as_json()
        if not p.geo:
            (y0, x0), (y1, x1) = ov.bounds
            ys = sorted(-y if frame["flip"] else y for y in (y0, y1))
            d["bounds"] = [[ys[0], x0 + dx], [ys[1], x1 + dx]]
        return d

    return {
        "id": s.scene_id,
        "kind": "geo" if p.geo else "pixel",
        "split": s.split,
        "bounds": bounds,
        "frame": frame,
        "image": ov_json(r.image),
        "prob": ov_json(r.prob),
        "footprints": p.pred,
        "truth": p.truth,
        "has_matches": p.has_matches,
        "notes": list(s.notes),
    }


def _pixel_width(p: _Prepared) -> float:
    if p.grid is not None and p.grid.prob_size is not None and p.grid.prob_transform is not None:
        return abs(p.grid.prob_transform.a) * p.grid.prob_size[0]
    bb = bbox(p.pred + p.truth)
    return (bb[2] - bb[0]) if bb else 0.0


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
) -> dict[str, Any]:
    """Write the report to `out_html` (atomically) and return a summary: path, bytes, footprints, scenes
    (shown, and `scenes_total`), the longest raster side used, and whether the size bound held.

    `overall`: evaluate's overall metrics (`pixel`, `polygon`); `learning_curves`: caption -> PNG;
    `calibration`: predict's calibration dict (threshold, min_area_m2, grid); `info`: extra key/values
    listed in the header (run name, split, threshold ...). `image_format`: "webp" (default where Pillow
    has it: about a tenth of PNG for photographs, alpha kept) or "png". More than `max_scenes` scenes: the
    page shows `max_scenes` of them (`selection.choose_scenes`). `total_scenes`/`total_footprints`: the
    run's, when `scenes` is already a selection (the page says both).
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
        for path in (s.footprints, s.matches):
            if path is not None:
                wanted.setdefault(Path(path), set()).add(s.scene_id)
    cache = FeatureStore(wanted)
    prepared = [_prepare(s, cache) for s in scenes]
    del cache  # the slimmed features stay in `prepared`
    totals = (n_total, total_footprints, describe(n_total, len(prepared), any(s.metrics for s in scenes)))
    n_footprints = sum(len(p.pred) for p in prepared)
    n_truth_fn = sum(1 for p in prepared for f in p.truth if f["properties"].get("status") == "FN")
    any_matches = any(p.has_matches for p in prepared)

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
            x += _pixel_width(p) * 1.1

    def assemble(rendered: Sequence[_SceneRasters], size_note: str) -> str:
        payload = {
            "title": title,
            "leaflet_version": LEAFLET_VERSION,
            "scenes": [_scene_payload(p, r, dx) for p, r, dx in zip(prepared, rendered, dxs, strict=True)],
            "n_footprints": n_footprints,
            "use_canvas": n_footprints > CANVAS_ABOVE,
            "has_matches": any_matches,
        }
        return _render_html(
            title,
            payload,
            prepared,
            rendered,
            overall,
            charts,
            calibration,
            info,
            n_footprints,
            n_truth_fn,
            any_matches,
            size_note,
            totals,
        )

    empty = [_SceneRasters() for _ in prepared]
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
            r = _render_scene(p.scene, p.grid, p.geo, side, fmt)
            while r.nbytes > per_scene and side > MIN_SIDE:
                side = max(MIN_SIDE, int(side * math.sqrt(per_scene / r.nbytes) * 0.95))
                r = _render_scene(p.scene, p.grid, p.geo, side, fmt)
            rendered[i] = r
        total = fixed + sum(r.nbytes for r in rendered)
        if total <= max_bytes or side <= MIN_SIDE or attempt == 3:
            break
        budget -= total - max_bytes  # estimate was off: shrink and redo
    sides = [r.side for i, r in enumerate(rendered) if i in with_rasters]
    shrunk = [(prepared[i].scene.scene_id, rendered[i]) for i in with_rasters]
    text = assemble(rendered, _size_note(shrunk, max_side, max_bytes, 0))
    size = len(text.encode("utf-8"))
    text = assemble(rendered, _size_note(shrunk, max_side, max_bytes, size))
    size = len(text.encode("utf-8"))
    within = size <= max_bytes
    if not within:
        log.warning(
            "report: %s is %s, over the %s bound (the footprints alone take %s)",
            out_html,
            _human_bytes(size),
            _human_bytes(max_bytes),
            _human_bytes(fixed),
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
        _human_bytes(size),
        n_footprints,
        len(prepared),
        summary["max_side_used"],
        summary["seconds"],
    )
    return summary


def _size_note(shrunk: Sequence[tuple[str, _SceneRasters]], max_side: int, max_bytes: int, size: int) -> str:
    parts = []
    for sid, r in shrunk:
        ov = r.image or r.prob
        if ov is None:
            continue
        parts.append(
            f"{html.escape(sid)}: {ov.source_width}×{ov.source_height} px → {ov.width}×{ov.height} px"
        )
    detail = "; ".join(parts) if parts else "no rasters"
    size_text = f"This file is {_human_bytes(size)}" if size else "This file is"
    return (
        f"Imagery and probability rasters are downsampled to keep this page small: at most {max_side} px "
        f"on the longest side, less where the {_human_bytes(max_bytes)} bound needs it, reprojected to web "
        f"Mercator ({detail}). Footprint outlines are not downsampled. {size_text} "
        f"(bound {_human_bytes(max_bytes)})."
    )


def _render_html(
    title: str,
    payload: Mapping[str, Any],
    prepared: Sequence[_Prepared],
    rendered: Sequence[_SceneRasters],
    overall: Mapping[str, Any] | None,
    charts: Sequence[tuple[str, str]],
    calibration: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None,
    n_footprints: int,
    n_truth_fn: int,
    any_matches: bool,
    size_note: str,
    totals: tuple[int, int | None, str],
) -> str:
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
    head = "".join(f'<th scope="col">{e(c)}</th>' for c in cols)
    rows = []
    if overall:
        every = all_footprints if all_footprints is not None else n_footprints if n_scenes == len(prepared) else None
        rows.append(_metrics_row(f"all {n_scenes} scenes", overall, every, cols, ' class="overall"'))
    for p in prepared:
        s = p.scene
        notes = f'<div class="note">{e("; ".join(s.notes))}</div>' if s.notes else ""
        split = f' <span class="split">{e(s.split)}</span>' if s.split else ""
        label = f'<span class="sid">{e(s.scene_id)}</span>{split}{notes}'
        attrs = f' data-scene="{e(s.scene_id, quote=True)}" tabindex="0" title="zoom the map to this scene"'
        rows.append(_metrics_row(label, s.metrics, len(p.pred), cols, attrs))
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
    count_text = (f"in {len(prepared)} scene{plural}{of}{fn_text}: {e(colouring)}. Click a footprint for its "
                  "area, probability and scene; click a scene row to zoom to it.")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
{GENERATOR_META}
<link rel="icon" href="data:,">
<title>{e(title)}</title>
<style>{_asset("leaflet.css")}</style>
<style>{_asset("report.css")}</style>
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
{charts_html}
</main>
<footer>
<details id="licences"><summary>Licences</summary>
<p>Map: <a href="https://leafletjs.com">Leaflet</a> {e(LEAFLET_VERSION)}, inlined in this page, under this
licence:</p>
<pre>{e(_asset("LICENSE-leaflet.txt"))}</pre>
<p>Imagery and labels keep their own licences (e.g. xBD: CC BY-NC-SA 4.0; SpaceNet: CC BY-SA 4.0).</p>
</details>
</footer>
<script type="application/json" id="report-data">{_json_for_script(payload)}</script>
<script>{_asset("leaflet.js")}</script>
<script>{_asset("report.js")}</script>
</body>
</html>
"""
