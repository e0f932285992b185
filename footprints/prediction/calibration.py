"""Where predict's threshold, seed threshold and minimum area come from, and where a calibration is stored.

`resolve_calibration` answers, in order: the config (when it sets every value), a stored calibration made
for this checkpoint and grid (`predict/calibration.json`, or the copy beside the checkpoint,
`checkpoint_calibration`), a grid search on the validation split (`footprints.scoring.calibration` chooses; each
scene is predicted and counted by `calibrate_source`, at most `predict.calibration_scenes` of them, the
seeded sample of `calibration_sample`), else 0.5 / 0 m2 with a warning. A grid search is stored in both
places, so that `predict --checkpoint ... --input ...` finds it beside the checkpoint later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GRID_KEYS, Config
from ..contracts.freshness import digest, is_fresh, read_record, write_record
from ..contracts.manifest import split_sources
from ..contracts.paths import RunPaths
from ..errors import InputError, StageError
from ..runtime.cluster import map_scenes
from ..scenes.sources import SceneSource
from ..scoring.calibration import choose_calibration, scene_counts, sum_counts
from .scene import PredictSettings, ensure_probability, gsd_note, log_scene_error, open_for_model

log = logging.getLogger(__name__)


def checkpoint_calibration(checkpoint: Path) -> Path:
    """The copy of a calibration stored beside the checkpoint it was made for (`best.calibration.json`)."""
    return checkpoint.with_name(checkpoint.stem + ".calibration.json")


def _store_beside(beside: Path, key: str, cal: dict[str, Any]) -> None:
    """The copy of a calibration beside its checkpoint (a read-only checkpoint folder: the run's is enough)."""
    try:
        write_record(beside, key, **{k: v for k, v in cal.items() if k not in ("key", "files")})
    except OSError as err:
        log.warning("calibration: cannot write %s (%s)", beside, err.strerror or err)


def calibrate_source(
    source: SceneSource,
    settings: PredictSettings,
    out_dir: str,
    thresholds: Sequence[float],
    seed_thresholds: Sequence[float | None],
    min_areas: Sequence[float],
    iou_threshold: float = 0.5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Calibration counts of one labelled validation scene (its probability predicted first, or reused)."""
    # read as predict reads it (at the model's GSD when its own is outside the training scenes')
    with open_for_model(source, settings) as (reader, scene_settings):
        if not reader.has_labels:
            raise InputError(source.image, "validation scene without labels: cannot calibrate on it")
        prob_path, summary, *_ = ensure_probability(reader, scene_settings, Path(out_dir), overwrite)
        counts = scene_counts(reader, prob_path, thresholds, seed_thresholds, min_areas, iou_threshold,
                              settings.hole_area_m2, settings.simplify_px, settings.block_size)
    # the GSDs it was read at, for the line the main process logs (`gsd_note`)
    return {**counts, "gsd": {k: summary[k] for k in ("target_gsd_m", "native_gsd_m") if k in summary}}


def calibration_sample(sources: Sequence[SceneSource], cap: int, seed: int) -> list[SceneSource]:
    """At most `cap` of the validation `sources`: all of them when they are no more, else a seeded sample.

    The sample is the first `cap` ids of a permutation of the sorted scene ids drawn from
    `derive_seed(seed, "calibration")`: the same seed and ids give the same sample whatever their order,
    and a larger cap keeps the scenes of a smaller one (their probability rasters are reused). Sorted by id.
    """
    from ..training.data import derive_seed

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
    beside = checkpoint_calibration(checkpoint) if checkpoint is not None else None
    stored = [p for p in (stage_path if use_run else None, beside) if p is not None]
    if not overwrite:
        for path in stored:
            if is_fresh(path, key):
                cal = read_record(path) or {}
                log.info("calibration: threshold %.2f, min area %.1f m2 (from %s)", cal["threshold"],
                         cal["min_area_m2"], path)
                if path == stage_path and beside is not None and search and not is_fresh(beside, key):
                    _store_beside(beside, key, cal)  # the copy `predict --checkpoint ... --input` reads
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
        # the values used, each of them (the seed threshold too where the watershed splits buildings)
        seed_text = "" if default_s is None else f", seed threshold {default_s:.2f}"
        log.warning("calibration: %s and no stored calibration: threshold %.2f%s, min area %.1f m2 (set "
                    "predict.threshold / predict.min_area_m2 to choose)",
                    "no validation scenes" if search else "--checkpoint with --input does not calibrate",
                    default_t, seed_text, default_a)
        return {"threshold": default_t, "seed_threshold": default_s, "min_area_m2": default_a, "source": "default"}
    sample = calibration_sample(val, pcfg.calibration_scenes, cfg.seed)
    how = " (a seeded sample, predict.calibration_scenes)" if len(sample) < len(val) else ""
    log.info("calibration: grid search over %d thresholds x %d seed thresholds x %d minimum areas on %d of %d "
             "validation scenes%s", len(thresholds), len(seeds), len(areas), len(sample), len(val), how)
    func = partial(calibrate_source, settings=settings, out_dir=str(paths.calibration_scenes),
                   thresholds=thresholds, seed_thresholds=seeds, min_areas=areas,
                   iou_threshold=cfg.evaluate.iou_threshold, overwrite=overwrite)
    parts = []
    for source, result, err in map_scenes(cfg.cluster, func, sample, desc="calibrate"):
        if err is not None:
            log_scene_error(source, err)
        else:
            parts.append(result)
            note = gsd_note(source.scene_id, result.get("gsd") or {}, settings)
            if note:
                log.info("calibration: %s", note)
    if not parts:
        raise StageError("calibration: no validation scene could be used (see the errors above); set "
                         "predict.threshold and predict.min_area_m2 to skip calibration")
    cal = choose_calibration(*sum_counts(parts))
    cal.update(scenes=sorted(p["scene_id"] for p in parts), validation_scenes=len(val),
               checkpoint=str(checkpoint or ""), checkpoint_key=settings.fingerprint)
    cal = write_record(stage_path, key, **cal)
    if beside is not None:
        _store_beside(beside, key, cal)
    b = cal["best"]
    log.info("calibration: threshold %.2f, seed threshold %s, min area %.1f m2 -> polygon F1 %.3f, pixel F1 "
             "%.3f on %d of %d validation scenes%s", cal["threshold"], cal["seed_threshold"], cal["min_area_m2"],
             b["polygon_f1"], b["pixel_f1"], len(parts), len(val), how)
    for key, values in cal["at_grid_edge"].items():
        log.warning("calibration: %s %s is at the edge of predict.%s %s: a wider grid may fit the validation "
                    "scenes better", key, cal[key], GRID_KEYS[key], values)
    return {**cal, "source": str(stage_path)}
