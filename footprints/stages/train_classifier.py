"""Stage `train-classifier`: the shallow class-weighted MLP on sampled hypercolumns, and a baseline.

Class weights (`footprints.losses`) come from the training masks (features/meta.json `class_pixels`), or
from `classifier.class_weights` when set.

The loss. Samples are drawn class-balanced per patch, so their class frequencies are not the masks'.
Each sample therefore carries `w`, the number of mask pixels it stands for; the loss weights sample i by
`class_weight[y_i] * w_i` (normalised per batch), which is an unbiased estimate of the class-weighted
cross entropy over every pixel of the training masks: the objective the dense segmenter trains on later.
Plain class weights on balanced samples would count the class imbalance twice (a ~20x building prior).

Model selection: the epoch with the best validation building IoU, estimated for the dense masks (sampled
validation pixels weighted by `w`). Metrics on the sampled pixels unweighted are reported beside it, as
is a scikit-learn logistic regression (`class_weight='balanced'`) on the same standardised features.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any

import numpy as np
import torch

from ..atomic import write_json
from ..config import Config
from ..contracts import features_store
from ..contracts.checkpoints import save_checkpoint
from ..contracts.freshness import digest, is_fresh, read_record, unmark, write_record
from ..contracts.paths import RunPaths
from ..device import resolve_device
from ..errors import StageError
from ..losses import resolve_class_weights, weighted_ce_sums
from ..metrics import confusion, pixel_metrics
from ..mlp import MLP
from ..plots import write_learning_curve
from ..targets import ClassScheme, scheme_for

log = logging.getLogger(__name__)

BASELINE_MAX_SAMPLES = 200_000  # logistic regression on more rows than this uses a seeded subsample


def _building_metrics(p_building: Any, y: Any, w: Any, scheme: ClassScheme) -> tuple[dict, dict]:
    """(dense-estimate, sampled-pixel) building metrics: a pixel is predicted a building when the
    probabilities of the building classes sum to 0.5 or more, the rule predict uses."""
    pred = np.asarray(p_building) >= 0.5
    truth = np.isin(np.asarray(y), scheme.building)
    return (pixel_metrics(*confusion(pred, truth, ignore=None, weight=np.asarray(w))),
            pixel_metrics(*confusion(pred, truth, ignore=None)))


def _evaluate(
    model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, cw: torch.Tensor, batch: int,
    scheme: ClassScheme,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(weighted loss, dense-estimate metrics, sampled-pixel metrics) of `model` on (X, y, w)."""
    model.eval()
    probs, loss_sum, weight_sum = [], 0.0, 0.0
    with torch.inference_mode():
        for s in range(0, len(y), batch):
            logits = model(X[s : s + batch])
            yb, wb = y[s : s + batch], w[s : s + batch]
            ls, ws = weighted_ce_sums(logits, yb, cw, wb)
            loss_sum += float(ls)
            weight_sum += float(ws)
            probs.append(torch.softmax(logits.float(), 1)[:, list(scheme.building)].sum(1))
    p_building = torch.cat(probs).cpu().numpy() if probs else np.zeros(0)
    dense, sampled = _building_metrics(p_building, y.cpu().numpy(), w.cpu().numpy(), scheme)
    return loss_sum / max(weight_sum, 1e-12), dense, sampled


