"""One run per output folder at a time: an advisory lock file, held for the whole run.

`hold(folder)` takes an exclusive `fcntl.flock` on `<folder>/.footprints.runtime.lock` without waiting: when another
live process holds it, the run stops at once with one line naming the holder (pid, host, command and start
time, which the holder writes into the lock file). The kernel releases a flock when its holder dies, however
it dies, so the lock file a killed run leaves behind is harmless and never needs deleting (it is never
deleted: removing a lock file while another process waits on it would let two runs in).

Only the main process of a run takes it (the runner checks the rank); SLURM/dask workers and the other
ranks of a data-parallel job write inside the folder under the main process's lock. Within one process the
lock is re-entrant (`footprints all` holds the run folder's lock and each stage takes it again), so a
process never waits on itself. Cleanup of temporary files runs only while the lock is held: no live run can
be writing them then.

On a file system without working locks (a Lustre mount without `-o flock`), `hold` says so in a warning
and yields False: the run goes on unlocked and skips the cleanup of temporary files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StageError

log = logging.getLogger("footprints")

LOCK_NAME = ".footprints.runtime.lock"
# errors of flock() on a file system that cannot lock (NFS without lockd, Lustre without -o flock)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderBusy(StageError):
    """Another live run holds the folder's lock."""


_held: dict[str, list[int]] = {}  # real path of a lock file held by this process -> [fd, depth]
_guard = threading.Lock()


def lock_path(folder: str | Path) -> Path:
    """The lock file of an output folder."""
    return Path(folder) / LOCK_NAME


def output_lock_path(output: str | Path) -> Path:
    """The lock file of the outputs of `predict --input ... --output <path>`: beside that file, one per
    name stem (`a.geojson` and `a.json` share their GeoPackage and scene folder, so they share it too)."""
    output = Path(output)
    return output.parent / f".{output.stem}.footprints.runtime.lock"


def holder_of(path: str | Path) -> dict[str, object]:
    """What the holder of a lock file wrote about itself ({} when nothing, or nothing readable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        info = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict[str, object]) -> str:
    """One line about a lock's holder: `pid 12 on node1, since 2024-05-01 12:00:03 UTC: footprints tile ...`."""
    if not info.get("pid"):
        return "a run that has not written its details yet"
    text = f"pid {info.get('pid')} on {info.get('host', '?')}, since {info.get('started', '?')}: {info.get('command', '?')}"
    return " ".join(text.split())[:300]


def _my_details() -> bytes:
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] in ("cli.py", "__main__.py"):
        argv[0] = "footprints"
    command = " ".join(" ".join(argv).split())[:400]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": started}
    return (json.dumps(info) + "\n").encode()


def _open_lock_file(path: Path) -> int:
    """Open (creating) the lock file; never through a symbolic link, never a FIFO or device."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StageError(f"{path}: the lock file is a symbolic link; remove it (footprints makes its own)") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OSError(err.errno, err.strerror, str(path.parent)) from None  # said of the folder
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StageError(f"{path}: the lock file is not a regular file; remove it (footprints makes its own)")
    return fd


def _acquire(folder: Path, path: Path) -> int | None:
    """Lock `path` for this process: its descriptor, or None where the file system cannot lock."""
    import fcntl

    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{folder}: in use by another footprints run ({describe_holder(holder_of(path))}); "
                             "wait for it to end, or give this run another output folder") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: this file system cannot lock files (%s): make sure no other run writes there; "
                        "temporary files of interrupted runs are not removed", folder, err.strerror or err)
            return None
        st = os.fstat(fd)
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.ftruncate(fd, 0)
            os.pwrite(fd, _my_details(), 0)
            return fd
        os.close(fd)  # deleted or replaced while we waited for it: lock the file that is there now


@contextmanager
def hold(folder: str | Path, path: str | Path | None = None) -> Iterator[bool]:
    """Hold the lock of `folder` (created if missing; the lock file is `path`, default
    `<folder>/.footprints.runtime.lock`) for the `with` block; yields True, or False where the file system cannot
    lock. Raises FolderBusy, naming the holder, when another live process holds it."""
    folder = Path(folder)
    path = Path(path) if path is not None else lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # said of the folder (the CLI words it: permission denied, read-only, ...)
        raise OSError(err.errno, err.strerror, str(path.parent)) from None
    key = os.path.realpath(path)
    with _guard:
        entry = _held.get(key)
        if entry is not None:  # held by this process already: re-entrant, without opening the file again
            entry[1] += 1  # (on NFS, closing any descriptor of a file drops the process's lock on it)
    if entry is None:
        fd = _acquire(folder, path)
        if fd is None:
            yield False
            return
        entry = [fd, 1]
        with _guard:
            _held[key] = entry
    try:
        yield True
    finally:
        with _guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            try:
                os.ftruncate(entry[0], 0)  # no stale details for a reader
            except OSError:
                pass
            os.close(entry[0])  # releases the flock


@contextmanager
def hold_output(output: str | Path) -> Iterator[bool]:
    """Hold the lock of the outputs of `predict --input ... --output <output>` (see `output_lock_path`)."""
    output = Path(output)
    with hold(output.parent, output_lock_path(output)) as locked:
        yield locked


def remove_output_temporaries(folder: str | Path, output: str | Path) -> int:
    """`atomic.remove_stale_temporaries(folder)` for the outputs of `predict --input ... --output <output>`,
    only while holding their lock (taken here if this process does not hold it yet): FolderBusy when another
    live run writes there, never a deletion of its files. Returns how many went (0 where the file system
    cannot lock: nothing is removed then)."""
    from ..atomic import remove_stale_temporaries

    with hold_output(output) as locked:
        return remove_stale_temporaries(folder) if locked else 0
