"""Thin staged scripts: each module runs one command of `footprints` (the stages in `footprints.stages`).

Each is runnable on its own, with the same options and exit codes as the CLI:
`python -m pipelines.tile --config configs/demo.yaml` is `footprints tile --config configs/demo.yaml`.
"""

from __future__ import annotations

import sys


def run_command(command: str, argv: list[str] | None = None) -> int:
    """`footprints COMMAND ARGV` (ARGV defaults to this process's arguments)."""
    from footprints.cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])
