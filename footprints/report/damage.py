"""The report's damage grades (issue 26): the graded footprints' colours for the map, and the page's section.

A run with a `damage/` folder (`RunPaths.damage_geojson`, `damage_metrics`) adds to the page:
- on the map, the layer "Damage grades": each scene's graded footprints (read like its other vectors, see
  `scene_payload.prepare`) filled in their grade's xView2 colour (`GRADE_COLOURS`, green / yellow / orange /
  red; the outline darker, as in the GeoPackage's QGIS style), with a legend;
- a section: the number of footprints of each grade (and of labelled truth buildings), and, when the test
  scenes have damage labels, the per-grade precision / recall / F1 / support, xView2's damage F1 (the
  harmonic mean of the four F1), the damaged/undamaged F1 and their macro mean, the confusion of the grades
  (rows truth, columns predicted), the same per pixel, and xView2's overall score.

`damage_payload` is what the page's script draws from; `damage_section` the HTML. A run without a damage
folder gets neither: its page is the one it always had.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..contracts.gpkg_style import DAMAGE_OTHER, darker
from ..scenes.grades import DAMAGE_KEY, GRADE_COLOURS, GRADES, PROBABILITY_KEYS
from .page import fmt
from .scene_payload import PreparedScene

OTHER = "other"  # a feature whose grade is none of GRADES: ungraded (None), or an unknown value
FILL_OPACITY = 0.55  # the map's fill; the legend's swatches show the same


def hex_colour(rgb: str) -> str:
    """"R,G,B" -> "#rrggbb"."""
    return "#" + "".join(f"{int(c):02x}" for c in rgb.split(","))


def grade_colours() -> dict[str, dict[str, str]]:
    """grade (and OTHER) -> {"fill", "outline"} as #rrggbb: xView2's colours, the outline darker."""
    colours = {g: {"fill": hex_colour(rgb), "outline": hex_colour(darker(rgb))} for g, rgb in GRADE_COLOURS.items()}
    colours[OTHER] = {"fill": hex_colour(DAMAGE_OTHER[1]), "outline": hex_colour(darker(DAMAGE_OTHER[1]))}
    return colours


def shown_counts(prepared: Sequence[PreparedScene]) -> dict[str, int]:
    """grade -> graded footprints on the page (OTHER for any other value), every grade present."""
    c = Counter(
        g if g in GRADES else OTHER
        for p in prepared
        for f in p.damage or []
        for g in [f["properties"].get(DAMAGE_KEY)]
    )
    out = {g: c.get(g, 0) for g in GRADES}
    if c.get(OTHER):
        out[OTHER] = c[OTHER]
    return out


def has_damage(prepared: Sequence[PreparedScene], metrics: Mapping[str, Any] | None) -> bool:
    return bool(metrics) or any(p.damage is not None for p in prepared)


def damage_payload(prepared: Sequence[PreparedScene]) -> dict[str, Any]:
    """The page data's `damage` member: the grades in order, their colours, each grade's probability
    property, and how many graded footprints the page holds (the script checks that it drew as many)."""
    counts = shown_counts(prepared)
    return {
        "grades": list(GRADES),
        "other": OTHER,
        "labels": {**{g: g for g in GRADES}, OTHER: DAMAGE_OTHER[0]},
        "colours": grade_colours(),
        "fill_opacity": FILL_OPACITY,
        "probability_keys": dict(PROBABILITY_KEYS),
        "counts": counts,
        "n": sum(counts.values()),
    }


