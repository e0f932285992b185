"""Scoring: polygon matching, pixel and polygon metrics, one scene against its truth, threshold calibration, plots."""
