"""Fine-tuning from a model (`classifier.init_from`, `--init_from`): train-classifier starts from a parent
checkpoint (a classifier, or a segmenter whose head converts back exactly), keeps its backbone, layers,
classes and normaliser, records it, and is stale when it changes.

One small real run (synthetic scenes -> tile -> features on the first two VGG layers, 67 channels) trains the
parent; fine-tuning runs reuse its features under other run names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from footprints.cli import build_parser, main
from footprints.config import ConfigError, load_config
from footprints.contracts.checkpoints import load_checkpoint, save_checkpoint
from footprints.contracts.features_store import read_meta
from footprints.contracts.freshness import digest, file_digest, read_record
from footprints.contracts.paths import RunPaths
from footprints.errors import InputError
from footprints.model.backbone import hypercolumn_channels
from footprints.model.mlp import MLP
from footprints.model.segmenter import segmenter_from_classifier
from footprints.runner import run_stage
from footprints.training.finetune import load_parent

LAYERS = "[input, conv1_1]"  # 67 channels: the backbone stops after its first conv


def _overrides(root: Path, name: str, **extra: str) -> list[str]:
    sets = {
        "output_root": str(root / "out"), "name": name, "data.root": str(root / "data"),
        "data.geotransforms": str(root / "data" / "truth_transforms.json"), "cluster.workers": "0",
        "tile.size": "64", "tile.stride": "64", "tile.split_ratios": "[0.5, 0.25, 0.25]", "tile.target": "binary",
        "backbone.weights": "random", "backbone.layers": LAYERS, "features.per_class": "24",
        "features.device": "cpu", "classifier.hidden": "16", "classifier.epochs": "4", "classifier.batch_size": "64",
        "classifier.lr": "0.003", "classifier.step_size": "5", "classifier.device": "cpu",
        "classifier.baseline": "false",
    }  # fmt: skip
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    """(root, parent config): tile + features + a trained classifier, the parent of the tests' runs."""
    from footprints.synth.dataset import write_synthetic_dataset

    root = tmp_path_factory.mktemp("finetune")
    write_synthetic_dataset(root / "data", n_scenes=4, seed=2, size=128, geotiff=False)
    cfg = load_config(None, _overrides(root, "parent"))
    for stage in ("tile", "features", "train-classifier"):
        run_stage(stage, cfg)
    return root, cfg


def _child(root: Path, name: str, parent: Path | None, **extra: str):
    """A run `name` with the parent run's tile and features (copied), fine-tuning from `parent`."""
    src, dst = root / "out" / "parent", root / "out" / name
    for stage in ("tile", "features"):
        if not (dst / stage).exists():
            shutil.copytree(src / stage, dst / stage)
    if parent is not None:
        extra["classifier.init_from"] = json.dumps(str(parent))
    return load_config(None, _overrides(root, name, **extra))


def _parent_ckpt(cfg) -> Path:
    return RunPaths.of(cfg).classifier_checkpoint


