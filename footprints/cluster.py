"""Per-scene work on a dask cluster chosen by config: the same code path in-process, local or on SLURM.

`map_scenes(cfg.cluster, func, items)` runs `func(item)` for every item and yields `(item, result, error)`
as tasks finish. `func` writes its own outputs atomically and returns a small summary, so the client
never gathers patches or features and a lost worker costs only its own scenes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

from .config import ClusterConfig
from .errors import FootprintsError

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Any]:
    """A `distributed.Client` on a LocalCluster or a SLURMCluster; None for in-process runs (workers=0)."""
    if cfg.kind == "local" and cfg.workers == 0:
        yield None
        return
    from distributed import Client, LocalCluster

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
            if cfg.kind == "slurm":
                s = cfg.slurm
                if s.adaptive_min is not None or s.adaptive_max is not None:
                    cluster.adapt(minimum_jobs=s.adaptive_min or 0, maximum_jobs=s.adaptive_max or s.jobs)
                else:
                    cluster.scale(jobs=s.jobs)
            yield client
    finally:
        cluster.close()


def _slurm_cluster(cfg: ClusterConfig) -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise FootprintsError(f"cluster.kind: slurm needs dask-jobqueue ({err})") from None
    import sys

    s = cfg.slurm
    return SLURMCluster(
        queue=s.queue,
        account=s.account,
        cores=s.cores,
        processes=s.processes,
        memory=s.memory,
        walltime=s.walltime,
        job_extra_directives=list(s.job_extra_directives),
        job_script_prologue=list(s.job_script_prologue),
        local_directory=s.local_directory,
        log_directory=s.log_directory,
        python=s.python or sys.executable,
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
                bar.update()
                yield item, result, error
            return
        from distributed import as_completed

        futures = {client.submit(func, item, pure=False): item for item in items}
        for future in as_completed(futures):
            item = futures.pop(future)
            try:
                result, error = future.result(), None
            except Exception as err:  # noqa: BLE001 - a scene's failure, or a lost worker
                result, error = None, err
            bar.update()
            yield item, result, error
