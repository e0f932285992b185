"""Hostile and unusual input, round two (issue 23): what a user with odd data, or an attacker, can hand to
the imagery and label readers. Every case ends in one line naming the file and the reason (or in a correct
result), the good scenes of the same run complete, and nothing is read that was not meant as imagery.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from checkpoint_fixtures import red_checkpoint
from pyproj import Transformer
from rasterio.windows import Window

from footprints.config import DataConfig, TileConfig, load_config
from footprints.errors import InputError
from footprints.polygons.vectorize import polygons_from_probability
from footprints.scenes.geo import metric_crs_for
from footprints.scenes.reader import gsd_warning, open_scene
from footprints.scenes.sources import SceneSource, discover_scenes, sources_from_paths
from footprints.stages.predict import run as run_predict

UTM = Affine(0.5, 0, 500000.0, 0, -0.5, 6650000.0)  # zone 33N, near 60 N
GEOTIFF = DataConfig(format="geotiff", label_format="vector")


def write_tif(path: Path, data: np.ndarray, transform: Affine = UTM, crs: str | None = "EPSG:32633",
              **profile) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
            "dtype": data.dtype.name, "transform": transform}
    if crs is not None:
        prof["crs"] = crs
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


def red_squares(size: int = 96, squares: tuple[tuple[int, int, int], ...] = ((20, 20, 20),)) -> np.ndarray:
    rgb = np.full((3, size, size), 30, np.uint8)
    for r, c, s in squares:
        rgb[0, r : r + s, c : c + s] = 230
    return rgb


def predict(tmp_path: Path, inputs: list, min_area: float = 0.0, name: str = "fp") -> dict:
    cfg = load_config(None, [f"output_root={tmp_path / 'outputs'}", "cluster.workers=0", "predict.threshold=0.5",
                             f"predict.min_area_m2={min_area}", "predict.overlap=0.25", "predict.batch_size=4",
                             "predict.instances=components", "predict.regularize=false"])
    # the model: a real checkpoint whose building probability is red / 255 (tests/checkpoint_fixtures.py)
    return run_predict(cfg, inputs=[str(p) for p in inputs], output=str(tmp_path / f"{name}.geojson"),
                       checkpoint=str(red_checkpoint(tmp_path / "model")))


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def one_line_naming(caplog, name: str) -> str:
    lines = [m for m in errors(caplog) if name in m]
    assert len(lines) == 1, (name, errors(caplog))
    assert "\n" not in lines[0] and "Traceback" not in lines[0]
    lines[0].encode("utf-8")  # prints anywhere
    return lines[0]


# ------------------------------------------------------------------------------------------ a web server


class _Recorder(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.server.hits.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web(monkeypatch):
    """A local HTTP server that records every request GDAL sends it (proxies off, so requests reach it)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    yield srv
    srv.shutdown()
    srv.server_close()


def raw_vrt(source: str, width: int = 10, height: int = 10) -> str:
    """A VRT whose one band is the bytes of `source` (any file, or a /vsicurl/ URL)."""
    return (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>EPSG:32633</SRS>'
            f"<GeoTransform>500000, 0.5, 0, 6650000, 0, -0.5</GeoTransform>"
            f'<VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">'
            f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><ImageOffset>0</ImageOffset>'
            f"<PixelOffset>1</PixelOffset><LineOffset>{width}</LineOffset></VRTRasterBand></VRTDataset>")


# ------------------------------------------------------------------------ 1. formats that point elsewhere


def test_1_a_vrt_reading_a_file_outside_the_input_folder_is_refused_by_content(tmp_path: Path, caplog):
    secret = tmp_path / "private" / "secrets.txt"
    secret.parent.mkdir()
    secret.write_text("PASSWORD=" + "x" * 200)
    folder = tmp_path / "in"
    write_tif(folder / "good.tif", red_squares())
    (folder / "steal.vrt").write_text(raw_vrt(str(secret)))
    (folder / "disguised.tif").write_text(raw_vrt(str(secret)))  # a .tif name does not make it a GeoTIFF
    with caplog.at_level(logging.WARNING):
        out = predict(tmp_path, [folder])
    assert out["scenes"] == 1 and out["failed"] == 2
    for name in ("steal.vrt", "disguised.tif"):
        assert "VRT" in one_line_naming(caplog, name)
    assert not list((tmp_path / "fp_scenes").glob("steal*")) and not list((tmp_path / "fp_scenes").glob("disguised*"))


