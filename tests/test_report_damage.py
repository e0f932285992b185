"""Damage grades (issue 26) where users see them: the GeoPackage's default QGIS style and the HTML report.

- `damage/footprints.gpkg` written with `write_gpkg` opens in QGIS categorised on `damage`, one category per
  grade in xView2's colours (and a grey "all other values" category);
- a run folder with `damage/footprints.geojson` and `damage/metrics.json` gets a "Damage grades" map layer
  (each scene's graded footprints with their grade), a legend, the counts per grade, the per-grade scores,
  the confusion of the grades and xView2's score; a run without them gets the page it always had;
- a run with a `damage/` folder also gets each scene's post-disaster twin (`<x>_post_disaster.<ext>` beside
  `<x>_pre_disaster.<ext>`) as the layer "Post-disaster imagery", on the pre image's corners; a scene whose
  twin is missing or unreadable has no such layer, and the page is built all the same.

The run folder is fabricated (`report_fixtures.make_run`, then the damage files), no pipeline runs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from PIL import Image
from rasterio.warp import Resampling, calculate_default_transform, reproject
from report_fixtures import make_run, open_report, qgis_python

from footprints.contracts.footprint_files import write_gpkg
from footprints.contracts.gpkg_style import (
    StyleError,
    add_layer_style,
    auto_kind,
    default_style,
)
from footprints.report import report_for_run
from footprints.scenes.grades import GRADE_COLOURS, GRADES, PROBABILITY_KEYS
from footprints.scoring.damage import damage_scores, xview2_score


def hex_of(grade: str) -> str:
    """GRADE_COLOURS' "R,G,B" as #rrggbb."""
    return "#" + "".join(f"{int(c):02x}" for c in GRADE_COLOURS[grade].split(","))


PAYLOAD_START = '<script type="application/json" id="report-data">'


def payload(text: str) -> dict:
    start = text.index(PAYLOAD_START) + len(PAYLOAD_START)
    return json.loads(text[start : text.index("</script>", start)])


def without_scripts(text: str) -> str:
    """The page's HTML without its inline scripts and styles (report.js names the damage layer too)."""
    out, pos = [], 0
    while True:
        starts = [i for i in (text.find("<script", pos), text.find("<style", pos)) if i >= 0]
        if not starts:
            out.append(text[pos:])
            return "".join(out)
        i = min(starts)
        out.append(text[pos:i])
        end_tag = "</script>" if text.startswith("<script", i) else "</style>"
        pos = text.index(end_tag, i) + len(end_tag)


