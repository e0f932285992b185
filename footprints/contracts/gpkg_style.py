"""A default QGIS style inside a GeoPackage (the `layer_styles` table), so the layer opens coloured.

QGIS looks for a table named `layer_styles` when it opens a GeoPackage layer and applies the row with
`f_table_schema = ''`, `f_table_name = <layer>`, `f_geometry_column = <geometry column>` and
`useAsDefault` true (QgsOgrUtils::loadStoredStyle). This module writes that row with the standard library's
sqlite3, creating the table the way QGIS does (through GDAL: FID `id`, the same columns and types) and
registering it in `gpkg_contents` as an `attributes` table, so the file stays a valid GeoPackage that GDAL,
pyogrio and QGIS all read.

Three styles: `probability` (graduated colours on `mean_prob`, for predicted footprints), `match`
(categories TP / FP / FN on `status`, or on `kind` + `status` when the layer mixes predictions and truths,
as `evaluate/matches` does) and `damage` (categories on the xView2 grade of `damage/footprints.gpkg`'s
`damage` field: green / yellow / orange / red, grey for any other value).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

from ..scenes.grades import DAMAGE_KEY, GRADE_COLOURS

log = logging.getLogger(__name__)

StyleKind = Literal["auto", "probability", "match", "damage"]

# (lower, upper, RGB) classes of mean_prob: ColorBrewer YlOrRd, darker = surer
PROB_CLASSES: tuple[tuple[float, float, str], ...] = (
    (0.0, 0.5, "255,255,178"),
    (0.5, 0.6, "254,204,92"),
    (0.6, 0.7, "253,141,60"),
    (0.7, 0.8, "240,59,32"),
    (0.8, 0.9, "189,0,38"),
    (0.9, 1.0, "128,0,38"),
)
# match categories: value -> (label, fill RGBA or None for outline only, outline RGB, dashed)
STYLE_MARK = "(written by footprints)"  # ends the description of every style footprints adds: how its files are known

MATCH_COLOURS = {
    "TP": ("TP: prediction matched to a truth (IoU >= threshold)", "26,150,65,110", "0,104,55", False),
    "FP": ("FP: prediction with no matching truth", "215,25,28,110", "165,0,38", False),
    "FN": ("FN: missed truth outline", None, "255,127,0", True),
    "truth TP": ("truth outline that was found", None, "90,90,90", False),
}

# the fallback category ("all other values"): no grade (the damage stage leaves a footprint without valid
# pixels in both images ungraded: NULL), or a value that is no grade
DAMAGE_OTHER = ("ungraded", "160,160,160")


_CREATE = (
    'CREATE TABLE "layer_styles" ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, '
    '"f_table_catalog" TEXT(256), "f_table_schema" TEXT(256), "f_table_name" TEXT(256), '
    '"f_geometry_column" TEXT(256), "styleName" TEXT(30), "styleQML" TEXT, "styleSLD" TEXT, '
    '"useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30), '
    "\"update_time\" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)


class StyleError(ValueError):
    """The GeoPackage or layer cannot take the style (not a GeoPackage, no such layer, missing field)."""


# ---------------------------------------------------------------------------------------------- QML
def _fill_symbol(name: str, fill: str | None, outline: str, width_mm: float, dashed: bool = False) -> str:
    props = {
        "color": fill or "0,0,0,0",
        "style": "solid" if fill else "no",
        "outline_color": outline + ",255",
        "outline_style": "dash" if dashed else "solid",
        "outline_width": f"{width_mm:g}",
        "outline_width_unit": "MM",
        "joinstyle": "miter",
    }
    lines = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (
        f'<symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">'
        f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">{lines}</layer></symbol>'
    )


def _qml(renderer: str) -> str:
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology" hasScaleBasedVisibilityFlag="0">\n'
        f"{renderer}\n<layerGeometryType>2</layerGeometryType>\n</qgis>\n"
    )


def probability_qml(field: str = "mean_prob") -> str:
    """Graduated fill on `field` (YlOrRd over 0.5 .. 1, everything below 0.5 pale)."""
    ranges = "".join(
        f'<range lower="{lo:.6f}" upper="{hi:.6f}" symbol="{i}" label="{lo:.1f} - {hi:.1f}" render="true"/>'
        for i, (lo, hi, _) in enumerate(PROB_CLASSES)
    )
    symbols = "".join(
        _fill_symbol(str(i), f"{rgb},150", rgb, 0.4) for i, (_, _, rgb) in enumerate(PROB_CLASSES)
    )
    return _qml(
        f'<renderer-v2 type="graduatedSymbol" attr={quoteattr(field)} graduatedMethod="GraduatedColor" '
        f'symbollevels="0" enableorderby="0" forceraster="0"><ranges>{ranges}</ranges>'
        f'<symbols>{symbols}</symbols><mode name="pretty"/></renderer-v2>'
    )


def match_qml(with_kind: bool) -> str:
    """Categories TP / FP / FN. `with_kind`: the layer also holds truths (`kind` = pred | truth), so the
    category is the expression "pred TP", "pred FP", "truth FN", "truth TP"."""
    if with_kind:
        attr = 'CASE WHEN "kind" = \'truth\' THEN \'truth \' || "status" ELSE "status" END'
        values = {"TP": "TP", "FP": "FP", "truth FN": "FN", "truth TP": "truth TP"}
    else:
        attr = '"status"'
        values = {"TP": "TP", "FP": "FP", "FN": "FN"}
    cats, syms = [], []
    for i, (value, key) in enumerate(values.items()):
        label, fill, outline, dashed = MATCH_COLOURS[key]
        cats.append(
            f'<category value={quoteattr(value)} symbol="{i}" label={quoteattr(label)} render="true"/>'
        )
        syms.append(_fill_symbol(str(i), fill, outline, 0.6 if key == "FN" else 0.4, dashed))
    return _qml(
        f'<renderer-v2 type="categorizedSymbol" attr={quoteattr(attr)} symbollevels="0" '
        f'enableorderby="0" forceraster="0"><categories>{"".join(cats)}</categories>'
        f"<symbols>{''.join(syms)}</symbols></renderer-v2>"
    )


def darker(rgb: str, factor: float = 0.65) -> str:
    """An "R,G,B" colour darkened (each channel times `factor`): a category's outline."""
    return ",".join(str(round(int(c) * factor)) for c in rgb.split(","))