def test_1_a_mask_raster_that_is_a_vrt_is_refused(tmp_path: Path):
    image = write_tif(tmp_path / "images" / "s.tif", red_squares())
    mask = tmp_path / "masks" / "s.tif"
    mask.parent.mkdir()
    mask.write_text(raw_vrt(str(image), 96, 96))
    with pytest.raises(InputError, match="VRT") as err:
        open_scene(SceneSource(image, mask=mask), DataConfig(format="geotiff", label_format="mask"))
    assert str(mask) in str(err.value)


def test_1_a_vsicurl_vrt_sends_no_request(tmp_path: Path, web):
    # the harness can see GDAL's requests: opening the URL directly reaches the server
    with pytest.raises(rasterio.errors.RasterioError):
        rasterio.open(f"/vsicurl/{web.url}/control.tif")
    assert web.hits
    web.hits.clear()
    vrt = tmp_path / "remote.tif"
    vrt.write_text(raw_vrt(f"/vsicurl/{web.url}/scene.tif"))
    with pytest.raises(InputError, match="VRT"):
        open_scene(SceneSource(vrt), GEOTIFF)
    assert web.hits == []


def test_1_a_geojson_label_whose_crs_is_a_link_sends_no_request(tmp_path: Path, web):
    image = write_tif(tmp_path / "s.tif", red_squares())
    label = tmp_path / "s.geojson"
    label.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "link", "properties": {"href": f"{web.url}/crs.wkt", "type": "ogcwkt"}},
        "features": [{"type": "Feature", "properties": {},
                      "geometry": {"type": "Polygon", "coordinates": [[[500005, 6649995], [500010, 6649995],
                                                                       [500010, 6649990], [500005, 6649995]]]}}],
    }))
    with pytest.raises(InputError, match="link") as err:
        open_scene(SceneSource(image, label, label_kind="vector"), GEOTIFF)
    assert "s.geojson" in str(err.value)
    assert web.hits == []


def test_1_a_label_that_is_an_ogr_vrt_is_refused(tmp_path: Path):
    image = write_tif(tmp_path / "s.tif", red_squares())
    elsewhere = tmp_path / "private" / "other.geojson"  # any vector file the process can read
    elsewhere.parent.mkdir()
    gpd.GeoDataFrame(geometry=[shapely.box(500005, 6649960, 500015, 6649970)], crs="EPSG:32633").to_file(elsewhere)
    label = tmp_path / "s.geojson"
    label.write_text(f'<OGRVRTDataSource><OGRVRTLayer name="s"><SrcDataSource>{elsewhere}</SrcDataSource>'
                     "<SrcLayer>other</SrcLayer></OGRVRTLayer></OGRVRTDataSource>")
    with pytest.raises(InputError, match="not a GeoJSON, GeoPackage or Shapefile") as err:
        open_scene(SceneSource(image, label, label_kind="vector"), GEOTIFF)
    assert "OGR VRT" in str(err.value) and "s.geojson" in str(err.value)


