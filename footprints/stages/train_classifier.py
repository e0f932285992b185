"""Stage `train-classifier`: the shallow class-weighted MLP on sampled hypercolumns, and a baseline.

Class weights (`footprints.model.losses`) come from the training masks (features/meta.json `class_pixels`), or
from `classifier.class_weights` when set.

The loss. Samples are drawn class-balanced per patch, so their class frequencies are not the masks'.
Each sample therefore carries `w`, the number of mask pixels it stands for; the loss weights sample i by
`class_weight[y_i] * w_i` (normalised per batch), which is an unbiased estimate of the class-weighted
cross entropy over every pixel of the training masks: the objective the dense segmenter trains on later.
Plain class weights on balanced samples would count the class imbalance twice (a building prior of the
background-to-building pixel ratio, `class_pixels` in metrics.json).

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
from ..contracts.model_gsd import TRAINING_GSD, training_gsd
from ..contracts.paths import RunPaths
from ..errors import StageError
from ..model.device import resolve_device
from ..model.domain import REFERENCE_KEY
from ..model.losses import resolve_class_weights, weighted_ce_sums
from ..model.mlp import MLP, train_epoch
from ..scenes.targets import ClassScheme, scheme_for
from ..scoring.metrics import confusion, pixel_metrics
from ..scoring.plots import write_learning_curve
from ..training.data import derive_seed
from ..training.domain_reference import build_reference
from ..training.finetune import check_compatible, describe_shift, load_parent

log = logging.getLogger(__name__)

# logistic regression on more rows than this uses a seeded subsample: 40,000 x 4,227 channels is 0.7 GB in
# float32, 1.4 GB once scikit-learn's lbfgs has its float64 copy
BASELINE_MAX_SAMPLES = 40_000


class _Confusions:
    """Building confusion counts accumulated piece by piece: weighted by `w` (the dense-mask estimate) and
    over the sampled pixels as they are. A pixel is predicted a building when the probabilities of the
    building classes sum to 0.5 or more, the rule predict uses."""

    def __init__(self, scheme: ClassScheme):
        self.scheme = scheme
        self.dense = np.zeros(4)
        self.sampled = np.zeros(4)

    def add(self, p_building: Any, y: Any, w: Any) -> None:
        pred = np.asarray(p_building) >= 0.5
        truth = np.isin(np.asarray(y), self.scheme.building)
        self.dense += confusion(pred, truth, ignore=None, weight=np.asarray(w))
        self.sampled += confusion(pred, truth, ignore=None)

    def metrics(self) -> tuple[dict, dict]:
        """(dense-estimate, sampled-pixel) building metrics."""
        return pixel_metrics(*self.dense), pixel_metrics(*self.sampled)


def _evaluate(
    model: torch.nn.Module, data: features_store.SplitReader, cw: torch.Tensor, batch: int, scheme: ClassScheme,
    device: torch.device,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(weighted loss, dense-estimate metrics, sampled-pixel metrics) of `model` on a split, piece by piece."""
    model.eval()
    counts = _Confusions(scheme)
    loss_sum, weight_sum = 0.0, 0.0
    with torch.inference_mode():
        for chunk in data.chunks():
            piece = data.read(chunk)
            X, y, w = (torch.from_numpy(piece[k]).to(device) for k in ("X", "y", "w"))
            for s in range(0, len(y), batch):
                logits = model(X[s : s + batch])
                yb, wb = y[s : s + batch], w[s : s + batch]
                ls, ws = weighted_ce_sums(logits, yb, cw, wb)
                loss_sum += float(ls)
                weight_sum += float(ws)
                p = torch.softmax(logits.float(), 1)[:, list(scheme.building)].sum(1)
                counts.add(p.cpu().numpy(), yb.cpu().numpy(), wb.cpu().numpy())
    dense, sampled = counts.metrics()
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
    train: features_store.SplitReader,
    val: features_store.SplitReader,
    mean: np.ndarray,
    std: np.ndarray,
    class_weights: np.ndarray,
    scheme: ClassScheme,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[MLP, dict[str, Any]]:
    """Train the MLP with Adam + StepLR; return the best model (on val building IoU) and its record.

    `init` (fine-tuning) is a parent MLP's state dict, normaliser included: training starts from it, and it is
    evaluated first as epoch 0 (record `start`), so that an epoch must beat the parent on this run's validation
    split to replace it, as dense epochs must beat the converted classifier.

    Each epoch streams the training shards through a shuffle buffer of `classifier.shuffle_buffer` samples
    (pieces of shards in a seeded random order, shuffled within each fill; a split that fits in the buffer
    gets a full shuffle, as when the whole matrix was in memory): memory is bounded by the buffer, not by
    the number of samples, and only a buffer's fill at a time goes to the device. The same seed gives the
    same model.
    """
    c = cfg.classifier
    device = resolve_device(c.device, key="classifier.device")
    torch.manual_seed(cfg.seed)
    model = MLP(train.channels, hidden=c.hidden, dropout=c.dropout, mean=mean, std=std, num_classes=scheme.k)
    if init is not None:
        model.load_state_dict(init)  # the parent's weights and normaliser (footprints.training.finetune)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, c.step_size), gamma=c.gamma)
    cw = torch.as_tensor(class_weights, dtype=torch.float32, device=device)

    has_val = val.n > 0
    select_on = "val" if has_val else "train"
    if not has_val:
        log.warning("train-classifier: no validation samples; selecting the epoch on TRAINING building IoU")
    eval_batch = max(c.batch_size, 4096)

    gen = torch.Generator().manual_seed(cfg.seed)  # the order within each fill
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"iou": -1.0}
    start: dict[str, Any] | None = None
    if init is not None:
        loss0, dense0, sampled0 = _evaluate(model, val if has_val else train, cw, eval_batch, scheme, device)
        start = {"epoch": 0, "train_loss": None, f"{select_on}_loss": loss0,
                 f"{select_on}_building_iou": dense0["building_iou"],
                 f"{select_on}_building_iou_sampled": sampled0["building_iou"]}
        log.info("train-classifier: epoch 0 (the parent model): %s loss %.4f building IoU %.4f (sampled pixels "
                 "%.4f)", select_on, loss0, dense0["building_iou"], sampled0["building_iou"])
        best = {"iou": dense0["building_iou"], "epoch": 0, "state": copy.deepcopy(model.state_dict()),
                "dense": dense0, "sampled": sampled0, "loss": loss0}
    for epoch in range(1, c.epochs + 1):
        pieces = np.random.default_rng(derive_seed(cfg.seed, "classifier", epoch))  # the order of the pieces
        fills = ((f["X"], f["y"], f["w"], None) for f in train.buffers(pieces, c.shuffle_buffer))
        train_loss = train_epoch(model, opt, fills, cw, c.batch_size, gen, device)
        sched.step()
        val_loss, dense, sampled = _evaluate(model, val if has_val else train, cw, eval_batch, scheme, device)
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": train_loss,
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
        **({"start": start} if start is not None else {}),
        "device": str(device),
        "shuffle_buffer": int(c.shuffle_buffer),
    }
    return model.cpu(), record


