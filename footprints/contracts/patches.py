"""Patches: the patch store, and (with `tile.patch_geotiffs`) a 3-band uint8 image GeoTIFF and a 1-band
mask GeoTIFF per manifest row.

Mask values: class indices 0..K-1 of `tile.target` (0 background), 255 ignore (nodata, padding outside the
scene). Each GeoTIFF patch carries its own transform and the scene's CRS, so GIS users can open any of them.
Paths in the manifest (`image_path`, `mask_path`) are relative to the tile folder, and empty strings for a
scene tiled without GeoTIFFs (`tile.patch_geotiffs: false`, e.g. xView2: no two files per patch).

The patch store holds the same pixels as contiguous arrays for the stages that read patches by the
thousand (train-segmenter, features): one shard per scene, `tile/store/<scene>/images.npy` (n, 3, size,
size) uint8, `masks.npy` (n, size, size) uint8 and `patch_ids.npy` (n,), row i being the i-th row of
`tile/scenes/<scene>.csv`. They are plain `.npy` files read as memory maps: no decoding, one gather per
batch. The shard's files are listed in the scene's freshness record like its GeoTIFFs, so a missing or
truncated shard is seen (`store_is_intact`); a reader falls back to the GeoTIFFs of a scene without an
intact shard (`PatchStore`), and refuses, naming the scene's shard, a scene that has neither.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from ..errors import InputError

IGNORE = 255
# GeoTIFF creation options of every patch: fast deflate (level 1) with the horizontal predictor
PATCH_PROFILE: dict[str, Any] = {"driver": "GTiff", "compress": "deflate", "zlevel": 1, "predictor": 2}


def patch_name(scene_id: str, row_off: int, col_off: int) -> str:
    return f"{scene_id}_r{row_off:05d}_c{col_off:05d}"


def write_patch(path: Path, array: np.ndarray, transform: Any, crs: Any, nodata: float | None = None) -> None:
    """Write a (bands, h, w) uint8 array as a GeoTIFF atomically: a `.part` name, then rename.

    The temporary name is fixed (`.<name>.part` beside the patch): a scene's patch folder belongs to the
    one task tiling that scene, and a fixed name spares the mkstemp round trip of `atomic_path`, which
    cost a fifth of the tile stage's time at 256 px patches.
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


def _field(row: Any, name: str) -> Any:
    """A column of a manifest row given as a dict, a pandas Series or a namedtuple (itertuples)."""
    return getattr(row, name) if isinstance(row, tuple) else row[name]


def has_geotiff(row: Any) -> bool:
    """True when a manifest row names its GeoTIFF patch (empty for `tile.patch_geotiffs: false`)."""
    value = _field(row, "image_path")
    return isinstance(value, str) and bool(value)


def _no_patches(tile_dir: str | Path, scene_id: str) -> InputError:
    return InputError(store_dir(tile_dir, scene_id), f"scene {scene_id} has no intact patch store and no GeoTIFF "
                      "patches (tiled with tile.patch_geotiffs false); rerun the tile stage")


def load_patch(tile_dir: str | Path, row: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (3, H, W), mask uint8 (H, W)) of one manifest row, from its GeoTIFFs.

    Raises InputError naming the scene's shard when the row has no GeoTIFFs (`tile.patch_geotiffs: false`).
    """
    base = Path(tile_dir)
    if not has_geotiff(row):
        raise _no_patches(base, str(_field(row, "scene_id")))
    image_path = base / _field(row, "image_path")
    try:
        with rasterio.open(image_path) as ds:
            image = ds.read()
        with rasterio.open(base / _field(row, "mask_path")) as ds:
            mask = ds.read(1)
    except rasterio.errors.RasterioError as err:
        raise InputError(image_path, f"unreadable patch ({' '.join(str(err).split())})") from None
    return image, mask


# ---------------------------------------------------------------------------------------------------
# the patch store: the same patches as contiguous arrays, for training and features (GeoTIFFs stay for GIS)

STORE_DIR = "store"
STORE_FILES = ("images.npy", "masks.npy", "patch_ids.npy")


def store_dir(tile_dir: str | Path, scene_id: str) -> Path:
    """`tile/store/<scene>/`: the scene's shard of the patch store."""
    return Path(tile_dir) / STORE_DIR / scene_id