def test_1_urls_and_gdal_paths_are_refused_wherever_a_path_comes_from(tmp_path: Path, web):
    url = f"/vsicurl/{web.url}/scene.tif"
    with pytest.raises(InputError, match="URL or a GDAL virtual file system"):
        sources_from_paths([url], DataConfig(format="geotiff"))
    with pytest.raises(InputError, match="URL or a GDAL virtual file system"):
        sources_from_paths([f"{web.url}/scene.tif"], DataConfig(format="geotiff"))
    with pytest.raises(InputError, match="data.root is a URL"):
        discover_scenes(DataConfig(root=f"/vsicurl/{web.url}/data", format="geotiff"))
    # a geotransforms file (data.geotransforms) whose CRS is a URL: GDAL would fetch it
    png = tmp_path / "p.png"
    with rasterio.open(png, "w", driver="PNG", width=16, height=16, count=3, dtype="uint8") as ds:
        ds.write(np.full((3, 16, 16), 100, np.uint8))
    table = tmp_path / "gt.json"
    table.write_text(json.dumps({"p.png": {"geotransform": [15.0, 1e-5, 0, 60.0, 0, -1e-5],
                                           "crs": f"/vsicurl/{web.url}/crs.prj"}}))
    with pytest.raises(InputError, match="files and URLs are not read") as err:
        open_scene(SceneSource(png), DataConfig(geotransforms=str(table)))
    assert "gt.json" in str(err.value)
    with pytest.raises(InputError, match="data.geotransforms is a URL"):
        open_scene(SceneSource(png), DataConfig(geotransforms=f"{web.url}/gt.json"))
    assert web.hits == []


# ------------------------------------------------------------------------ 2. true metres in every CRS

LON, LAT = 15.0, 60.0  # the central meridian of UTM zone 33N: the Mercator and UTM grids are parallel here


def _same_scene_in(crs: str) -> tuple[np.ndarray, Affine, list]:
    """Four buildings (two of 16 x 16 m, two of 6 x 6 m) rasterised at 0.5 m (true) on a grid of `crs`."""
    to_utm = Transformer.from_crs(4326, 32633, always_xy=True)
    x0, y0 = to_utm.transform(LON, LAT)
    ground = [shapely.box(x0 + dx, y0 - dy - s, x0 + dx + s, y0 - dy)
              for dx, dy, s in ((10, 10, 16), (50, 50, 16), (10, 70, 6), (70, 15, 6))]
    if crs == "EPSG:32633":
        return ground, Affine(0.5, 0, x0, 0, -0.5, y0), ground
    tr = Transformer.from_crs(32633, crs, always_xy=True)
    geoms = [shapely.transform(g, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))) for g in ground]
    mx0, my0 = tr.transform(x0, y0)
    k = (my0 - tr.transform(x0, y0 - 100.0)[1]) / 100.0  # Mercator units per true metre here (~2 at 60 N)
    return geoms, Affine(0.5 * k, 0, mx0, 0, -0.5 * k, my0), ground


def _probability(geoms: list, transform: Affine) -> np.ndarray:
    return rasterio.features.rasterize([(g, 255) for g in geoms], out_shape=(200, 200), transform=transform,
                                       dtype="uint8")


def test_2_web_mercator_at_60n_measures_true_metres_like_utm(tmp_path: Path):
    results = {}
    for crs in ("EPSG:32633", "EPSG:3857"):
        geoms, transform, _ = _same_scene_in(crs)
        gdf = polygons_from_probability(_probability(geoms, transform), transform, crs, threshold=0.5,
                                        min_area_m2=100.0, hole_area_m2=0.0, simplify_px=1.0)
        results[crs] = np.sort(gdf["area_m2"].to_numpy())
        # the pixel size in true metres
        tif = write_tif(tmp_path / f"{crs[5:]}.tif", red_squares(200), transform=transform, crs=crs)
        with open_scene(SceneSource(tif), GEOTIFF) as reader:
            assert reader.gsd_m == pytest.approx(0.5, rel=0.01), crs
    utm, merc = results["EPSG:32633"], results["EPSG:3857"]
    assert len(utm) == 2 and len(merc) == 2  # the 36 m2 buildings are below the 100 m2 minimum in both
    assert utm == pytest.approx(256.0, rel=0.03)
    assert merc == pytest.approx(utm, rel=0.01)
    geoms, transform, _ = _same_scene_in("EPSG:3857")
    assert metric_crs_for(transform, "EPSG:3857", 200, 200).to_epsg() == 32633


