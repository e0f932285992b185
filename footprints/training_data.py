"""The training data path of the segmenter: which patch, in which order, with which augmentation.

Exact resume needs every random choice to be a function of a few integers, never of a generator's
history:

- The order of the training patches in epoch `e` is a permutation drawn from a generator seeded with
  `(seed, e)`, so the sampler's state is just a position in that permutation.
- Each sample's augmentation (one of the 8 flips/rotations) is drawn from a generator seeded with
  `(seed, epoch, position)`: independent of batch layout, worker processes and ranks.

Data-parallel training: `GlobalBatchSampler` splits each global batch of the permutation across ranks by
position (rank r takes positions r, r+W, ...); a rank with nothing left in a short last batch receives a
stand-in item (`real` = 0) that runs forward/backward with no weight, to keep DDP in step.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .contracts.patches import load_patch
from .distributed import DistInfo


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from `parts` (ints or strings), the same in every process and on every platform."""
    ints = [int(p) % 2**32 if not isinstance(p, str) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the `n` training patches in `epoch` (0-based): a function of (seed, epoch) only."""
    return np.random.default_rng(derive_seed(seed, "permutation", epoch)).permutation(n)


def augment_code(seed: int, epoch: int, position: int) -> int:
    """Which of the 8 dihedral transforms the sample at `position` of `epoch` gets (0 = identity)."""
    return int(np.random.default_rng(derive_seed(seed, "augment", epoch, position)).integers(8))


def apply_augment(image: np.ndarray, mask: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by `code % 4` quarter turns, then mirror left-right if `code >= 4`; same on image and mask."""
    k = code % 4
    if image.shape[-1] != image.shape[-2] and k % 2:
        k = 2  # a quarter turn would change the shape of a non-square patch; a half turn keeps it
    if k:
        image = np.rot90(image, k, axes=(-2, -1))
        mask = np.rot90(mask, k, axes=(-2, -1))
    if code >= 4:
        image = image[..., ::-1]
        mask = mask[..., ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)



class PatchDataset(torch.utils.data.Dataset):
    """Patches of one split; an item key is `(row index, epoch, position, real)`.

    `position` seeds the augmentation; `real` is 0 for the stand-in item a rank receives when a short
    last batch has nothing left for it (it runs forward/backward to keep DDP in step, with no weight).
    """

    def __init__(self, tile_dir: str | Path, rows: Any, augment: bool, seed: int):
        self.tile_dir = Path(tile_dir)
        self.rows = rows.reset_index(drop=True)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        index, epoch, position, real = key
        image, mask = load_patch(self.tile_dir, self.rows.iloc[index])
        if self.augment:
            image, mask = apply_augment(image, mask, augment_code(self.seed, epoch, position))
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask)), index, real


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of `order[start:stop]`, as PatchDataset keys."""

    def __init__(self, order: Sequence[int], batch_size: int, start: int, stop: int, epoch: int, info: DistInfo):
        self.order = np.asarray(order)
        self.batch_size = batch_size
        self.start, self.stop, self.epoch, self.info = start, stop, epoch, info

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


def make_loader(dataset: PatchDataset, sampler: GlobalBatchSampler, device: torch.device, workers: int) -> Any:
    on_cuda = device.type == "cuda"
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers if on_cuda else 0,
        pin_memory=on_cuda,
        # an own generator: the loader's start-up draw must not touch the global one
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )

