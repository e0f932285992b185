"""Stage 6, `evaluate`: pixel IoU/F1 (xView2 localisation F1), polygon F1 at IoU >= 0.5 (SpaceNet), report.

`python -m pipelines.evaluate --config configs/demo.yaml [--overwrite]`

Reads `outputs/<name>/predict/` (`<scene>_prob.tif`, `<scene>.gpkg`, `calibration.json`) and the truth of the
test-split scenes; writes `outputs/<name>/evaluate/metrics.json`, `report.md` and `overlay_<scene>.png`.
"""

from __future__ import annotations

import sys
from typing import Any

from footprints.config import Config
from footprints.evaluate import run_evaluate


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate the run's predictions; returns {"overall": {"pixel", "polygon"}, "per_scene", "metrics_path", ...}."""
    return run_evaluate(cfg, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    from footprints.cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
