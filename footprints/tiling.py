"""Stage 1, tile: whole scenes -> georeferenced patches (image + mask GeoTIFFs), manifest, scene-level split.

Layout under `outputs/<name>/tile/`:

- `patches/<scene>/<scene>_r<row:05d>_c<col:05d>.tif` (3-band uint8) and `..._mask.tif` (0 background,
  1 building, 255 ignore = nodata or padding), each with the patch's own transform and the scene's CRS.
- `scenes/<scene>.json` (scene metadata) and `scenes/<scene>.csv` (its manifest rows, written last: its
  presence marks the scene done, so a rerun skips it and an interrupted run resumes after it).
- `manifest.csv` (every row plus `split`) and `summary.json`.

Windows cover the whole scene: offsets 0, stride, 2*stride, ... until a window reaches the far edge;
the last row/column of windows is padded, never dropped. `valid_*` columns give the part of a patch
inside the scene, in patch pixel coordinates.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import array_bounds
from rasterio.windows import Window

from .atomic import atomic_path, write_json
from .cluster import map_scenes
from .config import Config, DataConfig, TileConfig
from .errors import InputError, StageError, as_input_error
from .scenes import SceneSource, crs_string, discover_scenes, open_scene

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# manifest columns, in order; `split` is added when the manifest is assembled
SCENE_COLUMNS = [
    "patch_id", "scene_id", "image_file", "label_file", "subset", "row_off", "col_off", "size",
    "valid_row_off", "valid_col_off", "valid_height", "valid_width", "minx", "miny", "maxx", "maxy", "crs",
    "building_frac", "nodata_frac", "building_px", "background_px", "labelled", "image_path", "mask_path",
]
MANIFEST_COLUMNS = SCENE_COLUMNS[:5] + ["split"] + SCENE_COLUMNS[5:]
# GeoTIFF creation options of every patch: fast deflate (level 1) with the horizontal predictor
PATCH_PROFILE: dict[str, Any] = {"driver": "GTiff", "compress": "deflate", "zlevel": 1, "predictor": 2}


# ---------------------------------------------------------------------------------------------------
# windows and splits (pure functions)


def window_offsets(length: int, size: int, stride: int) -> list[int]:
    """Offsets 0, stride, ... covering [0, length): the last window may overhang (padding), none is dropped."""
    if length <= 0:
        return []
    n = math.ceil(max(length - size, 0) / stride) + 1
    return [i * stride for i in range(n)]


def scene_windows(width: int, height: int, size: int, stride: int) -> list[Window]:
    """Row-major patch windows (size x size) covering a width x height scene."""
    return [
        Window(col, row, size, size)
        for row in window_offsets(height, size, stride)
        for col in window_offsets(width, size, stride)
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


def assign_folds(groups: Iterable[str], folds: int, fold: int, seed: int) -> dict[str, str]:
    """Cross-validation split: groups shuffled by `seed` into `folds` near-equal folds; fold `fold` is
    test, fold `fold + 1` (cyclically) val, the others train. Over fold = 0..folds-1 every group is
    tested exactly once, always by a model that never saw it.
    """
    keys = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(keys))
    out = {}
    for rank, idx in enumerate(order):
        k = rank % folds
        out[keys[idx]] = "test" if k == fold else "val" if k == (fold + 1) % folds else "train"
    return out


# ---------------------------------------------------------------------------------------------------
# one scene


def _params(data_cfg: DataConfig, tile_cfg: TileConfig) -> dict[str, Any]:
    """What a scene's patches depend on: a change re-tiles the scene even without --overwrite."""
    return {
        "size": tile_cfg.size, "stride": tile_cfg.stride, "target_gsd": tile_cfg.target_gsd,
        "bands": list(data_cfg.bands), "stretch_percentiles": list(data_cfg.stretch_percentiles),
        "nodata": data_cfg.nodata, "mask_threshold": data_cfg.mask_threshold,
        "max_residual_px": data_cfg.max_residual_px, "geotransforms": data_cfg.geotransforms,
    }


