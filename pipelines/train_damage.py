"""`train-damage` (after predict, with a `damage:` section): the damage classifier on the training scenes'
graded buildings.

    python -m pipelines.train_damage --config configs/xview2-joplin.yaml [--overwrite]

The same as `footprints train-damage ...` (same options and exit codes); the library code is
`footprints.stages.train_damage`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("train-damage"))
