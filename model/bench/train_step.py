"""Train-step benchmark: `python -m model.bench [--suite S] [--only NAME] [--compare-conv] [--json]
[--interleave ROUNDS]`.

Times the real pmapped train step (model.step.compiled_train_step) per workload: images/s, compile time,
XLA's static peak-memory estimate beside the pre-compile one (model.plan.memory), FLOPs per step counted with
loop trip counts, the achieved FLOP rate and its fraction of the device's float32 peak (a GPU's vendor
peak by its device kind; on a CPU this machine's measured matmul rate). Every row says which conv_impl
ran and the load average it ran under.

Suites: `small` (digits and the `ref-*` shapes, where the paper's public code can be run side by side:
docs/gpu.md) runs by default on a CPU; `paper` (the paper's shapes at the grids' heaviest cells, CelebA
64x64 and CIFAR-10 32x32) by default on a GPU. `--compare-conv` times each workload with both
transposed-convolution implementations and names the faster one for `model.nets.MEASURED_FASTEST_CONV`.
No ratio against another code base is printed: such a ratio only means something when both ran in one
session on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import loop
from model.config import ExperimentConfig, RankDeficientKLWarning, get_preset
from model.nets import resolve_conv_impl
from model.objectives import Hyper
from model.plan import cost, memory
from model.step import StepSpec, compiled_train_step, loss_fn

_REF = dict(
    batch_size=25,
    z_dim=32,
    ebm_width=64,
    gen_width=8,
    prior_steps=20,
    posterior_steps=10,
    num_temps=5,
    temp_power=1.0,
    kl_weight=1.0,
    eval_every=0,
)


def workloads(suite: str = "small") -> dict[str, ExperimentConfig]:
    """The benchmark workloads of `suite` (small, paper or all) by name, in the order they run.

    Several are the paper's own settings with kl_batch at batch <= z_dim: they are timed, their estimates
    are not read, so the rank warning addressed to someone training them is left out (that one only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientKLWarning)
        return _workloads(suite)


def _workloads(suite: str) -> dict[str, ExperimentConfig]:
    digits = get_preset("digits", eval_every=0)
    small = {
        "digits-vanilla": digits,
        "digits-thermo-nt5": get_preset("digits", eval_every=0, objective="thermo", num_temps=5),
        "digits-thermo-nt10": get_preset("digits", eval_every=0, objective="thermo", num_temps=10),
        "digits-thermo-nt20": get_preset("digits", eval_every=0, objective="thermo", num_temps=20),
        # same shapes as digits-thermo-nt5, other p / eta / step size: must reuse its compiled step
        "digits-thermo-nt5-other-cell": get_preset(
            "digits",
            eval_every=0,
            objective="thermo",
            num_temps=5,
            temp_power=6.0,
            kl_weight=3.0,
            posterior_step_size=0.02,
        ),
        "ref-vanilla": get_preset("cifar10", **_REF),
        "ref-thermo-nt5": get_preset("cifar10", **_REF, objective="thermo", ebm_gradient="none"),
        "ref-thermo-nt10": get_preset(
            "cifar10", **(_REF | dict(num_temps=10)), objective="thermo", ebm_gradient="none"
        ),
        "ref-thermo-nt5-chain": get_preset("cifar10", **_REF, objective="thermo", ebm_gradient="chains"),
        # the maximum-likelihood EBM gradient: one extra prior chain, no backprop through the chains
        "ref-thermo-nt5-ml": get_preset("cifar10", **_REF, objective="thermo", ebm_gradient="ml"),
        # per-example Gaussians from M = 8 chains per example: time and memory linear in M
        "ref-thermo-nt5-kl-example-m8": get_preset(
            "cifar10",
            **_REF,
            objective="thermo",
            ebm_gradient="none",
            ti_rule="kl_example",
            chains_per_example=8,
        ),
    }
    # The heaviest cells of paper-celeba and paper-cifar10 (and the paper's own timed setting, stop-gradient
    # thermo at N_t = 10), at the grids' shapes.
    paper = {
        "celeba-vanilla-b150": get_preset("celeba", eval_every=0, batch_size=150),
        "celeba-thermo-nt30": get_preset(
            "celeba", eval_every=0, objective="thermo", num_temps=30, temp_power=0.1
        ),
        "celeba-thermo-nt10-stopgrad": get_preset(
            "celeba", eval_every=0, objective="thermo", ebm_gradient="none"
        ),
        "cifar10-vanilla-b150": get_preset("cifar10", eval_every=0, batch_size=150),
        "cifar10-thermo-nt10": get_preset("cifar10", eval_every=0, objective="thermo", temp_power=0.1),
    }
    return {"small": small, "paper": paper, "all": small | paper}[suite]


