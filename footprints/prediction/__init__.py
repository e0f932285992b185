"""What the predict stage runs on each scene: its settings and model cache, the probability raster and polygons of a scene, the stored calibration, the checks of every output path."""
