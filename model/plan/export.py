"""Lower every compiled function a sweep runs for a platform that is not present (CUDA on a CPU host).

`jax.export.export(jax.jit(f), platforms=["cuda"])` traces `f` and lowers it to StableHLO with the CUDA
platform's lowering rules (custom calls for Cholesky and triangular solves, the GPU lowering of
convolutions, of `lax.scan` with `jax.checkpoint`, of the PRNG). It fails if any operation has no CUDA
lowering. It does not compile (XLA's GPU compiler never runs) and does not run: it proves nothing about
speed, device memory, numerical agreement or the CUDA/cuDNN versions a machine has.

The train and evaluation steps run under `jax.pmap`, which `jax.export` does not take; what is exported is
the per-device function pmap maps (`model.step.device_train_step`), its collectives (`pmean`,
`axis_index`, `psum`) bound by `jax.shard_map` over a one-device mesh with the same axis name, so the
exported module contains the step's collectives as a GPU would see them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from model.config import ExperimentConfig
from model.loop import init_state, step_inputs
from model.objectives import Hyper
from model.step import StepSpec, compiled_generate, device_eval_step, device_train_step


def _on_one_device_mesh(fn: Callable[..., Any], n_args: int) -> Callable[..., Any]:
    """`fn` with its "batch"-axis collectives bound over a one-device mesh (check_vma off: as under pmap,
    gradients stay per device and the step's own pmean averages them)."""
    mesh = jax.make_mesh((1,), ("batch",), devices=jax.devices()[:1])
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(PartitionSpec(),) * n_args, out_specs=PartitionSpec(), check_vma=False
    )


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def step_arguments(config: ExperimentConfig) -> dict[str, tuple[Any, ...]]:
    """Abstract arguments (shapes and dtypes) of the train step, evaluation step and generation of
    `config`, one device's share of the batch."""
    state = init_state(config)
    devices = jax.local_devices()[:1]
    carry, lrs = step_inputs(config, state, 1, devices)
    carry = jax.tree.map(lambda x: x[0], carry)
    x = np.zeros((config.batch_size,) + config.image_shape, np.float32)
    hp = Hyper.from_config(config)
    params = {"ebm": state.ebm_params, "gen": state.gen_params}
    return {
        "train_step": _abstract((carry, x, state.key, hp, lrs)),
        "eval_step": _abstract((params, x, state.key, hp)),
        "generate": _abstract((state.ebm_params, state.gen_params, state.key, hp)),
    }


def export_step_functions(
    config: ExperimentConfig, platforms: Sequence[str] = ("cuda",), generate_batch: int = 8
) -> dict[str, jax.export.Exported]:
    """The train step, the validation-loss step and generation of `config` exported for `platforms`.
    Raises whatever jax.export raises when an operation cannot be lowered."""
    spec = StepSpec.from_config(config)
    args = step_arguments(config)
    fns = {
        "train_step": jax.jit(_on_one_device_mesh(device_train_step(spec), 5)),
        "eval_step": jax.jit(_on_one_device_mesh(device_eval_step(spec), 4)),
        "generate": compiled_generate(spec, generate_batch),
    }
    return {name: jax.export.export(fn, platforms=list(platforms))(*args[name]) for name, fn in fns.items()}


def export_inception(
    platforms: Sequence[str] = ("cuda",), batch: int = 2, image_size: int = 32, channels: int = 3
) -> jax.export.Exported:
    """The InceptionV3-FID feature pass exported for `platforms` on a batch of generated-size images (the
    resize to 299x299 included), with the weights an argument (random ones: lowering needs only their
    shapes) so they are not baked into the module as constants."""
    from model.metrics import inception

    model = inception.InceptionV3FID()

    def features(variables: Any, images: jax.Array) -> jax.Array:  # inception.make_feature_fn's body
        return model.apply(variables, inception.resize_for_inception(images))

    variables = _abstract(inception.random_variables())
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), np.float32)
    return jax.export.export(jax.jit(features), platforms=list(platforms))(variables, images)
