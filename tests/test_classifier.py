"""Stage `train-classifier`: class weights, the weighted loss, checkpoint contract, and beating chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from footprints.config import load_config
from footprints.contracts.checkpoints import load_checkpoint
from footprints.contracts.features_store import load_features
from footprints.contracts.manifest import read_manifest
from footprints.contracts.paths import RunPaths
from footprints.errors import StageError
from footprints.model.losses import class_weights_from_counts, resolve_class_weights, weighted_ce_sums
from footprints.model.mlp import MLP, mlp_from_checkpoint, train_epoch
from footprints.runner import run_stage
from footprints.scoring.metrics import confusion, pixel_metrics


def _weighted_loss(logits, y, w, cw):
    loss_sum, weight_sum = weighted_ce_sums(logits, y, cw, w)
    return loss_sum / weight_sum


def test_class_weights_by_hand():
    w = class_weights_from_counts([900, 100], "inverse")
    # N / (K n_c): 1000 / 1800 and 1000 / 200
    assert w.tolist() == pytest.approx([0.5555555, 5.0])
    assert (w * [900, 100]).tolist() == pytest.approx([500, 500])  # each class carries half the loss
    assert (w * [900, 100]).sum() / 1000 == pytest.approx(1.0)  # normalised: mean weight per pixel is 1
    y = np.r_[np.zeros(900, int), np.ones(100, int)]
    assert w == pytest.approx(compute_class_weight("balanced", classes=np.array([0, 1]), y=y))
    # tempered: proportional to the square root of the inverse frequency, same normalisation
    s = class_weights_from_counts([900, 100], "sqrt")
    assert s[1] / s[0] == pytest.approx(3.0) and (s * [900, 100]).sum() == pytest.approx(1000)
    assert class_weights_from_counts([900, 100], "none").tolist() == [1.0, 1.0]
    # K classes: three here, each carrying a third of the loss under inverse frequency
    w3 = class_weights_from_counts([800, 150, 50], "inverse")
    assert (w3 * [800, 150, 50]).tolist() == pytest.approx([1000 / 3] * 3)
    with pytest.raises(StageError, match="every class is needed"):
        class_weights_from_counts([10, 0], "inverse")
    assert resolve_class_weights([1.0, 3.0], [900, 100], "sqrt", "classifier.class_weights")[0].tolist() == [1.0, 3.0]
    got, source = resolve_class_weights(None, [900, 100], "inverse", "classifier.class_weights")
    assert got == pytest.approx(w) and "inverse frequency" in source


def test_weighted_loss_is_class_weighted_cross_entropy_over_the_pixels_samples_stand_for():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2, generator=g)
    y = torch.randint(0, 2, (50,), generator=g)
    cw = torch.tensor([0.6, 3.0])
    # w = 1: torch's class-weighted mean
    assert torch.allclose(_weighted_loss(logits, y, torch.ones(50), cw), F.cross_entropy(logits, y, weight=cw))
    # integer w: the same as repeating each sample w times
    w = torch.randint(1, 6, (50,), generator=g)
    rep = torch.repeat_interleave(torch.arange(50), w)
    want = F.cross_entropy(logits[rep], y[rep], weight=cw)
    assert torch.allclose(_weighted_loss(logits, y, w.float(), cw), want, atol=1e-6)


def test_an_epoch_on_rows_of_an_array_is_the_epoch_on_a_copy_of_those_rows():
    """train-damage's validation folds train on rows of the stacked pixels by index instead of copying them:
    the same minibatches, so the same model and loss as on the copy."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float16)
    rows = np.sort(rng.choice(300, 170, replace=False))
    y = rng.integers(0, 3, 170)
    w = rng.random(170).astype(np.float32)

    def epochs(fill):
        torch.manual_seed(0)
        model = MLP(6, hidden=8, num_classes=3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        losses = [train_epoch(model, opt, [fill], torch.ones(3), 32, gen, "cpu") for _ in range(2)]
        return losses, model.state_dict()

    by_index, on_copy = epochs((X, y, w, rows)), epochs((X[rows], y, w, None))
    assert by_index[0] == on_copy[0]
    assert all(torch.equal(by_index[1][k], on_copy[1][k]) for k in on_copy[1])
    assert epochs((X[:170], y, w, None))[0] != on_copy[0]  # other rows: another epoch


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """Synthetic scenes -> real tile stage -> features -> train-classifier (random backbone, small)."""
    from footprints.synth.dataset import write_synthetic_dataset

    root = tmp_path_factory.mktemp("clf")
    write_synthetic_dataset(root / "data", n_scenes=8, seed=1, size=128, geotiff=False)
    cfg = load_config(None, [
        f"output_root={root / 'out'}", "name=syn", f"data.root={root / 'data'}",
        f"data.geotransforms={root / 'data' / 'truth_transforms.json'}", "cluster.workers=0",
        "tile.size=64", "tile.stride=64", "tile.split_ratios=[0.5, 0.25, 0.25]", "tile.target=binary",
        "backbone.weights=random", "features.per_class=24", "features.device=cpu",
        "classifier.hidden=128", "classifier.epochs=8", "classifier.batch_size=64", "classifier.lr=0.001",
        "classifier.step_size=5", "classifier.device=cpu",
    ])
    run_stage("tile", cfg)
    run_stage("features", cfg)
    metrics = run_stage("train-classifier", cfg)
    return cfg, metrics


@pytest.mark.slow
def test_trained_mlp_beats_chance_on_synthetic_scenes(synthetic_run):
    cfg, metrics = synthetic_run
    man = read_manifest(RunPaths.of(cfg).stage("tile"))
    val = man[man["split"] == "val"]
    frac = val["building_px"].sum() / (val["building_px"].sum() + val["background_px"].sum())
    mlp = metrics["mlp"]["val"]
    # chance: predicting "building" everywhere (the best blind guess for IoU) scores the building fraction
    assert mlp["building_iou"] > 2 * frac, (mlp, frac)
    # on the class-balanced sampled pixels a blind guess has balanced accuracy 0.5
    s = metrics["mlp"]["val_sampled_pixels"]
    balanced_acc = (s["tp"] / (s["tp"] + s["fn"]) + s["tn"] / (s["tn"] + s["fp"])) / 2
    assert balanced_acc > 0.65, s
    # the baseline ran on the same features and is reported beside the MLP
    assert set(metrics["baseline"]["val"]) >= {"building_iou", "f1", "precision", "recall", "accuracy", "mean_iu"}


@pytest.mark.slow
def test_checkpoint_and_artifacts_follow_the_contract(synthetic_run):
    cfg, metrics = synthetic_run
    out = RunPaths.of(cfg).stage("train-classifier")
    ckpt = torch.load(out / "best.pt", weights_only=True)  # plain data only
    assert {"model", "in_channels", "hidden", "dropout", "layers", "backbone", "class_weights", "epoch",
            "metrics", "config"} <= set(ckpt)
    assert ckpt["in_channels"] == 4227 and ckpt["hidden"] == 128 and ckpt["layers"][0] == "input"
    assert ckpt["backbone"] == {"weights": "random", "normalization": "torchvision"}
    assert ckpt["metrics"]["building_iou"] == pytest.approx(metrics["mlp"]["val"]["building_iou"])
    assert ckpt["config"]["classifier"]["epochs"] == 8
    # normaliser travels inside the model
    with np.load(RunPaths.of(cfg).stage("features") / "stats.npz") as z:
        assert np.allclose(ckpt["model"]["mean"].numpy(), z["mean"], rtol=1e-6)
    # class weights: the square root of the train masks' inverse frequencies (the default), recorded everywhere
    meta = json.loads((RunPaths.of(cfg).stage("features") / "meta.json").read_text())
    cp = meta["class_pixels"]
    want = class_weights_from_counts([cp[c] for c in meta["classes"]], "sqrt")
    assert ckpt["class_weights"] == pytest.approx(want.tolist())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["class_weights"] == pytest.approx(want.tolist()) and "RANDOM" in saved["warning"]
    assert len(saved["history"]) == 8 and saved["mlp"]["epoch"] == ckpt["epoch"]
    best = max(h["val_building_iou"] for h in saved["history"])
    assert saved["mlp"]["val"]["building_iou"] == pytest.approx(best)  # selected on val building IoU
    assert json.loads((out / "baseline.json").read_text())["val"] == saved["baseline"]["val"]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved model reproduces the recorded validation metrics
    model = mlp_from_checkpoint(load_checkpoint(out / "best.pt", kind="classifier"))
    val = load_features(RunPaths.of(cfg).stage("features"), "val")
    assert ckpt["classes"] == meta["classes"] == ["background", "building"]
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(val["X"])), 1)[:, 1].numpy()
    got = pixel_metrics(*confusion(p >= 0.5, val["y"] == 1, ignore=None, weight=val["w"]))
    assert got["building_iou"] == pytest.approx(saved["mlp"]["val"]["building_iou"], rel=1e-5)
    # rerun: complete, skipped
    assert run_stage("train-classifier", cfg)["skipped"] is True
