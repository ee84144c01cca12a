"""The compiled train step: its static spec, the optimisers and learning-rate schedules, the loss of each
objective, the learning-gradient statistics, and the pmapped train, evaluation and generation functions.

The step runs under `jax.pmap` over the given devices: each device takes batch_size / n_devices examples,
gradients are averaged with `pmean`. Chain noise is drawn per example from the step key and the example's
index in the whole batch, so 1 and 2 devices give the same numbers. Static (a new compilation): what
`StepSpec` holds, i.e. shapes, loop lengths and code switches. Traced (shared by cells of the same shapes):
the `Hyper` values (p, eta, step sizes, sigmas, the KL ridge) and the learning rates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.config import ExperimentConfig
from model.nets import network_modules, resolve_conv_impl
from model.objectives import Hyper, NetworkFns, sample_prior, thermo_loss, vanilla_loss


@dataclass(frozen=True)
class StepSpec:
    """The static part of a train step: what changes shapes or code. Everything else is traced."""

    objective: str
    num_temps: int
    prior_steps: int
    posterior_steps: int
    ti_rule: str
    chains_per_example: int
    ebm_gradient: str
    gen_gradient: str
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
        """The spec of `c`. Its conv_impl is concrete on a run's path (model.train and a trial resolve "auto"
        once, `model.nets.resolve_config`); a direct caller's "auto" is resolved here for the default
        backend. The estimator fields
        change only the thermodynamic step: vanilla specs leave them at defaults so vanilla cells share one
        compilation whatever they say."""
        ti = (
            (c.ti_rule, c.chains_per_example, c.ebm_gradient, c.gen_gradient)
            if c.is_thermo
            else ("", 1, "", "")
        )
        return cls(
            c.objective,
            c.num_temps if c.is_thermo else 0,
            c.prior_steps,
            c.posterior_steps,
            *ti,
            c.z_dim,
            c.ebm_width,
            c.ebm_leak,
            c.gen_width,
            c.gen_leak,
            resolve_conv_impl(c.conv_impl),
            c.image_size,
            c.channels,
            (c.ebm_beta1, c.ebm_beta2),
            (c.gen_beta1, c.gen_beta2),
        )


def network_fns(spec: StepSpec) -> NetworkFns:
    """How to apply the EBM prior and the generator of this shape: their Flax modules' apply functions."""
    ebm, gen = network_modules(spec)
    return NetworkFns(energy=ebm.apply, generate=gen.apply)


def optimizers(spec: StepSpec) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """Adam per network (Tables 3-4); the learning rate is a hyper-parameter set each step."""
    make = optax.inject_hyperparams(optax.adam, hyperparam_dtype=jnp.float32)
    # A float32 array, not a Python float: a weak-typed state would change type after the first update
    # and make pmap compile the step a second time.
    lr = jnp.zeros((), jnp.float32)
    return (
        make(learning_rate=lr, b1=spec.ebm_betas[0], b2=spec.ebm_betas[1]),
        make(learning_rate=lr, b1=spec.gen_betas[0], b2=spec.gen_betas[1]),
    )


def learning_rate_schedules(config: ExperimentConfig) -> tuple[optax.Schedule, optax.Schedule]:
    """Per-epoch learning rates of the EBM and the generator as optax schedules over the 0-based epoch
    index: constant until `lr_decay_begin`, then x lr_decay per epoch, floored at the final rate."""

    def schedule(initial: float, final: float) -> optax.Schedule:
        return optax.exponential_decay(
            initial,
            transition_steps=1,
            decay_rate=config.lr_decay,
            transition_begin=max(config.lr_decay_begin - 1, 0),
            staircase=True,
            end_value=final,
        )

    return schedule(config.ebm_lr, config.ebm_final_lr), schedule(config.gen_lr, config.gen_final_lr)


def learning_rates(config: ExperimentConfig, epoch: int) -> tuple[float, float]:
    """(EBM, generator) learning rates used during 1-based `epoch`."""
    ebm_s, gen_s = learning_rate_schedules(config)
    return float(ebm_s(epoch - 1)), float(gen_s(epoch - 1))


def gradient_statistics(ebm_grads: Any, gen_grads: Any) -> dict[str, jax.Array]:
    """The paper's learning-gradient statistics of one step: mean and variance over all entries of the
    concatenated EBM+generator gradient (`grad_mean`, `grad_var`), and the variance per network."""

    def flat(tree: Any) -> jax.Array:
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

    e, g = flat(ebm_grads), flat(gen_grads)
    both = jnp.concatenate([e, g])
    return {
        "grad_mean": jnp.mean(both),
        "grad_var": jnp.var(both),
        "grad_var_ebm": jnp.var(e),
        "grad_var_gen": jnp.var(g),
    }


def loss_fn(spec: StepSpec, axis_name: str | None = None, unroll: bool = False) -> Callable[..., Any]:
    """The objective of `spec` as loss(params, x, key, example_ids, hyper) -> (loss, aux)."""
    nets = network_fns(spec)
    if spec.objective == "thermo":
        return functools.partial(
            thermo_loss,
            nets=nets,
            num_temps=spec.num_temps,
            posterior_steps=spec.posterior_steps,
            z_dim=spec.z_dim,
            ti_rule=spec.ti_rule,
            chains_per_example=spec.chains_per_example,
            ebm_gradient=spec.ebm_gradient,
            gen_gradient=spec.gen_gradient,
            prior_steps=spec.prior_steps,
            axis_name=axis_name,
            unroll=unroll,
        )
    return functools.partial(
        vanilla_loss,
        nets=nets,
        prior_steps=spec.prior_steps,
        posterior_steps=spec.posterior_steps,
        z_dim=spec.z_dim,
        unroll=unroll,
    )


