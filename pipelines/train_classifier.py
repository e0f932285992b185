"""Stage 3, `train-classifier`: the shallow class-weighted MLP and a logistic-regression baseline.

`python -m pipelines.train_classifier --config configs/demo.yaml [--set classifier.epochs=5] [--overwrite]`
"""

from __future__ import annotations

import sys
from typing import Any

from footprints.classifier import train_classifier
from footprints.config import Config


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Read outputs/<name>/features/, write outputs/<name>/train-classifier/ (best.pt, metrics, curve)."""
    return train_classifier(cfg, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    from footprints.cli import main as cli_main

    return cli_main(["train-classifier", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
