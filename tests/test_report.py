"""The HTML map report (footprints.report) and the GeoPackage default style.

Pure parts (payload, counts, placement, size bound, assets, style table) are checked in Python; the page
itself is opened in a real headless Chromium (tests/browser_harness.py, marked `browser`): no network, no
console errors, imagery visible where it should be and the right way up, as many footprints drawn as the
GeoJSON holds, and a click on a scene row moving the map.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.warp import transform_bounds
from report_fixtures import (
    QUADRANTS,
    FakeRun,
    make_many_scenes,
    make_pixel_predictions,
    make_run,
    open_report,
    qgis_python,
)

from footprints.report import (
    ReportScene,
    StyleError,
    add_layer_style,
    build_assets,
    default_style,
    images_from_inputs,
    report_for_predictions,
    report_for_run,
    run_report,
    write_report,
)
from footprints.report.charts import f1_by_area_and_threshold
from footprints.report.page import json_for_script

PAYLOAD_RE = re.compile(r'<script type="application/json" id="report-data">(.*?)</script>', re.S)


def payload(html_text: str) -> dict:
    m = PAYLOAD_RE.search(html_text)
    assert m, "no embedded report data"
    return json.loads(m.group(1))


def geojson_count(*paths: Path) -> int:
    return sum(len(json.loads(p.read_text())["features"]) for p in paths)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    return make_run(tmp_path_factory.mktemp("report-run"))


@pytest.fixture(scope="module")
def run_html(fake_run: FakeRun) -> tuple[Path, dict]:
    summary = report_for_run(fake_run.run_dir)
    return Path(summary["path"]), summary


@pytest.fixture(scope="module")
def pixel_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("report-pixel")
    out, images, n = make_pixel_predictions(root)
    summary = report_for_predictions(out, images=images)
    return Path(summary["path"]), n


# ---------------------------------------------------------------------------------------------- assets
def test_checked_in_assets_match_their_pinned_hashes() -> None:
    assert build_assets.check() == []
    assert "BSD 2-Clause" in (build_assets.ASSETS / "LICENSE-leaflet.txt").read_text()
    js = (build_assets.ASSETS / "leaflet.js").read_text()
    assert f"Leaflet {build_assets.VERSION}" in js and "sourceMappingURL" not in js
    assert "url(images/" not in (build_assets.ASSETS / "leaflet.css").read_text()


def test_asset_check_catches_a_modified_file(tmp_path: Path) -> None:
    folder = tmp_path / "assets"
    shutil.copytree(build_assets.ASSETS, folder)
    (folder / "leaflet.js").write_text((folder / "leaflet.js").read_text() + "\n// tampered\n")
    assert build_assets.check(folder) == ["leaflet.js: sha256 differs from SHA256SUMS"]


def test_asset_build_refuses_a_tarball_that_is_not_the_pinned_one() -> None:
    with pytest.raises(build_assets.AssetError, match="integrity"):
        build_assets.build_files(b"not the leaflet tarball")


@pytest.mark.slow
def test_assets_rebuild_byte_for_byte_from_the_npm_registry(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    out = tmp_path / "assets"
    out.mkdir()
    shutil.copy(build_assets.ASSETS / build_assets.SUMS, out / build_assets.SUMS)
    try:
        sums = build_assets.build(folder=out)  # raises if any rebuilt file differs from SHA256SUMS
    except build_assets.AssetError as err:
        if "npm pack" in str(err):
            pytest.skip(f"the npm registry is not reachable: {err}")
        raise
    assert sums == build_assets.read_sums()
    assert build_assets.check(out) == []


# ---------------------------------------------------------------------------------------------- the page
def test_run_report_lands_in_the_run_folder_and_counts_every_footprint(fake_run: FakeRun, run_html) -> None:
    path, summary = run_html
    assert path == fake_run.run_dir / "report" / "index.html"
    text = path.read_text()
    data = payload(text)
    n = geojson_count(fake_run.run_dir / "predict" / "footprints.geojson")
    assert n == fake_run.total == 12
    assert summary["footprints"] == n
    assert sum(len(s["footprints"]) for s in data["scenes"]) == n == data["n_footprints"]
    assert re.search(rf'id="footprint-count" data-count="{n}"><strong>{n} footprints</strong>', text)
    by_id = {s["id"]: s for s in data["scenes"]}
    assert set(by_id) == {"A", "B"}
    # TP/FP from the matches, the missed truths as outlines
    assert sorted(f["properties"]["status"] for f in by_id["A"]["footprints"]) == ["FP"] * 4 + ["TP"] * 3
    assert sorted(f["properties"]["status"] for f in by_id["A"]["truth"]) == ["FN", "FN", "TP", "TP", "TP"]
    assert by_id["A"]["has_matches"] and by_id["B"]["has_matches"]
    # per-scene metrics with split and merge counts, scene rows that the map can zoom to
    assert 'data-scene="A"' in text and 'data-scene="B"' in text
    assert ">splits<" in text and ">merges<" in text
    # learning curves and the calibration grid as images
    assert text.count('<figure><img alt="') == 3
    assert "Threshold 0.7, minimum area 0 m², seed threshold 0.5" in text
    assert "At the edge of its grid: threshold 0.7 of predict.threshold_grid [0.3, 0.5, 0.7]. A wider grid" in text


def test_the_calibration_chart_shows_each_cell_at_its_best_seed_threshold() -> None:
    grid = [{"threshold": t, "seed_threshold": s, "min_area_m2": a, "polygon_f1": f}
            for t, s, a, f in [(0.5, 0.5, 0.0, 0.6), (0.5, 0.9, 0.0, 0.2), (0.7, 0.5, 0.0, 0.1),
                               (0.7, 0.9, 0.0, 0.3), (0.5, 0.9, 20.0, 0.4)]]
    ts, areas, f1 = f1_by_area_and_threshold(grid)
    assert (ts, areas) == ([0.5, 0.7], [0.0, 20.0])
    # the later, worse seed threshold does not overwrite the better one; a cell the grid lacks stays empty
    assert f1[0].tolist() == [0.6, 0.3] and f1[1, 0] == 0.4 and np.isnan(f1[1, 1])


def test_overlays_are_placed_on_the_rasters_extent(fake_run: FakeRun, run_html) -> None:
    data = payload(run_html[0].read_text())
    for s in data["scenes"]:
        with rasterio.open(fake_run.run_dir / "predict" / f"{s['id']}_prob.tif") as src:
            w, so, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
            deg_per_px = abs(e - w) / src.width
        for layer in ("image", "prob"):
            (s0, w0), (n0, e0) = s[layer]["bounds"]
            # the reprojected raster covers the scene (a UTM rectangle becomes a slightly larger lon/lat box)
            assert w0 <= w + deg_per_px and e0 >= e - deg_per_px, (s["id"], layer)
            assert s0 <= so + deg_per_px and n0 >= n - deg_per_px, (s["id"], layer)
            assert (e0 - w0) < (e - w) * 1.05 and (n0 - s0) < (n - so) * 1.05, (s["id"], layer)
        assert s["bounds"] == s["prob"]["bounds"]
        assert s["image"]["uri"].startswith("data:image/") and s["prob"]["uri"].startswith("data:image/png")


def test_the_report_decodes_probability_by_the_contracts_rule(fake_run: FakeRun, tmp_path: Path) -> None:
    from footprints.contracts.probability import read_probability
    from footprints.report import rasters

    path = fake_run.run_dir / "predict" / "A_prob.tif"
    with rasterio.open(path) as src:
        raw, mask = src.read(1), src.read_masks(1)
    assert raw.dtype == np.uint8 and (mask == 0).any()  # a uint8 raster with invalid pixels
    full, valid = read_probability(path)
    np.testing.assert_array_equal(full, raw.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(valid, mask > 0)
    # the report at full size: the contract's values, NaN where invalid
    shown, _, _, size = rasters.read_probability(path, max(raw.shape))
    assert size == (raw.shape[1], raw.shape[0])
    np.testing.assert_array_equal(shown, np.where(valid, full, np.nan))
    # decimated: the contract's own decimated read (its out_shape), NaN where invalid
    small, _, _, _ = rasters.read_probability(path, 50)
    p, v = read_probability(path, out_shape=small.shape)
    assert max(small.shape) == 50
    np.testing.assert_array_equal(small, np.where(v, p, np.nan))


def test_page_is_self_contained(run_html) -> None:
    text = run_html[0].read_text()
    # nothing that a browser would fetch: every src/url is a data URI; links are only the licence's
    for m in re.finditer(r'(?:src|href)="([^"]*)"', text):
        assert m.group(1).startswith(("data:", "#", "https://leafletjs.com")), m.group(0)
    assert not re.search(r"url\((?!data:|#default#VML)", text)
    assert "@import" not in text
    assert "default-src 'none'" in text  # and the browser is told to refuse any connection
    assert "BSD 2-Clause License" in text and f"Leaflet</a> {build_assets.VERSION}" in text
    assert "downsampled" in payload_text_of(text, "size-note")


def payload_text_of(text: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>(.*?)</p>', text, re.S)
    return m.group(1) if m else ""


def test_size_bound_shrinks_the_rasters_and_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    img = tmp_path / "noise.tif"
    with rasterio.open(
        img,
        "w",
        driver="GTiff",
        width=1600,
        height=1200,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=rasterio.Affine(0.5, 0, 450000, 0, -0.5, 5550000),
    ) as dst:
        dst.write(rng.integers(0, 256, (3, 1200, 1600), dtype=np.uint8))
    scene = ReportScene("noise", image=img)
    free = write_report(tmp_path / "free.html", [ReportScene("noise", image=img)], max_bytes=50_000_000)
    bound = 400_000
    assert free["bytes"] > bound and free["max_side_used"] == 1024  # the bound below really binds
    held = write_report(tmp_path / "held.html", [scene], max_bytes=bound)
    assert held["within_bound"] and held["bytes"] <= bound == held["max_bytes"]
    assert (tmp_path / "held.html").stat().st_size == held["bytes"]
    assert held["max_side_used"] < 1024
    note = payload_text_of((tmp_path / "held.html").read_text(), "size-note")
    w = payload((tmp_path / "held.html").read_text())["scenes"][0]["image"]["width"]
    assert "1600×1200 px →" in note and f"→ {w}×" in note and "(bound 0.4 MB)" in note


def test_matches_that_disagree_with_the_footprints_do_not_change_the_count(
    tmp_path: Path, fake_run: FakeRun
) -> None:
    matches = json.loads((fake_run.run_dir / "evaluate" / "matches.geojson").read_text())
    a_pred = [
        f
        for f in matches["features"]
        if f["properties"]["scene"] == "A" and f["properties"]["kind"] == "pred"
    ]
    short = tmp_path / "short.geojson"
    short.write_text(json.dumps({"type": "FeatureCollection", "features": a_pred[:2]}))
    out = write_report(
        tmp_path / "r.html",
        [ReportScene("A", footprints=fake_run.run_dir / "predict" / "A.geojson", matches=short)],
    )
    data = payload((tmp_path / "r.html").read_text())
    assert out["footprints"] == len(data["scenes"][0]["footprints"]) == fake_run.footprints["A"]
    assert not data["scenes"][0]["has_matches"]
    assert any("disagree" in n for n in data["scenes"][0]["notes"])


def test_a_run_of_many_scenes_shows_a_bounded_number_and_says_how_many(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from footprints.report.selection import MAX_SCENES

    n = 200
    ids = [f"scene_{i:04d}" for i in range(n)]
    # the most polygon errors (FP + FN, as make_many_scenes sets them) first, ties by scene id
    ranked = sorted(range(n), key=lambda i: (-((7 * i) % 23 + i % 5), ids[i]))
    shown = sorted(ids[i] for i in ranked[:MAX_SCENES])
    # the other scenes' files are not even JSON: a report that opened one would say so
    make_many_scenes(tmp_path, n, unreadable=set(ids) - set(shown))
    with caplog.at_level(logging.WARNING, logger="footprints"):
        summary = report_for_run(tmp_path / "outputs" / "many")
    text = Path(summary["path"]).read_text()
    data = payload(text)
    assert MAX_SCENES == 50 and summary["scenes"] == 50 and summary["scenes_total"] == n
    assert [s["id"] for s in data["scenes"]] == shown
    assert re.findall(r'data-scene="([^"]+)"', text) == shown  # the table's rows: the shown scenes
    m = re.search(r'<p id="scene-count" data-total="(\d+)" data-shown="(\d+)">(.*?)</p>', text)
    assert m and (m.group(1), m.group(2)) == ("200", "50")
    assert "The run has 200 scenes; this page shows 50 of them (those with the most polygon errors" in m.group(3)
    assert "in 50 scenes (of 200)" in text
    assert data["n_footprints"] == summary["footprints"] == 50
    assert all(s["has_matches"] and not s["notes"] for s in data["scenes"])  # each from its own matches file
    assert "cannot read" not in caplog.text
    # the metrics row of every scene, with every scene's footprints (predict's markers count them)
    assert '<tr class="overall"><th scope="row">all 200 scenes</th><td>200</td>' in text

    # write_report given every scene bounds them too
    folder = tmp_path / "outputs" / "many" / "predict"
    every = [ReportScene(sid, footprints=folder / f"{sid}.geojson", metrics=m) for sid, m in
             json.loads((tmp_path / "outputs" / "many" / "evaluate" / "metrics.json").read_text())["per_scene"].items()]
    direct = write_report(tmp_path / "direct.html", every, max_scenes=10)
    assert (direct["scenes"], direct["scenes_total"]) == (10, n)
    assert [s["id"] for s in payload((tmp_path / "direct.html").read_text())["scenes"]] == sorted(
        ids[i] for i in ranked[:10])

    # without metrics (predict --input outputs): a fixed sample, by a hash of the scene id
    out = report_for_predictions(tmp_path / "none.geojson", scene_dir=tmp_path / "outputs" / "many" / "predict",
                                 out_html=tmp_path / "pred.html", max_scenes=20)
    sample = sorted(sorted(ids, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:20])
    assert [s["id"] for s in payload((tmp_path / "pred.html").read_text())["scenes"]] == sample
    assert out["scenes"] == 20 and out["scenes_total"] == n
    assert "this page shows 20 of them (a fixed sample" in (tmp_path / "pred.html").read_text()


def test_merged_layers_are_read_a_feature_at_a_time(
    tmp_path: Path, fake_run: FakeRun, run_html, monkeypatch: pytest.MonkeyPatch
) -> None:
    from footprints.report import vectors

    merged = fake_run.run_dir / "evaluate" / "matches.geojson"
    whole = json.loads(merged.read_text())["features"]
    for chunk in (7, 64, 1 << 20):
        assert list(vectors.iter_features(merged, chunk)) == whole
    gdal = tmp_path / "gdal.geojson"  # GDAL's layout: header members, then one feature a line
    pyogrio.write_dataframe(pyogrio.read_dataframe(merged), gdal, driver="GeoJSON")
    assert list(vectors.iter_features(gdal, 16)) == json.loads(gdal.read_text())["features"]
    (tmp_path / "cut.geojson").write_text(merged.read_text()[:-40])
    with pytest.raises(ValueError):
        list(vectors.iter_features(tmp_path / "cut.geojson", 16))
    # the report of the run with every file streamed: the same vectors on the page
    monkeypatch.setattr(vectors, "STREAM_ABOVE", 0)
    monkeypatch.setattr(vectors, "_CHUNK", 64)
    streamed = payload(Path(report_for_run(fake_run.run_dir, tmp_path / "s.html")["path"]).read_text())
    before = payload(run_html[0].read_text())
    assert [(s["id"], s["footprints"], s["truth"]) for s in streamed["scenes"]] == [
        (s["id"], s["footprints"], s["truth"]) for s in before["scenes"]
    ]


def test_pixel_space_scenes_get_their_own_map(pixel_report) -> None:
    path, n = pixel_report
    assert path.name == "out_report.html"
    text = path.read_text()
    data = payload(text)
    (scene,) = data["scenes"]
    assert scene["kind"] == "pixel" and scene["frame"]["flip"] is True
    assert len(scene["footprints"]) == n
    assert scene["bounds"] == [[-120.0, 0.0], [0.0, 160.0]]  # 160 x 120 px, y up on the map
    assert 'id="map-pixel"' in text and 'id="map"' not in text


def test_images_of_predict_inputs_are_found_by_scene_id(tmp_path: Path) -> None:
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for name in ("dir/sub/s1.tif", "dir/s2.png", "dir/s2.json", "dir/other.tif", "s3.TIF"):
        (tmp_path / name).write_bytes(b"")
    found = images_from_inputs([tmp_path / "dir", tmp_path / "s3.TIF"], ["s1", "s2", "s3", "missing"])
    assert found == {
        "s1": tmp_path / "dir/sub/s1.tif",
        "s2": tmp_path / "dir/s2.png",
        "s3": tmp_path / "s3.TIF",
    }


def test_report_command_for_a_run_and_for_predict_input_outputs(
    tmp_path: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture
) -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(output_root=str(fake_run.run_dir.parent), name=fake_run.run_dir.name)
    out = run_report(cfg, output=tmp_path / "run.html")
    assert out["footprints"] == fake_run.total and Path(out["path"]) == tmp_path / "run.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {tmp_path / 'run.html'}"
    geojson, images, n = make_pixel_predictions(tmp_path / "pred")
    without = payload(Path(run_report(cfg, predictions=geojson)["path"]).read_text())
    with_imgs = payload(
        Path(run_report(cfg, predictions=geojson, inputs=[images["C"].parent])["path"]).read_text()
    )
    assert without["scenes"][0]["image"] is None and with_imgs["scenes"][0]["image"] is not None
    assert len(with_imgs["scenes"][0]["footprints"]) == n


def test_embedded_json_cannot_close_its_script_tag() -> None:
    text = json_for_script({"scene": "</script><script>alert(1)</script><!--"})
    assert "<" not in text
    assert json.loads(text)["scene"] == "</script><script>alert(1)</script><!--"


def test_report_written_atomically_leaves_no_temporary_files(fake_run: FakeRun, run_html) -> None:
    folder = run_html[0].parent
    assert [p.name for p in folder.iterdir()] == ["index.html"]


# ---------------------------------------------------------------------------------------------- GPKG style
def _gpkg(path: Path, with_status: bool = False) -> Path:
    import geopandas as gpd
    import shapely

    cols = {
        "scene": ["a", "a", "b"],
        "area_m2": [50.0, 60.0, 70.0],
        "mean_prob": [0.55, 0.75, 0.95],
        "max_prob": [0.9, 0.9, 1.0],
    }
    if with_status:
        cols.update(status=["TP", "FP", "FN"], kind=["pred", "pred", "truth"])
    gdf = gpd.GeoDataFrame(cols, geometry=[shapely.box(i, i, i + 1, i + 1) for i in range(3)], crs=32633)
    pyogrio.write_dataframe(gdf, path, layer="footprints", driver="GPKG")
    return path


def _qgis_query(path: Path, layer: str = "footprints") -> list:
    """The filter QGIS applies to layer_styles when it opens a layer (QgsOgrUtils::loadStoredStyle),
    run through GDAL like QGIS does."""
    df = pyogrio.read_dataframe(
        path,
        layer="layer_styles",
        read_geometry=False,
        where=f"f_table_schema = '' AND f_table_name = '{layer}' "
        "AND f_geometry_column = 'geom' AND useAsDefault = 1",
    )
    return df.to_dict("records")


def test_probability_style_is_the_layer_default_and_the_gpkg_stays_valid(tmp_path: Path) -> None:
    path = _gpkg(tmp_path / "f.gpkg")
    before = pyogrio.read_dataframe(path, layer="footprints")
    assert add_layer_style(path, "footprints", "probability") == "footprints probability"
    after = pyogrio.read_dataframe(path, layer="footprints")
    assert after.equals(before)
    (row,) = _qgis_query(path)
    qml = ET.fromstring(row["styleQML"].split("\n", 1)[1])
    renderer = qml.find("renderer-v2")
    assert renderer.get("type") == "graduatedSymbol" and renderer.get("attr") == "mean_prob"
    assert len(renderer.findall("ranges/range")) == len(renderer.findall("symbols/symbol")) == 6
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        assert con.execute("PRAGMA application_id").fetchone() == (0x47504B47,)  # 'GPKG'
        assert con.execute(
            "SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'"
        ).fetchone() == ("attributes",)
    assert [tuple(x) for x in pyogrio.list_layers(path)] == [
        ("footprints", "Polygon"),
        ("layer_styles", None),
    ]


def test_match_style_categorises_predictions_and_truths(tmp_path: Path) -> None:
    path = _gpkg(tmp_path / "m.gpkg", with_status=True)
    add_layer_style(path, "footprints", "probability")
    add_layer_style(path, "footprints", "match")
    (row,) = _qgis_query(path)  # exactly one default: the match style replaced the probability one
    assert row["styleName"] == "footprints match"
    renderer = ET.fromstring(row["styleQML"].split("\n", 1)[1]).find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and '"kind"' in renderer.get("attr")
    assert {c.get("value") for c in renderer.findall("categories/category")} == {
        "TP",
        "FP",
        "truth FN",
        "truth TP",
    }
    assert default_style(path)["styleName"] == "footprints match"
    assert len(pyogrio.read_dataframe(path, layer="layer_styles", read_geometry=False)) == 2
    # written again: still one row per style name, one default
    add_layer_style(path, "footprints", "match")
    assert len(pyogrio.read_dataframe(path, layer="layer_styles", read_geometry=False)) == 2
    assert len(_qgis_query(path)) == 1


def test_auto_style_follows_the_layer_fields(tmp_path: Path) -> None:
    assert add_layer_style(_gpkg(tmp_path / "p.gpkg")) == "footprints probability"
    assert add_layer_style(_gpkg(tmp_path / "m.gpkg", with_status=True)) == "footprints match"


def test_style_refuses_a_layer_without_the_field_and_leaves_the_file_alone(tmp_path: Path) -> None:
    path = _gpkg(tmp_path / "f.gpkg")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StyleError, match="no status field"):
        add_layer_style(path, "footprints", "match")
    with pytest.raises(StyleError, match="no feature layer"):
        add_layer_style(path, "nope", "probability")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_ogrinfo_accepts_the_styled_gpkg(tmp_path: Path) -> None:
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("GDAL's ogrinfo is not installed (pyogrio's GDAL reads the file in the tests above)")
    path = _gpkg(tmp_path / "f.gpkg")
    add_layer_style(path)
    r = subprocess.run([ogrinfo, "-ro", "-so", "-al", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ERROR" not in r.stderr and "Feature Count: 3" in r.stdout


VALIDATORS = (
    "/usr/lib/python3/dist-packages/osgeo_utils/samples/validate_gpkg.py",
    "/usr/share/doc/python3-gdal/examples/validate_gpkg.py",
)


def test_gdal_gpkg_validator_finds_nothing_new_in_the_styled_file(tmp_path: Path) -> None:
    """GDAL's validate_gpkg.py (Debian's python3-gdal) on the file before and after styling: the style
    table must add no finding. (An older validator may already flag the plain file, e.g. GDAL 3.6 does not
    know the R-tree triggers of GeoPackage 1.4 that newer GDAL writes, hence the comparison.)"""
    import importlib.util

    found = next((Path(v) for v in VALIDATORS if Path(v).is_file()), None)
    if found is None:
        pytest.skip("GDAL's validate_gpkg.py is not installed (Debian package python3-gdal)")
    spec = importlib.util.spec_from_file_location("validate_gpkg", found)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def findings(path: Path) -> tuple[list, list]:
        checker = mod.GPKGChecker(str(path), abort_at_first_error=False, warning_msg=False)
        checker.check()
        return checker.errors, checker.warnings

    plain = _gpkg(tmp_path / "plain.gpkg", with_status=True)
    styled = _gpkg(tmp_path / "styled.gpkg", with_status=True)
    add_layer_style(styled, kind="probability")
    add_layer_style(styled, kind="match")
    (e0, w0), (e1, w1) = findings(plain), findings(styled)
    assert [e for e in e1 if e not in e0] == [] and [w for w in w1 if w not in w0] == []


QGIS_PROBE = """
import json, os, sys
from qgis.core import QgsApplication, QgsVectorLayer
app = QgsApplication([], False)
app.initQgis()
out = {}
for path in sys.argv[1:]:
    layer = QgsVectorLayer(path + "|layername=footprints", "footprints", "ogr")
    r = layer.renderer()
    d = {"valid": layer.isValid(), "renderer": r.type(), "attr": getattr(r, "classAttribute", lambda: None)()}
    if r.type() == "categorizedSymbol":
        d["categories"] = {c.value(): c.symbol().symbolLayer(0).strokeColor().name() for c in r.categories()}
    if r.type() == "graduatedSymbol":
        d["ranges"] = [[x.lowerValue(), x.upperValue(), x.symbol().color().name()] for x in r.ranges()]
    out[path] = d
