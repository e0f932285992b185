"""Stage `damage` (a config with a `damage:` section): a damage grade on every footprint of the test split, and
the damage scores where the post scenes are graded; also `footprints damage --pre --post --footprints`.

Per test scene (the pre-disaster scenes of predict's split) and its post-disaster twin, on the dask cluster of
`cluster:` (the model loaded once per worker):
- predict's footprints (`predict/<scene>.gpkg`) graded by the damage model (train-damage/best.pt, or
  `--checkpoint`): `damage/scenes/<scene>.geojson` and `.gpkg`, every footprint with its properties plus
  `damage` and the four grades' probabilities (`footprints.scoring.damage.PROBABILITY_KEYS`); merged into
  `damage/footprints.geojson` and `damage/footprints.gpkg` (its default QGIS style colours by grade);
- when the post label grades its buildings: the truth buildings graded too (per-building confusion: the
  grading alone, on the true outlines), and xView2's pixel scores of the graded footprints (each truth
  building pixel against the grade of the footprint over it, or "not found"; localisation F1 over the same
  pixels), in `damage/metrics.json` (pooled, and per scene).

Each scene's outcome is recorded last (`damage/scenes/<scene>.json`, with the key of the model, predict's
footprints and the pair's files): a rerun skips the finished scenes, so a killed stage resumes; a bad pair is
one error line and the other scenes complete.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, config_from_dict
from ..contracts.features_store import write_shard
from ..contracts.footprint_files import LAYER, merge_outputs, read_footprints, write_geojson, write_gpkg
from ..contracts.freshness import digest, file_digest, file_stamp, is_fresh, read_record, unmark, write_record
from ..contracts.paths import RunPaths, ScenePaths, check_output_text, same_file
from ..errors import InputError, StageError, as_input_error, printable
from ..model.device import resolve_device
from ..prediction.damage import (
    DamageModel,
    damage_model_for,
    graded_columns,
    labelled_buildings,
    load_damage_model,
    pair_stamp,
    pre_disaster_scenes,
)
from ..runtime.cluster import map_scenes
from ..scenes.geo import affine_geometries
from ..scenes.grades import DAMAGE_KEY, GRADES
from ..scenes.pairs import open_pair
from ..scenes.sources import SceneSource, sources_from_paths
from ..scoring.damage import damage_headlines, damage_scores, grade_confusion, pool_damage
from ..training.damage import BASELINE_ARRAYS, baseline_grades, read_graded_buildings

log = logging.getLogger(__name__)

NOT_FOUND = len(GRADES)  # the pixel confusion's fifth column: a truth pixel under no graded footprint


def run(cfg: Config, overwrite: bool = False, checkpoint: str | None = None) -> dict[str, Any]:
    """The `damage` stage; returns metrics.json's content."""
    if cfg.damage is None:
        raise StageError("damage: the config has no damage: section (add one to grade damage)")
    paths = RunPaths.of(cfg)
    t0 = time.perf_counter()
    ckpt = Path(checkpoint) if checkpoint else paths.damage_checkpoint
    model_key = file_digest(ckpt) if ckpt.is_file() else ""
    # a bad checkpoint: one line before any scene; the model stays cached for scenes graded in this process
    damage_model_for(ckpt, model_key, str(resolve_device(cfg.damage.device, key="damage.device")))
    scene_dir = paths.damage_scenes
    scene_dir.mkdir(parents=True, exist_ok=True)
    scenes = pre_disaster_scenes(cfg.data, paths.tile, (cfg.predict.split,))
    keys = {src.scene_id: digest({"model": model_key, "footprints": file_stamp(ScenePaths(paths.predict,
            src.scene_id).gpkg), "pair": pair_stamp(src)}) for src in scenes}
    run_key = digest({"scenes": keys, "split": cfg.predict.split, "baselines": cfg.damage.baselines})
    if not overwrite and is_fresh(paths.damage_metrics, run_key):
        log.info("damage: %s is complete (same model, footprints and scenes); skipping", paths.damage)
        return {**(read_record(paths.damage_metrics) or {}), "skipped": True}
    unmark(paths.damage_metrics)
    done = {s.scene_id: read_record(scene_dir / f"{s.scene_id}.json") for s in scenes
            if not overwrite and is_fresh(scene_dir / f"{s.scene_id}.json", keys[s.scene_id])}
    failed = []
    # each pair on the cluster (dask workers, `cluster:`), the model loaded once per worker
    func = functools.partial(_grade_item, cfg=cfg, checkpoint=str(ckpt), model_key=model_key,
                             predict_dir=str(paths.predict), scene_dir=str(scene_dir), keys=keys)
    for src, result, err in map_scenes(cfg.cluster, func, [s for s in scenes if s.scene_id not in done],
                                       desc="damage"):
        if err is not None:
            reason = printable(as_input_error(err, src.image))
            log.error("damage: %s", reason)
            failed.append({"scene": src.scene_id, "reason": reason})
        else:
            done[src.scene_id] = result
    results = [done[s.scene_id] for s in scenes if s.scene_id in done]  # the scenes' order, whatever finished first
    if not scenes:
        log.warning("damage: no pre-disaster scene in split %r; nothing graded", cfg.predict.split)
    layers = [{"scene_id": r["scene"], "crs": r["crs"], "geojson": r["geojson"], "gpkg": r["gpkg"]} for r in results]
    polygons = merge_outputs(layers, paths.damage_geojson, paths.damage_gpkg)
    metrics = _pooled(results)
    if cfg.damage.baselines and metrics["per_building"] is not None:
        metrics["baselines"] = _baselines(cfg, paths, ckpt, results)
    metrics.update({"checkpoint": str(ckpt), "scenes": len(results), "failed": failed, "polygons": polygons,
                    "seconds": round(time.perf_counter() - t0, 2)})
    # a scene that failed is retried by the next run (the finished ones are skipped by their records)
    metrics = write_record(paths.damage_metrics, "" if failed else run_key, [paths.damage_geojson,
                                                                            paths.damage_gpkg], **metrics)
    _log_summary(metrics)
    return metrics


