"""The results schema: one definition that the model CLI, sweep and analysis share, and docs made from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from model import schema

ROOT = Path(__file__).resolve().parents[1]


def test_docs_column_tables_are_generated_from_the_schema() -> None:
    """docs/results.md holds exactly the tables `python -m model.schema docs/results.md` writes."""
    page = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    fix = "docs/results.md drifted from model/schema.py: run python -m model.schema docs/results.md"
    assert page == schema.render_docs(page), fix
    for name in schema.EPOCH_COLUMNS:
        assert f"| `{name}` |" in page


def test_render_docs_refuses_a_page_without_markers() -> None:
    with pytest.raises(ValueError, match="schema:trials"):
        schema.render_docs("# no markers\n")


def test_importing_the_schema_pulls_in_no_jax_ray_or_pandas() -> None:
    code = (
        "import sys, model.schema; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'ray', 'pandas', 'flax', 'optax') or m.startswith(('model.', 'sweep', 'analysis')) "
        "and m != 'model.schema'); print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_vanilla_rows_null_the_thermo_only_fields() -> None:
    from model.config import get_preset

    vanilla = schema.config_columns(get_preset("digits").to_dict())
    thermo = schema.config_columns(get_preset("digits", objective="thermo").to_dict())
    assert all(vanilla[c] is None for c in schema.THERMO_ONLY)
    assert all(thermo[c] is not None for c in schema.THERMO_ONLY)
    assert set(vanilla) == set(schema.CONFIG_COLUMNS)


def test_to_table_types_documented_columns_even_when_all_null() -> None:
    table = schema.to_table(
        [{"trial_id": "a", "epoch": 1}, {"trial_id": "b", "epoch": 2, "extra": 1.5}], schema.EPOCH_COLUMNS
    )
    assert table.column_names[: len(schema.EPOCH_COLUMNS)] == list(schema.EPOCH_COLUMNS)
    assert table.schema.field("kid_rbf_inf").type == pa.float64()
    assert table.schema.field("extra").type == pa.float64()
    assert table.num_rows == 2


def test_every_reading_of_an_evaluated_epoch_is_a_documented_column() -> None:
    """What the evaluator returns lands in epochs.parquet: each key is a column of the schema, or one of the
    extra columns docs/results.md names."""
    import numpy as np

    from model.metrics import extrapolated_metrics

    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(64, 4)), rng.normal(size=(64, 4))
    readings = extrapolated_metrics(real, gen, [32, 48, 64], seed=0, feature_extractor="test")
    page = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert [k for k in readings if k not in schema.EPOCH_COLUMNS and f"`{k}`" not in page] == []


def test_a_searchs_value_columns_are_numbers_even_when_all_null() -> None:
    """Before any proposal is COMPLETE every search value is null; the columns are still float64, so
    the same column has one type in every run and every flush."""
    from model.schema import TRIAL_COLUMNS, column_type

    for name in ("search_value", "search_se", "search_value_val_ll", "search_se_kid_rbf_nmax"):
        assert column_type(name, [None, None], TRIAL_COLUMNS) == pa.float64(), name
