"""Stage 5, predict: whole scenes -> blended building probabilities (COG) -> footprint polygons.

For the test split of the run (or the scenes given with `--input`), per scene (on the dask cluster of
`footprints.runtime.cluster`): the probability raster (`footprints.prediction.scene`, `footprints.polygons.inference`), then
polygons (`footprints.polygons.vectorize`) as `<scene>.geojson` (RFC 7946) and `<scene>.gpkg`, and `<scene>.json`
last, the scene's freshness record (`footprints.contracts.predict_records`). A rerun skips a finished scene,
re-vectorises one whose threshold or minimum area changed, and redoes one whose model or inference
parameters changed. The merged `footprints.geojson` and `footprints.gpkg` cover every scene; for the run's
split, `summary.json` is their record.

Where the files go: the test split's scenes in `<run>/predict/` beside the merged layers (a scene id that
is a name of the run's own files, `footprints`/`summary`/`calibration`, is refused with one line); the
scenes of `--input` always in their own folder `<stem>_scenes/` beside the merged `<stem>.geojson`
(`--output`, default `<run>/predict/input/footprints.geojson`), so no scene name can meet the run's files.
Before any scene is predicted the outputs are checked (`footprints.prediction.outputs.check_outputs`): never
an input image, label or mask, never a file of the run (checkpoint, calibration, summary), never an
existing file footprints did not write, always a folder that can be written; each problem is one line
naming the files.

Threshold and minimum area come from the config, or from a calibration on the validation split
(`footprints.prediction.calibration`, stored in `predict/calibration.json` and beside the checkpoint). Scenes
given with `--checkpoint` and `--input` never calibrate: they read the calibration stored beside the
checkpoint (or the run's, or the config's values), and rewrite none. A run with no scene in its split
(no test split: a model to deploy, every labelled scene trained or validated on) predicts nothing, says so
in one line, and still calibrates on its validation split, beside the checkpoint.

Scale follows the model: a scene whose ground sample distance lies outside the model's training scenes'
(the checkpoint's `training_gsd`, `footprints.contracts.model_gsd`) is read at their median GSD, one log
line per scene (`predict.match_model_gsd`; a checkpoint with `tile.target_gsd` resamples every scene to it).

Out of domain: a checkpoint that stores what its training pixels looked like (`domain_reference`,
`footprints.model.domain`) gets each scene scored (`footprints.prediction.domain`); the score goes into the
scene's record, every footprint's `domain_score` and the HTML report, and a scene above `predict.domain_warn`
(or the model's validation scenes' largest score, when higher) gets one warning line. An older checkpoint
gives no score and no column.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temporaries
from ..config import Config, DataConfig, TileConfig, config_from_dict
from ..contracts.checkpoints import load_checkpoint
from ..contracts.footprint_files import RAW_LAYER, merge_outputs, write_geojson, write_gpkg
from ..contracts.freshness import digest, file_digest, is_fresh
from ..contracts.manifest import split_scene_ids, split_sources
from ..contracts.model_gsd import TRAINING_GSD, gsd_range
from ..contracts.paths import RunPaths, ScenePaths, check_output_text
from ..contracts.predict_records import (
    PredictSceneRecord,
    PredictSummary,
    VectorSettings,
    read_predict_scene_record,
    read_predict_summary,
    write_predict_scene_record,
    write_predict_summary,
)
from ..errors import FootprintsError, InputError, StageError, printable
from ..model.domain import REFERENCE_KEY, usable_reference, warn_threshold
from ..prediction.calibration import checkpoint_calibration, resolve_calibration
from ..prediction.domain import domain_warning, score_for_predict
from ..prediction.outputs import check_outputs, distinct_ids
from ..prediction.scene import (
    PredictSettings,
    Vectoriser,
    ensure_probability,
    gsd_note,
    log_scene_error,
    open_for_model,
)
from ..runtime.cluster import map_scenes
from ..scenes.geo import metric_crs_for
from ..scenes.sources import SceneSource
from ..scenes.targets import SCHEMES

log = logging.getLogger(__name__)


def predict_source(
    source: SceneSource,
    settings: PredictSettings,
    out_dir: str,
    threshold: float,
    min_area_m2: float,
    seed_threshold: float | None = None,
    overwrite: bool = False,
) -> tuple[PredictSceneRecord, bool]:
    """One scene: probability COG, then polygons as `<scene>.geojson` (RFC 7946) and `<scene>.gpkg`
    (layer `footprints`, and `footprints_raw` with the outlines before regularisation). Returns the scene's
    record and whether it was already done (then nothing was written)."""
    sp = ScenePaths(Path(out_dir), source.scene_id)
    vector = VectorSettings(threshold=threshold, seed_threshold=seed_threshold, min_area_m2=min_area_m2,
                            hole_area_m2=settings.hole_area_m2, simplify_px=settings.simplify_px,
                            regularize=settings.regularize)
    key = digest({"prob": settings.prob_key, "vector": vector.as_json()})
    if not overwrite and is_fresh(sp.record, key):
        done = read_predict_scene_record(sp.record)
        if done is not None:
            return done, True
    previous = None if overwrite else read_predict_scene_record(sp.record)  # its domain score, if still valid
    # the scene's own settings: its target GSD when it is read at the model's (prob_key says so)
    with open_for_model(source, settings) as (reader, scene_settings):
        vectorise = Vectoriser(vector, settings.block_size, source.scene_id, reader.gsd_m)
        # a new probability raster is vectorised while its COG is written; a reused one, from the COG
        prob_path, prob_summary, reused, raw = ensure_probability(reader, scene_settings, sp.folder, overwrite,
                                                               vectorise)
        if reused:
            raw = vectorise(prob_path)
        score = score_for_predict(reader, scene_settings, previous)
        t0 = time.perf_counter()
        # true metres: where outlines are regularised, and the GeoPackage's CRS
        out_crs = metric_crs_for(reader.transform, reader.crs, reader.width, reader.height)
        if settings.regularize:
            from ..polygons.regularize import regularize_footprints

            gdf = regularize_footprints(raw, pixel_size_m=reader.gsd_m, metric_crs=out_crs)
        else:
            gdf = raw
        if score is not None:  # every footprint of the scene carries it, after the fixed columns
            gdf, raw = gdf.assign(domain_score=score), raw.assign(domain_score=score)
        write_geojson(gdf, sp.geojson)
        write_gpkg(gdf, sp.gpkg, crs=out_crs, more_layers={RAW_LAYER: raw} if settings.regularize else None)
        record = PredictSceneRecord(
            scene_id=source.scene_id, prob_key=scene_settings.prob_key, prob=prob_summary, vector=vector,
            polygons=len(gdf), crs="" if reader.crs is None else reader.crs.to_string(), area_km2=_area_km2(reader),
            vector_seconds=vectorise.seconds + time.perf_counter() - t0, geojson=str(sp.geojson),
            gpkg=str(sp.gpkg), prob_reused=reused, key=key, domain_score=score,
        )  # fmt: skip
    return write_predict_scene_record(sp.record, record, [sp.prob, sp.geojson, sp.gpkg]), False


def _area_km2(reader: Any) -> float | None:
    gsd = getattr(reader, "gsd_m", None)
    return None if gsd is None else reader.width * reader.height * gsd * gsd / 1e6


def _html_report(geojson: Path, scene_dir: Path, sources: Sequence[SceneSource],
                 records: Sequence[PredictSceneRecord], cal: dict[str, Any]) -> str | None:
    """The offline HTML map of `--input` predictions beside the GeoJSON: a view, so it never fails the stage.

    Only the scenes predicted in this run are on it (a file that failed, e.g. a macOS `._x.tif`, is not: it
    has nothing to show, and an unreadable image must not cost the good scenes their page)."""
    from ..report import report_for_predictions

    done = {r.scene_id for r in records}
    images = {s.scene_id: s.image for s in sources if s.scene_id in done}
    try:
        path = report_for_predictions(geojson, scene_dir=scene_dir, images=images, calibration=cal)["path"]
    except Exception as err:  # noqa: BLE001 - the report is a view; it must not fail the prediction
        log.warning("predict: no HTML report (%s)", err if isinstance(err, FootprintsError)
                    else f"{type(err).__name__}: {' '.join(str(err).split())}")
        return None
    print(f"HTML report: {path}", flush=True)
    return str(path)


# ---------------------------------------------------------------------------------------------------
# the model's settings


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
    """Worker settings: the model's tile size and GSD from its meta (`target_gsd`, and `training_gsd`: the
    GSDs of its training scenes, which scenes outside them are read at with `predict.match_model_gsd`);
    scene reading from the config given, or, when no config file was given, from the config stored in the
    checkpoint (band choice, stretch, nodata), with the `data` keys a `--set` changed on top (a `--set`
    changes only the key it sets; a key --set to its default value cannot be told from one left alone and
    keeps the checkpoint's)."""
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
    # the training scenes' GSD (a checkpoint made before the record has none: target_gsd alone, as before);
    # with a target_gsd every scene is resampled to it anyway
    trained_at = gsd_range(meta.get(TRAINING_GSD))
    match = trained_at if pcfg.match_model_gsd and not target_gsd else None
    reference = usable_reference(meta.get(REFERENCE_KEY), meta.get("in_channels"))
    return PredictSettings(
        checkpoint=str(checkpoint or ""), fingerprint=fingerprint, data=data_cfg,
        tile=TileConfig(size=size, stride=size, target_gsd=target_gsd), overlap=pcfg.overlap,
        batch_size=pcfg.batch_size, block_size=pcfg.block_size, tta_flips=pcfg.tta_flips,
        prob_dtype=pcfg.prob_dtype, device=pcfg.device, hole_area_m2=pcfg.hole_area_m2,
        simplify_px=pcfg.simplify_px, classes=tuple(meta.get("classes") or SCHEMES["binary"].classes),
        watershed=pcfg.instances == "watershed", regularize=pcfg.regularize, model_gsd=match,
        training_gsd=trained_at, domain=reference is not None,
        domain_warn=None if reference is None else warn_threshold(reference, pcfg.domain_warn), amp=pcfg.amp,
        compile=pcfg.compile,
    )  # fmt: skip


def checkpoint_settings(cfg: Config, checkpoint: Path) -> PredictSettings:
    """The worker settings of a segmenter checkpoint file: its meta and stored config (`build_settings`),
    and the digest of its bytes as the model's fingerprint."""
    meta, ckpt_config = _checkpoint_info(checkpoint)
    return build_settings(cfg, checkpoint, meta, ckpt_config, file_digest(checkpoint))


def _calibrate_only(cfg: Config, settings: PredictSettings, ckpt: Path, overwrite: bool, t0: float) -> dict[str, Any]:
    """A run whose predict split has no scenes (no test split: every labelled scene trains or validates, as
    a model to deploy is made): nothing to predict, said in one line, but the calibration is made on the
    validation split and stored beside the checkpoint, where `predict --checkpoint ... --input ...` reads
    it. The summary records the split with no scene (evaluate then says there is nothing to evaluate)."""
    pcfg = cfg.predict
    paths = RunPaths.of(cfg)
    cal = resolve_calibration(cfg, settings, ckpt, overwrite=overwrite)
    beside = checkpoint_calibration(ckpt)
    where = (f"the calibration is stored beside the checkpoint, {beside}" if cal.get("source") not in
             ("config", "default") and beside.is_file() else f"calibration: {cal.get('source')}")
    log.info("predict: split %r of %s has no scenes (a run with no %s split): nothing to predict; %s",
             pcfg.split, paths.tile, pcfg.split, where)
    seed = cal.get("seed_threshold")
    key = digest({"scenes": {}, "split": pcfg.split, "calibration": [
        float(cal["threshold"]), seed, float(cal["min_area_m2"]), cal.get("source")]})
    record = paths.predict_summary
    if not overwrite and is_fresh(record, key):
        saved = read_predict_summary(record)
        return {**(saved.as_json() if saved is not None else {}), "up_to_date": True}
    summary = PredictSummary(
        geojson="", gpkg="", scenes=0, failed=0, skipped=0, polygons=0, threshold=float(cal["threshold"]),
        seed_threshold=None if seed is None else float(seed), min_area_m2=float(cal["min_area_m2"]),
        calibration=cal.get("source"), scene_dir=str(paths.predict), seconds=round(time.perf_counter() - t0, 2),
        split=pcfg.split, key=key,
    )  # fmt: skip
    return write_predict_summary(record, summary, []).as_json()


# ---------------------------------------------------------------------------------------------------
# the stage


def run(
    cfg: Config,
    overwrite: bool = False,
    checkpoint: str | Path | None = None,
    inputs: Sequence[str | Path] | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """The predict stage: the test split (or `inputs`) -> probability COGs, per-scene and merged polygons.

    Returns the fields of `PredictSummary` ({"geojson", "gpkg", "scenes", "failed", ...}): for the run's
    split as its record holds them, for `inputs` with the HTML report's path.
    """
    t0 = time.perf_counter()
    pcfg = cfg.predict
    paths = RunPaths.of(cfg)
    out_path = check_output_text(output) if output else None  # before anything touches the file system
    if out_path is not None and out_path.suffix.lower() not in (".geojson", ".json"):
        raise StageError(f"{printable(out_path)}: --output must be a .geojson path (the GeoPackage goes beside it)")
    ckpt = check_output_text(checkpoint, "--checkpoint") if checkpoint else Path(pcfg.checkpoint or
                                                                                   paths.best_checkpoint)
    settings = checkpoint_settings(cfg, ckpt)

    sources: list[SceneSource] = []
    bad_inputs = 0
    if inputs:
        from ..scenes.sources import sources_from_paths, unique_sources

        for item in inputs:
            try:
                sources += sources_from_paths([check_output_text(item, "--input")], settings.data)
            except FootprintsError as err:
                log.error("%s", err)
                bad_inputs += 1
        sources = distinct_ids(unique_sources(sources))
        geojson = out_path or paths.input_footprints
        # the scenes in their own folder: no scene name can meet the merged layers, the report or a lock
        scene_dir = geojson.with_name(f"{geojson.stem}_scenes")
    else:
        sources = split_sources(paths.tile, cfg.data, pcfg.split)
        scene_dir = paths.predict
        geojson = out_path or paths.footprints_geojson
        if not sources and paths.manifest.is_file() and not split_scene_ids(paths.tile, pcfg.split):
            return _calibrate_only(cfg, settings, ckpt, overwrite, t0)
    gpkg = geojson.with_suffix(".gpkg")
    if not sources:
        where = "the inputs given" if inputs else f"split {pcfg.split!r} of {paths.tile}"
        raise StageError(f"predict: no scenes in {where}")
    report = geojson.with_name(f"{geojson.stem}_report.html") if inputs else None
    run_files = {"segmenter checkpoint": ckpt, "checkpoint's calibration": checkpoint_calibration(ckpt),
                 "run's calibration": paths.calibration, "run's predict summary": paths.predict_summary}
    sources, refused, with_report = check_outputs(
        sources, {"merged GeoJSON": geojson, "merged GeoPackage": gpkg, "report": report}, scene_dir, run_files,
        in_run=not inputs, given=out_path)
    bad_inputs += refused
    if not sources:
        raise StageError(f"predict: no scene could be predicted ({bad_inputs} refused; see the errors above)")
    log.info("predict: %d scene(s), tile %d px, overlap %.0f%%, block %d px -> %s", len(sources),
             settings.tile.size, 100 * settings.overlap, settings.block_size, scene_dir)
    if settings.domain and settings.domain_warn is not None and settings.domain_warn != cfg.predict.domain_warn:
        log.info("predict: domain warning above %g, the largest score of the model's validation scenes (above "
                 "predict.domain_warn %g)", settings.domain_warn, cfg.predict.domain_warn)
    if not settings.domain:
        log.info("predict: %s holds no out-of-domain reference (made before the check, or its backbone was "
                 "trained): no domain score", printable(ckpt))
    if inputs and remove_stale_temporaries(scene_dir):  # a run's own folder is cleaned by the runner
        log.info("predict: removed temporary files of an interrupted run from %s", scene_dir)

    # files given without a config file: the run folders under ./outputs belong to some other run (a --set
    # changes only the key it sets); a checkpoint given with --input reads its stored calibration, never
    # writes one
    use_run = not (inputs and cfg.config_file is None)
    search = not (inputs and checkpoint is not None)
    cal = resolve_calibration(cfg, settings, ckpt, overwrite=overwrite, use_run=use_run, search=search)
    seed = cal.get("seed_threshold")
    func = partial(predict_source, settings=settings, out_dir=str(scene_dir), threshold=float(cal["threshold"]),
                   seed_threshold=None if seed is None else float(seed), min_area_m2=float(cal["min_area_m2"]),
                   overwrite=overwrite)
    records: list[PredictSceneRecord] = []
    failed, skipped = bad_inputs, 0
    for source, result, err in map_scenes(cfg.cluster, func, sources, desc="predict"):
        if err is not None:
            log_scene_error(source, err, scene_dir)
            failed += 1
        else:
            records.append(result[0])
            skipped += bool(result[1])
            note = gsd_note(source.scene_id, result[0].prob, settings)
            if note:
                log.info("predict: %s", note)
            far = domain_warning(source.scene_id, result[0].domain_score, settings.domain_warn)
            if far:
                log.warning("predict: %s", far)
    if not records:
        raise StageError(f"predict: no scene could be predicted ({failed} failed; see the errors above)")
    # the merged layers are up to date when every scene's record is (the run's summary is their record)
    record = None if inputs else paths.predict_summary
    key = digest({"scenes": {r.scene_id: file_digest(ScenePaths(scene_dir, r.scene_id).record) for r in records},
                  "split": pcfg.split, "failed": failed, "geojson": str(geojson)})
    if record is not None and is_fresh(record, key):
        log.info("predict: %s is complete (every scene and the merged layers); skipping", scene_dir)
        saved = read_predict_summary(record)
        return {**(saved.as_json() if saved is not None else {}), "up_to_date": True}
    n_polygons = merge_outputs([r.as_json() for r in records], geojson, gpkg)
    summary = PredictSummary(
        geojson=str(geojson), gpkg=str(gpkg), scenes=len(records), failed=failed, skipped=skipped,
        polygons=n_polygons, threshold=float(cal["threshold"]), seed_threshold=seed,
        min_area_m2=float(cal["min_area_m2"]), calibration=cal.get("source"), scene_dir=str(scene_dir),
        seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    if record is not None:
        # also what the evaluate stage reads: which split was predicted, with which calibration
        out = write_predict_summary(record, dataclasses.replace(summary, split=pcfg.split, key=key),
                                    [geojson, gpkg]).as_json()
    else:
        out = {**summary.fields(), "report": _html_report(geojson, scene_dir, sources, records, cal)
               if with_report else None}
    log.info("predict: %d scene(s) (%d skipped as done, %d failed), %d polygons -> %s and %s", len(records),
             skipped, failed, n_polygons, geojson, gpkg)
    return out