def store_paths(tile_dir: str | Path, scene_id: str) -> list[Path]:
    """The shard's files (`images.npy`, `masks.npy`, `patch_ids.npy`), as the scene's record lists them."""
    folder = store_dir(tile_dir, scene_id)
    return [folder / name for name in STORE_FILES]


class StoreWriter:
    """Writes one scene's shard: `images.npy` (n, 3, size, size) and `masks.npy` (n, size, size), uint8
    `.npy` files (read back as memory maps), and `patch_ids.npy`; row i is the i-th row of
    `scenes/<scene>.csv`. Patches are written with plain file writes at their row's offset (in order, as
    the tile stage produces them, that is one sequential stream per file).

    Files are written under `.part` names and renamed by `finish()`; on error (or `abort()`) nothing of
    the shard stays. Use as a context manager.
    """

    def __init__(self, folder: Path, n: int, size: int, bands: int = 3):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.ids: list[str] = [""] * n
        self._tmp = {name: self.folder / f".{name}.part" for name in STORE_FILES}
        self._files: dict[str, Any] = {}
        self._layout: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (data offset, item shape)
        for name, item in (("images.npy", (bands, size, size)), ("masks.npy", (size, size))):
            fh = open(self._tmp[name], "wb")  # noqa: SIM115 - closed in finish() / abort()
            self._files[name] = fh
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (n, *item)})
            self._layout[name] = (fh.tell(), item)
            fh.truncate(fh.tell() + n * int(np.prod(item)))  # full size now: unwritten rows read as 0

    def _write(self, name: str, i: int, array: np.ndarray) -> None:
        offset, item = self._layout[name]
        if array.shape != item or array.dtype != np.uint8:
            raise ValueError(f"patch store {name}: expected uint8 {item}, got {array.dtype} {array.shape}")
        fh = self._files[name]
        fh.seek(offset + i * array.size)
        fh.write(np.ascontiguousarray(array).data)

    def put(self, i: int, patch_id: str, image: np.ndarray, mask: np.ndarray) -> None:
        self._write("images.npy", i, image)
        self._write("masks.npy", i, mask)
        self.ids[i] = patch_id

    def finish(self) -> list[Path]:
        """Close the files, write the ids, rename every file to its final name; returns the final paths."""
        for fh in self._files.values():
            fh.close()
        with open(self._tmp["patch_ids.npy"], "wb") as fh:
            np.save(fh, np.asarray(self.ids, dtype=str))
        out = []
        for name, tmp in self._tmp.items():
            os.replace(tmp, self.folder / name)
            out.append(self.folder / name)
        return out

    def abort(self) -> None:
        for fh in self._files.values():
            fh.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def build_store(tile_dir: str | Path, scene_id: str, rows: list[dict[str, Any]]) -> list[Path]:
    """Write a scene's shard from its GeoTIFF patches (`rows`: its manifest rows, in file order): how a scene
    tiled before the store existed gets one without being tiled again. Returns the shard's files."""
    if not rows:
        raise ValueError(f"{scene_id}: no patch rows to build a store from")
    first, _ = load_patch(tile_dir, rows[0])
    with StoreWriter(store_dir(tile_dir, scene_id), len(rows), first.shape[-1], first.shape[0]) as writer:
        for i, row in enumerate(rows):
            image, mask = load_patch(tile_dir, row)
            writer.put(i, str(_field(row, "patch_id")), image, mask)
        return writer.finish()


