"""Merged footprint layers (`footprints.contracts.footprint_files.merge_scene_layers`), streamed a scene at a
time, against the in-memory concatenation that predict and evaluate used before (kept here as the
reference): same features, properties, geometries (to 1e-9) and CRS, empty scenes included.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely

from footprints.contracts import footprint_files
from footprints.contracts.footprint_files import (
    LAYER,
    empty_footprints,
    merge_outputs,
    write_geojson,
    write_gpkg,
)
from footprints.contracts.paths import RunPaths
from footprints.stages.evaluate import _merge_matches

ORIGINS = {"EPSG:32633": (450_000.0, 5_550_000.0), "EPSG:32634": (300_000.0, 5_560_000.0)}


# ---------------------------------------------------------------------------------------------- reference
def _concatenated_merge(results: list[dict[str, Any]], geojson_path: Path, gpkg_path: Path) -> int:
    """predict's `merge_outputs` before streaming: every scene's layers read, concatenated, written."""
    results = sorted(results, key=lambda r: r["scene_id"])
    geo = [r for r in results if r.get("crs")]
    pixel = [r for r in results if not r.get("crs")]
    chosen = geo or pixel
    crs = 4326 if geo else None
    frames = [pyogrio.read_dataframe(r["geojson"]) for r in chosen]
    frames = [f if crs is not None else gpd.GeoDataFrame(f.drop(columns=f.geometry.name),
                                                         geometry=np.asarray(f.geometry.values), crs=None)
              for f in frames if len(f)]
    merged = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs) if frames
              else empty_footprints(crs))
    write_geojson(merged, geojson_path)
    gpkg_frames = [pyogrio.read_dataframe(r["gpkg"], layer=LAYER) for r in chosen]
    crss = {f.crs.to_string() if f.crs is not None else "" for f in gpkg_frames}
    if len(crss) == 1:
        nonempty = [f for f in gpkg_frames if len(f)]
        one = gpkg_frames[0].crs
        layer = (gpd.GeoDataFrame(pd.concat(nonempty, ignore_index=True), geometry="geometry", crs=one)
                 if nonempty else empty_footprints(one))
        write_gpkg(layer, gpkg_path, crs=one)
    else:
        write_gpkg(merged, gpkg_path)
    return len(merged)


def _concatenated_matches(matches: list[Path], geojson_path: Path) -> None:
    """evaluate's `_merge_matches` before streaming."""
    frames = [pyogrio.read_dataframe(p) for p in matches]
    frames = [f for f in frames if len(f)]
    crs = next((f.crs for f in frames if f.crs is not None), None)
    layer = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs) if frames
             else empty_footprints(4326).assign(kind=pd.Series(dtype=object), status=pd.Series(dtype=object),
                                               iou=pd.Series(dtype="float64")))
    write_geojson(layer, geojson_path)
    write_gpkg(layer, geojson_path.with_suffix(".gpkg"), layer="matches")


# ---------------------------------------------------------------------------------------------- scenes
def _layer(sid: str, n: int, crs: str | None, seed: int, **extra: Any) -> gpd.GeoDataFrame:
    """`n` rectangles (one with a hole) of scene `sid` in `crs` (UTM metres) or pixel space."""
    rng = np.random.default_rng(seed)
    x0, y0 = ORIGINS.get(crs or "", (0.0, 0.0))
    geoms = []
    for i in range(n):
        x, y = x0 + 20.0 * i + rng.uniform(0, 3), y0 + rng.uniform(0, 30)
        g = shapely.box(x, y, x + 8.123456789, y + 6.987654321)
        if i == 0:
            g = g.difference(shapely.box(x + 2, y + 2, x + 4, y + 4))
        geoms.append(g)
    prob = rng.uniform(0.5, 1.0, n)
    gdf = gpd.GeoDataFrame({"scene": [sid] * n, "area_m2": shapely.area(geoms), "mean_prob": prob,
                            "max_prob": np.minimum(prob + 0.1, 1.0), **extra},
                           geometry=gpd.GeoSeries(geoms, crs=crs))
    return gdf if n else empty_footprints(crs)


def _scene(folder: Path, sid: str, n: int, crs: str | None, seed: int, **extra: Any) -> dict[str, Any]:
    """A scene's files as predict writes them, and its result record."""
    gdf = _layer(sid, n, crs, seed, **extra)
    folder.mkdir(parents=True, exist_ok=True)
    write_geojson(gdf, folder / f"{sid}.geojson")
    write_gpkg(gdf, folder / f"{sid}.gpkg", crs=crs)
    return {"scene_id": sid, "crs": crs or "", "geojson": str(folder / f"{sid}.geojson"),
            "gpkg": str(folder / f"{sid}.gpkg")}


