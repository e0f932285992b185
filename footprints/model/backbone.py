"""VGG16's 13 conv layers with torchvision's parameter names, usable without torchvision.

`features.0.weight` ... `features.28.bias` match `torchvision.models.vgg16().features`, so a torchvision
state dict (or the near-ImageNet one in ../shared/weights) loads unchanged. Activations are taken after
each conv's ReLU, at the layer's own resolution; the zoom-out hypercolumn of a pixel is the
concatenation of those activations bilinearly upsampled to that pixel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import FootprintsError, InputError

log = logging.getLogger(__name__)

# (name, out_channels) of VGG16's conv layers; "M" is a 2x2 max pool
_VGG16_PLAN: list[tuple[str, int] | str] = [
    ("conv1_1", 64), ("conv1_2", 64), "M",
    ("conv2_1", 128), ("conv2_2", 128), "M",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "M",
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), "M",
]  # fmt: skip

CONV_LAYERS: list[str] = [p[0] for p in _VGG16_PLAN if p != "M"]
# channels and downsampling factor of every layer a hypercolumn can read; "input" is the normalised image
LAYER_CHANNELS: dict[str, int] = {"input": 3}
LAYER_SCALE: dict[str, int] = {"input": 1}
_scale = 1
for _p in _VGG16_PLAN:
    if _p == "M":
        _scale *= 2
    else:
        LAYER_CHANNELS[_p[0]] = _p[1]
        LAYER_SCALE[_p[0]] = _scale

LAYER_PRESETS: dict[str, list[str]] = {
    "all": ["input", *CONV_LAYERS],  # the seed project's 4,227 channels
    "pool": ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"],  # the layers before each pooling
    "shallow": ["conv1_2", "conv2_2", "conv3_3"],  # pool's first three: a roof's texture, not the block's layout
}

NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # (mean, std) applied to RGB in 0..255
    "torchvision": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "caffe": ((123.68, 116.779, 103.939), (1.0, 1.0, 1.0)),
}


def resolve_layers(spec: str | Sequence[str]) -> list[str]:
    """Turn a preset name or a list of layer names into the ordered list of layer names."""
    if isinstance(spec, str):
        if spec not in LAYER_PRESETS:
            raise FootprintsError(f"backbone.layers: unknown preset {spec!r} (use {sorted(LAYER_PRESETS)} or a list)")
        return list(LAYER_PRESETS[spec])
    names = list(spec)
    unknown = [n for n in names if n not in LAYER_CHANNELS]
    if unknown or not names:
        raise FootprintsError(f"backbone.layers: unknown layer(s) {unknown}; known: {list(LAYER_CHANNELS)}")
    order = list(LAYER_CHANNELS)
    return sorted(dict.fromkeys(names), key=order.index)


def hypercolumn_channels(layers: Sequence[str]) -> int:
    return sum(LAYER_CHANNELS[n] for n in layers)


class VGG16Features(nn.Module):
    """`features` laid out exactly as torchvision's vgg16().features, plus the input normalisation."""

    def __init__(self, normalization: str = "torchvision"):
        super().__init__()
        modules: list[nn.Module] = []
        self.conv_index: dict[str, int] = {}  # layer name -> index of its conv in `features`
        in_ch = 3
        for p in _VGG16_PLAN:
            if p == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                self.conv_index[p[0]] = len(modules)
                modules.append(nn.Conv2d(in_ch, p[1], kernel_size=3, padding=1))
                modules.append(nn.ReLU(inplace=True))
                in_ch = p[1]
        self.features = nn.Sequential(*modules)
        if normalization not in NORMALIZATION:
            raise FootprintsError(f"backbone.normalization: unknown {normalization!r} (use {sorted(NORMALIZATION)})")
        self.normalization = normalization
        mean, std = NORMALIZATION[normalization]
        # buffers are not in torchvision's state dict: persistent=False keeps the keys identical
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in 0..255 (any float dtype) -> the input the weights expect."""
        return (rgb - self.mean.to(rgb.dtype)) / self.std.to(rgb.dtype)

    def forward(self, rgb: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Activations (after ReLU) of `layers`, each at its own resolution; stops at the deepest one."""
        wanted = set(layers)
        out: dict[str, torch.Tensor] = {}
        x = self.normalize(rgb)
        if "input" in wanted:
            out["input"] = x
        stop = -1  # the deepest conv wanted (a plain loop: `max(generator, default=)` breaks torch.compile's graph)
        for name in layers:
            if name != "input":
                stop = max(stop, self.conv_index[name])
        by_relu = {i + 1: n for n, i in self.conv_index.items()}
        for i, module in enumerate(self.features):
            if i > stop + 1:
                break
            x = module(x)
            name = by_relu.get(i)
            if name in wanted:
                out[name] = x
        return out


