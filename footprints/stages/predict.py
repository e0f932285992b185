"""Stage 5, predict: whole scenes -> blended building probabilities (COG) -> footprint polygons.

For the test split of the run (or the scenes given with `--input`), per scene (on the dask cluster of
`footprints.cluster`): the probability raster (`footprints.inference`), then polygons
(`footprints.vectorize`) as `<scene>.geojson` (RFC 7946) and `<scene>.gpkg`, and `<scene>.json` last, the
scene's freshness record. A rerun skips a finished scene, re-vectorises one whose threshold or minimum
area changed, and redoes one whose model or inference parameters changed. The merged `footprints.geojson`
and `footprints.gpkg` cover every scene.

Threshold and minimum area come from the config, or from a calibration on the validation split
(`footprints.calibration`, stored in `predict/calibration.json` and beside the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import remove_stale_temporaries
from ..calibration import choose_calibration, scene_counts, sum_counts
from ..cluster import map_scenes
from ..config import GRID_KEYS, Config, DataConfig, TileConfig, config_from_dict
from ..contracts.checkpoints import load_checkpoint
from ..contracts.footprint_files import RAW_LAYER, merge_outputs, write_geojson, write_gpkg
from ..contracts.freshness import digest, file_digest, is_fresh, read_record, write_record
from ..contracts.manifest import split_sources
from ..contracts.paths import RunPaths, ScenePaths
from ..device import resolve_device
from ..errors import FootprintsError, InputError, StageError, as_input_error, disk_full
from ..geo import gpkg_crs_for_raster
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
    from ..scenes import open_scene

    sp = ScenePaths(Path(out_dir), source.scene_id)
    vector = {"threshold": threshold, "seed_threshold": seed_threshold, "min_area_m2": min_area_m2,
              "hole_area_m2": settings.hole_area_m2, "simplify_px": settings.simplify_px,
              "regularize": settings.regularize}
    key = digest({"prob": settings.prob_key, "vector": vector})
    if not overwrite and is_fresh(sp.record, key):
        return {**(read_record(sp.record) or {}), "skipped": True}
    with open_scene(source, settings.data, settings.tile) as reader:
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
        if settings.regularize:
            from ..regularize import regularize_footprints

            gdf = regularize_footprints(raw, pixel_size_m=reader.gsd_m)
        else:
            gdf = raw
        out_crs = gpkg_crs_for_raster(reader.transform, reader.crs, reader.width, reader.height)
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
) -> dict[str, Any]:
    """Threshold and minimum area: from the config when both are set, else a stored calibration made for
    this checkpoint and grid, else a grid search on the validation split (stored in
    `outputs/<name>/predict/calibration.json` and beside the checkpoint), else 0.5 / 0 m2 with a warning.

    The grid search predicts and scores at most `predict.calibration_scenes` validation scenes: all of
    them when there are no more, else a sample seeded by `seed` (`calibration_sample`). The cap and the
    seed are part of the calibration's key, so changing either calibrates again.

    `use_run=False` (files given without a config) looks only beside the checkpoint, never at a run folder.
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
    val = split_sources(paths.tile, cfg.data, "val") if use_run and paths.manifest.is_file() else []
    if not val:
        for path in stored:
            cal = read_record(path)
            if cal and "threshold" in cal:
                if cal.get("checkpoint_key") == settings.fingerprint:
                    log.info("calibration: threshold %.2f, min area %.1f m2, chosen for this checkpoint (%s)",
                             cal["threshold"], cal["min_area_m2"], path)
                else:
                    log.warning("calibration: no validation scenes here; using %s, made for another "
                                "checkpoint", path)
                return {**cal, "source": str(path)}
        log.warning("calibration: no validation scenes and no stored calibration: threshold %.2f, min area "
                    "%.1f m2 (set predict.threshold / predict.min_area_m2 to choose)", thresholds[0], areas[0])
        default_t = pcfg.threshold if pcfg.threshold is not None else 0.5
        default_a = pcfg.min_area_m2 if pcfg.min_area_m2 is not None else 0.0
        default_s = seeds[-1] if seeds[0] is not None else None
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


