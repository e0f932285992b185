"""Thin staged scripts: each module's `run(cfg, **options)` wires library code in `footprints/` to a stage.

Each is also runnable on its own: `python -m pipelines.tile --config configs/demo.yaml`.
"""
