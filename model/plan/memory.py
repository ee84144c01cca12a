"""Peak device memory of a train step, estimated from shapes alone, before anything is compiled.

A plan of an 85-cell grid, or a refusal of an absurd `num_temps`, must not compile 85 steps. The estimate
counts what XLA keeps alive at the step's peak:

- arguments and outputs: parameters and both Adam moments (in and out: the step does not donate its
  carry), the local batch;
- temporaries: the gradients, the Langevin noise, and the activations of the generator for every chain
  at once. The generator dominates: its activations per latent (`activation_floats`) times the number of
  chains on a device (B / n_devices for vanilla; N_t B / n_devices for thermo) times a factor that says
  how many copies the step's autodiff keeps (`_KEEP`):
  * vanilla and stop-gradient thermo: the chains need no gradient with respect to the parameters, so
    only one Langevin step is alive at a time; the peak is the final g(z) with its backward pass (one
    copy of the activations: the backward pass reuses the forward's buffers as it frees them);
  * thermo with chain gradients: the outer gradient runs back through every chain step, each
    rematerialised (`jax.checkpoint` in model.langevin), so one step's forward, its inner gradient and
    that gradient's transpose are alive together (about 2.3 copies), plus z of every step.

The factors were fitted to XLA's compiled memory analysis on the CPU backend (`tests/test_memory.py`
checks the estimate against it at the digits, reference and paper shapes, within 30%). GPU backends
fuse differently, so read the figure as the size of the problem, not a promise to the byte; the first
GPU run records XLA's own figure (`python -m model.bench`).

`conv_impl` changes the count: "phases" (model.nets.UpConv) materialises, per stride-2 layer, the padded
input and four 2x2 patch matrices (4x the input channels at the input's resolution), 16x the layer's
input (9x for the image layer: one 3x3 patch matrix); "lax" (the backend's transposed convolution) keeps
about the layer outputs. At the paper's shapes that is 14 MB against 1 MB per latent: with "phases" the
step needs ~15x the memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import ExperimentConfig
from model.nets import JOINT_PHASES_MAX_FEATURES, resolve_conv_impl

FLOAT_BYTES = 4  # float32 throughout
ADAM_COPIES = 3  # parameters, first and second moments
# Copies of the generator's per-chain activations alive at the step's peak (see the module docstring),
# fitted to XLA's CPU memory analysis (digits, reference and paper shapes).
_KEEP = {"forward_backward": 1.05, "chain_gradient": 2.35, "forward": 1.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one compiled function, by what holds them."""

    arguments: int
    outputs: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries


def resolved_conv_impl(config: ExperimentConfig, backend: str | None = None) -> str:
    """The transposed-convolution implementation the step of `config` uses on `backend`."""
    return resolve_conv_impl(config.conv_impl, backend)