def _assert_same_mlp(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero_epochs_is_the_parent_exactly_and_records_it(parent_run):
    root, pcfg = parent_run
    parent = _parent_ckpt(pcfg)
    cfg = _child(root, "zero", parent, **{"classifier.epochs": "0", "segmenter.epochs": "0",
                                          "segmenter.device": "cpu", "segmenter.overlays": "0"})
    metrics = run_stage("train-classifier", cfg)
    ckpt = load_checkpoint(RunPaths.of(cfg).classifier_checkpoint, kind="classifier")
    _assert_same_mlp(ckpt["model"], load_checkpoint(parent, kind="classifier")["model"])
    record = {"path": str(parent), "digest": file_digest(parent), "kind": "classifier"}
    assert ckpt["parent"] == record and metrics["parent"] == record
    assert ckpt["epoch"] == 0 and metrics["history"] == []
    # the parent's own features: its evaluation as epoch 0 is the validation loss it was selected with
    parent_metrics = read_record(RunPaths.of(pcfg).classifier_metrics)
    assert metrics["mlp"]["start"]["val_loss"] == pytest.approx(parent_metrics["mlp"]["val_loss"], rel=1e-6)
    assert metrics["mlp"]["val"]["building_iou"] == pytest.approx(parent_metrics["mlp"]["val"]["building_iou"])
    # the normaliser is the parent's (it travels in the state dict), not recomputed from this run's stats
    assert torch.equal(ckpt["model"]["mean"], load_checkpoint(parent)["model"]["mean"])
    # train-segmenter converts the fine-tuned classifier, and its checkpoints name the same parent
    run_stage("train-segmenter", cfg)
    assert load_checkpoint(RunPaths.of(cfg).best_checkpoint, kind="segmenter")["meta"]["parent"] == record


def test_training_starts_from_the_parent_not_from_scratch(parent_run):
    root, pcfg = parent_run
    slow = {"classifier.epochs": "1", "classifier.lr": "0.0001"}
    tuned = run_stage("train-classifier", _child(root, "tuned", _parent_ckpt(pcfg), **slow))
    scratch = run_stage("train-classifier", _child(root, "scratch", None, **slow))
    start = tuned["mlp"]["start"]["val_loss"]
    first, fresh = tuned["history"][0]["val_loss"], scratch["history"][0]["val_loss"]
    # one slow epoch moves the parent a little; a fresh model after the same epoch is far from it
    assert abs(first - start) < 0.25 * abs(fresh - start), (start, first, fresh)
    assert first < fresh


def test_a_segmenter_parent_converts_back_exactly(parent_run, tmp_path):
    root, pcfg = parent_run
    clf = load_checkpoint(_parent_ckpt(pcfg), kind="classifier")
    model, meta = segmenter_from_classifier(clf)
    # the backbone's weights are never read here: zeros sharing one element keep the file small
    state = {k: torch.zeros((), dtype=t.dtype).expand(t.shape) if k.startswith("backbone.") else t
             for k, t in model.state_dict().items()}
    seg_path = tmp_path / "seg_best.pt"
    save_checkpoint(seg_path, {"model": state, "meta": meta})
    parent = load_parent(seg_path)
    assert parent.kind == "segmenter" and parent.layers == ["input", "conv1_1"] and parent.hidden == 16
    _assert_same_mlp(parent.state, clf["model"])
    cfg = _child(root, "from-seg", seg_path, **{"classifier.epochs": "0"})
    run_stage("train-classifier", cfg)
    ckpt = load_checkpoint(RunPaths.of(cfg).classifier_checkpoint, kind="classifier")
    _assert_same_mlp(ckpt["model"], clf["model"])
    assert ckpt["parent"]["kind"] == "segmenter" and ckpt["parent"]["digest"] == file_digest(seg_path)
    # a segmenter whose backbone was trained reads other features than this run computes: refused
    save_checkpoint(seg_path, {"model": state, "meta": {**meta, "train_backbone": True}})
    with pytest.raises(InputError, match="backbone was trained"):
        load_parent(seg_path)


def _mismatched_parents(folder: Path, clf: dict) -> dict[str, Path]:
    """Parents that differ from the run in one respect each, with weights that fit their own description."""
    out = {}
    bad = {
        "backbone.weights": {**clf, "backbone": {**clf["backbone"], "weights": "imagenet"}},
        "backbone.normalization": {**clf, "backbone": {**clf["backbone"], "normalization": "caffe"}},
    }
    c3 = hypercolumn_channels(["input"])
    bad["backbone.layers"] = {**clf, "model": MLP(c3, hidden=16).state_dict(), "in_channels": c3, "layers": ["input"]}
    three = MLP(clf["in_channels"], hidden=16, num_classes=3).state_dict()
    bad["tile.target"] = {**clf, "model": three, "classes": ["background", "interior", "border"]}
    bad["classifier.hidden"] = {**clf, "model": MLP(clf["in_channels"], hidden=8).state_dict(), "hidden": 8}
    for key, state in bad.items():
        out[key] = save_checkpoint(folder / f"{key}.pt", state)
    return out


@pytest.mark.parametrize(("key", "ours", "theirs"), [
    ("backbone.weights", "'random'", "'imagenet'"),
    ("backbone.normalization", "'torchvision'", "'caffe'"),
    ("backbone.layers", "['input', 'conv1_1']", "['input']"),
    ("tile.target", "'binary'", "'border'"),
    ("classifier.hidden", "16", "8"),
])  # fmt: skip
def test_a_parent_of_another_backbone_layers_or_scheme_is_refused_in_one_line(parent_run, tmp_path, capsys, key,
                                                                             ours, theirs):
    root, pcfg = parent_run
    bad = _mismatched_parents(tmp_path, load_checkpoint(_parent_ckpt(pcfg), kind="classifier"))[key]
    _child(root, "mismatch", None)  # its tile and features
    argv = ["train-classifier", *[f"--set={s}" for s in _overrides(root, "mismatch")], "--init_from", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"footprints: error: {bad}: the parent model was trained with {key} {theirs}, "
                          f"this run has {ours}"), err
    assert not RunPaths.of(load_config(None, _overrides(root, "mismatch"))).classifier_checkpoint.exists()


def test_a_changed_parent_makes_the_stage_stale(parent_run, tmp_path):
    root, pcfg = parent_run
    parent = tmp_path / "parent.pt"
    shutil.copy(_parent_ckpt(pcfg), parent)
    cfg = _child(root, "stale", parent, **{"classifier.epochs": "0"})
    run_stage("train-classifier", cfg)
    assert run_stage("train-classifier", cfg).get("skipped") is True
    state = load_checkpoint(parent, kind="classifier")
    state["model"]["fc3.bias"] = state["model"]["fc3.bias"] + 1.0
    save_checkpoint(parent, state)
    again = run_stage("train-classifier", cfg)
    assert not again.get("skipped") and again["parent"]["digest"] == file_digest(parent)
    ckpt = load_checkpoint(RunPaths.of(cfg).classifier_checkpoint, kind="classifier")
    assert torch.equal(ckpt["model"]["fc3.bias"], state["model"]["fc3.bias"])


def test_without_a_parent_the_freshness_key_is_unchanged(parent_run):
    _, pcfg = parent_run
    paths = RunPaths.of(pcfg)
    record = read_record(paths.classifier_metrics)
    want = digest({"features": read_meta(paths.features).get("key"), "settings": record["settings"], "seed": 0})
    assert record["key"] == want and "parent" not in record
    assert "parent" not in load_checkpoint(paths.classifier_checkpoint, kind="classifier")


def test_the_run_s_own_checkpoint_cannot_be_its_parent(parent_run):
    root, pcfg = parent_run
    own = _parent_ckpt(pcfg)
    cfg = load_config(None, _overrides(root, "parent", **{"classifier.init_from": json.dumps(str(own))}))
    with pytest.raises(InputError, match="inside this run's own train-classifier/ folder"):
        run_stage("train-classifier", cfg)


def test_config_and_flags(monkeypatch):
    with pytest.raises(ConfigError, match=r"classifier.epochs: must be in \[1, inf\] \(0 only with"):
        load_config(None, ["classifier.epochs=0"])
    with pytest.raises(ConfigError, match="classifier.init_from: expected a checkpoint path"):
        load_config(None, ["classifier.init_from=''"])
    assert load_config(None, ["classifier.epochs=0", "classifier.init_from=p.pt"]).classifier.init_from == "p.pt"
    assert load_config(None).classifier.init_from is None
    for command in ("train-classifier", "all", "cv"):
        assert build_parser().parse_args([command, "--init_from", "x.pt"]).init_from == "x.pt"
    # the flag reaches every fold's config, verbatim (a name YAML would read as a number stays a path)
    seen = {}
    monkeypatch.setattr("footprints.cli.run_cv", lambda cfg, overwrite: seen.setdefault("cfg", cfg))
    assert main(["cv", "--set", "classifier.init_from=other.pt", "--init-from", "2024"]) == 0
    assert seen["cfg"].classifier.init_from == "2024"


def test_unusable_parents_are_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_parent(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a loadable checkpoint"):
        load_parent(tmp_path / "junk.pt")
    mlp = MLP(3, hidden=4, num_classes=3)
    base = {"model": mlp.state_dict(), "in_channels": 3, "layers": ["input"],
            "backbone": {"weights": "random", "normalization": "torchvision"}}
    for name, ckpt, reason in [
        ("classes", {**base, "classes": ["background", "building"]}, "predicts 3 classes, its class list"),
        ("layers", {**base, "layers": ["input", "conv1_1"]}, "reads 3 channels, its layers"),
        ("kind", {"model": mlp.state_dict()}, "not a classifier or segmenter checkpoint"),
        ("head", {"model": mlp.state_dict(), "meta": {"layers": ["input"]}}, "no head.conv1.weight"),
    ]:
        with pytest.raises(InputError, match=reason) as err:
            load_parent(save_checkpoint(tmp_path / f"{name}.pt", ckpt))
        assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / f"{name}.pt"))
