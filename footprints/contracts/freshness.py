"""The one rule for "is this output up to date?", used by every stage.

A unit of output (a tiled scene, a features run, a classifier, a predicted scene, an evaluation) is
finished when its *record* exists: a small JSON file written atomically, after every file it covers.
The record holds

- `key`: a digest of everything the output depends on (settings, and the keys or digests of its inputs);
- `files`: the size in bytes of every file it covers (paths relative to the record's folder).

`is_fresh(record, key)` is true when the record exists, its key equals the expected one, and every file
it lists exists with that size: a changed setting, a retrained model, a deleted or truncated file each
make the unit stale, and the stage redoes it. Content, not existence or modification times, decides.
A stage un-marks a unit (deletes its record) before rewriting it, so a crash leaves it stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..atomic import write_json

KEY = "key"
FILES = "files"


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (16 hex digits): the identity of an input such as a checkpoint."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_stamp(path: str | Path | None) -> list[Any]:
    """[path, size, mtime_ns] of an input file ([path] when absent, [] for None): a key with it redoes the
    unit when the file is replaced or edited, without reading it."""
    if path is None:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return [str(path)]
    return [str(path), st.st_size, st.st_mtime_ns]


def file_sizes(folder: Path, files: Iterable[str | Path]) -> dict[str, int]:
    """{path relative to `folder`: size in bytes} of existing files (given as usable paths)."""
    return {os.path.relpath(Path(f), folder): Path(f).stat().st_size for f in files}


def write_record(path: str | Path, key: str, files: Iterable[str | Path] = (), **extra: Any) -> dict[str, Any]:
    """Write the record of a finished unit (last, atomically); `files` are the paths it covers."""
    path = Path(path)
    record = {**extra, KEY: key, FILES: file_sizes(path.parent, files)}
    write_json(path, record)
    return record


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at `path`, or None when it is absent or unreadable (then the unit is simply redone)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def files_intact(path: str | Path, record: dict[str, Any], only: Iterable[str] | None = None) -> bool:
    """Every file the record lists (or those of `only`, names relative to its folder) exists with the
    recorded size."""
    folder = Path(path).parent
    listed = record.get(FILES) or {}
    wanted = listed if only is None else {k: listed.get(k, -1) for k in only}
    for rel, size in wanted.items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def is_fresh(path: str | Path, key: str, field: str = KEY, only: Iterable[str] | None = None) -> bool:
    """True when the record at `path` exists, its `field` equals `key` and its files (or those of `only`)
    are intact."""
    record = read_record(path)
    return record is not None and record.get(field) == key and files_intact(path, record, only)


def unmark(path: str | Path) -> None:
    """Delete a record before rewriting the unit it covers: a crash then leaves the unit stale."""
    Path(path).unlink(missing_ok=True)