class _Tables(HTMLParser):
    """The rows (cell texts) of every table with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(text: str) -> dict[str, list[list[str]]]:
    p = _Tables()
    p.feed(text)
    return p.tables


# ---------------------------------------------------------------------------------------------- fixtures
CONFUSION = np.array([[5, 1, 0, 0], [1, 3, 1, 0], [0, 1, 2, 1], [0, 0, 1, 4]], dtype=float)
PIXEL_CONFUSION = [[500.0, 20.0, 0.0, 0.0, 30.0], [10.0, 200.0, 40.0, 0.0, 5.0], [0.0, 30.0, 150.0, 20.0, 0.0],
                   [0.0, 0.0, 25.0, 300.0, 12.0]]


def add_damage(run_dir: Path, metrics: dict | None) -> dict[str, list[str]]:
    """damage/footprints.geojson (predict's footprints, each graded in turn no-damage, minor, major,
    destroyed, with its probabilities) and damage/metrics.json; returns scene -> the grades in order."""
    (run_dir / "damage").mkdir(exist_ok=True)
    features = json.loads((run_dir / "predict" / "footprints.geojson").read_text())["features"]
    graded: dict[str, list[str]] = {}
    for i, f in enumerate(features):
        grade = GRADES[i % len(GRADES)]
        f["properties"]["damage"] = grade
        for g, key in PROBABILITY_KEYS.items():
            f["properties"][key] = 0.61 if g == grade else 0.13
        graded.setdefault(f["properties"]["scene"], []).append(grade)
    (run_dir / "damage" / "footprints.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    if metrics is not None:
        (run_dir / "damage" / "metrics.json").write_text(json.dumps(metrics))
    return graded


def full_metrics(graded: dict[str, list[str]]) -> dict:
    every = [g for grades in graded.values() for g in grades]
    pixel = damage_scores(np.array([r[:4] for r in PIXEL_CONFUSION]))
    pixel["confusion"] = PIXEL_CONFUSION  # with the "not found" column, as the damage stage writes it
    return {
        "per_building": damage_scores(CONFUSION),
        "pixel": pixel,
        "xview2": {"localisation_f1": 0.812, "damage_f1": 0.456, "score": xview2_score(0.812, 0.456)},
        "counts": {g: every.count(g) for g in GRADES},
        "truth_counts": {"no-damage": 6, "minor-damage": 5, "major-damage": 4, "destroyed": 5},
    }


def add_post_twins(run_dir: Path, missing: tuple[str, ...] = (), unreadable: tuple[str, ...] = ()) -> dict[str, Path]:
    """Name each scene's image as xView2 names a pre-disaster image (`<x>_pre_disaster.<ext>`, its tile record
    following) and write its post-disaster twin beside it: the pre image's colours inverted. Scene A (a UTM
    GeoTIFF) gets a post GeoTIFF in lon/lat (another CRS and grid: the report resamples it onto A's), scene B
    (a PNG) a PNG of the same size. The twins of `missing` are not written, those of `unreadable` are no
    image. Returns scene -> its pre image."""
    root = run_dir.parent.parent  # where the records' relative paths start
    pre_images = {}
    for record in sorted((run_dir / "tile" / "scenes").glob("*.json")):
        meta = json.loads(record.read_text())
        image = root / meta["image_file"]
        pre = image.with_name(f"{image.stem}_pre_disaster{image.suffix}")
        image.rename(pre)
        meta["image_file"] = str(pre.relative_to(root))
        record.write_text(json.dumps(meta))
        pre_images[meta["scene_id"]] = pre
        post = pre.with_name(f"{image.stem}_post_disaster{image.suffix}")
        if meta["scene_id"] in missing:
            continue
        if meta["scene_id"] in unreadable:
            post.write_bytes(b"not an image at all")
            continue
        with rasterio.open(pre) as src:
            inverted = 255 - src.read([1, 2, 3])
            if pre.suffix == ".png":
                Image.fromarray(inverted.transpose(1, 2, 0)).save(post)
                continue
            t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
            out = np.zeros((3, h, w), np.uint8)
            reproject(inverted, out, src_transform=src.transform, src_crs=src.crs, dst_transform=t,
                      dst_crs="EPSG:4326", resampling=Resampling.nearest)
        with rasterio.open(post, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs="EPSG:4326",
                           transform=t) as dst:
            dst.write(out)
    return pre_images


def picture(overlay: dict) -> np.ndarray:
    """An overlay's picture as RGBA (h, w, 4)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay["uri"].split(",", 1)[1]))).convert("RGBA"))


@pytest.fixture(scope="module")
def damage_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, list[str]], dict]:
    run = make_run(tmp_path_factory.mktemp("damage-run")).run_dir
    add_post_twins(run)
    graded = add_damage(run, None)
    metrics = full_metrics(graded)
    (run / "damage" / "metrics.json").write_text(json.dumps(metrics))
    summary = report_for_run(run)
    return Path(summary["path"]), summary, graded, metrics


# ---------------------------------------------------------------------------------------------- GeoPackage style
def _graded_layer(n: int = 6):
    import geopandas as gpd
    import shapely

    grades = [GRADES[i % 4] for i in range(n - 2)] + ["un-classified", None]  # None: ungraded
    return gpd.GeoDataFrame(
        {"scene": ["a"] * n, "area_m2": [50.0] * n, "mean_prob": [0.8] * n, "max_prob": [0.9] * n,
         "damage": grades, **{k: [0.25] * n for k in PROBABILITY_KEYS.values()}},
        geometry=[shapely.box(10 * i, 0, 10 * i + 8, 8) for i in range(n)],
        crs=32633,
    )


