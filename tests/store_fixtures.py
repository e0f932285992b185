"""The patch store for hand-made tile outputs (`fake_tiles`, `train_fixtures`): what the tile stage writes.

`add_patch_store(tile_dir)` builds every scene's shard from its GeoTIFF patches (`build_store`, the tile
stage's own upgrade path) and writes the scene records that list it, so that training reads the store as
it does after a real `footprints tile`.
"""

from __future__ import annotations

from pathlib import Path

from footprints.contracts.freshness import write_record
from footprints.contracts.manifest import read_manifest
from footprints.contracts.patches import build_store
from footprints.contracts.paths import RunPaths


def add_patch_store(tile_dir: Path) -> list[str]:
    """Shards and records for every scene of `tile_dir/manifest.csv`; returns the scene ids."""
    manifest = read_manifest(tile_dir)
    paths = RunPaths(Path(tile_dir).parent)
    scenes = []
    for sid, rows in manifest.groupby("scene_id", sort=False):
        records = rows.to_dict("records")
        files = build_store(tile_dir, str(sid), records)
        patches = [Path(tile_dir) / r[k] for r in records for k in ("image_path", "mask_path")]
        write_record(paths.scene_record(str(sid)), "hand-made", patches + files, patches=len(records))
        scenes.append(str(sid))
    return scenes
