"""Stage 1, tile: whole scenes -> patches (patch store, optional per-patch GeoTIFFs), manifest, scene split.

Layout under `outputs/<name>/tile/` (`footprints.contracts`):

- `store/<scene>/{images,masks,patch_ids}.npy`: the patches as contiguous uint8 arrays (the patch store of
  `footprints.contracts.patches`, what training and features read), unless `tile.patch_store` is false.
  A scene tiled before the store existed gets its shard from its GeoTIFFs on the next run, without
  re-tiling (its record keeps its key, so nothing downstream is invalidated).
- `patches/<scene>/<scene>_r<row:05d>_c<col:05d>.tif` (3-band uint8) and `..._mask.tif` (0 background,
  1 building, 255 ignore = nodata or padding), each with the patch's own transform and the scene's CRS,
  for GIS users; only with `tile.patch_geotiffs` (default true; off for xView2, two files per patch). Without
  them the rows' `image_path`/`mask_path` are empty. They are an output format, not part of the tiling
  (`tiling_params`, the scene key): turning them on for a scene tiled without them re-tiles that scene
  under the same key (same pixels), so features and models stay fresh.
- `scenes/<scene>.csv` (its manifest rows) and `scenes/<scene>.json` (scene metadata and its freshness
  record, `footprints.contracts.tile_records`, written last and covering the patches and the store: a rerun skips a scene whose record matches
  the tiling parameters and whose files are intact, and an interrupted run resumes after the last finished
  scene).
- `manifest.csv` (every row plus `split`) and `summary.json`.

Several data sources (`data.sources`): every scene is read with its source's settings and its id is
`<source>__<scene>`; the split (its ratios, or its folds) is made within each source, so that every source
with enough scenes is in every split of every fold; `summary.json` counts each source's scenes and patches
per split under `sources` (a one-root run's summary has no such key).

Patches cover the whole scene (`patch_windows`): offsets 0, stride, 2*stride, ... until a patch reaches the
far edge; the last row/column of patches is padded, never dropped. `valid_*` columns give the part of a patch
inside the scene, in patch pixel coordinates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import array_bounds
from rasterio.windows import Window

from ..config import Config, DataConfig, TileConfig
from ..contracts.freshness import digest, file_digest, is_fresh, read_record, unmark, write_record
from ..contracts.manifest import SCENE_COLUMNS, SPLITS, assemble_manifest_by_group, read_rows, write_rows
from ..contracts.patches import (
    IGNORE,
    StoreWriter,
    build_store,
    patch_name,
    store_dir,
    store_paths,
    write_patch,
)
from ..contracts.paths import RunPaths
from ..contracts.tile_records import TileSceneRecord, read_scene_record, write_scene_record
from ..errors import StageError, as_input_error
from ..runtime.cluster import map_scenes
from ..scenes.reader import crs_string, open_scene
from ..scenes.sources import SceneSource, data_sections, discover_scenes, scene_config, source_names
from ..scenes.targets import SCHEMES

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# windows and splits (pure functions)


def patch_offsets(length: int, size: int, stride: int) -> list[int]:
    """Offsets 0, stride, ... covering [0, length): the last patch may overhang (padding), none is dropped.

    The tile stage's grid of patches; inference's overlapping windows are another (`WindowGrid`)."""
    if length <= 0:
        return []
    n = math.ceil(max(length - size, 0) / stride) + 1
    return [i * stride for i in range(n)]


def patch_windows(width: int, height: int, size: int, stride: int) -> list[Window]:
    """Row-major patch windows (size x size) covering a width x height scene."""
    return [
        Window(col, row, size, size)
        for row in patch_offsets(height, size, stride)
        for col in patch_offsets(width, size, stride)
    ]


def valid_window(window: Window, width: int, height: int) -> tuple[int, int, int, int]:
    """(row_off, col_off, height, width) of the part of `window` inside the scene, in patch pixels."""
    r0, c0 = max(int(window.row_off), 0), max(int(window.col_off), 0)
    r1 = min(int(window.row_off + window.height), height)
    c1 = min(int(window.col_off + window.width), width)
    return r0 - int(window.row_off), c0 - int(window.col_off), max(r1 - r0, 0), max(c1 - c0, 0)


def assign_splits(
    groups: Iterable[str], ratios: list[float] | tuple[float, ...], seed: int
) -> dict[str, str]:
    """Deterministic scene-level split: group ids shuffled by `seed`, cut by `ratios` (train, val, test).

    With few groups the counts are nudged so that train gets at least one, and val and test (when their
    ratio is positive) get one each once there are >= 3 groups. The same groups and seed give the same split.
    """
    keys = sorted(set(groups))
    n = len(keys)
    if n == 0:
        return {}
    total = float(sum(ratios))
    r_val, r_test = ratios[1] / total, ratios[2] / total
    n_val, n_test = round(n * r_val), round(n * r_test)
    if n >= 3:
        n_val = max(n_val, 1 if r_val > 0 else 0)
        n_test = max(n_test, 1 if r_test > 0 else 0)
    elif n == 2 and ratios[0] > 0 and (r_val > 0 or r_test > 0):
        n_val, n_test = (1, 0) if r_val > 0 else (0, 1)
    if ratios[0] > 0:
        while n - n_val - n_test < 1:  # train keeps at least one group
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
    else:
        n_val = n - n_test
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, idx in enumerate(order):
        out[keys[idx]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return out


def assign_folds(groups: Iterable[str], folds: int, fold: int, seed: int, offset: int = 0) -> dict[str, str]:
    """Cross-validation split: groups shuffled by `seed` into `folds` near-equal folds; fold `fold` is
    test, fold `fold + 1` (cyclically) val, the others train. Over fold = 0..folds-1 every group is
    tested exactly once, always by a model that never saw it. `offset` shifts the first group's fold (the
    folds of several data sources, each assigned on its own, then start where the previous one's ended).
    """
    keys = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(keys))
    out = {}
    for rank, idx in enumerate(order):
        k = (rank + offset) % folds
        out[keys[idx]] = "test" if k == fold else "val" if k == (fold + 1) % folds else "train"
    return out


# ---------------------------------------------------------------------------------------------------
# one scene


def tiling_params(data_cfg: DataConfig, tile_cfg: TileConfig) -> dict[str, Any]:
    """What a scene's patches depend on: a change re-tiles the scene even without --overwrite.

    `tile.patch_store` and `tile.patch_geotiffs` are not in it: they choose where the same pixels are
    written, so neither changes the scene key (a missing store or GeoTIFFs is made up without a new key).
    """
    return {
        "size": tile_cfg.size, "stride": tile_cfg.stride, "target_gsd": tile_cfg.target_gsd,
        "bands": list(data_cfg.bands), "stretch_percentiles": list(data_cfg.stretch_percentiles),
        "nodata": data_cfg.nodata, "mask_threshold": data_cfg.mask_threshold,
        "target": tile_cfg.target, "border_m": tile_cfg.border_m, "contact_m": tile_cfg.contact_m,
        "max_residual_px": data_cfg.max_residual_px, "geotransforms": data_cfg.geotransforms,
    }



@dataclass(frozen=True)
class SceneResult:
    """What a worker returns: small, picklable."""

    scene_id: str
    status: str  # "tiled" | "done" (already done, skipped)
    patches: int
    seconds: float = 0.0


def tile_scene(source: SceneSource, data_cfg: DataConfig, tile_cfg: TileConfig, tile_dir: str,
               overwrite: bool = False) -> SceneResult:
    """Tile one scene into `tile_dir`; skip it when already done with the same parameters (unless overwrite).

    Raises InputError (naming the file) on bad input; nothing of the scene is then marked done.
    """
    t0 = time.perf_counter()
    paths = RunPaths(Path(tile_dir).parent)
    sid = source.scene_id
    data_cfg = scene_config(source, data_cfg)  # its data source's settings, when several
    params = tiling_params(data_cfg, tile_cfg)
    key = digest(params)
    record = paths.scene_record(sid)
    saved = read_scene_record(record)
    # fresh, and with the GeoTIFF patches when they are wanted
    if (not overwrite and saved is not None and saved.is_fresh(record, key)
            and (saved.has_geotiffs or not tile_cfg.patch_geotiffs)):
        if tile_cfg.patch_store:
            _add_store(paths, sid, saved)
        return SceneResult(sid, "done", -1)
    unmark(record)  # first: a crash below leaves the scene "not done"
    patch_dir = paths.patch_dir(sid)
    shutil.rmtree(patch_dir, ignore_errors=True)  # stale patches of other sizes, leftover .part files
    shutil.rmtree(store_dir(paths.tile, sid), ignore_errors=True)
    geotiffs = tile_cfg.patch_geotiffs
    if geotiffs:
        patch_dir.mkdir(parents=True, exist_ok=True)
    size = tile_cfg.size
    scheme = SCHEMES[tile_cfg.target]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env())
        scene = stack.enter_context(open_scene(source, data_cfg, tile_cfg))
        windows = patch_windows(scene.width, scene.height, size, tile_cfg.stride)
        store = (stack.enter_context(StoreWriter(store_dir(paths.tile, sid), len(windows), size))
                 if tile_cfg.patch_store and windows else None)
        crs, crs_text = scene.crs, crs_string(scene.crs)
        if not scene.has_labels:
            log.warning("%s: no labels: every mask pixel is 255 (ignore)", source.image)
        label_file = str(source.label or source.mask or "")
        for i, win in enumerate(windows):
            rgb, valid = scene.read(win)
            mask = scene.target(win, scheme, tile_cfg.border_m, tile_cfg.contact_m)
            if mask is None:
                mask = np.full(valid.shape, IGNORE, dtype=np.uint8)
            transform = scene.window_transform(win)
            r, c = int(win.row_off), int(win.col_off)
            name = patch_name(sid, r, c)
            if geotiffs:
                write_patch(patch_dir / f"{name}.tif", rgb, transform, crs)
                write_patch(patch_dir / f"{name}_mask.tif", mask[None], transform, crs, nodata=IGNORE)
            if store is not None:
                store.put(i, name, rgb, mask)
            vr, vc, vh, vw = valid_window(win, scene.width, scene.height)
            class_px = np.bincount(mask[mask != IGNORE].ravel(), minlength=scheme.k)[: scheme.k]
            building = int(class_px[list(scheme.building)].sum())
            background = int(class_px.sum()) - building
            minx, miny, maxx, maxy = array_bounds(size, size, transform)
            rows.append({
                "patch_id": name, "scene_id": sid, "image_file": str(source.image), "label_file": label_file,
                "subset": source.subset or "", "row_off": r, "col_off": c, "size": size,
                "valid_row_off": vr, "valid_col_off": vc, "valid_height": vh, "valid_width": vw,
                "minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "crs": crs_text,
                "building_frac": building / (building + background) if building + background else 0.0,
                "nodata_frac": 1.0 - float(np.count_nonzero(valid)) / valid.size,
                "building_px": building, "background_px": background,
                "class_px": " ".join(str(int(n)) for n in class_px), "labelled": scene.has_labels,
                "image_path": f"patches/{sid}/{name}.tif" if geotiffs else "",
                "mask_path": f"patches/{sid}/{name}_mask.tif" if geotiffs else "",
            })
        meta = scene.metadata()
        store_files = store.finish() if store is not None else []
    rows_path = paths.scene_rows(sid)
    write_rows(rows_path, rows, SCENE_COLUMNS)
    tifs = [paths.tile / r[k] for r in rows for k in ("image_path", "mask_path")] if geotiffs else []
    done = TileSceneRecord(key=key, scene=meta, params=params, patches=len(rows),
                           location_id=source.location_id, patch_geotiffs=geotiffs, data_source=source.source_name)
    write_scene_record(record, done, [rows_path, *tifs, *store_files])
    return SceneResult(sid, "tiled", len(rows), time.perf_counter() - t0)


def _add_store(paths: RunPaths, sid: str, record: TileSceneRecord) -> None:
    """Give a fresh scene tiled before the patch store existed its shard (from its GeoTIFFs), and list the
    shard in its record under the same key: nothing downstream (features, models) becomes stale."""
    listed = dict(record.files)
    folder = paths.scene_record(sid).parent
    wanted = [os.path.relpath(p, folder) for p in store_paths(paths.tile, sid)]
    if all(name in listed for name in wanted):
        return
    rows = read_rows(paths.scene_rows(sid))
    if not rows:
        return
    t0 = time.perf_counter()
    store_files = build_store(paths.tile, sid, rows)
    write_scene_record(paths.scene_record(sid), record, [folder / name for name in listed] + store_files)
    log.info("tile: %s: patch store written from its %d GeoTIFF patches (%.1f s)", sid, len(rows),
             time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# the stage


def _split_for(sources: list[SceneSource], cfg: Config) -> dict[str, str]:
    """scene_id -> split. Scenes of one location (xView2 pre/post pairs) always share a split."""
    tile = cfg.tile
    if tile.split_mode == "subset":
        out = {}
        for src in sources:
            if src.subset is None or src.subset not in tile.subset_splits:
                raise StageError(
                    f"tile.split_mode subset: subset {src.subset!r} of {src.image} has no entry in "
                    f"tile.subset_splits {tile.subset_splits}"
                )
            split = tile.subset_splits[src.subset]
            if split not in SPLITS:
                raise StageError(f"tile.subset_splits: {src.subset!r} maps to {split!r}, not one of {SPLITS}")
            out[src.scene_id] = split
        return out
    locations = [s.location_id for s in sources]
    where = "in data.sources" if cfg.data.sources else f"under {cfg.data.root}"
    if tile.split_mode == "kfold" and tile.folds > len(set(locations)):
        raise StageError(f"tile.folds {tile.folds} is more than the {len(set(locations))} scene location(s) "
                         f"{where}: some folds would test nothing; lower tile.folds")
    # several data sources: each split on its own (its ratios, its folds), so that every source is in every
    # split (and fold) when it has enough scenes; one source: the whole list, as ever
    by_loc: dict[str, str] = {}
    offset = 0
    for name in source_names(sources) or [None]:
        group = [s.location_id for s in sources if s.source_name == name]
        if tile.split_mode == "kfold":
            by_loc.update(assign_folds(group, tile.folds, tile.fold, cfg.seed, offset))
            offset += len(set(group))
        else:
            by_loc.update(assign_splits(group, tile.split_ratios, cfg.seed))
    return {s.scene_id: by_loc[s.location_id] for s in sources}


def _with_val_bands(sources: list[SceneSource], cfg: Config) -> tuple[list[SceneSource], dict[str, str]]:
    """`tile.val_band`: scenes split by location as usual, then every scene that is not test is cut into a
    training band (its top rows) and a validation band (its bottom `val_band` of the rows). Returns the
    sources to tile and their splits."""
    by_scene = _split_for(sources, cfg)
    f = cfg.tile.val_band
    out: list[SceneSource] = []
    splits: dict[str, str] = {}
    for src in sources:
        if by_scene[src.scene_id] == "test":
            out.append(src)
            splits[src.scene_id] = "test"
            continue
        for rows, split in (((0.0, 1.0 - f), "train"), ((1.0 - f, 1.0), "val")):
            band = dataclasses.replace(src, rows=rows)
            out.append(band)
            splits[band.scene_id] = split
    return out, splits


def _band_note(src: SceneSource) -> str:
    """' (rows 75-100%)' for a band of a scene (`tile.val_band`), '' for a whole scene."""
    return f" (rows {round(100 * src.rows[0])}-{round(100 * src.rows[1])}%)" if src.rows else ""


def _scene_count(sources: Iterable[SceneSource]) -> int:
    """How many scenes `sources` hold: the two bands of a scene (`tile.val_band`) are one scene."""
    return len({s.image for s in sources})


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Tile every discovered scene (in parallel), assemble the manifest and summary; return the summary.

    Raises StageError when no scene could be used.
    """
    t0 = time.perf_counter()
    paths = RunPaths.of(cfg)
    tile_dir = paths.tile
    tile_dir.mkdir(parents=True, exist_ok=True)
    for where, _, data in data_sections(cfg.data):
        if cfg.tile.split_mode == "subset" and not data.subsets:
            raise StageError(f"tile.split_mode subset needs {where}subsets (the xView2 subset folders)")
    sources = discover_scenes(cfg.data)
    for where, name, data in data_sections(cfg.data):  # a source without scenes: a mistake, not a smaller run
        if not any(s.source_name == name for s in sources):
            raise StageError(f"{data.root}: no scenes found ({where}images_dir {data.images_dir!r}, "
                             f"image_glob {data.image_glob or 'default'!r})")
    names = source_names(sources)
    counts = ", ".join(f"{n}: {sum(s.source_name == n for s in sources)}" for n in names)
    log.info("tile: %d scenes %s -> %s", len(sources),
             f"from {len(names)} sources ({counts})" if names else f"under {cfg.data.root}", tile_dir)
    masks = [s for s in sources if s.mask is not None]
    if masks and SCHEMES[cfg.tile.target].needs_instances:
        log.warning("tile: %d scene(s) have mask labels (e.g. %s), which hold no instances: their targets use "
                    "connected components, so touching buildings stay merged", len(masks), masks[0].mask)
    banded: dict[str, str] | None = None
    if cfg.tile.val_band > 0:
        sources, banded = _with_val_bands(sources, cfg)
    func = partial(tile_scene, data_cfg=cfg.data, tile_cfg=cfg.tile, tile_dir=str(tile_dir), overwrite=overwrite)
    skipped: list[dict[str, str]] = []
    tiled = resumed = 0
    ok_ids: set[str] = set()
    for src, result, error in map_scenes(cfg.cluster, func, sources, desc="tile"):
        if error is not None:
            bad = as_input_error(error, src.image)
            reason, path = bad.reason, bad.path
            log.error("%s%s: %s (%s skipped)", path, _band_note(src), reason, "band" if src.rows else "scene")
            skipped.append({"scene_id": src.scene_id, "file": path, "reason": reason})
            if src.rows:  # which band of the scene (`tile.val_band`): the other one may have been tiled
                skipped[-1]["band"] = _band_note(src).strip(" ()")
            continue
        ok_ids.add(src.scene_id)
        if result.status == "done":
            resumed += 1
        else:
            tiled += 1
    usable = [s for s in sources if s.scene_id in ok_ids]
    if not usable:
        raise StageError(f"tile: none of the {len(sources)} scenes could be used "
                         f"(first problem: {skipped[0]['file']}: {skipped[0]['reason']})")
    splits = {s.scene_id: banded[s.scene_id] for s in usable} if banded is not None else _split_for(usable, cfg)
    # the manifest is up to date when the same scenes, tiled the same way, get the same splits
    key = digest({"scenes": [(s.scene_id, file_digest(paths.scene_record(s.scene_id))) for s in usable],
                  "splits": splits, "skipped": skipped})
    if is_fresh(paths.tile_summary, key):
        log.info("tile: %s is complete (same scenes, tiling and splits); skipping", tile_dir)
        saved = read_record(paths.tile_summary) or {}
        return {**saved, "scenes_tiled_now": tiled, "scenes_already_done": resumed, "up_to_date": True}
    unmark(paths.tile_summary)
    groups = {s.scene_id: s.source_name for s in usable if s.source_name}
    totals, by_source = assemble_manifest_by_group(tile_dir, [s.scene_id for s in usable], splits, groups)
    summary = _summary(cfg, sources, usable, skipped, totals, tiled, resumed, time.perf_counter() - t0)
    if names:  # only with data.sources: a one-root run's summary keeps its keys
        summary["sources"] = _source_summary(cfg, sources, usable, by_source)
    summary = write_record(paths.tile_summary, key, [paths.manifest], **summary)
    _log_summary(summary)
    return summary


