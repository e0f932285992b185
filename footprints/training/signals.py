"""Stop requests by signal, for long-running training: SIGUSR1 (SLURM's pre-timeout warning), SIGTERM, SIGINT.

Kept free of heavy imports so that the handlers can be installed before torch is imported: under SLURM
with a short time limit the warning can arrive within the first seconds of a job, and a SIGUSR1 that
finds no handler terminates the process without a checkpoint.

A warning that comes before any handler exists (python starting, imports) cannot be delivered as a signal
without killing the process, so run.sh also records it in a file named by FOOTPRINTS_STOP_FILE; a
trainer that finds that file stops as if it had received SIGUSR1. This makes an early warning count
however fast the training that follows it is.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class StopSignals:
    """Turn SIGUSR1, SIGTERM and SIGINT into a flag (`signame`) that the trainer checks after each step.

    A second SIGINT (Ctrl-C twice) aborts at once with KeyboardInterrupt; the last checkpoint written
    stays valid. Usable as a (re-entrant) context manager: the previous handlers come back on exit.
    Handlers can only be installed from the main thread; elsewhere this is a no-op flag.
    """

    NAMES = ("SIGUSR1", "SIGTERM", "SIGINT")

    STOP_FILE_ENV = "FOOTPRINTS_STOP_FILE"

    def __init__(self) -> None:
        self._signame: str | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0

    @property
    def signame(self) -> str | None:
        """The signal that asked to stop, or None; a warning recorded by run.sh counts as SIGUSR1."""
        if self._signame is None:
            stop_file = os.environ.get(self.STOP_FILE_ENV)
            if stop_file and os.path.exists(stop_file):
                self._signame = "SIGUSR1"
        return self._signame

    def _handle(self, signum: int, frame: Any) -> None:
        if self._signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signame = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
