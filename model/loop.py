"""The training loop: the train state, one epoch over the data, validation, generation, and `fit`.

The data order of an epoch is a function of (seed, epoch) and the chain noise follows the state's PRNG key,
so a run restored from a checkpoint continues with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model import streams
from model.config import ExperimentConfig, check_devices
from model.data import Dataset, load_dataset
from model.nets import network_modules
from model.objectives import Hyper
from model.plan.device_memory import check_step_fits, out_of_memory_as_advice
from model.readings import READING_NAMES, evaluation_readings
from model.step import (
    StepSpec,
    compiled_eval_step,
    compiled_generate,
    compiled_train_step,
    learning_rates,
    optimizers,
    replicate,
    unreplicate,
)
from model.thermo import identity_z, temperature_schedule, trapezoid_weights

METRIC_COLUMNS = ("kid_rbf_inf", "kid_poly_inf", "fid_inf")
_DIVERGENCE_CHECK_EVERY = 10  # steps between host-side finiteness checks (a sync costs a little)


class DivergenceError(FloatingPointError):
    """The loss or a gradient went non-finite; training of this configuration cannot go on."""


@flax.struct.dataclass
class TrainState:
    """Everything that determines the rest of a run: parameters, Adam states, the PRNG key, counters.
    The data order is a function of (seed, epoch), so it needs no storage."""

    ebm_params: Any
    gen_params: Any
    ebm_opt_state: Any
    gen_opt_state: Any
    key: jax.Array  # typed jax.random.key
    epoch: jax.Array  # completed epochs (int32)
    step: jax.Array  # completed steps (int32)


def init_state(config: ExperimentConfig) -> TrainState:
    """Fresh parameters and optimiser states, seeded by config.seed."""
    key = jax.random.key(config.seed)
    key, k_ebm, k_gen = jax.random.split(key, 3)
    spec = StepSpec.from_config(config)
    ebm, gen = network_modules(spec)
    z = jnp.zeros((1, config.z_dim), jnp.float32)
    ebm_params = ebm.init(k_ebm, z)
    gen_params = gen.init(k_gen, z)
    ebm_tx, gen_tx = optimizers(spec)
    return TrainState(
        ebm_params,
        gen_params,
        ebm_tx.init(ebm_params),
        gen_tx.init(gen_params),
        key,
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def step_inputs(
    config: ExperimentConfig, state: TrainState, epoch: int, devices: Sequence[Any]
) -> tuple[Any, tuple[jax.Array, jax.Array]]:
    """What compiled_train_step takes besides the batch, key and hyper-parameters: the replicated
    (params, optimiser states) carry and the float32 (EBM, generator) learning rates of 1-based `epoch`."""
    carry = replicate(
        ({"ebm": state.ebm_params, "gen": state.gen_params}, (state.ebm_opt_state, state.gen_opt_state)),
        devices,
    )
    lrs = tuple(jnp.asarray(v, jnp.float32) for v in learning_rates(config, epoch))
    return carry, lrs


def _batches(images: np.ndarray, order: np.ndarray, batch_size: int, n_dev: int):
    for i in range(len(order) // batch_size):
        x = images[order[i * batch_size : (i + 1) * batch_size]]
        yield x.reshape((n_dev, batch_size // n_dev) + x.shape[1:])


def epoch_order(config: ExperimentConfig, epoch: int, num: int) -> np.ndarray:
    """The permutation of the training set used in 1-based `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([config.seed, epoch]).permutation(num)


def validation_loss(
    config: ExperimentConfig, params: dict[str, Any], images: np.ndarray, epoch: int, devices: Sequence[Any]
) -> float:
    """Mean objective over the full validation batches (the last partial batch is left out), with chain
    noise seeded by (seed, epoch) so it does not consume the training key."""
    n_dev = len(devices)
    step = compiled_eval_step(StepSpec.from_config(config), tuple(devices))
    hp = Hyper.from_config(config)
    key = streams.epoch_key(config.seed, streams.VALIDATION_LOSS, epoch)
    rep = replicate(params, devices)
    losses = []
    for i, x in enumerate(_batches(images, np.arange(len(images)), config.batch_size, n_dev)):
        losses.append(step(rep, x, jax.random.fold_in(key, i), hp)[0])
    return float(np.mean(jax.device_get(losses))) if losses else float("nan")


@dataclasses.dataclass(frozen=True)
class StepProgress:
    """Where a running epoch stands, handed to `train_epoch`'s `on_step` after each dispatched step."""

    epoch: int  # the 1-based epoch being trained
    step: int  # steps of this epoch dispatched so far (1-based)
    steps: int  # steps in the whole epoch
    elapsed_s: float  # seconds since the epoch began
    batch_size: int


@dataclasses.dataclass(frozen=True)
class PartialEpoch:
    """An epoch stopped after `done` of its steps, to be continued at step `done + 1` (a mid-epoch
    checkpoint). `state` holds the parameters, Adam states and carried PRNG key after those steps (its
    `epoch` still counts completed epochs, its `step` every step so far); `stats` the per-step statistics
    of those steps as the host got them (what the epoch's readings average); `elapsed_s` the seconds of
    training they took."""

    state: TrainState
    done: int
    stats: list[dict[str, np.ndarray]]
    elapsed_s: float = 0.0


def train_epoch(
    config: ExperimentConfig,
    state: TrainState | PartialEpoch,
    dataset: Dataset,
    *,
    devices: Sequence[Any] | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
    on_partial: Callable[[PartialEpoch], None] | None = None,
    partial_every_s: float | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """One pass over the training set. Returns the new state and the epoch's readings: loss and the
    learning-gradient statistics averaged over the epoch's steps, validation loss, time, learning rates.
    `on_step(StepProgress)` is called after each step (it must not touch the numbers).

    Mid-epoch checkpoints: with `on_partial` and `partial_every_s`, after every `partial_every_s` seconds
    of training (counted from the epoch's start or the last call) and before the epoch's last step,
    `on_partial(PartialEpoch)` gets the epoch so far. Passing that `PartialEpoch` as `state` continues the
    epoch at its next step with the same data order, keys and statistics: the result equals an
    uninterrupted epoch's bit for bit. Neither changes a trained number.
    Raises DivergenceError (with the step) if the loss or gradient statistics go non-finite."""
    devices = list(devices or jax.local_devices())
    check_devices(config.batch_size, devices)
    n_dev = len(devices)
    partial = state if isinstance(state, PartialEpoch) else PartialEpoch(state, 0, [])
    state = partial.state
    first_step = int(state.step) - partial.done  # the step counter when the epoch began
    epoch = int(state.epoch) + 1
    start = time.perf_counter() - partial.elapsed_s
    last_partial = time.perf_counter()
    spec = StepSpec.from_config(config)
    step = compiled_train_step(spec, tuple(devices))
    hp = Hyper.from_config(config)
    carry, lrs = step_inputs(config, state, epoch, devices)
    key = state.key
    order = epoch_order(config, epoch, len(dataset.train))
    history: list[Any] = list(partial.stats)
    steps = len(order) // config.batch_size
    for i, x in enumerate(_batches(dataset.train, order, config.batch_size, n_dev)):
        if i < partial.done:  # trained before the checkpoint this epoch continues
            continue
        key, sub = jax.random.split(key)
        carry, stats = step(carry, x, sub, hp, lrs)
        history.append(stats)
        if on_step is not None:
            on_step(StepProgress(epoch, i + 1, steps, time.perf_counter() - start, config.batch_size))
        if (i + 1) % _DIVERGENCE_CHECK_EVERY == 0:
            _check_finite(jax.device_get(stats), epoch, i + 1, config)
        due = partial_every_s is not None and time.perf_counter() - last_partial >= partial_every_s
        if on_partial is not None and due and i + 1 < steps:
            history = jax.device_get(history)
            params, (ebm_opt, gen_opt) = unreplicate(carry)
            counters = (state.epoch, jnp.asarray(first_step + i + 1, jnp.int32))
            snapshot = TrainState(params["ebm"], params["gen"], ebm_opt, gen_opt, key, *counters)
            on_partial(PartialEpoch(snapshot, i + 1, list(history), time.perf_counter() - start))
            last_partial = time.perf_counter()
    if not history:
        raise ValueError(
            f"batch_size={config.batch_size} leaves no full batch in {len(dataset.train)} "
            "training images; lower batch_size"
        )
    host = jax.device_get(history)
    for i, s in enumerate(host):
        _check_finite(s, epoch, i + 1, config)
    params, (ebm_opt, gen_opt) = unreplicate(carry)
    new_state = TrainState(
        params["ebm"],
        params["gen"],
        ebm_opt,
        gen_opt,
        key,
        jnp.asarray(epoch, jnp.int32),
        jnp.asarray(first_step + len(history), jnp.int32),
    )
    readings = {
        name: float(np.mean([s[name][0] for s in host]))
        for name in ("grad_mean", "grad_var", "grad_var_ebm", "grad_var_gen")
    }
    readings["train_loss"] = float(np.mean([s["loss"][0] for s in host]))
    readings.update(temperature_readings(config, host))
    readings["val_loss"] = validation_loss(config, params, dataset.val, epoch, devices)
    if not math.isfinite(readings["val_loss"]) and len(dataset.val) >= config.batch_size:
        raise DivergenceError(
            f"validation loss is {readings['val_loss']} after epoch {epoch}: training "
            f"diverged; {divergence_advice(config)}"
        )
    readings.update(
        epoch=epoch, epoch_time_s=time.perf_counter() - start, ebm_lr=float(lrs[0]), gen_lr=float(lrs[1])
    )
    return new_state, readings


def temperature_readings(config: ExperimentConfig, host: list[dict[str, Any]]) -> dict[str, Any]:
    """The TI curve of an epoch (thermo only; {} for vanilla): the schedule t_i, the trapezoid weights w_i,
    E_i and the fitted KLs per interval averaged over the epoch's steps (lists; the KLs None for rules that
    fit no Gaussians), `kl_identity_error` averaged over the steps, and `kl_identity_z` /
    `kl_identity_split_z` (`model.thermo.identity_z`) from the moments pooled over the epoch's examples."""
    if not config.is_thermo:
        return {}
    temps = temperature_schedule(config.num_temps, config.temp_power)

    def mean_list(name: str) -> list[float] | None:
        values = np.mean([s[name][0] for s in host], axis=0)
        return None if np.all(np.isnan(values)) else [float(v) for v in values]

    error = float(np.mean([s["kl_identity_error"][0] for s in host]))
    z, split_z = (float(v) for v in identity_z(np.sum([s["kl_identity_moments"][0] for s in host], axis=0)))
    return {
        "ti_temps": [float(t) for t in temps],
        "ti_weights": [float(w) for w in trapezoid_weights(temps)],
        **{n: mean_list(n) for n in ("ti_expected_loglik", "ti_kl_forward", "ti_kl_backward")},
        "kl_identity_error": None if math.isnan(error) else error,
        "kl_identity_z": None if math.isnan(z) else z,
        "kl_identity_split_z": None if math.isnan(split_z) else split_z,
    }


def divergence_advice(config: ExperimentConfig) -> str:
    """Every config field whose value can make training go non-finite, with its value and which way to
    move it (the fix half of a DivergenceError message)."""

    def values(*names: str) -> str:
        return ", ".join(f"{n}={getattr(config, n):g}" for n in names)

    langevin = values("prior_step_size", "posterior_step_size", "prior_steps", "posterior_steps")
    advice = (
        f"lower the learning rates ({values('ebm_lr', 'gen_lr')}) or the Langevin step sizes and "
        f"lengths ({langevin}), or raise lkhood_sigma ({values('lkhood_sigma')}) or lower prior_sigma "
        f"({values('prior_sigma')})"
    )
    if config.is_thermo:
        advice += f"; for thermo also raise kl_ridge or lower kl_weight ({values('kl_ridge', 'kl_weight')})"
    return advice


def _check_finite(stats: dict[str, Any], epoch: int, step: int, config: ExperimentConfig) -> None:
    for name in ("loss", "grad_var", "grad_mean"):
        value = float(np.asarray(stats[name]).reshape(-1)[0])
        if not math.isfinite(value):
            raise DivergenceError(
                f"{name} is {value} at epoch {epoch}, step {step}: training diverged; "
                f"{divergence_advice(config)}"
            )


def generate_images(
    config: ExperimentConfig, state: TrainState, key: jax.Array, num: int, batch_size: int = 500
) -> np.ndarray:
    """`num` images x = g(z), z ~ p_alpha(z) by prior Langevin (Eq. 2, 11), made in batches of at most
    `batch_size` so memory stays bounded. Returns float32 (num, H, W, C) in [-1, 1]; XLA's
    out-of-memory error comes out as a one-line DeviceMemoryError."""
    spec = StepSpec.from_config(config)
    hp = Hyper.from_config(config)
    out = []
    with out_of_memory_as_advice(config):
        for i, lo in enumerate(range(0, num, batch_size)):
            n = min(batch_size, num - lo)
            fn = compiled_generate(spec, n)
            out.append(np.asarray(fn(state.ebm_params, state.gen_params, jax.random.fold_in(key, i), hp)))
    return np.concatenate(out) if out else np.zeros((0,) + config.image_shape, np.float32)


def run_epoch(
    config: ExperimentConfig,
    state: TrainState | PartialEpoch,
    dataset: Dataset,
    *,
    devices: Sequence[Any] | None = None,
    evaluator: Callable[..., dict] | None = None,
    on_partial: Callable[[PartialEpoch], None] | None = None,
    partial_every_s: float | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """train_epoch (with its `on_step` hook), then every config.eval_every epochs val_ll and the gradient
    noise (model.readings) and, if an evaluator is given, KID_inf and FID_inf of generated images. Those
    columns are NaN on epochs without evaluation. A `PartialEpoch` state, `on_partial` and
    `partial_every_s` are train_epoch's mid-epoch checkpoints.
    Raises DeviceMemoryError, before compiling, for a step that cannot fit the devices, and for XLA's
    out-of-memory error."""
    devices = list(devices or jax.local_devices())
    check_step_fits(config, devices)
    with out_of_memory_as_advice(config):
        return _run_epoch(
            config,
            state,
            dataset,
            devices=devices,
            evaluator=evaluator,
            on_partial=on_partial,
            partial_every_s=partial_every_s,
            on_step=on_step,
        )


def _run_epoch(
    config: ExperimentConfig,
    state: TrainState | PartialEpoch,
    dataset: Dataset,
    *,
    devices: Sequence[Any],
    evaluator: Callable[..., dict] | None,
    on_partial: Callable[[PartialEpoch], None] | None = None,
    partial_every_s: float | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    state, readings = train_epoch(
        config,
        state,
        dataset,
        devices=devices,
        on_partial=on_partial,
        partial_every_s=partial_every_s,
        on_step=on_step,
    )
    for name in (*METRIC_COLUMNS, *READING_NAMES):
        readings[name] = float("nan")
    epoch = readings["epoch"]
    due = bool(config.eval_every) and (epoch % config.eval_every == 0 or epoch == config.epochs)
    if due:  # val_ll and gradient noise, the same for every model (model.readings)
        readings.update(
            evaluation_readings(
                config, {"ebm": state.ebm_params, "gen": state.gen_params}, dataset.train, dataset.val, epoch
            )
        )
    if evaluator is not None and due:
        start = time.perf_counter()
        eval_key = streams.epoch_key(config.seed, streams.EVALUATION, epoch)
        readings.update(evaluator(lambda k, n: generate_images(config, state, k, n), eval_key))
        readings["eval_time_s"] = time.perf_counter() - start
    return state, readings


def make_evaluator_or_none(
    config: ExperimentConfig, dataset: Dataset, log: Callable[[str], None] = print
) -> Callable[..., dict] | None:
    """The fidelity evaluator of model.metrics when evaluation is on (eval_every > 0), else None."""
    if not config.eval_every:
        return None
    try:
        from model.metrics import make_evaluator
    except ImportError as err:  # metrics not installed in this build
        log(f"evaluation skipped: model.metrics is unavailable ({err})")
        return None
    return make_evaluator(config, dataset)


def format_readings(r: dict[str, Any]) -> str:
    """One human-readable line per epoch."""
    line = (
        f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4g}  val {r['val_loss']:.4g}  "
        f"grad mean {r['grad_mean']:.3e} var {r['grad_var']:.3e} "
        f"(ebm {r['grad_var_ebm']:.2e}, gen {r['grad_var_gen']:.2e})  {r['epoch_time_s']:.1f}s"
    )
    if not math.isnan(r.get("val_ll", float("nan"))):
        line += f"  val_ll {r['val_ll']:.4g} +- {r['val_ll_stderr']:.2g}"
    if not math.isnan(r.get("kid_rbf_inf", float("nan"))):
        line += f"  KID_inf {r['kid_rbf_inf']:.4g} FID_inf {r['fid_inf']:.4g}"
    return line


def fit(
    config: ExperimentConfig,
    *,
    dataset: Dataset | None = None,
    devices: Sequence[Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    on_step: Callable[[StepProgress], None] | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train `config.epochs` epochs from scratch. Returns the final state and every epoch's readings;
    `on_epoch(readings)` is called after each epoch (e.g. to write them), `on_step` after each step."""
    dataset = dataset or load_dataset(config)
    state = init_state(config)
    evaluator = make_evaluator_or_none(config, dataset, log)
    history = []
    for _ in range(config.epochs):
        state, readings = run_epoch(
            config, state, dataset, devices=devices, evaluator=evaluator, on_step=on_step
        )
        history.append(readings)
        log(format_readings(readings))
        if on_epoch:
            on_epoch(readings)
    return state, history
