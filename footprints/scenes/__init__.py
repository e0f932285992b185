"""Scenes in: finding them (sources), reading them on their output grid (reader), their labels, georeference and CRS, and the training targets made from the labels."""