SCENES: dict[str, tuple[int, str | None, dict[str, Any]]] = {
    "a_empty": (0, "EPSG:32633", {}),
    "b": (3, "EPSG:32633", {}),
    "c": (2, "EPSG:32633", {"note": ["x", "y"]}),  # an extra column in one scene only
    "d_zone34": (2, "EPSG:32634", {}),
    "p1": (3, None, {}),
    "p2_empty": (0, None, {}),
}
CASES = {
    "one CRS, an empty scene": ["c", "a_empty", "b"],
    "two UTM zones": ["b", "a_empty", "d_zone34", "c"],
    "pixel space": ["p1", "p2_empty"],
    "georeferenced and pixel scenes": ["b", "p1"],
    "nothing found": ["a_empty"],
    "nothing found in pixel space": ["p2_empty"],
}


def _features(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _assert_same_layer(new: gpd.GeoDataFrame, old: gpd.GeoDataFrame) -> None:
    assert len(new) == len(old)
    assert (new.crs is None and old.crs is None) or new.crs == old.crs
    assert list(new.columns) == list(old.columns)
    pd.testing.assert_frame_equal(pd.DataFrame(new.drop(columns="geometry")),
                                  pd.DataFrame(old.drop(columns="geometry")))
    for g, h in zip(new.geometry.values, old.geometry.values, strict=True):
        assert g.geom_type == h.geom_type and g.equals_exact(h, tolerance=1e-9), (g.wkt, h.wkt)


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_equals_the_concatenation(tmp_path: Path, case: str) -> None:
    results = [_scene(tmp_path / "scenes", sid, *SCENES[sid][:2], seed=i, **SCENES[sid][2])
               for i, sid in enumerate(CASES[case])]
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    n_new = merge_outputs(results, tmp_path / "new" / "footprints.geojson", tmp_path / "new" / "footprints.gpkg")
    n_old = _concatenated_merge(results, tmp_path / "old" / "footprints.geojson",
                                tmp_path / "old" / "footprints.gpkg")
    assert n_new == n_old
    # the GeoJSON: the same FeatureCollection, member for member (GDAL encodes both)
    new_doc, old_doc = (_features(tmp_path / d / "footprints.geojson") for d in ("new", "old"))
    assert new_doc == old_doc
    assert "crs" not in new_doc and len(new_doc["features"]) == n_new
    _assert_same_layer(pyogrio.read_dataframe(tmp_path / "new" / "footprints.geojson"),
                       pyogrio.read_dataframe(tmp_path / "old" / "footprints.geojson"))
    # the GeoPackage: same rows, geometries, CRS, geometry type, and the QGIS style
    new_gpkg, old_gpkg = (tmp_path / d / "footprints.gpkg" for d in ("new", "old"))
    _assert_same_layer(pyogrio.read_dataframe(new_gpkg, layer=LAYER), pyogrio.read_dataframe(old_gpkg, layer=LAYER))
    info_new, info_old = (pyogrio.read_info(p, layer=LAYER) for p in (new_gpkg, old_gpkg))
    assert info_new["geometry_type"] == info_old["geometry_type"]
    assert list(info_new["fields"]) == list(info_old["fields"])
    assert sorted(pyogrio.list_layers(new_gpkg)[:, 0]) == sorted(pyogrio.list_layers(old_gpkg)[:, 0])
    # nothing left behind but the two files
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["footprints.geojson", "footprints.gpkg"]


def test_two_zones_go_to_the_utm_zone_of_the_centre_and_one_crs_is_kept(tmp_path: Path) -> None:
    one = [_scene(tmp_path, sid, *SCENES[sid][:2], seed=i) for i, sid in enumerate(["a_empty", "b"])]
    merge_outputs(one, tmp_path / "one.geojson", tmp_path / "one.gpkg")
    assert pyogrio.read_info(tmp_path / "one.gpkg", layer=LAYER)["crs"] == "EPSG:32633"
    two = [*one, _scene(tmp_path, "d_zone34", *SCENES["d_zone34"][:2], seed=5)]
    merge_outputs(two, tmp_path / "two.geojson", tmp_path / "two.gpkg")
    assert pyogrio.read_info(tmp_path / "two.gpkg", layer=LAYER)["crs"] in ("EPSG:32633", "EPSG:32634")
    assert pyogrio.read_info(tmp_path / "two.gpkg", layer=LAYER)["features"] == 5


def _live_layers_at_each_read(folder: Path, n_scenes: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Merge `n_scenes` scenes of 4 polygons; the number of GeoDataFrames alive each time a file is read."""
    results = [_scene(folder, f"s{i:02d}", 4, "EPSG:32633", seed=i) for i in range(n_scenes)]
    real = pyogrio.read_dataframe
    live: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> gpd.GeoDataFrame:
        gc.collect()
        live.append(sum(isinstance(o, gpd.GeoDataFrame) for o in gc.get_objects()))
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pyogrio, "read_dataframe", counting)
        assert merge_outputs(results, folder / "m.geojson", folder / "m.gpkg") == 4 * n_scenes
    assert len(pyogrio.read_dataframe(folder / "m.gpkg", layer=LAYER)) == 4 * n_scenes
    return live


@pytest.mark.parametrize("batch_rows", [1, 8])
def test_merge_memory_does_not_grow_with_the_number_of_scenes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             batch_rows: int) -> None:
    """As many layers are alive at any read with 6 scenes as with 2: one scene's, and those waiting for
    the GeoPackage (at most `GPKG_BATCH_ROWS` rows: here every scene at once, or two scenes)."""
    monkeypatch.setattr(footprint_files, "GPKG_BATCH_ROWS", batch_rows)
    few = _live_layers_at_each_read(tmp_path / "few", 2, monkeypatch)
    many = _live_layers_at_each_read(tmp_path / "many", 6, monkeypatch)
    assert len(few) == 4 and len(many) == 12  # each scene's GeoJSON and GeoPackage, read once
    assert max(many) == max(few)


def _matches_scene(folder: Path, sid: str, n_pred: int, n_truth: int, seed: int) -> dict[str, Any]:
    """A scene's `evaluate/matches/<scene>.geojson`: predictions (TP) and truths (FN, no probability)."""
    pred = _layer(sid, n_pred, "EPSG:32633", seed=seed).assign(kind="pred", status="TP", iou=0.8)
    truth = _layer(sid, n_truth, "EPSG:32633", seed=seed + 10).assign(mean_prob=np.nan, max_prob=np.nan,
                                                                     kind="truth", status="FN", iou=0.0)
    layer = gpd.GeoDataFrame(pd.concat([pred, truth], ignore_index=True), geometry="geometry", crs="EPSG:32633")
    path = folder / f"{sid}.geojson"
    write_geojson(layer, path)
    return {"matches": str(path), "crs": "EPSG:32633"}


def test_matches_merge_equals_the_concatenation(tmp_path: Path) -> None:
    """evaluate's `matches.geojson`/`.gpkg`, a scene with nothing in it included."""
    folder = tmp_path / "evaluate" / "matches"
    folder.mkdir(parents=True)
    per_scene = {sid: _matches_scene(folder, sid, n, n + 1, seed=i)
                 for i, (sid, n) in enumerate([("m1", 3), ("m2", 2)])}
    per_scene["m0"] = _matches_scene(folder, "m0", 0, 0, seed=9)
    per_scene = dict(sorted(per_scene.items()))
    _merge_matches(per_scene, RunPaths(tmp_path))
    old = tmp_path / "old" / "matches.geojson"
    _concatenated_matches([Path(s["matches"]) for s in per_scene.values()], old)
    new = RunPaths(tmp_path).matches
    assert _features(new) == _features(old)
    for a, b in ((new, old), (new.with_suffix(".gpkg"), old.with_suffix(".gpkg"))):
        kw = {"layer": "matches"} if a.suffix == ".gpkg" else {}
        _assert_same_layer(pyogrio.read_dataframe(a, **kw), pyogrio.read_dataframe(b, **kw))
    assert len(pyogrio.read_dataframe(new)) == 3 + 4 + 2 + 3
    assert pyogrio.read_info(new.with_suffix(".gpkg"), layer="matches")["crs"] == "EPSG:32633"


def test_a_scene_with_only_missed_truths_keeps_the_probabilities_numbers(tmp_path: Path) -> None:
    """A scene whose matches have no prediction reads back with all-null probabilities (no type): the
    concatenation made the merged columns text; the merge types them from the footprint schema."""
    folder = tmp_path / "evaluate" / "matches"
    folder.mkdir(parents=True)
    per_scene = {"m0": _matches_scene(folder, "m0", 0, 2, seed=0), "m1": _matches_scene(folder, "m1", 2, 1, seed=1)}
    _merge_matches(per_scene, RunPaths(tmp_path))
    for path, kw in ((RunPaths(tmp_path).matches, {}), (RunPaths(tmp_path).matches.with_suffix(".gpkg"),
                                                       {"layer": "matches"})):
        info = pyogrio.read_info(path, **kw)
        types = dict(zip(info["fields"], info["dtypes"], strict=True))
        assert types["mean_prob"] == types["max_prob"] == types["iou"] == "float64", path
        layer = pyogrio.read_dataframe(path, **kw)
        assert layer["mean_prob"].isna().sum() == 3 and layer["mean_prob"].notna().sum() == 2