def test_damage_gpkg_opens_categorised_by_grade(tmp_path: Path) -> None:
    path = write_gpkg(_graded_layer(), tmp_path / "footprints.gpkg")  # as the damage stage writes it
    styles = pyogrio.read_dataframe(path, layer="layer_styles", read_geometry=False,
                                    where="f_table_schema = '' AND f_table_name = 'footprints' "
                                    "AND f_geometry_column = 'geom' AND useAsDefault = 1")
    assert len(styles) == 1, "exactly one default style, the one QGIS applies"
    row = styles.iloc[0]
    assert row["styleName"] == "footprints damage"
    assert "(written by footprints)" in row["description"]
    assert "<Name>damage</Name>" in row["styleSLD"]
    renderer = ET.fromstring(row["styleQML"].split("\n", 1)[1]).find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "damage"
    cats = renderer.findall("categories/category")
    symbols = {s.get("name"): s for s in renderer.findall("symbols/symbol")}
    by_value = {c.get("value"): c for c in cats}
    assert list(by_value) == [*GRADES, ""]  # the four grades, then QGIS's "all other values"
    for grade in GRADES:
        cat = by_value[grade]
        assert cat.get("label") == grade and cat.get("render") == "true"
        props = {p.get("k"): p.get("v") for p in symbols[cat.get("symbol")].iter("prop")}
        assert props["color"] == f"{GRADE_COLOURS[grade]},150"  # semi-transparent fill in the grade's colour
        assert props["style"] == "solid"
        fill = [int(c) for c in GRADE_COLOURS[grade].split(",")]
        outline = [int(c) for c in props["outline_color"].split(",")]
        assert outline[3] == 255 and all(o <= f for o, f in zip(outline[:3], fill, strict=True))
        assert sum(outline[:3]) < sum(fill)  # darker outline
    other = {p.get("k"): p.get("v") for p in symbols[by_value[""].get("symbol")].iter("prop")}
    assert other["color"].startswith("160,160,160")
    assert len(symbols) == len(cats) == 5
    # the file is still a plain GeoPackage layer with its grades
    back = pyogrio.read_dataframe(path, layer="footprints")
    assert list(back["damage"]) == list(_graded_layer()["damage"])


def test_auto_style_prefers_damage_and_damage_needs_its_field(tmp_path: Path) -> None:
    assert auto_kind(["scene", "mean_prob", "damage"]) == "damage"
    assert auto_kind(["scene", "mean_prob", "damage", "status"]) == "damage"
    assert auto_kind(["scene", "mean_prob", "status"]) == "match"
    assert auto_kind(["scene", "mean_prob"]) == "probability"
    plain = write_gpkg(_graded_layer().drop(columns=["damage"]), tmp_path / "plain.gpkg")
    assert default_style(plain)["styleName"] == "footprints probability"
    with pytest.raises(StyleError, match="no damage field"):
        add_layer_style(plain, "footprints", "damage")
    assert default_style(plain)["styleName"] == "footprints probability"  # left as it was
    # an empty graded layer (no building in the test scenes) keeps its schema and its style
    empty = write_gpkg(_graded_layer().iloc[:0], tmp_path / "empty.gpkg")
    assert default_style(empty)["styleName"] == "footprints damage"


QGIS_PROBE = """
import json, os, sys
from qgis.core import QgsApplication, QgsVectorLayer, QgsRenderContext
app = QgsApplication([], False)
app.initQgis()
layer = QgsVectorLayer(sys.argv[1] + "|layername=footprints", "footprints", "ogr")
r = layer.renderer()
out = {"valid": layer.isValid(), "renderer": r.type(), "attr": r.classAttribute(),
       "categories": [[c.value(), c.label(), c.symbol().color().name(), c.symbol().symbolLayer(0).strokeColor().name()]
                      for c in r.categories()]}
ctx = QgsRenderContext()
r.startRender(ctx, layer.fields())
out["drawn"] = [[f["damage"] if isinstance(f["damage"], str) else None, r.symbolForFeature(f, ctx).color().name()]
                for f in layer.getFeatures()]
r.stopRender(ctx)
print(json.dumps(out), flush=True)
os._exit(0)  # QGIS's own teardown may crash after the work is done
"""


