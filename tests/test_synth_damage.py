"""Synthetic post-disaster scenes (issue 26): the post-disaster pair of every scene, its grades, its pixels,
its GeoTIFF on another grid, and the pre-disaster files left as they were."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rasterio.features import rasterize
from shapely import wkt as shapely_wkt
from shapely.geometry import box

from footprints.scenes.grades import GRADES, UNCLASSIFIED
from footprints.synth.damage import Event, grade_buildings
from footprints.synth.dataset import write_synthetic_dataset

SIZE = 384
SEED = 3  # 4 scenes of 384 px: one without buildings, 111 buildings of every grade and some un-classified
N = 4
ALL_GRADES = (*GRADES, UNCLASSIFIED)


def _post(path: Path) -> Path:
    return path.with_name(path.name.replace("_pre_disaster", "_post_disaster"))


def _label(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_damage") / "data"
    summary = write_synthetic_dataset(out, n_scenes=N, seed=SEED, size=SIZE, geotiff=True, damage=True)
    return out, summary


def _pre_pngs(out: Path) -> list[Path]:
    pres = sorted((out / "images").glob("*_pre_disaster.png"))
    assert len(pres) == N
    return pres


def test_post_files_exist_with_matching_names(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    pres = _pre_pngs(out)
    posts = sorted((out / "images").glob("*_post_disaster.png"))
    assert [p.name for p in posts] == [_post(p).name for p in pres]
    assert summary["post_images"] == [_post(Path(name)).name for name in summary["images"]]
    assert sorted(summary["post_images"]) == [p.name for p in posts]
    for pre in pres:
        post = _post(pre)
        with Image.open(post) as im:
            assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        assert (out / "labels" / f"{post.stem}.json").is_file()
        assert (out / "geotiff" / "images" / f"{post.stem}.tif").is_file()
        assert (out / "geotiff" / "labels" / f"{post.stem}.geojson").is_file()
    # truth_transforms.json keeps the pre-disaster images only, as before
    assert set(_label(out / "truth_transforms.json")) == {p.name for p in pres}


def test_post_labels_share_polygons_and_uids_and_carry_valid_grades(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    counts: Counter[str] = Counter()
    n_empty = 0
    for pre in _pre_pngs(out):
        a = _label(out / "labels" / f"{pre.stem}.json")
        b = _label(out / "labels" / f"{_post(pre).stem}.json")
        for key in ("xy", "lng_lat"):
            fa, fb = a["features"][key], b["features"][key]
            assert [f["wkt"] for f in fa] == [f["wkt"] for f in fb]
            assert [f["properties"]["uid"] for f in fa] == [f["properties"]["uid"] for f in fb]
            assert all(f["properties"]["feature_type"] == "building" for f in fb)
            assert all(f["properties"]["subtype"] in ALL_GRADES for f in fb)
        # xy and lng_lat give each building the same grade
        assert [f["properties"]["subtype"] for f in b["features"]["xy"]] == \
            [f["properties"]["subtype"] for f in b["features"]["lng_lat"]]
        assert all(f["properties"]["subtype"] == "no-damage" for f in a["features"]["xy"])  # pre: as before
        counts.update(f["properties"]["subtype"] for f in b["features"]["xy"])
        n_empty += not b["features"]["xy"]
        ma, mb = a["metadata"], b["metadata"]
        assert mb["img_name"] == _post(pre).name and ma["img_name"] == pre.name
        assert mb["disaster"] == ma["disaster"] and mb["disaster_type"] == ma["disaster_type"]
        assert (mb["width"], mb["height"], mb["gsd"]) == (ma["width"], ma["height"], ma["gsd"])
        assert mb["capture_date"] > ma["capture_date"] and mb["id"] != ma["id"]
    assert n_empty >= 1  # a scene without buildings has its post-disaster pair too, with no features
    # every grade and some un-classified over the scenes; the summary counts them
    assert set(counts) == set(ALL_GRADES), counts
    assert summary["damage"] == {g: counts[g] for g in ALL_GRADES}


def test_pixels_change_more_the_worse_the_grade(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    diffs: dict[str, list[float]] = {g: [] for g in GRADES}
    outside: dict[str, list[float]] = {g: [] for g in GRADES}
    for pre in _pre_pngs(out):
        a = np.asarray(Image.open(pre), dtype=np.float32)
        b = np.asarray(Image.open(_post(pre)), dtype=np.float32)
        d = np.abs(a - b).mean(-1)
        feats = _label(out / "labels" / f"{_post(pre).stem}.json")["features"]["xy"]
        polys = [shapely_wkt.loads(f["wkt"]) for f in feats]
        if not polys:
            continue
        ids = rasterize(((p, i + 1) for i, p in enumerate(polys)), out_shape=(SIZE, SIZE), dtype="int32")
        for i, (p, f) in enumerate(zip(polys, feats, strict=True)):
            grade = f["properties"]["subtype"]
            inside = ids == i + 1
            if grade == UNCLASSIFIED or inside.sum() < 20:
                continue
            diffs[grade].append(float(d[inside].mean()))
            # a 2-4 m ring outside the outline, off every roof: where debris spills
            ring = rasterize([(p.buffer(8).difference(p.buffer(4)), 1)], out_shape=(SIZE, SIZE), dtype="uint8")
            ring = (ring > 0) & (ids == 0)
            if ring.sum() >= 20:
                outside[grade].append(float(d[ring].mean()))
    mean = {g: float(np.mean(v)) for g, v in diffs.items()}
    assert all(len(v) >= 3 for v in diffs.values()), {g: len(v) for g, v in diffs.items()}
    assert mean["no-damage"] < mean["minor-damage"] < mean["major-damage"] <= 1.1 * mean["destroyed"], mean
    assert mean["destroyed"] > 2.0 * mean["no-damage"], mean
    # the post-disaster image differs everywhere a little (light, noise), undamaged roofs included
    assert mean["no-damage"] > 1.0, mean
    # not trivially separable: some minor-damage roofs change less than some no-damage roofs
    assert min(diffs["minor-damage"]) < max(diffs["no-damage"]), mean
    # debris spills around the destroyed buildings, not around the undamaged ones
    assert np.mean(outside["destroyed"]) > 1.5 * np.mean(outside["no-damage"]), outside


def test_grades_follow_the_shares_and_cluster_along_the_event() -> None:
    rng = np.random.default_rng(0)
    size = 1000
    labels: list[str] = []
    severity: dict[str, list[float]] = {g: [] for g in GRADES}
    for _ in range(200):
        xy = rng.uniform(20, size - 20, (40, 2))
        polys = [box(x - 5, y - 5, x + 5, y + 5) for x, y in xy]
        event = Event("track", float(rng.uniform(0, size)), float(rng.uniform(0, size)),
                      float(rng.uniform(0, math.pi)), 200.0)
        label, drawn = grade_buildings(rng, polys, event)
        assert len(label) == len(drawn) == len(polys)
        assert all(d in GRADES for d in drawn)
        assert all(lb in (d, UNCLASSIFIED) for lb, d in zip(label, drawn, strict=True))
        labels += label
        sev = event.severity(xy[:, 0], xy[:, 1])
        for d, s in zip(drawn, sev, strict=True):
            severity[d].append(float(s))
    share = {g: c / len(labels) for g, c in Counter(labels).items()}
    target = {"no-damage": 0.40, "minor-damage": 0.20, "major-damage": 0.15, "destroyed": 0.20, UNCLASSIFIED: 0.05}
    for g, t in target.items():
        assert abs(share[g] - t) < 0.04, (g, share)
    # the worse the grade, the nearer the event
    s = [float(np.mean(severity[g])) for g in GRADES]
    assert s[0] < s[1] < s[2] < s[3], s
    assert grade_buildings(rng, [], event) == ([], [])


def test_pre_disaster_files_do_not_depend_on_damage(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    plain = tmp_path / "plain"
    summary = write_synthetic_dataset(plain, n_scenes=N, seed=SEED, size=SIZE, geotiff=True, damage=False)
    assert "damage" not in summary and "post_images" not in summary
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    assert not any("_post_disaster" in f.name for f in files)
    with_post = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [f for f in with_post if "_post_disaster" not in f.name] == files
    assert any(f.suffix == ".tif" for f in files) and any(f.name == "truth_transforms.json" for f in files)
    for f in files:
        assert (plain / f).read_bytes() == (out / f).read_bytes(), f


def test_geotiff_post_is_on_another_grid_over_the_pre(dataset: tuple[Path, dict]) -> None:
    import geopandas as gpd
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds

    out, _ = dataset
    for pre in _pre_pngs(out):
        post = _post(pre)
        with rasterio.open(out / "geotiff" / "images" / f"{pre.stem}.tif") as a, \
                rasterio.open(out / "geotiff" / "images" / f"{post.stem}.tif") as b:
            assert a.crs != b.crs or a.transform != b.transform
            assert b.crs.to_epsg() == 4326 and b.count == 3 and b.dtypes[0] == "uint8"
            # the post footprint lies inside the pre one and covers most of it
            left, bottom, right, top = transform_bounds(b.crs, a.crs, *b.bounds)
            inter = max(0.0, min(right, a.bounds.right) - max(left, a.bounds.left)) * \
                max(0.0, min(top, a.bounds.top) - max(bottom, a.bounds.bottom))
            pre_area = (a.bounds.right - a.bounds.left) * (a.bounds.top - a.bounds.bottom)
            assert 0.8 * pre_area < inter < pre_area
            # warped back onto the pre grid it is the post PNG (up to resampling), not the pre PNG
            back = np.zeros((3, a.height, a.width), np.uint8)
            reproject(b.read(), back, src_transform=b.transform, src_crs=b.crs, dst_transform=a.transform,
                      dst_crs=a.crs, resampling=Resampling.bilinear, src_nodata=None, dst_nodata=0)
        covered = back.max(0) > 0
        m = 4  # away from the footprint's edge, where the two resamplings meet the border
        covered[:m] = covered[-m:] = covered[:, :m] = covered[:, -m:] = False
        assert covered.mean() > 0.8
        png_post = np.moveaxis(np.asarray(Image.open(post)), -1, 0).astype(np.float32)
        png_pre = np.moveaxis(np.asarray(Image.open(pre)), -1, 0).astype(np.float32)
        err_post = np.abs(back.astype(np.float32) - png_post)[:, covered].mean()
        err_pre = np.abs(back.astype(np.float32) - png_pre)[:, covered].mean()
        assert err_post < 5.0 and err_post < 0.6 * err_pre, (err_post, err_pre)
        # labels: the pre GeoJSON polygons, each with the grade of the PNG label
        ga = gpd.read_file(out / "geotiff" / "labels" / f"{pre.stem}.geojson")
        gb = gpd.read_file(out / "geotiff" / "labels" / f"{post.stem}.geojson")
        grades = {f["properties"]["uid"]: f["properties"]["subtype"]
                  for f in _label(out / "labels" / f"{post.stem}.json")["features"]["xy"]}
        assert len(ga) == len(gb) == len(grades)
        if len(gb):
            assert list(ga["uid"]) == list(gb["uid"])
            assert dict(zip(gb["uid"], gb["subtype"], strict=True)) == grades
            assert all(x.equals_exact(y, 0.0) for x, y in zip(ga.geometry, gb.geometry, strict=True))
