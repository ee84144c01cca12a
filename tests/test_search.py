"""`python -m sweep.search` on local Ray with a tiny model: a 4-trial search whose study and Parquet rows
agree, kill-and-resume up to the requested total, and bad arguments refused before Ray starts."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from _procs import descendants, kill_all
from test_pareto import brute_force

from sweep.search import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "z_dim": 4,
    "ebm_width": 8,
    "gen_width": 1,
    "prior_steps": 2,
    "posterior_steps": 2,
    "num_temps": 3,
    "num_train": 64,
    "num_val": 48,
    "batch_size": 16,
    "eval_every": 1,
    "eval_num_min": 16,
    "eval_num_max": 48,
    "eval_num_points": 3,
    "sample_every": 0,
    "val_ll_examples": 4,
    "val_ll_temps": 5,
    "val_ll_chains": 2,
    "val_ll_prior_chains": 8,
    "grad_noise_draws": 2,
}
TINY_SET = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One JAX compilation cache for the module: trials after the first reuse the compiled steps."""
    return str(tmp_path_factory.mktemp("jax-cache"))


def read(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        pd.read_parquet(run_dir / "results" / "trials.parquet"),
        pd.read_parquet(run_dir / "results" / "epochs.parquet"),
    )


def study_of(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir}/optuna.db")


