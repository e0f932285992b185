"""The dense head of the segmenter: the per-pixel MLP as 1x1 convolutions, without the hypercolumn.

The seed's head upsamples every backbone activation to the patch size, concatenates them (4,227
channels), normalises, and applies conv1 (1x1, stride s) -> ReLU -> dropout -> conv2 (1x1, stride s) ->
ReLU -> dropout -> conv3 (1x1). With stride s only the patch pixels (s*s*i, s*s*j) ever reach conv3: the
"evaluated grid" (64x64 of a 256 px patch for s=2). Both the bilinear upsampling and a 1x1 convolution
are linear, so

    W1 . concat_i(up(f_i)) = sum_i up(W1_i . f_i)            (W1_i = the columns of W1 reading layer i)

and `DenseHead` computes the first layer only on the evaluated grid, per layer, in whichever order is
cheaper: layers at least as dense as the grid (input .. conv3_x for s=2) are sampled first, with the
bilinear weights of exactly the source pixels `F.interpolate(size=patch, mode="bilinear",
align_corners=False)` would use, and projected in one GEMM; coarser layers (conv4_x at 32x32, conv5_x
at 16x16) are projected at their own resolution, one GEMM per resolution, and only those 1024-channel
sums are sampled. conv2 and conv3 then run on the grid. The feature normaliser (x - mean) / std is
folded into conv1's weights and bias at every forward (`folded_conv1`), not into its parameters: conv1
keeps the MLP's fc1 in standardised units, so that dense training takes steps of the size the MLP's
training took. Folded parameters diverge: Adam moves every weight by about lr, which in standardised
units is lr x std, and hypercolumn channel stds on real imagery span many orders of magnitude (the
features stage's `stats.npz` holds them: compare the smallest and largest `std`); with folded
parameters the dense loss rose where standardised ones lowered it (train-segmenter's `history.json`
has `train_loss` per epoch; configs/xview2-joplin.md keeps the figures). `NaiveHead` is the
straightforward reference (the seed's head); tests prove both give the same numbers and gradients.

Layout, for speed on CPU: everything after the backbone is channels last, a (positions, channels)
row-major matrix with positions = B x n_rows x n_cols, so each layer is a single `addmm` (bias fused)
with the `nn.Conv2d` weights viewed as matrices (state dict unchanged, gradients land in them); the
1024-channel sums of the coarse layers are resampled by small GEMMs with cached per-axis
interpolation matrices over contiguous rows of channels (gathers and their index_add backward are much
slower: see `_resample`); ReLUs run in place. What remains is ~212 GFLOP of large GEMMs per
forward + backward (conv2 ~102, conv1 ~110), no frozen-activation gradient is computed.

The naive head's cost is conv1 on the full 128x128 output of its first stride-2 conv over the
4,227-channel hypercolumn (~1,100 GFLOP forward + weight gradient), and its memory the hypercolumn itself.
`footprints bench head` (`footprints.benchmarks.head`) measures both heads on one input (4 patches x 4,227
channels x 256 px, hidden 1024, forward + backward) and prints the speed-up, the peak-memory ratio and
how far the logits differ; run it on an otherwise idle machine, since other jobs make the ratio swing.
The README's throughput table keeps the latest figures.

Compilable: the per-axis interpolation matrices are looked up in `_tap_cache` by (axis size, source
pixels, device, dtype), built outside any traced path (`prepare`, or on first use by a function dynamo
does not trace), and every size is plain integer arithmetic (`grid_len`): `torch.compile` traces the
forward and backward with no graph break and no data-dependent branch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import LAYER_CHANNELS, hypercolumn_channels, resolve_layers
from .mlp import MLP
from .resample import bilinear_source

log = logging.getLogger(__name__)

__all__ = [
    "DenseHead",
    "NaiveHead",
    "evaluated_positions",
    "grid_len",
    "sample_bilinear",
    "upsample_grid",
    "upsample_taps",
]


# ----------------------------------------------------------------------------------------------------
# geometry


TAP_CACHE_SIZE = 64


def remember(cache: dict, key: tuple, value: Any) -> Any:
    """Store `value` in a cache of resampling taps and return it. Emptied when full: prediction on scenes of
    many odd sizes meets many shapes, and a handful are in use at any time."""
    if len(cache) >= TAP_CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def evaluated_positions(size: int, stride: int) -> torch.Tensor:
    """Patch pixel indices (along one axis) that conv1 (stride s) followed by conv2 (stride s) read.

    conv1 reads 0, s, 2s, ... (ceil(size/s) outputs); conv2 reads every s-th of those.
    """
    n1 = (size - 1) // stride + 1
    n2 = (n1 - 1) // stride + 1
    return torch.arange(n2, dtype=torch.long) * (stride * stride)


_Taps = slice | torch.Tensor


def _axis_taps(out_positions: torch.Tensor, n_in: int, n_out: int, device: torch.device,
               dtype: torch.dtype) -> _Taps:
    """`_axis_resampler` for sampling one axis at `out_positions` of its bilinear upsampling from n_in
    to n_out pixels, its matrix on `device` in `dtype`."""
    r = _axis_resampler(*bilinear_source(out_positions, n_in, n_out), n_in)
    return r if isinstance(r, slice) else r.to(device=device, dtype=dtype)


def grid_len(size: int, stride: int) -> int:
    """len(evaluated_positions(size, stride)), in integer arithmetic (no tensor: nothing to trace)."""
    n1 = (size - 1) // stride + 1
    return (n1 - 1) // stride + 1


def _sample_axis(x: torch.Tensor, dim: int, taps: _Taps) -> torch.Tensor:
    """Resample dimension `dim` (not the last) of x with `_axis_taps` taps, as a GEMM on contiguous
    data: every dimension after `dim` is folded into the GEMM's columns (x must be contiguous from
    `dim` on), every one before it into its batch. Gathers (index_select) and their index_add
    backward are much slower on CPU for these tensors (see `_resample` for how to time them)."""
    if isinstance(taps, slice):
        return x[(slice(None),) * dim + (taps,)]
    lead, n_in, tail = x.shape[:dim], x.shape[dim], x.shape[dim + 1:]
    y = torch.matmul(taps, x.reshape(-1, n_in, math.prod(tail)))
    return y.view(*lead, taps.shape[0], *tail)


def _sample_last(x: torch.Tensor, taps: _Taps) -> torch.Tensor:
    """Resample the last dimension of x with `_axis_taps` taps (one GEMM over all other dims)."""
    if isinstance(taps, slice):
        return x[..., taps]
    return torch.matmul(x, taps.t())


def _axis_resampler(
    i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor, n_in: int
) -> slice | torch.Tensor:
    """How to resample one axis: a `slice` when every output hits an input pixel exactly at a constant
    step (full-resolution layers: a free view), else the dense (n_out, n_in) interpolation matrix
    (float64; a row holds 1 - lambda at i0 and lambda at i1)."""
    n_out = len(i0)
    if bool((lam == 0).all()):
        step = int(i0[1] - i0[0]) if n_out > 1 else 1
        if step > 0 and torch.equal(i0, i0[0] + step * torch.arange(n_out)):
            return slice(int(i0[0]), int(i0[0]) + step * (n_out - 1) + 1, step)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    k = torch.arange(n_out)
    m.index_put_((k, i0), 1 - lam, accumulate=True)
    m.index_put_((k, i1), lam, accumulate=True)
    return m


def _resample(x: torch.Tensor, rows: slice | torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
    """Apply per-axis resamplers to the last two dims of x (B, C, h, w).

    Matrices are applied as GEMMs (einsum): gathering along the last dimension with index_select and
    its index_add backward are much slower on CPU for (4, 1024, 64, 64) tensors (time forward + backward
    of both on such a tensor with `torch.utils.benchmark.Timer` to see by how much).
    """
    if isinstance(rows, slice):
        x = x[:, :, rows]
    if isinstance(cols, slice):
        x = x[:, :, :, cols]
    if isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor):
        r, c = rows.to(x), cols.to(x)
        # cheaper contraction order: shrink the axis that shrinks most first
        if r.shape[0] * x.shape[-1] <= x.shape[-2] * c.shape[0]:
            return torch.einsum("bcrw,sw->bcrs", torch.einsum("rh,bchw->bcrw", r, x), c)
        return torch.einsum("rh,bchs->bcrs", r, torch.einsum("bchw,sw->bchs", x, c))
    if isinstance(rows, torch.Tensor):
        return torch.einsum("rh,bchw->bcrw", rows.to(x), x)
    if isinstance(cols, torch.Tensor):
        return torch.einsum("bchw,sw->bchs", x, cols.to(x))
    return x


def sample_bilinear(
    f: torch.Tensor, out_size: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """`F.interpolate(f, size=out_size, mode="bilinear", align_corners=False)[..., rows, :][..., cols]`
    without computing the other pixels. f: (B, C, h, w) -> (B, C, len(rows), len(cols))."""
    h, w = f.shape[-2:]
    ry = _axis_resampler(*bilinear_source(rows, h, out_size[0]), h)
    cx = _axis_resampler(*bilinear_source(cols, w, out_size[1]), w)
    return _resample(f, ry, cx)


def upsample_taps(n_in: int, n_out: int, step: int) -> slice | torch.Tensor:
    """The resampler of one axis of `upsample_grid` (float64 matrix or slice): node k at pixel k*step,
    held beyond the last node."""
    src = (torch.arange(n_out, dtype=torch.float64) / step).clamp(max=n_in - 1)
    i0 = src.floor().long()
    return _axis_resampler(i0, (i0 + 1).clamp(max=n_in - 1), src - i0.to(torch.float64), n_in)


def upsample_grid(logits: torch.Tensor, size: tuple[int, int], step: int,
                  taps: tuple[slice | torch.Tensor, slice | torch.Tensor] | None = None) -> torch.Tensor:
    """Bilinear upsampling of values on the evaluated grid (node k at pixel k*step) to `size` pixels.

    The seed used `F.interpolate(size=...)`, which places node k at pixel k*step + (step-1)/2: every
    prediction shifted by 1.5 px for s=2. Here node k sits on the pixel it was computed from, so the
    output at an evaluated pixel is exactly the head's value there; beyond the last node the value is
    held (edge clamp). step=1 is the identity.

    `taps`: the two axes' resamplers already built (`upsample_taps`, on the logits' device and dtype), so that
    a traced caller builds nothing.
    """
    if step == 1 and tuple(logits.shape[-2:]) == tuple(size):
        return logits
    if taps is None:
        taps = (upsample_taps(logits.shape[-2], size[0], step), upsample_taps(logits.shape[-1], size[1], step))
    return _resample(logits, taps[0], taps[1])


# ----------------------------------------------------------------------------------------------------
# heads


class DenseHead(nn.Module):
    """The factorised head: hypercolumn layers -> hidden -> hidden -> classes on the evaluated grid.

    Parameters are three 1x1 `nn.Conv2d` (`conv1` holds the MLP's fc1, applied to standardised inputs) and
    the normaliser's `mean` and `std` buffers, folded into conv1 at each forward (`folded_conv1`).
    Checkpoints written before the buffers existed had the normaliser folded into conv1: they load with
    mean 0 and std 1, which is the same function.
    `forward(acts, size)` takes the backbone activations (each at its own resolution) of a patch of
    `size` pixels and returns logits on the evaluated grid, (B, classes, n_rows, n_cols).
    """

    def __init__(
        self,
        layers: Sequence[str],
        hidden: int = 1024,
        stride: int = 2,
        dropout: float = 0.5,
        num_classes: int = 2,
    ):
        super().__init__()
        if stride < 1:
            raise ValueError(f"segmenter.stride must be >= 1, got {stride}")
        self.layers = resolve_layers(list(layers))
        self.in_channels = hypercolumn_channels(self.layers)
        self.hidden = hidden
        self.stride = stride
        self.dropout_p = dropout
        self.num_classes = num_classes
        self.register_buffer("mean", torch.zeros(self.in_channels))
        self.register_buffer("std", torch.ones(self.in_channels))
        self.conv1 = nn.Conv2d(self.in_channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 1)
        self.conv3 = nn.Conv2d(hidden, num_classes, 1)
        self.dropout = nn.Dropout(dropout)
        offsets = [0]
        for name in self.layers:
            offsets.append(offsets[-1] + LAYER_CHANNELS[name])
        self._slices = {name: slice(offsets[k], offsets[k + 1]) for k, name in enumerate(self.layers)}
        # sampling taps per (axis size, source pixels, device, dtype): built once, outside any traced path
        self._tap_cache: dict[tuple, _Taps] = {}

    @property
    def grid_step(self) -> int:
        """Pixels between evaluated grid nodes (s*s)."""
        return self.stride * self.stride

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints of before the normaliser buffers: conv1 has it folded in, i.e. mean 0 and std 1
        for name, value in (("mean", self.mean), ("std", self.std)):
            state_dict.setdefault(prefix + name, torch.zeros_like(value) if name == "mean" else torch.ones_like(value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def folded_conv1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1 with the normaliser folded in, as a (hidden, C) matrix and a bias:
        W1 ((x - m) / s) + b1 = (W1 / s) x + (b1 - (W1 / s) m). Differentiable: gradients reach conv1."""
        w1 = self.conv1.weight.view(self.hidden, self.in_channels) / self.std.to(self.conv1.weight.dtype)
        b1 = self.conv1.bias - w1 @ self.mean.to(w1.dtype)
        return w1, b1

    @classmethod
    def from_mlp(cls, mlp: MLP, layers: Sequence[str], stride: int = 2) -> DenseHead:
        """Exact conversion: conv weights = fc weights, the normaliser's mean and std copied into the
        head's buffers (folded at forward time). The head is in the MLP's mode (train/eval)."""
        layers = resolve_layers(list(layers))
        if hypercolumn_channels(layers) != mlp.in_channels:
            raise ValueError(
                f"classifier has {mlp.in_channels} input channels, layers {layers} give "
                f"{hypercolumn_channels(layers)}"
            )
        head = cls(layers, mlp.hidden, stride, mlp.dropout_p, mlp.fc3.out_features)
        with torch.no_grad():
            head.mean.copy_(mlp.mean)
            head.std.copy_(mlp.std)
            head.conv1.weight.copy_(mlp.fc1.weight[:, :, None, None])
            head.conv1.bias.copy_(mlp.fc1.bias)
            head.conv2.weight.copy_(mlp.fc2.weight[:, :, None, None])
            head.conv2.bias.copy_(mlp.fc2.bias)
            head.conv3.weight.copy_(mlp.fc3.weight[:, :, None, None])
            head.conv3.bias.copy_(mlp.fc3.bias)
        return head.train(mlp.training)

    def _taps(self, axis_size: int, n_in: int, ref: torch.Tensor) -> _Taps:
        """The taps sampling one axis of a layer of `n_in` pixels at the evaluated positions of a patch axis of
        `axis_size` pixels, on `ref`'s device and dtype: a dictionary lookup once built (by `prepare` or the
        first call), so `torch.compile` traces no index maths and no data-dependent branch."""
        taps = self._tap_cache.get((axis_size, n_in, ref.device, ref.dtype))
        if taps is None:
            taps = self._build_taps(axis_size, n_in, ref.device, ref.dtype)
        return taps

    @torch.compiler.disable
    def _build_taps(self, axis_size: int, n_in: int, device: torch.device, dtype: torch.dtype) -> _Taps:
        positions = evaluated_positions(axis_size, self.stride)
        taps = _axis_taps(positions, n_in, axis_size, device, dtype)
        return remember(self._tap_cache, (axis_size, n_in, device, dtype), taps)

    def prepare(self, size: tuple[int, int], resolutions: Sequence[tuple[int, int]], device: torch.device | str,
                dtypes: Sequence[torch.dtype] = (torch.float32,)) -> None:
        """Build the taps for patches of `size` whose layers come at `resolutions` (h, w), for each dtype the
        activations may have (float32; the autocast dtype on CUDA): a compiled forward then only looks them up."""
        device = torch.device(device)
        for dtype in dtypes:
            ref = torch.empty(0, device=device, dtype=dtype)
            for h, w in resolutions:
                self._taps(size[0], h, ref)
                self._taps(size[1], w, ref)

    def _columns(self, w1: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The columns of W1 (hidden, C) reading `names`: a strided view when they are contiguous."""
        sls = [self._slices[n] for n in names]
        if all(a.stop == b.start for a, b in zip(sls, sls[1:], strict=False)):
            return w1[:, sls[0].start:sls[-1].stop]
        idx = torch.cat([torch.arange(sl.start, sl.stop) for sl in sls]).to(w1.device)
        return w1.index_select(1, idx)

    def first_layer(self, acts: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """conv1's pre-activation on the evaluated grid, channels last: (B * n_rows * n_cols, hidden).

        Layers at least as dense as the grid are sampled first (C_i channels) and projected together
        in one GEMM; coarser layers are projected at their own resolution, one GEMM per resolution
        (conv4_x, conv5_x) on their channels-last concatenation, and only those sums (hidden
        channels) are sampled.
        """
        n_r, n_c = grid_len(size[0], self.stride), grid_len(size[1], self.stride)
        w1, b1 = self.folded_conv1()
        groups: dict[tuple[int, int], list[str]] = {}  # resolution -> layers at it, in channel order
        for name in self.layers:
            f = acts[name]
            groups.setdefault((int(f.shape[-2]), int(f.shape[-1])), []).append(name)
        dense_names: list[str] = []
        dense_parts: list[torch.Tensor] = []
        coarse: list[torch.Tensor] = []
        for (h, w), names in groups.items():
            ref = acts[names[0]]
            ry = self._taps(size[0], h, ref)
            cx = self._taps(size[1], w, ref)
            if h * w >= n_r * n_c:
                # sample each layer (NCHW) to the grid; the concatenation below makes it channels last
                dense_names.extend(names)
                dense_parts.extend(_sample_last(_sample_axis(acts[n], 2, ry), cx).permute(0, 2, 3, 1)
                                   for n in names)
            else:
                x = torch.cat([acts[n].permute(0, 2, 3, 1) for n in names], dim=3)
                g = torch.mm(x.reshape(-1, x.shape[-1]), self._columns(w1, names).t())
                g = g.view(x.shape[0], h, w, self.hidden)
                coarse.append(_sample_axis(_sample_axis(g, 1, ry), 2, cx))
        z: torch.Tensor
        if dense_parts:
            x = dense_parts[0] if len(dense_parts) == 1 else torch.cat(dense_parts, dim=3)
            z = torch.addmm(b1, x.reshape(-1, x.shape[-1]), self._columns(w1, dense_names).t())
            for part in coarse:  # in place: addmm's output is saved by nobody
                z.add_(part.reshape(z.shape))
        else:
            z = coarse[0].reshape(-1, self.hidden) + b1
            for part in coarse[1:]:
                z.add_(part.reshape(z.shape))
        return z

    def forward(self, acts: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Logits on the evaluated grid, (B, classes, n_rows, n_cols).

        Every layer is one GEMM on a (positions, channels) matrix with the bias fused in (`addmm`);
        the conv weights are used as matrices through views, so their gradients land in the
        `nn.Conv2d` parameters. ReLUs are in place: their inputs are saved by no other op.
        """
        batch = next(iter(acts.values())).shape[0]
        n_r, n_c = grid_len(size[0], self.stride), grid_len(size[1], self.stride)
        h = self.dropout(torch.relu_(self.first_layer(acts, size)))
        w2 = self.conv2.weight.view(self.hidden, self.hidden)
        h = self.dropout(torch.relu_(torch.addmm(self.conv2.bias, h, w2.t())))
        w3 = self.conv3.weight.view(self.num_classes, self.hidden)
        out = torch.addmm(self.conv3.bias, h, w3.t())
        return out.view(batch, n_r, n_c, self.num_classes).permute(0, 3, 1, 2).contiguous()


class NaiveHead(nn.Module):
    """Reference: the seed's head, hypercolumn materialised. For tests and the benchmark only.

    upsample every layer to the patch size, concatenate, normalise by `mean`/`std` (buffers; 0 and 1
    when the weights already have them folded in), conv1 (stride s) -> ReLU -> dropout -> conv2
    (stride s) -> ReLU -> dropout -> conv3. Returns logits on the evaluated grid, like `DenseHead`.
    """

    def __init__(self, layers: Sequence[str], hidden: int = 1024, stride: int = 2, dropout: float = 0.5,
                 num_classes: int = 2):
        super().__init__()
        self.layers = resolve_layers(list(layers))
        c = hypercolumn_channels(self.layers)
        self.stride = stride
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("std", torch.ones(c))
        self.conv1 = nn.Conv2d(c, hidden, 1, stride=stride)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, stride=stride)
        self.conv3 = nn.Conv2d(hidden, num_classes, 1)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_mlp(cls, mlp: MLP, layers: Sequence[str], stride: int = 2) -> NaiveHead:
        """The seed's conversion: fc weights reshaped, normalisation kept as a separate step."""
        head = cls(layers, mlp.hidden, stride, mlp.dropout_p, mlp.fc3.out_features)
        with torch.no_grad():
            head.mean.copy_(mlp.mean)
            head.std.copy_(mlp.std)
            for k in (1, 2, 3):
                fc, conv = getattr(mlp, f"fc{k}"), getattr(head, f"conv{k}")
                conv.weight.copy_(fc.weight[:, :, None, None])
                conv.bias.copy_(fc.bias)
        return head.train(mlp.training)

    @classmethod
    def from_dense(cls, dense: DenseHead) -> NaiveHead:
        """Same parameter values, normaliser and mode as `dense`."""
        head = cls(dense.layers, dense.hidden, dense.stride, dense.dropout_p, dense.num_classes)
        head = head.to(dense.conv1.weight.dtype)  # before copying, or float64 values are rounded
        head.load_state_dict(dense.state_dict())
        return head.train(dense.training)

    def hypercolumns(self, acts: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The full hypercolumn (B, C, H, W), un-normalised: every layer upsampled and concatenated."""
        up = [F.interpolate(acts[n], size=size, mode="bilinear", align_corners=False) for n in self.layers]
        return torch.cat(up, dim=1)

    def forward(self, acts: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.hypercolumns(acts, size)
        mean, std = self.mean.view(1, -1, 1, 1).to(x.dtype), self.std.view(1, -1, 1, 1).to(x.dtype)
        if x.requires_grad:
            x = (x - mean) / std
        else:  # in place when no gradient flows into x: a third 4 GB tensor would prove nothing
            x.sub_(mean).div_(std)
        h = self.dropout(torch.relu(self.conv1(x)))
        h = self.dropout(torch.relu(self.conv2(h)))
        return self.conv3(h)
