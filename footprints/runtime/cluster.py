"""Per-scene work on a dask cluster chosen by config: the same code path in-process, local or on SLURM.

`map_scenes(cfg.cluster, func, items)` runs `func(item)` for every item and yields `(item, result, error)`
as tasks finish. `func` writes its own outputs atomically and returns a small summary, so the client
never gathers patches or features and a lost worker costs only its own scenes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from ..config import ClusterConfig
from ..errors import FootprintsError

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Any]:
    """A `distributed.Client` on a LocalCluster or a SLURMCluster; None for in-process runs (workers=0)."""
    if cfg.kind == "local" and cfg.workers == 0:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    # distributed sets up INFO logging of its own on import; the user wants scene progress, not
    # scheduler chatter (workers inherit the setting through the config)
    dask.config.set({"logging.distributed": "warning"})
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if cfg.kind == "local":
        cluster = LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=cfg.threads_per_worker,
            memory_limit=cfg.memory_limit,
            processes=True,
            dashboard_address=None,
        )
    else:
        cluster = _slurm_cluster(cfg)
    try:
        with Client(cluster) as client:
            from .dask_logging import QuietHeartbeatPlugin

            client.register_plugin(QuietHeartbeatPlugin())
            if cfg.kind == "slurm":
                s = cfg.slurm
                adaptive = s.adaptive_min is not None or s.adaptive_max is not None
                if adaptive:
                    cluster.adapt(minimum_jobs=s.adaptive_min or 0, maximum_jobs=s.adaptive_max or s.jobs)
                else:
                    cluster.scale(jobs=s.jobs)
                log.info("dask: %s, scheduler %s", _describe(cfg), client.scheduler.address)
                # an adaptive cluster with no minimum starts jobs only once work is submitted; the
                # no-worker watchdog of map_scenes covers it
                if not adaptive or (s.adaptive_min or 0) > 0:
                    _wait_for_first_worker(client, s.startup_timeout)
            yield client
    finally:
        cluster.close()


def _describe(cfg: ClusterConfig) -> str:
    s = cfg.slurm
    jobs = f"{s.jobs} jobs" if s.adaptive_min is None and s.adaptive_max is None else (
        f"adaptive {s.adaptive_min or 0}..{s.adaptive_max or s.jobs} jobs")
    return f"SLURM {jobs} of {s.cores} cores / {s.memory} / {s.walltime}" + (f" on {s.queue}" if s.queue else "")


def _wait_for_first_worker(client: Any, timeout: float) -> None:
    """Fail clearly instead of hanging when no worker job ever starts (wrong queue, limits, bad python)."""
    if timeout <= 0:
        return
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise FootprintsError(
            f"no dask worker joined within {timeout:.0f} s (cluster.slurm.startup_timeout): check `squeue` "
            "and the worker logs in cluster.slurm.log_directory"
        ) from None


def _slurm_cluster(cfg: ClusterConfig) -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise FootprintsError(f"cluster.kind: slurm needs dask-jobqueue ({err})") from None

    s = cfg.slurm
    if s.log_directory:
        Path(s.log_directory).mkdir(parents=True, exist_ok=True)
    return SLURMCluster(
        queue=s.queue,
        account=s.account,
        cores=s.cores,
        processes=s.processes,
        memory=s.memory,
        walltime=s.walltime,
        job_name=s.job_name,
        interface=s.interface,
        job_extra_directives=list(s.job_extra_directives),
        job_script_prologue=list(s.job_script_prologue),
        local_directory=s.local_directory,
        log_directory=s.log_directory,
        # the workers must import this very code: the same interpreter unless told otherwise
        python=s.python or sys.executable,
        # one scene at a time per worker process bounds its memory; the job's cores serve torch's threads
        worker_extra_args=["--nthreads", str(cfg.threads_per_worker)] if s.processes == 1 else [],
    )


def map_scenes(
    cfg: ClusterConfig,
    func: Callable[[T], Any],
    items: Iterable[T],
    desc: str = "scenes",
) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Run `func` over `items`; yield `(item, result, None)` or `(item, None, error)` as each finishes.

    A failing item is reported and does not stop the others. Order of completion, not of input.
    """
    items = list(items)
    if not items:
        return
    with dask_client(cfg) as client, tqdm(total=len(items), desc=desc, unit="scene", leave=False) as bar:
        if client is None:
            for item in items:
                try:
                    result, error = func(item), None
                except Exception as err:  # noqa: BLE001 - reported per scene by the caller
                    result, error = None, err
                    log.debug("%s failed", item, exc_info=True)
                bar.update()
                yield item, result, error
            return
        yield from _gather_as_completed(client, cfg, func, items, bar)


