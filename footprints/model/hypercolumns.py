"""Zoom-out hypercolumns of sampled pixels (pure functions; the `features` stage is `footprints.stages.features`).

`sample_pixels` draws class-balanced pixels from a patch mask; `gather_hypercolumns` reads only those
pixels' columns from each backbone activation with the bilinear weights of
`F.interpolate(mode="bilinear", align_corners=False)` to the patch size, so the full-resolution
hypercolumn of a patch (4,227 x 256 x 256 floats) is never built; `RunningStats` merges per-channel
statistics of many shards (Chan et al.'s parallel update).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from .resample import bilinear_source


def sample_pixels(mask: np.ndarray, per_class: int, rng: np.random.Generator,
                  n_classes: int = 2) -> tuple[np.ndarray, ...]:
    """Draw up to `per_class` pixels of each class (0 .. n_classes - 1) from `mask` without replacement.

    Pixels of any other value (255 = nodata/padding) are never drawn. A class with fewer pixels than
    `per_class` gives all of them. Returns `(rows, cols, labels)`, int64 arrays.
    """
    if mask.ndim != 2:
        raise ValueError(f"sample_pixels: expected a 2-D mask, got shape {mask.shape}")
    flat = mask.reshape(-1)
    width = mask.shape[1]
    picked: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for cls in range(n_classes):
        idx = np.flatnonzero(flat == cls)
        k = min(per_class, idx.size)
        if k == 0:
            continue
        picked.append(rng.choice(idx, size=k, replace=False))
        labels.append(np.full(k, cls, dtype=np.int64))
    if not picked:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    flat_idx = np.concatenate(picked).astype(np.int64)
    return flat_idx // width, flat_idx % width, np.concatenate(labels)


def gather_hypercolumns(
    activations: dict[str, torch.Tensor],
    layers: Sequence[str],
    rows: torch.Tensor | np.ndarray,
    cols: torch.Tensor | np.ndarray,
    size: int | tuple[int, int],
    batch: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Hypercolumns (n, C) of the pixels (rows[i], cols[i]) of image batch[i], never the full grid.

    `activations[name]` is (B, C_l, h_l, w_l) (or (C_l, h_l, w_l) for one image, then `batch` is None);
    each is read at the position it would have after `F.interpolate(..., size=size, mode="bilinear",
    align_corners=False)`, by blending its four neighbours, and the layers are concatenated in `layers`
    order. The result is on the activations' device, in their dtype.

    The four neighbours of an image's samples are read with one `index_select` per image: rows of its
    (h * w, C) view for channels-last activations (a pixel's channels are contiguous: a few cache lines per
    sample, the layout the features stage runs the backbone in), else columns of its (C, h * w) view. An
    advanced index `act[b, :, y, x]` on NCHW activations misses the cache once per channel and was most of
    the features stage's time beside the backbone.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    first = activations[layers[0]]
    device = first.device
    rows_t = torch.as_tensor(rows, device=device).long()
    cols_t = torch.as_tensor(cols, device=device).long()
    n = int(rows_t.numel())
    b_host = np.zeros(n, dtype=np.int64) if batch is None else np.asarray(torch.as_tensor(batch).cpu(), np.int64)
    groups = [(int(b), torch.as_tensor(np.flatnonzero(b_host == b), device=device)) for b in np.unique(b_host)]
    cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    parts = []
    for name in layers:
        act = activations[name]
        if act.dim() == 3:
            act = act.unsqueeze(0)
        h, w = act.shape[-2:]
        if (h, w) not in cache:
            y0, y1, fy = bilinear_source(rows_t, h, out_h)
            x0, x1, fx = bilinear_source(cols_t, w, out_w)
            corners = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])  # (4, n)
            cache[(h, w)] = (corners, fy, fx)
        corners, fy, fx = cache[(h, w)]
        nhwc = act.shape[1] > 1 and act.is_contiguous(memory_format=torch.channels_last)
        if nhwc:  # a pixel's channels are contiguous: one row per corner
            flat = act.permute(0, 2, 3, 1).reshape(act.shape[0], h * w, act.shape[1])
        else:
            flat = act.reshape(act.shape[0], act.shape[1], h * w)
        out = act.new_empty((n, act.shape[1]))
        for b, sel in groups:
            m = int(sel.numel())
            fxs, fys = fx[sel], fy[sel]
            if nhwc:
                v = flat[b].index_select(0, corners[:, sel].reshape(-1)).view(4, m, -1)  # (4, m, C)
                fxs, fys = fxs[:, None], fys[:, None]
            else:
                v = flat[b].index_select(1, corners[:, sel].reshape(-1)).view(-1, 4, m).transpose(0, 1)  # (4, C, m)
            top = v[0] * (1 - fxs).to(act.dtype) + v[1] * fxs.to(act.dtype)
            bottom = v[2] * (1 - fxs).to(act.dtype) + v[3] * fxs.to(act.dtype)
            res = top * (1 - fys).to(act.dtype) + bottom * fys.to(act.dtype)
            out[sel] = res if nhwc else res.t()
        parts.append(out)
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------------
# streaming statistics


class RunningStats:
    """Per-channel count, mean and sum of squared deviations in float64, mergeable (Chan et al. 1979)."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add the rows of `x` (n, C)."""
        if len(x) == 0:
            return
        x64 = np.asarray(x, dtype=np.float64)
        mean = x64.mean(axis=0)
        m2 = ((x64 - mean) ** 2).sum(axis=0)
        self.merge(len(x64), mean, m2)

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge another partial (n, mean, m2) into this one."""
        n = int(n)
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0)."""
        return np.sqrt(self.m2 / max(self.n, 1))




def patch_rng(seed: int, patch_id: str) -> np.random.Generator:
    """The sampling RNG of one patch: depends only on the run seed and the patch id."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(patch_id).encode())])

