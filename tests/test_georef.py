"""Least-squares pixel -> lon/lat affine for xView2 scenes: exactness, residuals, refusals, overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from affine import Affine
from shapely.geometry import Polygon

from footprints.scenes.georef import (
    GeorefError,
    check_spread,
    fit_affine,
    gdal_to_affine,
    load_geotransforms,
    residual_px,
    vertex_pairs,
)

# a realistic xView2-like transform: ~0.5 m pixels near Houston, with a small rotation/shear
TRUTH = Affine(4.7e-6, 3.0e-8, -95.3698, -2.0e-8, -4.5e-6, 29.7604)


def _points(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1024, size=(n, 2))


def _apply(t: Affine, xy: np.ndarray) -> np.ndarray:
    return np.column_stack([t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f])


def test_fit_recovers_exact_affine() -> None:
    pix = _points(40)
    fit = fit_affine(pix, _apply(TRUTH, pix))
    assert fit.n_points == 40
    assert fit.rms_px < 1e-6
    # corners of a 1024 scene agree to far below a pixel
    corners = np.array([[0, 0], [1024, 0], [0, 1024], [1024, 1024]], dtype=float)
    _, worst = residual_px(fit.transform, corners, _apply(TRUTH, corners))
    assert worst < 1e-6
    np.testing.assert_allclose(np.array(fit.transform)[:6], np.array(TRUTH)[:6], rtol=1e-7, atol=1e-12)


def test_rms_residual_is_measured_in_pixels() -> None:
    pix = _points(2000, seed=1)
    rng = np.random.default_rng(2)
    noisy = pix + rng.normal(0, 0.8, size=pix.shape)  # 0.8 px per axis -> ~1.13 px RMS distance
    fit = fit_affine(pix, _apply(TRUTH, noisy))
    assert fit.rms_px == pytest.approx(0.8 * np.sqrt(2), rel=0.08)
    assert fit.max_px > fit.rms_px


def test_too_few_or_collinear_vertices_are_refused() -> None:
    with pytest.raises(GeorefError, match="too few"):
        fit_affine(np.array([[0, 0], [10, 5.0]]), np.array([[0, 0], [1, 1.0]]))
    # duplicates do not count as extra vertices
    dup = np.array([[0, 0], [10, 5.0], [0, 0], [10, 5.0]])
    with pytest.raises(GeorefError, match="too few"):
        fit_affine(dup, _apply(TRUTH, dup))
    line = np.column_stack([np.linspace(0, 500, 30), 2 * np.linspace(0, 500, 30) + 3])
    with pytest.raises(GeorefError, match="collinear"):
        fit_affine(line, _apply(TRUTH, line))
    # almost collinear (0.1 px off a line) is still refused at the default 1 px spread
    jitter = line + np.random.default_rng(0).normal(0, 0.1, size=line.shape)
    with pytest.raises(GeorefError, match="collinear"):
        check_spread(jitter)
    check_spread(_points(3))  # three random points are fine


def test_vertex_pairs_match_rings_and_drop_mismatches() -> None:
    a = Polygon([(10, 10), (30, 10), (30, 25), (10, 25)])
    b = Polygon([(100, 100), (120, 100), (110, 130)])
    a_ll = Polygon(_apply(TRUTH, np.asarray(a.exterior.coords)))
    b_ll_wrong = Polygon([(0, 0), (1, 0), (1, 1), (0, 1)])  # 4 vertices vs 3: cannot be the same ring
    pix, world = vertex_pairs([a, b], [a_ll, b_ll_wrong])
    assert len(pix) == 4 and len(world) == 4  # closing vertex dropped, b dropped
    np.testing.assert_allclose(_apply(TRUTH, pix), world)


def test_geotransforms_file(tmp_path) -> None:
    path = tmp_path / "gt.json"
    gt = list(TRUTH.to_gdal())
    path.write_text(json.dumps({"a_pre_disaster.png": gt, "b.png": {"geotransform": gt, "crs": "EPSG:32615"}}))
    table = load_geotransforms(path)
    t, crs = table["a_pre_disaster.png"]
    assert t.almost_equals(TRUTH) and crs.to_epsg() == 4326
    assert table["a_pre_disaster"][0] == t  # stem lookups work too
    assert table["b.png"][1].to_epsg() == 32615
    path.write_text('{"a.png": [1, 2, 3]}')
    with pytest.raises(ValueError, match="6 finite numbers"):
        load_geotransforms(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        load_geotransforms(path)
    with pytest.raises(ValueError, match="singular"):
        gdal_to_affine([0, 0, 0, 0, 0, 0])
