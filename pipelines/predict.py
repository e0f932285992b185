"""Stage 5, `predict`: whole scenes -> blended probability COGs -> footprint polygons (GeoJSON, GPKG).

    python -m pipelines.predict --config configs/demo.yaml [--checkpoint best.pt --input SCENES --output out.geojson] [--overwrite]

The same as `footprints predict ...` (same options and exit codes); the library code is `footprints.stages.predict`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("predict"))
