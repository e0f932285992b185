"""The damage classifier: the zoom-out MLP (`footprints.model.mlp`), four grades, on one vector per building
(`damage.classify: building`) or on pixels of buildings (`pixel`: each training building's kept pixels are
rows weighing one building in all, and a building's grade is its pixels' mean probability).

Class weights come from the training buildings' grade counts (`class_weights_from_counts`, the classifier's
rule), so that the rare grades (no-damage and major-damage in Joplin) are not drowned; the loss is the
classifier's weighted cross entropy (`weighted_ce_sums`). The number of epochs is the one with the best
validation damage F1 (xView2's harmonic mean of the four grades' F1, per building), ties broken by the
damaged/undamaged macro F1 and then the validation loss: the figure the user is scored on, not accuracy.

It is chosen on validation folds (`grade_folds`: `damage.val_folds` folds of the training scenes when there
are that many, so that validation measures what the user gets, a model on scenes it never saw; else of the
training buildings, drawn per grade so that every grade with enough buildings is in each fold's training
part): a model is trained on
each fold's other buildings, and the epoch whose out-of-fold predictions, pooled over the folds, score best is
kept; the model is then trained on every training building for that many epochs. With a few buildings of a
rare grade (six no-damage buildings in one Joplin scene), holding a quarter of them out of the final model
costs more than the folds' training time (seconds: the vectors are small).

The training rows are held in memory: per building, a vector of about 5 KB (float32, the default layers and
inputs; 1.3 GB for xView2's ~250,000 graded training buildings), or its kept pixels (`pixel`: float16 rows,
as in the feature files, `damage.train_pixels` x 1.8 KB with two parts of the shallow layers; the validation
folds read their rows where they are, by index: ~3.9 KB a pixel row at the stage's peak, measured; see
configs/xview2.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DamageConfig
from ..errors import InputError
from ..model.damage_features import colour_statistics, combine
from ..model.device import resolve_device
from ..model.hypercolumns import RunningStats
from ..model.losses import class_weights_from_counts, weighted_ce_sums
from ..model.mlp import MLP, train_epoch
from ..scenes.grades import GRADES
from ..scoring.damage import damage_scores, grade_confusion
from .data import derive_seed

log = logging.getLogger(__name__)

_CHUNK = 16384  # rows read at a time where the rows are not trained on (moments, validation)


def folds_of_scenes(scenes: np.ndarray | None, folds: int) -> bool:
    """Whether `grade_folds` deals whole scenes: there are at least `folds` of them (and two folds or more)."""
    return scenes is not None and folds >= 2 and len(np.unique(scenes)) >= folds


def grade_folds(grades: np.ndarray, folds: int, seed: int, scenes: np.ndarray | None = None) -> np.ndarray:
    """The validation fold (0..folds-1) of each building. With buildings of at least `folds` scenes (`scenes`:
    each building's scene), whole scenes per fold, balancing the grades as well as whole scenes allow
    (scikit-learn's StratifiedGroupKFold): the figure then says how the model does on scenes it never saw, as
    the user's scenes will be. Otherwise each grade's buildings dealt round the folds in a seeded order, so
    every fold holds its share of every grade (a grade with fewer buildings than folds is in some folds'
    validation part only)."""
    fold = np.zeros(len(grades), np.int64)
    if folds_of_scenes(scenes, folds):
        from sklearn.model_selection import StratifiedGroupKFold

        split = StratifiedGroupKFold(folds, shuffle=True, random_state=derive_seed(seed, "damage-validation") % 2**31)
        for f, (_, part) in enumerate(split.split(grades, grades, scenes)):
            fold[part] = f
        return fold
    rng = np.random.default_rng(derive_seed(seed, "damage-validation"))
    for g in np.unique(grades):
        members = rng.permutation(np.flatnonzero(grades == g))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def _logits(model: MLP, x: np.ndarray, rows: np.ndarray | None = None,
            batch: int = 4096) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, logits) of the rows `rows` of `x` (None: all of them) by chunks of `batch` rows, each chunk read
    and moved to the model's device as it is used; call under `torch.inference_mode()`."""
    device = next(model.parameters()).device
    n = len(x) if rows is None else len(rows)
    for s in range(0, n, batch):
        chunk = x[s : s + batch] if rows is None else x[rows[s : s + batch]]
        yield s, model(torch.from_numpy(np.ascontiguousarray(chunk)).to(device))


def probabilities(model: MLP, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(n, 4) grade probabilities of the building vectors `x`."""
    model.eval()
    with torch.inference_mode():
        out = [torch.softmax(logits.float(), 1).cpu().numpy() for _, logits in _logits(model, x, batch=batch)]
    return np.concatenate(out) if out else np.zeros((0, len(GRADES)), np.float32)


def _class_weights(y: np.ndarray, weighting: str) -> np.ndarray:
    """The training buildings' grade weights (`class_weights_from_counts`); a grade without buildings gets 0."""
    counts = np.bincount(y, minlength=len(GRADES)).astype(np.float64)
    weights = np.zeros(len(GRADES))
    weights[counts > 0] = class_weights_from_counts(counts[counts > 0], weighting)
    return weights


def building_votes(prob: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """(n, k) per-pixel probabilities (m, k) averaged over each building's pixels (`owner`: each pixel's
    building, 0..n-1); a building without a pixel gets zeros."""
    sums = np.zeros((n, prob.shape[1]), np.float64)
    np.add.at(sums, owner, prob)
    return (sums / np.maximum(np.bincount(owner, minlength=n), 1)[:, None]).astype(np.float32)


def _fit(cfg: DamageConfig, x: np.ndarray, y: np.ndarray, weights: np.ndarray, epochs: int, seed: int,
         device: torch.device, row_weights: np.ndarray | None = None, rows: np.ndarray | None = None,
         val: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None) -> tuple[MLP, list[dict[str, Any]]]:
    """The grade MLP trained for `epochs` epochs (Adam, shuffled minibatches, the classifier's weighted cross
    entropy with the grade `weights`) on the rows `rows` of `x` (None: all of them; read where they are, never
    copied whole) of grades `y`: one per building, or (with `row_weights`) pixels of buildings, each building
    weighing one in all. With validation `val` (its rows of `x`, the buildings' grades, each row's building or
    None), each epoch's predicted grade of every validation building (its pixels' probabilities averaged) and
    the weighted loss sums of its rows."""
    torch.manual_seed(seed)
    picked = np.arange(len(x)) if rows is None else rows
    stats = RunningStats(x.shape[1])  # in float64 and by chunks: the rows may be float16 and many
    for s in range(0, len(picked), _CHUNK):
        stats.update(x[picked[s : s + _CHUNK]])
    model = MLP(x.shape[1], hidden=cfg.hidden, dropout=cfg.dropout, mean=stats.mean, std=stats.std,
                num_classes=len(GRADES)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cw = torch.as_tensor(weights, dtype=torch.float32, device=device)
    y64 = y.astype(np.int64)
    gen = torch.Generator().manual_seed(seed)
    if val is not None:
        val_rows, y_val, owner_val = val
        y_rows = torch.from_numpy((y_val if owner_val is None else y_val[owner_val]).astype(np.int64)).to(device)
        wv = None if owner_val is None else torch.from_numpy(_row_weights(owner_val, len(y_val))).to(device)
    history = []
    for epoch in range(1, epochs + 1):
        train_loss = train_epoch(model, opt, [(x, y64, row_weights, rows)], cw, cfg.batch_size, gen, device)
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
        if val is not None:
            model.eval()
            loss_sum = weight_sum = 0.0
            prob = []
            with torch.inference_mode():
                for s, logits in _logits(model, x, val_rows, _CHUNK):
                    part = slice(s, s + _CHUNK)
                    sums = weighted_ce_sums(logits, y_rows[part], cw, None if wv is None else wv[part])
                    loss_sum += float(sums[0])
                    weight_sum += float(sums[1])
                    prob.append(torch.softmax(logits.float(), 1).cpu().numpy())
            prob_all = np.concatenate(prob) if prob else np.zeros((0, len(GRADES)), np.float32)
            voted = prob_all if owner_val is None else building_votes(prob_all, owner_val, len(y_val))
            entry.update(predicted=voted.argmax(1), loss_sum=loss_sum, weight_sum=weight_sum)
        history.append(entry)
    return model.eval(), history


def _row_weights(owner: np.ndarray, n: int) -> np.ndarray:
    """Each pixel row's weight: one over its building's number of rows (every building weighs one)."""
    return (1.0 / np.maximum(np.bincount(owner, minlength=n), 1)[owner]).astype(np.float32)


def train_damage_mlp(cfg: DamageConfig, x: np.ndarray, y: np.ndarray, seed: int, scenes: np.ndarray | None = None,
                     owner: np.ndarray | None = None) -> tuple[MLP, dict[str, Any]]:
    """The grade MLP of the training buildings of grades `y` (`scenes`: each one's scene, for `grade_folds`):
    `x` (n, width) one row per building, or with `owner` (`damage.classify: pixel`) pixel rows, `owner` each
    one's building, every building weighing one and graded by its pixels' mean probabilities. The epoch is
    chosen on validation folds of buildings (see the module docstring; ties broken by the damaged/undamaged
    macro F1, then the loss), then the model trained on all of them; its record (the pooled validation scores
    at that epoch, the curve, the counts)."""
    device = resolve_device(cfg.device, key="damage.device")
    weights = _class_weights(y, cfg.class_weighting)

    def rows_of(part: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(the rows of `x` of the buildings `part` (a mask; None: every row), their grades, row weights, each
        row's building numbered 0.. within `part`): indices, not a copy of the rows (they may be many GB)."""
        if owner is None:
            return (None if part.all() else np.flatnonzero(part)), y[part], None, None
        inside = part[owner]
        local = np.cumsum(part) - 1  # the buildings of `part` numbered 0..
        own = local[owner[inside]]
        return (None if part.all() else np.flatnonzero(inside)), y[owner[inside]], _row_weights(own, int(part.sum())), own

    fold = grade_folds(y, cfg.val_folds, seed, scenes) if cfg.val_folds >= 2 else np.zeros(len(y), np.int64)
    # a fold is used when both its parts hold buildings
    used = [f for f in np.unique(fold) if cfg.val_folds >= 2 and 0 < (fold == f).sum() < len(y)]
    epochs = cfg.epochs
    record: dict[str, Any] = {"val_folds": len(used),
                              "val_folds_of": "scenes" if folds_of_scenes(scenes, cfg.val_folds) else "buildings"}
    if len(used) >= 2:
        predicted = np.zeros((cfg.epochs, len(y)), np.int64)
        loss = np.zeros((cfg.epochs, 2))
        val = np.zeros(len(y), bool)
        for f in used:
            part = fold == f
            val |= part
            fit_rows, y_fit, w_fit, _ = rows_of(~part)
            val_rows, _, _, own_val = rows_of(part)
            _, hist = _fit(cfg, x, y_fit, _class_weights(y[~part], cfg.class_weighting), cfg.epochs, seed, device,
                           w_fit, fit_rows, (val_rows, y[part], own_val))
            for e, h in enumerate(hist):
                predicted[e, part] = h["predicted"]
                loss[e] += (h["loss_sum"], h["weight_sum"])
        curve = []
        for e in range(cfg.epochs):
            scores = damage_scores(grade_confusion(y[val], predicted[e, val]))
            curve.append((scores, float(loss[e, 0] / max(loss[e, 1], 1e-12))))
        best = max(range(cfg.epochs), key=lambda e: (curve[e][0]["damage_f1"], curve[e][0]["binary"]["macro_f1"],
                                                     -curve[e][1]))
        epochs = best + 1
        record.update(selected_on=f"damage F1 per building, out-of-fold over {len(used)} validation folds (then "
                      "macro F1, then loss); the model then trained on every training building",
                      val=curve[best][0], val_loss=curve[best][1],
                      history=[{"epoch": e + 1, "val_damage_f1": c["damage_f1"], "val_macro_f1": c["binary"]["macro_f1"],
                                "val_loss": v} for e, (c, v) in enumerate(curve)])
    else:
        record["selected_on"] = "no validation (too few buildings or damage.val_folds < 2): every epoch run"
        log.warning("train-damage: no validation folds; the model is trained for all %d epochs", epochs)
    _, y_all, w_all, _ = rows_of(np.ones(len(y), bool))
    model, hist = _fit(cfg, x, y_all, weights, epochs, seed, device, w_all)
    counts = np.bincount(y, minlength=len(GRADES))
    record.update(epoch=epochs, train_loss=hist[-1]["train_loss"],
                  class_weights=dict(zip(GRADES, weights.round(4).tolist(), strict=True)),
                  train_buildings=dict(zip(GRADES, counts.astype(int).tolist(), strict=True)), device=str(device))
    missing = [g for g, c in zip(GRADES, counts, strict=True) if c == 0]
    if missing:
        record["warning"] = f"no training building of grade(s) {', '.join(missing)}: the model never predicts them"
        log.warning("train-damage: %s", record["warning"])
    return model.cpu(), record


def graded_buildings_of(parts: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The graded buildings of scenes' feature files (train-damage's): their pooled arrays stacked (kept
    pixels too, `pixel_owner` numbering the stacked buildings), their grades and the index of each one's part.
    Un-classified buildings and those without a valid pixel (grade -1) are left out: neither trained on nor
    scored."""
    if not parts:
        return {}, np.zeros(0, np.int64), np.zeros(0, np.int64)
    sizes = [len(p["y"]) for p in parts]
    y = np.concatenate([p["y"] for p in parts])
    keep = y >= 0
    columns = [k for k, v in parts[0].items() if v.ndim >= 1 and len(v) == sizes[0] and not k.startswith("pixel_")]
    stacked = {k: np.concatenate([p[k] for p in parts])[keep] for k in columns}
    if "pixel_owner" in parts[0]:
        owner = np.concatenate([p["pixel_owner"] + start for p, start in zip(parts, np.cumsum([0] + sizes[:-1]),
                                                                              strict=True)])
        kept = keep[owner]
        stacked["pixel_owner"] = (np.cumsum(keep) - 1)[owner[kept]]
        for key in ("pixel_pre", "pixel_post"):
            stacked[key] = np.concatenate([p[key] for p in parts])[kept]
    return stacked, y[keep], np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])[keep]


def read_graded_buildings(folder: Path, scene_ids: list[str], arrays: Sequence[str],
                          ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """`graded_buildings_of` the feature files train-damage trained on (its metrics' `train_scenes`), reading
    only `arrays` of them (and the grades): the kept pixels are the bulk of a file."""
    parts = []
    for sid in scene_ids:
        path = folder / f"{sid}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                parts.append({k: z[k] for k in (*arrays, "y") if k in z.files})
        except (OSError, ValueError) as err:
            raise InputError(path, f"cannot read train-damage's features ({err}); rerun train-damage") from None
    return graded_buildings_of(parts)


BASELINES = ("majority", "pre_only", "colour_forest")  # what `baseline_grades` fits beside the model
BASELINE_ARRAYS = ("pre", "colour_pre", "colour_post", "area_m2", "pixels")  # what it reads of a building


def baseline_grades(cfg: DamageConfig, train: dict[str, np.ndarray], y: np.ndarray, tests: Sequence[dict[str, np.ndarray]],
                    seed: int, scenes: np.ndarray | None = None) -> dict[str, list[np.ndarray]]:
    """Three baselines fitted on the training buildings (`train`: pooled as `pooled_hypercolumns` pools them,
    grades `y`) and their grade indices for the buildings of each pooled part of `tests`, so that the model's
    figures can be read against them on the same buildings:
    - `majority`: the training buildings' commonest grade, everywhere;
    - `pre_only`: the damage MLP trained as the model is (`train_damage_mlp`: the same folds, epoch choice and
      refit) on the pre-disaster scene's hypercolumns alone: what the building looked like before the event;
    - `colour_forest`: per-building colour statistics (`colour_statistics`: mean and std of R, G, B and the
      gradient magnitude, pre and post, their difference, log area) in a class-balanced random forest (500
      trees, scikit-learn's `balanced_subsample`)."""
    from sklearn.ensemble import RandomForestClassifier

    out: dict[str, list[np.ndarray]] = {"majority": [np.full(len(t["pixels"]), int(np.bincount(y).argmax()))
                                                     for t in tests]}
    pre_cfg = dataclasses.replace(cfg, inputs="pre", classify="building")
    model, _ = train_damage_mlp(pre_cfg, combine(train, "pre"), y, seed, scenes)
    out["pre_only"] = [probabilities(model, combine(t, "pre")).argmax(1) for t in tests]
    forest = RandomForestClassifier(n_estimators=500, class_weight="balanced_subsample", n_jobs=-1,
                                    random_state=derive_seed(seed, "damage-colour-forest") % 2**31)
    forest.fit(colour_statistics(train), y)
    out["colour_forest"] = [forest.predict(colour_statistics(t)).astype(np.int64) if len(t["pixels"])
                            else np.zeros(0, np.int64) for t in tests]
    return out