def test_2_predict_on_a_web_mercator_scene_writes_true_areas_in_a_utm_geopackage(tmp_path: Path):
    out = {}
    for crs in ("EPSG:32633", "EPSG:3857"):
        geoms, transform, _ = _same_scene_in(crs)
        red = np.where(_probability(geoms, transform) > 0, 230, 30).astype(np.uint8)
        rgb = np.stack([red, np.full_like(red, 30), np.full_like(red, 30)])
        folder = tmp_path / crs[5:]
        write_tif(folder / f"s{crs[5:]}.tif", rgb, transform=transform, crs=crs)
        res = predict(tmp_path, [folder], min_area=100.0, name=f"fp{crs[5:]}")
        assert res["scenes"] == 1
        gpkg = tmp_path / f"fp{crs[5:]}_scenes" / f"s{crs[5:]}.gpkg"
        assert pyogrio.read_info(gpkg, layer="footprints")["crs"] == "EPSG:32633"
        out[crs] = np.sort(pyogrio.read_dataframe(gpkg, layer="footprints")["area_m2"].to_numpy())
    assert len(out["EPSG:3857"]) == len(out["EPSG:32633"]) == 2
    assert out["EPSG:3857"] == pytest.approx(out["EPSG:32633"], rel=0.01)


# ------------------------------------------------------------------------ 3. a GSD far from the model's


def test_3_resampling_a_coarse_scene_to_the_models_gsd_is_bounded(tmp_path: Path):
    ten_m = write_tif(tmp_path / "sentinel.tif", red_squares(64), transform=Affine(10, 0, 500000, 0, -10, 6650000))
    with pytest.raises(InputError, match=r"20x coarser than the model's 0.5 m") as err:
        open_scene(SceneSource(ten_m), GEOTIFF, TileConfig(target_gsd=0.5))
    assert "sentinel.tif" in str(err.value) and "64x64 to 1280x1280 px" in str(err.value)
    km = write_tif(tmp_path / "km.tif", red_squares(2, ()), transform=Affine(1000, 0, 500000, 0, -1000, 6650000))
    with pytest.raises(InputError, match=r"2000x coarser .* 2x2 to 4000x4000 px"):
        open_scene(SceneSource(km), GEOTIFF, TileConfig(target_gsd=0.5))
    # 3x coarser is still enlarged (a 1.5 m pan-sharpened scene), with a warning predict can log
    pan = write_tif(tmp_path / "pan.tif", red_squares(32), transform=Affine(1.5, 0, 500000, 0, -1.5, 6650000))
    with open_scene(SceneSource(pan), GEOTIFF, TileConfig(target_gsd=0.5)) as reader:
        assert (reader.width, reader.height) == (96, 96)
        warning = gsd_warning(reader, 0.5)
    assert warning is not None and "pan.tif" in warning and "3x coarser" in warning and "\n" not in warning


def test_3_a_scene_far_from_the_models_gsd_gets_one_warning_line(tmp_path: Path):
    def warning(gsd: float, target: float | None) -> str | None:
        path = write_tif(tmp_path / f"g{gsd}.tif", red_squares(64), transform=Affine(gsd, 0, 500000, 0, -gsd, 6650000))
        with open_scene(SceneSource(path), GEOTIFF, TileConfig(target_gsd=target) if target else None) as reader:
            return gsd_warning(reader, 0.5)

    assert "20x coarser than the model's 0.5 m" in warning(10.0, None)
    assert "10x finer than the model's 0.5 m" in warning(0.05, None)
    assert warning(0.05, 0.5) is None  # averaged down to the model's GSD: what it expects
    assert warning(0.6, None) is None and warning(0.3, None) is None


# ------------------------------------------------------------------------ 4. label files of several layers


def _two_layer_gpkg(path: Path, names: tuple[str, str]) -> Path:
    big = shapely.box(500000.5, 6649950.5, 500049.5, 6649999.5)  # ~96% of the 100 x 100 px scene
    small = shapely.box(500010, 6649980, 500021, 6649991)  # 22 x 22 px: ~5%
    pyogrio.write_dataframe(gpd.GeoDataFrame(geometry=[big], crs="EPSG:32633"), path, layer=names[0])
    pyogrio.write_dataframe(gpd.GeoDataFrame(geometry=[small], crs="EPSG:32633"), path, layer=names[1])
    return path


