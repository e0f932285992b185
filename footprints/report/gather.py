"""Find what a report shows in the folders the pipeline writes.

`report_for_run` reads a run folder (`outputs/<name>/`: tile/scenes, predict, evaluate, the learning
curves); `report_for_predictions` reads what `footprints predict --input ... --output out.geojson` wrote
(`out.geojson` and `out_scenes/`). Both only read: a missing piece (no evaluation yet, no learning curve) is
left out of the page, never an error.

A run of thousands of scenes costs a few small records per scene (predict's markers, evaluate's metrics):
the page's scenes are chosen from those (`selection.py`), and only they have their files opened.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from affine import Affine

from ..contracts.freshness import read_record
from ..contracts.paths import RunPaths, ScenePaths, check_output_text
from ..contracts.predict_records import read_predict_scene_record
from ..contracts.tile_records import read_scene_record
from ..errors import StageError, printable
from .html import MAX_BYTES, MAX_SIDE, ReportScene, check_report_path, write_report
from .post import post_imagery
from .selection import MAX_SCENES, choose_scenes

log = logging.getLogger(__name__)


def predicted_scene_ids(folder: Path) -> list[str]:
    """Scenes predict finished in `folder`: its markers (`<scene>.json` with a `scene_id`) and, for older
    runs, its `<scene>_prob.tif` files."""
    return sorted(predicted_scenes(folder))


def predicted_scenes(folder: Path) -> dict[str, int | None]:
    """`predicted_scene_ids` -> the number of polygons its marker records (None where it does not)."""
    found: dict[str, int | None] = {}
    for marker in folder.glob("*.json"):
        record = read_predict_scene_record(marker)
        if record is not None and record.scene_id == marker.stem:
            found[marker.stem] = None if record.polygons is None else int(record.polygons)
    for p in folder.glob("*_prob.tif"):
        found.setdefault(p.name[: -len("_prob.tif")], None)
    return found


def _domain_score(record: Path) -> float | None:
    """A predicted scene's domain score, from its record (None when it has none)."""
    found = read_predict_scene_record(record)
    return None if found is None else found.domain_score


def _resolve(path_text: str, bases: Sequence[Path]) -> Path | None:
    """A path as the pipeline recorded it (relative to the working directory it ran in), found again."""
    p = Path(path_text)
    if p.is_absolute():
        return p if p.exists() else None
    for base in bases:
        if (base / p).exists():
            return (base / p).resolve()
    return None


def _splits(run: RunPaths, scene_ids: Collection[str]) -> dict[str, str]:
    """scene id -> split of the run's tile manifest, for `scene_ids` ({} before tiling): read a row at a
    time (the manifest has a row per patch), keeping only those scenes."""
    import csv

    wanted = set(scene_ids)
    out: dict[str, str] = {}
    try:
        with (run.tile / "manifest.csv").open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                sid = row.get("scene_id")
                if sid in wanted and row.get("split"):
                    out.setdefault(sid, row["split"])
    except (OSError, ValueError, csv.Error):
        return {}
    return out


def _total(counts: Mapping[str, int | None], ids: Sequence[str]) -> int | None:
    """The run's number of footprints from predict's markers (None unless every scene's is known)."""
    values = [counts.get(sid) for sid in ids]
    return sum(v for v in values if v is not None) if ids and all(v is not None for v in values) else None


def _matches_of(run: RunPaths, entry: Mapping[str, Any] | None, bases: Sequence[Path]) -> Path | None:
    """An evaluated scene's own matches layer (evaluate/matches/<scene>.geojson, as its metrics record it),
    else the merged `evaluate/matches.geojson` (older runs); None for a scene that was not evaluated."""
    if not entry:
        return None
    own = _resolve(str(entry["matches"]), bases) if entry.get("matches") else None
    if own is not None and own.is_file():
        return own
    return run.matches if run.matches.is_file() else None


def _damage_of(run: RunPaths, sid: str, merged: Path | None) -> Path | None:
    """A scene's graded footprints: the damage stage's `damage/scenes/<scene>.geojson`, else the run's
    `damage/footprints.geojson` (None when neither is there)."""
    own = run.damage_scenes / f"{sid}.geojson"
    return own if own.is_file() else merged


def _read_settings(params: Mapping[str, Any] | None, bases: Sequence[Path]) -> dict[str, Any]:
    """The `data:` settings a scene was tiled with (its record's `params`), its `geotransforms` file found
    again (left out when it is not there)."""
    out = dict(params or {})
    if out.get("geotransforms"):
        found = _resolve(str(out["geotransforms"]), bases)
        if found is None:
            out.pop("geotransforms")
        else:
            out["geotransforms"] = str(found)
    return out


