"""The Segmenter module: conversion from a classifier checkpoint, frozen/trainable backbone, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from footprints.errors import InputError
from footprints.model.backbone import VGG16Features, hypercolumn_channels, load_backbone, resolve_layers
from footprints.model.head import NaiveHead, evaluated_positions
from footprints.model.mlp import MLP
from footprints.model.segmenter import Segmenter, build_segmenter, load_segmenter, segmenter_from_classifier


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A VGG16 features state dict (He-initialised so that deep layers are not ~0) saved like torchvision's."""
    net = VGG16Features("torchvision")
    _randomise(net, 0)
    path = tmp_path_factory.mktemp("w") / "vgg.pth"
    torch.save(net.features.state_dict(), path)
    return path


def classifier_ckpt(weights_file: Path, layers: list[str], hidden: int = 64) -> dict:
    c = hypercolumn_channels(layers)
    gen = torch.Generator().manual_seed(5)
    mlp = MLP(c, hidden, dropout=0.4, mean=torch.rand(c, generator=gen), std=0.5 + torch.rand(c, generator=gen))
    _randomise(mlp, 6)
    return {
        "model": mlp.state_dict(),
        "in_channels": c,
        "hidden": hidden,
        "dropout": 0.4,
        "layers": layers,
        "backbone": {"weights": str(weights_file), "normalization": "torchvision"},
        "class_weights": [0.2, 1.8],
        "epoch": 3,
        "metrics": {"iou": 0.5},
        "config": {"tile": {"size": 64, "target_gsd": 0.5}},
    }


def rgb(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("stride,layers", [(2, "all"), (1, "pool")])
def test_converted_segmenter_equals_mlp_on_grid_pixels(weights_file, tmp_path, stride, layers):
    layers = resolve_layers(layers)
    ckpt = classifier_ckpt(weights_file, layers)
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    model, meta = segmenter_from_classifier(path, stride=stride, train_backbone=False)
    model.eval()
    assert meta["layers"] == layers and meta["stride"] == stride and meta["hidden"] == 64
    assert meta["tile_size"] == 64 and meta["target_gsd"] == 0.5 and meta["class_weights"] == [0.2, 1.8]
    assert meta["backbone"] == ckpt["backbone"]

    x = rgb(2, 64, 64)
    mlp = MLP(ckpt["in_channels"], 64, 0.4)
    mlp.load_state_dict(ckpt["model"])
    mlp.eval()
    backbone = load_backbone(str(weights_file), "torchvision")
    with torch.no_grad():
        acts = backbone(x, layers)
        hyper = NaiveHead(layers, 8, stride).hypercolumns(acts, (64, 64))  # naive upsample + concatenate
        grid = model.grid_logits(x)
        full = model(x)
    pos = evaluated_positions(64, stride)
    assert grid.shape == (2, 2, len(pos), len(pos)) and full.shape == (2, 2, 64, 64)
    gen = torch.Generator().manual_seed(7)
    b = torch.randint(0, 2, (50,), generator=gen)
    i = torch.randint(0, len(pos), (50,), generator=gen)
    j = torch.randint(0, len(pos), (50,), generator=gen)
    with torch.no_grad():
        expected = mlp(hyper[b, :, pos[i], pos[j]])
    scale = max(1.0, float(expected.abs().max()))
    assert float(expected.std()) > 0.05  # real signal, not constants
    assert float((grid[b, :, i, j] - expected).abs().max()) <= 1e-5 * scale
    # the upsampled output keeps the exact values on the pixels the head evaluated
    assert float((full[b, :, pos[i], pos[j]] - expected).abs().max()) <= 1e-5 * scale


def test_segmenter_from_dict_and_bad_checkpoints(weights_file, tmp_path):
    ckpt = classifier_ckpt(weights_file, ["conv1_2", "conv2_2"], hidden=16)
    model, meta = segmenter_from_classifier(ckpt, stride=2)
    assert meta["in_channels"] == 192
    with pytest.raises(InputError, match="missing"):
        segmenter_from_classifier({"model": {}}, stride=2)
    bad = dict(ckpt, in_channels=191)
    with pytest.raises(InputError, match="do not fit"):
        segmenter_from_classifier(bad, stride=2)
    with pytest.raises(InputError, match="not found"):
        segmenter_from_classifier(tmp_path / "nope.pt", stride=2)


def test_frozen_backbone_by_default():
    torch.manual_seed(0)
    model = Segmenter(["conv1_2", "conv3_3"], hidden=16)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.head_parameters()}
    model.train()
    assert model.head.training and not model.backbone.training  # frozen: stays in eval mode
    out = model(rgb(1, 32, 32))
    out.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_train_backbone_gradients_match_naive_head(weights_file):
    """With a trainable backbone, the factorised head passes the same gradients into VGG as the naive one."""
    layers = resolve_layers("pool")
    ckpt = classifier_ckpt(weights_file, layers, hidden=16)
    model, _ = segmenter_from_classifier(ckpt, stride=2, train_backbone=True)
    model = model.double()
    model.train()
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    x = rgb(1, 32, 32).double()
    model.head.eval()  # no dropout: the same function in both runs; the backbone still gets gradients
    naive = NaiveHead.from_dense(model.head)
    assert not naive.training

    def backbone_grads(head) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        head(model.features(x), (32, 32)).sum().backward()
        return [p.grad.clone() for p in model.backbone.parameters()]

    fast, ref = backbone_grads(model.head), backbone_grads(naive)
    assert any(float(g.abs().max()) > 0 for g in fast)
    for g, r in zip(fast, ref, strict=True):
        assert float((g - r).abs().max()) <= 1e-4 * max(float(r.abs().max()), 1e-12)


