"""See the footprints: a self-contained offline HTML map report, and default QGIS styles in GeoPackages.

- `run_report(cfg, ...)`: what `footprints report` does.
- `report_for_run(run_dir)`: `outputs/<name>/report/index.html` from a run folder.
- `report_for_predictions(out.geojson, images=...)`: `out_report.html` beside `predict --input` outputs.
- `write_report(out_html, [ReportScene, ...], ...)`: the same from explicit inputs.
- A page shows at most `MAX_SCENES` scenes of a large run (`selection.py`) and says how many it has.
- `add_layer_style(gpkg, layer, kind)`: the GeoPackage `layer_styles` row QGIS applies on opening.
- A run graded by the damage stage (`damage/footprints.geojson`, `damage/metrics.json`) gets a "Damage
  grades" map layer and a section of counts and scores (`damage.py`); other pages are unchanged.
- A report replaces only a report footprints wrote (`is_footprints_report`: a generator line in its head);
  `check_report_path` refuses any other target (not `.html`/`.htm`, a folder, someone else's file).
"""

from __future__ import annotations

from ..contracts.gpkg_style import StyleError, add_layer_style, default_style, style_all
from .gather import (
    images_from_inputs,
    predicted_scene_ids,
    predictions_report_path,
    report_for_predictions,
    report_for_run,
    run_report,
)
from .html import MAX_BYTES, MAX_SIDE, check_report_path, is_footprints_report, write_report
from .scene import ReportScene
from .selection import MAX_SCENES

__all__ = [
    "MAX_BYTES",
    "MAX_SCENES",
    "MAX_SIDE",
    "ReportScene",
    "StyleError",
    "add_layer_style",
    "check_report_path",
    "default_style",
    "images_from_inputs",
    "is_footprints_report",
    "predicted_scene_ids",
    "predictions_report_path",
    "report_for_predictions",
    "report_for_run",
    "run_report",
    "style_all",
    "write_report",
]
