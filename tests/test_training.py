"""train-segmenter in one process: checkpoints, RNG state, sampler/augmentation/loss pieces, the stage's
outputs and re-run behaviour, and the signals that make it checkpoint and stop (exit code 99)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_fixtures import load, make_project
from train_hooks import SignalAt

from footprints.config import load_config
from footprints.contracts import checkpoints as ckpt_io
from footprints.contracts.manifest import read_manifest
from footprints.errors import InputError, Preempted, StageError
from footprints.model.losses import class_weights_from_counts, weighted_ce_sums
from footprints.runner import run_stage
from footprints.stages import train_segmenter as train_stage
from footprints.training.data import (
    GlobalBatchSampler,
    apply_augment,
    augment_batch,
    augment_code,
    epoch_permutation,
)
from footprints.training.distributed import DistInfo, dist_from_env, first_slurm_host, rendezvous
from footprints.training.trainer import masked_target


def run(cfg, **options):
    """The train-segmenter stage as the CLI runs it (signal handlers installed first)."""
    return run_stage("train-segmenter", cfg, **options)

# ------------------------------------------------------------------------------------------ pieces


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(2)  # a cached gaussian and a used state
    ckpt_io.save_checkpoint(tmp_path / "c.pt", {"model": {}, "rng": ckpt_io.capture_rng()})
    expected = (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt_io.restore_rng(ckpt_io.load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(4))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_write_is_atomic_and_loading_is_safe(tmp_path):
    path = tmp_path / "last.pt"
    ckpt_io.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1})

    def crash(tmp):  # the process dies between writing the temporary file and renaming it
        assert tmp.is_file() and tmp.stat().st_size > 0
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ckpt_io.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 2}, before_rename=crash)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(InputError, match="evil.pt: not a loadable checkpoint"):
        ckpt_io.load_checkpoint(evil)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="torn.pt"):
        ckpt_io.load_checkpoint(torn)


def test_augmentation_moves_image_and_mask_together():
    image = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    mask = image[1].copy()  # the mask is a copy of one band: any mismatch shows
    outputs = set()
    for code in range(8):
        im, m = apply_augment(image, mask, code)
        assert np.array_equal(im[1], m) and im.flags.c_contiguous
        assert sorted(im.ravel()) == sorted(image.ravel())
        outputs.add(im.tobytes())
    assert len(outputs) == 8  # the 8 flips/rotations are all different
    codes = [augment_code(0, 1, p) for p in range(64)]
    assert codes == [augment_code(0, 1, p) for p in range(64)] and len(set(codes)) == 8
    assert codes != [augment_code(0, 2, p) for p in range(64)]


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(50, 7, 3)
    assert sorted(a) == list(range(50))
    assert np.array_equal(a, epoch_permutation(50, 7, 3))
    assert not np.array_equal(a, epoch_permutation(50, 7, 4))
    assert not np.array_equal(a, epoch_permutation(50, 8, 3))


def test_weighted_loss_sums_equal_cross_entropy_and_ignore_stand_in_samples():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 6)
    target = torch.randint(0, 2, (3, 5, 6))
    target[:, 0] = 255
    weight = torch.tensor([0.7, 4.0])
    loss_sum, weight_sum = weighted_ce_sums(logits, target, weight)
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    assert torch.allclose(loss_sum / weight_sum, expected, rtol=1e-6)
    # a stand-in sample (real = 0) contributes nothing
    masked = masked_target(target, torch.tensor([1, 0, 1]))
    s2, w2 = weighted_ce_sums(logits, masked, weight)
    s_ref, w_ref = weighted_ce_sums(logits[[0, 2]], target[[0, 2]], weight)
    assert torch.allclose(s2, s_ref) and torch.allclose(w2, w_ref)


def test_global_batches_are_split_across_ranks_without_loss_or_overlap():
    order = np.random.default_rng(0).permutation(11)
    single = list(GlobalBatchSampler(order, 4, 2, 11, 0, DistInfo()))
    ranks = [list(GlobalBatchSampler(order, 4, 2, 11, 0, DistInfo(r, 3))) for r in range(3)]
    assert len(single) == 3 and all(len(r) == 3 for r in ranks)
    for step, batch in enumerate(single):
        shards = [key for r in ranks for key in r[step] if key[3] == 1]
        assert sorted(shards) == sorted(batch)
    # the last global batch has one sample (position 10): ranks 1 and 2 get a weightless stand-in
    assert [r[2][0][3] for r in ranks] == [1, 0, 0]


def test_rank_and_rendezvous_from_torchrun_and_slurm():
    assert dist_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistInfo(1, 4, 1, "torchrun")
    slurm = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    assert dist_from_env(slurm) == DistInfo(3, 4, 1, "slurm")
    # the batch shell of a 4-task job is one process, not rank 0 of 4
    assert dist_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == DistInfo()
    assert first_slurm_host("gpu[03-05,07],cpu1") == "gpu03"
    assert first_slurm_host("node7") == "node7"
    assert rendezvous({"SLURM_JOB_NODELIST": "n[12-13]", "SLURM_JOB_ID": "123"}) == ("n12", "15123")
    assert rendezvous({"MASTER_ADDR": "h", "MASTER_PORT": "1"}) == ("h", "1")


# ------------------------------------------------------------------------------------------ the stage


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def test_stage_trains_and_writes_checkpoints_curves_and_overlays(project, tmp_path):
    cfg = load_config(project)
    result = run(cfg)
    out = tmp_path / "outputs" / "t" / "train-segmenter"
    last, best = load(out / "last.pt"), load(out / "best.pt")
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "sampler", "rng", "history", "config", "meta"):
        assert key in last, key
    assert last["epoch"] == 2 and last["step"] == 0 and last["global_step"] == 6
    assert set(last["rng"]) == {"python", "numpy", "torch", "cuda"}
    history = json.loads((out / "history.json").read_text())
    # entry 0 is the converted classifier before any training: an epoch must beat it to become best.pt
    assert [h["epoch"] for h in history] == [0, 1, 2] and last["history"] == history
    assert history[0]["train_loss"] is None and np.isfinite(history[0]["val_loss"])
    ious = [h["val"]["building_iou"] for h in history]
    assert best["epoch"] == int(np.argmax(ious)) == result["best_epoch"]
    assert result["best_val_building_iou"] == max(ious)
    assert history[2]["lr"] == pytest.approx(history[1]["lr"] * 0.5)  # StepLR, step_size 1, gamma 0.5
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history[1:])
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert len(list((out / "overlays").glob("epoch000_*.png"))) == 2
    assert len(list((out / "overlays").glob("epoch001_*.png"))) == 2
    assert len(list((out / "overlays").glob("epoch002_*.png"))) == 2

    # class weights: inverse frequency of the train patches' pixels (the classifier's [0.6, 3] are not used)
    rows = read_manifest(tmp_path / "outputs" / "t" / "tile")
    rows = rows[rows["split"] == "train"]
    expected = class_weights_from_counts([rows["background_px"].sum(), rows["building_px"].sum()], "sqrt")
    assert last["meta"]["class_weights"] == pytest.approx(expected.tolist())

    # the head learned, the frozen backbone did not move
    from footprints.model.segmenter import segmenter_from_classifier

    torch.manual_seed(0)
    initial, _ = segmenter_from_classifier(tmp_path / "outputs" / "t" / "train-classifier" / "best.pt")
    init_state = initial.state_dict()
    backbone_keys = [k for k in init_state if k.startswith("backbone.")]
    head_keys = [k for k in init_state if k.startswith("head.")]
    assert backbone_keys and head_keys
    assert all(torch.equal(last["model"][k], load(out / "best.pt")["model"][k]) for k in backbone_keys)
    assert any(not torch.equal(last["model"][k], init_state[k]) for k in head_keys)
    head_params = [n for n, p in initial.named_parameters() if n.startswith("head.")]  # not its mean/std buffers
    assert set(last["optimizer"]["state"]) == set(range(len(head_params)))  # only trainable params optimised
    assert torch.equal(last["model"]["head.std"], init_state["head.std"])  # the normaliser is not trained


def test_rerun_skips_overwrite_retrains_and_more_epochs_continue(project, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="footprints")
    out = tmp_path / "outputs" / "t" / "train-segmenter"
    cfg = load_config(project, ["segmenter.max_steps_per_epoch=1"])
    run(cfg)
    first = load(out / "last.pt")
    assert first["global_step"] == 2  # one step per epoch

    mtime = (out / "last.pt").stat().st_mtime_ns
    assert run(cfg, load_saved_model=True)["status"] == "complete"
    assert run(cfg)["status"] == "complete"
    assert "nothing to do" in caplog.text
    assert (out / "last.pt").stat().st_mtime_ns == mtime

    # more epochs without --load_saved_model: refused with the way out in the message
    more = load_config(project, ["segmenter.max_steps_per_epoch=1", "segmenter.epochs=3"])
    with pytest.raises(StageError, match="trained for 2 of 3 epoch.*--load_saved_model to continue it or --overwrite"):
        run(more)
    result = run(more, load_saved_model=True)
    cont = load(out / "last.pt")
    assert result["epochs"] == 3 and cont["epoch"] == 3 and cont["global_step"] == 3
    assert cont["history"][:3] == first["history"]

    (out / "overlays" / "stale.png").write_bytes(b"x")
    run(cfg, overwrite=True)
    again = load(out / "last.pt")
    assert again["epoch"] == 2 and [h["epoch"] for h in again["history"]] == [0, 1, 2]
    assert not (out / "overlays" / "stale.png").exists()
    for key, value in first["model"].items():
        assert torch.equal(value, again["model"][key])  # a fresh run from the same seed is the same run


def test_a_retrained_classifier_or_another_stride_makes_the_segmenter_again(project, tmp_path, caplog):
    """A finished segmenter converted from another classifier (or with another head stride) is stale like
    any stage output whose inputs changed: the stage trains again instead of saying 'nothing to do'."""
    from footprints.contracts.freshness import file_digest

    caplog.set_level(logging.INFO, logger="footprints")
    out = tmp_path / "outputs" / "t"
    cfg = load_config(project, ["segmenter.epochs=0"])
    run(cfg)
    clf = out / "train-classifier" / "best.pt"
    assert load(out / "train-segmenter" / "best.pt")["meta"]["classifier_digest"] == file_digest(clf)
    assert run(cfg)["status"] == "complete"

    retrained = load(clf)
    retrained["model"] = {k: v + 0.01 for k, v in retrained["model"].items()}
    torch.save(retrained, clf)
    caplog.clear()
    assert run(cfg, load_saved_model=True)["status"] != "complete"
    assert "converted from another classifier" in caplog.text and "cannot continue it" in caplog.text
    best = load(out / "train-segmenter" / "best.pt")
    assert best["meta"]["classifier_digest"] == file_digest(clf)
    assert torch.equal(best["model"]["head.conv3.bias"], retrained["model"]["fc3.bias"])  # the new classifier's

    caplog.clear()
    assert run(load_config(project, ["segmenter.epochs=0", "segmenter.stride=1"]))["status"] != "complete"
    assert "segmenter.stride = 2, the config says 1" in caplog.text
    assert load(out / "train-segmenter" / "best.pt")["meta"]["stride"] == 1


def test_load_saved_model_without_checkpoint_starts_fresh(project, tmp_path, caplog):
    cfg = load_config(project, ["segmenter.epochs=1", "segmenter.max_steps_per_epoch=1",
                                "segmenter.class_weights=[1.0, 2.5]"])  # fmt: skip
    result = run(cfg, load_saved_model=True)
    assert "no checkpoint at" in caplog.text and "starting fresh" in caplog.text
    assert result["status"] == "trained" and result["epochs"] == 1
    assert load(tmp_path / "outputs" / "t" / "train-segmenter" / "last.pt")["meta"]["class_weights"] == [1.0, 2.5]


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_raises_preempted(project, tmp_path, monkeypatch, signame):
    previous = signal.getsignal(getattr(signal, signame))
    cfg = load_config(project, ["segmenter.epochs=1"])
    hook = SignalAt(f"2:{signame}:step")  # the signal arrives just after step 2
    with pytest.raises(Preempted, match=f"stopped by {signame} at epoch 1/1, step 2") as err:
        run(cfg, hooks=hook)
    assert err.value.exit_code == 99
    last = tmp_path / "outputs" / "t" / "train-segmenter" / "last.pt"
    state = load(last)
    assert (state["epoch"], state["step"], state["global_step"], state["sampler"]["position"]) == (0, 2, 2, 6)
    assert signal.getsignal(getattr(signal, signame)) is previous  # handlers restored

    if signame == "SIGUSR1":
        assert run(cfg, load_saved_model=True)["status"] == "trained"
        state = load(last)
        assert (state["epoch"], state["global_step"]) == (1, 3)


def test_missing_inputs_are_clear_stage_errors(tmp_path):
    cfg = load_config(make_project(tmp_path))
    (tmp_path / "outputs" / "t" / "train-classifier" / "best.pt").unlink()
    with pytest.raises(StageError, match="train-classifier/best.pt: not found; run train-classifier first"):
        run(cfg)
    (tmp_path / "outputs" / "t" / "tile" / "manifest.csv").unlink()
    with pytest.raises(StageError, match="manifest.csv"):
        run(cfg)


def test_signal_during_start_up_checkpoints_the_initial_state_and_resume_is_exact(tmp_path, monkeypatch):
    from footprints.training.signals import StopSignals

    config = make_project(tmp_path)
    cfg = load_config(config, ["segmenter.epochs=1", "segmenter.max_steps_per_epoch=2"])
    stop = StopSignals()
    # as if SLURM's warning came while python was starting: run.sh records it in the stop file
    stop_file = tmp_path / "stop-warning"
    monkeypatch.setenv(StopSignals.STOP_FILE_ENV, str(stop_file))
    assert stop.signame is None
    stop_file.touch()
    assert stop.signame == "SIGUSR1"
    with pytest.raises(Preempted, match="epoch 1/1, step 0"):
        train_stage.run(cfg, stop=stop)
    last = tmp_path / "outputs" / "t" / "train-segmenter" / "last.pt"
    assert (load(last)["epoch"], load(last)["global_step"]) == (0, 0)
    stop_file.unlink()
    run(cfg, load_saved_model=True)
    resumed = load(last)["model"]

    run(cfg, overwrite=True)
    fresh = load(last)["model"]
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


# ------------------------------------------------------------------------------------------ the data path


@pytest.mark.parametrize("shape", [(16, 16), (12, 20)], ids=["square", "non-square"])
@pytest.mark.parametrize("host", [True, False], ids=["numpy-copies", "torch-copies"])
def test_batch_augmentation_on_the_device_equals_apply_augment(shape, host):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 3, *shape), dtype=np.uint8)
    masks = rng.integers(0, 3, (8, *shape), dtype=np.uint8)
    codes = list(range(8))
    x, m = augment_batch(torch.from_numpy(images), torch.from_numpy(masks), codes, torch.float32, torch.int64,
                         host=host)
    assert x.dtype == torch.float32 and m.dtype == torch.int64
    for i, code in enumerate(codes):
        want_i, want_m = apply_augment(images[i], masks[i], code)
        assert np.array_equal(x[i].numpy(), want_i.astype(np.float32))
        assert np.array_equal(m[i].numpy(), want_m.astype(np.int64))
    same = augment_batch(torch.from_numpy(images), torch.from_numpy(masks), [])  # no augmentation: a copy
    assert torch.equal(same[0], torch.from_numpy(images)) and torch.equal(same[1], torch.from_numpy(masks))


def test_patch_store_and_geotiff_patches_give_the_same_batches(tmp_path):
    from store_fixtures import add_patch_store

    from footprints.contracts.patches import store_is_intact, store_paths
    from footprints.training.data import PatchDataset, make_loader, to_device

    make_project(tmp_path)
    tile_dir = tmp_path / "outputs" / "t" / "tile"
    rows = read_manifest(tile_dir)
    geotiff = PatchDataset(tile_dir, rows, augment=True, seed=3)
    assert geotiff.store.stored_fraction == 0.0  # a hand-made tile output: no store, GeoTIFFs are read
    scenes = add_patch_store(tile_dir)
    stored = PatchDataset(tile_dir, rows, augment=True, seed=3)
    assert stored.store.stored_fraction == 1.0
    order = epoch_permutation(len(rows), 3, 1)
    sampler = GlobalBatchSampler(order, 4, 0, len(rows), 1, DistInfo())
    loaders = [make_loader(ds, sampler, torch.device("cpu"), 0) for ds in (geotiff, stored)]
    for epoch in (1, 2):  # one loader for every epoch: the sampler is reset
        sampler.reset(epoch_permutation(len(rows), 3, epoch), 0, len(rows), epoch)
        batches = [[to_device(b, torch.device("cpu")) for b in loader] for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == len(sampler) == 3
        for a, b in zip(*batches, strict=True):
            for ta, tb in zip(a, b, strict=True):
                assert torch.equal(ta, tb)
    # a truncated shard is seen (the scene record lists its size): that scene falls back to its GeoTIFFs
    images = store_paths(tile_dir, scenes[0])[0]
    images.write_bytes(images.read_bytes()[:-10])
    assert not store_is_intact(tile_dir, scenes[0]) and store_is_intact(tile_dir, scenes[1])
    partial = PatchDataset(tile_dir, rows, augment=False, seed=3)
    assert 0 < partial.store.stored_fraction < 1
    n = len(rows)
    keys = [(i, 0, i, 1) for i in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(partial[keys][:2], geotiff[keys][:2], strict=True))


def test_augmentation_codes_are_drawn_per_epoch_chunk_and_cached():
    from footprints.training.data import AUGMENT_CHUNK

    a = [augment_code(5, 2, p) for p in range(AUGMENT_CHUNK - 3, AUGMENT_CHUNK + 3)]
    assert a == [augment_code(5, 2, p) for p in range(AUGMENT_CHUNK - 3, AUGMENT_CHUNK + 3)]
    assert all(0 <= c < 8 for c in a)
    counts = np.bincount([augment_code(1, 0, p) for p in range(8000)], minlength=8)
    assert counts.min() > 800  # uniform over the 8 transforms


def test_dense_training_with_other_class_weights_than_the_classifier_warns(tmp_path, caplog):
    """The classifier was fit with weights [0.6, 3.0]; dense training with `none` changes the objective from its
    first step (a warning), with the classifier's own weights it does not."""
    project = make_project(tmp_path, segmenter={"epochs": 1, "max_steps_per_epoch": 1})
    with caplog.at_level(logging.WARNING, logger="footprints"):
        run(load_config(project, ["segmenter.class_weighting=none"]), overwrite=True)
    assert "differ from the classifier's [0.6, 3.0]" in caplog.text and "now none" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="footprints"):
        run(load_config(project, ["segmenter.class_weights=[1.2,6.0]"]), overwrite=True)  # the same ratio
    assert "differ from the classifier's" not in caplog.text
