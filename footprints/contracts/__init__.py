"""The on-disk contracts between stages: the only thing stages share besides configuration and pure math.

Stages meet only at files. What one stage writes and the next reads is defined here, once:

- `paths`: stage names (as the user types them) and every file a stage writes, under `<output_root>/<name>/`.
- `manifest`: the tile manifest's schema, its writer and strict reader, and the split -> scenes lookup.
- `patches`: how a patch (image + mask GeoTIFF) is written and loaded.
- `features_store`: hypercolumn shards, the train-split statistics and their reader.
- `checkpoints`: saving and loading every model checkpoint (classifier, segmenter, training state).
- `tile_records`, `predict_records`: the tile stage's scene record and predict's scene record and summary,
  as typed records with one writer and one reader each.
- `probability`: the probability COG, its decoder and the `p >= threshold` rule.
- `footprint_files`, `footprint_ownership`, `gpkg_style`: GeoJSON/GeoPackage footprint layers, their merge,
  which existing files footprints wrote, and their QGIS styles.
- `freshness`: the one rule that decides whether an output is up to date (a record written last, checked
  by content: a key over settings and inputs, and the size of every file it covers).

A stage module (`footprints.stages.*`) imports these and the shared modules (scenes, models, math), never
another stage; `tests/test_architecture.py` checks the import graph.
"""
