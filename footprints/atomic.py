"""Write-then-rename helpers: an interrupted run never leaves a half-written file under a final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary name ends in `.part` (so a glob for `*.tif` never sees it) unless `suffix` is given:
    pass GDAL writers an explicit `driver=`, and numpy an open file object (np.save appends `.npy`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix or path.suffix + ".part")
    os.close(fd)
    os.unlink(tmp)  # writers that refuse to overwrite (GDAL drivers) create it themselves
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def is_temporary(path: Path) -> bool:
    """A temporary file of `atomic_path` (or of a writer that uses its naming): `.<name>.<...>.part...` or
    `.<name>.<...>.tmp`; never a lock file (`*.lock`, see footprints.runtime.lock)."""
    name = path.name
    return name.startswith(".") and (".part" in name or name.endswith(".tmp")) and not name.endswith(".lock")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files a killed process left under `folder`; returns how many.

    Call it only while holding the folder's lock (`footprints.runtime.lock.hold`): then no live run writes there,
    and a live run's temporary file is never taken for a killed run's. Symbolic links are removed as links,
    never followed."""
    import shutil

    removed = 0
    for path in sorted(Path(folder).rglob(".*")) if Path(folder).is_dir() else []:
        if is_temporary(path) and (path.exists() or path.is_symlink()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed
