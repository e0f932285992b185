"""The shallow per-pixel classifier of the zoom-out method: hypercolumn -> 1024 -> 1024 -> 2.

The per-channel normaliser (mean/std of the training hypercolumns) lives inside the model as buffers, so
it travels with every checkpoint and can be folded into the first layer of the dense segmenter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .losses import weighted_ce_sums


class MLP(nn.Module):
    def __init__(
        self,
        in_channels: int,
        hidden: int = 1024,
        dropout: float = 0.5,
        mean: torch.Tensor | Sequence[float] | None = None,
        std: torch.Tensor | Sequence[float] | None = None,
        num_classes: int = 2,
    ):
        super().__init__()
        mean_t = torch.zeros(in_channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.ones(in_channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (in_channels,) or std_t.shape != (in_channels,):
            raise ValueError(f"mean/std must have {in_channels} values")
        self.register_buffer("mean", mean_t.clone())
        # a constant channel (std 0) must not divide by zero; it then carries no information anyway
        self.register_buffer("std", torch.where(std_t > 1e-6, std_t, torch.ones_like(std_t)).clone())
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)
        self.in_channels = in_channels
        self.hidden = hidden
        self.dropout_p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.fc3(x)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer,
                fills: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]],
                class_weights: torch.Tensor, batch_size: int, gen: torch.Generator, device: torch.device | str) -> float:
    """One training epoch of a classifier head (train-classifier's streamed shards, train-damage's buildings):
    each fill (X, y, per-sample weights or None, rows) is shuffled with `gen` and stepped through in minibatches
    of the weighted cross entropy (`weighted_ce_sums`). `rows` None: every row of X, which goes to the device
    once; else the indices of the rows of X to train on (y and the weights are theirs), each minibatch gathered
    from X as it is used, so that a subset of many GB of rows is never copied whole (train-damage's validation
    folds). Returns the epoch's mean loss."""
    model.train()
    total = weight = 0.0
    for X, y, w, rows in fills:
        yt = torch.from_numpy(y).to(device)
        wt = torch.from_numpy(w).to(device) if w is not None else None
        order = torch.randperm(len(yt), generator=gen)
        order_dev = order.to(device)  # once an epoch, not every minibatch
        Xt = torch.from_numpy(X).to(device) if rows is None else None
        for s in range(0, len(order), batch_size):
            idx = order_dev[s : s + batch_size]
            xb = Xt[idx] if Xt is not None else torch.from_numpy(X[rows[order[s : s + batch_size].numpy()]]).to(device)
            loss_sum, weight_sum = weighted_ce_sums(model(xb), yt[idx], class_weights,
                                                    wt[idx] if wt is not None else None)
            opt.zero_grad(set_to_none=True)
            (loss_sum / weight_sum.clamp_min(1e-12)).backward()
            opt.step()
            total += float(loss_sum.detach())
            weight += float(weight_sum)
        del Xt, yt, wt, order, order_dev
    return total / max(weight, 1e-12)


def mlp_from_checkpoint(ckpt: Mapping[str, Any], where: str | Path = "<classifier checkpoint>") -> MLP:
    """The MLP of a train-classifier checkpoint dict (`footprints.contracts.checkpoints`), in eval mode."""
    state = ckpt["model"]
    hidden = int(ckpt.get("hidden", state["fc1.weight"].shape[0]))
    mlp = MLP(int(ckpt["in_channels"]), hidden, float(ckpt.get("dropout", 0.5)),
              num_classes=int(state["fc3.weight"].shape[0]))
    try:
        mlp.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(where, f"classifier weights do not fit ({str(err).splitlines()[0]})") from None
    return mlp.eval()
