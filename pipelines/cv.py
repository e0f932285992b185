"""Cross-validation over scenes: every stage once per fold, test metrics pooled over all scenes.

    python -m pipelines.cv --config configs/demo.yaml [--overwrite]

The same as `footprints cv ...` (same options and exit codes); the library code is `footprints.runner.run_cv`.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("cv"))