def temperature_statistics(aux: dict[str, jax.Array], axis_name: str) -> dict[str, jax.Array]:
    """The per-temperature readings of one thermodynamic step, averaged over the whole batch: E_i (N_t,),
    the fitted KLs (N_t - 1,) and `kl_identity_error`, sum_i |KL_f + KL_b - dt_i (E_i - E_{i-1})| in nats
    (NaN where the rule fits no Gaussians). kl_batch's residual is linear in batch means and kl_example's is
    a mean over examples of per-x signed residuals, so pmean over equal local batches keeps both exact.
    `kl_identity_moments` (5, N_t - 1) are sums over examples, so psum pools them exactly (NaN unless
    kl_example)."""
    names = ("expected_loglik", "kl_forward", "kl_backward", "kl_identity")
    mean = jax.lax.pmean({n: aux[n] for n in names}, axis_name)
    return {
        "ti_expected_loglik": mean["expected_loglik"],
        "ti_kl_forward": mean["kl_forward"],
        "ti_kl_backward": mean["kl_backward"],
        "kl_identity_error": jnp.sum(jnp.abs(mean["kl_identity"])),
        "kl_identity_moments": jax.lax.psum(aux["kl_identity_moments"], axis_name),
    }


def _local_example_ids(local_batch: int, axis_name: str) -> jax.Array:
    return jax.lax.axis_index(axis_name) * local_batch + jnp.arange(local_batch)


def device_train_step(spec: StepSpec) -> Callable[..., Any]:
    """The train step one device runs, its collectives over the mapped axis "batch": what
    compiled_train_step maps with pmap and what model.plan.export lowers for other platforms.

    step((params, opt_states), x (B/n_dev, H, W, C), key, hyper, (ebm_lr, gen_lr))
      -> (new (params, opt_states), stats dict) with stats identical on every device."""
    loss = loss_fn(spec, "batch")
    ebm_tx, gen_tx = optimizers(spec)

    def step(carry: Any, x: jax.Array, key: jax.Array, hp: Hyper, lrs: Any) -> Any:
        params, (ebm_opt, gen_opt) = carry
        ids = _local_example_ids(x.shape[0], "batch")
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, x, key, ids, hp)
        grads = jax.lax.pmean(grads, "batch")
        stats = gradient_statistics(grads["ebm"], grads["gen"])
        stats["loss"] = jax.lax.pmean(value, "batch")
        if spec.objective == "thermo":
            stats.update(temperature_statistics(aux, "batch"))
        ebm_opt.hyperparams["learning_rate"] = lrs[0]
        gen_opt.hyperparams["learning_rate"] = lrs[1]
        ebm_up, ebm_opt = ebm_tx.update(grads["ebm"], ebm_opt, params["ebm"])
        gen_up, gen_opt = gen_tx.update(grads["gen"], gen_opt, params["gen"])
        params = {
            "ebm": optax.apply_updates(params["ebm"], ebm_up),
            "gen": optax.apply_updates(params["gen"], gen_up),
        }
        return (params, (ebm_opt, gen_opt)), stats

    return step


@functools.lru_cache(maxsize=64)
def compiled_train_step(spec: StepSpec, devices: tuple[Any, ...]) -> Callable[..., Any]:
    """The pmapped train step for this static spec and device tuple (cached: one compilation per shape).

    step(replicated (params, opt_states), x (n_dev, B/n_dev, H, W, C), key, hyper, (ebm_lr, gen_lr))
      -> (new replicated (params, opt_states), stats dict) with stats identical on every device."""
    return jax.pmap(
        device_train_step(spec), axis_name="batch", in_axes=(0, 0, None, None, None), devices=list(devices)
    )


def device_eval_step(spec: StepSpec) -> Callable[..., Any]:
    """The validation loss one device computes, averaged over the mapped axis "batch":
    step(params, x (B/n_dev, H, W, C), key, hyper) -> loss."""
    loss = loss_fn(spec, "batch")

    def step(params: Any, x: jax.Array, key: jax.Array, hp: Hyper) -> jax.Array:
        ids = _local_example_ids(x.shape[0], "batch")
        value, _ = loss(params, x, key, ids, hp)
        return jax.lax.pmean(value, "batch")

    return step


@functools.lru_cache(maxsize=64)
def compiled_eval_step(spec: StepSpec, devices: tuple[Any, ...]) -> Callable[..., Any]:
    """The pmapped loss on a batch without a parameter update (validation loss)."""
    return jax.pmap(
        device_eval_step(spec), axis_name="batch", in_axes=(0, 0, None, None), devices=list(devices)
    )


@functools.lru_cache(maxsize=16)
def _identity_pmap(devices: tuple[Any, ...]) -> Callable[[Any], Any]:
    return jax.pmap(lambda tree: tree, axis_name="batch", devices=list(devices))


def replicate(tree: Any, devices: Sequence[Any]) -> Any:
    """One copy of `tree` per device, laid out exactly as pmap lays out its outputs: handing pmap
    inputs with another sharding would make it compile the step a second time."""
    n = len(devices)
    host = jax.device_get(tree)  # whatever sharding it had (e.g. one slice of a pmap output)
    stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), host)
    return _identity_pmap(tuple(devices))(stacked)


def unreplicate(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


@functools.lru_cache(maxsize=16)
def compiled_generate(spec: StepSpec, num: int) -> Callable[..., Any]:
    nets = network_fns(spec)

    def generate(ebm_params: Any, gen_params: Any, key: jax.Array, hp: Hyper) -> jax.Array:
        z = sample_prior(nets, ebm_params, key, jnp.arange(num), spec.prior_steps, spec.z_dim, hp)
        return nets.generate(gen_params, z)

    return jax.jit(generate)
