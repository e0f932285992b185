"""map_scenes: the same code path in-process, on a dask LocalCluster and on dask-jobqueue SLURM workers.

A failing or lost scene is reported on its own and does not stop the others; outputs are written per scene,
atomically, by the workers (the client only sees small summaries).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import dask
import numpy as np
import pytest
from slurm_harness import wait_until

from footprints.atomic import atomic_path
from footprints.config import ClusterConfig, SlurmClusterConfig
from footprints.runtime.cluster import map_scenes

TESTS = Path(__file__).resolve().parent


def scene_work(item: str, out_dir: str, sleep: float = 0.0) -> dict:
    """Stand-in for a per-scene stage: deterministic numbers, written atomically, a small summary back."""
    if item.startswith("bad"):
        raise ValueError(f"{item}: unreadable scene")
    time.sleep(sleep)
    if item.startswith("endjob"):
        # the worker's SLURM job ends under it, as at its walltime
        subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]], check=True)
        time.sleep(60)
    if item.startswith("crash"):
        time.sleep(0.5)  # mid-scene, after the worker reported its previous scene as done
        os._exit(3)  # the worker process dies, as on a node failure or an OOM kill
    rng = np.random.default_rng(sum(map(ord, item)))
    arr = rng.standard_normal((64, 64)).astype(np.float32)
    out = Path(out_dir) / f"{item}.npy"
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return {"item": item, "sum": float(arr.sum()), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")}


def _run(cfg: ClusterConfig, items: list[str], out_dir: Path, sleep: float = 0.0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    func = functools.partial(scene_work, out_dir=str(out_dir), sleep=sleep)
    return {item: (res, err) for item, res, err in map_scenes(cfg, func, items, desc="test")}


ITEMS = [f"scene{i}" for i in range(6)]


def _same_outputs(a: Path, b: Path, items: list[str]) -> None:
    for item in items:
        np.testing.assert_array_equal(np.load(a / f"{item}.npy"), np.load(b / f"{item}.npy"))
    assert not list(a.glob("*.part")) and not list(b.glob("*.part"))


def test_local_cluster_matches_in_process(tmp_path: Path) -> None:
    inproc = _run(ClusterConfig(kind="local", workers=0), ITEMS, tmp_path / "inproc")
    local = _run(ClusterConfig(kind="local", workers=2, threads_per_worker=1), ITEMS, tmp_path / "local")
    assert set(inproc) == set(local) == set(ITEMS)
    assert all(err is None for _, err in {**inproc, **local}.values())
    assert {i: r["sum"] for i, (r, _) in inproc.items()} == {i: r["sum"] for i, (r, _) in local.items()}
    # in-process really is this process, the LocalCluster really used other processes
    assert {r["pid"] for r, _ in inproc.values()} == {os.getpid()}
    assert os.getpid() not in {r["pid"] for r, _ in local.values()}
    _same_outputs(tmp_path / "inproc", tmp_path / "local", ITEMS)


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_scene_does_not_stop_the_others(tmp_path: Path, workers: int) -> None:
    items = ["scene0", "bad1", "scene2", "scene3", "bad4", "scene5"]
    results = _run(ClusterConfig(kind="local", workers=workers), items, tmp_path)
    assert set(results) == set(items)
    for item, (res, err) in results.items():
        if item.startswith("bad"):
            assert res is None and isinstance(err, ValueError) and item in str(err)
        else:
            assert err is None and res["item"] == item
            assert (tmp_path / f"{item}.npy").is_file()
    assert sorted(p.stem for p in tmp_path.glob("*.npy")) == sorted(i for i in items if not i.startswith("bad"))


def test_lost_worker_costs_only_its_scene(tmp_path: Path) -> None:
    """A worker process that dies takes only its own scene with it; the others finish on the survivors."""
    items = ["scene0", "scene1", "crash2", "scene3", "scene4"]
    # one task in flight per worker thread (saturation 1.0), and no retry of a task whose worker died
    # (allowed-failures 0; dask's default 3 would retry it on the restarted worker, and kill that too)
    settings = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(settings):
        results = _run(ClusterConfig(kind="local", workers=2), items, tmp_path, sleep=0.2)
    assert set(results) == set(items)
    res, err = results["crash2"]
    assert res is None and err is not None and "KilledWorker" in type(err).__name__
    for item in items:
        if item != "crash2":
            assert results[item][1] is None, results[item][1]
            assert (tmp_path / f"{item}.npy").is_file()


def _heartbeat_failure() -> logging.LogRecord:
    """The record distributed logs when a heartbeat fails: ERROR, with the exception's traceback."""
    from footprints.runtime.dask_logging import HEARTBEAT_FAILURE

    try:
        raise OSError("Stream is closed")
    except OSError:
        return logging.getLogger("distributed.worker").makeRecord(
            "distributed.worker", logging.ERROR, __file__, 1, HEARTBEAT_FAILURE + ".", (), sys.exc_info())


def _emit_heartbeat_failure() -> tuple[bool, str]:
    """In a worker: log the heartbeat failure through distributed's logger; (filter installed, what shows)."""
    from footprints.runtime.dask_logging import installed_on_this_worker

    logger = logging.getLogger("distributed.worker")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        logger.handle(_heartbeat_failure())
    finally:
        logger.removeHandler(handler)
    return installed_on_this_worker(), stream.getvalue()