def _subsample(data: features_store.SplitReader, n: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded sample of at most `n` samples of a split (all of them when it has fewer), read piece by
    piece: only the sample is ever in memory."""
    keep = np.sort(np.random.default_rng(seed).choice(data.n, n, replace=False)) if data.n > n else None
    parts = []
    first = 0
    for chunk in data.chunks():
        rows = chunk[2] - chunk[1]
        if keep is None:
            parts.append(data.read(chunk))
        else:
            sel = keep[(keep >= first) & (keep < first + rows)] - first
            if len(sel):
                piece = data.read(chunk)
                parts.append({k: piece[k][sel] for k in ("X", "y", "w")})
        first += rows
    if not parts:
        return {"X": np.zeros((0, data.channels), np.float32), "y": np.zeros(0, np.int64), "w": np.zeros(0, np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in ("X", "y", "w")}


def train_baseline(
    cfg: Config, train: features_store.SplitReader, val: features_store.SplitReader, mean: np.ndarray,
    std: np.ndarray, scheme: ClassScheme,
) -> dict[str, Any]:
    """scikit-learn LogisticRegression(class_weight='balanced') on the standardised features of a seeded
    sample of at most BASELINE_MAX_SAMPLES training samples; scored on every validation sample, piece by piece."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    scale = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    mean32 = mean.astype(np.float32)
    sample = _subsample(train, BASELINE_MAX_SAMPLES, cfg.seed)
    X, y = sample["X"], sample["y"]
    if train.n > BASELINE_MAX_SAMPLES:
        log.info("baseline: fitting on a seeded subsample of %d of %d training samples", len(y), train.n)
    if len(np.unique(y)) < 2:
        raise StageError("baseline: the training samples hold only one class")
    X -= mean32
    X /= scale
    max_iter = 300
    clf = LogisticRegression(class_weight="balanced", max_iter=max_iter, random_state=cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below as "converged"
        clf.fit(X, y)
    del X, sample
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
    if val.n:
        counts = _Confusions(scheme)
        building = np.isin(clf.classes_, scheme.building)
        for chunk in val.chunks():
            piece = val.read(chunk)
            proba = clf.predict_proba((piece["X"] - mean32) / scale)
            counts.add(proba[:, building].sum(1), piece["y"], piece["w"])
        out["val"], out["val_sampled_pixels"] = counts.metrics()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """The `train-classifier` stage: features/ -> train-classifier/best.pt; returns metrics.json's content."""
    paths = RunPaths.of(cfg)
    feat_dir, out_dir = paths.features, paths.classifier
    meta = features_store.read_meta(feat_dir)
    c = cfg.classifier
    settings = {k: getattr(c, k) for k in ("hidden", "dropout", "epochs", "batch_size", "lr", "weight_decay",
                                           "step_size", "gamma", "class_weights", "class_weighting", "baseline",
                                           "shuffle_buffer")}
    metrics_path, ckpt_path = paths.classifier_metrics, paths.classifier_checkpoint
    # fine-tuning (classifier.init_from): the parent's digest joins the key (a changed parent retrains); a run
    # without one keeps the key it always had
    parent = load_parent(c.init_from, own=(paths.classifier, paths.segmenter)) if c.init_from is not None else None
    if parent is not None:
        check_compatible(parent, meta, c.hidden)  # before anything is logged or touched
    key = digest({"features": meta.get("key"), "settings": settings, "seed": cfg.seed,
                  **({"parent": parent.digest} if parent is not None else {})})
    if not overwrite and is_fresh(metrics_path, key):
        log.info("train-classifier: %s is complete (same features and settings); skipping", out_dir)
        return {**(read_record(metrics_path) or {}), "skipped": True}
    unmark(metrics_path)

    t0 = time.perf_counter()
    train = features_store.SplitReader(feat_dir, "train")
    val = features_store.SplitReader(feat_dir, "val")
    mean, std = features_store.read_stats(paths.features_stats)
    scheme = scheme_for(meta.get("classes"))
    px = meta["class_pixels"]
    if sum(int(px[n]) > 0 for n in scheme.classes) < 2 or train.n == 0:
        raise StageError(f"{feat_dir}: the training samples hold only one class; cannot train a classifier")
    class_weights, source = resolve_class_weights(c.class_weights, [px[n] for n in scheme.classes],
                                                  c.class_weighting, "classifier.class_weights")
    log.info("train-classifier: %d classes %s, class weights %s (%s; train mask pixels %s)", scheme.k,
             list(scheme.classes), [round(float(v), 4) for v in class_weights], source, px)
    random_backbone = meta["backbone"]["weights"] == "random"
    if random_backbone:
        log.warning("train-classifier: features come from a RANDOM backbone; metrics are not ImageNet-comparable")
    log.info("train-classifier: %d train / %d val samples of %d channels (%.2f GB), a shuffle buffer of %d "
             "samples", train.n, val.n, train.channels, train.n * train.channels * 4 / 1e9, c.shuffle_buffer)

    if parent is not None:
        log.info("train-classifier: fine-tuning the %s model %s (digest %s), with its feature normaliser (%s "
                 "on this run's training features)", parent.kind, parent.path, parent.digest,
                 describe_shift(parent, mean, std))
    model, record = train_mlp(cfg, train, val, mean, std, class_weights, scheme,
                              init=parent.state if parent is not None else None)
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
        "samples": {"train": int(train.n), "val": int(val.n)},
        "mlp": {k: v for k, v in record.items() if k != "history"},
        "baseline": baseline,
        "history": record["history"],
        "seconds": {"mlp": round(mlp_seconds, 2), "baseline": baseline["seconds"] if baseline else None},
    }
    if random_backbone:
        metrics["warning"] = "BACKBONE WEIGHTS ARE RANDOM: these metrics do not reflect ImageNet features"
    if parent is not None:
        metrics["parent"] = parent.record()
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
        # the training scenes' GSD (median, range): predict reads other scenes at it (predict.match_model_gsd)
        TRAINING_GSD: training_gsd(paths.tile),
    }
    if parent is not None:
        checkpoint["parent"] = parent.record()  # what it was fine-tuned from: path, file digest, kind
    # what the training pixels looked like, in the model's own standardised units: predict's out-of-domain check
    reference = build_reference(feat_dir, meta["layers"], model.mean.numpy(), model.std.numpy(), cfg.seed)
    if reference is not None:
        checkpoint[REFERENCE_KEY] = reference
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt_path, checkpoint)
    history = ([record["start"]] if "start" in record else []) + record["history"]  # the parent: epoch 0
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
