"""The report's vectors: the features of the scenes a page shows, slimmed for the page.

A scene's footprints and matches come from its own GeoJSON, or from a merged file of many scenes (filtered
on the `scene` property). A merged file is read once for every scene the page wants from it and only
their features are kept; a large one is parsed a feature at a time (`iter_features`), so that memory
follows the scenes shown, never the size of the run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..scenes.grades import DAMAGE_KEY, PROBABILITY_KEYS

log = logging.getLogger(__name__)

KEEP_PROPS = ("scene", "area_m2", "mean_prob", "max_prob", "status", "iou", "kind")
# a graded footprint (damage/footprints.geojson): its grade and the four grades' probabilities
DAMAGE_PROPS = ("scene", "area_m2", "mean_prob", DAMAGE_KEY, *PROBABILITY_KEYS.values())
STREAM_ABOVE = 16_000_000  # bytes: a larger GeoJSON is parsed a feature at a time
_CHUNK = 1 << 20
_FEATURES = re.compile(r'"features"\s*:\s*\[')


def iter_features(path: str | Path, chunk: int = _CHUNK) -> Iterator[dict[str, Any]]:
    """The features of a FeatureCollection file, one at a time: memory holds one feature and a chunk.

    The collection's `features` member is found by name (GDAL and `footprint_files` write it after short
    header members); a file where it is not found in the first few chunks is parsed whole."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        buf = fh.read(chunk)
        m = _FEATURES.search(buf)
        while m is None and len(buf) < 8 * chunk:
            more = fh.read(chunk)
            if not more:
                break
            buf += more
            m = _FEATURES.search(buf)
        if m is None:
            doc = json.loads(buf + fh.read())
            yield from (doc.get("features") or []) if isinstance(doc, dict) else []
            return
        pos, want = m.end(), chunk
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos == len(buf):
                    raise json.JSONDecodeError("end of the buffer", buf, pos)
                feature, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:  # the buffer ends inside a feature: read on (doubling for big ones)
                more = fh.read(want)
                if not more:
                    raise ValueError(f"{path}: truncated or not a FeatureCollection") from None
                buf, pos, want = buf[pos:] + more, 0, 2 * want
                continue
            want = chunk
            yield feature
            if pos > chunk:
                buf, pos = buf[pos:], 0


class FeatureStore:
    """The features of the scenes a page shows, from the files that hold them.

    `wanted`: file -> the scene ids wanted from it. Each file is read once; of a file, only the features of
    wanted scenes (and those without a `scene` property, which belong to every scene) are kept."""

    def __init__(self, wanted: Mapping[Path, Iterable[str]]) -> None:
        self._wanted = {Path(p): set(ids) for p, ids in wanted.items()}
        self._files: dict[Path, list[dict[str, Any]]] = {}

    def features(self, path: Path | None, scene_id: str) -> list[dict[str, Any]] | None:
        if path is None:
            return None
        path = Path(path)
        if path not in self._files:
            wanted = self._wanted.get(path, set()) | {scene_id}
            try:
                if path.stat().st_size > STREAM_ABOVE:
                    found = iter_features(path, _CHUNK)
                else:
                    doc = json.loads(path.read_text())
                    found = iter(list(doc.get("features") or []) if isinstance(doc, dict) else [])
                self._files[path] = [f for f in found if _scene_of(f) in wanted or _scene_of(f) is None]
            except (OSError, ValueError) as err:
                log.warning("report: cannot read %s (%s)", path, err)
                self._files[path] = []
                return None
        return [f for f in self._files[path] if _scene_of(f) in (scene_id, None)]


def _scene_of(feature: Mapping[str, Any]) -> Any:
    return (feature.get("properties") or {}).get("scene")


def _round_coords(coords: Any, nd: int) -> Any:
    if isinstance(coords, (int, float)):
        return round(float(coords), nd)
    return [_round_coords(c, nd) for c in coords]


def slim_feature(feature: Mapping[str, Any], decimals: int, keep_props: Sequence[str] = KEEP_PROPS,
                 ) -> dict[str, Any] | None:
    """The feature with only the properties the page shows (`keep_props`) and rounded coordinates (None if
    no geometry)."""
    geom = feature.get("geometry")
    if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
        return None
    props = feature.get("properties") or {}
    keep = {}
    for k in keep_props:
        v = props.get(k)
        if v is None:
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                continue
            v = round(v, 4)
        keep[k] = v
    return {
        "type": "Feature",
        "properties": keep,
        "geometry": {"type": geom["type"], "coordinates": _round_coords(geom["coordinates"], decimals)},
    }


def bbox(features: Sequence[Mapping[str, Any]]) -> tuple[float, float, float, float] | None:
    xs: list[float] = []
    ys: list[float] = []

    def walk(c: Any) -> None:
        if c and isinstance(c[0], (int, float)):
            xs.append(float(c[0]))
            ys.append(float(c[1]))
        else:
            for item in c:
                walk(item)

    for f in features:
        walk(f["geometry"]["coordinates"])
    return (min(xs), min(ys), max(xs), max(ys)) if xs else None
