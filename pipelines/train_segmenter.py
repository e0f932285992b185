"""Stage train-segmenter: convert the MLP into 1x1 convolutions and train it densely on whole patches.

    python -m pipelines.train_segmenter --config configs/demo.yaml [--load_saved_model] [--overwrite]

Reads outputs/<name>/tile/ and outputs/<name>/train-classifier/best.pt; writes
outputs/<name>/train-segmenter/{last,best}.pt, history.json, metrics.json, learning_curve.png and
overlays/. On SIGUSR1/SIGTERM/SIGINT it checkpoints after the current step and exits with code 99.
The library code is `footprints.training`.
"""

from __future__ import annotations

import sys
from typing import Any

from footprints.config import Config


def run(cfg: Config, overwrite: bool = False, load_saved_model: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip when finished); returns paths, epochs done and the best validation IoU."""
    from footprints.signals import StopSignals

    # handlers first, torch second: a SLURM warning during the seconds of start-up must not kill the job
    with StopSignals() as stop:
        from footprints.training import train_segmenter

        return train_segmenter(cfg, overwrite=overwrite, load_saved_model=load_saved_model, stop=stop)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.train_segmenter ARGS` = `footprints train-segmenter ARGS` (same exit codes)."""
    from footprints.cli import main as cli_main

    return cli_main(["train-segmenter", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