# Vendor float32 peaks (no tensor cores) by a substring of the JAX device kind, most specific first.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 51e12),
    ("H100", 67e12),
    ("H200", 67e12),
    ("A100", 19.5e12),
    ("A10G", 31.2e12),
    ("L40S", 91.6e12),
    ("L4", 30.3e12),
    ("V100", 15.7e12),
    ("T4", 8.1e12),
)


def device_peak_flops(device: Any, machine_gflops: float | None) -> tuple[float | None, str]:
    """The device's float32 peak FLOP/s and where the figure comes from."""
    if device.platform == "cpu":
        return (machine_gflops * 1e9 if machine_gflops else None), "measured 2048^2 matmul"
    for name, peak in GPU_PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return peak, f"vendor float32 peak of {name}"
    return None, "unknown device kind"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 n x n matmul rate through JAX, GFLOP/s (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(config: ExperimentConfig) -> float:
    """FLOPs of one loss+gradient evaluation with every Langevin step counted.

    XLA's cost analysis counts a loop body once, so the chains are unrolled here: F(K) is measured at
    K = 1 and K = 2 and extended linearly, F(K) = F(1) + (K - 1) (F(2) - F(1)), separately for the prior
    and posterior chains. The optimiser update (a few FLOPs per parameter) is left out."""

    def flops(prior_steps: int, posterior_steps: int) -> float:
        cfg = dataclasses.replace(config, prior_steps=prior_steps, posterior_steps=posterior_steps)
        spec = StepSpec.from_config(cfg)
        loss = loss_fn(spec, None, unroll=True)
        state = loop.init_state(cfg)
        params = {"ebm": state.ebm_params, "gen": state.gen_params}
        x = jnp.zeros((cfg.batch_size,) + cfg.image_shape, jnp.float32)
        fn = jax.jit(
            jax.value_and_grad(
                lambda p: loss(p, x, state.key, jnp.arange(cfg.batch_size), Hyper.from_config(cfg))[0]
            )
        )
        cost = fn.lower(params).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    base = flops(1, 1)
    per_post = flops(1, 2) - base
    per_prior = flops(2, 1) - base if config.objective == "vanilla" else 0.0
    return base + (config.posterior_steps - 1) * per_post + (config.prior_steps - 1) * per_prior


def run_workload(
    name: str,
    config: ExperimentConfig,
    steps: int,
    devices: list[Any],
    machine_gflops: float | None,
    xla_flops: bool = True,
) -> dict[str, Any]:
    """Time `steps` train steps after the compiling first one. Returns one result row."""
    compiles: list[float] = []

    def listener(event: str, duration: float, **_: Any) -> None:
        if "backend_compile" in event:
            compiles.append(duration)

    spec = StepSpec.from_config(config)
    step = compiled_train_step(spec, tuple(devices))
    state = loop.init_state(config)
    carry, lrs = loop.step_inputs(config, state, 1, devices)
    hp = Hyper.from_config(config)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (len(devices), config.batch_size // len(devices)) + config.image_shape)
    x = x.astype(np.float32)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        start = time.perf_counter()
        carry, stats = step(carry, x, state.key, hp, lrs)
        jax.block_until_ready(stats)
        first = time.perf_counter() - start
    finally:
        jax.monitoring.clear_event_listeners()
    times = []
    key = state.key
    for _ in range(steps):
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        carry, stats = step(carry, x, sub, hp, lrs)
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    peak_bytes = _peak_bytes(step, carry, x, key, hp, lrs)
    flops = step_flops(config) if xla_flops else cost.step_flops(config)
    peak, peak_source = device_peak_flops(devices[0], machine_gflops)
    row = {
        "name": name,
        "backend": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "conv_impl": spec.conv_impl,
        "load_avg_1m": os.getloadavg()[0],
        "objective": config.objective,
        "num_temps": config.num_temps if config.is_thermo else None,
        **{
            f: getattr(config, f) if config.is_thermo else None
            for f in ("ti_rule", "chains_per_example", "ebm_gradient", "gen_gradient")
        },
        "batch_size": config.batch_size,
        "image_shape": list(config.image_shape),
        "devices": len(devices),
        "images_per_s": config.batch_size / step_s,
        "step_s": step_s,
        "compile_s": max(first - step_s, 0.0),
        "recompiled": bool(compiles),
        "compiles": len(compiles),
        "peak_bytes": peak_bytes,
        "estimated_peak_bytes": memory.estimate_step_memory(config, len(devices)),
        "flops_per_step": flops,
        "flops_counted_by": "xla" if xla_flops else "closed form (model.plan.cost)",
        "gflops_per_s": flops / step_s / 1e9,
        "peak_flops": peak,
        "peak_source": peak_source,
    }
    if peak:
        row["fraction_of_peak"] = flops / step_s / peak
    return row


def interleaved(
    names: list[str], configs: dict[str, ExperimentConfig], rounds: int, devices: list[Any]
) -> dict[str, float]:
    """Median images/s of each workload timed one step per round in turn, so a machine whose load moves
    affects them alike (for ratios on a shared machine). Compiles each step before the first round."""
    runs = {}
    for name in names:
        config = configs[name]
        step = compiled_train_step(StepSpec.from_config(config), tuple(devices))
        state = loop.init_state(config)
        carry, lrs = loop.step_inputs(config, state, 1, devices)
        x = (
            np.random.default_rng(0)
            .uniform(-1, 1, (len(devices), config.batch_size // len(devices)) + config.image_shape)
            .astype(np.float32)
        )
        hp = Hyper.from_config(config)
        carry, stats = step(carry, x, state.key, hp, lrs)
        jax.block_until_ready(stats)
        runs[name] = {
            "step": step,
            "carry": carry,
            "x": x,
            "hp": hp,
            "lrs": lrs,
            "key": state.key,
            "times": [],
        }
    for _ in range(rounds):
        for r in runs.values():
            r["key"], sub = jax.random.split(r["key"])
            start = time.perf_counter()
            r["carry"], stats = r["step"](r["carry"], r["x"], sub, r["hp"], r["lrs"])
            jax.block_until_ready(stats)
            r["times"].append(time.perf_counter() - start)
    return {n: configs[n].batch_size / float(np.median(r["times"])) for n, r in runs.items()}


def _peak_bytes(step: Any, *args: Any) -> int | None:
    """XLA's static estimate of the step's device memory: arguments + outputs + temporaries."""
    try:
        mem = step.lower(*args).compile().memory_analysis()
    except Exception:  # not every backend/version reports it
        return None
    mem = mem[0] if isinstance(mem, list) else mem
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def format_row(r: dict[str, Any]) -> str:
    mem = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r.get("peak_bytes") else "n/a"
    frac = f" = {100 * r['fraction_of_peak']:.0f}% of peak" if "fraction_of_peak" in r else ""
    return (
        f"{r['name']:30s} {r['images_per_s']:8.2f} img/s  step {r['step_s']:.3f}s  compile "
        f"{r['compile_s']:.1f}s{' (recompiled)' if r['recompiled'] else ' (cached)'}  peak {mem} "
        f"(est. {r['estimated_peak_bytes'] / 2**20:.0f})  {r['gflops_per_s']:.1f} GFLOP/s{frac}  "
        f"{r['conv_impl']}  load {r['load_avg_1m']:.1f}"
    )


def compare_conv(
    names: list[str],
    all_workloads: dict[str, ExperimentConfig],
    steps: int,
    devices: list[Any],
    machine: float | None,
    emit: Any,
) -> str:
    """Time every workload with conv_impl phases and lax; returns the verdict line."""
    wins = {"phases": 0, "lax": 0}
    for name in names:
        rates = {}
        for impl in ("phases", "lax"):
            config = dataclasses.replace(all_workloads[name], conv_impl=impl)
            row = run_workload(f"{name}[{impl}]", config, steps, devices, machine, xla_flops=False)
            rates[impl] = row["images_per_s"]
            emit(row)
        best = max(rates, key=rates.get)
        wins[best] += 1
        other = "lax" if best == "phases" else "phases"
        print(f"{name}: {best} is {rates[best] / rates[other]:.2f}x {other}", flush=True)
    backend = devices[0].platform
    best = max(wins, key=wins.get)
    return (
        f"fastest on {backend}: {best} ({wins[best]} of {len(names)} workloads); "
        f"model.nets.MEASURED_FASTEST_CONV[{backend!r}] is "
        f"{resolve_conv_impl('auto', backend)!r}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.bench`."""
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--suite",
        choices=("auto", "small", "paper", "all"),
        default="auto",
        help="auto: small on a CPU, paper on a GPU",
    )
    parser.add_argument("--only", action="append", help="run only this workload (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per workload (median reported)")
    parser.add_argument("--devices", type=int, default=1, help="local devices to pmap over")
    parser.add_argument(
        "--compare-conv",
        action="store_true",
        help="time each workload with conv_impl phases and lax and name the faster",
    )
    parser.add_argument("--list", action="store_true", help="list workload names and exit")
    parser.add_argument(
        "--interleave",
        type=int,
        metavar="ROUNDS",
        help="time the --only workloads one step each per round for ROUNDS rounds and print "
        "median images/s and ratios to the first (for a machine whose load moves)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    suite = args.suite if args.suite != "auto" else ("small" if jax.default_backend() == "cpu" else "paper")
    all_workloads = workloads("all")
    if args.list:
        print("\n".join(workloads(suite)))
        return 0
    names = args.only or list(workloads(suite))
    unknown = [n for n in names if n not in all_workloads]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; use --list --suite all to see them")
    devices = jax.local_devices()[: args.devices]
    if args.interleave:
        rates = interleaved(names, all_workloads, args.interleave, devices)
        for name, rate in rates.items():
            print(f"{name:30s} {rate:8.2f} img/s  ({rate / rates[names[0]]:.2f}x {names[0]})", flush=True)
        return 0
    machine = matmul_gflops()
    if not args.json:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(
            f"{jax.default_backend()} x{len(devices)} ({devices[0].device_kind}); float32 2048^2 matmul: "
            f"{machine:.0f} GFLOP/s; load average {load}",
            flush=True,
        )

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row) if args.json else format_row(row), flush=True)

    if args.compare_conv:
        print(compare_conv(names, all_workloads, args.steps, devices, machine, emit), flush=True)
        return 0
    rows = []
    for name in names:
        row = run_workload(name, all_workloads[name], args.steps, devices, machine)
        rows.append(row)
        emit(row)
    by = {r["name"]: r for r in rows}
    if not args.json and "digits-thermo-nt10" in by and "digits-thermo-nt20" in by:
        ratio = by["digits-thermo-nt20"]["step_s"] / by["digits-thermo-nt10"]["step_s"]
        print(f"thermo step cost N_t=20 / N_t=10: {ratio:.2f}x (target <= 2.1x)")
    return 0
