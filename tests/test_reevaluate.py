"""`python -m sweep.reevaluate`: a finished run's final checkpoints read again with other reading settings.

A tiny run is written in the sweep's layout without Ray (the trial's own code paths: `run_epoch` with the
evaluator, `TrialCheckpointer`, `ResultsTables`), then re-evaluated: at the run's own settings the readings
come back exactly; other settings change only the readings file; training settings are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from model.config import get_preset
from model.data import load_dataset
from model.loop import init_state, run_epoch
from model.metrics import make_evaluator
from model.schema import readings_file
from sweep import reevaluate as rv
from sweep.checkpoint import TrialCheckpointer
from sweep.results import ResultsTables, config_columns

TINY = dict(
    num_train=64,
    num_val=24,
    batch_size=16,
    z_dim=4,
    ebm_width=8,
    gen_width=1,
    prior_steps=2,
    posterior_steps=2,
    num_temps=3,
    epochs=1,
    eval_every=1,
    sample_every=0,
    eval_num_min=12,
    eval_num_max=24,
    eval_num_points=2,
    val_ll_examples=6,
    val_ll_temps=5,
    val_ll_chains=2,
    val_ll_prior_chains=8,
    grad_noise_draws=3,
)
TRIALS = {"vanilla-r0": {"seed": 0}, "vanilla-r1": {"seed": 1}}  # one compiled step for both
READINGS = (
    "val_ll",
    "val_ll_stderr",
    "grad_noise_gen",
    "grad_noise_ebm",
    "grad_noise_data_gen",
    "grad_noise_langevin_gen",
    "grad_snr_gen",
    "kid_rbf_nmax",
    "kid_rbf_nmax_stderr",
    "kid_rbf_inf",
    "kid_poly_inf",
    "fid_inf",
)


def _write_run(run: Path) -> dict[str, dict]:
    """Train each trial one epoch as a sweep trial does and store it in the sweep's layout; returns the
    readings each trial wrote."""
    tables = ResultsTables(str(run / "results"))
    written = {}
    for trial_id, extra in TRIALS.items():
        config = get_preset("digits", **TINY, **extra)
        dataset = load_dataset(config)
        state, readings = run_epoch(
            config, init_state(config), dataset, evaluator=make_evaluator(config, dataset)
        )
        directory = run / trial_id / "checkpoint_000000"
        directory.mkdir(parents=True)
        with TrialCheckpointer() as ckpt:
            ckpt.save(directory, state, [readings], {"trial_id": trial_id, "epoch": 1})
        cell, _, rep = trial_id.rpartition("-r")
        tables.upsert_trial(
            trial_id,
            run=run.name,
            cell=cell,
            repetition=int(rep),
            status="TERMINATED",
            **config_columns(config),
        )
        tables.upsert_epochs(trial_id, [{k: v for k, v in readings.items() if not isinstance(v, list)}])
        written[trial_id] = readings
    tables.flush()
    return written


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    return run, _write_run(run)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("readings-")
    }


def test_own_settings_reproduce_the_runs_readings_exactly(tiny_run):
    run, written = tiny_run
    out, n = rv.reevaluate(str(run), {}, "own", log=lambda s: None)
    assert n == 2 and out.endswith(f"results/{readings_file('own')}")
    got = pd.read_parquet(out).set_index("trial_id")
    for trial_id, readings in written.items():
        assert int(got.loc[trial_id, "epoch"]) == 1
        for name in READINGS:
            assert math.isfinite(readings[name]), name
            assert got.loc[trial_id, name] == readings[name], (trial_id, name)  # bit for bit
    assert rv.reevaluate(str(run), {}, "own", log=lambda s: None)[1] == 0  # done trials are skipped


def test_unfinished_trials_are_skipped(tiny_run, tmp_path):
    import shutil

    from sweep.results import ResultsTables

    run, _ = tiny_run
    copy = tmp_path / "tiny"
    shutil.copytree(run, copy)
    tables = ResultsTables(str(copy / "results"))
    tables.upsert_trial("vanilla-r1", status="RUNNING")
    tables.flush()
    lines = []
    out, n = rv.reevaluate(str(copy), {"val_ll_temps": 9}, "t9", readings=("val_ll",), log=lines.append)
    assert n == 1 and pd.read_parquet(out)["trial_id"].tolist() == ["vanilla-r0"]
    assert any("vanilla-r1: RUNNING, not finished" in line for line in lines)


def test_another_setting_changes_only_the_readings(tiny_run):
    run, written = tiny_run
    before = _digest(run)
    out, _ = rv.reevaluate(
        str(run), {"val_ll_temps": 9}, "t9", readings=("val_ll",), select=["vanilla-r0"], log=lambda s: None
    )
    assert _digest(run) == before  # checkpoints and the run's own tables untouched
    got = pd.read_parquet(out)
    assert list(got["trial_id"]) == ["vanilla-r0"]  # --trials
    assert int(got["val_ll_temps"].iloc[0]) == 9 and int(got["val_ll_chains"].iloc[0]) == 2
    assert json.loads(got["settings_json"].iloc[0])["set"] == {"val_ll_temps": 9}
    assert got["val_ll"].iloc[0] != written["vanilla-r0"]["val_ll"]
    assert not {"grad_noise_gen", "kid_rbf_nmax"} & set(got.columns)  # only what was asked
    # another draw of the same setting: independent chains, a different number
    other, _ = rv.reevaluate(
        str(run), {"val_ll_temps": 9}, "t9d1", readings=("val_ll",), select=["vanilla-r0"], draw=1, log=print
    )
    assert pd.read_parquet(other)["val_ll"].iloc[0] != got["val_ll"].iloc[0]


def test_analysis_reads_the_reevaluated_readings_in_place_of_the_runs(tiny_run):
    from analysis import load
    from analysis.readings import paired_differences
    from analysis.summary import final_readings

    run, _ = tiny_run
    rv.reevaluate(str(run), {"val_ll_temps": 9}, "t9", readings=("val_ll",), select=["vanilla-r0"], log=print)
    plain = final_readings(load(run))
    results = load(run, readings="t9")
    final = final_readings(results).set_index("trial_id")
    taken = pd.read_parquet(run / "results" / readings_file("t9")).set_index("trial_id")
    assert final.loc["vanilla-r0", "val_ll"] == taken.loc["vanilla-r0", "val_ll"]
    assert math.isnan(final.loc["vanilla-r1", "val_ll"])  # not re-evaluated: no reading at other settings
    assert (final["grad_noise_gen"] == plain.set_index("trial_id")["grad_noise_gen"]).all()  # untouched
    assert results.readings["tag"].tolist() == ["t9"] and "val_ll" in results.readings["columns"].iloc[0]
    paired = paired_differences(
        final.reset_index().assign(cell=["a", "b"], repetition=0), readings=("val_ll",)
    )
    assert paired.empty  # the trial without a re-evaluated reading pairs with nothing
    with pytest.raises(FileNotFoundError, match="sweep.reevaluate"):
        load(run, readings="nope")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--set", "posterior_steps=3"], "would change training"),
        (["--set", "no_such_field=3"], "would change training"),
        (["--set", "val_ll_temps=many"], "not an integer"),
        (["--tag", "../x"], "--tag"),
        (["--only", "val_ll,loss"], "--only"),
        (["--trials", "thermo-p9"], "no such trial id or cell"),
        (["--draw", "-1"], "--draw"),
    ],
)
def test_refusals_are_one_line_with_exit_code_2(tiny_run, capsys, args, says):
    run, _ = tiny_run
    argv = [str(run), *args] + ([] if "--tag" in args else ["--tag", "x"])
    assert rv.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err


def test_other_settings_under_a_used_tag_are_refused(tiny_run, capsys):
    run, _ = tiny_run
    rv.reevaluate(str(run), {}, "own", log=lambda s: None)
    assert rv.main([str(run), "--tag", "own", "--set", "val_ll_temps=7", "--only", "val_ll"]) == 2
    assert "pick another --tag" in capsys.readouterr().err
    assert rv.main([str(run / "missing"), "--tag", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_run_on_s3_is_reevaluated_in_place(tiny_run, s3_server, monkeypatch):
    import pyarrow.fs as pafs

    run, written = tiny_run
    uri = s3_server.uri("tiny")
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(run), path, destination_filesystem=fs)
    monkeypatch.setattr(rv, "_cpu_environment", lambda: None)  # JAX is already up in this process
    assert rv.main([uri, "--tag", "s3", "--only", "val_ll", "--trials", "vanilla-r1"]) == 0
    got = pd.read_parquet(f"{path}/results/{readings_file('s3')}", filesystem=fs)
    assert got["val_ll"].tolist() == [written["vanilla-r1"]["val_ll"]]
