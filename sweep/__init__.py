"""Orchestration: grids and searches as Ray Tune trials, Orbax checkpoints, Parquet results.

`python -m sweep.grid` runs a grid (`sweep.plan` reads it, `sweep.trainable` is the trial,
`sweep.checkpoint` its Orbax checkpoint, `sweep.results` / `sweep.callback` the Parquet tables).
"""
