"""Side by side with the paper's public code: `python -m model.bench.paper --paper-code DIR [--rounds 2]`.

DIR is a checkout of the paper's public JAX implementation (github.com/PritRaj1/JAX-ThermoEBM), kept
outside this repository. For each mode (vanilla, stop-gradient thermo, thermo with chain gradients) at the
`ref-*` shapes of `model.bench`, it times the paper's train step (in a subprocess started in DIR: that code
reads `hyperparams.ini` from its working directory when imported; this writes one for the shapes) and ours,
alternating `--rounds` times, and reports the ratio of the medians with the load averages around each run.
A ratio is only printed from timings of the same invocation on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

MODES = {"vanilla": "ref-vanilla", "thermo": "ref-thermo-nt5", "thermo-chain": "ref-thermo-nt5-chain"}

_INI = """[PIPELINE]
NUM_EPOCHS = 1
SAVE_EVERY = 5
BATCH_SIZE = {batch}
NUM_TRAIN_DATA = 12000
NUM_VAL_DATA = 4500
DATASET = CIFAR10
NUM_EXPERIMENTS = 1
[EBM]
Z_CHANNELS = {z}
EBM_FEATURE_DIM = {ebm}
EBM_LEAK = 0.1
[GEN]
CHANNELS = 3
GEN_FEATURE_DIM = {gen}
GEN_LEAK = 0.2
[SIGMAS]
p0_SIGMA = 1
LKHOOD_SIGMA = 0.3
[OPTIMIZER]
E_INITIAL_LR = 0.00002
G_INITIAL_LR = 0.0001
E_FINAL_LR = 0.00001
G_FINAL_LR = 0.00005
E_BETA_1 = 0.5
E_BETA_2 = 0.999
G_BETA_1 = 0.5
G_BETA_2 = 0.999
[LR_SCHEDULE]
BEGIN_EPOCH = 1
DECAY_RATE = 0.975
STEP_INTERVAL = 1
[MCMC]
E_STEP_SIZE = 0.16
G_STEP_SIZE = 0.01
E_SAMPLE_STEPS = {prior}
G_SAMPLE_STEPS = {post}
KILL_GRADIENT = {kill}
[TEMP]
TEMP_POWER = {power}
NUM_TEMPS = {nt}
KL_BIAS_WEIGHT = 1.0
[GENERATION_EVAL]
MIN_SAMPLES = 1000
MAX_SAMPLES = 4500
NUM_PLOT = 16
NUM_POINTS = 10
KID_KERNEL = rbf
"""

# Times the paper's train step; runs with DIR as working directory and on sys.path.
_PAPER_TIMER = textwrap.dedent("""
    import json, sys, time
    from functools import partial
    import jax, numpy as np
    from src.pipeline.initialise import init_EBM, init_GEN, init_EBM_optimiser, init_GEN_optimiser
    from src.pipeline.pipeline_steps import train_step
    batch, steps = int(sys.argv[1]), int(sys.argv[2])
    key = jax.random.PRNGKey(0)
    key, ep, ef = init_EBM(key)
    key, gp, gf = init_GEN(key)
    eo, eos = init_EBM_optimiser(ep)
    go, gos = init_GEN_optimiser(gp)
    step = jax.jit(partial(train_step, optimiser_tup=(eo, go), fwd_fcn_tup=(ef, gf)))
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
    params, opts = (ep, gp), (eos, gos)
    jax.block_until_ready(step(key, x, params, opts))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        key, params, opts, loss, _, _ = step(key, x, params, opts)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": float(np.median(times))}))
""")


def paper_step_seconds(paper_dir: Path, mode: str, steps: int) -> float:
    """Median step time of the paper's code in `mode` at the ref shapes (a fresh process in paper_dir)."""
    from model.bench.train_step import workloads

    c = workloads("small")[MODES[mode]]
    ini = _INI.format(
        batch=c.batch_size,
        z=c.z_dim,
        ebm=c.ebm_width,
        gen=c.gen_width,
        prior=c.prior_steps,
        post=c.posterior_steps,
        nt=c.num_temps,
        power=0 if mode == "vanilla" else c.temp_power,
        # its KILL_GRADIENT is read with bool(str): "0" stops the gradient, "" keeps it
        kill="" if mode == "thermo-chain" else 0,
    )
    (paper_dir / "hyperparams.ini").write_text(ini)
    env = {**os.environ, "PYTHONPATH": str(paper_dir)}
    out = subprocess.run(
        [sys.executable, "-c", _PAPER_TIMER, str(c.batch_size), str(steps)],
        cwd=paper_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.bench.paper`."""
    parser = argparse.ArgumentParser(prog="python -m model.bench.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--paper-code", type=Path, required=True, help="checkout of the paper's code")
    parser.add_argument("--mode", action="append", choices=list(MODES), help="default: all three")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two codes per mode")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (median)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.paper_code / "src" / "pipeline" / "pipeline_steps.py").is_file():
        parser.error(
            f"--paper-code {args.paper_code}: no src/pipeline/pipeline_steps.py there; pass a "
            "checkout of github.com/PritRaj1/JAX-ThermoEBM"
        )
    import jax

    from model.bench.train_step import run_workload, workloads

    devices = jax.local_devices()[:1]
    for mode in args.mode or list(MODES):
        config = workloads("small")[MODES[mode]]
        ours, theirs, loads = [], [], [os.getloadavg()[0]]
        for _ in range(args.rounds):
            theirs.append(paper_step_seconds(args.paper_code, mode, args.steps))
            loads.append(os.getloadavg()[0])
            row = run_workload(MODES[mode], config, args.steps, devices, None, xla_flops=False)
            ours.append(row["step_s"])
            loads.append(os.getloadavg()[0])
        b = config.batch_size
        rates = {"ours": [round(b / s, 1) for s in ours], "theirs": [round(b / s, 1) for s in theirs]}
        print(
            f"{mode:13s} ours {b / np.median(ours):7.2f} img/s  paper's code {b / np.median(theirs):7.2f} "
            f"img/s  ratio {np.median(theirs) / np.median(ours):.2f}x  (runs {rates}; load average "
            f"{min(loads):.1f}-{max(loads):.1f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
