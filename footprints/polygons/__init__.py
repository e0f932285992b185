"""Probabilities to polygons: windowed whole-scene inference, blocks, vectorising, watershed instances, regularised outlines."""
