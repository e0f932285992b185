"""Synthetic scenes for the demo and the tests: buildings with known instances in the xView2 and GeoTIFF layouts."""
