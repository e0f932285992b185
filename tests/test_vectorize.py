"""Vectorisation: RFC 7946 GeoJSON, GeoPackage, hole filling, areas in metres, block merging, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Geod

from footprints.benchmarks.vectorize import bench_vectorize, blobs_for
from footprints.config import Config
from footprints.contracts.footprint_files import write_geojson, write_gpkg
from footprints.polygons.vectorize import polygons_from_probability
from footprints.scenes.geo import metric_crs_for, utm_crs_for

# 0.5 m pixels in UTM 23S, top-left corner in Rio de Janeiro (about 43.2 W, 22.9 S)
RIO = Affine(0.5, 0, 684000.0, 0, -0.5, 7466000.0)
RIO_CRS = "EPSG:32723"


def _blob_scene() -> np.ndarray:
    prob = np.zeros((80, 80), np.uint8)
    prob[10:50, 10:60] = 230  # a building with a courtyard (10 x 10 px = 25 m2, kept)
    prob[20:30, 20:30] = 0
    prob[60:70, 60:75] = 200  # a second building
    return prob


def test_utm_zone_for_known_places():
    assert utm_crs_for(-43.2, -22.9) == CRS.from_epsg(32723)  # Rio de Janeiro
    assert utm_crs_for(2.35, 48.85) == CRS.from_epsg(32631)  # Paris
    assert utm_crs_for(179.9, 10.0) == CRS.from_epsg(32660)


def test_geojson_is_rfc7946(tmp_path: Path):
    gdf = polygons_from_probability(_blob_scene(), RIO, RIO_CRS, threshold=0.5, hole_area_m2=4.0,
                                    simplify_px=1.0, scene="rio")
    assert len(gdf) == 2 and gdf.crs == CRS.from_epsg(32723)
    path = write_geojson(gdf, tmp_path / "out.geojson")
    raw = json.loads(path.read_text())
    assert raw["type"] == "FeatureCollection"
    assert "crs" not in raw  # the legacy member is gone in RFC 7946
    n_holes = 0
    for feat in raw["features"]:
        assert feat["geometry"]["type"] == "Polygon"
        assert set(feat["properties"]) >= {"scene", "area_m2", "mean_prob", "max_prob"}
        rings = feat["geometry"]["coordinates"]
        for lon, lat in rings[0]:
            # lon/lat order, at the known place (Rio: lon ~ -43.2, lat ~ -22.9)
            assert -43.3 < lon < -43.1 and -23.0 < lat < -22.8
            assert len(str(lon).split(".")[1]) <= 7  # coordinate precision ~1 cm
        assert shapely.LinearRing(rings[0]).is_ccw  # exterior counter-clockwise
        for hole in rings[1:]:
            assert not shapely.LinearRing(hole).is_ccw  # holes clockwise
            n_holes += 1
    assert n_holes == 1

    info = pyogrio.read_info(path)
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(4326)
    back = pyogrio.read_dataframe(path)
    assert back.geometry.is_valid.all()
    # the same footprints, to within a centimetre, after the round trip through lon/lat
    ours = gdf.sort_values("area_m2").geometry.values
    theirs = back.to_crs(RIO_CRS).sort_values("area_m2").geometry.values
    for a, b in zip(ours, theirs, strict=True):
        assert a.symmetric_difference(b).area < 0.02 * a.area
    assert sorted(back["area_m2"]) == pytest.approx(sorted(gdf["area_m2"]))


def test_empty_layers_are_valid(tmp_path: Path):
    gdf = polygons_from_probability(np.zeros((50, 50), np.uint8), RIO, RIO_CRS, threshold=0.5, scene="x")
    assert len(gdf) == 0 and list(gdf.columns) == ["scene", "area_m2", "mean_prob", "max_prob", "geometry"]
    gj = write_geojson(gdf, tmp_path / "empty.geojson")
    raw = json.loads(gj.read_text())
    assert raw["type"] == "FeatureCollection" and raw["features"] == [] and "crs" not in raw
    assert pyogrio.read_info(gj)["features"] == 0
    gp = write_gpkg(gdf, tmp_path / "empty.gpkg")
    info = pyogrio.read_info(gp, layer="footprints")
    assert info["features"] == 0 and info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == ["scene", "area_m2", "mean_prob", "max_prob"]
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32723)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.geojson", "empty.gpkg"]  # no temp files


def test_gpkg_of_lonlat_scene_is_utm(tmp_path: Path):
    tf = Affine(4.5e-6, 0, -43.2, 0, -4.5e-6, -22.9)
    prob = np.zeros((40, 40), np.uint8)
    prob[5:25, 5:30] = 255
    gdf = polygons_from_probability(prob, tf, "EPSG:4326", threshold=0.5, scene="ll")
    assert gdf.crs == CRS.from_epsg(4326)
    target = metric_crs_for(tf, "EPSG:4326", 40, 40)
    assert target == CRS.from_epsg(32723)
    info = pyogrio.read_info(write_gpkg(gdf, tmp_path / "a.gpkg", crs=target), layer="footprints")
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32723) and info["features"] == 1
    empty = polygons_from_probability(np.zeros((40, 40), np.uint8), tf, "EPSG:4326")
    info = pyogrio.read_info(write_gpkg(empty, tmp_path / "e.gpkg", crs=target), layer="footprints")
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32723) and info["features"] == 0


def test_holes_below_area_are_filled():
    prob = np.zeros((60, 60), np.uint8)
    prob[5:55, 5:55] = 255
    prob[10:12, 10:12] = 0  # 4 px = 1 m2: filled
    prob[30:40, 30:40] = 0  # 100 px = 25 m2: kept
    gdf = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.5, hole_area_m2=4.0, simplify_px=0)
    assert len(gdf) == 1
    poly = gdf.geometry.iloc[0]
    assert len(poly.interiors) == 1
    assert shapely.Polygon(poly.interiors[0]).area == pytest.approx(25.0)
    assert gdf["area_m2"].iloc[0] == pytest.approx((2500 - 100) * 0.25)
    # with no hole filling both holes stay
    keep = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.5, hole_area_m2=0, simplify_px=0)
    assert len(keep.geometry.iloc[0].interiors) == 2


def test_min_area_in_square_metres_on_a_lonlat_raster():
    # at 60 N a degree of longitude is half a degree of latitude: a filter in degrees or pixels would differ
    res = 1e-5
    tf = Affine(res, 0, 10.0, 0, -res, 60.0)
    prob = np.zeros((60, 60), np.uint8)
    prob[5:25, 5:25] = 255  # 400 px
    prob[40:48, 40:48] = 255  # 64 px
    gdf = polygons_from_probability(prob, tf, "EPSG:4326", threshold=0.5, min_area_m2=100.0, simplify_px=0)
    geod = Geod(ellps="WGS84")
    big = shapely.box(10.0 + 5 * res, 60.0 - 25 * res, 10.0 + 25 * res, 60.0 - 5 * res)
    small = shapely.box(10.0 + 40 * res, 60.0 - 48 * res, 10.0 + 48 * res, 60.0 - 40 * res)
    big_m2 = abs(geod.geometry_area_perimeter(big)[0])
    small_m2 = abs(geod.geometry_area_perimeter(small)[0])
    assert small_m2 < 100.0 < big_m2  # ~35 m2 and ~550 m2
    assert len(gdf) == 1
    assert gdf["area_m2"].iloc[0] == pytest.approx(big_m2, rel=0.005)  # UTM area vs geodesic area
    assert gdf.geometry.iloc[0].hausdorff_distance(big) < 1e-9  # back in lon/lat after cleaning in UTM
    # a lower limit keeps both
    both = polygons_from_probability(prob, tf, "EPSG:4326", threshold=0.5, min_area_m2=30.0, simplify_px=0)
    assert len(both) == 2


def _u_shape() -> np.ndarray:
    """A U-shaped building with a courtyard, crossing several block borders, and corner-touching blobs."""
    prob = np.zeros((64, 64), np.uint8)
    prob[3:45, 3:13] = 200
    prob[35:45, 3:60] = 220
    prob[3:45, 50:60] = 240
    prob[20:30, 25:40] = 210  # separate block, crossing the border at 32
    prob[22:25, 28:36] = 0  # courtyard (hole) crossing the block border too
    prob[31, 31] = 250  # four pixels meeting only at the corner (32, 32): four separate polygons
    prob[32, 32] = 250
    prob[31, 32] = 0
    return prob


def test_block_borders_merge_like_unblocked():
    prob = _u_shape()
    args = dict(threshold=0.5, min_area_m2=0.0, hole_area_m2=0.0, simplify_px=0.0)
    whole = polygons_from_probability(prob, RIO, RIO_CRS, block_size=4096, **args)
    blocked = polygons_from_probability(prob, RIO, RIO_CRS, block_size=16, **args)
    assert len(whole) == len(blocked) == 4  # U, block with hole, two diagonal pixels
    whole = whole.sort_values(["area_m2", "max_prob"]).reset_index(drop=True)
    blocked = blocked.sort_values(["area_m2", "max_prob"]).reset_index(drop=True)
    for a, b in zip(whole.geometry, blocked.geometry, strict=True):
        assert a.equals(b)
    for col in ("area_m2", "mean_prob", "max_prob"):
        assert blocked[col].to_numpy() == pytest.approx(whole[col].to_numpy())
    u = blocked.iloc[-1]
    assert u["area_m2"] == pytest.approx((42 * 10 * 2 + 10 * 37) * 0.25)
    assert u["max_prob"] == pytest.approx(240 / 255)
    # 320 px of the left bar at 200, 470 px of the bottom at 220, 420 px of the right bar at 240
    assert u["mean_prob"] == pytest.approx((320 * 200 + 470 * 220 + 420 * 240) / 1210 / 255)
    hole_block = blocked.iloc[-2]
    assert len(hole_block.geometry.interiors) == 1  # the courtyard, assembled from two blocks


@pytest.mark.parametrize("crs,tf", [
    (RIO_CRS, RIO),
    # lon/lat with a pixel size and origin that are not exact in binary: no slivers between blocks
    ("EPSG:4326", Affine(2.7e-6, 0, -43.123456789, 0, -2.7e-6, -22.987654321)),
])
@pytest.mark.parametrize("block", [16, 7])
def test_block_merge_with_all_cleaning(crs: str, tf: Affine, block: int):
    prob = _u_shape()
    args = dict(threshold=0.5, min_area_m2=0.3, hole_area_m2=1.0, simplify_px=1.0)
    whole = polygons_from_probability(prob, tf, crs, block_size=4096, **args)
    blocked = polygons_from_probability(prob, tf, crs, block_size=block, **args)
    assert len(whole) == len(blocked) == 2  # the two single pixels fall under 0.3 m2
    whole = whole.sort_values("area_m2").reset_index(drop=True)
    blocked = blocked.sort_values("area_m2").reset_index(drop=True)
    for a, b in zip(whole.geometry, blocked.geometry, strict=True):
        assert a.equals(b)  # cleaning runs after the merge, so even the simplified outlines agree
    assert blocked["area_m2"].to_numpy() == pytest.approx(whole["area_m2"].to_numpy())
    assert blocked["mean_prob"].to_numpy() == pytest.approx(whole["mean_prob"].to_numpy())


def test_statistics_threshold_and_nodata(tmp_path: Path):
    prob = np.zeros((40, 40), np.float32)
    prob[5:15, 5:15] = 0.6
    prob[5:15, 10:15] = 0.9
    prob[25:35, 25:35] = 0.45  # below threshold
    gdf = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.5, simplify_px=0)
    assert len(gdf) == 1
    assert gdf["mean_prob"].iloc[0] == pytest.approx(0.75)
    assert gdf["max_prob"].iloc[0] == pytest.approx(0.9)
    assert gdf["area_m2"].iloc[0] == pytest.approx(25.0)
    lower = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.45, simplify_px=0)
    assert len(lower) == 2  # p >= threshold counts

    # the same scene as a uint8 GeoTIFF with nodata: read window by window, nodata never a building
    u8 = np.round(prob * 255).astype(np.uint8)
    u8[0:40, 0:8] = 255  # nodata strip cuts the first building
    path = tmp_path / "p.tif"
    with rasterio.open(path, "w", driver="GTiff", width=40, height=40, count=1, dtype="uint8", crs=RIO_CRS,
                       transform=RIO, nodata=255) as dst:
        dst.write(u8, 1)
    from_file = polygons_from_probability(path, threshold=0.5, simplify_px=0, block_size=16, scene="f")
    assert from_file.crs == CRS.from_epsg(32723) and list(from_file["scene"]) == ["f"]
    assert from_file["area_m2"].iloc[0] == pytest.approx(10 * 7 * 0.25)
    assert from_file["max_prob"].iloc[0] == pytest.approx(round(0.9 * 255) / 255)
    # an explicit valid mask does the same on an array
    valid = np.ones((40, 40), bool)
    valid[:, :8] = False
    masked = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.5, simplify_px=0, valid_mask=valid)
    assert masked.geometry.iloc[0].equals(from_file.geometry.iloc[0])


def test_simplify_about_one_pixel_and_valid():
    yy, xx = np.mgrid[0:100, 0:100]
    prob = ((xx > yy) & (xx < 90) & (yy > 10)).astype(np.uint8) * 255  # a staircase diagonal
    raw = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.5, simplify_px=0)
    simp = polygons_from_probability(prob, RIO, RIO_CRS, threshold=0.5, simplify_px=1.0)
    assert len(raw) == len(simp) == 1
    n_raw = shapely.get_num_coordinates(raw.geometry.iloc[0])
    n_simp = shapely.get_num_coordinates(simp.geometry.iloc[0])
    assert n_raw > 100 and n_simp <= 6
    # within about a pixel of the original outline (0.5 m pixels)
    assert raw.geometry.iloc[0].hausdorff_distance(simp.geometry.iloc[0]) <= 0.5 * 1.01
    assert simp.geometry.is_valid.all()


def test_pixel_space_without_crs():
    prob = np.zeros((20, 20), np.uint8)
    prob[2:8, 2:12] = 255
    gdf = polygons_from_probability(prob, None, None, threshold=0.5, simplify_px=0, pixel_size_m=0.5)
    assert gdf.crs is None and gdf.geometry.iloc[0].equals(shapely.box(2, 2, 12, 8))
    assert gdf["area_m2"].iloc[0] == pytest.approx(60 * 0.25)


def test_bench_vectorize_runs():
    cfg = Config()
    cfg.predict.block_size = 1024  # a quarter of the 2048 px raster: blocks are merged as on a full-size run
    out = bench_vectorize(cfg, repeats=1, size=2048)
    assert out["pixels"] == 2048 * 2048 and out["block_size"] == 1024
    # all cleaning drops only blobs under the 5 m2 area limit: the polygon counts are close
    assert 0.9 * out["bare_polygons"] <= out["polygons"] <= out["bare_polygons"]
    # the touching pairs (30% of the blobs) are split by the watershed
    assert out["watershed_polygons"] >= out["polygons"] + 0.2 * blobs_for(2048) * 0.3
    # regularising keeps each building's outline: its median IoU with the raw outline is high
    assert out["regularized_median_iou"] >= 0.8
    assert out["regularized_kept_raw"] < 0.05 * out["watershed_polygons"]
