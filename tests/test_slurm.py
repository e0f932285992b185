"""The real run.sh submitted with sbatch to a real one-node SLURM cluster (see slurm_harness.py).

- a train-segmenter job told that its time is up at its start (`scancel --batch --signal=USR1`, what
  `--signal=B:USR1@N` sends) checkpoints and exits 99, and without requeue says how to resubmit;
- with a real time limit (`--time=1 --signal=B:USR1@30`) the job checkpoints, exits 99, is requeued by
  run.sh and resumes by itself to the configured epoch count;
- a two-task job trains with DDP on CPU (gloo) through srun, giving the weights of one process;
- tile and predict with `cluster.kind: slurm` (two dask workers submitted as SLURM jobs) give the outputs
  of an in-process run.

Every input is tiny (32-64 px patches, a 67-channel hypercolumn, hidden 8), so jobs take seconds. Submitted
from a temporary folder, as a user would from theirs: run.sh finds the checkout from the submitted path and
the environment from FOOTPRINTS_PYTHON (this interpreter).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from train_fixtures import load, make_project

from footprints.contracts.paths import RunPaths

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "run.sh"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


# ---------------------------------------------------------------------------------------------------
# helpers


def _project(root: Path, epochs: int, **kw) -> Path:
    seg = {"epochs": epochs, "overlays": 0, **kw.pop("segmenter", {})}
    config = make_project(root, segmenter=seg, **kw)
    (root / "logs").mkdir(exist_ok=True)  # SLURM opens --output before run.sh starts: the folder must exist
    return config


def _submit(cluster, root: Path, env: dict[str, str], sbatch_args: list[str], cmd: list[str]) -> str:
    """`cd root && sbatch ARGS /repo/run.sh CMD` (the job's options come from run.sh's #SBATCH header)."""
    return cluster.sbatch([*sbatch_args, str(RUN_SH), *cmd], cwd=root, env=env)


def _wait_for(pred, timeout: float, what: str, cluster=None, job: str | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    info = cluster.job(job) if cluster is not None and job else {}
    text = log.read_text()[-3000:] if log is not None and log.exists() else "(no log)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job {info}\n{text}")


def _restarts(cluster, job: str) -> int:
    return int(cluster.job(job).get("Restarts", "0") or 0)


def _finish(cluster, job: str, log: Path, timeout: float) -> dict[str, str]:
    state = cluster.wait_done(job, timeout)
    info = cluster.job(job)
    text = log.read_text() if log.exists() else "(no log)"
    assert state == "COMPLETED" and info.get("ExitCode") == "0:0", f"{state} {info}\n{text[-4000:]}"
    return info


def _last_epoch(path: Path) -> int | None:
    try:
        return int(load(path)["epoch"])
    except Exception:  # noqa: BLE001 - not written yet, or being renamed into place
        return None


def _check_requeued_run(
    root: Path, job: str, info: dict[str, str], epochs: int, node: str, first_epochs: int | None = None
) -> str:
    """The log tells the whole story; the final checkpoint has every epoch (`first_epochs`: the first run's
    setting when the test changed it for the second run)."""
    assert info.get("Restarts") == "1", info
    text = (root / "logs" / f"footprints-{job}.out").read_text()  # --output=logs/%x-%j.out
    first, _, second = text.partition("restart 1,")
    assert second, f"no second run in the log:\n{text[-4000:]}"
    # first run: banner with job, node and GPU; the warning reached the trainer, which checkpointed
    assert re.search(rf"job {job} \(footprints\) on {node}, restart 0, tasks 1, CUDA_VISIBLE_DEVICES=0", first)
    assert "got SIGUSR1, forwarding to the trainer" in first
    stop = re.search(rf"stopped by SIGUSR1 at epoch (\d+)/{first_epochs or epochs}, step (\d+): checkpoint", first)
    assert stop, first[-3000:]
    assert "footprints exited with 99" in first
    assert f"requeueing job {job}" in first
    # second run: same job id, resumed where the first stopped (the earlier lines are kept: open-mode append)
    assert re.search(r"args: train-segmenter --config config.yaml .*--load_saved_model", second)
    resumed = re.search(rf"resuming from \S*last.pt: epoch (\d+) of {epochs}, step (\d+)", second)
    assert resumed and resumed.group(1) == stop.group(1) and resumed.group(2) == stop.group(2), second[-3000:]
    assert f"INFO footprints.stages.train_segmenter: epoch {epochs}/{epochs}:" in second
    assert "footprints exited with 0" in second
    last = load(root / "outputs" / "t" / "train-segmenter" / "last.pt")
    assert last["epoch"] == epochs and last["step"] == 0
    assert [h["epoch"] for h in last["history"]] == list(range(0, epochs + 1))  # 0: the converted classifier
    assert (root / "outputs" / "t" / "train-segmenter" / "best.pt").is_file()
    return text


# ---------------------------------------------------------------------------------------------------
# 1. the pre-timeout warning at job start, without requeue (with requeue: the real time limit, below)


@pytest.mark.timeout(180)
def test_warning_at_job_start_is_not_fatal_and_no_requeue_says_resubmit(
    slurm_cluster, slurm_env, tmp_path: Path
) -> None:
    """A warning that comes before python has installed its handler (a short --time does that) must not
    kill the job: run.sh records it in FOOTPRINTS_STOP_FILE, which the trainer reads at every step, so it
    stops however fast its epochs are. With --no-requeue the job ends with exit code 99 and says how to
    resume."""
    epochs = 6
    _project(tmp_path, epochs)
    job = _submit(slurm_cluster, tmp_path, slurm_env, ["--time=5", "--no-requeue"],
                  ["train-segmenter", "--config", "config.yaml"])
    log = tmp_path / "logs" / f"footprints-{job}.out"
    # run.sh's banner comes right before it starts python (which needs seconds to install its handler); a
    # signal before bash has read its first line would kill any shell script, so the test waits for it
    _wait_for(lambda: log.exists() and "args: train-segmenter" in log.read_text(), 90, "run.sh's banner",
              slurm_cluster, job, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state = slurm_cluster.wait_done(job, 120)
    info, text = slurm_cluster.job(job), log.read_text()
    assert state == "FAILED" and info.get("ExitCode") == "99:0" and info.get("Restarts") == "0", (info, text[-3000:])
    assert "got SIGUSR1, forwarding to the trainer" in text
    stop = re.search(rf"stopped by SIGUSR1 at epoch (\d+)/{epochs}, step (\d+): checkpoint", text)
    assert stop and int(stop.group(1)) < epochs, text[-3000:]
    assert "this job may not be requeued: resubmit with --load_saved_model" in text
    last = load(tmp_path / "outputs" / "t" / "train-segmenter" / "last.pt")
    assert last["epoch"] == int(stop.group(1)) - 1 and last["step"] == int(stop.group(2))


# ---------------------------------------------------------------------------------------------------
# 2. a real time limit: the warning comes from SLURM's own timer


@pytest.mark.timeout(300)
def test_real_time_limit_warning_requeues_and_resumes(slurm_cluster, slurm_env, tmp_path: Path) -> None:
    """`--time=1 --signal=B:USR1@30`: SLURM sends USR1 30-60 s before the limit, i.e. 0-30 s into the job.

    The first run trains "forever" (200 epochs) until the warning. While the requeued job waits, the test
    gives it the rest of the work (epochs = the checkpoint's epoch + 1, a key that may change on resume)
    and a longer limit, so that the second run finishes instead of being warned again.
    """
    config = _project(tmp_path, 200, segmenter={"checkpoint_every": 2})
    t0 = time.monotonic()
    job = _submit(
        slurm_cluster, tmp_path, slurm_env, ["--time=1", "--signal=B:USR1@30"],
        ["train-segmenter", "--config", "config.yaml"],
    )  # fmt: skip
    log = tmp_path / "logs" / f"footprints-{job}.out"
    _wait_for(lambda: _restarts(slurm_cluster, job) >= 1, 150, "the warning and the requeue", slurm_cluster, job, log)
    warned_after = time.monotonic() - t0
    stopped_at = load(tmp_path / "outputs" / "t" / "train-segmenter" / "last.pt")["epoch"]
    epochs = stopped_at + 1
    cfg = yaml.safe_load(config.read_text())
    cfg["segmenter"]["epochs"] = epochs
    config.write_text(yaml.safe_dump(cfg))
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=5"], check=True)
    info = _finish(slurm_cluster, job, log, 150)
    text = _check_requeued_run(tmp_path, job, info, epochs, slurm_cluster.node, first_epochs=200)
    assert f"JobId={job} " in slurm_cluster.jobcomp()
    assert "CANCELLED" not in text.split("restart 1,")[1]
    print(f"real --time=1 job: warned and requeued {warned_after:.1f} s after submission, done after "
          f"{time.monotonic() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------------
# 3. two tasks: DDP on CPU through srun


@pytest.mark.timeout(300)
def test_two_task_job_trains_with_ddp_and_survives_a_requeue(slurm_cluster, slurm_env, tmp_path: Path) -> None:
    """`sbatch --ntasks=2 run.sh train-segmenter`: run.sh starts both ranks with srun, forwards the warning
    through srun to both, requeues; the resumed DDP run ends with the weights of one uninterrupted process
    on the same global batch (dropout 0, deterministic CPU kernels)."""
    epochs = 4
    seg = {"batch_size": 4, "deterministic": True, "checkpoint_every": 1}
    config = _project(tmp_path / "ddp", epochs, dropout=0.0, segmenter=seg)
    ref_config = _project(tmp_path / "one", epochs, dropout=0.0, segmenter=seg)
    root = config.parent
    job = _submit(
        slurm_cluster, root, slurm_env, ["--ntasks=2", "--gres=gpu:2", "--time=5"],
        ["train-segmenter", "--config", "config.yaml"],
    )  # fmt: skip
    log = root / "logs" / f"footprints-{job}.out"
    last = root / "outputs" / "t" / "train-segmenter" / "last.pt"
    _wait_for(last.exists, 150, "the first checkpoint", slurm_cluster, job, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    # the one-process reference runs here meanwhile
    ref = subprocess.run(
        [sys.executable, "-m", "footprints.cli", "train-segmenter", "--config", str(ref_config)],
        cwd=ref_config.parent, env=slurm_env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    _wait_for(lambda: _restarts(slurm_cluster, job) >= 1, 60, "the requeue", slurm_cluster, job, log)
    info = _finish(slurm_cluster, job, log, 200)
    text = log.read_text()
    first, _, second = text.partition("restart 1,")
    for run in (first, second):
        assert "tasks 2, CUDA_VISIBLE_DEVICES=0,1" in run
        assert re.search(r"DDP: rank 0 of 2 \(slurm, gloo\)", run), run[-3000:]
    assert "stopped by SIGUSR1" in first and f"requeueing job {job}" in first and info["Restarts"] == "1"
    assert re.search(r"resuming from \S*last.pt", second) and "footprints exited with 0" in second
    # only rank 0 logs its progress (the other rank warns only)
    assert second.count(f"INFO footprints.stages.train_segmenter: epoch {epochs}/{epochs}:") == 1
    ddp, one = load(last), load(ref_config.parent / "outputs" / "t" / "train-segmenter" / "last.pt")
    assert ddp["epoch"] == one["epoch"] == epochs
    assert ddp["model"].keys() == one["model"].keys()
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not [p.name for p in last.parent.iterdir() if ".part" in p.name or ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------------
# 4. issue 7: tile and predict on dask workers that are SLURM jobs


def _stage_config(root: Path, data: Path, name: str, cluster: dict) -> Path:
    cfg = {
        "name": name,
        "output_root": str(root / "outputs"),
        "seed": 1,
        "data": {"root": str(data), "format": "xview2"},
        "tile": {"size": 64, "stride": 64, "split_ratios": [0.5, 0.0, 0.5]},
        "backbone": {"weights": "random", "layers": "pool"},
        "predict": {"threshold": 0.5, "min_area_m2": 0.0, "batch_size": 4, "block_size": 128, "split": "test"},
        "cluster": cluster,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _segmenter_checkpoint(path: Path) -> Path:
    """A segmenter whose building probability is sigmoid(2 x the sum of the normalised RGB): bright roofs and
    roads become polygons of many shapes (a random head predicts ~0.52 everywhere: nothing to compare)."""
    from footprints.model.mlp import MLP
    from footprints.model.segmenter import segmenter_from_classifier

    mlp = MLP(3, hidden=4, dropout=0.0, mean=torch.zeros(3), std=torch.ones(3))
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.tensor([[1.0, 1, 1], [-1, -1, -1], [1, 0, 0], [0, 1, 0]]))
        mlp.fc2.weight.copy_(torch.eye(4))
        mlp.fc3.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [2, -2, 0, 0]]))
        for layer in (mlp.fc1, mlp.fc2, mlp.fc3):
            layer.bias.zero_()
    clf = {"model": mlp.state_dict(), "in_channels": 3, "hidden": 4, "dropout": 0.0, "layers": ["input"],
           "backbone": {"weights": "random", "normalization": "torchvision"}, "config": {"tile": {"size": 64}}}
    model, meta = segmenter_from_classifier(clf, stride=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": meta, "config": {}}, path)
    return path


@pytest.mark.timeout(300)
def test_tile_and_predict_on_slurm_dask_workers_match_in_process(
    slurm_cluster, slurm_env, tmp_path: Path, monkeypatch
) -> None:
    from footprints.config import load_config
    from footprints.contracts.probability import read_probability
    from footprints.runner import run_stage
    from footprints.synth.dataset import write_synthetic_dataset

    for key in [k for k in list(__import__("os").environ) if k not in slurm_env]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    write_synthetic_dataset(data, 4, 5, 128)
    ckpt = _segmenter_checkpoint(tmp_path / "model" / "best.pt")
    slurm = {
        "kind": "slurm", "threads_per_worker": 1,
        "slurm": {"cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00", "jobs": 2,
                  "interface": "lo", "log_directory": str(tmp_path / "dask-logs"), "startup_timeout": 120},
    }  # fmt: skip
    runs = {}
    for name, cluster in (("inproc", {"kind": "local", "workers": 0}), ("slurm", slurm)):
        cfg = load_config(_stage_config(tmp_path, data, name, cluster))
        t = time.monotonic()
        tiled = run_stage("tile", cfg)
        predicted = run_stage("predict", cfg, checkpoint=str(ckpt))
        runs[name] = (cfg, tiled, predicted, time.monotonic() - t)
        print(f"tile + predict, {name}: {runs[name][3]:.1f} s")
    (c_in, _, p_in, _), (c_sl, _, p_sl, _) = runs["inproc"], runs["slurm"]
    assert p_in["failed"] == p_sl["failed"] == 0 and p_in["scenes"] == p_sl["scenes"] >= 2
    assert p_in["polygons"] >= 5, p_in  # something to compare

    # the work really ran in SLURM jobs: dask-jobqueue's job names, workers that joined our schedulers
    job_logs = {p.name: p.read_text() for p in (tmp_path / "dask-logs").glob("footprints-dask-*.err")}
    for name in job_logs:
        info = slurm_cluster.job(re.search(r"footprints-dask-(\d+)\.err", name).group(1))
        assert info.get("JobName") == "footprints-dask" and info.get("NumCPUs") == "1", info
    # each stage starts its own scheduler and waits for its first worker only (a second job may still be
    # pending when the work is done, and the cluster's close cancels it): workers of both stages joined
    schedulers = {m for t in job_logs.values() for m in re.findall(r"Registered to: +(tcp://127\.0\.0\.1:\d+)", t)}
    assert len(schedulers) == 2, {n: t[-600:] for n, t in job_logs.items()}

    # tile: the same manifest and the same patches, bit for bit
    m_in = pd.read_csv(RunPaths.of(c_in).stage("tile") / "manifest.csv").sort_values("patch_id").reset_index(drop=True)
    m_sl = pd.read_csv(RunPaths.of(c_sl).stage("tile") / "manifest.csv").sort_values("patch_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(m_in, m_sl)
    for rel in list(m_in["image_path"]) + list(m_in["mask_path"]):
        a, b = (RunPaths.of(c).stage("tile") / rel for c in (c_in, c_sl))
        assert a.read_bytes() == b.read_bytes(), rel

    # predict: the same probability rasters (within a uint8 step) and the same polygons
    probs = sorted(p.name for p in Path(p_in["scene_dir"]).glob("*_prob.tif"))
    assert probs and probs == sorted(p.name for p in Path(p_sl["scene_dir"]).glob("*_prob.tif"))
    for name in probs:
        a, va = read_probability(Path(p_in["scene_dir"]) / name)
        b, vb = read_probability(Path(p_sl["scene_dir"]) / name)
        assert np.array_equal(va, vb) and np.abs(a - b).max() <= 1 / 255 + 1e-6, name
    import geopandas as gpd
    import shapely

    # polygons compared in the GeoPackage's CRS (the synthetic scenes lie in UTM zones far apart: EPSG:4326)
    g_in, g_sl = gpd.read_file(p_in["gpkg"], layer="footprints"), gpd.read_file(p_sl["gpkg"], layer="footprints")
    assert len(g_in) == len(g_sl) == p_in["polygons"] == p_sl["polygons"]
    assert g_in.crs == g_sl.crs and (g_in.crs.is_projected or g_in.crs.to_epsg() == 4326)
    g_in, g_sl = (g.sort_values(["scene", "area_m2"]).reset_index(drop=True) for g in (g_in, g_sl))
    assert list(g_in["scene"]) == list(g_sl["scene"])
    np.testing.assert_allclose(g_in["area_m2"], g_sl["area_m2"], rtol=1e-9)
    tolerance = 1e-6 if g_in.crs.is_projected else 1e-16  # square metres, or square degrees
    diff = g_in.geometry.symmetric_difference(g_sl.geometry, align=True)
    assert (shapely.area(np.asarray(diff.values)) < tolerance).all()  # plain areas: no CRS warning