def scene_image_georef(meta: Mapping[str, Any]) -> tuple[Affine | None, str | None]:
    """(transform of the image's own pixel grid, CRS) from tile/scenes/<id>.json, whose `transform` is the
    scene's output grid (`width` x `height`, resampled to the target GSD) over the image's
    `source_width` x `source_height` pixels."""
    t = meta.get("transform")
    if not t or len(t) != 6:
        return None, None
    out = Affine.from_gdal(*[float(v) for v in t])
    w, h = meta.get("width"), meta.get("height")
    sw, sh = meta.get("source_width") or w, meta.get("source_height") or h
    if w and h and sw and sh:
        out = out * Affine.scale(float(w) / float(sw), float(h) / float(sh))
    return out, str(meta.get("crs") or "")


def report_for_run(
    run_dir: str | Path,
    out_html: str | Path | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    max_side: int = MAX_SIDE,
    image_format: str | None = None,
    max_scenes: int = MAX_SCENES,
) -> dict[str, Any]:
    """Write the report of a run folder (`outputs/<name>/`) to `<run>/report/index.html` (or `out_html`).

    Shows the scenes predict finished (`predict/`; at most `max_scenes`, see `selection.py`), with their
    imagery (found through `tile/scenes/<id>.json`), probability raster, footprints, and, once evaluated,
    `evaluate/metrics.json` and the scenes' match layers; the learning curves and
    `predict/calibration.json` as charts; and, once the damage stage has graded the footprints
    (`damage/footprints.geojson`, `damage/metrics.json`), their grades as a map layer and their scores, and
    each scene's post-disaster imagery (its image's `_post_disaster` twin, `post.py`) as a layer.
    """
    run = RunPaths(Path(run_dir))
    out = Path(out_html) if out_html else run.report
    pred_dir = run.predict
    metrics = read_record(run.metrics) or {}
    per_scene: Mapping[str, Any] = metrics.get("per_scene") or {}
    counts = predicted_scenes(pred_dir) if pred_dir.is_dir() else {}
    all_ids = sorted(set(counts) | set(per_scene))
    ids = choose_scenes(((sid, per_scene.get(sid)) for sid in all_ids), max_scenes)
    splits = _splits(run, ids)
    merged = run.footprints_geojson
    # the damage stage's graded footprints: a scene's own file, else the run's (filtered on `scene`)
    graded = run.damage_geojson if run.damage_geojson.is_file() else None
    damage = read_record(run.damage_metrics) if graded is not None or run.damage_metrics.is_file() else None
    if graded is not None and damage is None:
        damage = {}  # graded footprints without metrics.json: the layer and counts, no scores
    with_post = run.damage.is_dir()  # a damage run: each scene's post-disaster twin too (`post.py`)
    # recorded paths are relative to where the pipeline ran: usually the checkout holding outputs/
    bases = [Path.cwd(), run.root.parent.parent, run.root.parent, run.root]
    scenes = []
    for sid in ids:
        tiled = read_scene_record(run.scene_record(sid))
        meta = tiled.scene if tiled is not None else {}
        image = _resolve(str(meta["image_file"]), bases) if meta.get("image_file") else None
        transform, crs = scene_image_georef(meta) if image is not None else (None, None)
        sp = ScenePaths(pred_dir, sid)
        scene = ReportScene(
            scene_id=sid,
            footprints=sp.geojson if sp.geojson.is_file() else (merged if merged.is_file() else None),
            prob=sp.prob if sp.prob.is_file() else None,
            image=image,
            image_transform=transform,
            image_crs=crs,
            matches=_matches_of(run, per_scene.get(sid), bases),
            metrics=per_scene.get(sid),
            split=splits.get(sid),
            domain_score=_domain_score(sp.record),
            damage=_damage_of(run, sid, graded) if damage is not None else None,
        )
        if meta.get("image_file") and image is None:
            scene.notes.append(f"image {meta['image_file']} not found")
        if with_post and image is not None:
            scene.post = post_imagery(sid, image, _read_settings(tiled.params if tiled is not None else None, bases))
        scenes.append(scene)
    if not scenes:
        log.warning("report: %s has no predicted scenes yet", run.root)
    cal = read_record(run.calibration)
    curves = {
        "Stage 3: shallow classifier (MLP) learning curve": run.classifier / "learning_curve.png",
        "Stage 4: dense segmenter learning curve": run.segmenter / "learning_curve.png",
    }
    info = {
        "run": metrics.get("name") or run.root.name,
        "split": metrics.get("split"),
        "threshold": metrics.get("threshold", (cal or {}).get("threshold")),
        "min area (m²)": metrics.get("min_area_m2", (cal or {}).get("min_area_m2")),
        "match rule": metrics.get("match_rule"),
    }
    return write_report(
        out,
        scenes,
        title=f"footprints: {info['run']}",
        overall=metrics.get("overall"),
        learning_curves=curves,
        calibration=cal,
        info=info,
        max_bytes=max_bytes,
        max_side=max_side,
        image_format=image_format,
        max_scenes=max_scenes,
        total_scenes=len(all_ids),
        total_footprints=_total(counts, all_ids),
        damage=damage,
    )


