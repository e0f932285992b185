"""Synthetic data sets on disk: scenes of `synth` written in the real xView2 layout, with their georeference.

`write_synthetic_dataset` writes ``images/<disaster>_<8-digit id>_pre_disaster.png`` and
``labels/<same stem>.json`` (``features.xy`` / ``features.lng_lat`` WKT, ``metadata``), the exact pixel -> WGS84
geotransform of every scene (``truth_transforms.json``, the format of ``data.geotransforms``), and optionally
a GeoTIFF variant of the same pixels in the scene's UTM zone with EPSG:4326 GeoJSON labels
(``geotiff/images/<stem>.tif``, ``geotiff/labels/<stem>.geojson``), so that the tile stage has to reproject;
with `subsets`, the official xView2 subset folders.

With `damage` (the default) every scene also gets its post-disaster pair, as xView2 ships it (`synth.damage`
draws it): ``images/<disaster>_<id>_post_disaster.png`` on the pre-disaster image's pixel grid, and
``labels/<same stem>.json`` with the pre-disaster label's polygons and uids (the same WKT, ``xy`` and
``lng_lat``), each feature's ``subtype`` its damage grade (no-damage, minor-damage, major-damage, destroyed or
un-classified), metadata of a later capture. ``truth_transforms.json`` keeps the pre-disaster images only (a
post-disaster PNG has its pre-disaster image's geotransform). In the GeoTIFF variant the post-disaster image
is NOT on the pre-disaster grid: ``geotiff/images/<post stem>.tif`` is in EPSG:4326 (lon/lat degrees, north
up), its pixels (degrees of longitude and latitude) 0.45-0.55 m on the ground at the scene centre, its grid
aligned with nothing of the pre-disaster UTM one (which is turned a little from north besides), covering the
pre-disaster footprint inset by 1-4 % on each side (so every post pixel has data and no nodata is declared;
the pre-disaster image's margin has no post pixels); its pixels are the post-disaster PNG warped from the
pre-disaster UTM grid (bilinear). A consumer must resample it onto the pre-disaster grid. ``geotiff/labels/<post stem>.geojson`` holds the same EPSG:4326
polygons as the pre-disaster GeoJSON, with ``uid``, ``feature_type`` and ``subtype`` (the grade).

Every draw of scene i's post-disaster pair comes from its own generator, seeded by (seed, i, 1), never from
the pre-disaster scene's (seed, i): the pre-disaster files are the same bytes with or without `damage`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from ..atomic import atomic_path, write_json
from ..scenes.geo import utm_epsg
from ..scenes.grades import GRADES, UNCLASSIFIED
from .buildings import GSD_M
from .damage import draw_post_scene, grade_buildings, place_event
from .scenes import PLACES, SENSORS, draw_scene

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- georeference
def metres_per_degree(lat: float) -> tuple[float, float]:
    """(metres per degree of longitude, of latitude) on WGS84 at latitude `lat`."""
    p = math.radians(lat)
    m_lat = 111132.92 - 559.82 * math.cos(2 * p) + 1.175 * math.cos(4 * p) - 0.0023 * math.cos(6 * p)
    m_lon = 111412.84 * math.cos(p) - 93.5 * math.cos(3 * p) + 0.118 * math.cos(5 * p)
    return m_lon, m_lat


def scene_geotransform(lon_c: float, lat_c: float, size: int, gsd: float = GSD_M) -> list[float]:
    """North-up GDAL geotransform (pixel corner -> lon/lat) of a size x size scene centred at lon_c, lat_c."""
    m_lon, m_lat = metres_per_degree(lat_c)
    dx, dy = gsd / m_lon, gsd / m_lat
    return [lon_c - dx * size / 2.0, dx, 0.0, lat_c + dy * size / 2.0, 0.0, -dy]


def _rings(poly: Polygon) -> list[np.ndarray]:
    """The polygon's rings as (n, 2) arrays: the exterior, then its holes."""
    return [np.asarray(r.coords, dtype=np.float64) for r in (poly.exterior, *poly.interiors)]


def _wkt(rings: list[np.ndarray]) -> str:
    """xView2-style WKT with full float precision: POLYGON ((x y, x y, ...), (hole ...))."""
    return "POLYGON (" + ", ".join("(" + ", ".join(f"{x!r} {y!r}" for x, y in r.tolist()) + ")"
                                   for r in rings) + ")"


