"""Benchmarks: the train step (`python -m model.bench`, model/bench/train_step.py), one KID_inf/FID_inf
evaluation (`python -m model.bench.metrics`), the evaluation readings (`python -m model.bench.readings`)
and the paper's public code side by side (`python -m model.bench.paper`)."""
