"""Stage 5, `predict`: whole scenes -> blended probability COGs -> footprint polygons (GeoJSON, GPKG).

    python -m pipelines.predict --config configs/demo.yaml [--overwrite]
    python -m pipelines.predict --checkpoint best.pt --input scenes/ more.tif --output out.geojson

Without --input it predicts the scenes of `predict.split` (default test) of outputs/<name>/tile/ into
outputs/<name>/predict/; the threshold and minimum building area come from the config, a stored
calibration, or a grid search on the validation split. The library code is `footprints.predict`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from footprints.config import Config


def run(
    cfg: Config,
    overwrite: bool = False,
    checkpoint: str | None = None,
    inputs: Sequence[str] | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Predict; returns {"geojson", "gpkg", "scenes", "failed", "skipped", "polygons", "threshold", ...}."""
    from footprints.predict import run_predict

    return run_predict(cfg, overwrite=overwrite, checkpoint=checkpoint, inputs=inputs, output=output)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.predict ARGS` = `footprints predict ARGS` (same exit codes)."""
    from footprints.cli import main as cli_main

    return cli_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