def check_study_matches_parquet(run_dir: Path, name: str, complete: int) -> tuple[optuna.Study, pd.DataFrame]:
    """The study's COMPLETE trials and the Parquet rows tell the same story: same p/eta, same final KID."""
    study = study_of(run_dir, name)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == complete
    trials, epochs = read(run_dir)
    assert not trials.duplicated("trial_id").any() and not trials.duplicated("optuna_trial").any()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert (trials["search"] == name).all()
    rows = trials.set_index("optuna_trial")
    for t in done:
        row = rows.loc[t.number]
        assert row["status"] == "TERMINATED" and row["optuna_state"] == "COMPLETE" and pd.isna(row["error"])
        assert row["temp_power"] == t.params["p"] and row["kl_weight"] == t.params["eta"]
        assert row["objective"] == "thermo" and row["trial_id"] == f"optuna-{t.number:04d}"
        last = epochs[(epochs["trial_id"] == row["trial_id"]) & (epochs["epoch"] == row["epochs"])]
        assert len(last) == 1 and last["kid_rbf_inf"].iloc[0] == t.value
        assert row["final_kid_rbf_inf"] == t.value == row["search_value"]
        assert t.intermediate_values[int(row["epochs"])] == t.value
    return study, trials


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_four_trial_search(tmp_path: Path, cache: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--trials",
            "4",
            "--epochs",
            "2",
            "--max-concurrent",
            "2",
            "--storage",
            str(tmp_path),
            "--name",
            "tiny",
            "--study",
            "pe",
            "--compile-cache",
            cache,
            *TINY_SET,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "tiny"
    study, trials = check_study_matches_parquet(run_dir, "pe", complete=4)
    assert len(study.trials) == 4 and len(trials) == 4
    best = study.best_trial
    assert f"best: p = {best.params['p']:.4g}, eta = {best.params['eta']:.4g}" in out
    assert f"optuna-dashboard sqlite:///{run_dir}/optuna.db" in out
    for t in study.trials:  # the default space: p log-uniform [0.1, 10], eta uniform [0.5, 4]
        assert 0.1 <= t.params["p"] <= 10 and 0.5 <= t.params["eta"] <= 4
        assert t.distributions["p"].log and not t.distributions["eta"].log
    # Rerunning a finished search with --resume starts no trial and changes nothing.
    assert (
        main(
            [
                "--trials",
                "4",
                "--epochs",
                "2",
                "--storage",
                str(tmp_path),
                "--name",
                "tiny",
                "--resume",
                "--compile-cache",
                cache,
                *TINY_SET,
            ]
        )
        == 0
    )
    assert len(study_of(run_dir, "pe").trials) == 4


def _states(db: Path) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [s for (s,) in con.execute("SELECT state FROM trials")]
    except sqlite3.Error:
        return []


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_kill_and_resume_reaches_total(tmp_path: Path, cache: str) -> None:
    """SIGKILL the driver once a trial is COMPLETE and another RUNNING; --resume finishes 4 trials in total,
    the interrupted trial is FAIL in the study (its params enqueued again) and ERROR in Parquet."""
    args = [
        "--trials",
        "4",
        "--epochs",
        "1",
        "--max-concurrent",
        "2",
        "--storage",
        str(tmp_path),
        "--name",
        "killed",
        "--compile-cache",
        cache,
        *TINY_SET,
    ]
    run_dir = tmp_path / "killed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "sweep.search", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    started: list = []
    try:
        deadline = time.time() + 300
        while True:
            states = _states(run_dir / "optuna.db")
            if "COMPLETE" in states and "RUNNING" in states:
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no COMPLETE and RUNNING trial within 300 s"
            time.sleep(0.1)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(started + descendants(driver.pid))  # Ray's processes outlive a SIGKILLed driver
    before = study_of(run_dir, "killed")
    running = [t for t in before.trials if t.state == optuna.trial.TrialState.RUNNING]
    complete_before = {t.number for t in before.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert running and complete_before

    assert main([*args, "--resume"]) == 0
    study, trials = check_study_matches_parquet(run_dir, "killed", complete=4)
    assert complete_before <= {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    by_number = {t.number: t for t in study.trials}
    rows = trials.set_index("optuna_trial")
    for t in running:  # interrupted: FAIL in the study, its proposal retried by a later trial
        assert by_number[t.number].state == optuna.trial.TrialState.FAIL
        retries = [u for u in study.trials if u.user_attrs.get("retry_of") == t.number]
        if set(t.params) == {"p", "eta"}:  # killed after both suggestions: the same proposal runs again
            assert len(retries) == 1 and retries[0].params == t.params
        else:
            assert not retries
        if t.number in rows.index:
            assert rows.loc[t.number, "status"] == "ERROR"
            assert rows.loc[t.number, "error"].startswith("interrupted")
    assert len(study.trials) == 4 + len(running)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything starts Ray: a refused argument must be refused before that."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a bad argument"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    import ray

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert not ray.is_initialized()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--p", "5", "1"], "--p 5 1: LOW must be smaller than HIGH"),
        (["--p", "0", "10"], "--p 0 10: p must be > 0"),
        (["--eta", "2", "2"], "--eta 2 2: LOW must be smaller than HIGH"),
        (["--eta", "-1", "2"], "eta (the KL weight) must be >= 0"),
        (["--metric", "kid"], "invalid choice: 'kid'"),
        (["--set", "eval_every=0"], "--set eval_every=0 turns evaluation off"),
        (["--set", "temp_power=6"], "temp_power is what the search varies; give its range with --p"),
        (["--set", "objective=vanilla"], "drop --set objective"),
        (["--scheduler", "asha", "--set", "eval_every=2"], "ASHA compares trials on the metric every epoch"),
        (["--set", "nope=1"], "unknown config field"),
        (["--trials", "0"], "--trials 0: must be >= 1"),
        (["--resume"], "--resume: no search 'bad' under"),
        (["--storage", "s3://bucket/runs"], "pass --optuna-storage"),
        (["--metric", "val_ll", "--metric", "val_ll"], "--metric val_ll is given twice"),
        (["--repetitions", "0"], "--repetitions 0: must be >= 1"),
        (
            ["--metric", "kid_rbf_nmax", "--metric", "val_ll", "--scheduler", "asha"],
            "Optuna refuses intermediate values in a multi-objective study",
        ),
        (["--repetitions", "3", "--scheduler", "asha"], "while the search compares seed means"),
        (["--base", "digits-estimators:nope"], "grid 'digits-estimators' has no cell 'nope'; its cells:"),
        (["--base", "digits-estimators:vanilla-b32"], "that cell trains objective=vanilla"),
        (["--base", "no-such-grid:cell"], "--base no-such-grid:cell:"),
        (
            ["--enqueue", "p=20"],
            "--enqueue p=20: p=20 is outside the search space (temp_power in [0.1, 10] (log))",
        ),
        (["--enqueue", "p=1,nope=2"], "'nope=2' is not FIELD=VALUE with a searched field"),
        (["--enqueue", "kl_weight=x"], "kl_weight='x' is not a number"),
    ],
)
def test_bad_arguments_refused(
    argv: list[str],
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_ray: None,
) -> None:
    err = _refused(["--storage", str(tmp_path), "--name", "bad", *argv], capsys)
    assert needle in err


def test_study_with_another_space_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    """An existing study searched p over [0.1, 10]; asking for [0.5, 20] (or another metric, or running it
    again without --resume) is refused with the study's own range as the fix."""
    url = f"sqlite:///{tmp_path}/shared.db"
    study = optuna.create_study(study_name="pe", storage=url, direction="minimize")
    space = {
        "p": optuna.distributions.FloatDistribution(0.1, 10, log=True),
        "eta": optuna.distributions.FloatDistribution(0.5, 4),
    }
    study.add_trial(optuna.trial.create_trial(params={"p": 1.0, "eta": 1.0}, distributions=space, value=0.5))
    common = ["--storage", str(tmp_path), "--name", "r", "--study", "pe", "--optuna-storage", url]
    err = _refused([*common, "--p", "0.5", "20"], capsys)
    assert "searches --p 0.1 10 (log) but this command asks for --p 0.5 20 (log)" in err
    assert "rerun with --p 0.1 10" in err
    err = _refused([*common, "--eta", "0.5", "3"], capsys)
    assert "--eta 0.5 4" in err and "--eta 0.5 3" in err
    study.set_user_attr("metric", "fid_inf")
    err = _refused(common, capsys)
    assert "minimises fid_inf, not kid_rbf_inf" in err and "--metric fid_inf" in err
    err = _refused([*common, "--metric", "fid_inf"], capsys)
    assert "already has 1 trials; continue it with --resume" in err
    err = _refused([*common, "--metric", "val_ll"], capsys)  # a log-likelihood is maximised
    assert "minimises its objective; this search maximises val_ll" in err


def test_a_maximised_metric_ranks_the_largest_value_first() -> None:
    from sweep.study import format_top

    study = optuna.create_study(direction="maximize")
    space = {
        "p": optuna.distributions.FloatDistribution(0.1, 10, log=True),
        "eta": optuna.distributions.FloatDistribution(0.5, 4),
    }
    for p, value in ((1.0, -250.0), (2.0, -180.0), (3.0, -300.0)):
        study.add_trial(
            optuna.trial.create_trial(params={"p": p, "eta": 1.0}, distributions=space, value=value)
        )
    assert format_top(study, "val_ll").startswith("best: p = 2, eta = 1, val_ll = -180")


def test_searcher_tells_optuna_the_final_epoch_rule(tmp_path: Path) -> None:
    """Without Ray: each proposal becomes a grid-like trial config, and a trial is COMPLETE with the metric
    at its last epoch, PRUNED when stopped earlier (ASHA), FAIL when it errored or ended without a finite
    metric (reason in the trial's user attrs, which the Parquet `error` column takes)."""
    from sweep.optuna_search import base_config, searcher_class
    from sweep.study import search_space
    from sweep.trainable import resolve_trial

    config = base_config("digits", [f"{k}={v}" for k, v in TINY.items()], epochs=2, scheduler="none")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/unit.db")
    searcher = searcher_class()(
        space=search_space((0.1, 10), (0.5, 4)),
        metric="kid_rbf_inf",
        mode="min",
        sampler=optuna.samplers.TPESampler(seed=0),
        study_name="unit",
        storage=storage,
        experiment=config.to_dict(),
    )
    configs = {name: searcher.suggest(name) for name in ("done", "stopped", "nan", "crashed", "diverged")}
    for number, tune_config in enumerate(configs.values()):
        cfg, meta = resolve_trial(tune_config)
        assert (cfg.temp_power, cfg.kl_weight) == (tune_config["p"], tune_config["eta"])
        assert cfg.objective == "thermo" and cfg.eval_every == 1 and cfg.epochs == 2
        assert meta["trial_id"] == f"optuna-{number:04d}"
        assert meta["columns"] == {"search": "unit", "optuna_trial": number}
    # As Tune calls it: a result that stops the trial (last epoch, or ASHA's STOP) reaches only
    # on_trial_complete; without a scheduler the last result may come through both.
    searcher.on_trial_result("done", {"epoch": 1, "kid_rbf_inf": 0.5})
    searcher.on_trial_result("done", {"epoch": 2, "kid_rbf_inf": 0.25})
    searcher.on_trial_complete("done", {"epoch": 2, "kid_rbf_inf": 0.25})
    searcher.on_trial_complete("stopped", {"epoch": 1, "kid_rbf_inf": 0.75})
    searcher.on_trial_complete("nan", {"epoch": 2, "kid_rbf_inf": float("nan")})
    searcher.on_trial_complete("crashed", None, error=True)
    searcher.on_trial_result("diverged", {"epoch": 0, "error": "DivergenceError: nan"})  # no metric: ignored
    searcher.on_trial_complete("diverged", {"epoch": 0, "error": "DivergenceError: nan"}, error=True)
    trials = optuna.load_study(study_name="unit", storage=storage).trials
    state = optuna.trial.TrialState
    assert [t.state for t in trials] == [state.COMPLETE, state.PRUNED, state.FAIL, state.FAIL, state.FAIL]
    assert trials[0].value == 0.25 and trials[0].intermediate_values == {1: 0.5, 2: 0.25}
    assert trials[1].intermediate_values == {1: 0.75}
    assert "kid_rbf_inf is nan at the last epoch 2" in trials[2].user_attrs["fail_reason"]
    assert "ERROR" in trials[3].user_attrs["fail_reason"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_diverged_trial_is_failed_in_study_with_reason_in_parquet(tmp_path: Path, cache: str) -> None:
    """A trial whose loss goes NaN: FAIL in the study, ERROR with the DivergenceError in Parquet."""
    code = main(
        [
            "--trials",
            "1",
            "--epochs",
            "1",
            "--storage",
            str(tmp_path),
            "--name",
            "boom",
            "--max-failures",
            "0",
            "--compile-cache",
            cache,
            *TINY_SET,
            "--set",
            "posterior_step_size=1e20",
        ]
    )
    assert code == 0  # the search finished its one trial, which failed
    (trial,) = study_of(tmp_path / "boom", "boom").trials
    assert trial.state == optuna.trial.TrialState.FAIL
    trials, epochs = read(tmp_path / "boom")
    row = trials.iloc[0]
    assert row["status"] == "ERROR" and row["optuna_state"] == "FAIL" and row["optuna_trial"] == 0
    assert row["error"].startswith("DivergenceError: ") and pd.isna(row["search_value"])
    assert len(epochs) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_asha_reports_every_epoch_and_prunes_as_pruned(tmp_path: Path, cache: str) -> None:
    """With ASHA every epoch is evaluated and reported; a trial ASHA stops early is PRUNED (not COMPLETE with
    an early value), one that runs to the end is COMPLETE with its last-epoch metric."""
    tiny = [a for k, v in TINY.items() if k != "eval_every" for a in ("--set", f"{k}={v}")]  # asha sets it
    assert (
        main(
            [
                "--trials",
                "3",
                "--epochs",
                "2",
                "--scheduler",
                "asha",
                "--storage",
                str(tmp_path),
                "--name",
                "asha",
                "--compile-cache",
                cache,
                *tiny,
            ]
        )
        == 0
    )
    study = study_of(tmp_path / "asha", "asha")
    trials, epochs = read(tmp_path / "asha")
    assert len(trials) == 3 and not epochs["kid_rbf_inf"].isna().any()
    state = optuna.trial.TrialState
    assert {t.state for t in study.trials} <= {state.COMPLETE, state.PRUNED}
    assert state.COMPLETE in {t.state for t in study.trials}  # the first to reach a rung is never stopped
    rows = trials.set_index("optuna_trial")
    for t in study.trials:
        row = rows.loc[t.number]
        mine = epochs[epochs["trial_id"] == row["trial_id"]].set_index("epoch")["kid_rbf_inf"]
        assert t.intermediate_values == mine.to_dict() and row["optuna_state"] == t.state.name
        if t.state == state.COMPLETE:
            assert row["epochs_completed"] == 2 and t.value == mine[2] == row["search_value"]
        else:
            assert row["epochs_completed"] < 2 and pd.isna(row["search_value"]) and pd.isna(row["error"])


# ------------------------------------------------------------------ seeds per proposal, several objectives


def _unit_searcher(tmp_path: Path, **kwargs):
    from sweep.optuna_search import base_config, searcher_class
    from sweep.study import search_space

    config = base_config("digits", [f"{k}={v}" for k, v in TINY.items()], epochs=2, scheduler="none")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/unit.db")
    kwargs.setdefault("space", search_space((0.1, 10), (0.5, 4)))
    kwargs.setdefault("metric", "kid_rbf_inf")
    kwargs.setdefault("mode", "min")
    searcher = searcher_class()(
        sampler=optuna.samplers.TPESampler(seed=0),
        study_name="unit",
        storage=storage,
        experiment=config.to_dict(),
        **kwargs,
    )
    return searcher, config, lambda: optuna.load_study(study_name="unit", storage=storage).trials


def test_each_proposal_trains_the_grid_seeds_and_optuna_is_told_their_mean(tmp_path: Path) -> None:
    """R = 3: every proposal is three trials with the same parameters and seeds base + 0, 1, 2 (a grid's
    repetitions' seeds), trial ids optuna-NNNN-sR; Optuna hears one value per proposal, the mean of the
    seeds' last-epoch metric, with the seeds, their values and the standard error in user attrs; a
    seed's failure fails the proposal (its seeds not yet started are dropped); after `proposals`
    proposals the searcher ends the experiment."""
    from ray.tune.search import Searcher

    from sweep.trainable import resolve_trial

    searcher, config, trials = _unit_searcher(tmp_path, repetitions=3, proposals=2)
    tune_ids = [f"t{i}" for i in range(4)]
    configs = {t: searcher.suggest(t) for t in tune_ids}
    seen = []
    for tune_config in configs.values():
        cfg, meta = resolve_trial(tune_config)
        seen.append((tune_config["optuna_trial"], cfg.seed, meta["trial_id"], cfg.temp_power, cfg.kl_weight))
    assert [s[:3] for s in seen] == [
        (0, config.seed, "optuna-0000-s0"),
        (0, config.seed + 1, "optuna-0000-s1"),
        (0, config.seed + 2, "optuna-0000-s2"),
        (1, config.seed, "optuna-0001-s0"),
    ]
    assert len({s[3:] for s in seen[:3]}) == 1 and seen[3][3:] != seen[0][3:]
    for t, kid in zip(tune_ids[:3], (0.30, 0.20, 0.40), strict=True):
        assert trials()[0].state == optuna.trial.TrialState.RUNNING  # not told before its last seed
        searcher.on_trial_complete(t, {"epoch": 2, "kid_rbf_inf": kid})
    done = trials()[0]
    assert done.state == optuna.trial.TrialState.COMPLETE and done.value == pytest.approx(0.3)
    assert done.user_attrs["seeds"] == [config.seed, config.seed + 1, config.seed + 2]
    assert done.user_attrs["seed_values"] == {"kid_rbf_inf": [0.30, 0.20, 0.40]}
    assert done.user_attrs["standard_errors"]["kid_rbf_inf"] == pytest.approx(0.1 / 3**0.5)
    assert done.intermediate_values == {}  # one seed's value is not the proposal's
    searcher.on_trial_complete("t3", None, error=True)  # proposal 1's first seed crashed
    failed = trials()[1]
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs["fail_reason"].startswith(
        "seed 0:"
    )
    # Its seeds 1 and 2 were dropped, and two proposals were asked: the experiment ends.
    assert searcher.suggest("t4") == Searcher.FINISHED


def test_a_proposal_the_config_refuses_is_a_fail_with_its_message(tmp_path: Path) -> None:
    """A space whose combination the config refuses (ti_rule=variance needs two chains per example): the
    proposal is told FAIL at once with the config's message, counts as a proposal, and no trial runs."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from ray.tune.search import Searcher

    space = {"p": FloatDistribution(0.1, 10, log=True), "ti_rule": CategoricalDistribution(["variance"])}
    searcher, _, trials = _unit_searcher(tmp_path, space=space, proposals=1)
    assert searcher.suggest("t0") == Searcher.FINISHED
    (t,) = trials()
    assert t.state == optuna.trial.TrialState.FAIL
    assert "config refused: chains_per_example=1" in t.user_attrs["fail_reason"]


def test_two_objectives_tell_both_means_and_the_front_is_the_non_dominated_set(tmp_path: Path) -> None:
    from sweep.study import format_front

    searcher, _, trials = _unit_searcher(
        tmp_path, metric=["kid_rbf_nmax", "val_ll"], mode=["min", "max"], repetitions=2, proposals=4
    )
    # (kid, val_ll) per seed; proposal means: A (0.2, -100), B (0.1, -120), C (0.3, -90), D (0.25, -110)
    readings = [((0.1, -90), (0.3, -110)), ((0.1, -110), (0.1, -130)), ((0.3, -80), (0.3, -100))]
    readings.append(((0.2, -100), (0.3, -120)))
    for number, pair in enumerate(readings):
        for rep, (kid, ll) in enumerate(pair):
            tune_id = f"{number}-{rep}"
            searcher.suggest(tune_id)
            searcher.on_trial_complete(tune_id, {"epoch": 2, "kid_rbf_nmax": kid, "val_ll": ll})
    told = [v for t in trials() for v in t.values]
    assert told == pytest.approx([0.2, -100, 0.1, -120, 0.3, -90, 0.25, -110])
    study = optuna.load_study(study_name="unit", storage=f"sqlite:///{tmp_path}/unit.db")
    text = format_front(study, ["kid_rbf_nmax", "val_ll"])
    assert "Pareto front (3 of 4 complete proposals; kid_rbf_nmax min, val_ll max)" in text
    listed = {int(line.split()[0]) for line in text.splitlines()[2:]}
    assert listed == {0, 1, 2}  # D is beaten by A in both
    assert "0.2 +- 0.1" in text and "-100 +- 10" in text  # mean +- SE over the two seeds


def test_a_grid_cell_as_the_base_is_that_cells_model() -> None:
    """--base GRID:CELL trains the cell's model (the grid's base and the cell's values), thermo, with the
    search's own --epochs on top; the search then varies its p and eta."""
    from sweep.grid_file import expand, load_grid
    from sweep.optuna_search import base_config

    (plan,) = [p for p in expand(load_grid("digits-estimators"), repetitions=1) if p.cell == "thermo-p1-ml"]
    config = base_config("digits-estimators:thermo-p1-ml", [], epochs=None, scheduler="none")
    assert config == plan.config
    shorter = base_config("digits-estimators:thermo-p1-ml", ["ebm_lr=0.001"], epochs=2, scheduler="none")
    assert (shorter.epochs, shorter.ebm_lr, shorter.ebm_gradient) == (2, 0.001, "ml")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_two_objective_search_with_paired_seeds(
    tmp_path: Path, cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three proposals x two seeds, minimising KID and maximising val_ll: every proposal trains seeds base
    and base + 1; the study holds, per proposal, the mean of its seeds' Parquet readings (read back from
    the study) and their standard error; the Parquet columns search_value_<metric> match; the printed
    Pareto front is the non-dominated set the test computes from the Parquet rows."""
    code = main(
        [
            "--trials",
            "3",
            "--epochs",
            "1",
            "--repetitions",
            "2",
            "--metric",
            "kid_rbf_nmax",
            "--metric",
            "val_ll",
            "--enqueue",
            "temp_power=1,eta=1",  # a reference proposal, evaluated first
            "--max-concurrent",
            "2",
            "--storage",
            str(tmp_path),
            "--name",
            "two",
            "--compile-cache",
            cache,
            *TINY_SET,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    trials, epochs = read(tmp_path / "two")
    last = epochs[epochs["epoch"] == 1].set_index("trial_id")
    study = study_of(tmp_path / "two", "two")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert len(study.trials) == 3 and len(trials) == 6
    assert study.trials[0].params == {"p": 1.0, "eta": 1.0} and study.trials[0].user_attrs["enqueued"]
    seed = int(trials["seed"].min())
    points = {}
    for t in study.trials:
        mine = trials[trials["optuna_trial"] == t.number].sort_values("repetition")
        assert mine["trial_id"].tolist() == [f"optuna-{t.number:04d}-s0", f"optuna-{t.number:04d}-s1"]
        assert mine["seed"].tolist() == [seed, seed + 1]  # the same seeds for every proposal
        assert (mine["temp_power"] == t.params["p"]).all() and (mine["kl_weight"] == t.params["eta"]).all()
        assert t.state == optuna.trial.TrialState.COMPLETE
        for i, metric in enumerate(("kid_rbf_nmax", "val_ll")):
            finals = last.loc[mine["trial_id"], metric].to_numpy()
            assert t.values[i] == pytest.approx(finals.mean(), rel=1e-12)
            assert t.user_attrs["seed_values"][metric] == pytest.approx(finals.tolist(), rel=1e-12)
            assert t.user_attrs["standard_errors"][metric] == pytest.approx(finals.std(ddof=1) / 2**0.5)
            assert (mine[f"search_value_{metric}"] == t.values[i]).all()
            assert mine[f"search_se_{metric}"].to_numpy() == pytest.approx([finals.std(ddof=1) / 2**0.5] * 2)
        assert "search_value" not in trials.columns
        first = mine.iloc[0]
        points[t.number] = (first["search_value_kid_rbf_nmax"], first["search_value_val_ll"])
    block = out[out.index("Pareto front") :].splitlines()
    printed = set()
    for line in block[2:]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        printed.add(int(line.split()[0]))
    numbers = sorted(points)
    front = brute_force(np.array([points[n] for n in numbers]), ("minimize", "maximize"))
    assert printed == {numbers[i] for i in front}


# -------------------------------------------------------------------------------------- any config field


def _space_file(tmp_path: Path, space: dict) -> str:
    import json

    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


CATEGORICAL = {
    "temp_power": {"low": 0.3, "high": 3, "log": True},
    "ebm_gradient": {"choices": ["none", "ml"]},
    "gen_gradient": {"choices": ["ti", "ml"]},
}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--p", "1", "2"], "--p with --space"),
        (["--set", "ebm_gradient=ml"], "ebm_gradient is searched by the space file"),
        (["--enqueue", "ebm_gradient=chains"], "ebm_gradient=chains is outside the search space"),
    ],
)
def test_space_file_conflicts_refused(
    extra: list[str],
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_ray: None,
) -> None:
    space = _space_file(tmp_path, CATEGORICAL)
    err = _refused(["--storage", str(tmp_path), "--name", "bad", "--space", space, *extra], capsys)
    last = err.strip().splitlines()[-1]  # the usage, then one line
    assert last.startswith("python -m sweep.search: error: ") and needle in last and "Traceback" not in err


def test_space_file_dry_run_plans_the_most_expensive_corner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run with a space over num_temps plans the corner with the most temperatures (a thermo step
    costs more with more of them), and --set on a field the space does not search is accepted."""
    from model.config import get_preset
    from model.plan import cost

    space = _space_file(tmp_path, {"num_temps": {"low": 5, "high": 30, "type": "int"}})
    argv = ["--base", "celeba", "--dry-run", "--storage", str(tmp_path), "--space", space]
    assert main([*argv, "--set", "temp_power=2"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("celeba-thermo "))
    worst = cost.step_flops(get_preset("celeba", objective="thermo", num_temps=30, temp_power=2.0))
    cheap = cost.step_flops(get_preset("celeba", objective="thermo", num_temps=5, temp_power=2.0))
    assert float(row.split()[1]) == pytest.approx(worst / 1e12, abs=1e-3) and worst > cheap


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_search_over_categorical_fields(
    tmp_path: Path, cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A space file over p and the two gradient estimators: each proposal's Parquet row trains exactly the
    fields the study drew (read back from the study); a resumed search with another space is refused."""
    space = _space_file(tmp_path, CATEGORICAL)
    argv = ["--trials", "3", "--epochs", "1", "--storage", str(tmp_path), "--name", "cat"]
    argv += ["--space", space, "--compile-cache", cache, "--max-concurrent", "2", *TINY_SET]
    assert main(argv) == 0
    study = study_of(tmp_path / "cat", "cat")
    trials, _ = read(tmp_path / "cat")
    assert len(trials) == 3
    rows = trials.set_index("optuna_trial")
    for t in study.trials:
        assert set(t.params) == {"temp_power", "ebm_gradient", "gen_gradient"}
        assert t.state == optuna.trial.TrialState.COMPLETE
        row = rows.loc[t.number]
        assert row["temp_power"] == t.params["temp_power"]
        assert (row["ebm_gradient"], row["gen_gradient"]) == (
            t.params["ebm_gradient"],
            t.params["gen_gradient"],
        )
    capsys.readouterr()
    other = _space_file(tmp_path, {**CATEGORICAL, "ebm_gradient": {"choices": ["none", "chains"]}})
    argv[argv.index(space)] = other
    with pytest.raises(SystemExit):
        main([*argv, "--resume"])
    assert "searches ebm_gradient in {none, ml} but this command asks for ebm_gradient in {none, chains}" in (
        capsys.readouterr().err
    )


def test_a_study_with_other_objectives_or_seeds_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    """A two-objective study with three seeds per proposal resumes only with the same metrics, in the
    same order, and the same --repetitions; each refusal names the flags that continue it."""
    url = f"sqlite:///{tmp_path}/shared.db"
    study = optuna.create_study(study_name="mo", storage=url, directions=["minimize", "maximize"])
    study.set_user_attr("metrics", ["kid_rbf_nmax", "val_ll"])
    study.set_user_attr("repetitions", 3)
    common = ["--storage", str(tmp_path), "--name", "r", "--study", "mo", "--optuna-storage", url]
    two = ["--metric", "kid_rbf_nmax", "--metric", "val_ll"]
    err = _refused([*common, "--metric", "kid_rbf_nmax"], capsys)
    assert (
        "has 2 objective(s), this search 1" in err
        and "rerun with --metric kid_rbf_nmax --metric val_ll" in err
    )
    err = _refused([*common, "--metric", "val_ll", "--metric", "kid_rbf_nmax"], capsys)
    assert "minimises the objective in val_ll's place; this search maximises val_ll" in err
    err = _refused([*common, "--metric", "kid_rbf_inf", "--metric", "val_ll"], capsys)
    assert "minimises kid_rbf_nmax and maximises val_ll, not kid_rbf_inf, val_ll; rerun with --metric" in err
    err = _refused([*common, *two], capsys)
    assert "trains 3 seed(s) per proposal, this search 1; rerun with --repetitions 3" in err
    from sweep.study import check_study, search_space

    metrics = ["kid_rbf_nmax", "val_ll"]  # the same objectives and seeds: the study is the one asked for
    check_study(study, search_space((0.1, 10), (0.5, 4)), metrics, url, maximise=[False, True], repetitions=3)


def test_a_failed_proposals_good_seed_keeps_its_row_clean(tmp_path: Path) -> None:
    """R = 2, seed 1 diverged: the proposal is FAIL in the study; seed 1's row keeps its own error, and
    seed 0, which trained to its last epoch, gets no error (analysis drops rows with one as failed)."""
    from sweep.results import ResultsTables
    from sweep.study import sync_results

    study = optuna.create_study(study_name="f", storage=f"sqlite:///{tmp_path}/f.db")
    study.set_user_attr("metric", "kid_rbf_inf")
    study.set_user_attr("repetitions", 2)
    trial = study.ask({"p": optuna.distributions.FloatDistribution(0.1, 10, log=True)})
    trial.set_user_attr("fail_reason", "seed 1: the Ray Tune trial ended in ERROR")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    tables = ResultsTables(str(tmp_path / "run" / "results"))
    common = {"search": "f", "optuna_trial": 0}
    tables.upsert_trial("optuna-0000-s0", status="TERMINATED", **common)
    tables.upsert_trial("optuna-0000-s1", status="ERROR", error="DivergenceError: nan", **common)
    sync_results(tables, study, str(tmp_path / "run"))
    rows = pd.read_parquet(tmp_path / "run" / "results" / "trials.parquet").set_index("trial_id")
    assert (
        pd.isna(rows.loc["optuna-0000-s0", "error"]) and rows.loc["optuna-0000-s0", "optuna_state"] == "FAIL"
    )
    assert rows.loc["optuna-0000-s1", "error"] == "DivergenceError: nan"
    assert rows["search_value"].isna().all() and rows["search_se"].dtype == float