def generator_layers(config: ExperimentConfig) -> list[tuple[int, int, int, int]]:
    """(input size, input channels, output size, output channels) of each generator layer (model.nets)."""
    doublings = int(math.log2(config.image_size)) - 2
    ch = config.gen_width * 16
    layers = [(1, config.z_dim, 4, ch)]
    size = 4
    for _ in range(doublings - 1):
        out = max(ch // 2, 1)
        layers.append((size, ch, 2 * size, out))
        size, ch = 2 * size, out
    layers.append((size, ch, 2 * size, config.channels))
    return layers


def activation_floats(config: ExperimentConfig, conv_impl: str = "phases") -> int:
    """Floats the generator materialises per latent in one forward pass (the buffers its backward
    pass needs): each layer's output and, with "phases", each stride-2 layer's padded input and its four
    patch matrices (h w 4c each). With "lax" the backend's convolution keeps no patches (fitted to XLA's
    CPU analysis: its scratch is about the size of the outputs, counted by the _KEEP factors)."""
    total = 2 * config.ebm_width + 1
    for size, cin, out_size, cout in generator_layers(config):
        total += out_size * out_size * cout
        if size > 1 and conv_impl == "phases":
            total += (size + 2) ** 2 * cin + _patch_floats(size, cin, cout)
    return total


def _patch_floats(size: int, cin: int, cout: int) -> int:
    """Floats of the patch matrices of a stride-2 "phases" layer: four 2x2 ones (4c wide each), or for a
    layer with few outputs one 3x3 one (9c wide) and its interleaved 4-phase output (model.nets)."""
    if cout <= JOINT_PHASES_MAX_FEATURES:
        return size * size * (9 * cin + 4 * cout)
    return 4 * size * size * 4 * cin


def layer_peak_floats(config: ExperimentConfig, conv_impl: str = "phases") -> int:
    """Floats alive per latent at the largest layer of a forward pass that keeps nothing for a backward
    pass (generation): the layer's input, and output, with "phases" also its padded input and patches."""
    peak = 0
    for size, cin, out_size, cout in generator_layers(config):
        here = size * size * cin + out_size * out_size * cout
        if size > 1 and conv_impl == "phases":
            # the one 3x3 patch matrix of a layer with few outputs is built from nine slices that XLA
            # keeps alive beside it (fitted to XLA's CPU analysis of generation)
            copies = 2 if cout <= JOINT_PHASES_MAX_FEATURES else 1
            here += (size + 2) ** 2 * cin + copies * _patch_floats(size, cin, cout)
        peak = max(peak, here)
    return peak


def parameter_count(config: ExperimentConfig) -> tuple[int, int]:
    """(EBM, generator) parameter counts, as model.nets builds them."""
    w, d = config.ebm_width, config.z_dim
    ebm = (d * w + w) + (w * w + w) + (w + 1)
    gen = sum(16 * cin * cout + cout for _, cin, _, cout in generator_layers(config))
    return ebm, gen


def _chains(config: ExperimentConfig, local_batch: int) -> int:
    """Posterior chains of a step: one per example (vanilla), M per example and temperature (thermo)."""
    return local_batch * (config.num_temps * config.chains_per_example if config.is_thermo else 1)


def through_chains(config: ExperimentConfig) -> bool:
    """Whether the step differentiates through the Langevin chains (thermo with ebm_gradient=chains)."""
    return config.is_thermo and config.ebm_gradient == "chains"


def _local_batch(config: ExperimentConfig, n_devices: int) -> int:
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be >= 1")
    return -(-config.batch_size // n_devices)


def step_memory(config: ExperimentConfig, n_devices: int = 1, backend: str | None = None) -> MemoryEstimate:
    """The train step's peak device memory per device, by arguments, outputs and temporaries."""
    b = _local_batch(config, n_devices)
    params = sum(parameter_count(config))
    batch = b * config.image_size**2 * config.channels
    state = ADAM_COPIES * params
    chains = _chains(config, b)
    acts = activation_floats(config, resolved_conv_impl(config, backend))
    if through_chains(config):
        keep = _KEEP["chain_gradient"]
        # z of every step is kept for the rematerialised backward pass; noise for every step is drawn
        trail = 2 * (config.posterior_steps + 1) * chains * config.z_dim
    else:
        keep = _KEEP["forward_backward"]
        steps = config.posterior_steps + (0 if config.is_thermo else config.prior_steps)
        trail = (steps + 2) * chains * config.z_dim
    # g(z), x - g(z) and its cotangent, per chain (the thermo loss broadcasts x over N_t and the M chains)
    images = 3 * batch * (config.num_temps * config.chains_per_example if config.is_thermo else 1)
    temporaries = keep * chains * acts + trail + 2 * params + images
    return MemoryEstimate(FLOAT_BYTES * (state + batch), FLOAT_BYTES * state, int(FLOAT_BYTES * temporaries))


def estimate_step_memory(config: ExperimentConfig, n_devices: int = 1, backend: str | None = None) -> int:
    """Bytes of peak device memory of one train step of `config` on each of `n_devices` devices
    (arguments + outputs + temporaries), from shapes only: no tracing, no compiling."""
    return step_memory(config, n_devices, backend).total


def estimate_eval_memory(config: ExperimentConfig, n_devices: int = 1, backend: str | None = None) -> int:
    """Bytes per device of the validation-loss step (the objective without a parameter update): the
    chains' inner gradients with one Langevin step alive, then the loss's forward pass."""
    b = _local_batch(config, n_devices)
    params = sum(parameter_count(config))
    batch = b * config.image_size**2 * config.channels
    chains = _chains(config, b)
    acts = activation_floats(config, resolved_conv_impl(config, backend))
    steps = config.posterior_steps + (0 if config.is_thermo else config.prior_steps)
    temporaries = _KEEP["forward_backward"] * chains * acts + (steps + 2) * chains * config.z_dim
    return int(FLOAT_BYTES * (params + batch + temporaries))


def estimate_generate_memory(config: ExperimentConfig, num: int = 500, backend: str | None = None) -> int:
    """Bytes of one generation batch (prior Langevin on the EBM, then g(z) for `num` latents, forward
    only: the generator's largest layer is alive, not all of them)."""
    params = sum(parameter_count(config))
    acts = layer_peak_floats(config, resolved_conv_impl(config, backend))
    images = num * config.image_size**2 * config.channels
    return int(
        FLOAT_BYTES
        * (params + _KEEP["forward"] * num * acts + images + (config.prior_steps + 2) * num * config.z_dim)
    )
