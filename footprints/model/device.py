"""Which torch device a stage runs on: one rule for features, classifier, segmenter and predict."""

from __future__ import annotations

import torch

from ..errors import FootprintsError


def resolve_device(spec: str, local_rank: int = 0, key: str = "device") -> torch.device:
    """`auto` -> this process's GPU when CUDA is there, else the CPU; `cpu`, `cuda`, `cuda:N` as asked.

    `local_rank` picks the GPU of a DDP process for `auto`/`cuda` (modulo the visible count, so both
    one-GPU-per-task and all-GPUs-per-node layouts work). Asking for CUDA without a GPU is a clear error.
    """
    if spec not in ("auto", "cpu", "cuda") and not spec.startswith("cuda:"):
        raise FootprintsError(f"{key}: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FootprintsError(f"{key}: {spec!r} asked for, but torch sees no CUDA device (use 'auto' or 'cpu')")
    if spec.startswith("cuda:"):
        return torch.device(spec)
    return torch.device("cuda", local_rank % torch.cuda.device_count())
