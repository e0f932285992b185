"""VGG16 backbone: torchvision key compatibility, weight sources, normalisation, layers, frozen."""

from __future__ import annotations

import logging

import pytest
import torch

from footprints.errors import FootprintsError, InputError
from footprints.model.backbone import (
    CONV_LAYERS,
    LAYER_CHANNELS,
    LAYER_SCALE,
    VGG16Features,
    hypercolumn_channels,
    load_backbone,
    resolve_layers,
)

# torchvision.models.vgg16().features: conv modules at these indices, (out, in) channels
TV_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
            14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
            28: (512, 512)}


def _torchvision_state() -> dict[str, torch.Tensor]:
    """A state dict with torchvision's keys and shapes, built by hand (no torchvision here)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (out, inp) in TV_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(out, inp, 3, 3, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.randn(out, generator=g) * 0.01
    return state


def test_keys_and_shapes_are_torchvisions():
    model = VGG16Features()
    state = model.state_dict()  # buffers are non-persistent: exactly torchvision's 26 keys
    expected = {k: (v.shape) for k, v in _torchvision_state().items()}
    assert {k: v.shape for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == 14_714_688


def test_torchvision_state_dict_loads_unchanged(tmp_path):
    state = _torchvision_state()
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    model = load_backbone(str(path), "torchvision")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # frozen, eval mode
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # a state dict without the "features." prefix (as saved from vgg.features) loads too
    torch.save({k.removeprefix("features."): v for k, v in state.items()}, tmp_path / "bare.pth")
    bare = load_backbone(str(tmp_path / "bare.pth"), "torchvision")
    assert torch.equal(bare.features[28].weight, state["features.28.weight"])


def test_bad_weights_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_backbone(str(tmp_path / "missing.pth"), "caffe")
    state = _torchvision_state()
    state["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="does not fit VGG16") as err:
        load_backbone(str(tmp_path / "wrong.pth"), "caffe")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a loadable state dict"):
        load_backbone(str(tmp_path / "junk.pth"), "caffe")


def test_imagenet_without_torchvision_is_a_clear_error():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no torchvision here
        with pytest.raises(FootprintsError, match="state-dict path"):
            load_backbone("imagenet", "torchvision")
    else:  # pragma: no cover - only where torchvision imports
        pytest.skip("torchvision imports here")


def test_random_weights_warn_and_are_the_same_in_every_process(caplog):
    with caplog.at_level(logging.WARNING):
        a = load_backbone("random", "torchvision")
    assert "RANDOM" in caplog.text
    b = load_backbone("random", "torchvision")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # not the default PyTorch init (whose activations fade with depth): biases are zero
    assert all(float(a.features[i].bias.abs().sum()) == 0 for i in TV_CONVS)


def test_normalizations():
    rgb = torch.full((1, 3, 2, 2), 128.0)
    caffe = VGG16Features("caffe").normalize(rgb)
    assert torch.allclose(caffe[0, :, 0, 0], torch.tensor([128 - 123.68, 128 - 116.779, 128 - 103.939]))
    tv = VGG16Features("torchvision").normalize(rgb)
    want = (torch.tensor([128 / 255.0] * 3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(tv[0, :, 0, 0], want, atol=1e-6)
    with pytest.raises(FootprintsError):
        VGG16Features("bgr")


def test_layers_resolutions_and_presets():
    assert resolve_layers("all") == ["input", *CONV_LAYERS]
    assert hypercolumn_channels(resolve_layers("all")) == 4227
    assert resolve_layers("pool") == ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"]
    assert resolve_layers(["conv3_1", "input", "conv3_1"]) == ["input", "conv3_1"]  # ordered, deduplicated
    with pytest.raises(FootprintsError):
        resolve_layers(["conv6_1"])
    model = load_backbone("random", "torchvision")
    with torch.no_grad():
        acts = model(torch.rand(1, 3, 32, 32) * 255, resolve_layers("all"))
    for name, act in acts.items():
        assert act.shape == (1, LAYER_CHANNELS[name], 32 // LAYER_SCALE[name], 32 // LAYER_SCALE[name]), name
        if name != "input":
            assert float(act.min()) >= 0  # after ReLU


def test_shared_weights_load(vgg_weights):
    model = load_backbone(str(vgg_weights), "caffe")
    assert model.normalization == "caffe"
    assert sum(p.numel() for p in model.parameters()) == 14_714_688
    with torch.no_grad():
        acts = model(torch.rand(1, 3, 32, 32) * 255, ["conv5_3"])
    assert acts["conv5_3"].shape == (1, 512, 2, 2) and torch.isfinite(acts["conv5_3"]).all()
