"""The damage classifier: the zoom-out MLP (`footprints.model.mlp`) on per-building vectors, four grades.

Class weights come from the training buildings' grade counts (`class_weights_from_counts`, the classifier's
rule), so that the rare grades (no-damage and major-damage in Joplin) are not drowned; the loss is the
classifier's weighted cross entropy (`weighted_ce_sums`). The epoch kept is the one with the best validation
damage F1 (xView2's harmonic mean of the four grades' F1, per building), ties broken by the damaged/undamaged
macro F1 and then the validation loss: the figure the user is scored on, not accuracy.

Validation buildings (`validation_split`) are drawn per grade from the labelled buildings of the training
scenes, so that every grade with two or more buildings is in both parts: a split by place (a band of rows)
can leave a rare grade out of training altogether (in one Joplin scene, all six no-damage buildings lie in
its bottom quarter).

The per-building vectors are held in memory (about 6 KB each with the default layers: 1.5 GB for xView2's
~250,000 graded training buildings).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch

from ..config import DamageConfig
from ..model.device import resolve_device
from ..model.losses import class_weights_from_counts, weighted_ce_sums
from ..model.mlp import MLP
from ..scenes.grades import GRADES
from ..scoring.damage import damage_scores, grade_confusion
from .data import derive_seed

log = logging.getLogger(__name__)


def validation_split(grades: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the validation buildings: `fraction` of each grade (at least one, never all, for a
    grade with two or more buildings), seeded."""
    rng = np.random.default_rng(derive_seed(seed, "damage-validation"))
    val = np.zeros(len(grades), bool)
    for g in np.unique(grades):
        members = np.flatnonzero(grades == g)
        if len(members) < 2:
            continue
        k = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        val[rng.choice(members, size=k, replace=False)] = True
    return val


def probabilities(model: MLP, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(n, 4) grade probabilities of the building vectors `x`."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            logits = model(torch.from_numpy(np.ascontiguousarray(x[s : s + batch])).to(device))
            out.append(torch.softmax(logits.float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(GRADES)), np.float32)


def _selection(scores: dict[str, Any], loss: float) -> tuple[float, float, float]:
    return scores["damage_f1"], scores["binary"]["macro_f1"], -loss


def train_damage_mlp(cfg: DamageConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                     y_val: np.ndarray, seed: int) -> tuple[MLP, dict[str, Any]]:
    """Train the grade MLP (Adam); return the best epoch's model (see the module docstring) and its record."""
    counts = np.bincount(y_train, minlength=len(GRADES)).astype(np.float64)
    present = counts > 0
    weights = np.zeros(len(GRADES))
    # a grade without training buildings gets no weight (it cannot be learnt; the record says so)
    weights[present] = class_weights_from_counts(counts[present], cfg.class_weighting)
    device = resolve_device(cfg.device, key="damage.device")
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0)
    model = MLP(x_train.shape[1], hidden=cfg.hidden, dropout=cfg.dropout, mean=mean, std=std,
                num_classes=len(GRADES)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cw = torch.as_tensor(weights, dtype=torch.float32, device=device)
    xt, yt = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train.astype(np.int64)).to(device)
    xv, yv = torch.from_numpy(x_val).to(device), torch.from_numpy(y_val.astype(np.int64)).to(device)
    has_val = len(y_val) > 0
    gen = torch.Generator().manual_seed(seed)
    best: dict[str, Any] = {"key": None}
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(yt), generator=gen).to(device)
        total = weight = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            loss_sum, weight_sum = weighted_ce_sums(model(xt[idx]), yt[idx], cw)
            opt.zero_grad(set_to_none=True)
            (loss_sum / weight_sum.clamp_min(1e-12)).backward()
            opt.step()
            total, weight = total + float(loss_sum.detach()), weight + float(weight_sum)
        xs, ys = (xv, yv) if has_val else (xt, yt)
        model.eval()
        with torch.inference_mode():
            logits = model(xs)
            loss_sum, weight_sum = weighted_ce_sums(logits, ys, cw)
            predicted = logits.argmax(1).cpu().numpy()
        loss = float(loss_sum) / max(float(weight_sum), 1e-12)
        scores = damage_scores(grade_confusion(ys.cpu().numpy(), predicted))
        history.append({"epoch": epoch, "train_loss": total / max(weight, 1e-12), "val_loss": loss,
                        "val_damage_f1": scores["damage_f1"], "val_macro_f1": scores["binary"]["macro_f1"]})
        key = _selection(scores, loss)
        if best["key"] is None or key > best["key"]:
            best = {"key": key, "epoch": epoch, "state": copy.deepcopy(model.state_dict()), "scores": scores,
                    "loss": loss}
    model.load_state_dict(best["state"])
    model.eval()
    split = "val" if has_val else "train"
    if not has_val:
        log.warning("train-damage: no validation buildings; the epoch is chosen on the TRAINING buildings")
    record = {"selected_on": f"{split} damage F1 per building (then macro F1, then loss)", "epoch": best["epoch"],
              split: best["scores"], f"{split}_loss": best["loss"], "history": history,
              "class_weights": dict(zip(GRADES, weights.round(4).tolist(), strict=True)),
              "train_buildings": dict(zip(GRADES, counts.astype(int).tolist(), strict=True)),
              "val_buildings": dict(zip(GRADES, np.bincount(y_val, minlength=len(GRADES)).tolist(), strict=True)),
              "device": str(device)}
    missing = [g for g, c in zip(GRADES, counts, strict=True) if c == 0]
    if missing:
        record["warning"] = f"no training building of grade(s) {', '.join(missing)}: the model never predicts them"
        log.warning("train-damage: %s", record["warning"])
    return model.cpu(), record
