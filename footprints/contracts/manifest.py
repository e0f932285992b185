"""The tile manifest: one row per patch, the contract between `tile` and every later stage.

`tile/scenes/<scene>.csv` holds one scene's rows (SCENE_COLUMNS); `tile/manifest.csv` concatenates the
usable scenes' rows in discovery order and adds `split` (MANIFEST_COLUMNS). `read_manifest` refuses a file
whose columns differ from the schema, naming the file, so that a stage never reads a stale or foreign one.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import StageError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# column -> type; the order is the file's column order (`split` is added when the manifest is assembled)
SCENE_SCHEMA: dict[str, type] = {
    "patch_id": str, "scene_id": str, "image_file": str, "label_file": str, "subset": str,
    "row_off": int, "col_off": int, "size": int,
    "valid_row_off": int, "valid_col_off": int, "valid_height": int, "valid_width": int,
    "minx": float, "miny": float, "maxx": float, "maxy": float, "crs": str,
    "building_frac": float, "nodata_frac": float, "building_px": int, "background_px": int,
    "class_px": str,  # labelled pixels per class of tile.target, space-separated
    "labelled": bool,
    "image_path": str, "mask_path": str,
}  # fmt: skip
SCENE_COLUMNS = list(SCENE_SCHEMA)
MANIFEST_COLUMNS = SCENE_COLUMNS[:5] + ["split"] + SCENE_COLUMNS[5:]
MANIFEST_SCHEMA: dict[str, type] = {c: (str if c == "split" else SCENE_SCHEMA[c]) for c in MANIFEST_COLUMNS}


def write_rows(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write manifest rows as CSV, atomically (extra keys in a row are ignored)."""
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows `write_rows` wrote (values as strings)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


Totals = dict[str, dict[str, int]]  # split -> scenes, patches, building_px, background_px


def _no_totals() -> Totals:
    return {s: {"scenes": 0, "patches": 0, "building_px": 0, "background_px": 0} for s in SPLITS}


def assemble_manifest(tile_dir: Path, scene_ids: Sequence[str], splits: dict[str, str]) -> Totals:
    """Concatenate the per-scene CSVs (in the given order), add `split`, write `manifest.csv` atomically, one
    scene at a time (memory holds one scene's rows, whatever the number of scenes). Returns per split the
    number of scenes and patches and the building and background pixels."""
    return assemble_manifest_by_group(tile_dir, scene_ids, splits, {})[0]


def assemble_manifest_by_group(tile_dir: Path, scene_ids: Sequence[str], splits: dict[str, str],
                               groups: dict[str, str]) -> tuple[Totals, dict[str, Totals]]:
    """`assemble_manifest`, with the same totals for each group of scenes too (`groups`: scene id -> group,
    e.g. its data source; scenes in no group count in the overall totals only)."""
    totals = _no_totals()
    by_group: dict[str, Totals] = {g: _no_totals() for g in dict.fromkeys(groups.values())}
    with atomic_path(Path(tile_dir) / "manifest.csv", suffix=".tmp") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for sid in scene_ids:
            rows = read_rows(Path(tile_dir) / "scenes" / f"{sid}.csv")
            split = splits[sid]
            # one of SPLITS: the tile stage assigns nothing else
            for t in [totals[split]] + ([by_group[groups[sid]][split]] if sid in groups else []):
                t["scenes"] += 1 if rows else 0
                t["patches"] += len(rows)
                t["building_px"] += sum(int(row["building_px"]) for row in rows)
                t["background_px"] += sum(int(row["background_px"]) for row in rows)
            for row in rows:
                row["split"] = split
            writer.writerows(rows)
    return totals, by_group


# what the stages that read patches need of each row (the patch store, its GeoTIFF fallback, the split): with
# ~147,000 xView2 patches, the whole manifest as Python dicts would be ~0.5 GB, these columns a fraction
PATCH_COLUMNS = ["patch_id", "scene_id", "split", "size", "labelled", "class_px", "image_path", "mask_path"]


