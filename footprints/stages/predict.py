"""Stage 5, predict: whole scenes -> blended building probabilities (COG) -> footprint polygons.

For the test split of the run (or the scenes given with `--input`), per scene (on the dask cluster of
`footprints.cluster`): the probability raster (`footprints.inference`), then polygons
(`footprints.vectorize`) as `<scene>.geojson` (RFC 7946) and `<scene>.gpkg`, and `<scene>.json` last, the
scene's freshness record. A rerun skips a finished scene, re-vectorises one whose threshold or minimum
area changed, and redoes one whose model or inference parameters changed. The merged `footprints.geojson`
and `footprints.gpkg` cover every scene.

Where the files go: the test split's scenes in `<run>/predict/` beside the merged layers (a scene id that
is a name of the run's own files, `footprints`/`summary`/`calibration`, is refused with one line); the
scenes of `--input` always in their own folder `<stem>_scenes/` beside the merged `<stem>.geojson`
(`--output`, default `<run>/predict/input/footprints.geojson`), so no scene name can meet the run's files.
Before any scene is predicted the outputs are checked (`_check_outputs`): never an input image, label or
mask, never a file of the run (checkpoint, calibration, summary), never an existing file footprints did not
write, always a folder that can be written; each problem is one line naming the files.

Threshold and minimum area come from the config, or from a calibration on the validation split
(`footprints.calibration`, stored in `predict/calibration.json` and beside the checkpoint). Scenes given
with `--checkpoint` and `--input` never calibrate: they read the calibration stored beside the checkpoint
(or the run's, or the config's values), and rewrite none.

Long: the stage's two modes (a run's test split, `--input` scenes), calibration and the checks of every
output path are one flow; issue 24 moves calibration and the output checks into their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import is_temporary, remove_stale_temporaries
from ..calibration import choose_calibration, scene_counts, sum_counts
from ..cluster import map_scenes
from ..config import GRID_KEYS, Config, DataConfig, TileConfig, config_from_dict
from ..contracts.checkpoints import load_checkpoint
from ..contracts.footprint_files import (
    RAW_LAYER,
    is_footprints_file,
    merge_outputs,
    write_geojson,
    write_gpkg,
)
from ..contracts.freshness import digest, file_digest, is_fresh, read_record, write_record
from ..contracts.manifest import split_sources
from ..contracts.paths import (
    FileSet,
    RunPaths,
    ScenePaths,
    check_output_text,
    check_writable,
    path_key,
    reserved_scene_id,
)
from ..device import resolve_device
from ..errors import FootprintsError, InputError, StageError, as_input_error, disk_full, printable
from ..geo import metric_crs_for
from ..inference import Model, predict_scene
from ..sources import SceneSource
from ..targets import SCHEMES, ClassScheme, scheme_for
from ..vectorize import polygons_from_probability

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSettings:
    """What a worker needs to predict one scene: small and picklable (the model is loaded in the worker)."""

    checkpoint: str
    fingerprint: str  # identity of the checkpoint: a retrained model invalidates old probabilities
    data: DataConfig
    tile: TileConfig  # size = the model's tile size, target_gsd = the model's training GSD
    overlap: float = 0.25
    batch_size: int = 8
    block_size: int = 2048
    tta_flips: bool = False
    prob_dtype: str = "uint8"
    device: str = "auto"
    hole_area_m2: float = 4.0
    simplify_px: float = 1.0
    classes: tuple[str, ...] = SCHEMES["binary"].classes  # the model's (its checkpoint meta)
    watershed: bool = True  # split touching buildings (predict.instances)
    regularize: bool = True

    @property
    def scheme(self) -> ClassScheme:
        return scheme_for(self.classes)

    def prob_params(self) -> dict[str, Any]:
        """What a probability raster depends on; a change redoes it even without --overwrite."""
        d = self.data
        return json.loads(json.dumps({
            "checkpoint": self.fingerprint, "classes": list(self.classes), "tile_size": self.tile.size,
            "target_gsd": self.tile.target_gsd,
            "overlap": self.overlap, "tta_flips": self.tta_flips, "prob_dtype": self.prob_dtype,
            "bands": list(d.bands), "stretch_percentiles": list(d.stretch_percentiles), "nodata": d.nodata,
            "geotransforms": d.geotransforms,
        }))  # fmt: skip

    @property
    def prob_key(self) -> str:
        return digest(self.prob_params())


# one model per worker process, loaded on first use (map_scenes ships only the checkpoint path)
_MODELS: dict[tuple[str, str], Any] = {}


def _model_for(settings: PredictSettings) -> Model:
    key = (settings.checkpoint, settings.device)
    if key not in _MODELS:
        from ..segmenter import load_segmenter

        _MODELS.clear()
        _MODELS[key] = load_segmenter(settings.checkpoint, resolve_device(settings.device))[0]
    return _MODELS[key]


def _ensure_probability(
    reader: Any, settings: PredictSettings, folder: Path, overwrite: bool, model: Model | None,
    alongside: Callable[[Path], Any] | None = None,
) -> tuple[Path, dict[str, Any], bool, Any]:
    """The scene's probability COG, reused when its record says it was made with the same parameters;
    (path, summary, reused, what `alongside` returned when a new COG was made with it, else None).

    Leaves the scene's record covering the probability only: polygons written after it are then marked
    by the caller's new record, never by an old one.
    """
    sp = ScenePaths(folder, reader.scene_id)
    prob_key = settings.prob_key
    record = read_record(sp.record)
    if not overwrite and record is not None and is_fresh(sp.record, prob_key, "prob_key", [sp.prob.name]):
        summary = record.get("prob") or {}
        write_record(sp.record, "", [sp.prob], scene_id=reader.scene_id, prob_key=prob_key, prob=summary)
        return sp.prob, summary, True, None
    sp.record.unlink(missing_ok=True)
    if reader.crs is None:
        log.warning("%s: no georeference: probabilities and polygons are in pixel coordinates", reader.scene_id)
    summary = predict_scene(
        reader, model if model is not None else _model_for(settings), sp.prob,
        tile_size=settings.tile.size, overlap=settings.overlap, batch_size=settings.batch_size,
        block_size=settings.block_size, tta_flips=settings.tta_flips, prob_dtype=settings.prob_dtype,
        device=resolve_device(settings.device), scheme=settings.scheme, alongside=alongside,
    )  # fmt: skip
    beside = summary.pop("alongside", None)
    write_record(sp.record, "", [sp.prob], scene_id=reader.scene_id, prob_key=prob_key, prob=summary)
    return sp.prob, summary, False, beside


def predict_source(
    source: SceneSource,
    settings: PredictSettings,
    out_dir: str,
    threshold: float,
    min_area_m2: float,
    seed_threshold: float | None = None,
    overwrite: bool = False,
    model: Model | None = None,
) -> dict[str, Any]:
    """One scene: probability COG, then polygons as `<scene>.geojson` (RFC 7946) and `<scene>.gpkg`
    (layer `footprints`, and `footprints_raw` with the outlines before regularisation)."""
    from ..scenes import gsd_warning, open_scene

    sp = ScenePaths(Path(out_dir), source.scene_id)
    vector = {"threshold": threshold, "seed_threshold": seed_threshold, "min_area_m2": min_area_m2,
              "hole_area_m2": settings.hole_area_m2, "simplify_px": settings.simplify_px,
              "regularize": settings.regularize}
    key = digest({"prob": settings.prob_key, "vector": vector})
    if not overwrite and is_fresh(sp.record, key):
        return {**(read_record(sp.record) or {}), "skipped": True}
    with open_scene(source, settings.data, settings.tile) as reader:
        note = gsd_warning(reader, settings.tile.target_gsd)
        if note:
            log.warning("%s", note)
        vector_s = 0.0

        def vectorise(prob: Path) -> Any:
            nonlocal vector_s
            t = time.perf_counter()
            polys = polygons_from_probability(
                prob, threshold=threshold, min_area_m2=min_area_m2, hole_area_m2=settings.hole_area_m2,
                simplify_px=settings.simplify_px, block_size=settings.block_size, scene=source.scene_id,
                pixel_size_m=reader.gsd_m, seed_threshold=seed_threshold,
            )  # fmt: skip
            vector_s = time.perf_counter() - t
            return polys

        # a new probability raster is vectorised while its COG is written; a reused one, from the COG
        prob_path, prob_summary, reused, raw = _ensure_probability(reader, settings, sp.folder, overwrite, model,
                                                                   vectorise)
        if reused:
            raw = vectorise(prob_path)
        t0 = time.perf_counter()
        # true metres: where outlines are regularised, and the GeoPackage's CRS
        out_crs = metric_crs_for(reader.transform, reader.crs, reader.width, reader.height)
        if settings.regularize:
            from ..regularize import regularize_footprints

            gdf = regularize_footprints(raw, pixel_size_m=reader.gsd_m, metric_crs=out_crs)
        else:
            gdf = raw
        write_geojson(gdf, sp.geojson)
        write_gpkg(gdf, sp.gpkg, crs=out_crs, more_layers={RAW_LAYER: raw} if settings.regularize else None)
        result = {
            "scene_id": source.scene_id,
            "prob_key": settings.prob_key,
            "prob": prob_summary,
            "vector": vector,
            "polygons": len(gdf),
            "crs": "" if reader.crs is None else reader.crs.to_string(),
            "area_km2": _area_km2(reader),
            "vector_seconds": vector_s + time.perf_counter() - t0,
            "geojson": str(sp.geojson),
            "gpkg": str(sp.gpkg),
            "prob_reused": reused,
        }
    write_record(sp.record, key, [sp.prob, sp.geojson, sp.gpkg], **result)
    return {**result, "skipped": False}


def _area_km2(reader: Any) -> float | None:
    gsd = getattr(reader, "gsd_m", None)
    return None if gsd is None else reader.width * reader.height * gsd * gsd / 1e6


# ---------------------------------------------------------------------------------------------------
# calibration: threshold x seed threshold x minimum area on the validation split


def calibrate_source(
    source: SceneSource,
    settings: PredictSettings,
    out_dir: str,
    thresholds: Sequence[float],
    seed_thresholds: Sequence[float | None],
    min_areas: Sequence[float],
    iou_threshold: float = 0.5,
    overwrite: bool = False,
    model: Model | None = None,
) -> dict[str, Any]:
    """Calibration counts of one labelled validation scene (its probability predicted first, or reused)."""
    from ..scenes import open_scene

    with open_scene(source, settings.data, settings.tile) as reader:
        if not reader.has_labels:
            raise InputError(source.image, "validation scene without labels: cannot calibrate on it")
        prob_path, *_ = _ensure_probability(reader, settings, Path(out_dir), overwrite, model)
        return scene_counts(reader, prob_path, thresholds, seed_thresholds, min_areas, iou_threshold,
                            settings.hole_area_m2, settings.simplify_px, settings.block_size)


def _log_scene_error(source: SceneSource, err: BaseException, out_dir: Path | None = None) -> None:
    if not isinstance(err, FootprintsError) and out_dir is not None and disk_full(out_dir):
        err = InputError(out_dir, "no space left on device")
    log.error("%s", err if isinstance(err, FootprintsError) else as_input_error(err, source.image))


def calibration_sample(sources: Sequence[SceneSource], cap: int, seed: int) -> list[SceneSource]:
    """At most `cap` of the validation `sources`: all of them when they are no more, else a seeded sample.

    The sample is the first `cap` ids of a permutation of the sorted scene ids drawn from
    `derive_seed(seed, "calibration")`: the same seed and ids give the same sample whatever their order,
    and a larger cap keeps the scenes of a smaller one (their probability rasters are reused). Sorted by id.
    """
    from ..training_data import derive_seed

    ordered = sorted(sources, key=lambda s: s.scene_id)
    if len(ordered) <= cap:
        return ordered
    order = np.random.default_rng(derive_seed(seed, "calibration")).permutation(len(ordered))
    return sorted((ordered[i] for i in order[:cap]), key=lambda s: s.scene_id)


def resolve_calibration(
    cfg: Config,
    settings: PredictSettings,
    checkpoint: Path | None,
    overwrite: bool = False,
    model: Model | None = None,
    use_run: bool = True,
    search: bool = True,
) -> dict[str, Any]:
    """Threshold and minimum area: from the config when both are set, else a stored calibration made for
    this checkpoint and grid, else a grid search on the validation split (stored in
    `outputs/<name>/predict/calibration.json` and beside the checkpoint), else 0.5 / 0 m2 with a warning.

    The grid search predicts and scores at most `predict.calibration_scenes` validation scenes: all of
    them when there are no more, else a sample seeded by `seed` (`calibration_sample`). The cap and the
    seed are part of the calibration's key, so changing either calibrates again.

    `use_run=False` (files given without a config) looks only beside the checkpoint, never at a run folder.
    `search=False` (`--checkpoint` with `--input`) never grid-searches and never writes a calibration: a
    stored one (made for this checkpoint first), else the defaults.
    """
    pcfg = cfg.predict
    paths = RunPaths.of(cfg)
    if not settings.watershed:
        seeds: list[float | None] = [None]
    else:
        seeds = [pcfg.seed_threshold] if pcfg.seed_threshold is not None else [float(t) for t in pcfg.seed_threshold_grid]
    if pcfg.threshold is not None and pcfg.min_area_m2 is not None and len(seeds) == 1:
        return {"threshold": pcfg.threshold, "seed_threshold": seeds[0], "min_area_m2": pcfg.min_area_m2,
                "source": "config"}
    thresholds = [pcfg.threshold] if pcfg.threshold is not None else [float(t) for t in pcfg.threshold_grid]
    areas = [pcfg.min_area_m2] if pcfg.min_area_m2 is not None else [float(a) for a in pcfg.min_area_grid]
    key = digest({"prob_params": settings.prob_params(), "threshold_grid": thresholds, "seed_grid": seeds,
                  "min_area_grid": areas, "hole_area_m2": settings.hole_area_m2, "simplify_px": settings.simplify_px,
                  "iou_threshold": cfg.evaluate.iou_threshold,
                  # which validation scenes: at most this many, a sample drawn from this seed
                  "calibration_scenes": pcfg.calibration_scenes, "sample_seed": cfg.seed})
    stage_path = paths.calibration
    beside = checkpoint.with_name(checkpoint.stem + ".calibration.json") if checkpoint is not None else None
    stored = [p for p in (stage_path if use_run else None, beside) if p is not None]
    if not overwrite:
        for path in stored:
            if is_fresh(path, key):
                cal = read_record(path) or {}
                log.info("calibration: threshold %.2f, min area %.1f m2 (from %s)", cal["threshold"],
                         cal["min_area_m2"], path)
                return {**cal, "source": str(path)}
    val = split_sources(paths.tile, cfg.data, "val") if search and use_run and paths.manifest.is_file() else []
    if not val:
        records = [(path, read_record(path)) for path in stored]
        # one made for this checkpoint first (the run's may be of another model)
        records.sort(key=lambda pr: (pr[1] or {}).get("checkpoint_key") != settings.fingerprint)
        for path, cal in records:
            if cal and "threshold" in cal:
                if cal.get("checkpoint_key") == settings.fingerprint:
                    log.info("calibration: threshold %.2f, min area %.1f m2, chosen for this checkpoint (%s)",
                             cal["threshold"], cal["min_area_m2"], path)
                else:
                    log.warning("calibration: no validation scenes here; using %s, made for another "
                                "checkpoint", path)
                return {**cal, "source": str(path)}
        default_t = pcfg.threshold if pcfg.threshold is not None else 0.5
        default_a = pcfg.min_area_m2 if pcfg.min_area_m2 is not None else 0.0
        default_s = seeds[-1] if seeds[0] is not None else None
        log.warning("calibration: %s and no stored calibration: threshold %.2f, min area %.1f m2 (set "
                    "predict.threshold / predict.min_area_m2 to choose)",
                    "no validation scenes" if search else "--checkpoint with --input does not calibrate",
                    default_t, default_a)
        return {"threshold": default_t, "seed_threshold": default_s, "min_area_m2": default_a, "source": "default"}
    sample = calibration_sample(val, pcfg.calibration_scenes, cfg.seed)
    how = " (a seeded sample, predict.calibration_scenes)" if len(sample) < len(val) else ""
    log.info("calibration: grid search over %d thresholds x %d seed thresholds x %d minimum areas on %d of %d "
             "validation scenes%s", len(thresholds), len(seeds), len(areas), len(sample), len(val), how)
    func = partial(calibrate_source, settings=settings, out_dir=str(paths.predict / "val"),
                   thresholds=thresholds, seed_thresholds=seeds, min_areas=areas,
                   iou_threshold=cfg.evaluate.iou_threshold, overwrite=overwrite, model=model)
    parts = []
    for source, result, err in map_scenes(cfg.cluster, func, sample, desc="calibrate"):
        if err is not None:
            _log_scene_error(source, err)
        else:
            parts.append(result)
    if not parts:
        raise StageError("calibration: no validation scene could be used (see the errors above); set "
                         "predict.threshold and predict.min_area_m2 to skip calibration")
    cal = choose_calibration(*sum_counts(parts))
    cal.update(scenes=sorted(p["scene_id"] for p in parts), validation_scenes=len(val),
               checkpoint=str(checkpoint or ""), checkpoint_key=settings.fingerprint)
    cal = write_record(stage_path, key, **cal)
    if beside is not None:
        try:
            write_record(beside, key, **{k: v for k, v in cal.items() if k not in ("key", "files")})
        except OSError as err:  # a read-only checkpoint folder: the stage copy is enough
            log.warning("calibration: cannot write %s (%s)", beside, err.strerror or err)
    b = cal["best"]
    log.info("calibration: threshold %.2f, seed threshold %s, min area %.1f m2 -> polygon F1 %.3f, pixel F1 "
             "%.3f on %d of %d validation scenes%s", cal["threshold"], cal["seed_threshold"], cal["min_area_m2"],
             b["polygon_f1"], b["pixel_f1"], len(parts), len(val), how)
    for key, values in cal["at_grid_edge"].items():
        log.warning("calibration: %s %s is at the edge of predict.%s %s: a wider grid may fit the validation "
                    "scenes better", key, cal[key], GRID_KEYS[key], values)
    return {**cal, "source": str(stage_path)}


# ---------------------------------------------------------------------------------------------------
# the stage


def _html_report(geojson: Path, scene_dir: Path, sources: Sequence[SceneSource], results: Sequence[dict[str, Any]],
                 cal: dict[str, Any]) -> str | None:
    """The offline HTML map of `--input` predictions beside the GeoJSON: a view, so it never fails the stage.

    Only the scenes predicted in this run are on it (a file that failed, e.g. a macOS `._x.tif`, is not: it
    has nothing to show, and an unreadable image must not cost the good scenes their page)."""
    from ..report import report_for_predictions

    done = {str(r["scene_id"]) for r in results}
    images = {s.scene_id: s.image for s in sources if s.scene_id in done}
    try:
        path = report_for_predictions(geojson, scene_dir=scene_dir, images=images, calibration=cal)["path"]
    except Exception as err:  # noqa: BLE001 - the report is a view; it must not fail the prediction
        log.warning("predict: no HTML report (%s)", err if isinstance(err, FootprintsError)
                    else f"{type(err).__name__}: {' '.join(str(err).split())}")
        return None
    print(f"HTML report: {path}", flush=True)
    return str(path)


def _checkpoint_info(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, config) of a segmenter checkpoint, read lazily (mmap) without building the model; a model
    with NaN or infinite weights is refused here, before any scene is read."""
    if not path.exists() and not path.is_symlink():
        raise StageError(f"{printable(path)}: no segmenter checkpoint (run train-segmenter first, or give --checkpoint)")
    ckpt = load_checkpoint(path, kind="segmenter", mmap=True, check_finite=True)
    meta, config = ckpt["meta"], ckpt.get("config")
    if not isinstance(meta, dict):
        raise InputError(path, "not a segmenter checkpoint ('meta' is not a mapping)")
    return dict(meta), dict(config) if isinstance(config, dict) else {}


