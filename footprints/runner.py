"""Running stages by name: one stage, every stage in order (`all`), or every stage once per fold (`cv`).

The only module that knows every stage; stages never import each other or this module. Stage modules
are imported when run, so `footprints tile` never loads torch, and the train-segmenter stage gets its
signal handlers before torch is imported (a SLURM warning in the first seconds of a job must not kill it).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .atomic import is_temporary, write_json, write_text
from .config import Config
from .contracts import paths as P
from .errors import Preempted, StageError
from .runtime.lock import hold, hold_output
from .training.signals import StopSignals

log = logging.getLogger("footprints")

# stage name (as typed) -> module with run(cfg, **options) -> dict
STAGE_MODULES: dict[str, str] = {
    P.TILE: "footprints.stages.tile",
    P.FEATURES: "footprints.stages.features",
    P.TRAIN_CLASSIFIER: "footprints.stages.train_classifier",
    P.TRAIN_SEGMENTER: "footprints.stages.train_segmenter",
    P.PREDICT: "footprints.stages.predict",
    P.TRAIN_DAMAGE: "footprints.stages.train_damage",
    P.DAMAGE: "footprints.stages.damage",
    P.EVALUATE: "footprints.stages.evaluate",
}


def run_stage(stage: str, cfg: Config, **options: Any) -> dict[str, Any]:
    """Run one stage by its name with its options (overwrite, load_saved_model, checkpoint, inputs, ...).

    One run per output folder at a time: the main process holds the run folder's lock
    (`<output_root>/<name>/.footprints.runtime.lock`, footprints.runtime.lock) for the whole stage, and `predict --input
    ... --output FILE` holds the lock of FILE's outputs; a second run stops at once with one line naming the
    first. Other ranks of a data-parallel job and dask/SLURM workers never take it (they work under the
    main process's).

    What a stage wrote is recorded: `<run>/.<stage>.files.json` lists every file of the stage folder that a
    run of the stage created or changed (path, inode, size, mtime), written when the stage starts and ends (a
    run killed outright is accounted for at the next start: what appeared or changed in the folder after it
    started is its). Anything else in the folder, such as a file the user put there or outputs of a version
    of footprints before these records, is foreign, and no run deletes it.

    Temporary files of killed writers (`.<name>.*.part*`, `.<name>.*.tmp`) are removed at the start, only
    while the lock is held and only those the record counts as the stage's.

    `--overwrite` is transactional: the stage folder is moved aside (`.<stage>.replaced`) and the stage builds
    new outputs from scratch. When it fails, the new outputs are discarded and the old folder is put back;
    a folder left aside by a killed run is put back at the next start. When it succeeds (or is preempted
    with a checkpoint to resume from), the old files that runs of the stage wrote are deleted and foreign
    ones are kept, moved with their folders to `<run>/<stage>.kept-<time>/` (a warning names it). A stage
    folder that is a symbolic link is refused with `--overwrite` (one line): moving and deleting would act
    on a folder outside the run.
    """
    stage_dir = P.RunPaths.of(cfg).stage(stage)
    main = _main_process()
    inputs, output = options.get("inputs"), options.get("output")
    # the stage writes into the run folder: every stage, and predict --input without --output
    in_run = main and (not inputs or not output)
    with ExitStack() as held:
        locked = False
        if in_run:
            _check_output_root(cfg)
            locked = held.enter_context(hold(stage_dir.parent))
        if main and inputs and output and _plain_output(output):  # predict refuses other outputs itself
            held.enter_context(hold_output(output))
        if not in_run:
            return _run(stage, cfg, options)
        # predict --input writes beside the split's predictions: never moved aside by --overwrite
        overwrite = bool(options.get("overwrite")) and not inputs
        return _run_in_folder(stage, stage_dir, cfg, options, overwrite=overwrite, locked=locked)


def _run_in_folder(stage: str, stage_dir: Path, cfg: Config, options: dict[str, Any], overwrite: bool,
                   locked: bool) -> dict[str, Any]:
    """`run_stage` for a stage that writes in the run folder, with the run folder's lock held (see there)."""
    aside = stage_dir.with_name(f".{stage_dir.name}.replaced")
    record = _record_path(stage_dir)
    _restore_interrupted(stage_dir, aside, record)
    if overwrite and stage_dir.is_symlink():
        raise StageError(f"{stage_dir}: is a symbolic link (to {os.readlink(stage_dir)}); --overwrite replaces only "
                         "a real folder: remove the link (or run without --overwrite)")
    files = _inventory(stage_dir)
    previous = _read_record(record)
    owned = _owned(previous, files)
    if locked:  # no record: a folder of an older version; its temporaries are named as footprints names them
        removed = _remove_temporaries(stage_dir, files, owned, any_temporary=previous is None)
        if removed:
            log.info("%s: removed %d temporary file(s) left by an interrupted run", stage_dir, removed)
    moved = overwrite and bool(files)
    if moved:
        os.replace(stage_dir, aside)
        start: dict[str, Any] = {"open": True, "owned": {}, "at_start": {}, "aside_owned": owned}
    else:
        start = {"open": True, "owned": owned, "at_start": files}
    write_json(record, start)
    try:
        result = _run(stage, cfg, options)
    except Preempted:
        if moved:  # the new run's checkpoint is the one to resume from
            _discard_replaced(stage, aside, owned)
        _finish_record(record, stage_dir, start["owned"], start["at_start"])
        raise
    except BaseException:
        if moved:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.replace(aside, stage_dir)
            _write_record_quietly(record, {"open": False, "owned": owned})
            log.warning("%s: --overwrite failed; the previous outputs are back", stage_dir)
        else:
            _finish_record(record, stage_dir, owned, files)
        raise
    if moved:
        _discard_replaced(stage, aside, owned)
    _finish_record(record, stage_dir, start["owned"], start["at_start"])
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


def _restore_interrupted(stage_dir: Path, aside: Path, record: Path) -> None:
    if aside.is_dir() and not aside.is_symlink():
        # the new folder holds only what the killed run created (it started from nothing)
        shutil.rmtree(stage_dir, ignore_errors=True)
        os.replace(aside, stage_dir)
        previous = _read_record(record) or {}
        write_json(record, {"open": False, "owned": previous.get("aside_owned") or {}})
        log.warning("%s: an --overwrite run was interrupted; its partial outputs were discarded and the "
                    "previous ones are back", stage_dir)


def _plain_output(output: Any) -> bool:
    """`predict --output` names a GeoJSON file without control characters (predict explains any other)."""
    text = os.fspath(output)
    return Path(text).suffix.lower() in (".geojson", ".json") and all(c.isprintable() for c in text)


def _check_output_root(cfg: Config) -> None:
    root = Path(cfg.output_root)
    if root.exists() and not root.is_dir():
        raise StageError(f"{root}: output_root is a file, not a folder")


# ---------------------------------------------------------------------------------------------------
# what a stage wrote: the ownership record


def _record_path(stage_dir: Path) -> Path:
    return stage_dir.with_name(f".{stage_dir.name}.files.json")


def _inventory(top: Path) -> dict[str, list[int]]:
    """Every entry under `top` that is not a folder (files, links, anything else), by relative path, with
    its identity [inode, size, mtime_ns]; links are listed, never followed."""
    out: dict[str, list[int]] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            entries = os.scandir(top / rel if rel else top)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[path] = [st.st_ino, st.st_size, st.st_mtime_ns]
    return out


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _ids(value: Any) -> dict[str, list[int]]:
    return {k: list(v) for k, v in value.items() if isinstance(v, list)} if isinstance(value, dict) else {}


def _owned(record: dict[str, Any] | None, files: dict[str, list[int]]) -> dict[str, list[int]]:
    """The files of `files` that runs of the stage wrote: listed in the record as they are now, or, after a
    run killed outright (its record still open), created or changed since that run started."""
    if record is None:  # no record (or an unreadable one): nothing is known to be the stage's
        return {}
    owned, at_start = _ids(record.get("owned")), _ids(record.get("at_start"))
    killed = bool(record.get("open"))
    return {p: i for p, i in files.items() if owned.get(p) == i or (killed and at_start.get(p) != i)}


def _finish_record(record: Path, stage_dir: Path, owned: dict[str, list[int]], at_start: dict[str, list[int]]) -> None:
    """The record at the end of a run: what it created or changed, and what runs of the stage wrote before."""
    files = _inventory(stage_dir)
    now = {p: i for p, i in files.items() if owned.get(p) == i or at_start.get(p) != i}
    _write_record_quietly(record, {"open": False, "owned": now})


def _write_record_quietly(record: Path, value: dict[str, Any]) -> None:
    try:
        write_json(record, value)
    except OSError as err:  # e.g. the disk filled up: the stage's own outcome matters more
        log.warning("%s: cannot update (%s); the next --overwrite keeps the files it cannot account for",
                    record, err.strerror or err)


def _remove_temporaries(stage_dir: Path, files: dict[str, list[int]], owned: dict[str, list[int]],
                        any_temporary: bool = False) -> int:
    """Remove the stage's temporary files (a temporary folder only when every file in it is the stage's, or
    every temporary with `any_temporary`); drops them from `files` and `owned`. Returns how many
    temporaries (files or folders) went."""
    roots: dict[str, bool] = {}  # the outermost temporary part of each path -> all its files are the stage's
    for rel in files:
        parts = rel.split("/")
        for i, part in enumerate(parts):
            if is_temporary(Path(part)):
                top = "/".join(parts[: i + 1])
                roots[top] = roots.get(top, True) and (any_temporary or rel in owned)
                break
    removed = 0
    for top, ours in sorted(roots.items()):
        if not ours:
            continue
        path = stage_dir / top
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
        for rel in [r for r in files if r == top or r.startswith(top + "/")]:
            files.pop(rel, None)
            owned.pop(rel, None)
    return removed


def _discard_replaced(stage: str, aside: Path, owned: dict[str, list[int]]) -> None:
    """After a successful --overwrite: delete the old files that runs of the stage wrote; keep the others
    (a user's) in `<run>/<stage>.kept-<time>/`."""
    for rel, ident in _inventory(aside).items():
        if owned.get(rel) == ident:
            (aside / rel).unlink(missing_ok=True)
    left = _inventory(aside)
    if not left:
        shutil.rmtree(aside, ignore_errors=True)  # folders only
        return
    for dirpath, _, _ in sorted(os.walk(aside), key=lambda d: -len(d[0])):  # prune the emptied folders
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = aside.with_name(f"{stage}.kept-{stamp}")
    n = 1
    while kept.exists() or kept.is_symlink():
        n += 1
        kept = aside.with_name(f"{stage}.kept-{stamp}-{n}")
    os.replace(aside, kept)
    log.warning("%s: %d file(s) in the old folder were not written by this stage (e.g. %s); --overwrite kept "
                "them in %s", aside.with_name(stage), len(left), ", ".join(sorted(left)[:3]), kept)


def run_all(cfg: Config, overwrite: bool = False, load_saved_model: bool = False) -> dict[str, Any]:
    """Every stage in order (the damage stages when the config has a `damage:` section); returns each
    stage's result by name."""
    results: dict[str, Any] = {}
    with _run_lock(cfg):  # no other run gets in between two stages
        for stage in P.STAGES:
            if stage in P.DAMAGE_STAGES and cfg.damage is None:
                continue
            log.info("=== stage %s ===", stage)
            opts: dict[str, Any] = {"overwrite": overwrite}
            if stage == P.TRAIN_SEGMENTER:
                opts["load_saved_model"] = load_saved_model
            results[stage] = run_stage(stage, cfg, **opts)
    return results


def _run_lock(cfg: Config) -> contextlib.AbstractContextManager[Any]:
    """The run folder's lock, in the main process (re-entrant: each stage takes it again)."""
    if not _main_process():
        return contextlib.nullcontext()
    _check_output_root(cfg)
    return hold(P.RunPaths.of(cfg).root)


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
    from .stages.evaluate import overall_metrics, source_metrics

    per_scene: dict[str, Any] = {}
    for result in folds:
        per_scene.update(result["per_scene"])
    pooled = {"scenes": len(per_scene), "pooled": overall_metrics(per_scene)}
    by_source = source_metrics(per_scene)  # several data sources: each one's pooled over its test scenes
    return {**pooled, "per_source": by_source} if by_source else pooled


def run_cv(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Cross-validation over scenes: the whole pipeline once per fold (`tile.folds`), every scene tested
    once by a model that never saw it; pooled metrics and a report in `outputs/<name>/cv/`."""
    results = []
    with _run_lock(cfg):  # the summary's folder; each fold locks its own run folder
        for k in range(cfg.tile.folds):
            log.info("=== cross-validation fold %d of %d ===", k + 1, cfg.tile.folds)
            results.append(run_all(fold_config(cfg, k), overwrite=overwrite)[P.EVALUATE])
        return _cv_summary(cfg, results)


def _cv_summary(cfg: Config, results: list[dict[str, Any]]) -> dict[str, Any]:
    from .scoring.damage import damage_headlines

    pooled = pool_folds(results)
    folds = [{"fold": k, "name": r["name"], "scenes": sorted(r["per_scene"]), "threshold": r["threshold"],
              "seed_threshold": r.get("seed_threshold"), "min_area_m2": r["min_area_m2"], "overall": r["overall"]}
             for k, r in enumerate(results)]
    out_dir = P.RunPaths.of(cfg).cv
    summary = {"name": cfg.name, "folds": cfg.tile.folds, "seed": cfg.seed, "scenes": pooled["scenes"],
               "pooled": pooled["pooled"], **({"per_source": pooled["per_source"]} if "per_source" in pooled else {}),
               "per_fold": folds,
               "backbone": {"weights": cfg.backbone.weights, "normalization": cfg.backbone.normalization}}
    damage = _pooled_damage([r.get("damage") for r in results])
    if damage is not None:
        summary["damage"] = damage
    if cfg.backbone.weights == "random":
        summary["warning"] = "backbone weights are random"
    write_json(out_dir / "metrics.json", summary)
    write_text(out_dir / "report.md", _cv_report(summary))
    px, pg = summary["pooled"]["pixel"], summary["pooled"]["polygon"]
    print(f"cross-validation {cfg.name}: {cfg.tile.folds} folds, {summary['scenes']} test scenes pooled | pixel "
          f"building IoU {px['building_iou']:.3f}, F1 {px['f1']:.3f} | polygon F1@0.5 {pg['f1']:.3f} "
          f"(P {pg['precision']:.3f}, R {pg['recall']:.3f})\nreport: {out_dir / 'report.md'}", flush=True)
    for line in damage_headlines(damage or {}):
        print(f"  {line}", flush=True)
    for source, s in summary.get("per_source", {}).items():
        print(f"  source {source}: {s['scenes']} test scenes pooled | pixel building IoU "
              f"{s['pixel']['building_iou']:.3f}, F1 {s['pixel']['f1']:.3f} | polygon F1@0.5 {s['polygon']['f1']:.3f} "
              f"(P {s['polygon']['precision']:.3f}, R {s['polygon']['recall']:.3f})", flush=True)
    return summary


def _pooled_damage(folds: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The folds' damage scores pooled (a `damage:` section): their confusions summed, then the scores."""
    from .scoring.damage import damage_part, pool_damage

    present = [d for d in folds if d]
    return pool_damage([damage_part(d) for d in present]) if present else None


def _cv_report(s: dict[str, Any]) -> str:
    from .stages.evaluate import damage_lines

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
    for source, q in s.get("per_source", {}).items():  # each data source pooled over its test scenes
        lines.append(f"| pooled, source **{source}** | {q['scenes']} | {q['pixel']['building_iou']:.3f} | "
                     f"{q['pixel']['f1']:.3f} | {q['polygon']['f1']:.3f} | {f(q['polygon'].get('merges'))} | "
                     f"{f(q['polygon'].get('splits'))} | | | |")
    return "\n".join(lines + damage_lines(s.get("damage"))) + "\n"
