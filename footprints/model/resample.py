"""Bilinear index maths shared by the hypercolumn sampler (features) and the dense head (segmenter)."""

from __future__ import annotations

import torch


def bilinear_source(out_positions: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, ...]:
    """(i0, i1, lambda) that `F.interpolate(size=out_size, mode="bilinear", align_corners=False)` uses
    for output pixels `out_positions` along one axis of an input of `in_size` pixels.

    PyTorch: src = (dst + 0.5) * in/out - 0.5, clamped at 0; i0 = floor(src) (at most in - 1),
    i1 = min(i0 + 1, in - 1); the output is (1 - lambda) * x[i0] + lambda * x[i1]. float64 throughout.
    """
    scale = in_size / out_size
    src = ((out_positions.to(torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0.to(torch.float64)
    return i0, i1, lam
