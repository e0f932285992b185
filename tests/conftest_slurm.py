"""pytest plugin: the session-scoped `slurm_cluster` fixture (a real one-node SLURM cluster on localhost).

Loaded from tests/conftest.py (`pytest_plugins`), so that test_slurm.py and test_cluster.py share one cluster.
The cluster starts on first use (installing Debian's SLURM if needed), and at session end its jobs are
cancelled and its daemons stopped by pid. Tests skip, saying why, only when SLURM cannot be installed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_harness import ClusterSpec, SlurmCluster, SlurmUnavailable

log = logging.getLogger("slurm-ci")
# fixed, so that daemons left by a crashed earlier session are recognised as ours and stopped
STATE_DIR = Path(os.environ.get("FOOTPRINTS_SLURM_STATE", Path(tempfile.gettempdir()) / "footprints-slurm-ci"))


LOCK_WAIT_S = 900


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    # one machine, one cluster: a second test session waits for the first instead of stopping its daemons
    # (the lock goes with the process, so daemons left by a crashed session are found and stopped)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "session.lock", "w") as lock:
        end = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    pytest.skip(f"another test session has held the SLURM test cluster for {LOCK_WAIT_S} s")
                time.sleep(1)
        try:
            cluster = SlurmCluster.start(STATE_DIR, ClusterSpec(), log=log.info)
        except SlurmUnavailable as err:
            pytest.skip(f"SLURM unavailable: {err}")
        log.info("SLURM cluster up: %s %s", cluster.pids, cluster.timings)
        try:
            yield cluster
        finally:
            cluster.stop()
            log.info("SLURM cluster stopped in %.2f s", cluster.timings.get("stop_s", 0.0))


@pytest.fixture()
def slurm_env() -> dict[str, str]:
    """Environment for `sbatch`: this interpreter for run.sh and the workers, no SLURM variables of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["FOOTPRINTS_PYTHON"] = sys.executable
    env["PYTHONUNBUFFERED"] = "1"
    return env