def _apply_gt(gt: list[float], xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack([gt[0] + x * gt[1] + y * gt[2], gt[3] + x * gt[4] + y * gt[5]])


# ---------------------------------------------------------------------------------------------- write
XVIEW2_SUBSETS = ("train", "tier3", "hold", "test")  # the official xView2 subset folders


def write_synthetic_dataset(out: str | Path, n_scenes: int, seed: int, size: int = 1024,
                            geotiff: bool = True, subsets: dict[str, int] | None = None,
                            damage: bool = False) -> dict[str, Any]:
    """Write `n_scenes` synthetic xView2 scenes (and their GeoTIFF variant) under `out`; return a summary.

    With `damage`, each scene's post-disaster pair too (see the module docstring); the summary's `damage`
    counts the buildings of each grade over every scene, `post_images` names the post-disaster images.

    Without `subsets`: `<out>/{images,labels}`, `<out>/geotiff/{images,labels}`. With `subsets` ({folder:
    scene count}, e.g. {"train": 4, "tier3": 2, "hold": 2, "test": 2}, counts summing to `n_scenes`): the
    official xView2 layout `<out>/<subset>/{images,labels}` (and `<out>/geotiff/<subset>/{images,labels}`),
    scene ids numbered on across the subsets in the given order, so that every id is unique. Scene i is the
    same scene in both layouts; `truth_transforms.json` at `<out>` covers every scene.
    """
    out = Path(out)
    if subsets is not None:
        bad = [name for name in subsets if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "geotiff"]
        if bad or any(int(n) < 0 for n in subsets.values()):
            raise ValueError(f"subsets: folder names of letters, digits, - and _ (not 'geotiff') with counts "
                             f">= 0 expected, got {subsets}")
        if sum(subsets.values()) != n_scenes:
            raise ValueError(f"subsets {subsets} hold {sum(subsets.values())} scenes, not n_scenes {n_scenes}")
        folders = [name for name, n in subsets.items() for _ in range(int(n))]
    else:
        folders = [""] * n_scenes
    for folder in [""] if subsets is None else list(subsets):
        (out / folder / "images").mkdir(parents=True, exist_ok=True)
        (out / folder / "labels").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    truth: dict[str, list[float]] = {}
    fractions: list[float] = []
    names: list[str] = []
    post_names: list[str] = []
    grades: Counter[str] = Counter({g: 0 for g in (*GRADES, UNCLASSIFIED)})
    for i, folder in enumerate(folders):
        img_name, gt, fraction, post = _write_scene(out / folder, out / "geotiff" / folder if geotiff else None,
                                                    seed, i, size, damage)
        truth[img_name] = gt
        fractions.append(fraction)
        names.append(img_name)
        if post is not None:
            post_names.append(post[0])
            grades.update(post[1])
    write_json(out / "truth_transforms.json", truth)
    seconds = time.perf_counter() - t0
    empty = sum(1 for f in fractions if f == 0.0)
    log.info("synth: %d scenes (%d without buildings) of %dx%d px in %s (%.2f s)", n_scenes, empty, size, size,
             out, seconds)
    summary: dict[str, Any] = {"scenes": n_scenes, "out": str(out), "images": names,
                               "building_fraction": fractions, "empty_scenes": empty, "geotiff": geotiff,
                               "seconds": round(seconds, 3)}
    if damage:
        log.info("synth: post-disaster grades %s", ", ".join(f"{g} {c}" for g, c in grades.items()))
        summary["post_images"] = post_names
        summary["damage"] = dict(grades)
    if subsets is not None:
        summary["subsets"] = {name: [n for n, f in zip(names, folders, strict=True) if f == name]
                              for name in subsets}
    return summary


def _write_scene(folder: Path, geotiff_root: Path | None, seed: int, i: int, size: int, damage: bool = False
                 ) -> tuple[str, list[float], float, tuple[str, list[str]] | None]:
    """Scene `i` of `seed`: `<folder>/images/<stem>.png`, `<folder>/labels/<stem>.json` and (unless
    `geotiff_root` is None) its GeoTIFF variant there, with `damage` its post-disaster pair; returns (image
    name, geotransform, building fraction, (post image name, grades) or None)."""
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    disaster, lat0, lon0, dtype = PLACES[int(rng.integers(len(PLACES)))]
    # within a few km of the event
    m_lon, m_lat = metres_per_degree(lat0)
    lon_c = lon0 + rng.uniform(-3000, 3000) / m_lon
    lat_c = lat0 + rng.uniform(-3000, 3000) / m_lat
    rgb, polys, sun = draw_scene(rng, size, None, None, None)
    stem = f"{disaster}_{i + 1:08d}_pre_disaster"
    img_name = stem + ".png"
    gt = scene_geotransform(lon_c, lat_c, size)
    mask_px = sum(p.area for p in polys)
    fraction = float(mask_px / (size * size))
    uids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in polys]
    xy_feats, ll_feats = [], []
    for poly, uid in zip(polys, uids, strict=True):
        rings = _rings(poly)
        props = {"feature_type": "building", "subtype": "no-damage", "uid": uid}
        xy_feats.append({"properties": dict(props), "wkt": _wkt(rings)})
        ll_feats.append({"properties": dict(props), "wkt": _wkt([_apply_gt(gt, r) for r in rings])})
    capture = f"20{int(rng.integers(16, 19))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}" \
        f"T{int(rng.integers(15, 19)):02d}:{int(rng.integers(0, 60)):02d}:{int(rng.integers(0, 60)):02d}.000Z"
    metadata = {
        "sensor": SENSORS[int(rng.integers(len(SENSORS)))],
        "provider_asset_type": "synthetic",
        "gsd": GSD_M,
        "capture_date": capture,
        "off_nadir_angle": round(float(rng.uniform(5.0, 30.0)), 6),
        "pan_resolution": GSD_M,
        "sun_azimuth": round(sun["sun_azimuth"], 6),
        "sun_elevation": round(sun["sun_elevation"], 6),
        "target_azimuth": round(float(rng.uniform(0.0, 360.0)), 6),
        "disaster": disaster,
        "disaster_type": dtype,
        "catalog_id": rng.bytes(8).hex().upper(),
        "original_width": size,
        "original_height": size,
        "width": size,
        "height": size,
        "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "img_name": img_name,
    }
    label = {"features": {"lng_lat": ll_feats, "xy": xy_feats}, "metadata": metadata}
    with atomic_path(folder / "images" / img_name) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)
    write_json(folder / "labels" / f"{stem}.json", label)
    geo = None
    if geotiff_root is not None:
        geo = _write_geotiff_variant(geotiff_root, stem, rgb, polys, uids, lon_c, lat_c)
    log.debug("scene %s: %d buildings, %.1f%% building pixels", img_name, len(polys), 100 * fraction)
    post = None
    if damage:
        post = _write_post_scene(folder, geotiff_root, np.random.default_rng([seed, i, 1]), stem, rgb, polys,
                                 label, geo, lat_c)
    return img_name, gt, fraction, post


