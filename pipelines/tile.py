"""Stage 1, `tile`: scenes -> georeferenced patches with masks, a manifest and a scene-level split.

`python -m pipelines.tile --config configs/demo.yaml [--set tile.size=256] [--overwrite]`
"""

from __future__ import annotations

import sys
from typing import Any

from footprints.config import Config
from footprints.tiling import run_tile


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Read the scenes under `data.root`, write outputs/<name>/tile/ (patches, manifest.csv, summary.json)."""
    return run_tile(cfg, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    from footprints.cli import main as cli_main

    return cli_main(["tile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
