"""Running stages by name: one stage, every stage in order (`all`), or every stage once per fold (`cv`).

The only module that knows every stage; stages never import each other or this module. Stage modules
are imported when run, so `footprints tile` never loads torch, and the train-segmenter stage gets its
signal handlers before torch is imported (a SLURM warning in the first seconds of a job must not kill it).
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .atomic import remove_stale_temporaries, write_json, write_text
from .config import Config
from .contracts import paths as P
from .errors import Preempted
from .signals import StopSignals

log = logging.getLogger("footprints")

# stage name (as typed) -> module with run(cfg, **options) -> dict
STAGE_MODULES: dict[str, str] = {
    P.TILE: "footprints.stages.tile",
    P.FEATURES: "footprints.stages.features",
    P.TRAIN_CLASSIFIER: "footprints.stages.train_classifier",
    P.TRAIN_SEGMENTER: "footprints.stages.train_segmenter",
    P.PREDICT: "footprints.stages.predict",
    P.EVALUATE: "footprints.stages.evaluate",
}


def run_stage(stage: str, cfg: Config, **options: Any) -> dict[str, Any]:
    """Run one stage by its name with its options (overwrite, load_saved_model, checkpoint, inputs, ...).

    `--overwrite` is transactional: the stage's old outputs are moved aside (`.<stage>.replaced`) and the
    stage builds new ones from scratch; they are deleted only once it succeeds (or is preempted with a
    checkpoint to resume from), and put back when it fails, so a bad setting or a crash loses nothing.
    A folder left aside by a killed run is put back at the next start. Temporary files of killed writers
    are removed first.
    """
    stage_dir = P.RunPaths.of(cfg).stage(stage)
    in_run = not options.get("inputs") and _main_process()  # predict --input writes elsewhere
    aside = stage_dir.with_name(f".{stage_dir.name}.replaced")
    if in_run:
        _restore_interrupted(stage_dir, aside)
        removed = remove_stale_temporaries(stage_dir)
        if removed:
            log.info("%s: removed %d temporary file(s) left by an interrupted run", stage_dir, removed)
    moved = False
    if in_run and options.get("overwrite") and stage_dir.is_dir() and any(stage_dir.iterdir()):
        os.replace(stage_dir, aside)
        moved = True
    try:
        result = _run(stage, cfg, options)
    except Preempted:
        if moved:  # the new run's checkpoint is the one to resume from
            shutil.rmtree(aside, ignore_errors=True)
        raise
    except BaseException:
        if moved:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.replace(aside, stage_dir)
            log.warning("%s: --overwrite failed; the previous outputs are back", stage_dir)
        raise
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
    return result


def _run(stage: str, cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    if stage == P.TRAIN_SEGMENTER:
        # handlers first, torch second
        with StopSignals() as stop:
            module = importlib.import_module(STAGE_MODULES[stage])
            return module.run(cfg, stop=stop, **options)
    return importlib.import_module(STAGE_MODULES[stage]).run(cfg, **options)


def _main_process() -> bool:
    """Not a second rank of a data-parallel job (only rank 0 manages the stage folder)."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if os.environ.get("SLURM_STEP_NUM_TASKS",
                                                                                        "1") != "1" else None)
    return rank in (None, "", "0")


def _restore_interrupted(stage_dir: Path, aside: Path) -> None:
    if aside.is_dir():
        shutil.rmtree(stage_dir, ignore_errors=True)
        os.replace(aside, stage_dir)
        log.warning("%s: an --overwrite run was interrupted; its partial outputs were discarded and the "
                    "previous ones are back", stage_dir)


def run_all(cfg: Config, overwrite: bool = False, load_saved_model: bool = False) -> dict[str, Any]:
    """Every stage in order; returns each stage's result by name."""
    results: dict[str, Any] = {}
    for stage in P.STAGES:
        log.info("=== stage %s ===", stage)
        opts: dict[str, Any] = {"overwrite": overwrite}
        if stage == P.TRAIN_SEGMENTER:
            opts["load_saved_model"] = load_saved_model
        results[stage] = run_stage(stage, cfg, **opts)
    return results


