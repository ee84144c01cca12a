"""`python -m sweep.grid`: run a whole grid (every cell x repetition) as Ray Tune trials.

With no arguments it runs the embedded `digits` study on a local Ray instance (CPU), writes
`runs/<run>/results/{trials,epochs}.parquet`, and prints where the results are and a per-cell summary.
Kill it at any moment; `python -m sweep.grid --name RUN --resume` finishes the sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from model.config import ExperimentConfig, parse_set_args
from model.schema import EPOCHS_FILE, TRIALS_FILE
from sweep import bill, cost, launch, lease, preflight, rebuild
from sweep.grid_file import (
    GridError,
    TrialPlan,
    check_plan_devices,
    estimator_legend,
    expand,
    identical_cells,
    load_grid,
    trial_table,
)
from sweep.results import ResultsTables, config_columns, format_summary, summarize
from sweep.storage import storage_join, write_json_uri
from sweep.trainable import make_trainable, resolve_trial, trial_spec

MANIFEST_FILE = "sweep.json"
DEFAULT_GRID = "digits"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.grid",
        description="Run every cell x repetition of a grid as Ray Tune trials, checkpointed and resumable, "
        "with every reading written to Parquet.",
    )
    p.add_argument(
        "--grid",
        default=DEFAULT_GRID,
        help=f"built-in grid name or a .json/.toml grid file (default: {DEFAULT_GRID}, the default study: a "
        "smaller model than the digits preset's, set by the grid's base)",
    )
    p.add_argument("--repetitions", type=int, help="repetitions per cell (default: the grid's)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the grid's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field in every cell, e.g. --set eval_every=0 (repeatable)",
    )
    p.add_argument("--name", help="run name (default: <grid>-<UTC time>); results go to <storage>/<name>/")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run --name: finished trials are kept, interrupted ones continue",
    )
    p.add_argument(
        "--retry-errored",
        action="store_true",
        help="with --resume: retry the trials that ended in ERROR too, from their newest readable "
        "checkpoint (one whose error cannot go away ends again at once)",
    )
    launch.add_ray_arguments(p)
    lease.add_lease_arguments(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the trials and the plan (FLOPs, memory, hours with --target) and exit",
    )
    cost.add_target_arguments(p)
    return p


def plan_from_args(args: argparse.Namespace) -> tuple[str, str, list[TrialPlan]]:
    """(grid name, grid source, validated trial plans) from the command line; raises GridError."""
    grid = load_grid(args.grid)
    overrides: dict[str, Any] = parse_set_args(args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    plans = expand(grid, repetitions=args.repetitions, overrides=overrides)
    return grid.name, grid.source, plans


def specs_of(plans: list[TrialPlan], grid: str) -> list[dict[str, Any]]:
    return [
        trial_spec(p.config, trial_id=p.trial_id, cell=p.cell, repetition=p.repetition, grid=grid)
        for p in plans
    ]


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
    if args.retry_errored and not args.resume:
        parser.error("--retry-errored goes with --resume --name RUN (it retries that run's failed trials)")
    try:
        storage = launch.storage_of(args)
        launch.check_ray_arguments(args)
        if args.name is not None:
            launch.run_location(storage, args.name)
        # A dry run may name an existing run: it only prints the plan.
        checked_name = args.name if args.resume or not args.dry_run else None
        manifest = lease.unless_held(  # a second driver is refused, naming the first, before any planning
            lambda: launch.existing_manifest(
                storage, checked_name, MANIFEST_FILE, resume=args.resume, what="run"
            ),
            None if args.dry_run or not checked_name else launch.run_location(storage, checked_name),
            what=f"run {checked_name!r}",
            take_over=args.take_over,
        )
        if manifest is not None:
            ignored = [f for f in ("repetitions", "epochs") if getattr(args, f) is not None] + (
                ["set"] if args.set else []
            )
            if ignored or args.grid != DEFAULT_GRID:
                print(
                    f"note: --resume runs the plan stored in {MANIFEST_FILE}; ignoring --grid/"
                    f"{'/'.join('--' + f for f in ignored) or '--grid'}",
                    file=sys.stderr,
                )
            grid_name, grid_source, specs = manifest["grid"], manifest["grid_source"], manifest["trials"]
            plans = plans_of(specs)
        else:
            grid_name, grid_source, plans = plan_from_args(args)
            specs = specs_of(plans, grid_name)
        n_dev = launch.devices_per_trial(args)
        check_plan_devices(
            plans,
            n_dev,
            "use batch sizes divisible by the device count, or fewer devices "
            "per trial (--cpu-devices 1 on CPU, --gpus-per-trial 1 on GPU)",
        )
        cells = {p.cell: p.config for p in plans}  # one plan per cell: repetitions share its shapes
        cell_plans, target = cost.plan(list(cells.items()), args)
    except (GridError, launch.LaunchError, cost.PlanError) as err:
        parser.error(str(err))
    except UnicodeDecodeError as err:
        parser.error(
            f"--grid {args.grid}: not UTF-8 text ({err.reason} at byte {err.start}); save the grid "
            "file as UTF-8"
        )

    for line in identical_cells(plans):
        print(f"warning: {line}", file=sys.stderr)
    if args.dry_run:
        print(
            f"grid {grid_name} ({grid_source}): {len(plans)} trials, "
            f"{len({p.cell for p in plans})} cells, {n_dev} device(s) per trial"
        )
        print(trial_table(plans, launch.resources_of(args)))
        print(cost.format_plan(cell_plans, len(plans) // max(len(cells), 1), target))
        if legend := estimator_legend(plans):
            print(legend)
        if args.price_per_gpu_hour is not None or args.spot_price_per_gpu_hour is not None:
            counts = [sum(p.cell == name for p in plans) for name in cells]
            bills = bill.run_bill(list(zip(cell_plans, cells.values(), counts, strict=True)), args)
            print(bill.format_bill(bills, args))
        return 0
    run = args.name or launch.default_run_name(grid_name)
    try:
        launch.run_location(storage, run)
    except launch.LaunchError as err:  # a default name made from the grid's name
        parser.error(f"{err}; pass --name")
    try:
        preflight.check_data(cells.items(), local=args.address is None)
    except launch.LaunchError as err:
        parser.error(str(err))
    return run_sweep(
        args,
        run=run,
        storage=storage,
        grid_name=grid_name,
        grid_source=grid_source,
        specs=specs,
        plans=plans,
        n_dev=n_dev,
    )


def run_sweep(args: argparse.Namespace, *, run: str, storage: str, **plan: Any) -> int:
    """`_run_sweep` holding the run's driver lease (`sweep.lease`): exit 2, naming the holder, if another
    driver holds it; exit 1 with one line (`sweep.diskfull`) if the storage fills up."""
    try:
        with lease.hold(
            storage_join(storage, run), what=f"run {run!r}", resume=args.resume, take_over=args.take_over
        ):
            return _run_sweep(args, run=run, storage=storage, **plan)
    except lease.LeaseHeld as err:
        print(f"python -m sweep.grid: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from sweep.diskfull import is_storage_full, storage_full_message

        if not is_storage_full(err):
            raise
        resume = f"python -m sweep.grid --name {run} --resume --storage {storage}"
        print(storage_full_message(storage_join(storage), run, resume), file=sys.stderr, flush=True)
        return 1


def _run_sweep(
    args: argparse.Namespace,
    *,
    run: str,
    storage: str,
    grid_name: str,
    grid_source: str,
    specs: list[dict[str, Any]],
    plans: list[TrialPlan],
    n_dev: int,
) -> int:
    """Start or resume the Tune experiment of `specs` and print the summary; returns the exit code."""
    launch.set_ray_defaults(args, storage)
    import ray
    from ray import tune

    from sweep.callback import ResultsCallback

    run_uri = storage_join(storage, run)
    results_uri = f"{run_uri}/results"
    if not args.resume:
        write_json_uri(
            f"{run_uri}/{MANIFEST_FILE}",
            {
                "run": run,
                "grid": grid_name,
                "grid_source": grid_source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "argv": sys.argv[1:],
                "trials": specs,
            },
        )
    tables = ResultsTables(results_uri)
    for plan, spec in zip(plans, specs, strict=True):
        if plan.trial_id not in tables.trials:
            tables.upsert_trial(
                plan.trial_id,
                run=run,
                grid=grid_name,
                cell=plan.cell,
                repetition=plan.repetition,
                **config_columns(plan.config),
                status="PENDING",
                epochs_completed=0,
                **spec.get("columns", {}),
            )
    tables.flush()
    start = time.perf_counter()
    print(
        f"run {run}: grid {grid_name} ({grid_source}), {len(plans)} trials "
        f"({len({p.cell for p in plans})} cells), {n_dev} device(s) and "
        f"{args.cpus_per_trial:g} CPU / {args.gpus_per_trial:g} GPU per trial; storage "
        f"{storage_join(storage)}",
        flush=True,
    )

    launch.init_ray(args, n_dev)
    try:
        trainable = make_trainable(
            samples_uri=f"{run_uri}/samples",
            gpus_per_trial=args.gpus_per_trial,
            cpus_per_trial=args.cpus_per_trial,
            checkpoint_every_s=args.checkpoint_every_s,
            run_uri=run_uri,
            progress_every_s=args.progress_every_s,
        )
        broken = rebuild.unreadable_tune_state(run_uri) if args.resume else None
        if broken:
            specs = rebuild.pending_specs(run_uri, specs, tables, retry_errored=args.retry_errored)
            print(
                f"note: Ray Tune's state of run {run} cannot be read ({broken}); rebuilt from "
                f"{MANIFEST_FILE}, the Parquet tables and the trials' checkpoints: {len(specs)} trial(s) "
                "to run, each from its newest complete checkpoint",
                flush=True,
            )
        if broken and not specs:
            tuner = None
        elif args.resume and not broken and tune.Tuner.can_restore(run_uri):
            tuner = tune.Tuner.restore(
                run_uri,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=args.retry_errored,
                restart_errored=False,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(specs)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=args.max_concurrent, reuse_actors=False, **launch.trial_naming()
                ),
                run_config=launch.run_config(
                    args,
                    run=run,
                    storage=storage,
                    callbacks=[ResultsCallback(results_uri, run, resolve_trial)],
                    metric_columns={
                        "epoch": "epoch",
                        "train_loss": "loss",
                        "grad_var": "grad_var",
                        "kid_rbf_inf": "KID_inf",
                    },
                    parameter_columns={"trial/cell": "cell", "trial/repetition": "rep"},
                ),
            )
        if tuner is not None:
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
        print(
            f"{len(unfinished)} trials did not finish; continue with: python -m sweep.grid --name {run} "
            f"--resume" + (f" --storage {storage}" if storage != launch.DEFAULT_STORAGE else "")
        )
    print("\nper cell, mean +- std over repetitions (std with ddof=1):")
    print(format_summary(summarize(trials, epochs)))
    return 0 if not len(unfinished) else 1


if __name__ == "__main__":
    raise SystemExit(main())
