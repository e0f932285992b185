"""`damage` (after train-damage): a damage grade on every footprint of the test split, scored where the post
labels grade.

    python -m pipelines.damage --config configs/xview2-joplin.yaml [--overwrite]
    python -m pipelines.damage --checkpoint outputs/xview2-joplin/train-damage/best.pt \
        --pre PRE.tif --post POST.tif --footprints theirs.geojson --output graded.geojson

The same as `footprints damage ...` (same options and exit codes); the library code is `footprints.stages.damage`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("damage"))
