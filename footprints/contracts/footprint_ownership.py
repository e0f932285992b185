"""Which existing GeoJSON or GeoPackage footprints wrote, so that an output may replace it and nothing else.

`predict --output` may overwrite an earlier run's merged layers, never a user's layer, a label file, a
calibration or an image: a file is footprints' own when its first feature carries the footprint columns
(GeoJSON), or its QGIS style carries the mark `gpkg_style` writes, or a table has the footprint columns
(GeoPackage).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from .footprint_files import COLUMNS
from .gpkg_style import STYLE_MARK

_FEATURES = re.compile(r'"features"\s*:\s*\[')
_PEEK = 1 << 20  # bytes of a GeoJSON read to recognise it (its header and first feature)


def is_footprints_file(path: str | Path) -> bool:
    """True when the existing file at `path` is a GeoJSON or GeoPackage that footprints wrote, so that an
    output may replace it: a FeatureCollection whose first feature's properties start with the footprint
    columns (`scene`, `area_m2`, `mean_prob`, `max_prob`; or, with no feature, whose `name` is the file's
    stem, as GDAL and `geojson_stream` write it); a GeoPackage with the QGIS style `add_layer_style` writes
    or a table with the footprint columns. Anything else (a user's layer, a label file, a calibration, an
    image) is not."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
            if head.startswith(b"SQLite format 3"):
                return _is_footprints_gpkg(path)
            text = (head + fh.read(_PEEK)).decode("utf-8", errors="replace")
    except OSError:
        return False
    return _is_footprints_geojson(text, path.stem)


def _is_footprints_geojson(text: str, stem: str) -> bool:
    m = _FEATURES.search(text)
    if m is None or '"FeatureCollection"' not in text[: m.start()]:
        return False
    rest = text[m.end():].lstrip()
    if rest.startswith("]"):
        name = re.search(r'"name"\s*:\s*("(?:[^"\\]|\\.)*")', text[: m.start()])
        try:
            return name is not None and json.loads(name.group(1)) == stem
        except ValueError:
            return False
    try:
        feature, _ = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        return False
    props = feature.get("properties") if isinstance(feature, dict) else None
    return isinstance(props, dict) and list(props)[: len(COLUMNS)] == COLUMNS


def _is_footprints_gpkg(path: Path) -> bool:
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'layer_styles'").fetchone():
            row = con.execute("SELECT 1 FROM layer_styles WHERE description LIKE ?", (f"%{STYLE_MARK}",))
            if row.fetchone():
                return True
        tables = [r[0] for r in con.execute("SELECT table_name FROM gpkg_contents WHERE data_type = 'features'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
            if all(c in cols for c in COLUMNS):
                return True
    except sqlite3.Error:
        return False
    finally:
        con.close()
    return False