def read_manifest(tile_dir: str | Path, columns: Sequence[str] | None = None) -> Any:
    """The tile manifest as a pandas DataFrame with the schema's types (`crs` is '' in pixel space); only
    `columns` (in file order) when given.

    Raises StageError naming the file when it is missing or its columns are not the schema's.
    """
    import pandas as pd

    path = Path(tile_dir) / "manifest.csv"
    if not path.is_file():
        raise StageError(f"{path}: no tile manifest (run the tile stage first)")
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise StageError(f"{path}: unreadable tile manifest ({' '.join(str(err).split())[:160]})") from None
    if header != MANIFEST_COLUMNS:
        missing = [c for c in MANIFEST_COLUMNS if c not in header]
        extra = [c for c in header if c not in MANIFEST_COLUMNS]
        raise StageError(f"{path}: not a tile manifest of this version (missing columns {missing}, "
                         f"unexpected {extra}); rerun the tile stage with --overwrite")
    wanted = list(MANIFEST_COLUMNS) if columns is None else [c for c in MANIFEST_COLUMNS if c in set(columns)]
    str_cols = {c: str for c, t in MANIFEST_SCHEMA.items() if t in (str, bool) and c in wanted}
    try:
        df = pd.read_csv(path, dtype=str_cols, keep_default_na=False, usecols=wanted)[wanted]
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: unreadable tile manifest ({' '.join(str(err).split())[:160]})") from None
    if "labelled" in df:
        df["labelled"] = df["labelled"].astype(str) == "True"
    return df


def split_scene_ids(tile_dir: str | Path, split: str) -> list[str]:
    """The scene ids of one split, in manifest order."""
    df = read_manifest(tile_dir, ["scene_id", "split"])
    return list(dict.fromkeys(df.loc[df["split"] == split, "scene_id"]))


def whole_scene_splits(tile_dir: str | Path) -> dict[str, str]:
    """scene id -> split; a scene cut into bands by `tile.val_band` (`<scene>__rowsAA-BBB`) under its own id,
    with its test split when it has one (a scene is tested whole or not at all)."""
    import re

    table = read_manifest(tile_dir, ["scene_id", "split"]).drop_duplicates()
    out: dict[str, str] = {}
    for sid, split in zip(table["scene_id"], table["split"], strict=True):
        whole = re.sub(r"__rows\d{2}-\d{3}$", "", str(sid))
        out[whole] = "test" if out.get(whole) == "test" else str(split)
    return out


def split_sources(tile_dir: str | Path, data_cfg: Any, split: str) -> list[Any]:
    """The scenes (`SceneSource`) of one split of the manifest, found again under `data.root`, sorted by id.

    A band of a scene (`tile.val_band`) is found through its image and the rows its tile record names. A
    scene of the manifest that is no longer under `data.root` is reported and left out.
    """
    import dataclasses

    from ..scenes.sources import discover_scenes
    from .paths import RunPaths
    from .tile_records import read_scene_record

    ids = split_scene_ids(tile_dir, split)
    if not ids:
        return []
    found = {s.scene_id: s for s in discover_scenes(data_cfg)}
    out, missing = [], []
    for sid in ids:
        src = found.get(sid)
        if src is None:  # a band: the image it cuts (of its data source, when several), and which rows
            record = read_scene_record(RunPaths(Path(tile_dir).parent).scene_record(sid))
            image = Path(record.image_file if record is not None else "")
            owner = record.data_source if record is not None else None
            whole = next((s for s in found.values() if s.image.name == image.name and s.source_name == owner), None)
            if whole is not None and record is not None and record.rows:
                src = dataclasses.replace(whole, rows=record.rows)
        if src is None or src.scene_id != sid:
            missing.append(sid)
        else:
            out.append(src)
    if missing:
        where = "the roots of data.sources" if getattr(data_cfg, "sources", None) else data_cfg.root
        log.warning("%d %s scene(s) of the tile manifest are no longer under %s: %s", len(missing), split,
                    where, ", ".join(sorted(missing)[:5]))
    return sorted(out, key=lambda s: s.scene_id)


def class_pixels(rows: Any) -> list[int]:
    """Labelled pixels per class summed over manifest rows (a DataFrame of them)."""
    totals: list[int] = []
    for text in rows["class_px"]:
        counts = [int(v) for v in str(text).split()]
        totals = [a + b for a, b in zip(totals, counts, strict=True)] if totals else counts
    return totals