# ---------------------------------------------------------------------------------------------------
# cross-validation over scenes


def fold_config(cfg: Config, fold: int) -> Config:
    """The config of one fold: its own run name, the k-fold split with `fold` as test."""
    fcfg = copy.deepcopy(cfg)
    fcfg.name = f"{cfg.name}-fold{fold}"
    fcfg.tile.split_mode = "kfold"
    fcfg.tile.fold = fold
    return fcfg


def pool_folds(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled metrics over the test scenes of every fold (counts summed over scenes, then the ratios)."""
    from .stages.evaluate import overall_metrics

    per_scene: dict[str, Any] = {}
    for result in folds:
        per_scene.update(result["per_scene"])
    return {"scenes": len(per_scene), "pooled": overall_metrics(per_scene)}


def run_cv(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Cross-validation over scenes: the whole pipeline once per fold (`tile.folds`), every scene tested
    once by a model that never saw it; pooled metrics and a report in `outputs/<name>/cv/`."""
    results = []
    for k in range(cfg.tile.folds):
        log.info("=== cross-validation fold %d of %d ===", k + 1, cfg.tile.folds)
        results.append(run_all(fold_config(cfg, k), overwrite=overwrite)[P.EVALUATE])
    pooled = pool_folds(results)
    folds = [{"fold": k, "name": r["name"], "scenes": sorted(r["per_scene"]), "threshold": r["threshold"],
              "seed_threshold": r.get("seed_threshold"), "min_area_m2": r["min_area_m2"], "overall": r["overall"]}
             for k, r in enumerate(results)]
    out_dir = P.RunPaths.of(cfg).cv
    summary = {"name": cfg.name, "folds": cfg.tile.folds, "seed": cfg.seed, "scenes": pooled["scenes"],
               "pooled": pooled["pooled"], "per_fold": folds,
               "backbone": {"weights": cfg.backbone.weights, "normalization": cfg.backbone.normalization}}
    if cfg.backbone.weights == "random":
        summary["warning"] = "backbone weights are random"
    write_json(out_dir / "metrics.json", summary)
    write_text(out_dir / "report.md", _cv_report(summary))
    px, pg = summary["pooled"]["pixel"], summary["pooled"]["polygon"]
    print(f"cross-validation {cfg.name}: {cfg.tile.folds} folds, {summary['scenes']} test scenes pooled | pixel "
          f"building IoU {px['building_iou']:.3f}, F1 {px['f1']:.3f} | polygon F1@0.5 {pg['f1']:.3f} "
          f"(P {pg['precision']:.3f}, R {pg['recall']:.3f})\nreport: {out_dir / 'report.md'}", flush=True)
    return summary


def _cv_report(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)

    lines = [f"# Cross-validation: {s['name']}", "",
             f"{s['folds']} folds over {s['scenes']} scenes (seed {s['seed']}); counts pooled over every test scene.",
             "", "| fold | test scenes | pixel IoU | pixel F1 | polygon F1 | merges | splits | threshold | seed threshold "
             "| min area m2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fold in s["per_fold"]:
        o = fold["overall"]
        lines.append(f"| {fold['fold']} | {', '.join(fold['scenes'])} | {o['pixel']['building_iou']:.3f} | "
                     f"{o['pixel']['f1']:.3f} | {o['polygon']['f1']:.3f} | {f(o['polygon'].get('merges'))} | "
                     f"{f(o['polygon'].get('splits'))} | {f(fold['threshold'])} | {f(fold.get('seed_threshold'))} | "
                     f"{f(fold['min_area_m2'])} |")
    p = s["pooled"]
    lines.append(f"| **pooled** | {s['scenes']} | **{p['pixel']['building_iou']:.3f}** | {p['pixel']['f1']:.3f} | "
                 f"**{p['polygon']['f1']:.3f}** | {f(p['polygon'].get('merges'))} | {f(p['polygon'].get('splits'))} "
                 "| | | |")
    return "\n".join(lines) + "\n"
