"""Stage 3, `train-classifier`: the shallow class-weighted MLP and a logistic-regression baseline.

    python -m pipelines.train_classifier --config configs/demo.yaml [--set classifier.epochs=5] [--overwrite]

The same as `footprints train-classifier ...` (same options and exit codes); the library code is `footprints.stages.train_classifier`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("train-classifier"))