def _html_report(geojson: Path, scene_dir: Path, sources: Sequence[SceneSource], cal: dict[str, Any]) -> str | None:
    """The offline HTML map of `--input` predictions beside the GeoJSON: a view, so it never fails the stage."""
    from ..report import report_for_predictions

    try:
        path = report_for_predictions(geojson, scene_dir=scene_dir, images={s.scene_id: s.image for s in sources},
                                      calibration=cal)["path"]
    except Exception as err:  # noqa: BLE001 - the report is a view; it must not fail the prediction
        log.warning("predict: no HTML report (%s: %s)", type(err).__name__, err)
        return None
    print(f"HTML report: {path}", flush=True)
    return str(path)


def _checkpoint_info(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, config) of a segmenter checkpoint, read lazily (mmap) without building the model."""
    if not path.is_file():
        raise StageError(f"{path}: no segmenter checkpoint (run train-segmenter first, or give --checkpoint)")
    ckpt = load_checkpoint(path, kind="segmenter", mmap=True)
    return dict(ckpt["meta"]), dict(ckpt.get("config") or {})


def build_settings(cfg: Config, checkpoint: Path | None, meta: dict[str, Any], ckpt_config: dict[str, Any],
                   fingerprint: str) -> PredictSettings:
    """Worker settings: the model's tile size and GSD from its meta; scene reading from the config given,
    or, when none was given, from the config stored in the checkpoint (band choice, stretch, nodata)."""
    data_cfg = cfg.data
    if cfg.source == "<defaults>" and ckpt_config.get("data"):
        # how the training scenes were read (bands, stretch, nodata), but never their per-scene
        # georeference: those transforms belong to the training data, not to the scenes predicted now
        data_cfg = dataclasses.replace(config_from_dict({"data": ckpt_config["data"]}).data, geotransforms=None)
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
    ckpt: Path | None = None
    ckpt_config: dict[str, Any] = {}
    if model is None:
        ckpt = Path(checkpoint or pcfg.checkpoint or paths.best_checkpoint)
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
                sources += sources_from_paths([item], settings.data)
            except FootprintsError as err:
                log.error("%s", err)
                bad_inputs += 1
        sources = unique_sources(sources)
        geojson = Path(output) if output else paths.predict / "input" / "footprints.geojson"
        scene_dir = geojson.parent / f"{geojson.stem}_scenes" if output else geojson.parent
    else:
        sources = split_sources(paths.tile, cfg.data, pcfg.split)
        scene_dir = paths.predict
        geojson = Path(output) if output else scene_dir / "footprints.geojson"
    if geojson.suffix.lower() not in (".geojson", ".json"):
        raise StageError(f"{geojson}: --output must be a .geojson path (the GeoPackage goes beside it)")
    gpkg = geojson.with_suffix(".gpkg")
    if not sources:
        where = "the inputs given" if inputs else f"split {pcfg.split!r} of {paths.tile}"
        raise StageError(f"predict: no scenes in {where}")
    log.info("predict: %d scene(s), tile %d px, overlap %.0f%%, block %d px -> %s", len(sources),
             settings.tile.size, 100 * settings.overlap, settings.block_size, scene_dir)
    if inputs and remove_stale_temporaries(scene_dir):  # a run's own folder is cleaned by the runner
        log.info("predict: removed temporary files of an interrupted run from %s", scene_dir)

    # files given without a config: the run folders under ./outputs belong to some other run
    use_run = not (inputs and cfg.source == "<defaults>")
    cal = resolve_calibration(cfg, settings, ckpt, overwrite=overwrite, model=model, use_run=use_run)
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
                             for r in results}, "split": pcfg.split, "failed": failed})
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
        summary["report"] = _html_report(geojson, scene_dir, sources, cal)
    log.info("predict: %d scene(s) (%d skipped as done, %d failed), %d polygons -> %s and %s", len(results),
             skipped, failed, n_polygons, geojson, gpkg)
    return summary

