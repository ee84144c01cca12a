"""What a run will cost before it runs: FLOPs, steps, device memory and hours per trial, from shapes only.

FLOPs are counted like `model.bench.train_step.step_flops` (XLA's cost analysis with every Langevin step
counted) but from a closed form, so an 85-cell grid plans in milliseconds. Per latent, let G be the
generator's forward FLOPs (its matmuls, 2 per multiply-add) and E the EBM's. Fitted to XLA's counts at the
digits and reference shapes (`tests/test_cost.py` holds them to 25%):

- a Langevin step on the posterior costs 2.2 G + 3 E per chain (forward, then the gradient with respect
  to z only); through a chain whose gradient the objective keeps (thermo, ebm_gradient=chains) 8.4 G + 9 E
  (the step's forward, its rematerialisation, and the transpose of its gradient);
- a prior step costs 3 E per chain (EBM only); the final loss and its parameter gradient 3 G + 6 E.

Hours divide FLOPs by the target's float32 peak times an assumed utilisation (`UTILISATION`, see
docs/gpu.md for why) until a GPU benchmark replaces the assumption with a measurement.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

from model.config import ExperimentConfig
from model.nets import JOINT_PHASES_MAX_FEATURES
from model.plan.memory import estimate_eval_memory, estimate_step_memory, generator_layers

GIB = 2**30
# InceptionV3-FID feature pass per image (resize to 299x299 included): XLA's cost analysis of
# model.metrics.inception.make_feature_fn, 1.10e10 at 32x32 and 64x64 inputs alike.
INCEPTION_FLOPS_PER_IMAGE = 1.10e10
# Assumed fraction of the float32 peak the step achieves (docs/gpu.md: the paper's own runs imply about
# 8 TFLOP/s by this count on their GPU; our CPU step reaches 24-41% of this machine's matmul rate).
UTILISATION = 0.35
# Headroom per device for the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation.
RESERVED_BYTES = 1 * GIB


@dataclass(frozen=True)
class Target:
    """A device to plan for: float32 peak FLOP/s (no tensor cores) and the memory a process can use."""

    name: str
    peak_flops: float
    memory_bytes: int

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - (RESERVED_BYTES if self.name != "cpu" else 0)


# Vendor float32 (non-tensor-core) peaks; memory as CUDA reports it (slightly under the marketed GB).
TARGETS = {
    "h100": Target("h100", 67e12, int(79.2 * GIB)),  # H100 SXM 80 GB
    "a100": Target("a100", 19.5e12, int(39.4 * GIB)),  # A100 40 GB (AWS p4d); 80 GB: --target-memory-gib 79
    "a10g": Target("a10g", 31.2e12, int(22.0 * GIB)),  # A10G 24 GB (AWS g5)
    "cpu": Target("cpu", 0.3e12, 16 * GIB),  # a 2-core host: ~300 GFLOP/s float32 matmul through JAX
}


def target_from(name: str | None, flops: float | None = None, memory_gib: float | None = None) -> Target:
    """The named target with optional overrides (peak FLOP/s, memory in GiB); a custom one needs both."""
    if name is None:
        if flops is None or memory_gib is None:
            raise ValueError(
                "a custom target needs both --target-flops and --target-memory-gib "
                f"(or --target {'|'.join(TARGETS)})"
            )
        return Target("custom", float(flops), int(memory_gib * GIB))
    if name not in TARGETS:
        raise ValueError(f"--target {name!r} is unknown; use one of {', '.join(TARGETS)}")
    t = TARGETS[name]
    return Target(
        t.name,
        float(flops) if flops else t.peak_flops,
        int(memory_gib * GIB) if memory_gib else t.memory_bytes,
    )


def generator_flops(config: ExperimentConfig) -> float:
    """G: forward FLOPs of the generator per latent, every transposed conv as the matmuls model.nets runs
    for conv_impl=phases."""
    total = 0.0
    for size, cin, _, cout in generator_layers(config):
        if size == 1:
            total += 2 * cin * 16 * cout
        elif cout <= JOINT_PHASES_MAX_FEATURES:  # one (h w) x (9 cin) @ (9 cin) x (4 cout) matmul
            total += 2 * size * size * 9 * cin * 4 * cout
        else:  # four output phases, each (h w) x (4 cin) @ (4 cin) x cout
            total += 4 * 2 * size * size * 4 * cin * cout
    return total


def ebm_flops(config: ExperimentConfig) -> float:
    """E: forward FLOPs of the EBM prior per latent."""
    w = config.ebm_width
    return 2.0 * (config.z_dim * w + w * w + w)


def step_flops(config: ExperimentConfig) -> float:
    """FLOPs of one train step's loss and gradient on the whole batch, every Langevin step counted."""
    g, e = generator_flops(config), ebm_flops(config)
    b = config.batch_size
    if config.is_thermo:
        per_step = 8.4 * g + 9 * e if config.ebm_gradient == "chains" else 2.2 * g + 3 * e
        chains = b * config.num_temps * config.chains_per_example
        # ebm_gradient=ml adds vanilla's prior chain on the (small) EBM
        prior = b * config.prior_steps * 3 * e if config.ebm_gradient == "ml" else 0.0
        return chains * (config.posterior_steps * per_step + 3 * g + 6 * e) + prior
    return b * (config.posterior_steps * (2.2 * g + 3 * e) + 3 * g + 6 * e + config.prior_steps * 3 * e)


