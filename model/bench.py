"""Train-step benchmark: `python -m model.bench [--json] [--only NAME] [--steps N]`.

Times the real pmapped train step (model.step.compiled_train_step) per workload: images/s, compile time,
XLA's static peak-memory estimate, FLOPs per step counted with loop trip counts, and the achieved FLOP rate
next to this machine's float32 matmul rate. The `ref-*` workloads are the shapes at which the paper's
public JAX code was measured on a 2-core machine of this kind (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import loop
from model.config import ExperimentConfig, get_preset
from model.objectives import Hyper
from model.step import StepSpec, compiled_train_step, loss_fn

# The paper's code at these shapes, 2-core machine (images/s): the bar this implementation must clear 2x.
REFERENCE_IMAGES_PER_S = {"ref-vanilla": 66.0, "ref-thermo-nt5": 8.6, "ref-thermo-nt10": 4.8,
                          "ref-thermo-nt5-chain": 1.42}
_REF = dict(batch_size=25, z_dim=32, ebm_width=64, gen_width=8, prior_steps=20, posterior_steps=10,
            num_temps=5, temp_power=1.0, kl_weight=1.0, eval_every=0)


def workloads() -> dict[str, ExperimentConfig]:
    """Every benchmark workload by name, in the order they run."""
    digits = get_preset("digits", eval_every=0)
    w = {
        "digits-vanilla": digits,
        "digits-thermo-nt5": get_preset("digits", eval_every=0, objective="thermo", num_temps=5),
        "digits-thermo-nt10": get_preset("digits", eval_every=0, objective="thermo", num_temps=10),
        "digits-thermo-nt20": get_preset("digits", eval_every=0, objective="thermo", num_temps=20),
        # same shapes as digits-thermo-nt5, other p / eta / step size: must reuse its compiled step
        "digits-thermo-nt5-other-cell": get_preset("digits", eval_every=0, objective="thermo", num_temps=5,
                                                   temp_power=6.0, kl_weight=3.0, posterior_step_size=0.02),
        "ref-vanilla": get_preset("cifar10", **_REF),
        "ref-thermo-nt5": get_preset("cifar10", **_REF, objective="thermo", chain_gradient=False),
        "ref-thermo-nt10": get_preset("cifar10", **(_REF | dict(num_temps=10)), objective="thermo",
                                      chain_gradient=False),
        "ref-thermo-nt5-chain": get_preset("cifar10", **_REF, objective="thermo", chain_gradient=True),
    }
    return w


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
        fn = jax.jit(jax.value_and_grad(lambda p: loss(p, x, state.key, jnp.arange(cfg.batch_size),
                                                       Hyper.from_config(cfg))[0]))
        cost = fn.lower(params).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    base = flops(1, 1)
    per_post = flops(1, 2) - base
    per_prior = flops(2, 1) - base if config.objective == "vanilla" else 0.0
    return base + (config.posterior_steps - 1) * per_post + (config.prior_steps - 1) * per_prior


def run_workload(name: str, config: ExperimentConfig, steps: int, devices: list[Any],
                 machine_gflops: float | None) -> dict[str, Any]:
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
    memory = _peak_bytes(step, carry, x, key, hp, lrs)
    flops = step_flops(config)
    row = {
        "name": name, "objective": config.objective,
        "num_temps": config.num_temps if config.is_thermo else None,
        "chain_gradient": config.chain_gradient if config.is_thermo else None,
        "batch_size": config.batch_size, "image_shape": list(config.image_shape), "devices": len(devices),
        "images_per_s": config.batch_size / step_s, "step_s": step_s,
        "compile_s": max(first - step_s, 0.0), "recompiled": bool(compiles), "compiles": len(compiles),
        "peak_bytes": memory, "flops_per_step": flops, "gflops_per_s": flops / step_s / 1e9,
    }
    if machine_gflops:
        row["fraction_of_matmul_rate"] = row["gflops_per_s"] / machine_gflops
    if name in REFERENCE_IMAGES_PER_S:
        row["reference_images_per_s"] = REFERENCE_IMAGES_PER_S[name]
        row["speedup_vs_reference"] = row["images_per_s"] / REFERENCE_IMAGES_PER_S[name]
    return row


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
    ref = f"  ({r['speedup_vs_reference']:.1f}x the paper's code)" if "speedup_vs_reference" in r else ""
    mem = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r.get("peak_bytes") else "n/a"
    frac = f" = {100 * r['fraction_of_matmul_rate']:.0f}% of matmul" if "fraction_of_matmul_rate" in r else ""
    return (f"{r['name']:30s} {r['images_per_s']:8.2f} img/s  step {r['step_s']:.3f}s  compile "
            f"{r['compile_s']:.1f}s{' (recompiled)' if r['recompiled'] else ' (cached)'}  peak {mem}  "
            f"{r['gflops_per_s']:.1f} GFLOP/s{frac}{ref}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--only", action="append", help="run only this workload (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per workload (median reported)")
    parser.add_argument("--devices", type=int, default=1, help="local devices to pmap over")
    parser.add_argument("--list", action="store_true", help="list workload names and exit")
    args = parser.parse_args(argv)
    all_workloads = workloads()
    if args.list:
        print("\n".join(all_workloads))
        return 0
    names = args.only or list(all_workloads)
    unknown = [n for n in names if n not in all_workloads]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; use --list to see them")
    devices = jax.local_devices()[: args.devices]
    machine = matmul_gflops()
    if not args.json:
        print(f"{jax.default_backend()} x{len(devices)}; float32 2048^2 matmul: {machine:.0f} GFLOP/s",
              flush=True)
    rows = []
    for name in names:
        row = run_workload(name, all_workloads[name], args.steps, devices, machine)
        rows.append(row)
        print(json.dumps(row) if args.json else format_row(row), flush=True)
    by = {r["name"]: r for r in rows}
    if not args.json and "digits-thermo-nt10" in by and "digits-thermo-nt20" in by:
        ratio = by["digits-thermo-nt20"]["step_s"] / by["digits-thermo-nt10"]["step_s"]
        print(f"thermo step cost N_t=20 / N_t=10: {ratio:.2f}x (target <= 2.1x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
