"""The dense segmenter: VGG16 backbone + the factorised 1x1-conv head + upsampling of the logits.

`segmenter_from_classifier` converts a trained classifier (train-classifier/best.pt) exactly;
`build_segmenter(meta)` rebuilds the architecture from a checkpoint's `meta`; `load_segmenter(path)`
gives a model ready for prediction. `model(rgb)` takes RGB floats in 0..255, (B, 3, H, W), and returns
logits (B, 2, H, W) at the input size. H and W that are not multiples of 16 (VGG's four poolings) are
padded inside with 0 (the tiles' nodata value) at the bottom/right and the output cropped back, so
predictions near such an edge see black padding, as edge tiles do in training.

Compilable: `model.prepare(size, device)` builds every interpolation matrix a forward at that input size
needs (the head's sampling taps, the logits' upsampling) outside any traced path; a forward then only
looks them up, so `torch.compile(model)` traces `Segmenter.forward` without a graph break in the head or
the upsampling (a size not prepared is built on first use, by a function dynamo does not trace).
`compile_segmenter` prepares and compiles (the `segmenter.compile` / `predict.compile` options).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..contracts.checkpoints import REQUIRED, load_checkpoint
from ..errors import InputError
from ..scenes.targets import SCHEMES, ClassScheme, scheme_for
from .backbone import LAYER_SCALE, VGG16Features, hypercolumn_channels, load_backbone, resolve_layers
from .head import DenseHead, grid_len, remember, upsample_grid, upsample_taps
from .mlp import mlp_from_checkpoint

log = logging.getLogger(__name__)

PAD_MULTIPLE = 16  # 2**4 poolings before conv5


class Segmenter(nn.Module):
    """VGG16Features (frozen by default) -> DenseHead on the evaluated grid -> logits at input size."""

    def __init__(
        self,
        layers: Any = "all",
        hidden: int = 1024,
        stride: int = 2,
        normalization: str = "torchvision",
        dropout: float = 0.5,
        num_classes: int = 2,
        train_backbone: bool = False,
        backbone: VGG16Features | None = None,
    ):
        super().__init__()
        self.layers = resolve_layers(layers)
        self.backbone = backbone if backbone is not None else VGG16Features(normalization)
        self.head = DenseHead(self.layers, hidden, stride, dropout, num_classes)
        self.train_backbone = bool(train_backbone)
        self.backbone.requires_grad_(self.train_backbone)
        if not self.train_backbone:
            self.backbone.eval()
        # upsampling taps of the logits per (grid and output sizes, device, dtype); see `prepare`
        self._up_cache: dict[tuple, tuple[Any, Any]] = {}

    def train(self, mode: bool = True) -> Segmenter:
        """Like nn.Module.train, but a frozen backbone stays in eval mode."""
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser should update: the head, plus the backbone when `train_backbone`."""
        return [p for p in self.parameters() if p.requires_grad]

    def features(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone activations of the layers the head reads (no autograd graph when frozen)."""
        if self.train_backbone:
            return self.backbone(rgb, self.layers)
        with torch.no_grad():
            return self.backbone(rgb, self.layers)

    def grid_logits(self, rgb: torch.Tensor) -> torch.Tensor:
        """Logits on the evaluated grid (node k at pixel k*stride**2) of an input whose H, W are multiples
        of 16; the values the MLP would give on those pixels' hypercolumns."""
        size = (int(rgb.shape[-2]), int(rgb.shape[-1]))
        return self.head(self.features(rgb), size)

    def _up_taps(self, grid: tuple[int, int], size: tuple[int, int], ref: torch.Tensor) -> tuple[Any, Any]:
        taps = self._up_cache.get((grid, size, ref.device, ref.dtype))
        if taps is None:
            taps = self._build_up_taps(grid, size, ref.device, ref.dtype)
        return taps

    @torch.compiler.disable
    def _build_up_taps(self, grid: tuple[int, int], size: tuple[int, int], device: torch.device,
                       dtype: torch.dtype) -> tuple[Any, Any]:
        step = self.head.grid_step
        taps = tuple(t if isinstance(t, slice) else t.to(device=device, dtype=dtype)
                     for t in (upsample_taps(grid[0], size[0], step), upsample_taps(grid[1], size[1], step)))
        return remember(self._up_cache, (grid, size, device, dtype), taps)

    def prepare(self, size: tuple[int, int], device: torch.device | str | None = None,
                dtypes: Any = None) -> Segmenter:
        """Build the interpolation matrices of inputs of `size` (H, W) on `device` (default: the model's) for
        float32 and, on CUDA, the autocast dtypes, so that no forward (compiled or not) builds any."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if dtypes is None:
            dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
        h, w = size[0] + (-size[0] % PAD_MULTIPLE), size[1] + (-size[1] % PAD_MULTIPLE)
        resolutions = sorted({(h // LAYER_SCALE[n], w // LAYER_SCALE[n]) for n in self.layers})
        self.head.prepare((h, w), resolutions, device, dtypes)
        grid = (grid_len(h, self.head.stride), grid_len(w, self.head.stride))
        for dtype in dtypes:
            self._up_taps(grid, (h, w), torch.empty(0, device=device, dtype=dtype))
        return self

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"Segmenter expects (B, 3, H, W) RGB in 0..255, got shape {tuple(rgb.shape)}")
        h, w = int(rgb.shape[-2]), int(rgb.shape[-1])
        ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
        x = F.pad(rgb, (0, pw, 0, ph)) if ph or pw else rgb
        g = self.grid_logits(x)
        size = (h + ph, w + pw)
        logits = upsample_grid(g, size, self.head.grid_step, self._up_taps((g.shape[-2], g.shape[-1]), size, g))
        return logits[..., :h, :w] if ph or pw else logits


def build_segmenter(meta: Mapping[str, Any], train_backbone: bool | None = None) -> Segmenter:
    """The architecture described by a checkpoint's `meta` (weights left at their initial values).

    `train_backbone` None takes `meta["train_backbone"]` (default False).
    """
    if train_backbone is None:
        train_backbone = bool(meta.get("train_backbone", False))
    backbone = meta.get("backbone") or {}
    layers = resolve_layers(meta["layers"])
    if "in_channels" in meta and int(meta["in_channels"]) != hypercolumn_channels(layers):
        raise ValueError(f"meta: in_channels {meta['in_channels']} does not match layers {layers}")
    return Segmenter(
        layers=layers,
        hidden=int(meta.get("hidden", 1024)),
        stride=int(meta.get("stride", 2)),
        normalization=str(backbone.get("normalization", "torchvision")),
        dropout=float(meta.get("dropout", 0.5)),
        num_classes=int(meta.get("num_classes", 2)),
        train_backbone=train_backbone,
    )


def segmenter_from_classifier(
    ckpt: Mapping[str, Any] | str | Path,
    stride: int = 2,
    train_backbone: bool = False,
    device: str | torch.device = "cpu",
    where: Path | None = None,
) -> tuple[Segmenter, dict[str, Any]]:
    """Exact conversion of a train-classifier checkpoint (dict or path) into a Segmenter, and its meta.

    The backbone gets the weights the features were computed with (`ckpt["backbone"]`); the MLP's
    layers become 1x1 convs with the normaliser folded into conv1 (`DenseHead.from_mlp`). `where`: the file
    a dict was loaded from, named by the errors.
    """
    if not isinstance(ckpt, Mapping):
        where = Path(ckpt)
        ckpt = load_checkpoint(where, kind="classifier")
    where = where if where is not None else Path("<classifier checkpoint>")
    missing = [k for k in REQUIRED["classifier"] if k not in ckpt]
    if missing:
        raise InputError(where, f"not a classifier checkpoint (missing {missing})")
    mlp = mlp_from_checkpoint(ckpt, where)
    hidden, dropout, in_channels = mlp.hidden, mlp.dropout_p, mlp.in_channels
    layers = resolve_layers(ckpt["layers"])
    bb = dict(ckpt["backbone"])
    backbone = load_backbone(str(bb.get("weights", "random")), str(bb.get("normalization", "torchvision")))
    model = Segmenter(layers, hidden, stride, backbone.normalization, dropout, mlp.fc3.out_features,
                      train_backbone=train_backbone, backbone=backbone)
    model.head = DenseHead.from_mlp(mlp, layers, stride)
    config = ckpt.get("config") or {}
    tile = config.get("tile") or {} if isinstance(config, Mapping) else {}
    meta = {
        "layers": layers,
        "in_channels": in_channels,
        "hidden": hidden,
        "stride": int(stride),
        "dropout": dropout,
        "num_classes": mlp.fc3.out_features,
        "classes": list(ckpt.get("classes") or SCHEMES["binary"].classes),
        "backbone": {"weights": str(bb.get("weights", "random")),
                     "normalization": str(bb.get("normalization", "torchvision"))},
        "target_gsd": tile.get("target_gsd"),
        "tile_size": tile.get("size"),
        "class_weights": [float(v) for v in ckpt.get("class_weights") or []] or None,
    }
    return model.to(device), meta


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """A train-segmenter checkpoint (`last.pt`/`best.pt`) -> (model in eval mode on `device`, meta)."""
    path = Path(path)
    ckpt = load_checkpoint(path, kind="segmenter")
    meta = dict(ckpt["meta"])
    model = build_segmenter(meta)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise InputError(path, f"weights do not fit the architecture in meta ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), meta


def compile_segmenter(model: Segmenter, size: tuple[int, int], device: torch.device | str | None = None) -> Any:
    """`torch.compile(model)` after preparing its interpolation matrices for inputs of `size`: the compiled
    forward traces no index maths (`Segmenter.prepare`)."""
    model.prepare(size, device)
    return torch.compile(model)


def scheme_of(meta: Mapping[str, Any]) -> ClassScheme:
    """The class scheme of a segmenter checkpoint's meta (checkpoints of before K classes: binary)."""
    return scheme_for(meta.get("classes"))


def building_and_seed(logits: torch.Tensor, scheme: ClassScheme) -> torch.Tensor:
    """(B, bands, H, W) probabilities from logits (B, K, H, W): band 0 the building probability (the sum of
    the building classes), band 1 the watershed seed score (the interior's probability) when the scheme
    has more classes than background and building. One softmax, then each band written in place (no
    gathered copies, no concatenation: this runs on every window of every scene)."""
    p = torch.softmax(logits.float(), dim=1)
    bands = 1 if scheme.seed == scheme.building else 2
    out = p.new_empty((p.shape[0], bands, *p.shape[2:]))
    for band, classes in enumerate((scheme.building, scheme.seed)[:bands]):
        if len(classes) == 1:
            out[:, band].copy_(p[:, classes[0]])
        else:
            torch.add(p[:, classes[0]], p[:, classes[1]], out=out[:, band])
            for k in classes[2:]:
                out[:, band].add_(p[:, k])
    return out