@pytest.mark.parametrize("h,w", [(64, 64), (48, 80), (50, 70), (17, 33)])
def test_any_input_size(h, w):
    torch.manual_seed(0)
    model = Segmenter(["input", "conv1_2", "conv5_3"], hidden=8).eval()
    x = rgb(2, h, w)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 2, h, w) and torch.isfinite(out).all()
    if h % 16 or w % 16:  # padded inside: the same as running on the zero-padded image and cropping
        xp = torch.nn.functional.pad(x, (0, -w % 16, 0, -h % 16))
        with torch.no_grad():
            ref = model(xp)[..., :h, :w]
        assert torch.allclose(out, ref)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(x[:, :2])


def test_save_and_load_segmenter(weights_file, tmp_path):
    ckpt = classifier_ckpt(weights_file, resolve_layers("pool"), hidden=16)
    model, meta = segmenter_from_classifier(ckpt, stride=2)
    with torch.no_grad():
        model.head.conv3.bias.add_(0.25)  # as if trained
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 1}, path)
    loaded, meta2 = load_segmenter(path, "cpu")
    assert meta2 == meta and not loaded.training
    x = rgb(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    rebuilt = build_segmenter(meta)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert any(k.startswith("backbone.features.") for k in rebuilt.state_dict())

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a loadable"):
        load_segmenter(tmp_path / "junk.pt")
    torch.save(ckpt, tmp_path / "classifier.pt")
    with pytest.raises(InputError, match="not a segmenter checkpoint .*a classifier checkpoint"):
        load_segmenter(tmp_path / "classifier.pt")
    with pytest.raises(InputError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------ compilable


def test_prepared_forward_traces_without_a_graph_break_in_the_head_or_the_upsampling():
    """`Segmenter.prepare` builds every interpolation matrix outside the traced path: dynamo then traces
    the backbone, the head and the upsampling of the logits in one graph (train and eval), at a size that
    needs padding too."""
    import torch._dynamo

    torch.manual_seed(0)
    model = Segmenter("pool", hidden=16, stride=2).eval()
    breaks = []
    for shape, train in (((2, 3, 64, 64), False), ((1, 3, 50, 70), False), ((2, 3, 64, 64), True)):
        torch._dynamo.reset()
        model.train(train).prepare(shape[-2:])
        explained = torch._dynamo.explain(model)(torch.rand(*shape) * 255)
        breaks += [str(r.user_stack[-1].filename) if r.user_stack else "?" for r in explained.break_reasons]
    assert not breaks, breaks  # nothing in backbone.py, segmenter.py or head.py breaks the graph


def test_prepared_unprepared_and_compiled_forwards_agree():
    torch.manual_seed(0)
    model = Segmenter("pool", hidden=16, stride=2).eval()
    x = torch.rand(2, 3, 50, 70) * 255
    with torch.no_grad():
        fresh = model(x)  # builds its matrices on first use
        model._up_cache.clear()
        model.head._tap_cache.clear()
        model.prepare((50, 70))
        n_taps = len(model.head._tap_cache)
        assert n_taps and model._up_cache
        assert torch.equal(model(x), fresh)
        assert len(model.head._tap_cache) == n_taps  # the forward built nothing
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")  # dynamo's trace, no code generation
        assert torch.equal(compiled(x), fresh)


@pytest.mark.parametrize("scheme_name", ["binary", "border", "contact"])
def test_building_and_seed_sums_the_scheme_classes(scheme_name):
    from footprints.model.segmenter import building_and_seed
    from footprints.scenes.targets import SCHEMES

    scheme = SCHEMES[scheme_name]
    logits = torch.randn(3, scheme.k, 9, 7)
    p = torch.softmax(logits, 1)
    want = [p[:, list(scheme.building)].sum(1)]
    if scheme.seed != scheme.building:
        want.append(p[:, list(scheme.seed)].sum(1))
    got = building_and_seed(logits, scheme)
    assert got.shape == (3, len(want), 9, 7)
    torch.testing.assert_close(got, torch.stack(want, 1), rtol=0, atol=1e-7)