def _to_python(obj: Any) -> Any:
    """Numbers/arrays -> plain Python (a weights_only checkpoint refuses numpy scalars)."""
    if isinstance(obj, dict):
        return {str(k): _to_python(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_python(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def train_mlp(
    cfg: Config,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    mean: np.ndarray,
    std: np.ndarray,
    class_weights: np.ndarray,
    scheme: ClassScheme,
) -> tuple[MLP, dict[str, Any]]:
    """Train the MLP with Adam + StepLR; return the best model (on val building IoU) and its record."""
    c = cfg.classifier
    device = resolve_device(c.device, key="classifier.device")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    in_channels = train["X"].shape[1]
    model = MLP(in_channels, hidden=c.hidden, dropout=c.dropout, mean=mean, std=std, num_classes=scheme.k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, c.step_size), gamma=c.gamma)
    cw = torch.as_tensor(class_weights, dtype=torch.float32, device=device)

    def tensors(d: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.as_tensor(d["X"], dtype=torch.float32, device=device),
            torch.as_tensor(d["y"], dtype=torch.long, device=device),
            torch.as_tensor(d["w"], dtype=torch.float32, device=device),
        )

    Xt, yt, wt = tensors(train)
    has_val = len(val["y"]) > 0
    Xv, yv, wv = tensors(val) if has_val else (Xt, yt, wt)
    select_on = "val" if has_val else "train"
    if not has_val:
        log.warning("train-classifier: no validation samples; selecting the epoch on TRAINING building IoU")

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"iou": -1.0}
    n = len(yt)
    for epoch in range(1, c.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        total, weight = 0.0, 0.0
        for s in range(0, n, c.batch_size):
            idx = order[s : s + c.batch_size]
            logits = model(Xt[idx])
            loss_sum, weight_sum = weighted_ce_sums(logits, yt[idx], cw, wt[idx])
            loss = loss_sum / weight_sum.clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss_sum.detach())
            weight += float(weight_sum)
        sched.step()
        val_loss, dense, sampled = _evaluate(model, Xv, yv, wv, cw, max(c.batch_size, 4096), scheme)
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": total / max(weight, 1e-12),
            f"{select_on}_loss": val_loss,
            f"{select_on}_building_iou": dense["building_iou"],
            f"{select_on}_building_iou_sampled": sampled["building_iou"],
        }
        history.append(row)
        log.info(
            "train-classifier: epoch %d/%d train loss %.4f %s loss %.4f building IoU %.4f (sampled pixels %.4f)",
            epoch, c.epochs, row["train_loss"], select_on, val_loss, dense["building_iou"], sampled["building_iou"],
        )
        if dense["building_iou"] > best["iou"]:
            best = {
                "iou": dense["building_iou"], "epoch": epoch, "state": copy.deepcopy(model.state_dict()),
                "dense": dense, "sampled": sampled, "loss": val_loss,
            }
    model.load_state_dict(best["state"])
    model.eval()
    record = {
        "selected_on": f"{select_on} building IoU (dense estimate)",
        "epoch": best["epoch"],
        select_on: best["dense"],
        f"{select_on}_sampled_pixels": best["sampled"],
        f"{select_on}_loss": best["loss"],
        "history": history,
        "device": str(device),
    }
    return model.cpu(), record


