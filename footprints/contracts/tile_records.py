"""The tile stage's records: `tile/scenes/<scene>.json` as a typed record, and the classes of `summary.json`.

A scene record is the scene's metadata and its freshness record (`footprints.contracts.freshness`), written
last by the tile stage: the scene's description (`SceneReader.metadata()`: image, size, transform, CRS,
GSD, the band of rows it cuts, ...), then `params` (the tiling parameters its key digests), `patches`,
`location_id`, `patch_geotiffs`, `data_source` (only for a scene of `data.sources`), `key` and `files`.
`write_scene_record` is its one writer and `read_scene_record` its one reader; the JSON keys, their order
and their values are the same as when the stage wrote the dict itself, so runs tiled before stay fresh.

Records of every version read: the description is kept as written (a mapping, whatever keys that version
gave it), and a field an older record lacks reads as None and is not written back (a record from before
`tile.patch_geotiffs` has the GeoTIFF patches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .freshness import FILES, KEY, files_intact, read_record, write_record

# the stage's own fields, after the scene's description in the file; absent from some older records
_OWN = ("params", "patches", "location_id", "patch_geotiffs", "data_source")
# the classes of a run tiled before `tile.target` offered more than two
TWO_CLASSES = ("background", "building")


@dataclass(frozen=True)
class TileSceneRecord:
    """One tiled scene. `files` (sizes in bytes, relative to the record's folder) is set by the writer."""

    key: str
    scene: Mapping[str, Any] = field(default_factory=dict)  # the scene's description, as written
    params: dict[str, Any] | None = None  # the tiling parameters (`stages.tile.tiling_params`)
    patches: int | None = None
    location_id: str | None = None
    patch_geotiffs: bool | None = None  # None: a record from before the option (it has the GeoTIFFs)
    data_source: str | None = None  # the `data.sources` entry of the scene; None: the one `data.root`
    files: dict[str, int] = field(default_factory=dict)

    @property
    def has_geotiffs(self) -> bool:
        """Whether the scene's GeoTIFF patches were written (always, before `tile.patch_geotiffs`)."""
        return True if self.patch_geotiffs is None else bool(self.patch_geotiffs)

    @property
    def image_file(self) -> str:
        """The scene's image, as the tile stage found it."""
        return str(self.scene.get("image_file", ""))

    @property
    def rows(self) -> tuple[float, ...] | None:
        """The band of the image's rows the scene is (`tile.val_band`), as fractions; None: the whole image."""
        rows = self.scene.get("rows")
        return tuple(rows) if rows else None

    def is_fresh(self, path: str | Path, key: str) -> bool:
        """The freshness rule for this record, read from `path`: the same key, every listed file intact."""
        return self.key == key and files_intact(path, {FILES: self.files})

    def lists_intact(self, path: str | Path, names: Iterable[str]) -> bool:
        """Every one of `names` (relative to the record's folder) is listed and has its recorded size."""
        names = list(names)
        return all(n in self.files for n in names) and files_intact(path, {FILES: self.files}, names)


def write_scene_record(path: str | Path, record: TileSceneRecord, files: Iterable[str | Path]) -> TileSceneRecord:
    """Write a scene's record (last, atomically); `files` are the paths it covers (their sizes replace
    `record.files`). Returns the record as written."""
    own = {name: getattr(record, name) for name in _OWN if getattr(record, name) is not None}
    written = write_record(path, record.key, files, **record.scene, **own)
    return dataclasses.replace(record, files=dict(written[FILES]))


def read_scene_record(path: str | Path) -> TileSceneRecord | None:
    """The scene record at `path`, or None when it is absent or unreadable (the scene is then tiled again)."""
    raw = read_record(path)
    if raw is None:
        return None
    files = raw.get(FILES) or {}
    if not isinstance(files, dict):
        return None
    scene = {k: v for k, v in raw.items() if k not in (KEY, FILES, *_OWN)}
    return TileSceneRecord(key=str(raw.get(KEY, "")), scene=scene, files=files,
                           **{name: raw.get(name) for name in _OWN})


def read_tile_classes(summary_path: str | Path) -> list[str]:
    """The classes the tile stage labelled the patches with (`tile/summary.json`'s `classes`; a run tiled
    before K classes, or none yet: the two of old)."""
    return list((read_record(summary_path) or {}).get("classes") or TWO_CLASSES)
