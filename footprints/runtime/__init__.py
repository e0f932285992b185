"""How a run runs: dask clusters (local or SLURM) and their logging, the heap setting, run and output locks."""