def train_baseline(
    cfg: Config, train: dict[str, np.ndarray], val: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray,
    scheme: ClassScheme,
) -> dict[str, Any]:
    """scikit-learn LogisticRegression(class_weight='balanced') on the standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    scale = np.where(std > 1e-6, std, 1.0)
    X, y = train["X"], train["y"]
    if len(y) > BASELINE_MAX_SAMPLES:
        keep = np.random.default_rng(cfg.seed).choice(len(y), BASELINE_MAX_SAMPLES, replace=False)
        X, y = X[keep], y[keep]
        log.info("baseline: fitting on a seeded subsample of %d training samples", BASELINE_MAX_SAMPLES)
    if len(np.unique(y)) < 2:
        raise StageError("baseline: the training samples hold only one class")
    max_iter = 300
    clf = LogisticRegression(class_weight="balanced", max_iter=max_iter, random_state=cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below as "converged"
        clf.fit((X - mean) / scale, y)
    iterations = int(np.max(clf.n_iter_))
    out: dict[str, Any] = {
        "model": f"sklearn LogisticRegression(class_weight='balanced', max_iter={max_iter}) on standardised features",
        "train_samples": int(len(y)),
        "iterations": iterations,
        "converged": iterations < max_iter,
        "seconds": 0.0,
    }
    if iterations >= max_iter:
        log.info("baseline: logistic regression stopped at max_iter=%d before converging", max_iter)
    if len(val["y"]):
        proba = clf.predict_proba((val["X"] - mean) / scale)
        p_building = proba[:, np.isin(clf.classes_, scheme.building)].sum(1)
        out["val"], out["val_sampled_pixels"] = _building_metrics(p_building, val["y"], val["w"], scheme)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out



def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """The `train-classifier` stage: features/ -> train-classifier/best.pt; returns metrics.json's content."""
    paths = RunPaths.of(cfg)
    feat_dir, out_dir = paths.features, paths.classifier
    meta = features_store.read_meta(feat_dir)
    c = cfg.classifier
    settings = {k: getattr(c, k) for k in ("hidden", "dropout", "epochs", "batch_size", "lr", "weight_decay",
                                           "step_size", "gamma", "class_weights", "class_weighting", "baseline")}
    metrics_path, ckpt_path = paths.classifier_metrics, paths.classifier_checkpoint
    key = digest({"features": meta.get("key"), "settings": settings, "seed": cfg.seed})
    if not overwrite and is_fresh(metrics_path, key):
        log.info("train-classifier: %s is complete (same features and settings); skipping", out_dir)
        return {**(read_record(metrics_path) or {}), "skipped": True}
    unmark(metrics_path)

    t0 = time.perf_counter()
    train = features_store.load_features(feat_dir, "train")
    val = features_store.load_features(feat_dir, "val")
    if len(np.unique(train["y"])) < 2:
        raise StageError(f"{feat_dir}: the training samples hold only one class; cannot train a classifier")
    mean, std = features_store.read_stats(paths.features_stats)
    scheme = scheme_for(meta.get("classes"))
    px = meta["class_pixels"]
    class_weights, source = resolve_class_weights(c.class_weights, [px[n] for n in scheme.classes],
                                                  c.class_weighting, "classifier.class_weights")
    log.info("train-classifier: %d classes %s, class weights %s (%s; train mask pixels %s)", scheme.k,
             list(scheme.classes), [round(float(v), 4) for v in class_weights], source, px)
    random_backbone = meta["backbone"]["weights"] == "random"
    if random_backbone:
        log.warning("train-classifier: features come from a RANDOM backbone; metrics are not ImageNet-comparable")
    log.info("train-classifier: %d train / %d val samples of %d channels", len(train["y"]), len(val["y"]),
             train["X"].shape[1])

    model, record = train_mlp(cfg, train, val, mean, std, class_weights, scheme)
    mlp_seconds = time.perf_counter() - t0
    baseline = None
    if c.baseline:
        baseline = train_baseline(cfg, train, val, mean, std, scheme)
        write_json(out_dir / "baseline.json", {**baseline, **({"warning": meta.get("warning")} if random_backbone else {})})

    selected = record.get("val") or record.get("train")
    metrics: dict[str, Any] = {
        "features_key": meta.get("key"),
        "settings": settings,
        "seed": cfg.seed,
        "backbone": meta["backbone"],
        "layers": meta["layers"],
        "classes": list(scheme.classes),
        "class_weights": class_weights.tolist(),
        "class_weights_source": source,
        "class_pixels": px,
        "samples": {"train": int(len(train["y"])), "val": int(len(val["y"]))},
        "mlp": {k: v for k, v in record.items() if k != "history"},
        "baseline": baseline,
        "history": record["history"],
        "seconds": {"mlp": round(mlp_seconds, 2), "baseline": baseline["seconds"] if baseline else None},
    }
    if random_backbone:
        metrics["warning"] = "BACKBONE WEIGHTS ARE RANDOM: these metrics do not reflect ImageNet features"
    checkpoint = {
        "model": model.state_dict(),
        "in_channels": int(model.in_channels),
        "hidden": int(c.hidden),
        "dropout": float(c.dropout),
        "layers": list(meta["layers"]),
        "backbone": dict(meta["backbone"]),
        "classes": list(scheme.classes),
        "class_weights": [float(v) for v in class_weights],
        "epoch": int(record["epoch"]),
        "metrics": _to_python(selected),
        "config": _to_python(cfg.to_dict()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt_path, checkpoint)
    history = record["history"]
    split = "val" if "val_loss" in history[0] else "train"
    write_learning_curve(
        out_dir / "learning_curve.png", [h["epoch"] for h in history],
        {"train": [h["train_loss"] for h in history], split: [h[f"{split}_loss"] for h in history]},
        {f"{split} building IoU": [h[f"{split}_building_iou"] for h in history],
         "(sampled pixels)": [h[f"{split}_building_iou_sampled"] for h in history]},
        "weighted cross entropy", "building IoU",
        f"{cfg.name}: MLP, best epoch {record['epoch']}" + (" (RANDOM backbone)" if random_backbone else ""),
    )  # fmt: skip
    metrics = write_record(metrics_path, key, [ckpt_path], **_to_python(metrics))
    summary = f"MLP building IoU {selected['building_iou']:.4f}"
    if baseline and "val" in baseline:
        summary += f", logistic-regression baseline {baseline['val']['building_iou']:.4f}"
    log.info("train-classifier: %s (epoch %d) -> %s", summary, record["epoch"], ckpt_path)
    return metrics
