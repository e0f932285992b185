"""Building instances (seeded watershed, seamless across blocks) and regularised outlines."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import CRS
from scipy import ndimage
from skimage.draw import polygon as draw_polygon

from footprints.polygons.regularize import regularize_footprints
from footprints.polygons.vectorize import polygons_from_probability

# 0.5 m pixels in UTM 23S (Rio de Janeiro)
RIO = Affine(0.5, 0, 684000.0, 0, -0.5, 7466000.0)
RIO_CRS = "EPSG:32723"
LONLAT = Affine(2.7e-6, 0, -43.123456789, 0, -2.7e-6, -22.987654321)


def _box(r0: int, r1: int, c0: int, c1: int, tf: Affine = RIO) -> shapely.Polygon:
    """The pixels [r0:r1, c0:c1] as a polygon in the raster CRS."""
    x0, y0 = tf * (c0, r0)
    x1, y1 = tf * (c1, r1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return a.intersection(b).area / a.union(b).area


def _pair() -> tuple[np.ndarray, np.ndarray]:
    """Two buildings wall to wall, one blob of probability: [10:40, 10:35] and [10:40, 35:60]."""
    prob = np.zeros((60, 80), np.uint8)
    prob[10:40, 10:60] = 200
    seed = np.zeros_like(prob)
    seed[15:35, 14:31] = 250
    seed[15:35, 39:56] = 250
    return prob, seed


def _run(prob, **kw):
    args = dict(threshold=0.5, min_area_m2=0.0, hole_area_m2=0.0, simplify_px=1.0)
    return polygons_from_probability(prob, RIO, RIO_CRS, **{**args, **kw})


def test_touching_buildings_with_seed_cores_are_two_polygons_sharing_their_wall():
    prob, seed = _pair()
    gdf = _run(prob, seed_threshold=0.5, seed=seed)
    assert len(gdf) == 2
    gdf = gdf.sort_values("area_m2").reset_index(drop=True)
    left = gdf.geometry[gdf.geometry.centroid.x.argmin()]
    right = gdf.geometry[gdf.geometry.centroid.x.argmax()]
    assert _iou(left, _box(10, 40, 10, 35)) > 0.9 and _iou(right, _box(10, 40, 35, 60)) > 0.9
    assert left.intersection(right).area == pytest.approx(0.0, abs=1e-9)  # no overlap
    wall = left.boundary.intersection(right.boundary)
    assert wall.length == pytest.approx(15.0)  # the whole 30-px wall, shared
    assert shapely.union_all([left, right]).area == pytest.approx(_box(10, 40, 10, 60).area)  # no gap
    assert gdf["mean_prob"].to_numpy() == pytest.approx([200 / 255] * 2)


def test_a_jagged_shared_wall_stays_shared_after_simplification():
    # seeds in opposite corners: the watershed wall is a diagonal staircase, which per-polygon
    # simplification would cut differently on each side (gaps and overlaps)
    prob = np.zeros((70, 90), np.uint8)
    prob[10:60, 10:80] = 200
    seed = np.zeros_like(prob)
    seed[12:20, 12:30] = 255
    seed[50:58, 60:78] = 255
    gdf = _run(prob, seed_threshold=0.5, seed=seed, simplify_px=1.0)
    assert len(gdf) == 2
    a, b = gdf.geometry
    assert a.intersection(b).area == pytest.approx(0.0, abs=1e-9)
    assert shapely.union_all([a, b]).area == pytest.approx(_box(10, 60, 10, 80).area)
    assert a.area + b.area == pytest.approx(_box(10, 60, 10, 80).area)
    assert max(shapely.get_num_coordinates(gdf.geometry.values)) < 30  # simplified all the same


def test_without_seeds_touching_buildings_merge_and_match_components():
    prob, seed = _pair()
    components = _run(prob)
    assert len(components) == 1
    # seed score = the probability itself: one uniform core, one building
    assert len(_run(prob, seed_threshold=0.5)) == 1
    # a seed threshold above every seed: no marker, the component is kept whole
    kept = _run(prob, seed_threshold=0.99, seed=seed)
    assert len(kept) == 1 and kept.geometry[0].equals(components.geometry[0])


def test_a_component_without_seed_is_kept_beside_split_ones():
    prob, seed = _pair()
    prob[45:55, 20:40] = 180  # a third building, no seed core
    gdf = _run(prob, seed_threshold=0.5, seed=seed, hole_area_m2=1.0)
    assert len(gdf) == 3
    lone = gdf.geometry[gdf.geometry.centroid.y.argmin()]
    assert lone.equals(_box(45, 55, 20, 40))
    assert gdf.loc[gdf.geometry.centroid.y.argmin(), "max_prob"] == pytest.approx(180 / 255)


def _scene(rng: np.random.Generator, size: int = 128, float_: bool = False):
    """Buildings in touching rows of 1-3, a lower-probability contact line at each shared wall, seed cores
    with noise, nodata holes."""
    prob = np.zeros((size, size), np.float32)
    seed = np.zeros_like(prob)
    for _ in range(14):
        h, w = rng.integers(5, 18, 2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - 3 * w)
        for k in range(int(rng.integers(1, 4))):
            cc = c + k * w
            prob[r:r + h, cc:cc + w] = rng.uniform(0.87, 1.0)
            if k:
                prob[r:r + h, cc] = 0.6  # the contact zone: still building, not a seed
            seed[r + 2:r + h - 2, cc + 2:cc + w - 2] = rng.uniform(0.5, 1.0)
    prob = np.where(prob > 0, np.clip(prob + rng.normal(0, 0.03, prob.shape), 0.5, 1), 0).astype(np.float32)
    seed = np.clip(seed + rng.uniform(0, 0.15, seed.shape).astype(np.float32) * (prob > 0), 0, 1)
    valid = rng.random((size, size)) > 0.01
    valid[40:44, 30:60] = False  # a nodata strip across buildings
    if float_:
        return prob, seed, valid
    return np.rint(prob * 255).astype(np.uint8), np.rint(seed * 255).astype(np.uint8), valid


def _sorted(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    c = gdf.geometry.representative_point()
    return gdf.assign(_x=c.x.round(6), _y=c.y.round(6)).sort_values(["_x", "_y"]).reset_index(drop=True)


def _assert_same(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> None:
    a, b = _sorted(a), _sorted(b)
    assert len(a) == len(b)
    for x, y in zip(a.geometry, b.geometry, strict=True):
        assert x.equals_exact(y, 0.0)  # bit for bit: simplification saw the same outlines
    for col in ("area_m2", "mean_prob", "max_prob"):
        assert b[col].to_numpy() == pytest.approx(a[col].to_numpy())


@pytest.mark.parametrize("float_", [False, True], ids=["uint8", "float"])
@pytest.mark.parametrize("with_seed", [True, False], ids=["seed-band", "no-seed-band"])
def test_blocked_watershed_equals_the_whole_scene(float_: bool, with_seed: bool):
    rng = np.random.default_rng(7 + 2 * float_ + with_seed)
    prob, seed, valid = _scene(rng, float_=float_)
    kw = dict(threshold=0.5, min_area_m2=0.5, hole_area_m2=1.0, simplify_px=1.0, valid_mask=valid,
              seed_threshold=0.6 if with_seed else 0.85, seed=seed if with_seed else None)
    whole = polygons_from_probability(prob, RIO, RIO_CRS, block_size=4096, **kw)
    components = polygons_from_probability(prob, RIO, RIO_CRS, block_size=4096,
                                           **{**kw, "seed_threshold": None})
    assert len(whole) >= len(components) + 4  # the watershed did split touching buildings
    # split buildings across block borders: polygons of the 16-px run whose pixels span a border
    px = whole.geometry.apply(lambda g: ~RIO * (g.bounds[0], g.bounds[3]) + ~RIO * (g.bounds[2], g.bounds[1]))
    assert any(int(c0) // 16 != int(np.ceil(c1) - 1) // 16 for c0, _, c1, _ in px)
    for block, halo in ((16, 256), (16, 3), (23, 0), (7, 2)):
        blocked = polygons_from_probability(prob, RIO, RIO_CRS, block_size=block, halo_px=halo, **kw)
        _assert_same(whole, blocked)


def test_blocked_watershed_equals_whole_scene_in_lonlat():
    prob, seed, valid = _scene(np.random.default_rng(3))
    kw = dict(threshold=0.5, min_area_m2=0.5, hole_area_m2=1.0, simplify_px=1.0, valid_mask=valid,
              seed_threshold=0.6, seed=seed)
    whole = polygons_from_probability(prob, LONLAT, "EPSG:4326", block_size=4096, **kw)
    _assert_same(whole, polygons_from_probability(prob, LONLAT, "EPSG:4326", block_size=16, halo_px=4, **kw))


def test_a_building_larger_than_the_halo_across_blocks_is_still_right():
    prob = np.zeros((40, 120), np.uint8)
    prob[12:22, 5:110] = 220  # 105 px long across seven 16-px blocks, halo 2
    prob[22:30, 40:60] = 220  # and an annex below, its own building
    seed = np.zeros_like(prob)
    seed[14:20, 8:106] = 255
    seed[24:28, 44:56] = 255
    whole = _run(prob, seed_threshold=0.5, seed=seed, block_size=4096)
    blocked = _run(prob, seed_threshold=0.5, seed=seed, block_size=16, halo_px=2)
    _assert_same(whole, blocked)
    assert len(blocked) == 2
    long_one = blocked.geometry[blocked["area_m2"].argmax()]
    assert _iou(long_one, _box(12, 22, 5, 110)) > 0.95
    # one seed core: the building is the whole component, exactly as connected components give it
    one = np.where(prob > 0, 255, 0).astype(np.uint8)
    alone = _run(prob, seed_threshold=0.5, seed=one, block_size=16, halo_px=2)
    assert len(alone) == 1 and alone.geometry[0].equals(_run(prob).geometry[0])


def test_components_over_the_cap_are_not_split_but_stay_seamless(caplog: pytest.LogCaptureFixture):
    prob, seed = _pair()
    prob[45:50, 70:75] = 200  # a small building, under the cap
    seed[46:49, 71:74] = 255
    kw = dict(seed_threshold=0.5, seed=seed, max_component_px=600)
    with caplog.at_level(logging.WARNING):
        whole = _run(prob, block_size=4096, **kw)
    assert "not split" in caplog.text
    blocked = _run(prob, block_size=16, halo_px=2, **kw)
    _assert_same(whole, blocked)
    assert len(blocked) == 2  # the 1500-px pair is one polygon, as without seeds; the small one alone
    assert blocked.geometry[blocked["area_m2"].argmax()].equals(_run(prob).geometry[0])


def test_seed_band_of_a_two_band_raster(tmp_path: Path):
    prob, seed = _pair()
    prob[0:60, 0:5] = 0
    path = tmp_path / "p.tif"
    with rasterio.open(path, "w", driver="GTiff", width=80, height=60, count=2, dtype="uint8", crs=RIO_CRS,
                       transform=RIO, nodata=0) as dst:
        dst.write(prob, 1)
        dst.write(seed, 2)
    gdf = polygons_from_probability(path, threshold=0.5, simplify_px=1.0, block_size=16, seed_threshold=0.5,
                                    scene="f", halo_px=4)
    assert gdf.crs == CRS.from_epsg(32723) and len(gdf) == 2
    _assert_same(_run(prob, seed_threshold=0.5, seed=seed), gdf)
    # one band: the seed score is the probability itself (uniform here: one building)
    one = tmp_path / "one.tif"
    with rasterio.open(one, "w", driver="GTiff", width=80, height=60, count=1, dtype="uint8", crs=RIO_CRS,
                       transform=RIO, nodata=0) as dst:
        dst.write(prob, 1)
    assert len(polygons_from_probability(one, threshold=0.5, block_size=16, seed_threshold=0.5)) == 1


def test_a_block_reader_can_return_the_seed_score():
    prob, seed = _pair()

    def read(win):
        rows = slice(win.row_off, win.row_off + win.height)
        cols = slice(win.col_off, win.col_off + win.width)
        return prob[rows, cols], None, seed[rows, cols]

    gdf = polygons_from_probability(read, RIO, RIO_CRS, threshold=0.5, simplify_px=1.0, block_size=16,
                                    shape=prob.shape, seed_threshold=0.5)
    _assert_same(_run(prob, seed_threshold=0.5, seed=seed), gdf)


# ---------------------------------------------------------------------------------------------------
# regularisation


def _rotated_rectangles(n: int = 6, size: int = 240, noise: float = 0.08, seed: int = 0):
    """Blurred rotated rectangles with noise, as a segmentation gives them; their true corners."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.float32)
    truths = []
    for i in range(n):
        c = np.array([40 + 80 * (i % 3), 40 + 80 * (i // 3)], float)
        hw = rng.uniform(12, 28, 2)
        ang = rng.uniform(0.1, 1.4)
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * hw @ rot.T + c
        rr, cc = draw_polygon(corners[:, 1], corners[:, 0], mask.shape)
        mask[rr, cc] = 1
        truths.append(corners)
    prob = np.clip(ndimage.gaussian_filter(mask, 1.5) + rng.normal(0, noise, mask.shape), 0, 1)
    return np.rint(prob * 255).astype(np.uint8), truths


def _angles(poly: shapely.Polygon) -> np.ndarray:
    xy = np.asarray(poly.exterior.coords)[:-1]
    a, b = np.roll(xy, 1, axis=0) - xy, np.roll(xy, -1, axis=0) - xy
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_a_noisy_rectangle_comes_out_square_and_inside_its_outline():
    prob, _ = _rotated_rectangles()
    raw = _run(prob, min_area_m2=5.0, hole_area_m2=4.0, scene="s")
    raw["extra"] = np.arange(len(raw)) * 10
    assert len(raw) == 6 and (shapely.get_num_coordinates(raw.geometry.values) > 12).all()  # raw: jagged
    reg = regularize_footprints(raw, pixel_size_m=0.5)
    assert list(reg.columns) == list(raw.columns) + ["reg_iou"]  # every column kept, row order kept
    assert reg["extra"].tolist() == raw["extra"].tolist() and reg.crs == raw.crs
    assert reg.geometry.centroid.distance(raw.geometry.centroid).max() < 1.0
    n_vertices = shapely.get_num_coordinates(reg.geometry.values) - 1
    assert (n_vertices <= 5).sum() >= 5  # right-angled quadrilaterals, for all but at most one
    for poly in reg.geometry:
        if len(poly.exterior.coords) == 5:
            assert np.abs(_angles(poly) - 90).max() < 3.0
    assert (reg["reg_iou"] > 0.85).all()
    ious = [_iou(a, b) for a, b in zip(reg.geometry, raw.geometry, strict=True)]
    assert reg["reg_iou"].to_numpy() == pytest.approx(ious)
    assert reg["area_m2"].to_numpy() == pytest.approx(shapely.area(reg.geometry.values))
    # never leaves its building: within raw + max_outside_px (2 px = 1 m)
    limit = shapely.buffer(raw.geometry.values, 1.0 + 1e-6, join_style="mitre", mitre_limit=2.0)
    assert shapely.area(shapely.difference(reg.geometry.values, limit)).max() < 1e-6
    assert raw.geometry.is_valid.all() and reg.geometry.is_valid.all()
    assert "reg_iou" not in raw.columns  # the raw layer is left as it was


def test_the_outside_limit_is_enforced():
    prob, _ = _rotated_rectangles()
    raw = _run(prob, min_area_m2=5.0)
    tight = regularize_footprints(raw, pixel_size_m=0.5, max_outside_px=0.25)
    limit = shapely.buffer(raw.geometry.values, 0.125 + 1e-6, join_style="mitre", mitre_limit=2.0)
    assert shapely.area(shapely.difference(tight.geometry.values, limit)).max() < 1e-6
    loose = regularize_footprints(raw, pixel_size_m=0.5, max_outside_px=5.0)
    assert shapely.area(shapely.difference(loose.geometry.values, limit)).max() > 0.1  # it was clipped


def test_raw_outline_kept_when_the_iou_floor_fails():
    prob, _ = _rotated_rectangles()
    raw = _run(prob, min_area_m2=5.0)
    reg = regularize_footprints(raw, pixel_size_m=0.5, min_iou=0.999)
    assert reg.attrs["regularize"]["kept_raw"] == len(raw)
    assert all(a.equals_exact(b, 0.0) for a, b in zip(reg.geometry, raw.geometry, strict=True))
    assert (reg["reg_iou"] == 1.0).all()
    assert reg["area_m2"].to_numpy() == pytest.approx(raw["area_m2"].to_numpy())


def test_regularised_neighbours_do_not_overlap():
    prob = np.zeros((100, 140), np.float32)
    prob[20:70, 20:65] = 1
    prob[25:75, 65:110] = 1
    rng = np.random.default_rng(3)
    prob = np.clip(ndimage.gaussian_filter(prob, 1.2) + rng.normal(0, 0.05, prob.shape), 0, 1)
    seed = np.zeros_like(prob)
    seed[25:65, 25:60] = 1
    seed[30:70, 70:105] = 1
    raw = _run(prob, seed_threshold=0.5, seed=seed, min_area_m2=5.0)
    assert len(raw) == 2
    reg = regularize_footprints(raw, pixel_size_m=0.5)
    a, b = reg.geometry
    raw_a, raw_b = raw.geometry
    assert a.intersection(b).area < 1e-6
    # neither enters the other's building, even within the band it may leave its own outline by
    assert a.intersection(raw_b).area < 1e-6 and b.intersection(raw_a).area < 1e-6
    assert (reg["reg_iou"] > 0.85).all()


def test_regularise_a_lonlat_layer_and_an_empty_one():
    prob, _ = _rotated_rectangles(n=3)
    tf = Affine(4.5e-6, 0, -43.2, 0, -4.5e-6, -22.9)
    raw = polygons_from_probability(prob, tf, "EPSG:4326", threshold=0.5, min_area_m2=5.0, simplify_px=1.0)
    reg = regularize_footprints(raw, pixel_size_m=0.5)
    assert reg.crs == CRS.from_epsg(4326) and len(reg) == len(raw) == 3
    assert (reg["reg_iou"] > 0.8).all()
    empty = regularize_footprints(raw.iloc[:0], pixel_size_m=0.5)
    assert len(empty) == 0 and "reg_iou" in empty.columns


def test_pass_two_on_worker_threads_gives_the_same_pieces_in_the_same_order():
    """The windows of pass 2 are labelled on worker threads (the watershed releases the GIL) and gathered in
    order: pieces, statistics and group ids are identical for any number of workers."""
    from footprints.polygons.instances import instance_pieces

    prob, seed, valid = _scene(np.random.default_rng(11))

    def read(win, with_seed):
        rows = slice(win.row_off, win.row_off + win.height)
        cols = slice(win.col_off, win.col_off + win.width)
        return prob[rows, cols], valid[rows, cols], seed[rows, cols] if with_seed else None

    runs = [instance_pieces(read, 128, 128, threshold=0.5, seed_threshold=0.6, block_size=16, halo_px=8,
                            workers=w) for w in (1, 3)]
    (one, _), (three, _) = runs
    assert (one["group"] >= 0).sum() >= 4 and len(np.unique(one["group"][one["group"] >= 0])) >= 2  # splits
    assert one.keys() == three.keys()
    for key in one:
        if key == "geom":
            assert all(a.equals_exact(b, 0.0) for a, b in zip(one[key], three[key], strict=True))
        else:
            assert np.array_equal(one[key], three[key]), key
