"""The training data path of the segmenter: which patch, in which order, with which augmentation.

Exact resume needs every random choice to be a function of a few integers, never of a generator's
history:

- The order of the training patches in epoch `e` is a permutation drawn from a generator seeded with
  `(seed, e)`, so the sampler's state is just a position in that permutation.
- Each sample's augmentation (one of the 8 flips/rotations) is drawn from a generator seeded with
  `(seed, epoch, position)`: independent of batch layout, worker processes and ranks. The loader only
  reads (whole batches, from the memory-mapped patch store) and carries the codes; `augment_batch`
  applies them on the device, to the whole batch, with the same result as `apply_augment` per sample.

Data-parallel training: `GlobalBatchSampler` splits each global batch of the permutation across ranks by
position (rank r takes positions r, r+W, ...); a rank with nothing left in a short last batch receives a
stand-in item (`real` = 0) that runs forward/backward with no weight, to keep DDP in step.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contracts.patches import PatchStore
from .distributed import DistInfo


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from `parts` (ints or strings), the same in every process and on every platform."""
    ints = [int(p) % 2**32 if not isinstance(p, str) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the `n` training patches in `epoch` (0-based): a function of (seed, epoch) only."""
    return np.random.default_rng(derive_seed(seed, "permutation", epoch)).permutation(n)


AUGMENT_CHUNK = 4096  # positions whose augmentation codes one generator draws


@functools.lru_cache(maxsize=64)
def _augment_chunk(seed: int, epoch: int, chunk: int) -> np.ndarray:
    rng = np.random.default_rng(derive_seed(seed, "augment", epoch, chunk))
    return rng.integers(8, size=AUGMENT_CHUNK, dtype=np.int64)


def augment_code(seed: int, epoch: int, position: int) -> int:
    """Which of the 8 dihedral transforms the sample at `position` of `epoch` gets (0 = identity).

    A function of (seed, epoch, position) only: the codes of positions [c * 4096, (c + 1) * 4096) of an
    epoch are drawn at once by a generator seeded with (seed, epoch, c) (cached), one draw per position.
    """
    return int(_augment_chunk(int(seed), int(epoch), int(position) // AUGMENT_CHUNK)[int(position) % AUGMENT_CHUNK])


def _quarter_turns(code: int, square: bool) -> int:
    """The quarter turns of dihedral transform `code` (the mirror is `code >= 4`)."""
    k = code % 4
    if not square and k % 2:
        k = 2  # a quarter turn would change the shape of a non-square patch; a half turn keeps it
    return k


def apply_augment_view(image: np.ndarray, mask: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """`apply_augment` as views (no copy)."""
    k = _quarter_turns(code, image.shape[-1] == image.shape[-2])
    if k:
        image = np.rot90(image, k, axes=(-2, -1))
        mask = np.rot90(mask, k, axes=(-2, -1))
    if code >= 4:
        image = image[..., ::-1]
        mask = mask[..., ::-1]
    return image, mask


def apply_augment(image: np.ndarray, mask: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by `code % 4` quarter turns, then mirror left-right if `code >= 4`; same on image and mask."""
    image, mask = apply_augment_view(image, mask, code)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class PatchDataset(torch.utils.data.Dataset):
    """Patches of one split, read a whole batch at a time from the patch store (`PatchStore`: memory-mapped
    shards, or GeoTIFFs for a scene tiled without one).

    An item is a batch: a list of keys `(row index, epoch, position, real)` (what `GlobalBatchSampler`
    yields); it gives `(images uint8 (B, 3, H, W), masks uint8 (B, H, W), row indices, real, codes)`, where
    `codes` are the samples' augmentation codes (`augment_code`, all 0 without augmentation). The images
    are NOT augmented here: `augment_batch` applies the codes on the device, to the whole batch.
    `position` seeds the augmentation; `real` is 0 for the stand-in item a rank receives when a short last
    batch has nothing left for it (it runs forward/backward to keep DDP in step, with no weight).
    """

    def __init__(self, tile_dir: str | Path, rows: Any, augment: bool, seed: int):
        self.tile_dir = Path(tile_dir)
        self.rows = rows.reset_index(drop=True)
        self.augment = augment
        self.seed = seed
        self.store = PatchStore(self.tile_dir, self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, keys: Sequence[tuple[int, int, int, int]]) -> tuple[torch.Tensor, ...]:
        index = [int(k[0]) for k in keys]
        images, masks = self.store.read(index)
        codes = [augment_code(self.seed, e, p) if self.augment else 0 for _, e, p, _ in keys]
        return (torch.from_numpy(images), torch.from_numpy(masks), torch.tensor(index, dtype=torch.int64),
                torch.tensor([int(k[3]) for k in keys], dtype=torch.int64), torch.tensor(codes, dtype=torch.int64))


def _dihedral(t: torch.Tensor, code: int, square: bool) -> torch.Tensor:
    """A view of `t` (..., H, W) under the dihedral transform `code`, as `apply_augment` defines it."""
    k = _quarter_turns(code, square)
    if k:
        t = torch.rot90(t, k, (-2, -1))
    return t.flip(-1) if code >= 4 else t


class HostBuffers:
    """Batch-sized output tensors reused from one batch to the next on the CPU, where a fresh batch-sized
    tensor (megabytes) per batch costs a page fault and a zeroed page per 4 KB page, a large share of the data
    path's time (`footprints bench loader` times the data path: patches per second). A tensor handed
    out stays valid until the next batch asks for its slot; elsewhere (CUDA: the caching allocator reuses
    memory by itself) every request is a new tensor."""

    def __init__(self) -> None:
        self._slots: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
        buf = self._slots.get(slot)
        if buf is None or buf.dtype != dtype or buf.shape[1:] != tuple(shape[1:]) or buf.shape[0] < shape[0]:
            buf = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
            self._slots[slot] = buf
        return buf[: shape[0]]


def augment_batch(images: torch.Tensor, masks: torch.Tensor, codes: Sequence[int],
                  image_dtype: torch.dtype | None = None, mask_dtype: torch.dtype | None = None,
                  channels_last: bool = False, host: bool | None = None,
                  buffers: HostBuffers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_augment` on a whole batch, on the batch's device: sample i gets the dihedral transform
    `codes[i]` (a host sequence: no device sync), the same on its image (B, C, H, W) and mask (B, H, W).

    Each sample is written once, rotated and converted in the same copy (to `image_dtype` / `mask_dtype`
    when given, e.g. the model's float input and the loss's int64 target; the image in channels-last
    layout if asked): the augmentation costs no pass of its own. Equal, value for value, to
    `apply_augment` sample by sample (tests/test_training.py). `host`: copy with NumPy (default: for CPU
    tensors), else with torch (any device). `buffers`: where the outputs live (reused batch to batch).
    """
    square = images.shape[-1] == images.shape[-2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bufs = buffers if buffers is not None else HostBuffers()
    out_i = bufs.get("images", images.shape, image_dtype or images.dtype, images.device, fmt)
    out_m = bufs.get("masks", masks.shape, mask_dtype or masks.dtype, masks.device)
    codes = list(codes) or [0] * images.shape[0]
    if host if host is not None else images.device.type == "cpu":
        # on the host, NumPy's strided copies (one thread, no parallel region per sample) are much faster
        # than torch's for these small, transposed uint8 views (time `augment_batch` with host=True against
        # host=False on a CPU batch to see by how much); same values, into the same tensors
        src_i, src_m, dst_i, dst_m = images.numpy(), masks.numpy(), out_i.numpy(), out_m.numpy()
        for i, code in enumerate(codes):
            im, m = apply_augment_view(src_i[i], src_m[i], code)
            np.copyto(dst_i[i], im, casting="unsafe")
            np.copyto(dst_m[i], m, casting="unsafe")
        return out_i, out_m
    if not any(codes):
        return out_i.copy_(images), out_m.copy_(masks)
    for i, code in enumerate(codes):
        out_i[i].copy_(_dihedral(images[i], code, square))
        out_m[i].copy_(_dihedral(masks[i], code, square))
    return out_i, out_m


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of `order[start:stop]`, as PatchDataset keys.

    `reset` points it at another epoch or position: one loader (and its persistent workers) serves every
    epoch, the sampler's state alone says what comes next.
    """

    def __init__(self, order: Sequence[int], batch_size: int, start: int, stop: int, epoch: int, info: DistInfo):
        self.batch_size = batch_size
        self.info = info
        self.reset(order, start, stop, epoch)

    def reset(self, order: Sequence[int], start: int, stop: int, epoch: int) -> GlobalBatchSampler:
        self.order = np.asarray(order)
        self.start, self.stop, self.epoch = start, stop, epoch
        return self

    def __len__(self) -> int:
        return max(0, math.ceil((self.stop - self.start) / self.batch_size))

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        for pos in range(self.start, self.stop, self.batch_size):
            positions = list(range(pos, min(pos + self.batch_size, self.stop)))
            mine = positions[self.info.rank :: self.info.world]
            if mine:
                yield [(int(self.order[p]), self.epoch, p, 1) for p in mine]
            else:
                yield [(int(self.order[positions[0]]), self.epoch, positions[0], 0)]


def make_loader(dataset: PatchDataset, sampler: GlobalBatchSampler, device: torch.device, workers: int,
                prefetch: int = 4) -> Any:
    """The loader of one split, made once and reused every epoch (`sampler.reset` between epochs).

    On CUDA: `workers` persistent worker processes (never respawned), each reading whole batches, pinned
    host memory, so `to_device` copies without blocking. On the CPU the batches are read in this process
    (workers would only take cores from the model; a memory-mapped read is a copy).
    """
    on_cuda = device.type == "cuda"
    n = workers if on_cuda else 0
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole batches, the dataset reads them at once
        num_workers=n,
        pin_memory=on_cuda,
        # an own generator: the loader's start-up draw must not touch the global one
        generator=torch.Generator().manual_seed(0),
        persistent_workers=n > 0,
        prefetch_factor=prefetch if n > 0 else None,
    )


def to_device(batch: Sequence[torch.Tensor], device: torch.device, channels_last: bool = False,
              buffers: HostBuffers | None = None) -> tuple[torch.Tensor, ...]:
    """A loader batch on the device, ready for the model: (x float32 (B, 3, H, W) in 0..255, mask int64
    (B, H, W), row indices, real, images uint8 as read). The copies are non-blocking (pinned memory on
    CUDA); the augmentation the batch's codes say (all 0 for a dataset without augmentation) runs there,
    on the whole batch, fused with the conversions. With `buffers` (one per loop), x and mask on the CPU
    are reused tensors, valid until the next call."""
    images, masks, index, real, codes = batch
    images_d = images.to(device, non_blocking=True)
    masks_d = masks.to(device, non_blocking=True)
    x, target = augment_batch(images_d, masks_d, codes.tolist(), torch.float32, torch.int64,
                              channels_last=channels_last and device.type == "cuda", buffers=buffers)
    return x, target, index, real.to(device, non_blocking=True), images