def _number(v: Any) -> str:
    """A count (footprints, buildings, pixels): an integer where it is one."""
    if isinstance(v, bool) or v is None:
        return fmt(None)
    if isinstance(v, (int, float)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return fmt(float(v), 1) if isinstance(v, (int, float)) else fmt(v)


def _swatch(grade: str) -> str:
    c = grade_colours()[grade if grade in GRADE_COLOURS else OTHER]
    return (f'<i class="swatch" style="background:{c["fill"]};border-color:{c["outline"]};'
            f'opacity:{FILL_OPACITY + 0.3:g}"></i>')


def _grade_cell(grade: str) -> str:
    label = grade if grade in GRADES else DAMAGE_OTHER[0]
    return f'<th scope="row" data-grade="{html.escape(grade, quote=True)}">{_swatch(grade)}{html.escape(label)}</th>'


def _ungraded(metrics: Mapping[str, Any]) -> Any:
    """The run's ungraded footprints: metrics.json's `ungraded`, else the sum of its scenes' (None if unknown)."""
    if isinstance(metrics.get("ungraded"), (int, float)):
        return metrics["ungraded"]
    per_scene = metrics.get("per_scene")
    if isinstance(per_scene, Mapping) and per_scene:
        values = [s.get("ungraded") for s in per_scene.values() if isinstance(s, Mapping)]
        if values and all(isinstance(v, (int, float)) for v in values):
            return sum(values)
    return None


def counts_table(metrics: Mapping[str, Any], shown: Mapping[str, int], all_shown: bool) -> str:
    """The legend and the counts: a row per grade, its colour, the footprints graded so (the run's, from
    metrics.json; those on the page where the page shows fewer scenes or metrics.json has none) and the
    labelled truth buildings of that grade."""
    run_counts = metrics.get("counts") if isinstance(metrics.get("counts"), Mapping) else None
    truth = metrics.get("truth_counts") if isinstance(metrics.get("truth_counts"), Mapping) else None
    cols = ["graded footprints"] if run_counts is not None else []
    if run_counts is None or not all_shown:
        cols.append("on this page")
    if truth is not None:
        cols.append("truth buildings")
    ungraded = _ungraded(metrics)
    grades = list(GRADES) + ([OTHER] if OTHER in shown or ungraded else [])
    rows = []
    for g in grades:
        run_value = (run_counts or {}).get(g, 0) if g in GRADES else ungraded
        cells = {"graded footprints": run_value,
                 "on this page": shown.get(g, 0), "truth buildings": (truth or {}).get(g)}
        tds = "".join(f'<td data-col="{c}">{_number(cells[c])}</td>' for c in cols)
        rows.append(f"<tr>{_grade_cell(g)}{tds}</tr>")
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in cols)
    return (f'<table id="damage-counts"><caption>Damage grades: colours and counts</caption>'
            f'<thead><tr><th scope="col">grade</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def scores_table(scores: Mapping[str, Any], key: str, what: str) -> str:
    """Per-grade precision / recall / F1 / support (`damage_scores`'s dict), then xView2's damage F1 and the
    damaged/undamaged F1 and macro F1."""
    per_grade = scores.get("per_grade") or {}
    rows = []
    for g in GRADES:
        m = per_grade.get(g) or {}
        rows.append(f"<tr>{_grade_cell(g)}<td>{fmt(m.get('precision'))}</td><td>{fmt(m.get('recall'))}</td>"
                    f"<td>{fmt(m.get('f1'))}</td><td>{_number(m.get('support'))}</td></tr>")
    binary = scores.get("binary") or {}
    summary = [
        ("damage-f1", "damage F1 (harmonic mean of the four grades' F1)", scores.get("damage_f1")),
        ("undamaged-f1", "undamaged F1 (no-damage against the damaged grades)", binary.get("undamaged_f1")),
        ("damaged-f1", "damaged F1 (minor, major or destroyed against no-damage)", binary.get("damaged_f1")),
        ("macro-f1", "damaged/undamaged macro F1", binary.get("macro_f1")),
    ]
    for name, label, v in summary:
        rows.append(f'<tr class="summary" data-score="{name}"><th scope="row" colspan="3">{html.escape(label)}</th>'
                    f"<td>{fmt(v)}</td><td></td></tr>")
    return (f'<table id="damage-scores-{key}" class="damage-scores"><caption>{html.escape(what)}: per grade'
            '</caption><thead><tr><th scope="col">grade</th><th scope="col">precision</th>'
            '<th scope="col">recall</th><th scope="col">F1</th><th scope="col">support</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def confusion_table(scores: Mapping[str, Any], key: str, what: str) -> str:
    """The grades' confusion (rows truth, columns predicted; a 5th column "not found": truth that no
    footprint covered)."""
    confusion = scores.get("confusion") or []
    n_cols = max((len(r) for r in confusion), default=len(GRADES))
    cols = list(GRADES) + (["not found"] if n_cols > len(GRADES) else [])
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in cols)
    rows = []
    for g, row in zip(GRADES, confusion, strict=False):
        cells = "".join(f"<td>{_number(row[j] if j < len(row) else None)}</td>" for j in range(len(cols)))
        rows.append(f"<tr>{_grade_cell(g)}{cells}</tr>")
    return (f'<table id="damage-confusion-{key}" class="damage-confusion"><caption>{html.escape(what)}: '
            "confusion of the grades (rows: truth grade, columns: predicted grade)</caption>"
            f'<thead><tr><th scope="col">truth \\ predicted</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def damage_section(metrics: Mapping[str, Any] | None, prepared: Sequence[PreparedScene], all_shown: bool) -> str:
    """The page's "Damage grades" section (empty when the run has no damage outputs)."""
    if not has_damage(prepared, metrics):
        return ""
    metrics = metrics or {}
    shown = shown_counts(prepared)
    parts = [
        '<section id="damage"><h2>Damage grades (xView2)</h2>',
        '<p>Each footprint graded by the damage stage; on the map, the layer “Damage grades” fills each '
        "footprint with its grade’s colour (click one for its grade probabilities).</p>",
        counts_table(metrics, shown, all_shown),
    ]
    xview2 = metrics.get("xview2")
    if isinstance(xview2, Mapping):
        items = [("localisation F1", xview2.get("localisation_f1")), ("damage F1", xview2.get("damage_f1")),
                 ("xView2 score (0.3 × localisation F1 + 0.7 × damage F1)", xview2.get("score"))]
        rows = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td>{fmt(v)}</td></tr>' for k, v in items)
        parts.append(f'<table id="damage-xview2"><caption>xView2 score</caption><tbody>{rows}</tbody></table>')
    found = False
    for key, what in (("per_building", "Labelled truth buildings"), ("pixel", "Truth pixels (xView2’s way)")):
        scores = metrics.get(key)
        if isinstance(scores, Mapping):
            found = True
            slug = "buildings" if key == "per_building" else "pixels"
            parts.append(f'<div class="damage-tables">{scores_table(scores, slug, what)}'
                         f"{confusion_table(scores, slug, what)}</div>")
    if not found and metrics:
        parts.append('<p class="note">The test scenes have no damage labels: no damage scores.</p>')
    parts.append("</section>")
    return "".join(parts)


def damage_note(prepared: Sequence[PreparedScene]) -> str:
    """What the header adds to its footprint count (the graded footprints on the page)."""
    n = sum(len(p.damage or []) for p in prepared)
    return (f" {n} footprints graded by damage (layer “Damage grades”: no-damage green, minor yellow, "
            "major orange, destroyed red).")