def _gather_as_completed(
    client: Any, cfg: ClusterConfig, func: Callable[[T], Any], items: list[T], bar: tqdm
) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Submit every item, yield results as they finish, give up on the rest when no worker is left.

    Dask reschedules the scenes of a lost worker on the others (up to `distributed.scheduler.allowed-failures`
    times). When every worker is gone for good (SLURM jobs past their walltime, a crash on start-up) the
    remaining items are reported as failed after `_no_worker_limit(cfg)` seconds instead of waiting forever.
    """
    from distributed import as_completed

    # a scene's own failure comes back as a value (`_Failed`): the worker then has nothing to log, and the
    # user sees the one-line error the caller prints, not dask's "Compute Failed" block with a traceback
    futures = {client.submit(_capture, func, item, pure=False): item for item in items}
    # results are fetched in the background as tasks finish: a blocking future.result() would wait forever
    # for a result that sat on a worker that has gone meanwhile (dask recomputes it only if workers remain)
    pending = as_completed(futures, with_results=True, raise_errors=False)
    limit = _no_worker_limit(cfg)
    no_workers_since: float | None = None
    last_check = 0.0
    while futures:
        batch = pending.next_batch(block=limit <= 0)
        if not batch:
            now = time.monotonic()
            if limit > 0 and now - last_check >= _WORKER_CHECK_S:
                last_check = now
                if client.scheduler_info(n_workers=-1).get("workers"):
                    no_workers_since = None
                elif no_workers_since is None:
                    no_workers_since = now
                elif now - no_workers_since > limit:
                    error = FootprintsError(
                        f"no dask worker left for {limit:.0f} s; {len(futures)} {_plural(len(futures))} not done "
                        "(rerun to finish them: finished scenes are skipped)"
                    )
                    log.error("%s", error)
                    client.cancel(list(futures))
                    for item in futures.values():
                        bar.update()
                        yield item, None, error
                    return
            time.sleep(_POLL_S)
            continue
        for future, outcome in batch:
            item = futures.pop(future)
            if future.status == "error":  # a scene's failure, or KilledWorker after a lost worker
                result, error = None, outcome[1]
            elif isinstance(outcome, BaseException):  # cancelled
                result, error = None, outcome
            elif isinstance(outcome, _Failed):
                result, error = None, outcome.error
                log.debug("%s failed:\n%s", item, outcome.trace)
            else:
                result, error = outcome, None
            future.release()
            bar.update()
            yield item, result, error


class _Failed:
    """A task's exception, returned instead of raised (see `_gather_as_completed`), with its traceback as
    text (logged at debug level: `-v` shows it)."""

    def __init__(self, error: BaseException, trace: str):
        import pickle

        self.trace = trace
        try:
            pickle.dumps(error)
            self.error = error
        except Exception:  # noqa: BLE001 - an exception that cannot travel back: its text does
            self.error = FootprintsError(f"{type(error).__name__}: {error}")


def _capture(func: Callable[[T], Any], item: T) -> Any:
    try:
        return func(item)
    except Exception as err:  # noqa: BLE001 - reported per scene by the caller
        import traceback

        return _Failed(err, traceback.format_exc())


_POLL_S = 0.05
_WORKER_CHECK_S = 2.0


def _no_worker_limit(cfg: ClusterConfig) -> float:
    # a LocalCluster's nannies restart dead workers; SLURM workers do not come back once their job ended
    return cfg.slurm.startup_timeout if cfg.kind == "slurm" else 0.0


def _plural(n: int) -> str:
    return "scene" if n == 1 else "scenes"