def _building_fraction(image: Path, label: Path, layer: str | None = None) -> float:
    with open_scene(SceneSource(image, label, label_kind="vector"),
                    DataConfig(format="geotiff", label_format="vector", label_layer=layer)) as reader:
        return float((reader.truth_mask(Window(0, 0, 100, 100)) == 1).mean())


def test_4_a_geopackage_of_parcels_then_buildings_reads_the_buildings(tmp_path: Path, caplog):
    image = write_tif(tmp_path / "s.tif", np.full((3, 100, 100), 90, np.uint8))
    label = _two_layer_gpkg(tmp_path / "s.gpkg", ("parcels", "buildings"))
    with caplog.at_level(logging.WARNING):
        assert _building_fraction(image, label) == pytest.approx(0.0484, abs=0.005)
    lines = [r.getMessage() for r in caplog.records if "s.gpkg" in r.getMessage()]
    assert len(lines) == 1 and "'parcels', 'buildings'" in lines[0] and "reading 'buildings'" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _building_fraction(image, label, "buildings") == pytest.approx(0.0484, abs=0.005)
        assert _building_fraction(image, label, "parcels") > 0.9
    assert not [r for r in caplog.records if "s.gpkg" in r.getMessage()]  # chosen: nothing to say
    with pytest.raises(InputError, match=r"has no layer 'houses' \(data.label_layer\); its layers: 'parcels', "
                                         r"'buildings'"):
        _building_fraction(image, label, "houses")


def test_4_several_layers_and_none_plainly_the_buildings_is_refused(tmp_path: Path):
    image = write_tif(tmp_path / "s.tif", np.full((3, 100, 100), 90, np.uint8))
    label = _two_layer_gpkg(tmp_path / "s.gpkg", ("parcels", "roads"))
    with pytest.raises(InputError, match=r"s.gpkg: has 2 layers \('parcels', 'roads'\) and none is plainly the "
                                         r"buildings.*set data.label_layer"):
        _building_fraction(image, label)


# ------------------------------------------------------------------------ 5. what a folder can hold


def test_5_a_folder_with_junk_loops_pipes_and_links_costs_each_bad_file_only_itself(tmp_path: Path, caplog):
    folder = tmp_path / "in"
    write_tif(folder / "good.tif", red_squares())
    (folder / "._good.tif").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64)
    (folder / ".hidden.tif").write_bytes(b"junk")
    os.symlink("loop.tif", folder / "loop.tif")  # a symlink loop
    os.symlink(tmp_path / "nowhere.tif", folder / "gone.tif")  # a dangling symlink
    os.mkfifo(folder / "pipe.tif")  # opening a named pipe would wait forever
    (folder / "dir.tif").mkdir()
    outside = write_tif(tmp_path / "elsewhere" / "ext.tif", red_squares())
    os.symlink(outside, folder / "link.tif")  # followed: the user can read it, and it is imagery
    with caplog.at_level(logging.DEBUG):
        out = predict(tmp_path, [folder])
    assert out["scenes"] == 2 and out["failed"] == 3  # the loop is said (and left out) at discovery
    assert "symlink loop" in one_line_naming(caplog, "loop.tif")
    assert "broken symlink" in one_line_naming(caplog, "gone.tif")
    assert "named pipe" in one_line_naming(caplog, "pipe.tif")
    assert "folder" in one_line_naming(caplog, "dir.tif")
    assert not [m for m in errors(caplog) if "._good" in m or ".hidden" in m]
    assert sorted(p.stem for p in (tmp_path / "fp_scenes").glob("*.gpkg")) == ["good", "link"]


def test_5_discovery_under_data_root_reports_loops_and_leaves_out_hidden_files(tmp_path: Path, caplog):
    images = tmp_path / "data" / "images"
    write_tif(images / "a.tif", red_squares())
    write_tif(images / "b.tiff", red_squares())
    (images / "._a.tif").write_bytes(b"\x00\x05\x16\x07")
    (images / "._b.tiff").write_bytes(b"\x00\x05\x16\x07")
    os.symlink("loop.tif", images / "loop.tif")
    os.mkfifo(images / "pipe.tif")
    with caplog.at_level(logging.WARNING):
        found = discover_scenes(DataConfig(root=str(tmp_path / "data"), format="geotiff", label_format="vector"))
    assert sorted(s.image.name for s in found) == ["a.tif", "b.tiff", "pipe.tif"]
    assert "loop.tif: image is a symlink loop (skipped)" in one_line_naming(caplog, "loop.tif")
    with pytest.raises(InputError, match="pipe.tif: image is a named pipe, not a regular file"):
        open_scene([s for s in found if s.image.name == "pipe.tif"][0], GEOTIFF)


