"""Stage 2, `features`: class-balanced pixel samples and their VGG16 zoom-out hypercolumns.

`python -m pipelines.features --config configs/demo.yaml [--set features.per_class=32] [--overwrite]`
"""

from __future__ import annotations

import sys
from typing import Any

from footprints.config import Config
from footprints.hypercolumns import extract_features


def run(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Read outputs/<name>/tile/, write outputs/<name>/features/ (shards, stats.npz, meta.json)."""
    return extract_features(cfg, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    from footprints.cli import main as cli_main

    return cli_main(["features", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
