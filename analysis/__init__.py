"""Analysis of sweep results: Parquet in, the paper's figures and tables out (reads files only).

`load(*paths) -> Results` reads one or several runs; the helpers in `analysis.summary` turn them into
per-cell summaries, controllability, quadratic fits and Table 1 signs; `python -m analysis.report` writes
the figures and report; `python -m analysis.legacy` converts the paper's CSV readings.
"""

from analysis.load import Results, load
from analysis.summary import (
    cell_summary,
    controllability,
    controllability_by_regime,
    final_readings,
    fit_quadratic,
    quadratic_fits,
    table1,
)

__all__ = [
    "Results",
    "cell_summary",
    "controllability",
    "controllability_by_regime",
    "final_readings",
    "fit_quadratic",
    "load",
    "quadratic_fits",
    "table1",
]
