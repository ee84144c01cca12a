"""The Pareto front of a multi-objective search run (`analysis.pareto`): the non-dominated set against a
brute-force definition, and the report's section for a search run (none for other runs)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import synthetic_tables, write_run

from analysis import pareto as P
from analysis import report as R

DIRECTIONS = ("minimize", "maximize")


def brute_force(values: np.ndarray, directions) -> set[int]:
    """Row i is on the front unless some row j is no worse everywhere and better somewhere (NaN rows are
    never on it and beat nothing), written from the definition, one pair at a time."""
    sign = [1 if d == "minimize" else -1 for d in directions]
    ok = [i for i in range(len(values)) if np.isfinite(values[i]).all()]

    def beats(j: int, i: int) -> bool:
        a = [s * v for s, v in zip(sign, values[j], strict=True)]
        b = [s * v for s, v in zip(sign, values[i], strict=True)]
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(
            x < y for x, y in zip(a, b, strict=True)
        )

    return {i for i in ok if not any(beats(j, i) for j in ok if j != i)}


@pytest.mark.parametrize("directions", list(itertools.product(("minimize", "maximize"), repeat=2)))
def test_front_equals_the_definition_on_random_points_with_ties_and_nan(directions) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = rng.integers(0, 5, size=(12, 2)).astype(float)  # few levels: many ties
        values[rng.random(12) < 0.1, rng.integers(0, 2)] = np.nan
        assert set(np.flatnonzero(P.pareto_front(values, directions))) == brute_force(values, directions)


def test_front_of_three_objectives_and_small_cases() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(30, 3))
    dirs = ("minimize", "maximize", "minimize")
    assert set(np.flatnonzero(P.pareto_front(values, dirs))) == brute_force(values, dirs)
    pts = np.array([[0.2, -100.0], [0.1, -120.0], [0.3, -90.0], [0.25, -110.0], [0.2, -100.0]])
    assert P.pareto_front(pts, DIRECTIONS).tolist() == [True, True, True, False, True]  # equal rows both stay
    assert P.pareto_front(pts, ("maximize", "minimize")).tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="neither"):
        P.pareto_front(pts, ("min", "max"))


def _search_run(root: Path, metrics: list[str]) -> tuple[Path, dict[int, tuple[float, float]]]:
    """The synthetic run with its thermo cells turned into search proposals: cell k is Optuna trial k
    (one seed per repetition), COMPLETE but the last, with planted seed means and standard errors."""
    trials, epochs = synthetic_tables(run="front")
    cells = sorted(trials.loc[trials["objective"] == "thermo", "cell"].unique())
    rng = np.random.default_rng(2)
    planted = {k: (float(rng.uniform(0.1, 0.3)), float(rng.uniform(-150, -100))) for k in range(len(cells))}
    planted[1] = planted[0]  # a tie: both or neither on the front
    number = {cell: k for k, cell in enumerate(cells)}
    trials["optuna_trial"] = trials["cell"].map(number).astype("Int64")
    trials["search"] = "front"
    trials["optuna_state"] = np.where(trials["optuna_trial"].fillna(-1) == len(cells) - 1, "FAIL", "COMPLETE")
    trials.loc[trials["optuna_trial"].isna(), "optuna_state"] = None
    for i, m in enumerate(metrics):
        trials[f"search_value_{m}"] = [
            planted[int(k)][i] if pd.notna(k) and s == "COMPLETE" else np.nan
            for k, s in zip(trials["optuna_trial"], trials["optuna_state"], strict=True)
        ]
        trials[f"search_se_{m}"] = np.where(trials[f"search_value_{m}"].notna(), 0.01 * (i + 1), np.nan)
    run_dir = write_run(root, trials, epochs)
    manifest = {"metrics": metrics, "directions": list(DIRECTIONS), "space": ["temp_power"], "repetitions": 2}
    (run_dir / "search.json").write_text(json.dumps(manifest))
    return run_dir, {k: v for k, v in planted.items() if k != len(cells) - 1}


def test_the_report_draws_the_front_of_a_search_run(tmp_path: Path) -> None:
    metrics = ["kid_rbf_nmax", "val_ll"]
    run_dir, planted = _search_run(tmp_path / "storage", metrics)
    out = tmp_path / "report"
    assert R.main([str(run_dir), "--out", str(out)]) == 0
    table = pd.read_csv(out / "pareto_front.csv")
    numbers = sorted(planted)
    expected = {numbers[i] for i in brute_force(np.array([planted[k] for k in numbers]), DIRECTIONS)}
    assert set(table.loc[table["on_front"], "optuna_trial"]) == expected
    assert set(table["optuna_trial"]) == set(planted)  # the FAIL proposal is left out
    assert table["on_front"].tolist() == sorted(table["on_front"], reverse=True)  # front first
    assert (out / "pareto_front.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "## Search `front`: Pareto front of kid_rbf_nmax, val_ll" in md
    assert f"{len(planted)} complete proposals, {len(expected)} on the front" in md
    assert "± 0.01" in md and "± 0.02" in md  # each objective's SE


def test_no_front_for_a_single_objective_search_or_a_grid(tmp_path: Path) -> None:
    run_dir, _ = _search_run(tmp_path / "storage", ["kid_rbf_nmax", "val_ll"])
    (run_dir / "search.json").write_text(json.dumps({"metric": "kid_rbf_inf"}))
    out = tmp_path / "single"
    assert R.main([str(run_dir), "--out", str(out)]) == 0
    assert "Pareto front" not in (out / "report.md").read_text() and not (out / "pareto_front.csv").exists()
    (run_dir / "search.json").unlink()
    assert P.search_objectives(run_dir / "results") is None


def test_the_report_of_a_search_run_in_s3_equals_the_local_one(tmp_path: Path, s3_server) -> None:
    """The search's manifest and tables read from S3 (`analysis.remote`) give the same front."""
    run_dir, _ = _search_run(tmp_path / "storage", ["kid_rbf_nmax", "val_ll"])
    client = s3_server.client()
    for path in sorted(run_dir.rglob("*")):
        if path.is_file():
            key = f"runs/front/{path.relative_to(run_dir).as_posix()}"
            client.put_object(Bucket=s3_server.bucket, Key=key, Body=path.read_bytes())
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert R.main([str(run_dir), "--out", str(local)]) == 0
    assert R.main([s3_server.uri("runs", "front"), "--out", str(remote)]) == 0
    pd.testing.assert_frame_equal(
        pd.read_csv(local / "pareto_front.csv"), pd.read_csv(remote / "pareto_front.csv")
    )
    assert pd.read_csv(remote / "pareto_front.csv")["on_front"].any()