def test_5_file_names_that_are_not_utf8_are_read_and_named(tmp_path: Path, caplog):
    folder = tmp_path / "in"
    write_tif(folder / "good.tif", red_squares())
    bfolder = os.fsencode(folder)
    write_tif(tmp_path / "tmp.tif", red_squares(96, ((50, 50, 20),)))
    os.rename(os.fsencode(tmp_path / "tmp.tif"), bfolder + b"/caf\xe9.tif")  # Latin-1, not UTF-8
    with open(bfolder + b"/bad\xff.tif", "wb") as f:
        f.write(b"II*\x00 not really a tiff")
    (folder / "new\nline.tif").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with caplog.at_level(logging.WARNING):
        out = predict(tmp_path, [folder])
    assert out["scenes"] == 2 and out["failed"] == 2
    assert sorted(p.name for p in (tmp_path / "fp_scenes").glob("*.gpkg")) == ["caf%E9.gpkg", "good.gpkg"]
    merged = pyogrio.read_dataframe(tmp_path / "fp.geojson")
    assert sorted(set(merged["scene"])) == ["caf%E9", "good"]
    one_line_naming(caplog, "bad\\xff.tif")
    one_line_naming(caplog, "new\\nline.tif")


def test_5_a_scene_and_shapefile_labels_named_in_latin1_are_read_with_their_sidecars(tmp_path: Path):
    folder = os.fsencode(tmp_path)
    write_tif(tmp_path / "img.tif", red_squares(64))
    os.rename(folder + b"/img.tif", folder + b"/r\xe9gion.tif")
    gpd.GeoDataFrame(geometry=[shapely.box(500005, 6649985, 500010, 6649990)], crs="EPSG:32633").to_file(
        tmp_path / "lab.shp")
    for suffix in (b".shp", b".shx", b".dbf", b".prj", b".cpg"):
        if os.path.exists(folder + b"/lab" + suffix):
            os.rename(folder + b"/lab" + suffix, folder + b"/r\xe9gion" + suffix)
    image = Path(os.fsdecode(folder + b"/r\xe9gion.tif"))
    label = Path(os.fsdecode(folder + b"/r\xe9gion.shp"))  # its CRS is in the .prj beside it
    with open_scene(SceneSource(image, label, label_kind="vector"), GEOTIFF) as reader:
        assert reader.scene_id == "r%E9gion"
        assert (reader.truth_mask(Window(0, 0, 64, 64)) == 1).sum() == 100


# ------------------------------------------------------------------------ 6. more odd data


