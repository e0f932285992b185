"""Tiny real segmenter checkpoints for tests of the predict stage, written with the project's checkpoint writer.

`red_checkpoint(folder)` writes `folder/red.pt`: a real `Segmenter` checkpoint (loaded by predict like any
trained one, fingerprinted by its bytes) whose building probability is the pixel's red value / 255, the
stand-in model `RedModel` of tests/test_inference.py, so that a test paints a building red where it wants one.

How: the head reads only the `input` layer (the normalised image) at stride 1 (every pixel its own node, no
upsampling), so the model is pointwise. Its hidden units are ReLU knots `relu(red - k)`, and conv3 sums them
into a piecewise-linear logit through `logit(k / 255)` at each knot `k`; the knots are chosen so that the
probability stays within a quarter of a uint8 step of red / 255 at every 8-bit value, hence the stored
(uint8) probability raster is the one `RedModel` gives (tests/test_predict.py checks it). The backbone's
weights are never read (the first VGG conv runs, its output is unused): they are stored as zeros that share
one element of storage, so the file is a few kB instead of VGG16's 58 MB.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from footprints.contracts.checkpoints import save_checkpoint
from footprints.model.backbone import NORMALIZATION
from footprints.model.segmenter import Segmenter, build_segmenter

TILE = 64  # the checkpoint's tile size: the prediction windows of the predict tests
EPS = 1e-6  # RedModel clamps p to [EPS, 1 - EPS]
MARGIN = 0.25  # of a uint8 step: the most the knots' interpolation may differ from red / 255


def _logit(red: np.ndarray) -> np.ndarray:
    p = np.clip(red / 255.0, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def knots() -> list[int]:
    """Red values where the logit is exact: each segment between two knots is as long as the interpolated
    probability stays within MARGIN uint8 steps of red / 255 at every integer red value on it."""
    red = np.arange(256.0)
    logit = _logit(red)

    def fits(a: int, b: int) -> bool:
        r = red[a : b + 1]
        p = 1 / (1 + np.exp(-(logit[a] + (logit[b] - logit[a]) * (r - a) / (b - a))))
        return bool(np.all(np.abs(p * 255 - r) < MARGIN))

    out, a = [0], 0
    while a < 255:
        b = a + 1
        while b < 255 and fits(a, b + 1):
            b += 1
        out.append(b)
        a = b
    return out


def red_segmenter() -> tuple[Segmenter, dict[str, Any]]:
    """The segmenter (eval mode) and its checkpoint meta."""
    ks = knots()
    hidden = len(ks) - 1  # one unit per segment: relu(red - k) for each knot but the last
    meta = {"layers": ["input"], "in_channels": 3, "hidden": hidden, "stride": 1, "dropout": 0.0,
            "backbone": {"weights": "random", "normalization": "torchvision"}, "target_gsd": None,
            "tile_size": TILE}
    model = build_segmenter(meta)
    k = torch.tensor(ks, dtype=torch.float64)
    logit = torch.from_numpy(_logit(k.numpy()))
    slopes = torch.diff(logit) / torch.diff(k)  # of each segment
    # conv3's weights: the first segment's slope, then each knot's change of slope
    weights = torch.cat([slopes[:1], torch.diff(slopes)])
    mean, std = NORMALIZATION["torchvision"]
    head = model.head
    with torch.no_grad():
        # the input layer is (red - mean) / std: conv1 undoes it and subtracts the knot
        head.conv1.weight.zero_()
        head.conv1.weight[:, 0, 0, 0] = std[0]
        head.conv1.bias.copy_(mean[0] - k[:-1])
        head.conv2.weight.copy_(torch.eye(hidden)[:, :, None, None])  # ReLU of non-negative values: identity
        head.conv2.bias.zero_()
        head.conv3.weight.zero_()  # background logit 0, building logit the interpolated logit(red / 255)
        head.conv3.weight[1, :, 0, 0] = weights.float()
        head.conv3.bias.zero_()
        head.conv3.bias[1] = float(logit[0])
    return model.eval(), meta


@lru_cache(maxsize=1)
def _red_state() -> dict[str, Any]:
    model, meta = red_segmenter()
    state = {name: torch.zeros((), dtype=t.dtype).expand(t.shape) if name.startswith("backbone.") else t
             for name, t in model.state_dict().items()}
    return {"model": state, "meta": meta, "config": {}}


def red_checkpoint(folder: Path) -> Path:
    """`folder/red.pt`, written (atomically, by `save_checkpoint`) unless it is there already."""
    path = folder / "red.pt"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, _red_state())
    return path


def sibling_folder(tmp_path: Path) -> Path:
    """A folder beside a test's `tmp_path` (`<tmp_path>-model`), for a checkpoint the test must not see among
    its own files (tests that list or snapshot `tmp_path`); pytest removes it with `tmp_path`'s parent."""
    return tmp_path.with_name(f"{tmp_path.name}-model")