def load_backbone(weights: str, normalization: str, device: str | torch.device = "cpu") -> VGG16Features:
    """Build the frozen backbone in eval mode with weights `imagenet`, `random` or a state-dict path."""
    model = VGG16Features(normalization)
    if weights == "random":
        log.warning(
            "BACKBONE WEIGHTS ARE RANDOM: hypercolumns carry no ImageNet knowledge; metrics are not comparable"
        )
        _init_random(model)
    elif weights == "imagenet":
        model.features.load_state_dict(_torchvision_imagenet_features())
    else:
        path = Path(weights)
        if not path.is_file():
            raise InputError(path, "backbone weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise InputError(path, f"not a loadable state dict ({type(err).__name__}: {err})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.") or k[0].isdigit()}
        try:
            model.features.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise InputError(path, f"state dict does not fit VGG16 features ({first})") from None
    model.requires_grad_(False)
    return model.eval().to(device)


def _used_keys(model: VGG16Features, layers: Sequence[str]) -> list[str]:
    """The keys of `model.features`' state dict that `layers` depend on: every module up to the deepest conv
    of `layers` (none for the input alone)."""
    convs = [model.conv_index[n] for n in layers if n != "input"]
    last = max(convs) if convs else -1
    return [k for k in model.features.state_dict() if int(k.split(".")[0]) <= last]


def features_state(model: VGG16Features, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The `features` parameters that `layers` depend on (those up to the deepest of them): what a model
    that reads only those layers must carry to be used without the weights file (conv1_1-conv3_3: 7 MB)."""
    state = model.features.state_dict()
    return {k: state[k].detach().cpu().clone() for k in _used_keys(model, layers)}


def backbone_from_state(state: dict[str, torch.Tensor], layers: Sequence[str], normalization: str,
                        where: str | Path, device: str | torch.device = "cpu") -> VGG16Features:
    """The frozen backbone of `features_state`; the deeper layers, never run for `layers`, stay unset."""
    model = VGG16Features(normalization)
    needed = _used_keys(model, layers)
    missing = sorted(set(needed) - set(state))
    if missing:
        raise InputError(Path(where), f"the backbone in the checkpoint lacks {missing[:3]}")
    try:
        model.features.load_state_dict({k: state[k] for k in needed}, strict=False)
    except RuntimeError as err:
        raise InputError(Path(where), f"the backbone in the checkpoint does not fit VGG16 ({str(err).splitlines()[0]})") from None
    model.requires_grad_(False)
    return model.eval().to(device)


RANDOM_WEIGHTS_SEED = 0


def _init_random(model: VGG16Features, seed: int = RANDOM_WEIGHTS_SEED) -> None:
    """torchvision's VGG init (Kaiming normal, fan_out; zero bias) from a fixed seed.

    Every stage and process that asks for `random` must get the same backbone, or the classifier trained
    on the features stage's hypercolumns would meet different ones in train-segmenter and predict.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            nn.init.zeros_(module.bias)


def _torchvision_imagenet_features() -> dict[str, torch.Tensor]:
    try:
        from torchvision.models import VGG16_Weights, vgg16
    except Exception as err:  # noqa: BLE001 - torchvision fails in many ways with a CPU-only torch
        raise FootprintsError(
            "backbone.weights: 'imagenet' needs torchvision, which does not import here "
            f"({type(err).__name__}); set backbone.weights to a state-dict path (e.g. ../shared/weights/"
            "vgg16_features_rgb_caffe.pth with backbone.normalization: caffe) or to 'random'"
        ) from None
    try:
        net = vgg16(weights=VGG16_Weights.IMAGENET1K_V1)
    except Exception as err:  # noqa: BLE001 - no network, no cache
        raise FootprintsError(
            f"backbone.weights: torchvision could not provide IMAGENET1K_V1 ({type(err).__name__}: {err}); "
            "put the file in torch's cache or give a state-dict path"
        ) from None
    return net.features.state_dict()