def _grade_item(src: SceneSource, cfg: Config, checkpoint: str, model_key: str, predict_dir: str, scene_dir: str,
                keys: dict[str, str]) -> dict[str, Any]:
    """One test pair (top level: runs on dask workers); its record's content."""
    device = str(resolve_device(cfg.damage.device, key="damage.device"))
    model = damage_model_for(checkpoint, model_key, device)
    folder = Path(scene_dir)
    return _grade_scene(src, cfg, model, ScenePaths(Path(predict_dir), src.scene_id).gpkg, folder,
                        folder / f"{src.scene_id}.json", keys[src.scene_id])


def _grade_scene(src: SceneSource, cfg: Config, model: DamageModel, predicted: Path, scene_dir: Path,
                 record: Path, key: str) -> dict[str, Any]:
    import geopandas as gpd

    pair = open_pair(src, None, cfg.data, cfg.tile)
    try:
        pre = pair.pre
        if not predicted.is_file():
            raise InputError(predicted, "no footprints of predict for this scene (run predict first)")
        footprints = read_footprints(predicted, pre.crs)
        pixel_polys = affine_geometries(footprints.geometry.values, ~pre.transform)
        truth = labelled_buildings(pair)
        # the footprints and the truth buildings in one backbone pass
        pooled = model.pooled(pair, [pixel_polys] + ([[b.polygon for b in truth]] if truth is not None else []))
        prob, pixels = model.probabilities(pooled[0]), pooled[0]["pixels"]
        graded = footprints.assign(**graded_columns(prob, pixels))
        out = {"scene": src.scene_id, "crs": str(pre.crs or ""), "footprints": len(graded),
               "counts": _counts(graded[DAMAGE_KEY]), "ungraded": int((pixels == 0).sum())}
        if truth is not None:
            truth_prob, truth_px = model.probabilities(pooled[1]), pooled[1]["pixels"]
            # the truth buildings' vectors and grades, for comparisons on the same buildings (configs/*.md)
            write_shard(scene_dir / f"{src.scene_id}_truth.npz", {**pooled[1], "y": np.array(
                [GRADES.index(b.grade) if b.grade is not None else -1 for b in truth], np.int64)})
            scored = [(b.grade, GRADES[int(p.argmax())]) for b, p, n in zip(truth, truth_prob, truth_px, strict=True)
                      if b.grade is not None and n > 0]
            out["per_building"] = grade_confusion([t for t, _ in scored], [p for _, p in scored]).tolist()
            out["truth_counts"] = _counts([b.grade for b in truth])
            out["pixel"], out["localisation"] = _pixel_confusion(pre, truth, pixel_polys, graded[DAMAGE_KEY].tolist())
    finally:
        pair.close()
    geojson, gpkg = scene_dir / f"{src.scene_id}.geojson", scene_dir / f"{src.scene_id}.gpkg"
    graded = gpd.GeoDataFrame(graded, geometry=graded.geometry.name, crs=footprints.crs)
    write_geojson(graded, geojson)
    write_gpkg(graded, gpkg)
    out.update(geojson=str(geojson), gpkg=str(gpkg))
    truth_file = scene_dir / f"{src.scene_id}_truth.npz"
    return write_record(record, key, [geojson, gpkg] + ([truth_file] if truth_file.is_file() and truth is not None
                                                        else []), **out)