def test_qgis_draws_each_grade_in_its_colour(tmp_path: Path) -> None:
    """The real consumer: QGIS (Debian's python3-qgis, where installed) opening damage/footprints.gpkg."""
    import os
    import subprocess

    python = qgis_python()
    path = write_gpkg(_graded_layer(), tmp_path / "footprints.gpkg")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run([python, "-c", QGIS_PROBE, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["valid"] and seen["renderer"] == "categorizedSymbol" and seen["attr"] == "damage"
    assert [c[:2] for c in seen["categories"]] == [*([g, g] for g in GRADES), ["", "ungraded"]]
    assert [c[2] for c in seen["categories"][:4]] == [hex_of(g) for g in GRADES]
    # every feature drawn: each grade in its colour, the un-classified one by the "all other values" grey
    assert seen["drawn"] == [*([g, hex_of(g)] for g in GRADES), ["un-classified", "#a0a0a0"], [None, "#a0a0a0"]]


# ---------------------------------------------------------------------------------------------- HTML report
def test_report_has_the_damage_layer_with_each_footprints_grade(damage_report) -> None:
    path, summary, graded, _ = damage_report
    text = path.read_text()
    data = payload(text)
    n = sum(len(v) for v in graded.values())
    assert data["damage"]["n"] == n and data["damage"]["grades"] == list(GRADES)
    assert data["damage"]["counts"] == {g: sum(v.count(g) for v in graded.values()) for g in GRADES}
    for grade in GRADES:
        assert data["damage"]["colours"][grade]["fill"] == hex_of(grade)
    for scene in data["scenes"]:
        feats = scene["damage"]
        assert [f["properties"]["damage"] for f in feats] == graded[scene["id"]]  # filtered by scene, in order
        for f in feats:
            props = f["properties"]
            assert props["scene"] == scene["id"] and f["geometry"]["type"] == "Polygon"
            assert props[PROBABILITY_KEYS[props["damage"]]] == 0.61
            assert "max_prob" not in props  # slimmed to what the damage popup shows
        assert len(feats) == len(scene["footprints"])  # the predicted footprints are still there
    assert summary["footprints"] == n


def test_report_legend_counts_and_scores(damage_report) -> None:
    path, _, graded, metrics = damage_report
    page = without_scripts(path.read_text())
    assert '<section id="damage">' in page
    t = tables(page)
    # legend + counts: a row per grade, its swatch, the run's graded footprints and truth buildings
    counts = t["damage-counts"]
    assert counts[0] == ["grade", "graded footprints", "truth buildings"]
    assert [r[0] for r in counts[1:]] == list(GRADES)
    assert [r[1] for r in counts[1:]] == [str(metrics["counts"][g]) for g in GRADES]
    assert [r[2] for r in counts[1:]] == ["6", "5", "4", "5"]
    for grade in GRADES:
        assert f'data-grade="{grade}"><i class="swatch" style="background:{hex_of(grade)};' in page
    # per grade, buildings: precision / recall / F1 / support, then the damage F1 and the binary F1
    pb = metrics["per_building"]
    rows = {r[0]: r[1:] for r in t["damage-scores-buildings"][1:]}
    for grade in GRADES:
        m = pb["per_grade"][grade]
        assert rows[grade] == [f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                               str(int(m["support"]))]
    assert rows["no-damage"] == ["0.833", "0.833", "0.833", "6"]
    summary_rows = {r[0].split(" (")[0]: r[1] for r in t["damage-scores-buildings"][1:] if r[0] not in GRADES}
    assert summary_rows["damage F1"] == f"{pb['damage_f1']:.3f}" == "0.654"
    assert summary_rows["damaged/undamaged macro F1"] == f"{pb['binary']['macro_f1']:.3f}"
    assert summary_rows["undamaged F1"] == f"{pb['binary']['undamaged_f1']:.3f}"
    assert summary_rows["damaged F1"] == f"{pb['binary']['damaged_f1']:.3f}"
    # confusion: rows truth, columns predicted
    conf = t["damage-confusion-buildings"]
    assert conf[0] == ["truth \\ predicted", *GRADES]
    assert [r[1:] for r in conf[1:]] == [[str(int(v)) for v in row] for row in CONFUSION]
    # per pixel: its own tables, the confusion with the "not found" column
    pconf = t["damage-confusion-pixels"]
    assert pconf[0][-1] == "not found" and pconf[1][1:] == ["500", "20", "0", "0", "30"]
    assert "damage-scores-pixels" in t
    # xView2's three figures
    xv = {r[0]: r[1] for r in t["damage-xview2"]}
    assert xv["localisation F1"] == "0.812" and xv["damage F1"] == "0.456"
    assert xv["xView2 score (0.3 × localisation F1 + 0.7 × damage F1)"] == f"{0.3 * 0.812 + 0.7 * 0.456:.3f}"
    # the header says how many footprints are graded
    n = sum(len(v) for v in graded.values())
    assert f"{n} footprints graded by damage" in page


def test_run_without_damage_labels_shows_the_layer_and_counts_only(tmp_path: Path) -> None:
    run = make_run(tmp_path).run_dir
    graded = add_damage(run, None)
    every = [g for v in graded.values() for g in v]
    (run / "damage" / "metrics.json").write_text(json.dumps(
        {"per_building": None, "pixel": None, "xview2": None, "counts": {g: every.count(g) for g in GRADES},
         "truth_counts": None}))
    page = without_scripts(Path(report_for_run(run)["path"]).read_text())
    t = tables(page)
    assert t["damage-counts"][0] == ["grade", "graded footprints"]
    assert not any(k.startswith(("damage-scores", "damage-confusion", "damage-xview2")) for k in t)
    assert "no damage labels" in page


def test_graded_footprints_without_metrics_and_ungraded_ones(tmp_path: Path) -> None:
    """No metrics.json yet: the layer and the counts of what the page shows; a footprint without a grade (the
    damage stage's None, or an unknown value) is counted and drawn as "ungraded"."""
    run = make_run(tmp_path).run_dir
    add_damage(run, None)
    doc = json.loads((run / "damage" / "footprints.geojson").read_text())
    doc["features"][0]["properties"]["damage"] = None
    doc["features"][1]["properties"]["damage"] = "un-classified"
    (run / "damage" / "footprints.geojson").write_text(json.dumps(doc))
    text = Path(report_for_run(run)["path"]).read_text()
    data = payload(text)
    assert data["damage"]["counts"]["other"] == 2 and data["damage"]["n"] == len(doc["features"])
    assert data["damage"]["labels"]["other"] == "ungraded"
    t = tables(without_scripts(text))
    assert t["damage-counts"][0] == ["grade", "on this page"]
    assert t["damage-counts"][-1] == ["ungraded", "2"]


def test_a_scenes_own_graded_file_is_preferred(tmp_path: Path) -> None:
    """The damage stage's per-scene layers (damage/scenes/<scene>.geojson) are read like predict's: a
    scene's own file first, the run's merged one for the others; metrics' per-scene `ungraded` summed."""
    run = make_run(tmp_path).run_dir
    graded = add_damage(run, None)
    doc = json.loads((run / "damage" / "footprints.geojson").read_text())
    own = [f for f in doc["features"] if f["properties"]["scene"] == "A"]
    for f in own:
        f["properties"]["damage"] = "destroyed"
    (run / "damage" / "scenes").mkdir()
    (run / "damage" / "scenes" / "A.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": own}))
    every = [g for v in graded.values() for g in v]
    (run / "damage" / "metrics.json").write_text(json.dumps(
        {"per_building": None, "pixel": None, "xview2": None, "counts": {g: every.count(g) for g in GRADES},
         "truth_counts": None, "per_scene": {"A": {"ungraded": 2}, "B": {"ungraded": 1}}}))
    text = Path(report_for_run(run)["path"]).read_text()
    scenes = {s["id"]: s for s in payload(text)["scenes"]}
    assert [f["properties"]["damage"] for f in scenes["A"]["damage"]] == ["destroyed"] * len(own)
    assert [f["properties"]["damage"] for f in scenes["B"]["damage"]] == graded["B"]
    counts = tables(without_scripts(text))["damage-counts"]
    assert counts[-1] == ["ungraded", "3"]  # the run's, from its scenes' records


