"""`footprints bench head`: the naive head (hypercolumn materialised) against the factorised one."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..model.backbone import LAYER_CHANNELS, LAYER_SCALE, hypercolumn_channels, resolve_layers
from ..model.head import DenseHead, NaiveHead, evaluated_positions
from ..model.mlp import MLP
from . import sync

log = logging.getLogger(__name__)


def _cpu_peak_bytes(fn: Any) -> int:
    """Peak growth of live CPU tensor memory while `fn()` runs (bytes).

    `torch.profiler` with `profile_memory=True` records every allocation and free made by PyTorch's CPU
    allocator (forward and the autograd backward alike) as a signed byte count in time order; the peak
    of their running sum is the largest amount of tensor memory alive at once beyond what existed
    before. Unlike the process RSS this ignores the malloc cache and other processes, and unlike
    summing tensor sizes it sees the temporaries inside operators and the backward pass.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def bench_head(cfg: Any) -> dict[str, Any]:
    """Naive vs factorised head, forward + backward, on one random input (`footprints bench head`).

    A batch of 4 patches of 256 px, all 14 layers (4,227 channels), hidden 1024, stride from
    `cfg.segmenter.stride`; see `compare_heads` for what is measured and how.
    """
    stride = int(getattr(getattr(cfg, "segmenter", None), "stride", 2) or 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return compare_heads(batch=4, size=256, hidden=1024, layers="all", stride=stride, device=device)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Matrix products in full float32 (TF32 off in cuBLAS and cuDNN, `highest` matmul precision), restored
    after: the equality check then means the same on a CPU and on a GPU (TF32 keeps 10 mantissa bits,
    which alone lifts `max_rel_diff` far above float32 rounding: call `_compare_heads` outside this context
    on a GPU to see by how much)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def compare_heads(
    batch: int,
    size: int,
    hidden: int,
    layers: Any,
    stride: int,
    device: torch.device | str = "cpu",
    fast_reps: int = 5,
    naive_reps: int = 2,
) -> dict[str, Any]:
    """Time and peak memory of forward + backward of `NaiveHead` and `DenseHead` on the same input.

    Random backbone activations (uniform in [0, 1), like post-ReLU features) are made once at each
    layer's own resolution; the MLP (weights, normaliser) is random and converted both ways: the seed's
    way (`NaiveHead.from_mlp`, explicit normalisation) and folded (`DenseHead.from_mlp`). Both run with
    dropout off (eval) so their outputs can be compared; the loss is a random linear function of the
    logits, so every gradient is non-trivial. Times: median of `fast_reps` / `naive_reps` repetitions,
    the two heads alternating (after one untimed warm-up of the fast head; the naive one is too slow to
    warm up). `max_rel_diff`: max |fast - naive| / max |naive| of the logits; `grad_rel_err`:
    ||g_fast - g_naive|| / ||g_naive|| of the conv2 and conv3 weight gradients (the larger). Peak memory:
    on CUDA `torch.cuda.max_memory_allocated` beyond what was allocated before the call; on CPU the
    profiler's allocation trace (`_cpu_peak_bytes`), in a separate untimed run. Both exclude the
    activations, which exist before either head runs. The naive head's peak is the list of upsampled
    layers plus their concatenation (2 x 4.4 GB for the benchmark input) while `torch.cat` runs: the
    seed's way of building the hypercolumn; writing the layers into one preallocated tensor instead
    would halve it.

    `grad_rel_err` is orders of magnitude above `max_rel_diff` (the benchmark prints both): a few of the
    16.7 M conv2 outputs lie within float32 rounding of 0, so their ReLU goes different ways in the two
    float32 computations (count them by comparing each head's conv2 pre-activation signs with a float64
    reference), and each flip moves one term of a conv2 weight-gradient sum. In float64 the gradients agree
    to 1e-10 (tests/test_head.py).

    Everything runs in full float32 (`full_float32`: no TF32 on a GPU).
    """
    with full_float32():
        return _compare_heads(batch, size, hidden, layers, stride, torch.device(device), fast_reps, naive_reps)


def _compare_heads(batch: int, size: int, hidden: int, layers: Any, stride: int, device: torch.device,
                   fast_reps: int, naive_reps: int) -> dict[str, Any]:
    names = resolve_layers(layers)
    gen = torch.Generator().manual_seed(0)
    c = hypercolumn_channels(names)
    mlp = MLP(c, hidden, dropout=0.5, mean=torch.rand(c, generator=gen), std=0.5 + torch.rand(c, generator=gen))
    with torch.no_grad():  # larger-than-default weights so the logits are O(1)
        mlp.fc1.weight.mul_(4.0)
        mlp.fc2.weight.mul_(4.0)
    acts = {
        n: torch.rand(batch, LAYER_CHANNELS[n], size // LAYER_SCALE[n], size // LAYER_SCALE[n], generator=gen)
        .to(device)
        for n in names
    }
    fast = DenseHead.from_mlp(mlp, names, stride).to(device).eval()
    naive = NaiveHead.from_mlp(mlp, names, stride).to(device).eval()
    n = len(evaluated_positions(size, stride))
    weight = torch.randn(batch, mlp.fc3.out_features, n, n, generator=gen).to(device)

    def step(head: nn.Module) -> torch.Tensor:
        for p in head.parameters():
            p.grad = None
        out = head(acts, (size, size))
        (out * weight).sum().backward()
        return out.detach()

    def timed(head: nn.Module) -> tuple[float, torch.Tensor]:
        sync(device)
        t0 = time.perf_counter()
        out = step(head)
        sync(device)
        return time.perf_counter() - t0, out

    def peak(head: nn.Module) -> int:
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(head)
            sync(device)
            return torch.cuda.max_memory_allocated(device) - base
        for p in head.parameters():  # freed before the trace starts (its frees of older blocks are not seen)
            p.grad = None
        return _cpu_peak_bytes(lambda: step(head))

    log.info("bench head: %d patches x %d channels x %d px, hidden %d, stride %d, on %s",
             batch, c, size, hidden, stride, device)
    step(fast)
    # alternate the two so that both see the same background load (a shared machine)
    fast_times: list[float] = []
    naive_times: list[float] = []
    fast_out = naive_out = torch.empty(0)
    for r in range(max(fast_reps, naive_reps)):
        if r < fast_reps:
            t, fast_out = timed(fast)
            fast_times.append(t)
        if r < naive_reps:
            t, naive_out = timed(naive)
            naive_times.append(t)
    log.info("factorised head: %.3f s (median of %s)", statistics.median(fast_times),
             [round(t, 3) for t in fast_times])
    log.info("naive head: %.3f s (median of %s)", statistics.median(naive_times),
             [round(t, 3) for t in naive_times])
    fast_grads = {k: getattr(fast, k).weight.grad.clone() for k in ("conv2", "conv3")}
    naive_grads = {k: getattr(naive, k).weight.grad.clone() for k in ("conv2", "conv3")}
    fast_mem = peak(fast)
    naive_mem = peak(naive)
    log.info("peak memory beyond the activations: naive %.1f MiB, factorised %.1f MiB",
             naive_mem / 2**20, fast_mem / 2**20)

    max_rel_diff = float((fast_out - naive_out).abs().max() / naive_out.abs().max().clamp(min=1e-30))
    # conv1 differs by construction (normaliser folded vs explicit); conv2/conv3 must get equal gradients.
    # Relative in norm: a few ReLUs whose input is within rounding of 0 flip between the two float32
    # computations, which moves single entries but not the gradient as a whole.
    grad_diff = max(float((fast_grads[k] - naive_grads[k]).norm() / naive_grads[k].norm().clamp(min=1e-30))
                    for k in fast_grads)
    naive_s, fast_s = statistics.median(naive_times), statistics.median(fast_times)
    result = {
        "speedup": naive_s / fast_s,
        "memory_ratio": naive_mem / max(fast_mem, 1),
        "max_rel_diff": max_rel_diff,
        "grad_rel_err": grad_diff,
        "naive_s": naive_s,
        "fast_s": fast_s,
        "naive_peak_bytes": int(naive_mem),
        "fast_peak_bytes": int(fast_mem),
        "batch": batch,
        "patch": size,
        "channels": c,
        "hidden": hidden,
        "stride": stride,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "tf32": False,
    }
    log.info("head: %.1fx faster, %.1fx less peak memory, max relative difference %.2e (gradients %.2e)",
             result["speedup"], result["memory_ratio"], max_rel_diff, grad_diff)
    if not math.isfinite(max_rel_diff):
        log.warning("head outputs are not finite")
    return result