def damage_qml(field: str = DAMAGE_KEY) -> str:
    """Categories on the damage grade `field`: each grade filled semi-transparent in its xView2 colour with a
    darker outline, labelled with the grade; a last category with the empty value, QGIS's "all other
    values" (any other grade, or none), in grey."""
    cats, syms = [], []
    entries = [(g, g, rgb) for g, rgb in GRADE_COLOURS.items()] + [("", *DAMAGE_OTHER)]
    for i, (value, label, rgb) in enumerate(entries):
        cats.append(
            f'<category value={quoteattr(value)} symbol="{i}" label={quoteattr(label)} render="true"/>'
        )
        syms.append(_fill_symbol(str(i), f"{rgb},150", darker(rgb), 0.4))
    return _qml(
        f'<renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} symbollevels="0" '
        f'enableorderby="0" forceraster="0"><categories>{"".join(cats)}</categories>'
        f"<symbols>{''.join(syms)}</symbols></renderer-v2>"
    )


def _sld(kind: StyleKind, layer: str) -> str:
    """A minimal SLD naming the style (QGIS stores one beside the QML; the QML is what it applies)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><StyledLayerDescriptor version="1.0.0" '
        'xmlns="http://www.opengis.net/sld"><NamedLayer>'
        f"<Name>{escape(layer)}</Name><UserStyle><Name>{escape(kind)}</Name></UserStyle>"
        "</NamedLayer></StyledLayerDescriptor>"
    )


# ---------------------------------------------------------------------------------------------- table
def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]


def _geometry_column(con: sqlite3.Connection, layer: str) -> str:
    try:
        row = con.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE lower(table_name) = lower(?)", (layer,)
        ).fetchone()
    except sqlite3.DatabaseError as err:
        raise StyleError(f"not a GeoPackage ({err})") from None
    if row is None:
        raise StyleError(f"no feature layer {layer!r}")
    return str(row[0])


def _ensure_table(con: sqlite3.Connection, now: str) -> None:
    if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'layer_styles'").fetchone():
        missing = {"f_table_schema", "f_table_name", "f_geometry_column", "styleQML", "useAsDefault"} - set(
            _columns(con, "layer_styles")
        )
        if missing:
            raise StyleError(f"its layer_styles table lacks {', '.join(sorted(missing))}")
        return
    con.execute(_CREATE)
    # an attributes table of GeoPackage 1.2+, as GDAL registers the table when QGIS creates it
    con.execute(
        "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, "
        "last_change) VALUES ('layer_styles', 'attributes', 'layer_styles', '', ?)",
        (now,),
    )
    has_ogr = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'gpkg_ogr_contents'").fetchone()
    if has_ogr:  # GDAL's feature-count cache: NULL makes GDAL count the rows itself
        con.execute(
            "INSERT OR REPLACE INTO gpkg_ogr_contents (table_name, feature_count) "
            "VALUES ('layer_styles', NULL)"
        )


def auto_kind(fields: Iterable[str]) -> StyleKind:
    """The style a layer with these fields gets: "damage" (graded footprints), "match" (evaluate's
    matches), else "probability"."""
    fields = set(fields)
    if DAMAGE_KEY in fields:
        return "damage"
    return "match" if "status" in fields else "probability"


def add_layer_style(
    gpkg_path: str | Path,
    layer: str = "footprints",
    kind: StyleKind = "auto",
    style_name: str | None = None,
    description: str | None = None,
) -> str:
    """Write (or replace) the default QGIS style of `layer` in the GeoPackage; returns the style name.

    `kind="probability"` needs a `mean_prob` field; `kind="match"` a `status` field (TP/FP/FN; with a
    `kind` field the truths are styled apart from the predictions); `kind="damage"` a `damage` field (the
    xView2 grade); `"auto"` takes "damage" when the layer has `damage`, else "match" when it has `status`,
    else "probability". One transaction: on any error the file is left as it was. Other
    layers' styles, and this layer's other (non-default) styles, are kept.
    """
    path = Path(gpkg_path)
    if not path.is_file():
        raise StyleError(f"{path}: no such file")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    with closing(sqlite3.connect(path)) as con:
        try:
            geom = _geometry_column(con, layer)
            fields = set(_columns(con, layer))
            if kind == "auto":
                kind = auto_kind(fields)
            name = (style_name or f"footprints {kind}")[:30]
            if kind == "probability":
                if "mean_prob" not in fields:
                    raise StyleError(f"layer {layer!r} has no mean_prob field")
                qml = probability_qml("mean_prob")
            elif kind == "match":
                if "status" not in fields:
                    raise StyleError(f"layer {layer!r} has no status field (TP/FP/FN)")
                qml = match_qml(with_kind="kind" in fields)
            elif kind == "damage":
                if DAMAGE_KEY not in fields:
                    raise StyleError(f"layer {layer!r} has no {DAMAGE_KEY} field (the damage grade)")
                qml = damage_qml(DAMAGE_KEY)
            else:
                raise StyleError(f"kind must be 'probability', 'match' or 'damage', not {kind!r}")
            with con:  # one transaction
                _ensure_table(con, now)
                where = "f_table_schema = '' AND f_table_name = ? AND f_geometry_column = ?"
                con.execute(f"UPDATE layer_styles SET useAsDefault = 0 WHERE {where}", (layer, geom))
                con.execute(f"DELETE FROM layer_styles WHERE {where} AND styleName = ?", (layer, geom, name))
                con.execute(
                    "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                    "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner, ui, "
                    "update_time) "
                    "VALUES ('', '', ?, ?, ?, ?, ?, 1, ?, '', '', ?)",
                    (
                        layer,
                        geom,
                        name,
                        qml,
                        _sld(kind, layer),
                        description or f"footprints: {kind} colours {STYLE_MARK}",
                        now,
                    ),
                )
                con.execute(
                    "UPDATE gpkg_contents SET last_change = ? WHERE table_name = 'layer_styles'", (now,)
                )
        except sqlite3.DatabaseError as err:
            raise StyleError(f"{path}: {err}") from None
        except StyleError as err:
            raise StyleError(f"{path}: {err}") from None
    log.debug("%s: default QGIS style %r (%s) for layer %s", path, name, kind, layer)
    return name


def default_style(gpkg_path: str | Path, layer: str = "footprints") -> dict[str, str] | None:
    """The row QGIS would apply to `layer` (its query: default first, then the newest), or None."""
    with closing(sqlite3.connect(Path(gpkg_path))) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'layer_styles'").fetchone():
            return None
        geom = _geometry_column(con, layer)
        row = con.execute(
            "SELECT styleName, styleQML, useAsDefault FROM layer_styles WHERE f_table_schema = '' AND "
            "f_table_name = ? AND f_geometry_column = ? ORDER BY CASE WHEN useAsDefault THEN 1 ELSE 2 END, "
            "update_time DESC LIMIT 1",
            (layer, geom),
        ).fetchone()
    return None if row is None else {"styleName": row[0], "styleQML": row[1], "useAsDefault": str(row[2])}


def style_all(paths: Sequence[str | Path], kind: StyleKind = "auto", layer: str = "footprints") -> int:
    """`add_layer_style` on several GeoPackages; a failure is logged, not raised (a style is a nicety)."""
    done = 0
    for p in paths:
        try:
            add_layer_style(p, layer=layer, kind=kind)
            done += 1
        except StyleError as err:
            log.warning("no default QGIS style: %s", err)
    return done