def test_workers_log_a_lost_heartbeat_as_one_line_and_not_while_closing() -> None:
    """dask's shutdown race (a heartbeat in flight as the cluster closes) once ended a good CI run with a
    traceback on stderr; every worker gets a filter: one warning line while running, nothing while closing."""
    from footprints.runtime.cluster import dask_client
    from footprints.runtime.dask_logging import HeartbeatFilter

    with dask_client(ClusterConfig(kind="local", workers=2)) as client:
        shown = client.run(_emit_heartbeat_failure)
    assert len(shown) == 2
    for installed, text in shown.values():
        assert installed
        assert text.strip() == "WARNING dask worker: lost a heartbeat to the scheduler (Stream is closed)"

    closing = HeartbeatFilter(SimpleNamespace(status=SimpleNamespace(name="closing")))
    assert not closing.filter(_heartbeat_failure())
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, "Compute Failed", (), None)
    assert closing.filter(other) and other.levelno == logging.ERROR


def test_empty_input_starts_nothing(tmp_path: Path) -> None:
    assert list(map_scenes(ClusterConfig(kind="slurm"), len, [])) == []


def slurm_cluster_config(tmp_path: Path, jobs: int = 2) -> ClusterConfig:
    """dask-jobqueue workers as SLURM jobs on the local test cluster: small, short, on localhost."""
    return ClusterConfig(
        kind="slurm",
        threads_per_worker=1,
        slurm=SlurmClusterConfig(
            cores=1, processes=1, memory="1GB", walltime="00:05:00", jobs=jobs,
            interface="lo", log_directory=str(tmp_path / "dask-logs"), startup_timeout=120,
        ),
    )


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["jobs", "adaptive"])
def test_map_scenes_on_slurm_workers(slurm_cluster, slurm_env, tmp_path: Path, monkeypatch, mode: str) -> None:
    """Dask workers submitted with sbatch run the scenes (two fixed jobs, or adaptive 0..2 jobs that start
    only once work is submitted); results equal the in-process run."""
    for k in list(os.environ):
        if k not in slurm_env:
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    # the workers unpickle scene_work by reference: let them import this module (sbatch exports the env)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    cfg = slurm_cluster_config(tmp_path)
    cfg.slurm.job_name = f"footprints-dask-{uuid.uuid4().hex[:8]}"  # this run's jobs in the completion log
    if mode == "adaptive":
        cfg.slurm.adaptive_min, cfg.slurm.adaptive_max = 0, 2
    t0 = time.monotonic()
    remote = _run(cfg, ITEMS, tmp_path / "slurm", sleep=1.0)
    elapsed = time.monotonic() - t0
    inproc = _run(ClusterConfig(kind="local", workers=0), ITEMS, tmp_path / "inproc")
    assert all(err is None for _, err in remote.values()), remote
    assert {i: r["sum"] for i, (r, _) in remote.items()} == {i: r["sum"] for i, (r, _) in inproc.items()}
    jobs = {r["job"] for r, _ in remote.values()}
    # every scene ran inside a SLURM job, in one or two of them: which jobs take scenes depends on when each
    # one starts (the stage waits for its first worker only), so the fixed form is checked by what it submitted
    assert None not in jobs and 1 <= len(jobs) <= 2, jobs
    if mode == "jobs":
        wait_until(lambda: len(slurm_cluster.ended_jobs(cfg.slurm.job_name)) >= 2, 60, 0.25)
        submitted = slurm_cluster.ended_jobs(cfg.slurm.job_name)
        assert len(submitted) == 2 and jobs <= set(submitted), (submitted, jobs)
    _same_outputs(tmp_path / "slurm", tmp_path / "inproc", ITEMS)
    # the worker jobs ran this project's interpreter and were cancelled when the cluster closed
    for job in jobs:
        info = slurm_cluster.job(job)
        assert info.get("JobName") == cfg.slurm.job_name
        assert slurm_cluster.wait_done(job, 60) in ("CANCELLED", "COMPLETED"), slurm_cluster.job(job)
    logs = "".join(p.read_text() for p in (tmp_path / "dask-logs").glob("*.err"))
    assert "127.0.0.1" in logs, logs[-2000:]
    print(f"map_scenes on SLURM workers ({mode}): {len(ITEMS)} scenes in {elapsed:.1f} s")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_hang_when_every_slurm_worker_is_gone(slurm_cluster, slurm_env, tmp_path: Path, monkeypatch) -> None:
    """The only worker job ends mid-run: the remaining scenes are reported as failed after
    cluster.slurm.startup_timeout seconds without a worker, instead of waiting forever."""
    for k in list(os.environ):
        if k not in slurm_env:
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    cfg = slurm_cluster_config(tmp_path, jobs=1)
    cfg.slurm.startup_timeout = 5
    items = ["scene0", "endjob1", "scene2", "scene3"]
    t0 = time.monotonic()
    results = _run(cfg, items, tmp_path / "out")
    elapsed = time.monotonic() - t0
    assert set(results) == set(items)
    # scene0 ran first (one thread, submission order) and wrote its output; its result may have been lost
    # with the worker, in which case it is reported with the others (a rerun skips finished scenes)
    assert (tmp_path / "out" / "scene0.npy").is_file()
    assert results["scene0"][1] is None or "no dask worker left" in str(results["scene0"][1])
    for item in ("endjob1", "scene2", "scene3"):
        res, err = results[item]
        assert res is None and "no dask worker left for 5 s" in str(err), (item, err)
    assert elapsed < 60, elapsed


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_jobs_that_never_start_give_a_clear_error(slurm_cluster, slurm_env, tmp_path: Path, monkeypatch) -> None:
    """A worker interpreter that cannot run (wrong cluster.slurm.python) fails fast and says where to look."""
    from footprints.errors import FootprintsError

    for k in list(os.environ):
        if k not in slurm_env:
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    cfg = slurm_cluster_config(tmp_path, jobs=1)
    cfg.slurm.startup_timeout = 4
    cfg.slurm.python = "/bin/false"
    with pytest.raises(FootprintsError, match=r"no dask worker joined within 4 s .*squeue.*log_directory"):
        _run(cfg, ITEMS, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