def _counts(grades: Any) -> dict[str, int]:
    values = list(grades)
    return {g: sum(1 for v in values if v == g) for g in GRADES}


def _pixel_confusion(pre: Any, truth: list[Any], footprints: list[Any], grades: list[str | None]
                     ) -> tuple[list[list[float]], list[float]]:
    """xView2's pixels: (the (4, 5) confusion of every graded truth building pixel against the grade of the
    footprint over it, or NOT_FOUND; the localisation counts [tp, fp, fn] of building pixels)."""
    from rasterio import features
    from rasterio.windows import Window

    shape = (pre.height, pre.width)

    def burn(shapes: list[tuple[Any, int]]) -> np.ndarray:
        shapes = [(g, v) for g, v in shapes if g is not None and not g.is_empty]
        return features.rasterize(shapes, out_shape=shape, fill=0, dtype="uint8") if shapes else np.zeros(shape, np.uint8)

    valid = pre.truth_mask(Window(0, 0, pre.width, pre.height)) != 255
    truth_grade = burn([(b.polygon, GRADES.index(b.grade) + 1) for b in truth if b.grade is not None])
    truth_any = burn([(b.polygon, 1) for b in truth]).astype(bool) & valid
    found = burn([(g, GRADES.index(k) + 1 if k in GRADES else NOT_FOUND + 1) for g, k in zip(footprints, grades,
                                                                                             strict=True)])
    predicted_any = (found > 0) & valid
    sel = (truth_grade > 0) & valid
    rows = truth_grade[sel].astype(np.int64) - 1
    cols = np.where((found[sel] > 0) & (found[sel] <= NOT_FOUND), found[sel].astype(np.int64) - 1, NOT_FOUND)
    confusion = np.zeros((len(GRADES), len(GRADES) + 1))
    np.add.at(confusion, (rows, cols), 1.0)
    tp = float((truth_any & predicted_any).sum())
    return confusion.tolist(), [tp, float((predicted_any & ~truth_any).sum()), float((truth_any & ~predicted_any).sum())]


def _pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The scores over every scene (`pool_damage`) and each scene's counts."""
    out = pool_damage(results)
    out["per_scene"] = {r["scene"]: {k: r[k] for k in ("footprints", "counts", "ungraded") if k in r}
                        | ({"damage_f1": damage_scores(r["per_building"])["damage_f1"]} if "per_building" in r else {})
                        for r in results}
    return out