def test_6_a_zero_byte_image_is_one_line(tmp_path: Path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.tif: empty scene: the file has 0 bytes"):
        open_scene(SceneSource(empty), GEOTIFF)


def test_6_a_one_pixel_image_is_predicted(tmp_path: Path):
    write_tif(tmp_path / "in" / "dot.tif", np.full((3, 1, 1), 230, np.uint8))
    out = predict(tmp_path, [tmp_path / "in"])
    assert out["scenes"] == 1 and out["polygons"] == 1


def test_6_two_hundred_bands_read_the_first_three_and_two_bands_are_refused(tmp_path: Path):
    many = np.zeros((200, 8, 8), np.uint8)
    many[:3] = 77
    with open_scene(SceneSource(write_tif(tmp_path / "many.tif", many)), GEOTIFF) as reader:
        assert (reader.read(Window(0, 0, 8, 8))[0] == 77).all()
    with pytest.raises(InputError, match="two.tif: has 2 bands; data.bands asks for band\\(s\\) \\[3\\]"):
        open_scene(SceneSource(write_tif(tmp_path / "two.tif", np.ones((2, 8, 8), np.uint8))), GEOTIFF)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_6_infinite_pixels_of_float_imagery_are_nodata_and_the_rest_is_kept(tmp_path: Path, bad: float):
    data = np.random.default_rng(0).uniform(100, 1100, (3, 32, 32)).astype("float32")
    data[:, :8] = bad  # a quarter of the scene
    with open_scene(SceneSource(write_tif(tmp_path / "f.tif", data)), GEOTIFF) as reader:
        rgb, valid = reader.read(Window(0, 0, 32, 32))
    assert not valid[:8].any() and valid[8:].all()
    assert rgb[:, 8:].std() > 40 and rgb[:, 8:].min() < 30 and rgb[:, 8:].max() > 225  # stretched, not blank


def test_6_a_huge_declared_size_in_a_tiny_file_is_refused_before_reading(tmp_path: Path):
    bomb = tmp_path / "bomb.tif"
    with rasterio.open(bomb, "w", driver="GTiff", width=200_000, height=200_000, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=UTM, tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate", SPARSE_OK=True):
        pass  # no block written: 120 GB declared in about a megabyte
    with pytest.raises(InputError, match=r"bomb.tif: declares 200000x200000 px .* decompression bomb"):
        open_scene(SceneSource(bomb), GEOTIFF)


def test_6_a_png_larger_than_pils_own_limit_is_read(tmp_path: Path, monkeypatch):
    from PIL import Image

    png = tmp_path / "big.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for a 15,000 px PNG and PIL's 179 Mpx
    with open_scene(SceneSource(png), DataConfig()) as reader:
        assert reader.width == 64 and reader.read(Window(0, 0, 64, 64))[1].all()


def _label(path: Path, geometries: list) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": g} for g in geometries]}))
    return path


def _lonlat_square(x: float, y: float, s: float) -> dict:
    tr = Transformer.from_crs(32633, 4326, always_xy=True)
    return {"type": "Polygon", "coordinates": [[list(tr.transform(*p)) for p in
                                               ((x, y), (x + s, y), (x + s, y - s), (x, y - s), (x, y))]]}


def test_6_label_features_with_nan_or_unplaceable_coordinates_are_named(tmp_path: Path):
    image = write_tif(tmp_path / "s.tif", red_squares(64))
    good = _lonlat_square(500005, 6649995, 5)
    nan = {"type": "Polygon", "coordinates": [[[float("nan"), 60.0], [15.0, 60.0], [15.0, 60.1], [float("nan"), 60.0]]]}
    label = _label(tmp_path / "nan.geojson", [good, nan])
    with pytest.raises(InputError, match="nan.geojson: feature 1: unreadable geometry"):
        open_scene(SceneSource(image, label, label_kind="vector"), GEOTIFF)
    far = {"type": "Polygon", "coordinates": [[[500.0, 200.0], [501.0, 200.0], [501.0, 201.0], [500.0, 200.0]]]}
    label = _label(tmp_path / "far.geojson", [good, far])
    with pytest.raises(InputError, match="far.geojson: feature 1 has coordinates outside the area"):
        open_scene(SceneSource(image, label, label_kind="vector"), GEOTIFF)


def test_6_points_empty_and_self_intersecting_label_geometries(tmp_path: Path):
    image = write_tif(tmp_path / "s.tif", red_squares(64))
    points = _label(tmp_path / "pts.geojson", [{"type": "Point", "coordinates": [15.0, 60.0]}])
    with pytest.raises(InputError, match="pts.geojson: feature 0 is a Point, not a polygon"):
        open_scene(SceneSource(image, points, label_kind="vector"), GEOTIFF)
    good = _lonlat_square(500005, 6649995, 5)
    tr = Transformer.from_crs(32633, 4326, always_xy=True)
    bowtie = {"type": "Polygon", "coordinates": [[list(tr.transform(*p)) for p in (
        (500005, 6649990), (500015, 6649980), (500015, 6649990), (500005, 6649980), (500005, 6649990))]]}
    mixed = _label(tmp_path / "mixed.geojson", [good, None, {"type": "Polygon", "coordinates": []}, bowtie])
    with open_scene(SceneSource(image, mixed, label_kind="vector"), GEOTIFF) as reader:
        mask = reader.truth_mask(Window(0, 0, 64, 64))
    assert (mask == 1).sum() == pytest.approx(100 + 200, abs=20)  # the square, and both halves of the bow-tie


def test_6_labels_in_a_crs_that_misses_the_scene_are_refused(tmp_path: Path):
    image = write_tif(tmp_path / "s.tif", red_squares(64))
    label = _label(tmp_path / "far.geojson", [_lonlat_square(300000, 6000000, 5)])
    with pytest.raises(InputError, match="far.geojson: all 1 label polygons lie entirely outside the image s.tif"):
        open_scene(SceneSource(image, label, label_kind="vector"), GEOTIFF)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="PNG", width=16, height=16, count=3, dtype="uint8") as ds:
        ds.write(np.full((3, 16, 16), 100, np.uint8))
    for extra in path.parent.glob(path.name + ".aux.xml"):
        extra.unlink()
    return path


def test_6_a_png_with_a_world_file_and_crs_is_placed_on_the_map(tmp_path: Path, caplog):
    png = _png(tmp_path / "w" / "w.png")
    (png.parent / "w.pgw").write_text("0.5\n0\n0\n-0.5\n500000.25\n6650000.25\n")
    (png.parent / "w.png.aux.xml").write_text("<PAMDataset><SRS>EPSG:32633</SRS></PAMDataset>")
    with open_scene(SceneSource(png), DataConfig()) as reader:
        assert reader.crs.to_epsg() == 32633 and reader.transform.c == 500000.0 and reader.gsd_m == 0.5
    # a .tfw beside a PNG is not read by GDAL: the warning says so instead of 'no georeference'
    png = _png(tmp_path / "t" / "t.png")
    (png.parent / "t.tfw").write_text("0.5\n0\n0\n-0.5\n500000.25\n6650000.25\n")
    with caplog.at_level(logging.WARNING), open_scene(SceneSource(png), DataConfig()) as reader:
        assert reader.crs is None
    assert any("t.tfw is not a world file GDAL reads for a PNG" in r.getMessage() for r in caplog.records)


def test_6_xview2_labels_with_malformed_wkt_missing_features_or_nan(tmp_path: Path):
    png = _png(tmp_path / "images" / "x.png")
    label = tmp_path / "labels" / "x.json"
    label.parent.mkdir()
    cases = {
        "invalid WKT in features.xy\\[0\\]": {"features": {"xy": [{"wkt": "POLYGON ((0 0, 1"}], "lng_lat": []}},
        "no 'features' object": {"metadata": {}},
        "invalid WKT in features.lng_lat\\[0\\]": {"features": {
            "xy": [{"wkt": "POLYGON ((0 0, 8 0, 8 8, 0 0))", "properties": {"uid": "a"}}],
            "lng_lat": [{"wkt": "POLYGON ((nan 60, 15 60, 15 60.1, nan 60))", "properties": {"uid": "a"}}]}},
        "cannot georeference: non-finite": {"features": {
            "xy": [{"wkt": "POLYGON ((0 0, 8 0, 8 8, 0 8, 0 0))", "properties": {"uid": "a"}}],
            "lng_lat": [{"wkt": "POLYGON ((15 60, nan 60, 15.1 60.1, 15 60.1, 15 60))",
                         "properties": {"uid": "a"}}]}},
    }
    for reason, content in cases.items():
        label.write_text(json.dumps(content))
        with pytest.raises(InputError, match=f"x.json: .*{reason}"):
            open_scene(SceneSource(png, label, label_kind="xview2"), DataConfig())


def test_6_a_geotiff_placed_beyond_the_poles_is_one_line(tmp_path: Path):
    path = write_tif(tmp_path / "pole.tif", red_squares(16), transform=Affine(1e-5, 0, 15.0, 0, -1e-5, 200.0),
                     crs="EPSG:4326")
    with pytest.raises(InputError, match="pole.tif: its georeference gives a pixel size of nan m"):
        open_scene(SceneSource(path), GEOTIFF, TileConfig(target_gsd=0.5))
