"""Stop requests by signal, for long-running training: SIGUSR1 (SLURM's pre-timeout warning), SIGTERM, SIGINT.

Kept free of heavy imports so that the handlers can be installed before torch is imported: under SLURM
with a short time limit the warning can arrive within the first seconds of a job, and a SIGUSR1 that
finds no handler terminates the process without a checkpoint.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

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