def scene_done(tile_dir: Path, scene_id: str, params: dict[str, Any] | None = None) -> bool:
    """True when the scene's CSV exists (and its recorded tiling parameters equal `params`, if given)."""
    csv_path = tile_dir / "scenes" / f"{scene_id}.csv"
    if not csv_path.is_file():
        return False
    if params is None:
        return True
    try:
        meta = json.loads((tile_dir / "scenes" / f"{scene_id}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("params") == json.loads(json.dumps(params))


def write_patch(path: Path, array: np.ndarray, transform: Any, crs: Any, nodata: float | None = None) -> None:
    """Write a (bands, h, w) uint8 array as a GeoTIFF atomically: a `.part` name, then rename.

    The temporary name is fixed (`.<name>.part` beside the patch): a scene's patch folder belongs to the
    one task tiling that scene, and a fixed name spares the mkstemp round trip of `atomic_path`, which
    cost a fifth of the stage's time at 256 px patches.
    """
    profile = dict(PATCH_PROFILE, width=array.shape[2], height=array.shape[1], count=array.shape[0],
                   dtype=array.dtype.name, transform=transform, crs=crs)
    if nodata is not None:
        profile["nodata"] = nodata
    tmp = path.with_name(f".{path.name}.part")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    out = Path(tile_dir)
    sid = source.scene_id
    params = _params(data_cfg, tile_cfg)
    if not overwrite and scene_done(out, sid, params):
        return SceneResult(sid, "done", -1)
    csv_path, meta_path = out / "scenes" / f"{sid}.csv", out / "scenes" / f"{sid}.json"
    csv_path.unlink(missing_ok=True)  # un-mark first: a crash below leaves the scene "not done"
    patch_dir = out / "patches" / sid
    shutil.rmtree(patch_dir, ignore_errors=True)  # stale patches of other sizes, leftover .part files
    patch_dir.mkdir(parents=True, exist_ok=True)
    size = tile_cfg.size
    rows: list[dict[str, Any]] = []
    with rasterio.Env(), open_scene(source, data_cfg, tile_cfg) as scene:
        crs, crs_text = scene.crs, crs_string(scene.crs)
        if not scene.has_labels:
            log.warning("%s: no labels: every mask pixel is 255 (ignore)", source.image)
        label_file = str(source.label or source.mask or "")
        for win in scene_windows(scene.width, scene.height, size, tile_cfg.stride):
            rgb, valid = scene.read(win)
            mask = scene.truth_mask(win)
            if mask is None:
                mask = np.full(valid.shape, 255, dtype=np.uint8)
            transform = scene.window_transform(win)
            r, c = int(win.row_off), int(win.col_off)
            name = f"{sid}_r{r:05d}_c{c:05d}"
            write_patch(patch_dir / f"{name}.tif", rgb, transform, crs)
            write_patch(patch_dir / f"{name}_mask.tif", mask[None], transform, crs, nodata=255)
            vr, vc, vh, vw = valid_window(win, scene.width, scene.height)
            building = int(np.count_nonzero(mask == 1))
            background = int(np.count_nonzero(mask == 0))
            minx, miny, maxx, maxy = array_bounds(size, size, transform)
            rows.append({
                "patch_id": name, "scene_id": sid, "image_file": str(source.image), "label_file": label_file,
                "subset": source.subset or "", "row_off": r, "col_off": c, "size": size,
                "valid_row_off": vr, "valid_col_off": vc, "valid_height": vh, "valid_width": vw,
                "minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "crs": crs_text,
                "building_frac": building / (building + background) if building + background else 0.0,
                "nodata_frac": 1.0 - float(np.count_nonzero(valid)) / valid.size,
                "building_px": building, "background_px": background, "labelled": scene.has_labels,
                "image_path": f"patches/{sid}/{name}.tif", "mask_path": f"patches/{sid}/{name}_mask.tif",
            })
        meta = scene.metadata()
    meta.update(params=params, patches=len(rows), location_id=source.location_id)
    write_json(meta_path, meta)
    _write_rows(csv_path, rows, SCENE_COLUMNS)  # last: marks the scene done
    return SceneResult(sid, "tiled", len(rows), time.perf_counter() - t0)


def _write_rows(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


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
    locations = (s.location_id for s in sources)
    if tile.split_mode == "kfold":
        by_loc = assign_folds(locations, tile.folds, tile.fold, cfg.seed)
    else:
        by_loc = assign_splits(locations, tile.split_ratios, cfg.seed)
    return {s.scene_id: by_loc[s.location_id] for s in sources}


def run_tile(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Tile every discovered scene (in parallel), assemble the manifest and summary; return the summary.

    Raises StageError when no scene could be used.
    """
    t0 = time.perf_counter()
    tile_dir = cfg.stage_dir("tile")
    tile_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tile.split_mode == "subset" and not cfg.data.subsets:
        raise StageError("tile.split_mode subset needs data.subsets (the xView2 subset folders)")
    sources = discover_scenes(cfg.data)
    if not sources:
        raise StageError(f"{cfg.data.root}: no scenes found (data.images_dir {cfg.data.images_dir!r}, "
                         f"image_glob {cfg.data.image_glob or 'default'!r})")
    log.info("tile: %d scenes under %s -> %s", len(sources), cfg.data.root, tile_dir)
    func = partial(tile_scene, data_cfg=cfg.data, tile_cfg=cfg.tile, tile_dir=str(tile_dir), overwrite=overwrite)
    skipped: list[dict[str, str]] = []
    tiled = resumed = 0
    ok_ids: set[str] = set()
    for src, result, error in map_scenes(cfg.cluster, func, sources, desc="tile"):
        if error is not None:
            bad = as_input_error(error, src.image)
            reason, path = bad.reason, bad.path
            log.error("%s: %s (scene skipped)", path, reason)
            skipped.append({"scene_id": src.scene_id, "file": path, "reason": reason})
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
    splits = _split_for(usable, cfg)
    manifest = assemble_manifest(tile_dir, usable, splits)
    summary = _summary(cfg, sources, usable, skipped, manifest, tiled, resumed, time.perf_counter() - t0)
    write_json(tile_dir / "summary.json", summary)
    _log_summary(summary)
    return summary


def assemble_manifest(tile_dir: Path, sources: list[SceneSource], splits: dict[str, str]) -> list[dict[str, Any]]:
    """Concatenate the per-scene CSVs (in source order), add `split`, write `manifest.csv` atomically."""
    rows: list[dict[str, Any]] = []
    for src in sources:
        with open(tile_dir / "scenes" / f"{src.scene_id}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                row["split"] = splits[src.scene_id]
                rows.append(row)
    _write_rows(tile_dir / "manifest.csv", rows, MANIFEST_COLUMNS)
    return rows


def _summary(cfg: Config, sources: list[SceneSource], usable: list[SceneSource], skipped: list[dict[str, str]],
             rows: list[dict[str, Any]], tiled: int, resumed: int, seconds: float) -> dict[str, Any]:
    per_split: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        sel = [r for r in rows if r["split"] == split]
        b = sum(int(r["building_px"]) for r in sel)
        g = sum(int(r["background_px"]) for r in sel)
        per_split[split] = {
            "scenes": len({r["scene_id"] for r in sel}),
            "patches": len(sel),
            "building_px": b,
            "background_px": g,
            "building_frac": b / (b + g) if b + g else 0.0,
        }
    return {
        "stage": "tile",
        "tile_dir": str(cfg.stage_dir("tile")),
        "scenes_found": len(sources),
        "scenes_read": len(usable),
        "scenes_tiled_now": tiled,
        "scenes_already_done": resumed,
        "scenes_skipped": len(skipped),
        "skipped": skipped,
        "patches": len(rows),
        "splits": per_split,
        "size": cfg.tile.size,
        "stride": cfg.tile.stride,
        "target_gsd": cfg.tile.target_gsd,
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
    for sk in s["skipped"]:
        log.info("tile: skipped %s: %s", sk["file"], sk["reason"])


# ---------------------------------------------------------------------------------------------------
# reading the outputs


def read_manifest(tile_dir: str | Path) -> Any:
    """The tile manifest as a pandas DataFrame (string columns stay strings; `crs` is '' in pixel space)."""
    import pandas as pd

    path = Path(tile_dir) / "manifest.csv"
    if not path.is_file():
        raise StageError(f"{path}: no tile manifest (run the tile stage first)")
    str_cols = {c: str for c in ("patch_id", "scene_id", "image_file", "label_file", "subset", "split", "crs",
                                 "image_path", "mask_path")}
    df = pd.read_csv(path, dtype=str_cols, keep_default_na=False)
    df["labelled"] = df["labelled"].astype(str) == "True"
    return df


def load_patch(tile_dir: str | Path, row: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (3, H, W), mask uint8 (H, W)) of one manifest row (a Series or a dict)."""
    base = Path(tile_dir)
    # a Series, a dict, or a namedtuple from DataFrame.itertuples()
    image_path = row["image_path"] if hasattr(row, "__getitem__") and not isinstance(row, tuple) else row.image_path
    mask_path = row["mask_path"] if hasattr(row, "__getitem__") and not isinstance(row, tuple) else row.mask_path
    try:
        with rasterio.open(base / image_path) as ds:
            image = ds.read()
        with rasterio.open(base / mask_path) as ds:
            mask = ds.read(1)
    except rasterio.errors.RasterioError as err:
        raise InputError(base / image_path, f"unreadable patch ({' '.join(str(err).split())})") from None
    return image, mask


# ---------------------------------------------------------------------------------------------------
# benchmark


def bench_tile(cfg: Config) -> dict[str, Any]:
    """Tile stage throughput vs the I/O floor (plain windowed read + GeoTIFF write of the same windows).

    Builds 4 synthetic 1024 px GeoTIFF scenes with GeoJSON labels in a temp dir; times the stage
    in-process (workers=0) and the floor in the same run; returns patches per second of each and the ratio.
    """
    import copy

    from .synth import write_synthetic_dataset

    n_scenes, scene_size = 4, 1024
    with tempfile.TemporaryDirectory(prefix="bench_tile_") as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "data", n_scenes=n_scenes, seed=cfg.seed, size=scene_size, geotiff=True)
        bcfg = copy.deepcopy(cfg)
        bcfg.name, bcfg.output_root = "bench", str(root / "out")
        bcfg.data = DataConfig(root=str(root / "data" / "geotiff"), format="geotiff", label_format="vector")
        bcfg.cluster.workers, bcfg.cluster.kind = 0, "local"
        size, stride = bcfg.tile.size, bcfg.tile.stride
        images = sorted((root / "data" / "geotiff" / "images").glob("*.tif"))

        def floor() -> int:
            out, n = root / "floor", 0
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for img in images:
                with rasterio.Env(), rasterio.open(img) as ds:
                    for win in scene_windows(ds.width, ds.height, size, stride):
                        rgb = ds.read([1, 2, 3], window=win, boundless=True, fill_value=0)
                        mask = np.zeros((1, size, size), dtype=np.uint8)
                        t = ds.window_transform(win)
                        name = f"{img.stem}_r{int(win.row_off):05d}_c{int(win.col_off):05d}"
                        # plain writes under the final names: no temporary file, no rename
                        for path, arr, nd in ((out / f"{name}.tif", rgb, None), (out / f"{name}_mask.tif", mask, 255)):
                            with rasterio.open(path, "w", **PATCH_PROFILE, width=size, height=size, count=arr.shape[0],
                                               dtype="uint8", transform=t, crs=ds.crs, nodata=nd) as dst:
                                dst.write(arr)
                        n += 1
            return n

        def stage() -> int:
            shutil.rmtree(bcfg.stage_dir("tile"), ignore_errors=True)
            return run_tile(bcfg, overwrite=True)["patches"]

        floor()  # warm-up: imports, GDAL driver, page cache
        t_stage, t_floor = [], []
        for _ in range(3):  # interleaved so that neither side gets a warmer machine; best of 3 each
            t = time.perf_counter()
            n_floor = floor()
            t_floor.append(time.perf_counter() - t)
            t = time.perf_counter()
            n_stage = stage()
            t_stage.append(time.perf_counter() - t)
    pps, floor_pps = n_stage / min(t_stage), n_floor / min(t_floor)
    ratio = pps / floor_pps
    log.info("bench tile: %d scenes of %d px, %d patches of %d px: stage %.1f patches/s, I/O floor %.1f "
             "patches/s, ratio %.2f (target >= 0.5)", n_scenes, scene_size, n_stage, size, pps, floor_pps, ratio)
    return {"bench": "tile", "patches_per_s": round(pps, 2), "floor_patches_per_s": round(floor_pps, 2),
            "ratio": round(ratio, 3), "patches": n_stage, "scenes": n_scenes, "scene_size": scene_size,
            "patch_size": size}