def _baselines(cfg: Config, paths: RunPaths, ckpt: Path, results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`baseline_grades` fitted on the buildings train-damage trained on and scored on the truth buildings the
    model was scored on: each baseline's `damage_scores` per building. None (said once) when the checkpoint is
    not this run's own, whose training buildings are another run's."""
    record = read_record(paths.train_damage / "metrics.json") or {}
    if not same_file(ckpt, paths.damage_checkpoint) or not record.get("train_scenes"):
        log.info("damage: no baselines beside the model: its training buildings are not this run's train-damage's")
        return None
    train, y, scene_of = read_graded_buildings(paths.damage_features, list(record["train_scenes"]), BASELINE_ARRAYS)
    truths, tests = [], []
    for r in results:
        if "per_building" not in r:
            continue
        with np.load(paths.damage_scenes / f"{r['scene']}_truth.npz", allow_pickle=False) as z:
            part = {k: z[k] for k in z.files}
        scored = (part["y"] >= 0) & (part["pixels"] > 0)  # the buildings the model's figures count
        truths.append(part["y"][scored])
        tests.append({k: v[scored] for k, v in part.items()})
    grades = baseline_grades(cfg.damage, train, y, tests, cfg.seed, scene_of)
    return {name: damage_scores(grade_confusion(np.concatenate(truths), np.concatenate(predicted)))
            for name, predicted in grades.items()}


def _log_summary(m: dict[str, Any]) -> None:
    counts = ", ".join(f"{g} {n}" for g, n in m["counts"].items())
    log.info("damage: %d scene(s), %d footprints graded (%s)", m["scenes"], m["polygons"], counts)
    for line in damage_headlines(m):
        log.info("damage: %s", line)


# ---------------------------------------------------------------------------------------------------
# footprints damage --pre --post --footprints --output


def grade_files(cfg: Config, checkpoint: str | None, pre: str | None, post: str | None, footprints: str | None,
                output: str | None) -> dict[str, Any]:
    """Grade any footprints (GeoJSON, GeoPackage; any CRS) on a pre/post pair: `output` (GeoJSON, RFC 7946)
    and a GeoPackage beside it hold every footprint with its own properties plus the grade's."""
    missing = [f"--{k}" for k, v in (("pre", pre), ("post", post), ("footprints", footprints), ("output", output))
               if not v]
    if missing:
        raise StageError(f"damage: give --pre, --post, --footprints and --output together (missing {', '.join(missing)})")
    ckpt = Path(checkpoint) if checkpoint else RunPaths.of(cfg).damage_checkpoint
    out = check_output_text(output)
    if out.suffix.lower() not in (".geojson", ".json"):
        raise InputError(out, "--output must be a GeoJSON file (.geojson); a GeoPackage is written beside it")
    for path in (out, out.with_suffix(".gpkg")):  # before any work: never write over the input
        if same_file(footprints, path):
            raise InputError(path, "is the --footprints file: give another --output")
    model = load_damage_model(ckpt)
    run_cfg = config_from_dict(model.checkpoint["config"])  # how the model's scenes were read
    pre_src, = sources_from_paths([pre], run_cfg.data)
    post_src, = sources_from_paths([post], run_cfg.data)
    user = _read_user_footprints(Path(footprints))
    pair = open_pair(pre_src, post_src, run_cfg.data, run_cfg.tile)
    try:
        layer = user.to_crs(pair.pre.crs) if pair.pre.crs is not None and user.crs is not None else user
        prob, pixels = model.grade(pair, affine_geometries(layer.geometry.values, ~pair.pre.transform))
    finally:
        pair.close()
    graded = user.assign(**graded_columns(prob, pixels))
    write_geojson(graded, out, schema=False)
    write_gpkg(graded, out.with_suffix(".gpkg"), schema=False)
    counts = _counts(graded[DAMAGE_KEY])
    outside = int((pixels == 0).sum())
    log.info("damage: %d footprints graded (%s)%s -> %s", len(graded) - outside, ", ".join(f"{g} {n}" for g, n in
             counts.items()), f"; {outside} outside the pair or in nodata, left without a grade" if outside else "", out)
    return {"footprints": len(graded), "counts": counts, "ungraded": outside, "output": str(out)}


def _read_user_footprints(path: Path) -> Any:
    import pyogrio

    if not path.is_file():
        raise InputError(path, "footprints file not found")
    try:
        gdf = pyogrio.read_dataframe(path, layer=LAYER if _has_layer(path, LAYER) else None)
    except Exception as err:  # noqa: BLE001 - any GDAL failure is a bad input file
        raise InputError(path, f"cannot read footprints ({' '.join(str(err).split())[:160]})") from None
    polygonal = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.all():
        log.warning("%s: %d feature(s) that are not polygons left out", path, int((~polygonal).sum()))
        gdf = gdf[polygonal]
    return gdf


def _has_layer(path: Path, name: str) -> bool:
    import pyogrio

    try:
        return name in [str(n) for n, _ in pyogrio.list_layers(path)]
    except Exception:  # noqa: BLE001 - read_dataframe says what is wrong with the file
        return False
