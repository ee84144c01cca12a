"""The train step and epoch loop: learning-rate rule, gradient statistics, device invariance, compile
sharing between cells, divergence handling and the command line."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from model import loop, step, train
from model.config import get_preset
from model.data import Dataset, load_dataset


def tiny(**overrides):
    base = dict(
        num_train=64,
        num_val=32,
        batch_size=16,
        z_dim=4,
        ebm_width=8,
        gen_width=1,
        prior_steps=3,
        posterior_steps=3,
        num_temps=3,
        epochs=2,
        eval_every=0,
        sample_every=0,
    )
    return get_preset("digits", **(base | overrides))


@pytest.fixture(scope="module")
def digits_small():
    return load_dataset(tiny())


def test_learning_rates_follow_table3_rule():
    cfg = get_preset("celeba")
    assert step.learning_rates(cfg, 1) == pytest.approx((2e-5, 1e-4), rel=1e-6)
    assert step.learning_rates(cfg, 2) == pytest.approx((2e-5 * 0.975, 1e-4 * 0.975), rel=1e-6)
    # 0.975^49 = 0.289: both would fall below their final rates, which floor them
    assert step.learning_rates(cfg, 50) == pytest.approx((1e-5, 5e-5), rel=1e-6)
    assert step.learning_rates(cfg, 10) == pytest.approx((2e-5 * 0.975**9, 1e-4 * 0.975**9), rel=1e-6)


def test_gradient_statistics_are_over_all_entries_of_both_networks():
    ebm = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    gen = {"c": jnp.array([-1.0, 0.0, 5.0])}
    stats = step.gradient_statistics(ebm, gen)
    both = np.array([1.0, 2.0, 3.0, -1.0, 0.0, 5.0])
    assert float(stats["grad_mean"]) == pytest.approx(both.mean())
    assert float(stats["grad_var"]) == pytest.approx(both.var())
    assert float(stats["grad_var_ebm"]) == pytest.approx(np.var([1.0, 2.0, 3.0]))
    assert float(stats["grad_var_gen"]) == pytest.approx(np.var([-1.0, 0.0, 5.0]))


@pytest.mark.parametrize(
    "objective,estimator",
    [
        ("vanilla", {}),
        ("thermo", {}),
        ("thermo", dict(ti_rule="kl_example", chains_per_example=6, ebm_gradient="ml", gen_gradient="ti")),
    ],
)
def test_one_and_two_devices_give_the_same_epoch(objective, estimator, digits_small):
    devices = jax.local_devices()
    assert len(devices) >= 2, "tests/conftest.py forces two host devices"
    cfg = tiny(objective=objective, temp_power=2.0, kl_weight=1.5, **estimator)
    one, r1 = loop.train_epoch(cfg, loop.init_state(cfg), digits_small, devices=devices[:1])
    two, r2 = loop.train_epoch(cfg, loop.init_state(cfg), digits_small, devices=devices[:2])
    names = ["train_loss", "val_loss", "grad_mean", "grad_var", "grad_var_ebm", "grad_var_gen"]
    if objective == "thermo":
        names.append("kl_identity_error")
        if cfg.ti_rule == "kl_example":  # the moments are psum'd: one and two devices pool the same examples
            names.append("kl_identity_z")
            assert r1["kl_identity_split_z"] is None  # M = 6 < 12: no halves to split
        for name in ("ti_expected_loglik", "ti_kl_forward", "ti_kl_backward"):
            assert len(r1[name]) == cfg.num_temps - (name != "ti_expected_loglik")
            np.testing.assert_allclose(r1[name], r2[name], rtol=2e-4, atol=1e-6, err_msg=name)
    for name in names:
        assert r1[name] == pytest.approx(r2[name], rel=2e-4, abs=1e-7), name
    for a, b in zip(
        jax.tree.leaves((one.ebm_params, one.gen_params)),
        jax.tree.leaves((two.ebm_params, two.gen_params)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert r1["grad_var_ebm"] > 0 and r1["grad_var_gen"] > 0
    assert int(one.epoch) == 1 and int(one.step) == 64 // 16


def test_batch_not_divisible_by_devices_names_both_numbers(digits_small):
    cfg = tiny(batch_size=15)
    with pytest.raises(ValueError, match="batch_size 15 is not divisible by 2 devices"):
        loop.train_epoch(cfg, loop.init_state(cfg), digits_small, devices=jax.local_devices()[:2])


def test_diverged_run_stops_with_a_message(digits_small):
    cfg = tiny(posterior_step_size=1e12, prior_step_size=1e12)
    with pytest.raises(loop.DivergenceError, match="diverged"):
        loop.train_epoch(cfg, loop.init_state(cfg), digits_small, devices=jax.local_devices()[:1])


def test_cells_differing_in_p_eta_and_step_sizes_share_one_compiled_step(digits_small):
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = tiny(objective="thermo", seed=3, num_train=32, z_dim=5)  # a shape no other test uses
        data = Dataset("digits", digits_small.train[:32], digits_small.val[:16])
        loop.train_epoch(first, loop.init_state(first), data, devices=jax.local_devices()[:1])
        after_first = len(compiles)
        for p, eta, s in [(0.3, 2.0, 0.02), (6.0, 0.5, 0.005)]:
            cell = dataclasses.replace(
                first, temp_power=p, kl_weight=eta, posterior_step_size=s, prior_step_size=s * 10
            )
            loop.train_epoch(cell, loop.init_state(cell), data, devices=jax.local_devices()[:1])
        assert after_first > 0
        assert len(compiles) == after_first, "a cell differing only in traced values recompiled"
        changed = dataclasses.replace(first, num_temps=4)  # a shape change must compile anew
        loop.train_epoch(changed, loop.init_state(changed), data, devices=jax.local_devices()[:1])
        assert len(compiles) > after_first
    finally:
        jax.monitoring.clear_event_listeners()


def test_resumed_epochs_equal_uninterrupted_ones(digits_small):
    cfg = tiny(objective="thermo")
    devs = jax.local_devices()[:1]
    state = loop.init_state(cfg)
    state, _ = loop.train_epoch(cfg, state, digits_small, devices=devs)
    _, straight = loop.train_epoch(cfg, state, digits_small, devices=devs)
    # "resume": rebuild the state from host copies, as a checkpoint restore would
    restored = jax.tree.map(lambda x: x, jax.device_get(state))
    _, resumed = loop.train_epoch(cfg, restored, digits_small, devices=devs)
    for name in ("train_loss", "val_loss", "grad_var"):
        assert straight[name] == resumed[name]


def test_generate_images_shape_range_and_batching():
    cfg = tiny()
    state = loop.init_state(cfg)
    key = jax.random.key(0)
    images = loop.generate_images(cfg, state, key, 7, batch_size=3)
    assert images.shape == (7, 16, 16, 1) and images.dtype == np.float32
    assert np.all(np.abs(images) <= 1.0)
    again = loop.generate_images(cfg, state, key, 7, batch_size=3)
    np.testing.assert_array_equal(images, again)


def test_command_line_writes_the_epochs_table(tmp_path, capsys):
    args = ["--preset", "digits", "--epochs", "2", "--out", str(tmp_path)]
    overrides = dict(
        num_train=64,
        num_val=32,
        batch_size=16,
        z_dim=4,
        ebm_width=8,
        gen_width=1,
        prior_steps=2,
        posterior_steps=2,
        eval_every=0,
        objective="thermo",
        temp_power=6,
    )
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("epoch ") == 2 and "grad mean" in out
    table = pq.read_table(tmp_path / "epochs.parquet").to_pandas()
    assert len(table) == 2 and list(table["epoch"]) == [1, 2]
    for col in [
        "trial_id",
        "epoch",
        "train_loss",
        "val_loss",
        "grad_mean",
        "grad_var",
        "grad_var_ebm",
        "grad_var_gen",
        "kid_rbf_inf",
        "kid_poly_inf",
        "fid_inf",
        "epoch_time_s",
    ]:
        assert col in table.columns, col
    assert np.all(np.isfinite(table["grad_var"])) and table["kid_rbf_inf"].isna().all()
    assert table["ebm_gradient"].tolist() == ["chains", "chains"]  # recorded with every reading
    assert table["ti_rule"].tolist() == ["kl_batch", "kl_batch"]
    # the TI curve of every epoch: N_t temperatures, weights that sum to 1, E_i rising with t
    temps, weights, e = (
        np.asarray(table[c].iloc[-1]) for c in ("ti_temps", "ti_weights", "ti_expected_loglik")
    )
    np.testing.assert_allclose(temps, (np.arange(5) / 4) ** 6, rtol=1e-5)
    assert weights.sum() == pytest.approx(1.0) and len(e) == 5 and e[-1] > e[0]
    assert len(table["ti_kl_forward"].iloc[0]) == 4 and table["kl_identity_error"].notna().all()
    assert table["objective"].tolist() == ["thermo", "thermo"] and table["temp_power"].tolist() == [6.0, 6.0]


def test_command_line_refuses_bad_values(capsys):
    for args, needle in [
        (["--preset", "imagenet"], "unknown preset"),
        (["--set", "num_temps=1"], "num_temps=1"),
        (["--set", "temp_power=0"], "temp_power=0"),
        (["--set", "posterior_step_size=-0.1"], "posterior_step_size=-0.1"),
        (["--set", "dataset=mnist"], "dataset='mnist'"),
        (["--set", "tempo=3"], "unknown config field 'tempo'"),
        (["--set", "objective"], "not key=value"),
    ]:
        with pytest.raises(SystemExit) as exc:
            train.main(args)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err, needle


@pytest.mark.parametrize("objective", ["vanilla", "thermo"])
def test_a_partial_epoch_continues_bit_exactly(objective, digits_small):
    """Mid-epoch checkpoints (train_epoch's `on_partial`): continuing from any of them, as host copies
    the way a checkpoint restore would give them back, ends the epoch with the parameters, key, Adam
    states and readings of an uninterrupted epoch, bit for bit; taking them changes nothing either."""
    cfg = tiny(objective=objective)  # 64 images: 4 steps of 16
    devs = jax.local_devices()[:1]
    state, _ = loop.train_epoch(cfg, loop.init_state(cfg), digits_small, devices=devs)
    straight, r_straight = loop.train_epoch(cfg, state, digits_small, devices=devs)
    partials: list[loop.PartialEpoch] = []
    watched, r_watched = loop.train_epoch(
        cfg, state, digits_small, devices=devs, on_partial=partials.append, partial_every_s=0.0
    )
    assert [p.done for p in partials] == [1, 2, 3]  # after every step but the last
    assert all(int(p.state.epoch) == 1 and int(p.state.step) == 4 + p.done for p in partials)
    timing = {"epoch_time_s"}

    def same(a, b, ra, rb):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert {k: v for k, v in ra.items() if k not in timing} == {
            k: v for k, v in rb.items() if k not in timing
        }

    same(straight, watched, r_straight, r_watched)
    for partial in (partials[0], partials[2]):
        host = dataclasses.replace(
            partial,
            state=jax.device_get(partial.state),
            stats=[{k: np.array(v) for k, v in s.items()} for s in partial.stats],
        )
        resumed, r_resumed = loop.train_epoch(cfg, host, digits_small, devices=devs)
        same(straight, resumed, r_straight, r_resumed)


class _CountingTable(dict):
    """`model.nets.MEASURED_FASTEST_CONV` that counts its look-ups: one per resolution of conv_impl=auto."""

    calls = 0

    def get(self, *args):
        self.calls += 1
        return super().get(*args)


@pytest.fixture
def auto_resolutions(monkeypatch):
    """Count every resolution of conv_impl=auto and record the conv_impl of every config a step is built
    from (`StepSpec.from_config`: the state, the train, eval and generation steps, the readings)."""
    from model import nets

    table = _CountingTable(nets.MEASURED_FASTEST_CONV)
    monkeypatch.setattr(nets, "MEASURED_FASTEST_CONV", table)
    built = []
    from_config = step.StepSpec.from_config.__func__
    monkeypatch.setattr(
        step.StepSpec,
        "from_config",
        classmethod(lambda cls, c: built.append(c.conv_impl) or from_config(cls, c)),
    )
    return table, built


def test_model_train_resolves_auto_once_and_passes_the_concrete_config_down(tmp_path, auto_resolutions):
    table, built = auto_resolutions
    args = ["--preset", "digits", "--epochs", "1", "--out", str(tmp_path), "--progress-every-s", "0"]
    for k, v in dict(num_train=32, num_val=16, batch_size=16, z_dim=4, ebm_width=8, gen_width=1).items():
        args += ["--set", f"{k}={v}"]
    args += ["--set", "prior_steps=1", "--set", "posterior_steps=1", "--set", "eval_every=0"]
    assert train.main(args) == 0
    assert table.calls == 1  # model.train, for its devices; not again in the state, step or memory check
    assert built and set(built) == {"phases"}  # what docs/training.md promises on a CPU
    assert '"conv_impl": "auto"' in (tmp_path / "config.json").read_text()  # the config as given


def test_a_trial_resolves_auto_once_for_its_devices_and_records_it(monkeypatch, auto_resolutions):
    from ray import tune

    from sweep import trainable

    table, built = auto_resolutions
    reports = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(tune, "Checkpoint", types.SimpleNamespace(from_directory=str))  # no Ray session
    monkeypatch.setattr(trainable, "_node_id", lambda: None)  # asking Ray for it would start Ray
    config = tiny(epochs=1, num_train=32, num_val=16, prior_steps=1, posterior_steps=1)
    assert config.conv_impl == "auto"
    spec = trainable.trial_spec(config, trial_id="cell-r0")
    trainable._train_trial(
        {trainable.SPEC_KEY: spec},
        "cell-r0",
        samples_uri=None,
        gpus_per_trial=0,
        progress=trainable._progress_meter("cell-r0", None, 0),
    )
    assert table.calls == 1 and built and set(built) == {"phases"}
    assert [r["conv_impl"] for r in reports] == ["phases"]  # trials.parquet's column, as before
