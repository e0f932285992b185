"""Stage 1, `tile`: scenes -> georeferenced patches with masks, a manifest and a scene-level split.

    python -m pipelines.tile --config configs/demo.yaml [--set tile.size=256] [--overwrite]

The same as `footprints tile ...` (same options and exit codes); the library code is `footprints.stages.tile`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("tile"))