def _split_totals(totals: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    per_split: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        t = totals.get(split, {})
        b, g = t.get("building_px", 0), t.get("background_px", 0)
        per_split[split] = {
            "scenes": t.get("scenes", 0),
            "patches": t.get("patches", 0),
            "building_px": b,
            "background_px": g,
            "building_frac": b / (b + g) if b + g else 0.0,
        }
    return per_split


def _source_summary(cfg: Config, sources: list[SceneSource], usable: list[SceneSource],
                    by_source: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, Any]]:
    """Per data source: where it is, how it is read, and its scenes and patches per split (warned about: a
    source missing from a split, which then scores or selects nothing of it)."""
    out: dict[str, dict[str, Any]] = {}
    for _, name, data in data_sections(cfg.data):
        found = _scene_count(s for s in sources if s.source_name == name)
        read = _scene_count(s for s in usable if s.source_name == name)
        splits = _split_totals(by_source.get(str(name), {}))
        missing = [split for split in SPLITS if not splits[split]["scenes"]
                   and any(v[split]["scenes"] for v in by_source.values())]
        if missing:
            log.warning("tile: data source %r has no %s scene (%d scene(s) read)", name, " or ".join(missing), read)
        out[str(name)] = {
            "root": data.root, "format": data.format, "label_format": data.label_format,
            "scenes_found": found, "scenes_read": read, "scenes_skipped": found - read,  # a scene read in part is read
            "patches": sum(v["patches"] for v in splits.values()), "splits": splits,
        }
    return out