def store_is_intact(tile_dir: str | Path, scene_id: str) -> bool:
    """True when the scene's record (`tile/scenes/<scene>.json`) lists its shard and every shard file has the
    recorded size: the freshness rule, applied to the store alone."""
    from .paths import RunPaths
    from .tile_records import read_scene_record

    record_path = RunPaths(Path(tile_dir).parent).scene_record(scene_id)
    record = read_scene_record(record_path)
    if record is None:
        return False
    names = [os.path.relpath(p, record_path.parent) for p in store_paths(tile_dir, scene_id)]
    return record.lists_intact(record_path, names)


class PatchStore:
    """The patches of a set of manifest rows, read by position: from each scene's shard (memory maps) where
    its record lists an intact one, else from the GeoTIFF patches (a tile output written before the store).
    A scene with neither (tiled without GeoTIFFs, its shard since lost) raises InputError naming its shard.

    `read(positions)` returns (images uint8 (b, 3, H, W), masks uint8 (b, H, W)) in the order asked. The
    memory maps are opened lazily in the process that reads (DataLoader workers open their own).
    """

    def __init__(self, tile_dir: str | Path, rows: Any):
        self.tile_dir = Path(tile_dir)
        records = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
        self.rows = records
        self.scenes: list[str] = []
        self.scene_of = np.zeros(len(records), dtype=np.int64)
        self.index_of = np.full(len(records), -1, dtype=np.int64)  # row in the scene's shard, -1 = GeoTIFF
        by_scene: dict[str, list[int]] = {}
        for pos, row in enumerate(records):
            by_scene.setdefault(str(row["scene_id"]), []).append(pos)
        for sid, positions in by_scene.items():
            k = len(self.scenes)
            self.scenes.append(sid)
            self.scene_of[positions] = k
            if not store_is_intact(self.tile_dir, sid):
                continue
            ids = np.load(store_dir(self.tile_dir, sid) / "patch_ids.npy")
            where = {str(pid): i for i, pid in enumerate(ids)}
            found = [where.get(str(records[p]["patch_id"]), -1) for p in positions]
            if min(found) >= 0:  # a shard that misses a row is not this tiling's: GeoTIFFs for the scene
                self.index_of[positions] = found
        for sid, positions in by_scene.items():
            if self.index_of[positions[0]] < 0 and not all(has_geotiff(records[p]) for p in positions):
                raise _no_patches(self.tile_dir, sid)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def stored_fraction(self) -> float:
        """The share of the rows read from the store (1.0 = no GeoTIFF decoding)."""
        return float((self.index_of >= 0).mean()) if len(self.index_of) else 1.0

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in the receiving process, never pickled
        return state

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            folder = store_dir(self.tile_dir, self.scenes[k])
            self._maps[k] = (np.load(folder / "images.npy", mmap_mode="r"),
                             np.load(folder / "masks.npy", mmap_mode="r"))
        return self._maps[k]

    def read(self, positions: Any) -> tuple[np.ndarray, np.ndarray]:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size == 0:
            raise ValueError("PatchStore.read: no positions")
        images: np.ndarray | None = None
        masks: np.ndarray | None = None
        for k in np.unique(self.scene_of[pos]):
            sel = np.flatnonzero(self.scene_of[pos] == k)
            idx = self.index_of[pos[sel]]
            if idx[0] >= 0:
                img_mm, msk_mm = self._shard(int(k))
                img, msk = img_mm[idx], msk_mm[idx]  # one gather per scene (sorted reads would not matter)
            else:
                pairs = [load_patch(self.tile_dir, self.rows[int(p)]) for p in pos[sel]]
                img = np.stack([a for a, _ in pairs])
                msk = np.stack([m for _, m in pairs])
            if images is None or masks is None:
                if len(sel) == len(pos):
                    return np.ascontiguousarray(img), np.ascontiguousarray(msk)
                images = np.empty((len(pos), *img.shape[1:]), dtype=np.uint8)
                masks = np.empty((len(pos), *msk.shape[1:]), dtype=np.uint8)
            images[sel] = img
            masks[sel] = msk
        assert images is not None and masks is not None
        return images, masks
