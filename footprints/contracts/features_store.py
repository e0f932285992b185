"""Hypercolumn shards: what `features` writes and `train-classifier` reads, in `outputs/<name>/features/`.

- `<split>_<shard:04d>.npz`: `X` float32 (n, C), `y` int64 (n,), `patch_id` str (n,), `rc` int32 (n, 2)
  (row, col in the patch), `w` float32 (n,) the number of mask pixels each sample stands for, plus the
  shard's `class_px` (mask pixels per class) and its partial statistics (`stat_n`, `stat_mean`, `stat_m2`,
  float64) and a `fingerprint` (settings + patch ids).
- `stats.npz`: `mean`, `std` (population std) float64 (C,) of the train split.
- `meta.json`: the run's description and its freshness record (`key`, and the size of every shard), written
  last: a truncated or missing shard makes the run stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError, StageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("X", "y", "w", "patch_id", "rc")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:04d}.npz"


def write_shard(path: Path, arrays: dict[str, Any]) -> None:
    """Write one shard atomically (numpy gets an open file: it would append `.npy` to a name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_shard_header(path: Path) -> dict[str, Any] | None:
    """Fingerprint, sample count and partial statistics of a finished shard; None when absent or damaged."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {
                "fingerprint": str(z["fingerprint"]),
                "n": int(len(z["y"])),
                "class_px": z["class_px"].astype(np.int64),
                "stat_n": int(z["stat_n"]),
                "stat_mean": z["stat_mean"],
                "stat_m2": z["stat_m2"],
            }
    except Exception as err:  # noqa: BLE001 - a damaged shard is simply recomputed
        log.warning("%s: unreadable shard (%s); recomputing it", path, type(err).__name__)
        return None


def read_meta(feature_dir: Path) -> dict[str, Any]:
    path = Path(feature_dir) / "meta.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run the features stage first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable features metadata ({err}); rerun features") from None


class SplitReader:
    """The shards of one split, read in pieces of at most `chunk_rows` samples: never the whole split at once.

    Shards are uncompressed `.npz` files (`np.savez`), so each array's rows sit at a fixed offset in the
    file: a piece is a seek and a read of its rows (plain reads, not memory maps: the page cache they fill
    is the kernel's to drop, not this process's resident memory). `chunks()` lists the pieces; `read`
    returns one piece; `buffers` fills a bounded shuffle buffer from the pieces in a seeded order.
    """

    def __init__(self, feature_dir: Path, split: str, chunk_rows: int = 4096):
        meta = read_meta(feature_dir)
        self.channels = int(meta["channels"])
        self.paths = [Path(feature_dir) / name for name in meta["shards"].get(split, [])]
        self._layout = [_npz_layout(path) for path in self.paths]
        self.sizes = [int(layout["y"][1][0]) for layout in self._layout]
        self.n = sum(self.sizes)
        step = max(1, int(chunk_rows))
        self._chunks = tuple((k, start, min(start + step, size)) for k, size in enumerate(self.sizes)
                             for start in range(0, size, step))

    def chunks(self) -> tuple[tuple[int, int, int], ...]:
        """(shard index, first row, end row) of every piece, in file order."""
        return self._chunks

    def read(self, chunk: tuple[int, int, int], out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """X (rows, C) float32 (into `out` when given), y int64, w float32 of one piece."""
        k, start, stop = chunk
        path, layout = self.paths[k], self._layout[k]
        try:
            with open(path, "rb") as fh:
                arrays = {name: _read_rows(fh, layout[name], start, stop) for name in ("y", "w")}
                arrays["X"] = _read_rows(fh, layout["X"], start, stop, out)
        except (OSError, ValueError) as err:
            raise InputError(path, f"unreadable feature shard ({type(err).__name__}: {err}); rerun features "
                             "with --overwrite") from None
        arrays["y"] = arrays["y"].astype(np.int64, copy=False)
        arrays["w"] = arrays["w"].astype(np.float32, copy=False)
        return arrays

    def buffers(self, rng: np.random.Generator, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the split holding at most `rows` samples: the pieces gathered into one reused buffer
        of `rows` samples, each fill yielded as X, y, w (valid until the next fill; the caller shuffles
        within it). A split that fits in one fill is read in file order (the caller's shuffle of the fill
        is then a full shuffle); a larger one in an order of its pieces drawn from `rng`."""
        rows = max(1, int(rows))
        X = np.empty((min(rows, max(self.n, 1)), self.channels), dtype=np.float32)
        ys: list[np.ndarray] = []
        ws: list[np.ndarray] = []
        filled = 0
        order = range(len(self._chunks)) if self.n <= rows else rng.permutation(len(self._chunks))
        for i in order:
            k, start, stop = self._chunks[i]
            while start < stop:  # a piece larger than the room left is split across fills
                take = min(stop - start, len(X) - filled)
                piece = self.read((k, start, start + take), out=X[filled : filled + take])
                ys.append(piece["y"])
                ws.append(piece["w"])
                filled += take
                start += take
                if filled == len(X):
                    yield {"X": X, "y": np.concatenate(ys), "w": np.concatenate(ws)}
                    ys, ws, filled = [], [], 0
        if filled:
            yield {"X": X[:filled], "y": np.concatenate(ys), "w": np.concatenate(ws)}


def _npz_layout(path: Path) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
    """{array: (byte offset of its data in the file, shape, dtype)} of the arrays X, y, w of a shard."""
    import struct
    import zipfile

    out = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
            for name in ("X", "y", "w"):
                info = zf.getinfo(f"{name}.npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{name} is compressed")
                fh.seek(info.header_offset)
                local = fh.read(30)  # the member's local header: its name and extra field precede the data
                if local[:4] != b"PK\x03\x04":
                    raise ValueError(f"no local header for {name}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                fh.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
                if fortran:
                    raise ValueError(f"{name} is in Fortran order")
                out[name] = (fh.tell(), tuple(shape), np.dtype(dtype))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, struct.error) as err:
        raise InputError(path, f"unreadable feature shard ({type(err).__name__}: {err}); rerun features "
                         "with --overwrite") from None
    if out["X"][1][0] != out["y"][1][0] or out["w"][1][0] != out["y"][1][0]:
        raise InputError(path, "feature shard arrays of different lengths; rerun features with --overwrite")
    return out


def _read_rows(fh: Any, layout: tuple[int, tuple[int, ...], np.dtype], start: int, stop: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of one array of a shard, read from its offset (into `out` when the dtypes match)."""
    offset, shape, dtype = layout
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    count = (stop - start) * per_row
    fh.seek(offset + start * per_row * dtype.itemsize)
    if out is not None and out.dtype == dtype and out.flags.c_contiguous:
        got = fh.readinto(memoryview(out).cast("B"))
        if got != count * dtype.itemsize:
            raise ValueError(f"truncated: {got} of {count * dtype.itemsize} bytes")
        return out
    data = np.fromfile(fh, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"truncated: {data.size} of {count} values")
    data = data.reshape((stop - start, *shape[1:]))
    if out is not None:
        out[...] = data
        return out
    return data


def load_features(feature_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Every array of every shard of `split`, concatenated in memory: for tests and inspection of small runs
    (train-classifier streams the shards with `SplitReader` instead)."""
    meta = read_meta(feature_dir)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    for name in meta["shards"].get(split, []):
        path = Path(feature_dir) / name
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in parts:
                    parts[k].append(z[k])
        except Exception as err:  # noqa: BLE001 - zip, OS and format errors alike: a damaged shard
            raise InputError(path, f"unreadable feature shard ({type(err).__name__}: {err}); rerun features "
                             "with --overwrite") from None
    if not parts["y"]:
        channels = int(meta["channels"])
        return {
            "X": np.zeros((0, channels), np.float32), "y": np.zeros(0, np.int64), "w": np.zeros(0, np.float32),
            "patch_id": np.zeros(0, dtype="<U1"), "rc": np.zeros((0, 2), np.int32),
        }
    return {k: np.concatenate(v) for k, v in parts.items()}


def write_stats(path: Path, mean: np.ndarray, std: np.ndarray, n: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mean=mean, std=std, n=np.int64(n))


def read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the train split's hypercolumns."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["mean"], z["std"]
    except Exception as err:  # noqa: BLE001
        raise InputError(path, f"unreadable feature statistics ({type(err).__name__}); rerun features") from None