def predictions_report_path(geojson: str | Path) -> Path:
    """Where `predict --input ... --output out.geojson` puts its report: `out_report.html` beside it."""
    g = Path(geojson)
    return g.with_name(f"{g.stem}_report.html")


def report_for_predictions(
    geojson: str | Path,
    scene_dir: str | Path | None = None,
    images: Mapping[str, str | Path] | None = None,
    out_html: str | Path | None = None,
    *,
    calibration: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_BYTES,
    max_side: int = MAX_SIDE,
    image_format: str | None = None,
    max_scenes: int = MAX_SCENES,
) -> dict[str, Any]:
    """Write the report of `predict --input` outputs: `out.geojson` and its per-scene folder
    (`out_scenes/`, or `scene_dir`); `images` maps scene ids to their image files (predict knows them; an
    image without georeference is laid over its probability raster). Goes to `out_report.html` beside the
    GeoJSON unless `out_html` is given."""
    g = Path(geojson)
    # predict --input puts the scenes in <stem>_scenes/ beside the GeoJSON (outputs of versions before
    # issue 23 without --output had them beside it)
    folder = Path(scene_dir) if scene_dir else g.with_name(f"{g.stem}_scenes")
    if scene_dir is None and not folder.is_dir():
        folder = g.parent
    out = Path(out_html) if out_html else predictions_report_path(g)
    images = {str(k): Path(v) for k, v in (images or {}).items()}
    counts = predicted_scenes(folder) if folder.is_dir() else {}
    all_ids = sorted(set(counts) | set(images))
    ids = choose_scenes(((sid, None) for sid in all_ids), max_scenes)
    scenes = []
    for sid in ids:
        sp = ScenePaths(folder, sid)
        scenes.append(
            ReportScene(
                scene_id=sid,
                footprints=sp.geojson if sp.geojson.is_file() else (g if g.is_file() else None),
                prob=sp.prob if sp.prob.is_file() else None,
                image=images.get(sid),
                domain_score=_domain_score(sp.record),
            )
        )
    info = {
        "footprints": str(g),
        "threshold": (calibration or {}).get("threshold"),
        "min area (m²)": (calibration or {}).get("min_area_m2"),
    }
    return write_report(
        out,
        scenes,
        title=f"footprints: {g.stem}",
        calibration=calibration,
        info=info,
        max_bytes=max_bytes,
        max_side=max_side,
        image_format=image_format,
        max_scenes=max_scenes,
        total_scenes=len(all_ids),
        total_footprints=_total(counts, all_ids),
    )


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".vrt")


def images_from_inputs(inputs: Sequence[str | Path], scene_ids: Sequence[str]) -> dict[str, Path]:
    """Scene id -> image file among `predict --input`'s files and folders (a scene's id is its image's
    stem), for `footprints report --predictions` run after the fact."""
    wanted = set(scene_ids)
    found: dict[str, Path] = {}
    for item in inputs:
        p = Path(item)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            if f.suffix.lower() in IMAGE_SUFFIXES and f.stem in wanted:
                found.setdefault(f.stem, f)
    return found


def run_report(
    cfg: Any,
    output: str | Path | None = None,
    predictions: str | Path | None = None,
    inputs: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """`footprints report`: the run's report (`<output_root>/<name>/report/index.html`, from a `Config`), or,
    with `predictions` (a `predict --input ... --output out.geojson` GeoJSON), that of those outputs with
    the imagery of `inputs` (the files or folders given to --input). Prints the path (the last line).

    The report goes only where no other file is: an `.html`/`.htm` path that is free or holds a report
    footprints wrote (`check_report_path`), checked before anything is read; a `--predictions` GeoJSON
    that does not exist is one line, not an empty page."""
    if output is not None:
        output = check_report_path(output)
    if predictions is None:
        summary = report_for_run(RunPaths.of(cfg).root, output)
    else:
        geojson = check_output_text(predictions, "report --predictions")
        if not geojson.is_file():
            raise StageError(f"{printable(geojson)}: no such GeoJSON (give the file `predict --input ... --output` "
                             "wrote)")
        if output is None:
            check_report_path(predictions_report_path(geojson))
        folder = geojson.with_name(f"{geojson.stem}_scenes")
        ids = predicted_scene_ids(folder if folder.is_dir() else geojson.parent)
        summary = report_for_predictions(
            geojson, images=images_from_inputs(inputs or [], ids), out_html=output
        )
    print(f"report: {summary['path']}", flush=True)
    return summary
