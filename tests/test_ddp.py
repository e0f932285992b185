"""DDP on CPU (gloo, two real processes): the same weights as one process on the same global batch, and
ranks that agree to stop at the same step when only one of them gets the pre-timeout signal.

`segmenter.batch_size` is the global batch (split across ranks); the loss is normalised by the global
batch's class-weight total, so one process and two ranks compute the same gradient up to float summation
order. Dropout masks are drawn per rank, so this comparison uses a classifier with dropout 0.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from store_fixtures import add_patch_store
from train_fixtures import REPO, copy_inputs, load, make_project, run_cli, train_command

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(config, args, hooks=None, world=2):
    """Start `world` ranks the way torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    import os

    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen(
            train_command(config, *args, hook=(hooks or {}).get(rank)),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    outs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, err))
    return outs


def test_two_rank_ddp_matches_one_process_and_stops_together(tmp_path):
    config = make_project(tmp_path, name="single", dropout=0.0)
    add_patch_store(tmp_path / "outputs" / "single" / "tile")  # both runs read the patch store
    copy_inputs(tmp_path, "single", "ddp")
    single = run_cli(config)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "decoded from GeoTIFF" not in single.stderr

    ddp = ("--set", "name=ddp", "--set", "segmenter.checkpoint_every=1")
    # only rank 1 gets SIGUSR1 (after its step 2); both ranks must stop after the same step, exit 99
    outs = _launch_ranks(config, ddp, hooks={1: "2:SIGUSR1:step"})
    assert [rc for rc, _ in outs] == [99, 99], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "stopped by a signal on another rank" in outs[0][1] and "stopped by SIGUSR1" in outs[1][1]
    out = tmp_path / "outputs" / "ddp" / "train-segmenter"
    state = load(out / "last.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 3, 3)
    assert "DDP: rank" not in outs[1][1]  # rank 1 logs warnings only

    outs = _launch_ranks(config, (*ddp, "--load_saved_model"))
    assert [rc for rc, _ in outs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "epoch 2/2: train loss" in outs[0][1]  # the log is flushed before a rank's os._exit

    a = load(tmp_path / "outputs" / "single" / "train-segmenter" / "last.pt")
    b = load(out / "last.pt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 6)
    assert b["sampler"]["world_size"] == 2
    worst = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    print(f"largest |DDP - single| weight difference: {worst:.3g}")
    assert worst < 1e-6, f"DDP and single-process weights differ by {worst}"
    # and the runs did train: the head moved far more than the two runs differ
    from footprints.model.segmenter import segmenter_from_classifier

    initial = segmenter_from_classifier(tmp_path / "outputs" / "single" / "train-classifier" / "best.pt")[0]
    moved = max((a["model"][k] - v).abs().max().item() for k, v in initial.state_dict().items() if k.startswith("head."))
    assert moved > 1e-3
    for ha, hb in zip(a["history"], b["history"], strict=True):
        if ha["epoch"] == 0:  # the converted classifier: validated, never trained
            assert ha["train_loss"] is None and hb["train_loss"] is None
            ha, hb = {**ha, "train_loss": 0.0}, {**hb, "train_loss": 0.0}
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-6)
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-6)
        assert ha["val"]["tp"] == hb["val"]["tp"] and ha["val"]["fp"] == hb["val"]["fp"]


def test_a_blocked_teardown_does_not_hold_a_finished_rank(monkeypatch, caplog):
    """A completed run meets the other ranks at a barrier, then leaves the process group; if leaving blocks
    (seen once in CI: a finished job killed by srun), the rank logs it and goes on to exit."""
    import threading

    import torch.distributed as dist

    from footprints.training.distributed import DistInfo, shutdown

    calls: list[str] = []
    release = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (calls.append("destroy"), release.wait()))
    try:
        with caplog.at_level("WARNING", logger="footprints.training.distributed"):
            shutdown(DistInfo(1, 2, 1, "slurm"), completed=True, timeout_s=0.2)
        assert calls == ["barrier", "destroy"]
        assert "rank 1: leaving the process group did not finish" in caplog.text
        # a run that failed or was preempted does not wait for the others at a barrier
        calls.clear()
        release.set()
        caplog.clear()
        shutdown(DistInfo(0, 2, 0, "slurm"), completed=False)
        assert calls == ["destroy"] and "did not finish" not in caplog.text
    finally:
        release.set()