def test_run_without_damage_folder_has_no_damage_at_all(tmp_path: Path) -> None:
    run = make_run(tmp_path).run_dir
    before = Path(report_for_run(run, tmp_path / "before.html")["path"]).read_text()
    add_damage(run, {"per_building": None, "pixel": None, "xview2": None, "counts": {}, "truth_counts": None})
    shutil.rmtree(run / "damage")
    after = Path(report_for_run(run, tmp_path / "after.html")["path"]).read_text()
    for text in (before, after):
        page = without_scripts(text)
        assert 'id="damage' not in page and "graded" not in page and "Damage" not in page
        data = payload(text)
        assert "damage" not in data and all("damage" not in s for s in data["scenes"])
    drop = "<dd>"  # the generation time may differ by a minute

    def stable(s: str) -> str:
        return "\n".join(line for line in s.splitlines() if drop not in line)

    assert stable(before) == stable(after)


def assert_post_on_pre(scene: dict) -> None:
    """A scene's post-disaster picture: on the pre picture's corners and size, the pre colours inverted."""
    pre, post = scene["image"], scene["post"]
    assert post["bounds"] == pre["bounds"]
    assert (post["width"], post["height"]) == (pre["width"], pre["height"])
    assert (post["source_width"], post["source_height"]) == (pre["source_width"], pre["source_height"])
    a, b = picture(pre).astype(int), picture(post).astype(int)
    both = (a[..., 3] == 255) & (b[..., 3] == 255)
    assert both.mean() > 0.9  # the post covers the pre picture (a resampled one up to its edge pixels)
    diff = np.abs(a[..., :3] - b[..., :3]).mean(axis=-1)[both]
    assert diff.mean() > 100  # other pixels than the pre image's
    inverted = np.abs(255 - a[..., :3] - b[..., :3]).mean(axis=-1)[both]
    assert np.median(inverted) < 12 and inverted.mean() < 25  # the twin's pixels, in place (lossy WebP)


