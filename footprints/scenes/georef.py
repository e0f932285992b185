"""Georeferencing of xView2 PNG scenes: a least-squares pixel -> lon/lat affine from the label vertices.

xView2 label JSONs list every building twice, in pixel WKT (`features.xy`) and in WGS84 WKT
(`features.lng_lat`), vertex for vertex. Each pair is one equation of the affine
`lon = a*x + b*y + c, lat = d*x + e*y + f`; the least-squares fit over all pairs is the scene's
transform. Pixel coordinates follow the GDAL/rasterio convention: (0, 0) is the top-left corner of
the top-left pixel. The residual is measured in pixels (world -> pixel through the inverse fit) so
that one bound (`data.max_residual_px`) means the same thing at every latitude and resolution.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS

WGS84 = CRS.from_epsg(4326)


class GeorefError(ValueError):
    """The vertex pairs cannot give a trustworthy affine (too few, collinear, degenerate)."""


@dataclass(frozen=True)
class AffineFit:
    """A fitted pixel -> world affine and how well it explains the vertex pairs."""

    transform: Affine
    rms_px: float  # root-mean-square distance, in pixels, between the xy vertices and the mapped lng_lat
    max_px: float
    n_points: int


def residual_px(transform: Affine, pixel_xy: np.ndarray, world_xy: np.ndarray) -> tuple[float, float]:
    """(RMS, max) distance in pixels between `pixel_xy` and `world_xy` mapped back through `~transform`."""
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64).reshape(-1, 2)
    world_xy = np.asarray(world_xy, dtype=np.float64).reshape(-1, 2)
    if len(pixel_xy) == 0:
        return 0.0, 0.0
    inv = ~transform
    cols = inv.a * world_xy[:, 0] + inv.b * world_xy[:, 1] + inv.c
    rows = inv.d * world_xy[:, 0] + inv.e * world_xy[:, 1] + inv.f
    dist = np.hypot(cols - pixel_xy[:, 0], rows - pixel_xy[:, 1])
    return float(np.sqrt(np.mean(dist**2))), float(dist.max())


def check_spread(pixel_xy: np.ndarray, min_spread_px: float = 1.0) -> None:
    """Raise GeorefError unless the points hold >= 3 distinct, non-collinear vertices.

    "Non-collinear" is measured, not assumed: the smaller singular value of the centred points,
    divided by sqrt(n), is the RMS distance of the points from their best-fitting line; it must
    reach `min_spread_px` pixels, otherwise the fit would extrapolate a line into a plane.
    """
    pts = np.unique(np.asarray(pixel_xy, dtype=np.float64).reshape(-1, 2), axis=0)
    if len(pts) < 3:
        raise GeorefError(f"too few distinct vertices to fit an affine ({len(pts)} < 3)")
    centred = pts - pts.mean(axis=0)
    spread = np.linalg.svd(centred, compute_uv=False)[-1] / math.sqrt(len(pts))
    if spread < min_spread_px:
        raise GeorefError(
            f"the {len(pts)} distinct vertices are collinear (RMS distance from a line {spread:.3g} px "
            f"< {min_spread_px:g} px)"
        )


def fit_affine(pixel_xy: np.ndarray, world_xy: np.ndarray, min_spread_px: float = 1.0) -> AffineFit:
    """Least-squares affine mapping pixel (col, row) to world (x, y) over all pairs."""
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64).reshape(-1, 2)
    world_xy = np.asarray(world_xy, dtype=np.float64).reshape(-1, 2)
    if len(pixel_xy) != len(world_xy):
        raise GeorefError(f"{len(pixel_xy)} pixel vertices but {len(world_xy)} world vertices")
    if not (np.isfinite(pixel_xy).all() and np.isfinite(world_xy).all()):
        raise GeorefError("non-finite vertex coordinates")
    check_spread(pixel_xy, min_spread_px)
    # centre both sides: lon/lat near (-80, 25) with 1e-5 deg steps would otherwise cost digits
    p0, w0 = pixel_xy.mean(axis=0), world_xy.mean(axis=0)
    design = np.column_stack([pixel_xy - p0, np.ones(len(pixel_xy))])
    coef, *_ = np.linalg.lstsq(design, world_xy - w0, rcond=None)
    (a, d), (b, e), (c0, f0) = coef  # coef rows: x-coefficient, y-coefficient, intercept
    c = w0[0] + c0 - a * p0[0] - b * p0[1]
    f = w0[1] + f0 - d * p0[0] - e * p0[1]
    transform = Affine(a, b, c, d, e, f)
    if not np.isfinite(transform.determinant) or transform.determinant == 0:
        raise GeorefError("the world vertices are degenerate (singular affine)")
    rms, mx = residual_px(transform, pixel_xy, world_xy)
    return AffineFit(transform, rms, mx, len(pixel_xy))


def _ring_coords(geom: Any) -> list[np.ndarray]:
    """Vertex arrays of every ring of a (Multi)Polygon, in WKT order (closing vertex dropped)."""
    polys = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
    out = []
    for poly in polys:
        if poly.is_empty or poly.geom_type != "Polygon":
            continue
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords, dtype=np.float64)[:, :2]
            out.append(xy[:-1] if len(xy) > 1 else xy)
    return out


def vertex_pairs(xy_geoms: list[Any], lnglat_geoms: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Stack matching vertices of paired pixel / lon-lat geometries; pairs whose rings differ are dropped."""
    pix, world = [], []
    for g_xy, g_ll in zip(xy_geoms, lnglat_geoms, strict=True):
        rings_xy, rings_ll = _ring_coords(g_xy), _ring_coords(g_ll)
        if len(rings_xy) != len(rings_ll) or any(len(a) != len(b) for a, b in zip(rings_xy, rings_ll, strict=False)):
            continue  # not the same polygon written twice: cannot pair vertices
        pix.extend(rings_xy)
        world.extend(rings_ll)
    if not pix:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate(pix), np.concatenate(world)