def _write_post_scene(folder: Path, geotiff_root: Path | None, rng: np.random.Generator, pre_stem: str,
                      rgb: np.ndarray, polys: list[Polygon], pre_label: dict[str, Any],
                      geo: tuple[int, Any, list[list[list[list[float]]]]] | None, lat_c: float
                      ) -> tuple[str, list[str]]:
    """The post-disaster pair of a pre-disaster scene (`synth.damage`), every draw from `rng`: the PNG and
    label JSON in `folder`, and (unless `geotiff_root` is None) the EPSG:4326 GeoTIFF variant there; returns
    (post image name, label grade of every building)."""
    from PIL import Image

    meta = pre_label["metadata"]
    size = rgb.shape[0]
    event = place_event(rng, size, polys, meta["disaster_type"])
    grades, drawn = grade_buildings(rng, polys, event)
    post_rgb = draw_post_scene(rng, rgb, polys, drawn, event, meta["disaster_type"])
    stem = pre_stem.replace("_pre_disaster", "_post_disaster")
    img_name = stem + ".png"
    # the same polygons and uids as the pre-disaster label (the same WKT strings), graded
    feats = {key: [{"properties": {"feature_type": "building", "subtype": grade, "uid": f["properties"]["uid"]},
                    "wkt": f["wkt"]} for f, grade in zip(pre_label["features"][key], grades, strict=True)]
             for key in ("lng_lat", "xy")}
    pre_date = datetime.strptime(meta["capture_date"], "%Y-%m-%dT%H:%M:%S.000Z")
    when = pre_date + timedelta(days=int(rng.integers(30, 700)), seconds=int(rng.integers(-3600, 3600)))
    metadata = dict(meta)  # the pre-disaster image's sun: its shadows are the ones in the post-disaster image
    metadata.update({
        "sensor": SENSORS[int(rng.integers(len(SENSORS)))],
        "capture_date": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "off_nadir_angle": round(float(rng.uniform(5.0, 30.0)), 6),
        "target_azimuth": round(float(rng.uniform(0.0, 360.0)), 6),
        "catalog_id": rng.bytes(8).hex().upper(),
        "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "img_name": img_name,
    })
    with atomic_path(folder / "images" / img_name) as tmp:
        Image.fromarray(post_rgb).save(tmp, format="PNG", compress_level=1)
    write_json(folder / "labels" / f"{stem}.json", {"features": feats, "metadata": metadata})
    if geotiff_root is not None and geo is not None:
        epsg, transform, coords = geo
        uids = [f["properties"]["uid"] for f in pre_label["features"]["xy"]]
        _write_geotiff_post(geotiff_root, stem, post_rgb, epsg, transform, coords, uids, grades, lat_c, rng)
    log.debug("scene %s: grades %s", img_name, dict(Counter(grades)))
    return img_name, grades


