"""`python -m sweep.grid`: run a whole grid (every cell x repetition) as Ray Tune trials.

With no arguments it runs the embedded `digits` study on a local Ray instance (CPU), writes
`runs/<run>/results/{trials,epochs}.parquet`, and prints where the results are and a per-cell summary.
Kill it at any moment; `python -m sweep.grid --name RUN --resume` finishes the sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from model.config import ExperimentConfig, parse_set_args
from sweep.plan import GridError, TrialPlan, check_devices, expand, load_grid, trial_table
from sweep.results import (
    EPOCHS_FILE,
    TRIALS_FILE,
    ResultsTables,
    config_columns,
    format_summary,
    read_json_uri,
    summarize,
    write_json_uri,
)
from sweep.trainable import make_trainable, resolve_trial, storage_join, trial_env, trial_spec

MANIFEST_FILE = "sweep.json"
DEFAULT_STORAGE = "runs"
DEFAULT_COMPILE_CACHE = os.path.join("~", ".cache", "thermosweep", "jax")


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """Where runs live and what each trial gets from Ray: flags shared by sweep.grid and sweep.search."""
    p.add_argument("--storage", default=None,
                   help="where runs live: a directory, NFS path or s3://bucket/prefix "
                        f"(default: $THERMOSWEEP_STORAGE or ./{DEFAULT_STORAGE})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray instance)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial (0: CPU; a fraction shares a GPU between trials)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="on CPU, XLA devices per trial to pmap over (default: --cpus-per-trial)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="at most this many trials at once (default: as many as the resources allow)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a crashed trial from its last checkpoint (default 2)")
    p.add_argument("--compile-cache", default=DEFAULT_COMPILE_CACHE,
                   help="JAX persistent compilation cache shared by trials ('none' disables)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.grid",
        description="Run every cell x repetition of a grid as Ray Tune trials, checkpointed and resumable, "
                    "with every reading written to Parquet.",
    )
    p.add_argument("--grid", default="digits",
                   help="built-in grid name or a .json/.toml grid file (default: digits)")
    p.add_argument("--repetitions", type=int, help="repetitions per cell (default: the grid's)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the grid's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in every cell, e.g. --set eval_every=0 (repeatable)")
    p.add_argument("--name", help="run name (default: <grid>-<UTC time>); results go to <storage>/<name>/")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name: finished trials are kept, interrupted ones continue")
    add_ray_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the table of trials and exit")
    return p


def ray_trial_env(args: argparse.Namespace, n_dev: int, local: bool) -> dict[str, str]:
    """The environment of every trial process: thread caps, its devices, the shared compilation cache
    (`--compile-cache`), and Ray's auth token off for a local instance."""
    cache = None if str(args.compile_cache).lower() == "none" else os.path.expanduser(args.compile_cache)
    env = trial_env(gpus_per_trial=args.gpus_per_trial, cpus_per_trial=int(args.cpus_per_trial),
                    cpu_devices=n_dev, compilation_cache=cache,
                    base_xla_flags=os.environ.get("XLA_FLAGS", ""))
    if local:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def devices_per_trial(args: argparse.Namespace) -> int:
    if args.gpus_per_trial > 0:
        return max(1, int(args.gpus_per_trial))
    return args.cpu_devices or max(1, int(args.cpus_per_trial))


def resources_of(args: argparse.Namespace) -> dict[str, float]:
    return {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}