def test_report_of_a_damage_run_has_each_scenes_post_disaster_imagery(damage_report) -> None:
    path, summary, _, _ = damage_report
    scenes = payload(path.read_text())["scenes"]
    assert [s["id"] for s in scenes] == ["A", "B"] and summary["within_bound"]
    for scene in scenes:
        assert_post_on_pre(scene)  # A: a lon/lat GeoTIFF resampled onto A's UTM grid; B: a PNG pair


def test_a_missing_or_unreadable_post_image_costs_its_scene_the_layer_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for missing, unreadable in ((("B",), ()), ((), ("A",))):
        run = make_run(tmp_path / f"run-{missing}{unreadable}").run_dir
        add_post_twins(run, missing=missing, unreadable=unreadable)
        add_damage(run, None)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="footprints"):
            text = Path(report_for_run(run)["path"]).read_text()
        scenes = {s["id"]: s for s in payload(text)["scenes"]}
        without = (missing or unreadable)[0]
        assert "post" not in scenes[without] and scenes[without]["image"] is not None
        assert_post_on_pre(next(s for sid, s in scenes.items() if sid != without))
        assert not any("post" in n for n in scenes[without]["notes"])  # a line in the log, not on the page
        assert f"report: {without}: no post-disaster imagery" in caplog.text
        assert len(scenes[without]["damage"]) == len(scenes[without]["footprints"]) > 0  # the rest is there


def test_post_imagery_counts_toward_the_size_bound(damage_report, tmp_path: Path) -> None:
    path, summary, _, _ = damage_report
    run = path.parent.parent
    full = payload(path.read_text())["scenes"]
    post_bytes = sum(len(s["post"]["uri"]) for s in full)
    bound = summary["bytes"] - post_bytes // 2
    small = report_for_run(run, tmp_path / "small.html", max_bytes=bound)
    assert small["within_bound"] and small["bytes"] <= bound
    assert small["max_side_used"] < summary["max_side_used"]  # the rasters shrank to make room
    shown = payload((tmp_path / "small.html").read_text())["scenes"]
    assert any(s["image"]["width"] < f["image"]["width"] for s, f in zip(shown, full, strict=True))
    for scene in shown:
        assert_post_on_pre(scene)  # still there, on the pre picture (the smaller one where it shrank)