def eval_step_flops(config: ExperimentConfig) -> float:
    """FLOPs of one validation-loss step (the chains and the loss, no parameter gradient)."""
    g, e = generator_flops(config), ebm_flops(config)
    b = config.batch_size
    chains = b * (config.num_temps * config.chains_per_example if config.is_thermo else 1)
    prior = 0 if config.is_thermo else b * config.prior_steps * 3 * e
    return chains * (config.posterior_steps * (2.2 * g + 3 * e) + g + 2 * e) + prior


def evaluation_flops(config: ExperimentConfig) -> float:
    """FLOPs of one KID_inf/FID_inf evaluation: eval_num_max images generated (prior Langevin, then g),
    their InceptionV3 features (digits: a small MLP, counted as nothing); real features are computed once
    per trial and left out."""
    n = config.eval_num_max
    gen = n * (config.prior_steps * 3 * ebm_flops(config) + generator_flops(config))
    return gen + (0 if config.dataset == "digits" else n * INCEPTION_FLOPS_PER_IMAGE)


def steps_per_epoch(config: ExperimentConfig) -> int:
    return config.num_train // config.batch_size


def trial_flops(config: ExperimentConfig) -> float:
    """Everything one trial computes: epochs x (train steps + validation steps) + every evaluation."""
    val_steps = config.num_val // config.batch_size
    per_epoch = steps_per_epoch(config) * step_flops(config) + val_steps * eval_step_flops(config)
    evals = 0
    if config.eval_every:
        evals = sum(
            1 for e in range(1, config.epochs + 1) if e % config.eval_every == 0 or e == config.epochs
        )
    return config.epochs * per_epoch + evals * evaluation_flops(config)


@dataclass(frozen=True)
class CellPlan:
    """One cell on one target: the numbers `--dry-run` prints and the verdict."""

    name: str
    step_flops: float
    eval_flops: float
    steps_per_epoch: int
    memory_bytes: int  # peak per device at gpus_per_trial devices
    devices: int  # devices per trial this plan assumes (ceil of gpus_per_trial)
    trial_hours: float
    trials_per_device: int  # how many trials of this cell share one device (0: does not fit)
    fix: str  # empty when it fits


def _fits(config: ExperimentConfig, target: Target, devices: int, backend: str) -> bool:
    return estimate_step_memory(config, devices, backend) <= target.usable_bytes