def _write_geotiff_post(root: Path, stem: str, rgb: np.ndarray, epsg: int, transform: Any,
                        coords: list[list[list[list[float]]]], uids: list[str], grades: list[str], lat_c: float,
                        rng: np.random.Generator) -> None:
    """The post-disaster pixels (on the pre-disaster UTM grid `transform`) warped onto an EPSG:4326 grid of
    about 0.5 m pixels inside the pre-disaster footprint; labels the pre-disaster GeoJSON polygons, graded."""
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import Affine
    from rasterio.warp import Resampling, reproject

    size = rgb.shape[0]
    to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)
    cols = np.array([0.0, size, size, 0.0])
    rows = np.array([0.0, 0.0, size, size])
    lon, lat = to_ll.transform(transform.c + cols * transform.a, transform.f + rows * transform.e)
    # the lon/lat box inside the (slightly rotated) pre-disaster footprint, inset 1-4 % on each side
    west, east = max(lon[0], lon[3]), min(lon[1], lon[2])
    north, south = min(lat[0], lat[1]), max(lat[2], lat[3])
    inset = rng.uniform(0.01, 0.04, 4)
    west, east = west + inset[0] * (east - west), east - inset[1] * (east - west)
    north, south = north - inset[2] * (north - south), south + inset[3] * (north - south)
    m_lon, m_lat = metres_per_degree(lat_c)
    gsd = float(rng.uniform(0.45, 0.55))
    dx, dy = gsd / m_lon, gsd / m_lat
    width, height = int((east - west) / dx), int((north - south) / dy)
    dst_transform = Affine(dx, 0.0, west, 0.0, -dy, north)
    dest = np.zeros((3, height, width), np.uint8)
    reproject(np.moveaxis(rgb, -1, 0), dest, src_transform=transform, src_crs=f"EPSG:{epsg}",
              dst_transform=dst_transform, dst_crs="EPSG:4326", resampling=Resampling.bilinear)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
               "crs": "EPSG:4326", "transform": dst_transform, "photometric": "RGB", "compress": "deflate"}
    if width >= 256 and height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(root / "images" / f"{stem}.tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(dest)
    features = [{"type": "Feature", "properties": {"uid": uid, "feature_type": "building", "subtype": grade},
                 "geometry": {"type": "Polygon", "coordinates": c}}
                for c, uid, grade in zip(coords, uids, grades, strict=True)]
    fc = {"type": "FeatureCollection", "features": features}
    with atomic_path(root / "labels" / f"{stem}.geojson", suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(fc) + "\n")


def _write_geotiff_variant(root: Path, stem: str, rgb: np.ndarray, polys: list[Polygon], uids: list[str],
                           lon_c: float, lat_c: float) -> tuple[int, Any, list[list[list[list[float]]]]]:
    """The same pixels as a north-up 0.5 m GeoTIFF in the UTM zone, labels as EPSG:4326 GeoJSON; returns
    (UTM EPSG code, the GeoTIFF's transform, every building's GeoJSON coordinates)."""
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import Affine

    size = rgb.shape[0]
    epsg = utm_epsg(lon_c, lat_c)
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)
    e_c, n_c = to_utm.transform(lon_c, lat_c)
    # snap the corner to whole metres so the grid is tidy (and identical for the same seed)
    e0 = math.floor(e_c - GSD_M * size / 2.0)
    n0 = math.floor(n_c + GSD_M * size / 2.0)
    transform = Affine(GSD_M, 0.0, float(e0), 0.0, -GSD_M, float(n0))
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": f"EPSG:{epsg}", "transform": transform, "photometric": "RGB", "compress": "deflate"}
    if size >= 256 and size % 16 == 0:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(root / "images" / f"{stem}.tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(np.moveaxis(rgb, -1, 0))
    features = []
    for poly, uid in zip(polys, uids, strict=True):
        coords = []
        for i, ring in enumerate(_rings(poly)):
            e = transform.c + ring[:, 0] * transform.a + ring[:, 1] * transform.b
            n = transform.f + ring[:, 0] * transform.d + ring[:, 1] * transform.e
            lon, lat = to_ll.transform(e, n)
            ll = np.column_stack([lon, lat])
            # RFC 7946: exterior rings counter-clockwise, holes clockwise
            if bool(shapely.is_ccw(shapely.LinearRing(ll))) != (i == 0):
                ll = ll[::-1]
            coords.append(ll.tolist())
        features.append({"type": "Feature", "properties": {"uid": uid, "feature_type": "building"},
                         "geometry": {"type": "Polygon", "coordinates": coords}})
    fc = {"type": "FeatureCollection", "features": features}
    with atomic_path(root / "labels" / f"{stem}.geojson", suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(fc) + "\n")
    return epsg, transform, [f["geometry"]["coordinates"] for f in features]
