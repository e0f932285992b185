"""A tiny train-segmenter project built by hand: tile outputs, a classifier checkpoint and a config.

`make_project(root, ...)` writes `<root>/outputs/<name>/tile/` (GeoTIFF patches + manifest, via
`fake_tiles.write_fake_tiles`), `<root>/outputs/<name>/train-classifier/best.pt` (a randomly initialised
MLP saved per the contract, so no features stage is needed) and `<root>/config.yaml`. Runs with another
`name` (`--set name=other`) reuse the same inputs through `copy_inputs`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from fake_tiles import write_fake_tiles

from footprints.model.backbone import hypercolumn_channels
from footprints.model.mlp import MLP

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["input", "conv1_1"]  # 67 channels; the backbone stops after its first conv: fast on a CPU


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright rectangles (buildings) on a noisy darker ground, a strip of nodata (255) on the right."""
    rgb = rng.integers(20, 90, size=(size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        r, c = rng.integers(0, size - 12, 2)
        h, w = rng.integers(5, 12, 2)
        rgb[r : r + h, c : c + w] = rng.integers(170, 250, 3, dtype=np.uint8)
        mask[r : r + h, c : c + w] = 1
    mask[:, -3:] = 255
    rgb[:, -3:] = 0
    return rgb, mask


def make_project(
    root: Path,
    name: str = "t",
    patch: int = 32,
    scenes: tuple[int, int] = (2, 1),
    scene_size: int = 64,
    hidden: int = 8,
    dropout: float = 0.5,
    segmenter: dict | None = None,
) -> Path:
    """Write tile outputs, a classifier checkpoint and a config; returns the config path."""
    rng = np.random.default_rng(0)
    out = root / "outputs" / name
    specs = []
    for split, n in zip(("train", "val"), scenes, strict=True):
        for i in range(n):
            rgb, mask = _scene(rng, scene_size)
            specs.append((f"{split}{i}", split, rgb, mask))
    tile_dir = out / "tile"
    tile_dir.mkdir(parents=True, exist_ok=True)
    write_fake_tiles(tile_dir, specs, patch)

    torch.manual_seed(0)
    c = hypercolumn_channels(LAYERS)
    mlp = MLP(c, hidden=hidden, dropout=dropout, mean=torch.rand(c) * 50, std=torch.rand(c) * 20 + 5)
    clf = {
        "model": mlp.state_dict(), "in_channels": c, "hidden": hidden, "dropout": dropout, "layers": LAYERS,
        "backbone": {"weights": "random", "normalization": "torchvision"}, "class_weights": [0.6, 3.0],
        "epoch": 1, "metrics": {}, "config": {"tile": {"size": patch, "target_gsd": None}},
    }  # fmt: skip
    (out / "train-classifier").mkdir(parents=True, exist_ok=True)
    torch.save(clf, out / "train-classifier" / "best.pt")

    seg = {
        "epochs": 2, "batch_size": 3, "lr": 0.001, "step_size": 1, "gamma": 0.5, "deterministic": True,
        "overlays": 2, "device": "cpu",
    }  # fmt: skip
    seg.update(segmenter or {})
    cfg = {
        "name": name,
        "output_root": str(root / "outputs"),
        "seed": 3,
        "tile": {"size": patch, "stride": patch, "target": "binary"},  # fake_tiles writes 0/1 masks
        "backbone": {"weights": "random", "layers": LAYERS},
        "segmenter": seg,
        "cluster": {"workers": 0},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy_inputs(root: Path, src: str, dst: str) -> None:
    """Give run `dst` the same tile outputs and classifier checkpoint as run `src`."""
    for stage in ("tile", "train-classifier"):
        shutil.copytree(root / "outputs" / src / stage, root / "outputs" / dst / stage, dirs_exist_ok=True)


def train_command(config: Path, *args: str, hook: str | None = None) -> list[str]:
    """`footprints train-segmenter --config CONFIG ARGS`, through tests/train_hooks.py when a `hook` spec
    (e.g. "2:SIGKILL:step", see `train_hooks.SignalAt`) is given."""
    prefix = [str(REPO / "tests" / "train_hooks.py"), hook] if hook else ["-m", "footprints.cli"]
    return [sys.executable, *prefix, "train-segmenter", "--config", str(config), *args]


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None, hook: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`footprints train-segmenter --config CONFIG ARGS` in a fresh process (with `hook`, see train_command)."""
    full_env = {**os.environ, **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run(train_command(config, *args, hook=hook), cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_segmenter(hidden: int, tile_size: int) -> tuple[torch.nn.Module, dict]:
    """A tiny real segmenter (random VGG16 pool layers, seeded) and its checkpoint meta: for tests that need a
    checkpoint file predict can load, without training one."""
    from footprints.model.backbone import resolve_layers
    from footprints.model.segmenter import build_segmenter

    layers = resolve_layers("pool")
    meta = {"layers": layers, "in_channels": hypercolumn_channels(layers), "hidden": hidden, "stride": 2,
            "backbone": {"weights": "random", "normalization": "torchvision"}, "target_gsd": None,
            "tile_size": tile_size}
    torch.manual_seed(0)
    return build_segmenter(meta), meta
