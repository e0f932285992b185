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
