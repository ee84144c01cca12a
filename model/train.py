"""Training: the train state, the data-parallel train step, the epoch loop, learning-gradient statistics.

`python -m model.train --preset digits --epochs 3 --out DIR` trains one configuration without Ray and
writes DIR/epochs.parquet (the `epochs` schema of DESIGN §6).

The step runs under `jax.pmap` over the given devices: each device takes batch_size / n_devices examples,
gradients are averaged with `pmean`. Chain noise is drawn per example from the step key and the example's
index in the whole batch, so 1 and 2 devices give the same numbers. Hyper-parameters that differ between
grid cells (p, eta, step sizes, sigmas, learning rates) are traced arguments: cells of the same shapes
share one compiled step.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.config import ExperimentConfig, apply_overrides, get_preset, parse_set_args
from model.data import Dataset, load_dataset
from model.nets import make_networks
from model.objectives import Hyper, Networks, sample_prior, thermo_loss, vanilla_loss

EPOCH_COLUMNS = [
    "epoch", "train_loss", "val_loss", "grad_mean", "grad_var", "grad_var_ebm", "grad_var_gen",
    "kid_rbf_inf", "kid_poly_inf", "fid_inf", "epoch_time_s", "ebm_lr", "gen_lr",
]
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


@dataclass(frozen=True)
class StepSpec:
    """The static part of a train step: what changes shapes or code. Everything else is traced."""

    objective: str
    num_temps: int
    prior_steps: int
    posterior_steps: int
    chain_gradient: bool
    z_dim: int
    ebm_width: int
    ebm_leak: float
    gen_width: int
    gen_leak: float
    conv_impl: str
    image_size: int
    channels: int
    ebm_betas: tuple[float, float]
    gen_betas: tuple[float, float]

    @classmethod
    def from_config(cls, c: ExperimentConfig) -> StepSpec:
        return cls(c.objective, c.num_temps if c.is_thermo else 0, c.prior_steps, c.posterior_steps,
                   c.chain_gradient, c.z_dim, c.ebm_width, c.ebm_leak, c.gen_width, c.gen_leak,
                   c.conv_impl, c.image_size, c.channels, (c.ebm_beta1, c.ebm_beta2),
                   (c.gen_beta1, c.gen_beta2))


def networks(spec: StepSpec | ExperimentConfig) -> Networks:
    """Apply functions of the EBM prior and the generator for this shape."""
    ebm, gen = make_networks(spec)  # both carry the fields make_networks reads
    return Networks(energy=ebm.apply, generate=gen.apply)


def optimizers(spec: StepSpec) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """Adam per network (Tables 3-4); the learning rate is a hyper-parameter set each step."""
    make = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)
    # A float32 array, not a Python float: a weak-typed state would change type after the first update
    # and make pmap compile the step a second time.
    lr = jnp.zeros((), jnp.float32)
    return (make(learning_rate=lr, b1=spec.ebm_betas[0], b2=spec.ebm_betas[1]),
            make(learning_rate=lr, b1=spec.gen_betas[0], b2=spec.gen_betas[1]))


def learning_rate_schedules(config: ExperimentConfig) -> tuple[optax.Schedule, optax.Schedule]:
    """Per-epoch learning rates of the EBM and the generator as optax schedules over the 0-based epoch
    index: constant until `lr_decay_begin`, then x lr_decay per epoch, floored at the final rate."""
    def schedule(initial: float, final: float) -> optax.Schedule:
        return optax.exponential_decay(initial, transition_steps=1, decay_rate=config.lr_decay,
                                       transition_begin=max(config.lr_decay_begin - 1, 0), staircase=True,
                                       end_value=final)
    return schedule(config.ebm_lr, config.ebm_final_lr), schedule(config.gen_lr, config.gen_final_lr)


def learning_rates(config: ExperimentConfig, epoch: int) -> tuple[float, float]:
    """(EBM, generator) learning rates used during 1-based `epoch`."""
    ebm_s, gen_s = learning_rate_schedules(config)
    return float(ebm_s(epoch - 1)), float(gen_s(epoch - 1))


def init_state(config: ExperimentConfig) -> TrainState:
    """Fresh parameters and optimiser states, seeded by config.seed."""
    key = jax.random.key(config.seed)
    key, k_ebm, k_gen = jax.random.split(key, 3)
    ebm, gen = make_networks(config)
    z = jnp.zeros((1, config.z_dim), jnp.float32)
    ebm_params = ebm.init(k_ebm, z)
    gen_params = gen.init(k_gen, z)
    ebm_tx, gen_tx = optimizers(StepSpec.from_config(config))
    return TrainState(ebm_params, gen_params, ebm_tx.init(ebm_params), gen_tx.init(gen_params), key,
                      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def gradient_statistics(ebm_grads: Any, gen_grads: Any) -> dict[str, jax.Array]:
    """The paper's learning-gradient statistics of one step: mean and variance over all entries of the
    concatenated EBM+generator gradient (`grad_mean`, `grad_var`), and the variance per network."""
    def flat(tree: Any) -> jax.Array:
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
    e, g = flat(ebm_grads), flat(gen_grads)
    both = jnp.concatenate([e, g])
    return {"grad_mean": jnp.mean(both), "grad_var": jnp.var(both), "grad_var_ebm": jnp.var(e),
            "grad_var_gen": jnp.var(g)}


def loss_fn(spec: StepSpec, axis_name: str | None = None, unroll: bool = False) -> Callable[..., Any]:
    """The objective of `spec` as loss(params, x, key, example_ids, hyper) -> (loss, aux)."""
    nets = networks(spec)
    if spec.objective == "thermo":
        return functools.partial(thermo_loss, nets=nets, num_temps=spec.num_temps,
                                 posterior_steps=spec.posterior_steps, z_dim=spec.z_dim,
                                 chain_gradient=spec.chain_gradient, axis_name=axis_name, unroll=unroll)
    return functools.partial(vanilla_loss, nets=nets, prior_steps=spec.prior_steps,
                             posterior_steps=spec.posterior_steps, z_dim=spec.z_dim, unroll=unroll)


def _local_example_ids(local_batch: int, axis_name: str) -> jax.Array:
    return jax.lax.axis_index(axis_name) * local_batch + jnp.arange(local_batch)


@functools.lru_cache(maxsize=64)
def compiled_train_step(spec: StepSpec, devices: tuple[Any, ...]) -> Callable[..., Any]:
    """The pmapped train step for this static spec and device tuple (cached: one compilation per shape).

    step(replicated (params, opt_states), x (n_dev, B/n_dev, H, W, C), key, hyper, (ebm_lr, gen_lr))
      -> (new replicated (params, opt_states), stats dict) with stats identical on every device."""
    loss = loss_fn(spec, "batch")
    ebm_tx, gen_tx = optimizers(spec)

    def step(carry: Any, x: jax.Array, key: jax.Array, hp: Hyper, lrs: Any) -> Any:
        params, (ebm_opt, gen_opt) = carry
        ids = _local_example_ids(x.shape[0], "batch")
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, x, key, ids, hp)
        grads = jax.lax.pmean(grads, "batch")
        stats = gradient_statistics(grads["ebm"], grads["gen"])
        stats["loss"] = jax.lax.pmean(value, "batch")
        ebm_opt.hyperparams["learning_rate"] = lrs[0]
        gen_opt.hyperparams["learning_rate"] = lrs[1]
        ebm_up, ebm_opt = ebm_tx.update(grads["ebm"], ebm_opt, params["ebm"])
        gen_up, gen_opt = gen_tx.update(grads["gen"], gen_opt, params["gen"])
        params = {"ebm": optax.apply_updates(params["ebm"], ebm_up),
                  "gen": optax.apply_updates(params["gen"], gen_up)}
        return (params, (ebm_opt, gen_opt)), stats

    return jax.pmap(step, axis_name="batch", in_axes=(0, 0, None, None, None), devices=list(devices))


@functools.lru_cache(maxsize=64)
def compiled_eval_step(spec: StepSpec, devices: tuple[Any, ...]) -> Callable[..., Any]:
    """The pmapped loss on a batch without a parameter update (validation loss)."""
    loss = loss_fn(spec, "batch")

    def step(params: Any, x: jax.Array, key: jax.Array, hp: Hyper) -> jax.Array:
        ids = _local_example_ids(x.shape[0], "batch")
        value, _ = loss(params, x, key, ids, hp)
        return jax.lax.pmean(value, "batch")

    return jax.pmap(step, axis_name="batch", in_axes=(0, 0, None, None), devices=list(devices))


def check_devices(batch_size: int, devices: Sequence[Any]) -> None:
    n = len(devices)
    if batch_size % n:
        lower = batch_size - batch_size % n
        raise ValueError(f"batch_size {batch_size} is not divisible by {n} devices; use a multiple of {n} "
                         f"(e.g. {lower or n} or {lower + n}) or run on fewer devices")


@functools.lru_cache(maxsize=16)
def _identity_pmap(devices: tuple[Any, ...]) -> Callable[[Any], Any]:
    return jax.pmap(lambda tree: tree, axis_name="batch", devices=list(devices))


def _replicate(tree: Any, devices: Sequence[Any]) -> Any:
    """One copy of `tree` per device, laid out exactly as pmap lays out its outputs: handing pmap
    inputs with another sharding would make it compile the step a second time."""
    n = len(devices)
    host = jax.device_get(tree)  # whatever sharding it had (e.g. one slice of a pmap output)
    stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), host)
    return _identity_pmap(tuple(devices))(stacked)


def _unreplicate(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def step_inputs(config: ExperimentConfig, state: TrainState, epoch: int, devices: Sequence[Any]
                ) -> tuple[Any, tuple[jax.Array, jax.Array]]:
    """What compiled_train_step takes besides the batch, key and hyper-parameters: the replicated
    (params, optimiser states) carry and the float32 (EBM, generator) learning rates of 1-based `epoch`."""
    carry = _replicate(({"ebm": state.ebm_params, "gen": state.gen_params},
                        (state.ebm_opt_state, state.gen_opt_state)), devices)
    lrs = tuple(jnp.asarray(v, jnp.float32) for v in learning_rates(config, epoch))
    return carry, lrs


def _batches(images: np.ndarray, order: np.ndarray, batch_size: int, n_dev: int):
    for i in range(len(order) // batch_size):
        x = images[order[i * batch_size:(i + 1) * batch_size]]
        yield x.reshape((n_dev, batch_size // n_dev) + x.shape[1:])


def epoch_order(config: ExperimentConfig, epoch: int, num: int) -> np.ndarray:
    """The permutation of the training set used in 1-based `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([config.seed, epoch]).permutation(num)


def validation_loss(config: ExperimentConfig, params: dict[str, Any], images: np.ndarray, epoch: int,
                    devices: Sequence[Any]) -> float:
    """Mean objective over the full validation batches (the last partial batch is left out), with chain
    noise seeded by (seed, epoch) so it does not consume the training key."""
    n_dev = len(devices)
    step = compiled_eval_step(StepSpec.from_config(config), tuple(devices))
    hp = Hyper.from_config(config)
    key = jax.random.fold_in(jax.random.key(config.seed), 1_000_000 + epoch)
    rep = _replicate(params, devices)
    losses = []
    for i, x in enumerate(_batches(images, np.arange(len(images)), config.batch_size, n_dev)):
        losses.append(step(rep, x, jax.random.fold_in(key, i), hp)[0])
    return float(np.mean(jax.device_get(losses))) if losses else float("nan")


def train_epoch(config: ExperimentConfig, state: TrainState, dataset: Dataset, *,
                devices: Sequence[Any] | None = None) -> tuple[TrainState, dict[str, float]]:
    """One pass over the training set. Returns the new state and the epoch's readings: loss and the
    learning-gradient statistics averaged over the epoch's steps, validation loss, time, learning rates.
    Raises DivergenceError (with the step) if the loss or gradient statistics go non-finite."""
    devices = list(devices or jax.local_devices())
    check_devices(config.batch_size, devices)
    n_dev = len(devices)
    epoch = int(state.epoch) + 1
    start = time.perf_counter()
    spec = StepSpec.from_config(config)
    step = compiled_train_step(spec, tuple(devices))
    hp = Hyper.from_config(config)
    carry, lrs = step_inputs(config, state, epoch, devices)
    key = state.key
    order = epoch_order(config, epoch, len(dataset.train))
    history: list[dict[str, jax.Array]] = []
    for i, x in enumerate(_batches(dataset.train, order, config.batch_size, n_dev)):
        key, sub = jax.random.split(key)
        carry, stats = step(carry, x, sub, hp, lrs)
        history.append(stats)
        if (i + 1) % _DIVERGENCE_CHECK_EVERY == 0:
            _check_finite(jax.device_get(stats), epoch, i + 1)
    if not history:
        raise ValueError(f"batch_size={config.batch_size} leaves no full batch in {len(dataset.train)} "
                         "training images; lower batch_size")
    host = jax.device_get(history)
    for i, s in enumerate(host):
        _check_finite(s, epoch, i + 1)
    params, (ebm_opt, gen_opt) = _unreplicate(carry)
    new_state = TrainState(params["ebm"], params["gen"], ebm_opt, gen_opt, key,
                           jnp.asarray(epoch, jnp.int32), state.step + len(history))
    readings = {name: float(np.mean([s[name][0] for s in host]))
                for name in ("grad_mean", "grad_var", "grad_var_ebm", "grad_var_gen")}
    readings["train_loss"] = float(np.mean([s["loss"][0] for s in host]))
    readings["val_loss"] = validation_loss(config, params, dataset.val, epoch, devices)
    if not math.isfinite(readings["val_loss"]) and len(dataset.val) >= config.batch_size:
        raise DivergenceError(f"validation loss is {readings['val_loss']} after epoch {epoch}; "
                              "lower the learning rates or Langevin step sizes")
    readings.update(epoch=epoch, epoch_time_s=time.perf_counter() - start, ebm_lr=float(lrs[0]),
                    gen_lr=float(lrs[1]))
    return new_state, readings


def _check_finite(stats: dict[str, Any], epoch: int, step: int) -> None:
    for name in ("loss", "grad_var", "grad_mean"):
        value = float(np.asarray(stats[name]).reshape(-1)[0])
        if not math.isfinite(value):
            raise DivergenceError(
                f"{name} is {value} at epoch {epoch}, step {step}: training diverged; lower the learning "
                "rates (ebm_lr, gen_lr) or the Langevin step sizes, or raise lkhood_sigma")


@functools.lru_cache(maxsize=16)
def _compiled_generate(spec: StepSpec, num: int) -> Callable[..., Any]:
    nets = networks(spec)

    def generate(ebm_params: Any, gen_params: Any, key: jax.Array, hp: Hyper) -> jax.Array:
        z = sample_prior(nets, ebm_params, key, jnp.arange(num), spec.prior_steps, spec.z_dim, hp)
        return nets.generate(gen_params, z)

    return jax.jit(generate)


def generate_images(config: ExperimentConfig, state: TrainState, key: jax.Array, num: int,
                    batch_size: int = 500) -> np.ndarray:
    """`num` images x = g(z), z ~ p_alpha(z) by prior Langevin (Eq. 2, 11), made in batches of at most
    `batch_size` so memory stays bounded. Returns float32 (num, H, W, C) in [-1, 1]."""
    spec = StepSpec.from_config(config)
    hp = Hyper.from_config(config)
    out = []
    for i, lo in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - lo)
        fn = _compiled_generate(spec, n)
        out.append(np.asarray(fn(state.ebm_params, state.gen_params, jax.random.fold_in(key, i), hp)))
    return np.concatenate(out) if out else np.zeros((0,) + config.image_shape, np.float32)


def run_epoch(config: ExperimentConfig, state: TrainState, dataset: Dataset, *,
              devices: Sequence[Any] | None = None, evaluator: Callable[..., dict] | None = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """train_epoch, then (every config.eval_every epochs, if an evaluator is given) KID_inf and FID_inf
    of generated images. Metric columns are NaN on epochs without evaluation."""
    state, readings = train_epoch(config, state, dataset, devices=devices)
    for name in METRIC_COLUMNS:
        readings[name] = float("nan")
    epoch = readings["epoch"]
    if evaluator is not None and config.eval_every and (epoch % config.eval_every == 0
                                                        or epoch == config.epochs):
        start = time.perf_counter()
        eval_key = jax.random.fold_in(jax.random.key(config.seed), 2_000_000 + epoch)
        readings.update(evaluator(lambda k, n: generate_images(config, state, k, n), eval_key))
        readings["eval_time_s"] = time.perf_counter() - start
    return state, readings


def make_evaluator_or_none(config: ExperimentConfig, dataset: Dataset,
                           log: Callable[[str], None] = print) -> Callable[..., dict] | None:
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
    line = (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4g}  val {r['val_loss']:.4g}  "
            f"grad mean {r['grad_mean']:.3e} var {r['grad_var']:.3e} "
            f"(ebm {r['grad_var_ebm']:.2e}, gen {r['grad_var_gen']:.2e})  {r['epoch_time_s']:.1f}s")
    if not math.isnan(r.get("kid_rbf_inf", float("nan"))):
        line += f"  KID_inf {r['kid_rbf_inf']:.4g} FID_inf {r['fid_inf']:.4g}"
    return line


def fit(config: ExperimentConfig, *, dataset: Dataset | None = None, devices: Sequence[Any] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None, log: Callable[[str], None] = print
        ) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train `config.epochs` epochs from scratch. Returns the final state and every epoch's readings;
    `on_epoch(readings)` is called after each epoch (e.g. to write them)."""
    dataset = dataset or load_dataset(config)
    state = init_state(config)
    evaluator = make_evaluator_or_none(config, dataset, log)
    history = []
    for _ in range(config.epochs):
        state, readings = run_epoch(config, state, dataset, devices=devices, evaluator=evaluator)
        history.append(readings)
        log(format_readings(readings))
        if on_epoch:
            on_epoch(readings)
    return state, history


# Config values written beside every reading of `python -m model.train`, so a table read on its own still
# says what produced it (chain_gradient above all: it decides whether the prior was trained).
RUN_COLUMNS = ("dataset", "objective", "chain_gradient", "batch_size", "temp_power", "num_temps", "kl_weight",
               "prior_steps", "posterior_steps", "seed")


def write_epochs_parquet(rows: list[dict[str, Any]], config: ExperimentConfig, path: Path) -> None:
    """Write the readings as the `epochs` table (DESIGN §6) atomically: a temp file, then rename.
    Columns: trial_id, the EPOCH_COLUMNS, the RUN_COLUMNS of the config (TI ones null for vanilla), and any
    extra readings (e.g. the metrics' slopes and standard errors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    trial_id = f"{config.dataset}-{config.objective}-s{config.seed}"
    ti_only = ("temp_power", "num_temps", "kl_weight", "chain_gradient")
    run = {c: None if c in ti_only and not config.is_thermo else getattr(config, c) for c in RUN_COLUMNS}
    table = pa.Table.from_pylist([{"trial_id": trial_id, **{c: r.get(c) for c in EPOCH_COLUMNS}, **run,
                                   **{k: v for k, v in r.items() if k not in EPOCH_COLUMNS}} for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits", help="celeba | cifar10 | svhn | digits")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set objective=thermo --set temp_power=6")
    parser.add_argument("--out", type=Path, help="directory for epochs.parquet (and config.json)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_set_args(args.set)
        if args.epochs is not None:
            overrides["epochs"] = str(args.epochs)
        config = apply_overrides(get_preset(args.preset), overrides)
    except ValueError as err:
        parser.error(str(err))
    print(f"training {config.objective} on {config.dataset} for {config.epochs} epochs on "
          f"{len(jax.local_devices())} {jax.default_backend()} device(s)", flush=True)
    rows: list[dict[str, Any]] = []

    def on_epoch(readings: dict[str, Any]) -> None:
        rows.append(readings)
        if args.out:
            write_epochs_parquet(rows, config, args.out / "epochs.parquet")

    if args.out:
        import json
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    try:
        fit(config, on_epoch=on_epoch, log=lambda s: print(s, flush=True))
    except DivergenceError as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    if args.out:
        print(f"readings: {args.out / 'epochs.parquet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
