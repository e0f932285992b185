"""footprints: building footprints from satellite images (VGG16 zoom-out hypercolumns -> polygons)."""

__version__ = "0.1.0"
