"""Small fake pipeline outputs for the report tests, laid out as a run folder (`outputs/<name>/`) writes them.

Scene A: a GeoTIFF in UTM 33N (EPSG:32633) whose four quadrants have known colours (NW red, NE green,
SW blue, SE yellow), so a screenshot can tell that the imagery is there and the right way up.
Scene B: an xView2-style PNG without georeference, placed by `tile/scenes/B.json` in lon/lat, 5 km east.
Both have a probability GeoTIFF (uint8 p*255 with an internal mask), per-scene footprint GeoJSON
(RFC 7946 lon/lat), and entries in `evaluate/matches.geojson` and `evaluate/metrics.json`.
Scene C (separate, `predict --input` layout): a PNG in pixel space, no CRS anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from pyproj import Transformer
from rasterio.crs import CRS

from footprints.contracts.manifest import MANIFEST_COLUMNS, write_rows

QUADRANTS = {"NW": (220, 30, 30), "NE": (30, 200, 40), "SW": (40, 60, 220), "SE": (235, 220, 40)}
UTM = CRS.from_epsg(32633)
A_ORIGIN = (450_000.0, 5_550_000.0)  # upper-left corner in EPSG:32633
A_SIZE = (240, 200)  # width, height in px
A_GSD = 0.5
B_SIZE = (200, 180)


@dataclass
class FakeRun:
    run_dir: Path
    footprints: dict[str, int] = field(default_factory=dict)  # scene -> number of predicted polygons
    bounds_lonlat: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.footprints.values())


def quadrant_image(width: int, height: int) -> np.ndarray:
    """(3, h, w) uint8 with the four QUADRANTS colours, plus faint texture."""
    img = np.zeros((3, height, width), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    for name, (r0, r1, c0, c1) in {
        "NW": (0, h2, 0, w2),
        "NE": (0, h2, w2, width),
        "SW": (h2, height, 0, w2),
        "SE": (h2, height, w2, width),
    }.items():
        img[:, r0:r1, c0:c1] = np.array(QUADRANTS[name], dtype=np.uint8)[:, None, None]
    return img


def write_prob(
    path: Path,
    width: int,
    height: int,
    transform: Affine,
    crs: CRS | None,
    rng: np.random.Generator,
    invalid_rows: int = 0,
) -> None:
    """uint8 probability (smooth blobs) with an internal mask; the top `invalid_rows` rows are nodata."""
    yy, xx = np.mgrid[0:height, 0:width]
    p = 0.5 + 0.5 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + rng.normal(0, 0.02, (height, width))
    values = np.clip(np.rint(np.clip(p, 0, 1) * 255), 0, 255).astype(np.uint8)
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[:invalid_rows] = 0
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": "uint8",
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)
        dst.write_mask(mask)


def rect_features(
    scene: str,
    boxes_xy: list[tuple[float, float, float, float]],
    to_lonlat,
    rng: np.random.Generator,
    areas: list[float],
) -> list[dict]:
    feats = []
    for (x0, y0, x1, y1), area in zip(boxes_xy, areas, strict=True):
        ring = [to_lonlat(x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
        mp = float(rng.uniform(0.55, 0.99))
        feats.append(
            {
                "type": "Feature",
                "properties": {
                    "scene": scene,
                    "area_m2": area,
                    "mean_prob": mp,
                    "max_prob": min(1.0, mp + 0.05),
                },
                "geometry": {"type": "Polygon", "coordinates": [[list(map(float, c)) for c in ring]]},
            }
        )
    return feats


def write_geojson(path: Path, features: list[dict]) -> None:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def make_run(root: Path, seed: int = 0) -> FakeRun:
    """A run folder `root/outputs/fake` with scenes A (UTM GeoTIFF) and B (lon/lat PNG), evaluated."""
    rng = np.random.default_rng(seed)
    run = root / "outputs" / "fake"
    for d in ("tile/scenes", "predict", "evaluate", "train-classifier", "train-segmenter"):
        (run / d).mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    fake = FakeRun(run)
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform

    # --- scene A: UTM GeoTIFF, 7 footprints
    wa, ha = A_SIZE
    ta = Affine(A_GSD, 0, A_ORIGIN[0], 0, -A_GSD, A_ORIGIN[1])
    img_a = data / "A.tif"
    with rasterio.open(
        img_a, "w", driver="GTiff", width=wa, height=ha, count=3, dtype="uint8", crs=UTM, transform=ta
    ) as dst:
        dst.write(quadrant_image(wa, ha))
    write_prob(run / "predict" / "A_prob.tif", wa, ha, ta, UTM, rng, invalid_rows=10)
    boxes = []
    for i in range(7):
        x0 = A_ORIGIN[0] + 8 + 15 * i
        y0 = A_ORIGIN[1] - 20 - 10 * (i % 3)
        boxes.append((x0, y0, x0 + 10, y0 - 8))
    feats_a = rect_features("A", boxes, to_ll, rng, [80.0] * 7)
    write_geojson(run / "predict" / "A.geojson", feats_a)
    fake.footprints["A"] = len(feats_a)
    (run / "tile" / "scenes" / "A.json").write_text(
        json.dumps(
            {
                "scene_id": "A",
                "image_file": "data/A.tif",
                "width": wa,
                "height": ha,
                "source_width": wa,
                "source_height": ha,
                "transform": list(ta.to_gdal()),
                "crs": "EPSG:32633",
                "gsd_m": A_GSD,
            }
        )
    )
    lon0, lat0 = to_ll(A_ORIGIN[0], A_ORIGIN[1])
    lon1, lat1 = to_ll(A_ORIGIN[0] + wa * A_GSD, A_ORIGIN[1] - ha * A_GSD)
    fake.bounds_lonlat["A"] = (min(lon0, lon1), min(lat0, lat1), max(lon0, lon1), max(lat0, lat1))

    # --- scene B: PNG without georeference, lon/lat transform in tile/scenes/B.json, 5 km east; 5 footprints
    wb, hb = B_SIZE
    lon_b, lat_b = to_ll(A_ORIGIN[0] + 5000, A_ORIGIN[1])
    tb = Affine(5e-6, 0, lon_b, 0, -4e-6, lat_b)
    img_b = data / "images" / "B.png"
    img_b.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(quadrant_image(wb, hb).transpose(1, 2, 0)).save(img_b)
    write_prob(run / "predict" / "B_prob.tif", wb, hb, tb, CRS.from_epsg(4326), rng)
    boxes_b = [(20 + 30 * i, 30.0, 40 + 30 * i, 50.0) for i in range(5)]
    feats_b = rect_features("B", boxes_b, lambda c, r: tb * (c, r), rng, [60.0] * 5)
    write_geojson(run / "predict" / "B.geojson", feats_b)
    fake.footprints["B"] = len(feats_b)
    (run / "tile" / "scenes" / "B.json").write_text(
        json.dumps(
            {
                "scene_id": "B",
                "image_file": "data/images/B.png",
                "width": wb,
                "height": hb,
                "source_width": wb,
                "source_height": hb,
                "transform": list(tb.to_gdal()),
                "crs": "EPSG:4326",
                "gsd_m": 0.45,
            }
        )
    )
    fake.bounds_lonlat["B"] = (lon_b, lat_b - 4e-6 * hb, lon_b + 5e-6 * wb, lat_b)

    # markers as predict writes them; the merged layer
    for sid in ("A", "B"):
        (run / "predict" / f"{sid}.json").write_text(
            json.dumps({"scene_id": sid, "polygons": fake.footprints[sid]})
        )
    write_geojson(run / "predict" / "footprints.geojson", feats_a + feats_b)

    # --- evaluation: matches (A: 3 TP, 4 FP, 2 FN + 3 found truths; B: all FP), metrics, calibration
    matches = []
    for i, f in enumerate(feats_a):
        status = "TP" if i < 3 else "FP"
        props = {**f["properties"], "kind": "pred", "status": status, "iou": 0.7 if status == "TP" else None}
        matches.append({**f, "properties": props})
    truth_boxes = [
        (A_ORIGIN[0] + 10 + 40 * i, A_ORIGIN[1] - 70, A_ORIGIN[0] + 22 + 40 * i, A_ORIGIN[1] - 80)
        for i in range(2)
    ]
    for f in rect_features("A", truth_boxes, to_ll, rng, [120.0] * 2):
        matches.append({**f, "properties": {"scene": "A", "kind": "truth", "status": "FN"}})
    for f in feats_a[:3]:
        matches.append({**f, "properties": {"scene": "A", "kind": "truth", "status": "TP"}})
    for f in feats_b:
        matches.append({**f, "properties": {**f["properties"], "kind": "pred", "status": "FP"}})
    write_geojson(run / "evaluate" / "matches.geojson", matches)

    def scene_metrics(tp: int, fp: int, fn: int, extra: dict | None = None) -> dict:
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        return {
            "pixel": {"building_iou": 0.41, "f1": 0.58, "precision": 0.5, "recall": 0.7},
            "polygon": {
                "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0,
                "f1": f1,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "n_truth": tp + fn,
                "n_pred": tp + fp,
                **(extra or {}),
            },
        }

    per_scene = {"A": scene_metrics(3, 4, 2, {"splits": 1, "merges": 2}), "B": scene_metrics(0, 5, 0)}
    (run / "evaluate" / "metrics.json").write_text(
        json.dumps(
            {
                "name": "fake",
                "split": "test",
                "threshold": 0.5,
                "min_area_m2": 10.0,
                "iou_threshold": 0.5,
                "match_rule": "greedy one-to-one by decreasing IoU, match when IoU >= 0.5",
                "overall": scene_metrics(3, 9, 2),
                "per_scene": per_scene,
            }
        )
    )
    grid = [
        {
            "threshold": t,
            "min_area_m2": a,
            "polygon_f1": 0.1 + t / 10 - a / 200,
            "pixel_f1": 0.4,
            "polygon_tp": 1,
            "polygon_fp": 2,
            "polygon_fn": 3,
            "pixel_iou": 0.3,
        }
        for t in (0.3, 0.5, 0.7)
        for a in (0.0, 10.0)
    ]
    (run / "predict" / "calibration.json").write_text(
        json.dumps({"threshold": 0.7, "min_area_m2": 0.0, "seed_threshold": 0.5, "best": grid[4],
                    "at_grid_edge": {"threshold": [0.3, 0.5, 0.7]}, "grid": grid})
    )
    for stage in ("train-classifier", "train-segmenter"):
        Image.fromarray(np.full((120, 200, 3), 200, dtype=np.uint8)).save(run / stage / "learning_curve.png")
    write_rows(run / "tile" / "manifest.csv", [{"patch_id": "A_r0_c0", "scene_id": "A", "split": "test"},
                                               {"patch_id": "B_r0_c0", "scene_id": "B", "split": "test"}],
               MANIFEST_COLUMNS)
    return fake


def make_pixel_predictions(root: Path, seed: int = 1) -> tuple[Path, dict[str, Path], int]:
    """`predict --input` outputs for scene C in pixel space: out.geojson, out_scenes/C.*, and the image."""
    rng = np.random.default_rng(seed)
    scenes = root / "out_scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    w, h = 160, 120
    img = root / "C.png"
    Image.fromarray(quadrant_image(w, h).transpose(1, 2, 0)).save(img)
    write_prob(scenes / "C_prob.tif", w, h, Affine.identity(), None, rng)
    boxes = [(10 + 25 * i, 10.0, 25 + 25 * i, 22.0) for i in range(4)]
    feats = rect_features("C", boxes, lambda x, y: (x, y), rng, [45.0] * 4)
    write_geojson(scenes / "C.geojson", feats)
    (scenes / "C.json").write_text(json.dumps({"scene_id": "C", "polygons": len(feats), "crs": ""}))
    out = root / "out.geojson"
    write_geojson(out, feats)
    return out, {"C": img}, len(feats)


def make_many_scenes(root: Path, n: int, unreadable: set[str] | None = None) -> dict[str, dict]:
    """A run folder `root/outputs/many` with `n` tiny evaluated scenes (no rasters): per scene a marker, a
    one-footprint GeoJSON, its matches layer and its metrics (FP and FN vary). The files of the scenes in
    `unreadable` are not JSON at all, so that a report that opens them says so. Returns the per-scene
    metrics."""
    run = root / "outputs" / "many"
    for d in ("predict", "evaluate/matches"):
        (run / d).mkdir(parents=True, exist_ok=True)
    per_scene = {}
    for i in range(n):
        sid = f"scene_{i:04d}"
        lon, lat = 10.0 + 0.01 * i, 45.0
        ring = [[lon, lat], [lon + 1e-4, lat], [lon + 1e-4, lat + 1e-4], [lon, lat + 1e-4], [lon, lat]]
        feature = {"type": "Feature", "properties": {"scene": sid, "area_m2": 90.0, "mean_prob": 0.8, "max_prob": 0.9},
                   "geometry": {"type": "Polygon", "coordinates": [ring]}}
        match = {**feature, "properties": {**feature["properties"], "kind": "pred", "status": "FP"}}
        geojson, matches = run / "predict" / f"{sid}.geojson", run / "evaluate" / "matches" / f"{sid}.geojson"
        if sid in (unreadable or set()):
            geojson.write_text("not json")
            matches.write_text("not json")
        else:
            write_geojson(geojson, [feature])
            write_geojson(matches, [match])
        (run / "predict" / f"{sid}.json").write_text(json.dumps({"scene_id": sid, "polygons": 1}))
        fp, fn = (7 * i) % 23, i % 5
        per_scene[sid] = {
            "pixel": {"building_iou": 0.5, "f1": 0.6},
            "polygon": {"tp": 0, "fp": fp, "fn": fn, "n_truth": fn, "n_pred": fp, "precision": 0.0,
                        "recall": 0.0, "f1": 0.0},
            "matches": str(matches),
        }
    overall = {"pixel": {"building_iou": 0.5, "f1": 0.6},
               "polygon": {k: sum(s["polygon"][k] for s in per_scene.values()) for k in ("tp", "fp", "fn")}}
    (run / "evaluate" / "metrics.json").write_text(json.dumps(
        {"name": "many", "split": "test", "threshold": 0.5, "overall": overall, "per_scene": per_scene}))
    return per_scene


SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, where python3-qgis installs QGIS's bindings


def qgis_python() -> str:
    """The interpreter that imports QGIS's Python bindings; skips the test where there is none."""
    import subprocess

    import pytest

    if (not Path(SYSTEM_PYTHON).is_file()
            or subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, timeout=60).returncode != 0):
        pytest.skip("QGIS's Python bindings are not installed (Debian package python3-qgis)")
    return SYSTEM_PYTHON


def open_report(browser, path: Path, width: int = 1200, height: int = 900):
    """A report opened in the test browser (`browser` fixture), once its script says it is ready."""
    page = browser.new_page(width, height)
    page.goto(path.resolve().as_uri())
    page.wait_for("window.footprintsReport && window.footprintsReport.ready")
    return page