def build_settings(cfg: Config, checkpoint: Path | None, meta: dict[str, Any], ckpt_config: dict[str, Any],
                   fingerprint: str) -> PredictSettings:
    """Worker settings: the model's tile size and GSD from its meta; scene reading from the config given,
    or, when no config file was given, from the config stored in the checkpoint (band choice, stretch,
    nodata), with the `data` keys a `--set` changed on top (a `--set` changes only the key it sets; a key
    --set to its default value cannot be told from one left alone and keeps the checkpoint's)."""
    data_cfg = cfg.data
    if cfg.config_file is None and ckpt_config.get("data"):
        # how the training scenes were read (bands, stretch, nodata), but never their per-scene
        # georeference: those transforms belong to the training data, not to the scenes predicted now
        stored = dataclasses.replace(config_from_dict({"data": ckpt_config["data"]}).data, geotransforms=None)
        default = DataConfig()
        changed = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(DataConfig)
                   if getattr(cfg.data, f.name) != getattr(default, f.name)}
        data_cfg = dataclasses.replace(stored, **changed)
    size = int(meta.get("tile_size") or cfg.tile.size)
    target_gsd = meta["target_gsd"] if "target_gsd" in meta else cfg.tile.target_gsd
    pcfg = cfg.predict
    return PredictSettings(
        checkpoint=str(checkpoint or ""), fingerprint=fingerprint, data=data_cfg,
        tile=TileConfig(size=size, stride=size, target_gsd=target_gsd), overlap=pcfg.overlap,
        batch_size=pcfg.batch_size, block_size=pcfg.block_size, tta_flips=pcfg.tta_flips,
        prob_dtype=pcfg.prob_dtype, device=pcfg.device, hole_area_m2=pcfg.hole_area_m2,
        simplify_px=pcfg.simplify_px, classes=tuple(meta.get("classes") or SCHEMES["binary"].classes),
        watershed=pcfg.instances == "watershed", regularize=pcfg.regularize,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# where outputs may go


def distinct_ids(sources: Sequence[SceneSource]) -> list[SceneSource]:
    """`sources` with scene ids that differ without regard to case: on a case-insensitive file system (macOS,
    Windows) `A.tif` and `a.tif` would write one `a.geojson`; the later ones get `<id>_2`, ... (a warning)."""
    taken = {s.scene_id.casefold() for s in sources}
    seen: set[str] = set()
    out = []
    for src in sources:
        sid = src.scene_id
        if sid.casefold() in seen:
            k = 2
            while f"{sid}_{k}".casefold() in taken:
                k += 1
            new = f"{sid}_{k}"
            log.warning("%s: scene id %r differs from another only by case; its outputs are named %s (a "
                        "case-insensitive file system would make them one)", src.image, sid, new)
            src = dataclasses.replace(src, name=new)
            taken.add(new.casefold())
        seen.add(src.scene_id.casefold())
        out.append(src)
    return out


def _scene_files(folder: Path, scene_id: str) -> tuple[Path, ...]:
    sp = ScenePaths(folder, scene_id)
    return sp.prob, sp.geojson, sp.gpkg, sp.record


def _holds_predictions(folder: Path) -> bool:
    """An existing scenes folder is predict's: empty (temporaries aside), or holding a scene record or a
    probability raster."""
    entries = [p for p in folder.iterdir() if not is_temporary(p)]
    if not entries:
        return True
    for p in entries:
        if p.name.endswith("_prob.tif"):
            return True
        if p.suffix == ".json" and (read_record(p) or {}).get("scene_id") == p.stem:
            return True
    return False


def _check_outputs(
    sources: Sequence[SceneSource], merged: dict[str, Path | None], scene_dir: Path, run_files: dict[str, Path],
    in_run: bool, given: Path | None = None,
) -> tuple[list[SceneSource], int, bool]:
    """Check every path the stage will write before anything is read or written.

    `merged`: what -> path (the merged GeoJSON, GeoPackage, the HTML report or None); `run_files`: what ->
    path of the files of the run that no output may replace (checkpoint, calibrations, summary). A problem
    of the run (an output onto an input, a label, a run file, a foreign file, a folder that cannot be
    written) is a `StageError` naming both files; a scene whose own files would meet the run's is left
    out with one line. Each path is resolved once (thousands of scenes cost thousands of lookups).
    `given`: the --output path, named in the messages about the files beside it.
    Returns (the scenes to predict, how many were left out, whether to write the report).
    """
    inputs = FileSet((f, (src, Path(f))) for src in sources for f in src.files())
    runs = FileSet((f, (name, f)) for name, f in run_files.items())
    written = {what: path for what, path in merged.items() if path is not None}
    write_report = "report" in written
    same_folder = [p for p in written.values() if path_key(p.parent) == path_key(scene_dir)]
    for what, path in written.items():
        if path.is_dir():
            raise StageError(f"{printable(path)}: a folder; --output must name a .geojson file (the GeoPackage, the "
                             "report and the scenes folder go beside it)")
        # the file the user named, and the output beside it when that is the one in the way
        where = (f"{printable(given)}: the {what}" if path == given or given is None
                 else f"{printable(given)}: the {what} beside it ({printable(path)})")
        hit = inputs.find(path)
        if hit is not None:
            src, f = hit
            kind = "image" if f == src.image else "labels" if f == src.label else "mask"
            raise StageError(f"{where} would overwrite {printable(f)}, the {kind} of scene {src.scene_id} (an input); "
                             "choose another --output")
        hit = runs.find(path)
        if hit is not None:
            name, f = hit
            raise StageError(f"{where} would overwrite {printable(f)}, the {name}; choose another --output")
        if what == "report":
            if path.exists() or path.is_symlink():
                from ..report.html import is_footprints_report

                if not is_footprints_report(path):
                    log.warning("predict: %s exists and is not a footprints report: no HTML report written (it "
                                "is left as it is)", printable(path))
                    write_report = False
        elif (path.exists() or path.is_symlink()) and not is_footprints_file(path):
            raise StageError(f"{printable(path)}: exists and is not a footprints layer; it is left as it is (choose "
                             "another --output, or move it away)")
    if scene_dir.exists() and not scene_dir.is_dir():
        raise StageError(f"{printable(scene_dir)}: exists and is not a folder (the per-scene outputs go there); choose "
                         "another --output, or move it away")
    folder = path_key(scene_dir).rstrip(os.sep) + os.sep
    for src in sources:
        for f in src.files():
            if path_key(f).startswith(folder):
                raise StageError(f"{printable(scene_dir)}: the per-scene output folder holds the input {printable(f)}; "
                                 "choose another --output (or move the inputs out of it)")
    if not in_run and scene_dir.is_dir() and not _holds_predictions(scene_dir):
        raise StageError(f"{printable(scene_dir)}: exists and holds files predict did not write (the per-scene "
                         "outputs go there); choose another --output, or move it away")
    for path in written.values():
        check_writable(path.parent)
    check_writable(scene_dir)  # itself when it exists (a read-only folder of an earlier run), else its parent
    # a scene's own files never replace the run's: the merged layers (an --output into the scenes folder
    # that names a scene's file is refused; the default names are reserved ids) and the run's files
    merged_names = {p.name.casefold(): p for p in same_folder}
    blocked = {p.name.casefold(): p for p in run_files.values() if path_key(p.parent) == path_key(scene_dir)}
    keep, refused = [], 0
    for src in sources:
        reason = reserved_scene_id(src.scene_id) if in_run else None
        own = _scene_files(scene_dir, src.scene_id)
        if reason is None:
            taken = next((merged_names[f.name.casefold()] for f in own if f.name.casefold() in merged_names), None)
            if taken is not None:
                raise StageError(f"{printable(taken)}: --output would overwrite scene {src.scene_id}'s own output; "
                                 "choose another --output")
            hit = next(((f, blocked[f.name.casefold()]) for f in own if f.name.casefold() in blocked), None)
            if hit is not None:
                reason = (f"scene id {src.scene_id!r} would write {hit[0].name} over {printable(hit[1])}, a file of the "
                          "run itself; rename the image (scene skipped)")
        if reason is not None:
            log.error("%s", InputError(src.image, reason))
            refused += 1
        else:
            keep.append(src)
    return keep, refused, write_report


def run(
    cfg: Config,
    overwrite: bool = False,
    checkpoint: str | Path | None = None,
    inputs: Sequence[str | Path] | None = None,
    output: str | Path | None = None,
    model: Model | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The predict stage: the test split (or `inputs`) -> probability COGs, per-scene and merged polygons.

    `model`/`meta` inject a model instead of loading the checkpoint (tests; the model must then be
    picklable when `cluster.workers > 0`). Returns {"geojson", "gpkg", "scenes", "failed", ...}.
    """
    t0 = time.perf_counter()
    pcfg = cfg.predict
    paths = RunPaths.of(cfg)
    out_path = check_output_text(output) if output else None  # before anything touches the file system
    if out_path is not None and out_path.suffix.lower() not in (".geojson", ".json"):
        raise StageError(f"{printable(out_path)}: --output must be a .geojson path (the GeoPackage goes beside it)")
    ckpt: Path | None = None
    ckpt_config: dict[str, Any] = {}
    if model is None:
        ckpt = check_output_text(checkpoint, "--checkpoint") if checkpoint else Path(pcfg.checkpoint or
                                                                                       paths.best_checkpoint)
        meta, ckpt_config = _checkpoint_info(ckpt)
        fingerprint = file_digest(ckpt)
    else:
        meta = dict(meta or {})
        fingerprint = str(meta.get("fingerprint", "injected-model"))
    settings = build_settings(cfg, ckpt, meta, ckpt_config, fingerprint)

    sources: list[SceneSource] = []
    bad_inputs = 0
    if inputs:
        from ..sources import sources_from_paths, unique_sources

        for item in inputs:
            try:
                sources += sources_from_paths([check_output_text(item, "--input")], settings.data)
            except FootprintsError as err:
                log.error("%s", err)
                bad_inputs += 1
        sources = distinct_ids(unique_sources(sources))
        geojson = out_path or paths.predict / "input" / "footprints.geojson"
        # the scenes in their own folder: no scene name can meet the merged layers, the report or a lock
        scene_dir = geojson.with_name(f"{geojson.stem}_scenes")
    else:
        sources = split_sources(paths.tile, cfg.data, pcfg.split)
        scene_dir = paths.predict
        geojson = out_path or scene_dir / "footprints.geojson"
    gpkg = geojson.with_suffix(".gpkg")
    if not sources:
        where = "the inputs given" if inputs else f"split {pcfg.split!r} of {paths.tile}"
        raise StageError(f"predict: no scenes in {where}")
    report = geojson.with_name(f"{geojson.stem}_report.html") if inputs else None
    run_files = {"segmenter checkpoint": ckpt, "checkpoint's calibration": (ckpt.with_name(ckpt.stem + ".calibration.json")
                 if ckpt is not None else None), "run's calibration": paths.calibration,
                 "run's predict summary": paths.predict / "summary.json"}
    sources, refused, with_report = _check_outputs(
        sources, {"merged GeoJSON": geojson, "merged GeoPackage": gpkg, "report": report}, scene_dir,
        {k: v for k, v in run_files.items() if v is not None}, in_run=not inputs, given=out_path)
    bad_inputs += refused
    if not sources:
        raise StageError(f"predict: no scene could be predicted ({bad_inputs} refused; see the errors above)")
    log.info("predict: %d scene(s), tile %d px, overlap %.0f%%, block %d px -> %s", len(sources),
             settings.tile.size, 100 * settings.overlap, settings.block_size, scene_dir)
    if inputs and remove_stale_temporaries(scene_dir):  # a run's own folder is cleaned by the runner
        log.info("predict: removed temporary files of an interrupted run from %s", scene_dir)

    # files given without a config file: the run folders under ./outputs belong to some other run (a --set
    # changes only the key it sets); a checkpoint given with --input reads its stored calibration, never
    # writes one
    use_run = not (inputs and cfg.config_file is None)
    search = not (inputs and checkpoint is not None)
    cal = resolve_calibration(cfg, settings, ckpt, overwrite=overwrite, model=model, use_run=use_run,
                              search=search)
    seed = cal.get("seed_threshold")
    func = partial(predict_source, settings=settings, out_dir=str(scene_dir), threshold=float(cal["threshold"]),
                   seed_threshold=None if seed is None else float(seed), min_area_m2=float(cal["min_area_m2"]),
                   overwrite=overwrite, model=model)
    results, failed = [], bad_inputs
    for source, result, err in map_scenes(cfg.cluster, func, sources, desc="predict"):
        if err is not None:
            _log_scene_error(source, err, scene_dir)
            failed += 1
        else:
            results.append(result)
    if not results:
        raise StageError(f"predict: no scene could be predicted ({failed} failed; see the errors above)")
    skipped = sum(bool(r.get("skipped")) for r in results)
    # the merged layers are up to date when every scene's record is (the run's summary is their record)
    record = None if inputs else scene_dir / "summary.json"
    key = digest({"scenes": {r["scene_id"]: file_digest(ScenePaths(scene_dir, r["scene_id"]).record)
                             for r in results}, "split": pcfg.split, "failed": failed,
                  "geojson": str(geojson)})
    if record is not None and is_fresh(record, key):
        log.info("predict: %s is complete (every scene and the merged layers); skipping", scene_dir)
        return {**(read_record(record) or {}), "up_to_date": True}
    n_polygons = merge_outputs(results, geojson, gpkg)
    summary = {
        "geojson": str(geojson),
        "gpkg": str(gpkg),
        "scenes": len(results),
        "failed": failed,
        "skipped": skipped,
        "polygons": n_polygons,
        "threshold": float(cal["threshold"]),
        "seed_threshold": seed,
        "min_area_m2": float(cal["min_area_m2"]),
        "calibration": cal.get("source"),
        "scene_dir": str(scene_dir),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if record is not None:
        # also what the evaluate stage reads: which split was predicted, with which calibration
        summary = write_record(record, key, [geojson, gpkg], **summary, split=pcfg.split)
    else:
        summary["report"] = _html_report(geojson, scene_dir, sources, results, cal) if with_report else None
    log.info("predict: %d scene(s) (%d skipped as done, %d failed), %d polygons -> %s and %s", len(results),
             skipped, failed, n_polygons, geojson, gpkg)
    return summary
