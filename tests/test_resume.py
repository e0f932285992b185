"""Exact resume: a run killed with SIGKILL (or preempted with SIGUSR1) and resumed with --load_saved_model
ends with the same weights, optimizer state and history as an uninterrupted run (CPU, deterministic).

Every run is a real `python -m footprints.cli train-segmenter` process. The kill points are made exact by
the hooks of tests/train_hooks.py (the process signals itself at a chosen global step and place): 2 epochs
of 3 steps (8 train patches, global batch 3, so the last batch is short), checkpoint after every step.
The patches are read from the patch store (memory-mapped shards), as after a real `footprints tile`, with
the augmentation applied to whole batches (`footprints.training.data.augment_batch`).
"""

from __future__ import annotations

import json

import pytest
import torch
from store_fixtures import add_patch_store
from train_fixtures import copy_inputs, load, make_project, run_cli

pytestmark = pytest.mark.slow

EVERY_STEP = ("--set", "segmenter.checkpoint_every=1")


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"model tensor {key} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[pid][name], sb[pid][name]), f"optimizer {name} of param {pid} differs"
    assert a["scheduler"] == b["scheduler"]
    assert (a["epoch"], a["step"], a["global_step"]) == (b["epoch"], b["step"], b["global_step"])
    timing = ("seconds", "patches_per_s")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k not in timing} for h in b["history"]]


def test_sigkill_at_any_point_then_resume_gives_identical_weights(tmp_path):
    config = make_project(tmp_path, name="ref")
    add_patch_store(tmp_path / "outputs" / "ref" / "tile")
    copy_inputs(tmp_path, "ref", "cut")
    ref = run_cli(config, *EVERY_STEP)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "decoded from GeoTIFF" not in ref.stderr  # the store is read
    ref_dir = tmp_path / "outputs" / "ref" / "train-segmenter"
    reference = load(ref_dir / "last.pt")
    assert reference["epoch"] == 2 and reference["global_step"] == 6

    cut = ("--set", "name=cut", *EVERY_STEP)
    cut_dir = tmp_path / "outputs" / "cut" / "train-segmenter"

    # 1. mid-epoch: killed after step 2's optimizer update, before its checkpoint (step 2 is lost, redone)
    p = run_cli(config, *cut, hook="2:SIGKILL:step")
    assert p.returncode == -9, p.stderr[-3000:]
    state = load(cut_dir / "last.pt")
    assert (state["epoch"], state["step"], state["sampler"]["position"]) == (0, 1, 3)

    # (without --load_saved_model an unfinished run is refused: tests/test_training.py; every branch of that
    # decision: tests/test_resume_decision.py)

    # 2. at the epoch boundary: all of epoch 1 trained and checkpointed, killed during its validation
    p = run_cli(config, *cut, "--load_saved_model", hook="3:SIGKILL:validation")
    assert p.returncode == -9, p.stderr[-3000:]
    assert "resuming from" in p.stderr
    state = load(cut_dir / "last.pt")
    assert (state["epoch"], state["step"], state["sampler"]["position"]) == (0, 3, 8)
    assert [h["epoch"] for h in state["history"]] == [0]  # the conversion's; epoch 1's validation never finished

    # 3. in the middle of writing a checkpoint (temp file written, not yet renamed): last.pt stays intact
    p = run_cli(config, *cut, "--load_saved_model", hook="5:SIGKILL:checkpoint")
    assert p.returncode == -9, p.stderr[-3000:]
    state = load(cut_dir / "last.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 1, 4)
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert list(cut_dir.glob(".last.*.part")), "the killed write should have left its temporary file"

    # 4. SLURM's pre-timeout signal after the last training step: checkpoint, exit code 99
    p = run_cli(config, *cut, "--load_saved_model", hook="6:SIGUSR1:step")
    assert p.returncode == 99, p.stderr[-3000:]
    assert "stopped by SIGUSR1" in p.stderr
    state = load(cut_dir / "last.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 3, 6)

    # 5. resume to the end
    p = run_cli(config, *cut, "--load_saved_model")
    assert p.returncode == 0, p.stderr[-3000:]
    final = load(cut_dir / "last.pt")
    _assert_same_state(reference, final)
    assert not list(cut_dir.glob(".*.part")), "stale temporary files were not cleaned up"
    best_ref, best_cut = load(ref_dir / "best.pt"), load(cut_dir / "best.pt")
    assert best_ref["epoch"] == best_cut["epoch"]
    for key in best_ref["model"]:
        assert torch.equal(best_ref["model"][key], best_cut["model"][key])
    assert json.loads((ref_dir / "metrics.json").read_text())["val"] == json.loads(
        (cut_dir / "metrics.json").read_text()
    )["val"]

    # a finished run does nothing on a rerun, with or without --load_saved_model
    mtime = (cut_dir / "last.pt").stat().st_mtime_ns
    p = run_cli(config, *cut, "--load_saved_model")
    assert p.returncode == 0 and "nothing to do" in p.stderr
    assert (cut_dir / "last.pt").stat().st_mtime_ns == mtime
