"""Stage 4, `train-segmenter`: the MLP as 1x1 convolutions, trained densely on whole patches.

    python -m pipelines.train_segmenter --config configs/demo.yaml [--load_saved_model] [--overwrite]

The same as `footprints train-segmenter ...` (same options and exit codes); the library code is `footprints.stages.train_segmenter`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("train-segmenter"))