def test_post_imagery_read_in_strips_is_the_same_picture(damage_report, tmp_path: Path, monkeypatch) -> None:
    """A large scene's post image is read a strip of rows at a time (bounded memory): the picture is the one
    read at once."""
    import footprints.report.post as post

    path, _, _, _ = damage_report
    for side in (1024, 97):  # whole pixels; downsampled (strips ending within a source pixel)
        with monkeypatch.context() as m:
            m.setattr(post, "STRIP_PX", 3000)  # a few rows of the fixture's scenes at a time
            report_for_run(path.parent.parent, tmp_path / "strips.html", image_format="png", max_side=side)
        report_for_run(path.parent.parent, tmp_path / "whole.html", image_format="png", max_side=side)
        strips, whole = (payload((tmp_path / f).read_text())["scenes"] for f in ("strips.html", "whole.html"))
        for a, b in zip(strips, whole, strict=True):
            assert a["post"]["bounds"] == b["post"]["bounds"] and max(a["post"]["width"], a["post"]["height"]) <= side
            diff = np.abs(picture(a["post"]).astype(int) - picture(b["post"]).astype(int))
            # (A's strips are resampled each on its own: rounding, and its validity at the scene's edge)
            assert (diff.max(axis=-1) <= 3).mean() > 0.99 and diff.mean() < 0.1


def test_post_twins_without_a_damage_folder_add_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path).run_dir
    add_post_twins(run)
    text = Path(report_for_run(run)["path"]).read_text()
    assert all("post" not in s and s["image"] is not None for s in payload(text)["scenes"])


# ---------------------------------------------------------------------------------------------- browser
# (the `browser` fixture: conftest.py)


@pytest.mark.browser
def test_browser_draws_every_graded_footprint_in_its_colour(browser, damage_report) -> None:
    path, _, graded, _ = damage_report
    page = open_report(browser, path)
    try:
        n = sum(len(v) for v in graded.values())
        assert page.eval("window.footprintsReport.errors") == []
        assert page.eval("window.footprintsReport.count('damage')") == n
        assert page.eval("document.querySelectorAll('path.fp-damage').length") == n  # drawn, on the map
        fills = page.eval("Array.from(document.querySelectorAll('path.fp-damage')).map(p => p.getAttribute('fill'))")
        assert set(fills) == {hex_of(g) for g in GRADES}
        legend = page.eval("Array.from(document.querySelectorAll('.legend .damage-swatch')).map(i => i.dataset.grade)")
        assert legend == list(GRADES)
        labels = page.eval("document.querySelector('.leaflet-control-layers-overlays').textContent")
        assert f"Damage grades ({n})" in labels
        # a click on a graded footprint shows its grade and probabilities
        page.eval("(() => { const g = window.footprintsReport.groups.geo.damage; const gj = g.getLayers()[0];"
                  " gj.getLayers()[0].openPopup(); })()")
        popup = page.wait_for("document.querySelector('.leaflet-popup-content') && "
                              "document.querySelector('.leaflet-popup-content').textContent")
        assert "damage grade" in popup and "p(destroyed)" in popup
        assert page.errors == []
        assert [u for u in page.requests if not u.startswith("data:")] == [path.resolve().as_uri()]
    finally:
        page.close()


@pytest.mark.browser
def test_browser_flips_between_pre_and_post_disaster_imagery(browser, damage_report) -> None:
    path, _, _, _ = damage_report
    page = open_report(browser, path)
    try:
        names = page.eval("Array.from(document.querySelectorAll('.leaflet-control-layers-overlays label'))"
                          ".map(l => l.textContent.trim())")
        assert names[:2] == ["Imagery", "Post-disaster imagery"]  # next to the imagery, off at first
        assert page.eval("document.querySelectorAll('img.scene-post-image').length") == 0
        page.click_selector(".leaflet-control-layers-overlays label:nth-child(2) input")
        page.wait_for("document.querySelectorAll('img.scene-post-image').length === 2 && Array.from("
                      "document.querySelectorAll('img.scene-post-image')).every(i => i.complete && i.naturalWidth > 0)")
        # over the pre imagery, on exactly its place
        rects = page.eval("""(() => { const r = s => Array.from(document.querySelectorAll(s)).map(i => {
            const b = i.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; });
            return [r('img.scene-image'), r('img.scene-post-image')]; })()""")
        assert np.allclose(rects[0], rects[1], atol=0.5)
        assert page.eval("Array.from(document.querySelectorAll('img.scene-post-image'))"
                         ".every(i => i.closest('.leaflet-post-pane'))")
        page.click_selector(".leaflet-control-layers-overlays label:nth-child(2) input")
        page.wait_for("document.querySelectorAll('img.scene-post-image').length === 0")
        assert page.eval("window.footprintsReport.errors") == [] and page.errors == []
    finally:
        page.close()
