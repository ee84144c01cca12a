"""Orchestration: grids and searches as Ray Tune trials, Orbax checkpoints, Parquet results.

`python -m sweep.grid` runs a grid (`sweep.grid_file` reads it) and `python -m sweep.search` an Optuna
search (`sweep.optuna_search`, `sweep.study`); both launch through `sweep.launch`. `sweep.trainable` is the
trial, `sweep.checkpoint` its Orbax checkpoint, `sweep.results` / `sweep.callback` the Parquet tables,
`sweep.storage` the local/NFS/s3 file access.
"""