print(json.dumps(out), flush=True)
os._exit(0)  # QGIS's own teardown may crash after the work is done
"""


def test_qgis_opens_the_layers_with_their_default_style(tmp_path: Path) -> None:
    """The real consumer: QGIS (Debian's python3-qgis, where installed) opening the GeoPackages."""
    import os

    python = qgis_python()
    plain = _gpkg(tmp_path / "plain.gpkg")
    prob = _gpkg(tmp_path / "prob.gpkg")
    match = _gpkg(tmp_path / "match.gpkg", with_status=True)
    add_layer_style(prob)
    add_layer_style(match)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path)}
    r = subprocess.run(
        [python, "-c", QGIS_PROBE, str(plain), str(prob), str(match)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen[str(plain)]["renderer"] == "singleSymbol"  # QGIS's default without a stored style
    g = seen[str(prob)]
    assert g["valid"] and g["renderer"] == "graduatedSymbol" and g["attr"] == "mean_prob"
    assert [x[:2] for x in g["ranges"]][1:] == [[0.5, 0.6], [0.6, 0.7], [0.7, 0.8], [0.8, 0.9], [0.9, 1.0]]
    c = seen[str(match)]
    assert c["valid"] and c["renderer"] == "categorizedSymbol"
    assert c["categories"] == {"TP": "#006837", "FP": "#a50026", "truth FN": "#ff7f00", "truth TP": "#5a5a5a"}


# ---------------------------------------------------------------------------------------------- browser
# (the `browser` fixture: conftest.py)


def _png_rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.browser
def test_report_opens_offline_without_errors_and_draws_every_footprint(
    browser, fake_run: FakeRun, run_html
) -> None:
    page = open_report(browser, run_html[0])
    try:
        n = geojson_count(*(fake_run.run_dir / "predict" / f"{s}.geojson" for s in ("A", "B")))
        assert page.eval("window.footprintsReport.count('footprints')") == n
        assert page.eval("document.querySelectorAll('path.fp-pred').length") == n  # drawn, not just loaded
        assert page.eval("document.querySelectorAll('path.fp-truth-fn').length") == 2
        assert page.eval("document.getElementById('footprint-count').textContent").startswith(
            f"{n} footprints"
        )
        assert page.eval("window.footprintsReport.errors") == []
        page.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert page.errors == []
        assert [u for u in page.requests if not u.startswith("data:")] == [run_html[0].resolve().as_uri()]
    finally:
        page.close()


@pytest.mark.browser
def test_imagery_is_visible_and_the_right_way_up(browser, run_html) -> None:
    page = open_report(browser, run_html[0])
    try:
        # scene A alone, without the vectors on top: what is left on screen is the imagery
        page.eval("""(() => { const r = window.footprintsReport, g = r.groups.geo, m = r.maps.geo;
            r.zoomTo('A'); ['footprints', 'missed', 'scenes'].forEach(k => m.removeLayer(g[k])); })()""")
        page.wait_for("Array.from(document.querySelectorAll('img.scene-image')).every(i => i.complete)")
        rect = page.eval("""(() => { const i = document.querySelector('img.scene-image[alt="imagery of A"]');
            const r = i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()""")
        left, top, w, h = rect
        assert w > 300 and h > 200  # zoomed to the scene

        def quadrant_colours() -> dict[str, np.ndarray]:
            shot = _png_rgb(page.screenshot())
            out = {}
            for name, (fx, fy) in {
                "NW": (0.25, 0.25),
                "NE": (0.75, 0.25),
                "SW": (0.25, 0.75),
                "SE": (0.75, 0.75),
            }.items():
                x, y = int(left + fx * w), int(top + fy * h)
                out[name] = shot[y - 3 : y + 4, x - 3 : x + 4].reshape(-1, 3).mean(axis=0)
            return out

        def matches() -> bool:
            cols = quadrant_colours()
            return all(np.abs(cols[q] - np.array(QUADRANTS[q])).max() < 40 for q in QUADRANTS)

        page.wait_for_python(matches, timeout=10)
        # and beside the scene the map is empty (so the check above can fail)
        shot = _png_rgb(page.screenshot())
        bg = shot[int(top + h / 2), max(int(left) - 20, 2)]
        assert np.abs(bg.astype(int) - 233).max() < 8, bg
    finally:
        page.close()


@pytest.mark.browser
def test_clicking_a_scene_row_moves_the_map_and_a_footprint_opens_its_popup(
    browser, fake_run: FakeRun, run_html
) -> None:
    page = open_report(browser, run_html[0])
    try:
        view = ("(() => { const m = window.footprintsReport.maps.geo, c = m.getCenter(); "
                "return [c.lng, c.lat, m.getZoom()]; })()")
        for sid in ("B", "A"):
            before = page.eval(view)
            page.click_selector(f'tr[data-scene="{sid}"]')
            w, s, e, n = fake_run.bounds_lonlat[sid]
            lng, lat, zoom = page.wait_for(f"""(() => {{ const v = {view};
                return (v[0] > {w} && v[0] < {e} && v[1] > {s} && v[1] < {n}) ? v : null; }})()""")
            assert (lng, lat) != tuple(before[:2]) and zoom > 10
            assert page.eval(
                f"document.querySelector('tr[data-scene=\"{sid}\"]').classList.contains('current')"
            )
        # a real click on one footprint of A (the map is on A now) opens its popup
        x, y = page.eval("""(() => { const m = window.footprintsReport.maps.geo;
            const layer = window.footprintsReport.groups.geo.footprints.getLayers()[0].getLayers()[0];
            m.getContainer().scrollIntoView({block: 'center'});
            const p = m.latLngToContainerPoint(layer.getBounds().getCenter());
            const r = m.getContainer().getBoundingClientRect();
            return [r.left + p.x, r.top + p.y]; })()""")
        page.click(x, y)
        text = page.wait_for("(document.querySelector('.leaflet-popup-content') || {}).textContent")
        assert "sceneA" in text and "area80.0 m²" in text and "match" in text
        # the probability raster is a layer switch away
        assert page.eval("document.querySelectorAll('img.scene-prob').length") == 0
        page.click_selector(".leaflet-control-layers-overlays label:nth-child(2) input")
        page.wait_for("document.querySelectorAll('img.scene-prob').length === 2")
        assert page.errors == []
    finally:
        page.close()


@pytest.mark.browser
def test_pixel_space_report_in_the_browser(browser, pixel_report) -> None:
    path, n = pixel_report
    page = open_report(browser, path)
    try:
        assert page.eval("!!window.footprintsReport.maps.pixel && !window.footprintsReport.maps.geo")
        assert page.eval("window.footprintsReport.count('footprints')") == n
        assert page.eval("document.querySelectorAll('path.fp-pred').length") == n
        page.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert page.errors == []
        assert [u for u in page.requests if not u.startswith("data:")] == [path.resolve().as_uri()]
    finally:
        page.close()


@pytest.mark.browser
def test_hostile_scene_names_stay_text(browser, tmp_path: Path) -> None:
    """Scene ids come from file names: markup in one must show as text, never run or load anything."""
    evil = '<img src="x" onerror="console.error(1)">"</script>'
    feats = [
        {
            "type": "Feature",
            "properties": {"scene": evil, "area_m2": 50.0, "mean_prob": 0.8},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[14.3, 50.1], [14.3001, 50.1], [14.3001, 50.1001], [14.3, 50.1]]],
            },
        }
    ]
    gj = tmp_path / "evil.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    write_report(tmp_path / "evil.html", [ReportScene(evil, footprints=gj)], title=evil)
    page = open_report(browser, tmp_path / "evil.html")
    try:
        assert page.eval("document.querySelector('tr[data-scene] .sid').textContent") == evil
        assert page.eval("document.title") == evil
        assert page.eval("window.footprintsReport.count()") == 1
        page.eval("void window.footprintsReport.zoomTo(Object.keys(window.footprintsReport.sceneBounds)[0])")
        assert page.eval("document.querySelectorAll('img[src=\"x\"]').length") == 0
        assert page.errors == []
        assert [u for u in page.requests if not u.startswith("data:")] == [
            (tmp_path / "evil.html").resolve().as_uri()
        ]
    finally:
        page.close()