def gdal_to_affine(gt: list[float] | tuple[float, ...]) -> Affine:
    """GDAL geotransform (c, a, b, f, d, e) -> Affine."""
    if len(gt) != 6 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in gt):
        raise ValueError(f"expected 6 finite numbers, got {gt!r}")
    transform = Affine.from_gdal(*[float(v) for v in gt])
    if transform.determinant == 0:
        raise ValueError(f"singular geotransform {gt!r}")
    return transform


def crs_from_text(text: Any) -> CRS:
    """A CRS written as `AUTHORITY:CODE` (EPSG:32633), a PROJ string (`+proj=...`) or WKT; nothing else.

    GDAL would also take a file name or a URL (`/vsicurl/https://...`) and read or fetch it: a geotransforms
    file is input, and input does not choose what footprints reads or which server it calls."""
    if not isinstance(text, str):
        raise ValueError(f"crs must be a string such as 'EPSG:32633', got {text!r}")
    t = text.strip()
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*:\d+", t):
        return CRS.from_string(t)
    if t.startswith("+"):
        return CRS.from_proj4(t)
    if re.match(r"[A-Za-z][A-Za-z0-9_]*\[", t):
        return CRS.from_wkt(t)
    raise ValueError(f"crs {t[:80]!r} is not EPSG:xxxx, a PROJ string or WKT (files and URLs are not read)")


def load_geotransforms(path: str | Path) -> dict[str, tuple[Affine, CRS]]:
    """Read `{"<img_name>": [6 GDAL numbers]}` (EPSG:4326 assumed) or `{"<img_name>": {"geotransform":
    [...], "crs": "EPSG:xxxx"}}`. Keys are image file names; lookups also accept the stem.

    Raises ValueError with a one-line reason on a malformed file (the caller names the file).
    """
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise ValueError("expected a JSON object {image name: geotransform}")
    out: dict[str, tuple[Affine, CRS]] = {}
    for name, value in raw.items():
        crs = WGS84
        if isinstance(value, dict):
            gt = value.get("geotransform")
            if value.get("crs"):
                try:
                    crs = crs_from_text(value["crs"])
                except ValueError as err:
                    raise ValueError(f"entry {name!r}: {err}") from None
        else:
            gt = value
        try:
            transform = gdal_to_affine(gt if isinstance(gt, list) else [])
        except ValueError as err:
            raise ValueError(f"entry {name!r}: {err}") from None
        out[name] = (transform, crs)
        out.setdefault(Path(name).stem, (transform, crs))
    return out