def plan_from_args(args: argparse.Namespace) -> tuple[str, str, list[TrialPlan]]:
    """(grid name, grid source, validated trial plans) from the command line; raises GridError."""
    grid = load_grid(args.grid)
    overrides: dict[str, Any] = parse_set_args(args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    plans = expand(grid, repetitions=args.repetitions, overrides=overrides)
    return grid.name, grid.source, plans


def specs_of(plans: list[TrialPlan], grid: str) -> list[dict[str, Any]]:
    return [trial_spec(p.config, trial_id=p.trial_id, cell=p.cell, repetition=p.repetition, grid=grid)
            for p in plans]


def plans_of(specs: list[dict[str, Any]]) -> list[TrialPlan]:
    out = []
    for spec in specs:
        config = ExperimentConfig(**spec["experiment"])
        out.append(TrialPlan(spec["trial_id"], spec["cell"], spec["repetition"], config.seed, config))
    return out


def _print_where(run_uri: str) -> None:
    print(f"results:     {run_uri}/results/{TRIALS_FILE}")
    print(f"             {run_uri}/results/{EPOCHS_FILE}")
    print(f"samples:     {run_uri}/samples/<trial_id>/epoch_XXXX.png")
    print(f"checkpoints: {run_uri}/<trial_id>/checkpoint_XXXXXX/ (Orbax state + history.json)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    storage = args.storage or os.environ.get("THERMOSWEEP_STORAGE") or DEFAULT_STORAGE
    if args.resume and not args.name:
        parser.error("--resume needs --name RUN (the run to continue, a directory under --storage)")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        parser.error(f"--cpu-devices {args.cpu_devices} must be >= 1")

    run = args.name
    run_uri = storage_join(storage, run) if run else None
    manifest = read_json_uri(f"{run_uri}/{MANIFEST_FILE}") if run_uri else None
    try:
        if args.resume:
            if manifest is None:
                parser.error(f"--resume: no run {run!r} under {storage} (no {MANIFEST_FILE}); "
                             "start it without --resume, or pass the --storage it was started with")
            ignored = [f for f in ("repetitions", "epochs") if getattr(args, f) is not None] + (
                ["set"] if args.set else [])
            if ignored or args.grid != "digits":
                print(f"note: --resume runs the plan stored in {MANIFEST_FILE}; ignoring --grid/"
                      f"{'/'.join('--' + f for f in ignored) or '--grid'}", file=sys.stderr)
            grid_name, grid_source, specs = manifest["grid"], manifest["grid_source"], manifest["trials"]
            plans = plans_of(specs)
        else:
            grid_name, grid_source, plans = plan_from_args(args)
            specs = specs_of(plans, grid_name)
        n_dev = devices_per_trial(args)
        check_devices(plans, n_dev, "use batch sizes divisible by the device count, or fewer devices per "
                                    "trial (--cpu-devices 1 on CPU, --gpus-per-trial 1 on GPU)")
    except GridError as err:
        parser.error(str(err))

    if args.dry_run:
        print(f"grid {grid_name} ({grid_source}): {len(plans)} trials, "
              f"{len({p.cell for p in plans})} cells, {n_dev} device(s) per trial")
        print(trial_table(plans, resources_of(args)))
        return 0

    if run is None:
        run = f"{grid_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        run_uri = storage_join(storage, run)
        manifest = None
    if manifest is not None and not args.resume:
        parser.error(f"run {run!r} already exists under {storage}; continue it with --resume or pick "
                     "another --name")
    return run_sweep(args, run=run, storage=storage, grid_name=grid_name, grid_source=grid_source,
                     specs=specs, plans=plans, n_dev=n_dev)


def run_sweep(args: argparse.Namespace, *, run: str, storage: str, grid_name: str, grid_source: str,
              specs: list[dict[str, Any]], plans: list[TrialPlan], n_dev: int) -> int:
    """Start or resume the Tune experiment of `specs` and print the summary; returns the exit code."""
    # Ray reads these when it is imported, so they are set before the first import of ray.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic progress table
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every trial's epoch line, not "[repeated 4x]"
    if "://" not in storage:
        # Snapshot Tune's experiment state often (cheap on a local disk), so that after a crash a
        # resumed trial starts from its newest checkpoint rather than an older one the snapshot knew.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    import ray
    from ray import tune

    from sweep.callback import ResultsCallback

    local = args.address is None
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts trial workers at niceness 15; the trials are this command's work, so run them at
        # the priority of the command itself (set RAY_worker_niceness to keep Ray's default).
        os.environ.setdefault("RAY_worker_niceness", "0")
    storage_root = storage_join(storage)
    run_uri = storage_join(storage, run)
    results_uri = f"{run_uri}/results"
    env = ray_trial_env(args, n_dev, local)

    if not args.resume:
        write_json_uri(f"{run_uri}/{MANIFEST_FILE}", {
            "run": run, "grid": grid_name, "grid_source": grid_source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv[1:], "trials": specs})
    tables = ResultsTables(results_uri)
    for plan, spec in zip(plans, specs, strict=True):
        if plan.trial_id not in tables.trials:
            tables.upsert_trial(plan.trial_id, run=run, grid=grid_name, cell=plan.cell,
                                repetition=plan.repetition, **config_columns(plan.config), status="PENDING",
                                epochs_completed=0, **spec.get("columns", {}))
    tables.flush()
    start = time.perf_counter()
    print(f"run {run}: grid {grid_name} ({grid_source}), {len(plans)} trials "
          f"({len({p.cell for p in plans})} cells), {n_dev} device(s) and "
          f"{args.cpus_per_trial:g} CPU / {args.gpus_per_trial:g} GPU per trial; storage {storage_root}",
          flush=True)

    ray.init(address=args.address, runtime_env={"env_vars": env}, include_dashboard=False if local else None,
             log_to_driver=True)
    try:
        trainable = make_trainable(samples_uri=f"{run_uri}/samples", gpus_per_trial=args.gpus_per_trial,
                                   cpus_per_trial=args.cpus_per_trial)
        if args.resume and tune.Tuner.can_restore(run_uri):
            tuner = tune.Tuner.restore(run_uri, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            callback = ResultsCallback(results_uri, run, resolve_trial)
            reporter = tune.CLIReporter(
                metric_columns={"epoch": "epoch", "train_loss": "loss", "grad_var": "grad_var",
                                "kid_rbf_inf": "KID_inf"},
                parameter_columns={"trial/cell": "cell", "trial/repetition": "rep"},
                max_report_frequency=30)
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=args.max_concurrent, reuse_actors=False,
                    trial_name_creator=lambda t: str(t.config["trial"]["trial_id"]),
                    trial_dirname_creator=lambda t: str(t.config["trial"]["trial_id"]),
                ),
                run_config=tune.RunConfig(
                    name=run, storage_path=storage_root, callbacks=[callback], progress_reporter=reporter,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    verbose=1,
                ),
            )
        tuner.fit()
    finally:
        ray.shutdown()

    tables = ResultsTables(results_uri)
    import pandas as pd

    trials = pd.DataFrame(tables.trial_rows())
    epochs = pd.DataFrame(tables.epoch_rows())
    wall = time.perf_counter() - start
    print(f"\nrun {run} finished in {wall:.0f} s: {len(trials)} trials, {len(epochs)} epoch rows")
    _print_where(run_uri)
    errors = trials[trials["status"] == "ERROR"]
    for _, row in errors.iterrows():
        print(f"ERROR {row['trial_id']}: {row['error']}")
    unfinished = trials[~trials["status"].isin(["TERMINATED", "ERROR"])]
    if len(unfinished):
        print(f"{len(unfinished)} trials did not finish; continue with: python -m sweep.grid --name {run} "
              f"--resume" + (f" --storage {storage}" if storage != DEFAULT_STORAGE else ""))
    print("\nper cell, mean +- std over repetitions (std with ddof=1):")
    print(format_summary(summarize(trials, epochs)))
    return 0 if not len(unfinished) else 1


if __name__ == "__main__":
    raise SystemExit(main())
