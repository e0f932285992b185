"""Errors that reach the user as one line naming the file and the reason, never a traceback."""

from __future__ import annotations

from pathlib import Path


class FootprintsError(Exception):
    """Base class: the CLI prints `str(err)` on one line and exits non-zero."""


class InputError(FootprintsError):
    """A bad input file: `InputError(path, reason)` prints as `path: reason`."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")


class StageError(FootprintsError):
    """A stage cannot run (e.g. the previous stage's outputs are missing)."""


class Preempted(FootprintsError):
    """Training stopped on a signal after writing its checkpoint; run.sh requeues on this exit code."""

    exit_code = 99


def as_input_error(err: BaseException, path: str | Path) -> InputError:
    """A per-scene failure as one line naming a file: an InputError as it is, a full disk or a refused
    write as such, anything else (a bug, a library failure) as `path: ExceptionType: message`."""
    if isinstance(err, InputError):
        return err
    return InputError(path, describe_failure(err))


def disk_full(path: str | Path | None) -> bool:
    """The file system holding `path` (or its nearest existing parent) has less than 1 MiB free."""
    import shutil

    p = Path(path) if path else None
    while p is not None and not p.exists():
        p = p.parent if p.parent != p else None
    try:
        return p is not None and shutil.disk_usage(p).free < 1 << 20
    except OSError:
        return False


def describe_failure(err: BaseException, path: str | Path | None = None) -> str:
    """One line saying why an operation failed, in the user's words: a full disk says so (GDAL reports it
    as 'TIFFAppendToStrip: Seek error' or 'Failed to create mask'), a refused write names the file."""
    import errno

    where = getattr(err, "filename", None) or path
    code = err.errno if isinstance(err, OSError) else None
    # libraries that lose the errno report a full disk otherwise (GDAL: 'TIFFAppendToStrip: Seek error')
    if code == errno.ENOSPC or (code is None and disk_full(where)):
        return f"no space left on device{f' (writing {where})' if where else ''}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied (cannot write {where})"
    if code == errno.EROFS:
        return f"read-only file system (cannot write {where})"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}{f' ({where})' if where else ''}"
    return f"{type(err).__name__}: {one_line(err)}"


def one_line(err: BaseException, path: Path | None = None) -> str:
    """A library error as one short line, with its cause (which rasterio often hides behind 'See previous
    exception'); the full path of `path` shortened to its name, since the message names it already."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text.replace('See previous exception for details.', '').strip()} {cause}"
    if path is not None:
        text = text.replace(f"'{path}'", path.name).replace(str(path), path.name)
    return " ".join(text.split())[:200] or type(err).__name__


def printable(text: object) -> str:
    """Text (a path, or a message holding one) that prints on one line anywhere: the bytes of a file name that
    is not UTF-8 (lone surrogates, as os.fsdecode keeps them) as `\\xNN`, and every character that is not
    printable (a newline in a file name, a NUL, a line separator) as its escape (`\\n`, `\\x00`, `\\u2028`),
    instead of failing to encode or breaking the line."""
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text
