"""Preemption without Ray running: a lost node does not use up --max-failures, mid-epoch checkpoints
round-trip exactly through the trial's checkpoint directory, and their results (no epoch readings) are
passed by every consumer of results: the Parquet callback, the searcher, the progress table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import optuna
import pytest
from ray.exceptions import ActorUnavailableError, RayActorError

from sweep.partial import PARTIAL_KEY, epoch_view, is_epoch_result, partial_result

NODE_LOST = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\n"
    "The actor died because its node has died. Node Id: 4f2e"
)
PROCESS_DIED = "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"


def test_a_lost_node_is_told_apart_from_a_crash() -> None:
    from sweep.failures import is_node_loss

    assert is_node_loss(RayActorError(error_msg=NODE_LOST))
    # what the driver sees first when a node dies: its connection to the trial broke
    assert is_node_loss(ActorUnavailableError("RpcError: Socket closed rpc_code: 14", None))
    assert is_node_loss(RayActorError(error_msg="anything", preempted=True))
    assert not is_node_loss(RayActorError(error_msg=PROCESS_DIED))
    assert not is_node_loss(OSError("its node has died"))  # only Ray's actor errors


def test_a_lost_node_does_not_count_against_max_failures() -> None:
    """With --max-failures 0 a trial whose node died is still retried, and it keeps its budget for real
    crashes; a crash of its process counts as before. This pins the Ray 2.60 method the driver wraps."""
    from ray.tune.experiment.trial import Trial

    from sweep.failures import count_node_losses_apart

    count_node_losses_apart()
    count_node_losses_apart()  # idempotent
    trial = Trial("__fake", stub=True, max_failures=0)
    for err in (RayActorError(error_msg=NODE_LOST), ActorUnavailableError("Socket closed", None)) * 2:
        trial._handle_ray_actor_error(err)
        assert trial.num_failures == 0 and trial.should_recover()
    trial._handle_ray_actor_error(RayActorError(error_msg=PROCESS_DIED))
    assert trial.num_failures == 1 and not trial.should_recover()


def test_partial_results_carry_no_readings_and_are_not_epochs() -> None:
    static = {"devices": 1, "node": "n1"}
    result = partial_result(3, 17, static)
    assert result == {"devices": 1, "node": "n1", PARTIAL_KEY: 3, "partial_step": 17}
    assert not is_epoch_result(result) and not is_epoch_result(None)
    assert is_epoch_result({"epoch": 2, "train_loss": 0.5}) and is_epoch_result({"error": "x"})
    # the progress table shows the last epoch's numbers while a trial's last result is a partial one
    analysis = {"epoch": {"last": 2, "max": 2}, "train_loss": {"last": 0.5}}
    assert epoch_view(result, analysis) == {**result, "epoch": 2, "train_loss": 0.5}
    assert epoch_view({"epoch": 3}, analysis) == {"epoch": 3}


def test_the_progress_table_shows_epochs_not_partial_results() -> None:
    from sweep.partial import _EpochTrial

    class Fake:
        status = "RUNNING"
        last_result = partial_result(3, 5, {})
        metric_analysis = {"epoch": {"last": 2}, "train_loss": {"last": 0.25}}

        def __str__(self) -> str:
            return "cell-r0"

    view = _EpochTrial(Fake())
    assert str(view) == "cell-r0" and view.status == "RUNNING"
    assert view.last_result["epoch"] == 2 and view.last_result["train_loss"] == 0.25


def test_consumers_pass_partial_results_by(tmp_path: Path) -> None:
    """The Parquet callback writes no row and the searcher reports nothing to Optuna for a partial
    result; the epoch results around it are handled as before."""
    from model.config import get_preset
    from sweep.callback import ResultsCallback
    from sweep.optuna_search import base_config, searcher_class
    from sweep.study import search_space
    from sweep.trainable import resolve_trial, trial_spec

    config = base_config("digits", [], epochs=2, scheduler="none")
    searcher = searcher_class()(
        space=search_space((0.1, 10), (0.5, 4)),
        metric="kid_rbf_inf",
        mode="min",
        sampler=optuna.samplers.TPESampler(seed=0),
        study_name="unit",
        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/unit.db"),
        experiment=config.to_dict(),
    )
    searcher.suggest("t")
    searcher.on_trial_result("t", {"epoch": 1, "kid_rbf_inf": 0.5})
    searcher.on_trial_result("t", {**partial_result(2, 3, {}), "kid_rbf_inf": 0.1})  # never an epoch
    (trial,) = optuna.load_study(study_name="unit", storage=searcher._ot_study._storage).trials
    assert trial.intermediate_values == {1: 0.5}

    callback = ResultsCallback(str(tmp_path / "results"), "run", resolve_trial)

    @dataclasses.dataclass
    class FakeTrial:
        config: dict
        trial_id: str = "abc"
        checkpoint: object = None

    fake = FakeTrial({"trial": trial_spec(get_preset("digits"), trial_id="cell-r0")})
    callback.on_trial_result(0, [], fake, partial_result(1, 4, {"node": "n1"}))
    assert callback.tables.epochs == {} and "cell-r0" not in callback.tables.trials
    reading = '{"epoch": 1, "train_loss": 0.5}'
    callback.on_trial_result(0, [], fake, {"epoch": 1, "readings_json": reading})
    assert list(callback.tables.epochs) == [("cell-r0", 1)]


@pytest.mark.parametrize("objective", ["vanilla", "thermo"])
def test_a_mid_epoch_checkpoint_round_trips_exactly(tmp_path: Path, objective: str) -> None:
    """save_partial then restore gives back the PartialEpoch (state, step, statistics, elapsed time) bit
    for bit, and the older checkpoints' history and meta beside it."""
    from model import loop
    from model.config import get_preset
    from model.data import load_dataset
    from sweep.checkpoint import TrialCheckpointer, completed_epochs

    cfg = get_preset(
        "digits",
        objective=objective,
        num_train=48,
        num_val=16,
        batch_size=16,
        z_dim=4,
        ebm_width=8,
        gen_width=1,
        prior_steps=2,
        posterior_steps=2,
        num_temps=3,
        eval_every=0,
        sample_every=0,
    )
    partials: list[loop.PartialEpoch] = []
    devices = jax.local_devices()[:1]
    data = load_dataset(cfg)
    loop.train_epoch(
        cfg, loop.init_state(cfg), data, devices=devices, on_partial=partials.append, partial_every_s=0
    )
    partial = partials[-1]
    history = [{"epoch": 0.0}]
    with TrialCheckpointer() as ckpt:
        ckpt.save_partial(tmp_path, partial, history, {"trial_id": "t", "epoch": 0})
        state, got_history, meta = ckpt.restore(tmp_path, loop.init_state(cfg))
    assert isinstance(state, loop.PartialEpoch) and completed_epochs(state) == 0
    assert (state.done, state.elapsed_s) == (partial.done, partial.elapsed_s) == (2, partial.elapsed_s)
    assert got_history == history and meta["partial_step"] == 2 and meta["epoch"] == 0
    for a, b in zip(jax.tree.leaves(state.state), jax.tree.leaves(partial.state), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(state.stats) == 2
    for got, want in zip(state.stats, partial.stats, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], np.asarray(want[name]))
            assert got[name].dtype == np.asarray(want[name]).dtype