def _summary(cfg: Config, sources: list[SceneSource], usable: list[SceneSource], skipped: list[dict[str, str]],
             totals: dict[str, dict[str, int]], tiled: int, resumed: int, seconds: float) -> dict[str, Any]:
    per_split = _split_totals(totals)
    found, read = _scene_count(sources), _scene_count(usable)
    return {
        "stage": "tile",
        "tile_dir": str(RunPaths.of(cfg).tile),
        "scenes_found": found,
        "scenes_read": read,
        "scenes_tiled_now": tiled,
        "scenes_already_done": resumed,
        "scenes_skipped": found - read,  # a scene with one of its bands read counts as read
        "skipped": skipped,
        "patches": sum(v["patches"] for v in per_split.values()),
        "splits": per_split,
        "size": cfg.tile.size,
        "stride": cfg.tile.stride,
        "target_gsd": cfg.tile.target_gsd,
        "target": cfg.tile.target,
        "classes": list(SCHEMES[cfg.tile.target].classes),
        "split_mode": cfg.tile.split_mode,
        "seed": cfg.seed,
        "seconds": round(seconds, 3),
    }


def _log_summary(s: dict[str, Any]) -> None:
    log.info("tile: %d scenes read (%d tiled now, %d already done), %d skipped, %d patches in %.1f s",
             s["scenes_read"], s["scenes_tiled_now"], s["scenes_already_done"], s["scenes_skipped"],
             s["patches"], s["seconds"])
    for split, v in s["splits"].items():
        log.info("tile: %-5s %3d scenes %6d patches, building pixels %.2f%%", split, v["scenes"], v["patches"],
                 100 * v["building_frac"])
    for name, v in s.get("sources", {}).items():
        log.info("tile: source %s: %d scenes read, %d patches (train %d, val %d, test %d scenes)", name,
                 v["scenes_read"], v["patches"], *(v["splits"][split]["scenes"] for split in SPLITS))
    for sk in s["skipped"]:
        log.info("tile: skipped %s%s: %s", sk["file"], f" ({sk['band']})" if "band" in sk else "", sk["reason"])

