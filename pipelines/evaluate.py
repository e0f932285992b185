"""Stage 6, `evaluate`: pixel IoU/F1, polygon F1 at IoU 0.5 and the xView2 localisation F1.

    python -m pipelines.evaluate --config configs/demo.yaml [--overwrite]

The same as `footprints evaluate ...` (same options and exit codes); the library code is `footprints.stages.evaluate`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("evaluate"))
