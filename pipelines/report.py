"""`report`: one self-contained HTML map of a run (imagery, probability, footprints, metrics), offline.

    python -m pipelines.report --config configs/demo.yaml [--output PATH]
    python -m pipelines.report --predictions out.geojson [--input SCENE.tif DIR/ ...] [--output PATH]

The same as `footprints report ...`; the library code is `footprints.report` (`run_report`). The first form
reads `outputs/<name>/` and writes `outputs/<name>/report/index.html`; the second reads what
`predict --input ... --output out.geojson` wrote and writes `out_report.html` beside it. `evaluate` and
`predict --input` write theirs at their end.
"""

from __future__ import annotations

import sys

from pipelines import run_command

if __name__ == "__main__":
    sys.exit(run_command("report"))
