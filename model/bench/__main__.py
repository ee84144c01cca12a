"""`python -m model.bench`: the train-step benchmark (model/bench/train_step.py)."""

from model.bench.train_step import main

if __name__ == "__main__":
    raise SystemExit(main())
