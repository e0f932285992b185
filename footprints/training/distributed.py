"""Data-parallel set-up (DDP): where this process stands, the rendezvous, the process group, collectives.

Processes are started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or by srun inside an sbatch allocation
(SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID); gloo on CPU (so tests run two processes here), NCCL
on CUDA.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import FootprintsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a data-parallel job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env(env: dict[str, str] | None = None) -> DistInfo:
    """Rank and world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, ...).

    Inside an sbatch script the batch shell itself is one process even when the job has several tasks;
    only `srun` starts one process per task (and sets SLURM_STEP_NUM_TASKS), so the SLURM world size is
    read from the step, not from the job's SLURM_NTASKS.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world > 1:
            return DistInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), "slurm")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NUM_TASKS" not in env:
        log.warning(
            "SLURM_NTASKS=%s but this process was not started by srun: training in one process "
            "(run.sh starts one process per task with srun)",
            env["SLURM_NTASKS"],
        )
    return DistInfo()


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as `gpu[03-05,07],cpu1` -> `gpu03`."""
    first = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist.strip())
    if not first:
        raise FootprintsError(f"cannot parse SLURM node list {nodelist!r}")
    text = first.group(0)
    if "[" not in text:
        return text
    prefix, ranges = text.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def rendezvous(env: dict[str, str] | None = None) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT: from the environment, else derived from the SLURM job, else local."""
    env = dict(os.environ) if env is None else env
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        addr = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    port = env.get("MASTER_PORT")
    if not port:
        job = env.get("SLURM_JOB_ID")
        # a port per job, so that two jobs sharing a node do not meet at the same address
        port = str(15000 + int(job) % 20000) if job and job.isdigit() else "29500"
    return addr, port


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    addr, port = rendezvous()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # W processes on one CPU each taking every core would thrash: share the cores (or the task's CPUs)
        per_task = os.environ.get("SLURM_CPUS_PER_TASK")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or info.world)
        threads = int(per_task) if per_task and per_task.isdigit() else (os.cpu_count() or 1) // max(1, local_world)
        torch.set_num_threads(max(1, threads))
    log.info("DDP: rank %d of %d (%s, %s) via %s:%s", info.rank, info.world, info.source, backend, addr, port)
    dist.init_process_group(
        backend, init_method="env://", rank=info.rank, world_size=info.world, timeout=datetime.timedelta(minutes=30)
    )



def all_sum(info: DistInfo, values: Sequence[float], device: torch.device) -> list[float]:
    """Sum `values` over every rank (float64); the values themselves in a single process."""
    if not info.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


TEARDOWN_S = 20.0  # and the watchdog at 45 s: both before srun's --wait=60 kills the step (run.sh)


def shutdown(info: DistInfo, completed: bool, timeout_s: float = TEARDOWN_S) -> None:
    """Leave the process group. After a `completed` run the ranks first meet at a barrier, so that none tears
    down while another still communicates. The teardown itself waits at most `timeout_s`: destroying a healthy
    gloo group can block (seen once in CI: the last rank still alive 60 s after the other had exited, when srun
    killed the step and a finished job failed); the run's work is on disk by then, so it is logged and the
    process goes on to exit. A watchdog dumps every thread's stack and exits 1 should even that wait block."""
    if not info.enabled:
        return
    import faulthandler
    import threading

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    faulthandler.dump_traceback_later(2 * timeout_s + 5, exit=True)
    try:
        teardown = threading.Thread(target=dist.destroy_process_group, name="process-group-teardown", daemon=True)
        teardown.start()
        teardown.join(timeout_s)
        if teardown.is_alive():
            log.warning("rank %d: leaving the process group did not finish in %.0f s; exiting without it",
                        info.rank, timeout_s)
    finally:
        faulthandler.cancel_dump_traceback_later()
