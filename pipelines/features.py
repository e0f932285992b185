"""Stage 2, `features`: class-balanced pixel samples and their VGG16 zoom-out hypercolumns.

    python -m pipelines.features --config configs/demo.yaml [--set features.per_class=32] [--overwrite]

The same as `footprints features ...` (same options and exit codes); the library code is `footprints.stages.features`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("features"))
