"""Keep dask's shutdown race out of the user's terminal.

distributed logs "Failed to communicate with scheduler during heartbeat." at ERROR with a traceback when a
worker's heartbeat is in flight while the cluster closes (dask/distributed#7192, #7891): a successful run
then ends with a traceback (seen once in this project's CI, on a one-scene predict). `QuietHeartbeatPlugin`
installs `HeartbeatFilter` on every worker, present and future: it drops that record while the worker is
closing, and otherwise turns it into a one-line warning, since a heartbeat lost mid-run is worth knowing
about but its traceback says nothing the user can act on.

Imported only when a dask cluster starts, like distributed itself.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat"
_WORKER_LOGGER = "distributed.worker"
# not distributed.worker.WORKER_ANY_RUNNING: it counts closing_gracefully (retirement, which is how a closing
# cluster stops its workers) as running, the very state whose heartbeat failure is dropped here
_RUNNING = ("running", "paused")


class HeartbeatFilter(logging.Filter):
    """Drop a failed heartbeat while `worker` closes; otherwise log it as one line without the traceback."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(HEARTBEAT_FAILURE):
            return True
        status = getattr(getattr(self.worker, "status", None), "name", "")
        if status not in _RUNNING:
            return False
        reason = record.exc_info[1] if record.exc_info else None
        record.msg = f"dask worker: lost a heartbeat to the scheduler ({reason or 'no reply'})"
        record.args = ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class QuietHeartbeatPlugin(WorkerPlugin):
    """Register with `client.register_plugin`: each worker, including ones started later, gets the filter."""

    name = "footprints-quiet-heartbeat"

    def setup(self, worker: Any) -> None:
        self._filter = HeartbeatFilter(worker)
        logging.getLogger(_WORKER_LOGGER).addFilter(self._filter)

    def teardown(self, worker: Any) -> None:
        logging.getLogger(_WORKER_LOGGER).removeFilter(self._filter)


def installed_on_this_worker() -> bool:
    """True when the filter is active in the calling process (for `client.run` checks)."""
    return any(isinstance(f, HeartbeatFilter) for f in logging.getLogger(_WORKER_LOGGER).filters)