def _largest_fitting(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [low, high] with `fits(n)`, for a `fits` that holds up to some n and fails above
    it (memory grows with the batch and the temperature count): a bisection, so a value of 10^8 costs
    about 27 probes, not 10^8. None when `fits(low)` fails."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def suggest_fix(config: ExperimentConfig, target: Target, devices: int, backend: str) -> str:
    """What makes the step fit `target`: more devices per trial, a smaller batch, fewer temperatures.

    The probes build configs nobody asked for (e.g. a batch too small for kl_batch's Gaussians): their
    validation warnings are not the user's and are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = []
        for n in range(2, 9):
            if n > devices and config.batch_size % n == 0 and _fits(config, target, n, backend):
                options.append(f"--gpus-per-trial {n}")
                break
        b = _largest_fitting(
            1,
            config.batch_size - 1,
            lambda b: _fits(
                replace(config, batch_size=b, num_train=max(config.num_train, b)), target, devices, backend
            ),
        )
        if b is not None:
            options.append(f"--set batch_size={b} (or smaller)")
        if config.is_thermo:
            nt = _largest_fitting(
                2,
                config.num_temps - 1,
                lambda nt: _fits(replace(config, num_temps=nt), target, devices, backend),
            )
            if nt is not None:
                options.append(f"--set num_temps={nt} (or fewer)")
    if config.conv_impl != "lax":
        options.append("--set conv_impl=lax (no phase patches: about 1/14 of the activations)")
    return "; or ".join(options) if options else "no single change fits; use a device with more memory"


def plan_cell(name: str, config: ExperimentConfig, target: Target, gpus_per_trial: float = 1.0) -> CellPlan:
    """Flops, memory and hours of one cell on `target` with `gpus_per_trial` devices per trial."""
    devices = max(1, math.ceil(gpus_per_trial)) if gpus_per_trial > 0 else 1
    backend = "cpu" if target.name == "cpu" else "gpu"
    memory = estimate_step_memory(config, devices, backend)
    memory = max(memory, estimate_eval_memory(config, devices, backend))
    rate = target.peak_flops * UTILISATION * devices
    hours = trial_flops(config) / rate / 3600
    per_device = target.usable_bytes // memory if memory <= target.usable_bytes else 0
    fix = "" if per_device else suggest_fix(config, target, devices, backend)
    return CellPlan(
        name,
        step_flops(config),
        evaluation_flops(config),
        steps_per_epoch(config),
        memory,
        devices,
        hours,
        int(min(per_device, 8)),
        fix,
    )


def suggested_gpus_per_trial(plans: list[CellPlan]) -> float:
    """The --gpus-per-trial fraction every cell fits: 1/k for the k trials the heaviest cell allows per
    device (k <= 4: several trials on a device also share its compute, so packing mostly saves idle
    time, not hours)."""
    k = min((p.trials_per_device for p in plans), default=1)
    return 1.0 / min(max(k, 1), 4)


def refusal(plans: list[CellPlan], target: Target) -> str | None:
    """One line per cell that cannot fit `target`, naming the memory it needs and the fix; None if all fit."""
    bad = [p for p in plans if not p.trials_per_device]
    if not bad:
        return None
    lines = [
        f"cell {p.name!r} needs {p.memory_bytes / GIB:.1f} GiB per device on {p.devices} {target.name} "
        f"device(s) ({target.usable_bytes / GIB:.1f} GiB usable): {p.fix}"
        for p in bad
    ]
    return "\n".join(lines)


def format_plan(plans: list[CellPlan], repetitions: int, target: Target | None) -> str:
    """The --dry-run table of a plan; with a target, hours, trials per device and the totals."""
    head = f"{'cell':34s} {'TFLOP/step':>10s} {'TFLOP/eval':>10s} {'steps/ep':>8s} {'GiB/dev':>8s}"
    if target is not None:
        head += f" {'h/trial':>8s} {'per dev':>7s}"
    rows = [head]
    for p in plans:
        row = (
            f"{p.name:34s} {p.step_flops / 1e12:10.3f} {p.eval_flops / 1e12:10.3f} "
            f"{p.steps_per_epoch:8d} {p.memory_bytes / GIB:8.2f}"
        )
        if target is not None:
            row += f" {p.trial_hours:8.2f} {p.trials_per_device or 'NO FIT':>7}"
        rows.append(row)
    if target is None:
        rows.append("(memory per device; name a device with --target h100|a100|a10g|cpu for hours and fit)")
        return "\n".join(rows)
    device_hours = sum(p.trial_hours * p.devices for p in plans) * repetitions
    rows.append(
        f"target {target.name}: {target.peak_flops / 1e12:.1f} TFLOP/s float32 peak x "
        f"{UTILISATION:.0%} assumed utilisation, {target.usable_bytes / GIB:.1f} GiB usable"
    )
    rows.append(
        f"whole run: {len(plans) * repetitions} trials, {device_hours:.1f} device-hours; "
        f"suggested --gpus-per-trial {suggested_gpus_per_trial(plans):.2f}"
    )
    return "\n".join(rows)
