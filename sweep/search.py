"""`python -m sweep.search`: an Optuna search over p and eta, or any config fields (`--space FILE`).

Optuna (TPE, fixed seed) proposes the searched fields (`sweep.space`); Ray Tune runs each proposal's
seeds (`--repetitions R`: the seeds of a grid's repetitions) as trials exactly like grid trials (the same
trainable, Orbax checkpoints and Parquet rows in `<storage>/<run>/results/`), with the extra columns
`search` (the study name) and `optuna_trial` (the Optuna trial number). Optuna is told each metric (default
`kid_rbf_inf`, minimised; `val_ll` is maximised) at the trial's last epoch, the mean over the seeds; with
several `--metric` the study is multi-objective and its Pareto front is printed at the end.

The study lives in a real database (`sqlite:///<storage>/<run>/optuna.db` by default, any SQLAlchemy URL
with `--optuna-storage`), and that database is the source of truth for resuming: `--resume` counts the
finished trials there and runs a fresh Tune experiment for the rest, over the same study (see
`sweep.study.prepare_resume` for why this is preferred to `Tuner.restore`). The searcher is
`sweep.optuna_search`; the study handling `sweep.study`; the space `sweep.space`; the launch `sweep.launch`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from model.config import ExperimentConfig, parse_set_args
from model.schema import SEARCH_MANIFEST_FILE
from sweep import bill, cost, launch, lease, preflight
from sweep.optuna_search import base_config
from sweep.results import ResultsTables
from sweep.space import (
    SHORTHANDS,
    check_sets,
    describe,
    enqueued_proposal,
    load_space,
    most_expensive_corner,
    searched_fields,
)
from sweep.storage import storage_join, write_json_uri
from sweep.study import (
    SearchError,
    check_study,
    finished_trials,
    format_front,
    format_top,
    load_study_or_none,
    masked,
    open_storage,
    prepare_resume,
    search_space,
    state_counts,
    sync_results,
)
from sweep.trainable import make_trainable, resolve_trial

STUDY_DB_FILE = "optuna.db"
# Readings a search can optimise, and which way: the fidelity metrics are distances, val_ll a log-likelihood.
METRICS = {
    "kid_rbf_inf": "min",
    "kid_poly_inf": "min",
    "fid_inf": "min",
    "kid_rbf_nmax": "min",
    "kid_poly_nmax": "min",
    "val_ll": "max",
}
DEFAULT_METRIC = "kid_rbf_inf"
DEFAULT_P = (0.1, 10.0)
DEFAULT_ETA = (0.5, 4.0)
DEFAULT_SAMPLER_SEED = 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sweep.search`."""
    p = argparse.ArgumentParser(
        prog="python -m sweep.search",
        description="Search the temperature power p and the KL weight eta with Optuna (TPE), each proposal "
        "run as a Ray Tune trial like a grid trial, minimising the final KID_inf.",
    )
    p.add_argument(
        "--base",
        default="digits",
        metavar="PRESET|GRID:CELL",
        help="the model every proposal trains: a preset (default: digits) or one cell of a grid, e.g. "
        "digits-estimators:thermo-p1-ml (a built-in grid or a grid file's path before the colon)",
    )
    p.add_argument("--study", default=None, help="Optuna study name (default: the run name)")
    p.add_argument(
        "--optuna-storage",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL of the study's database, e.g. postgresql://user@host/db "
        f"(default: sqlite:///<storage>/<run>/{STUDY_DB_FILE}; required for s3:// storage)",
    )
    p.add_argument("--trials", type=int, default=20, help="trials in total (default 20)")
    p.add_argument(
        "--space",
        default=None,
        metavar="FILE",
        help="a JSON space file: any config fields with float/int ranges or choices (docs/search.md); "
        "replaces --p/--eta",
    )
    p.add_argument(
        "--p",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="range of the temperature power p, sampled log-uniformly (default 0.1 10)",
    )
    p.add_argument(
        "--eta",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="range of the KL weight eta, sampled uniformly (default 0.5 4)",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        choices=list(METRICS),
        help="objective at the last epoch (default kid_rbf_inf); val_ll is maximised, the others minimised. "
        "Give it several times for a multi-objective study (its Pareto front is printed at the end)",
    )
    p.add_argument(
        "--repetitions",
        type=int,
        default=1,
        metavar="R",
        help="seeds per proposal (default 1): seeds base + 0..R-1, the seeds of a grid's repetitions; "
        "Optuna is told each metric's mean over them",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the preset's)")
    p.add_argument(
        "--scheduler",
        default="none",
        choices=("none", "asha"),
        help="asha: stop weak trials early on the per-epoch metric (evaluates every epoch)",
    )
    p.add_argument("--name", help="run name (default: search-<UTC time>); results go to <storage>/<name>/")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the search --name until --trials trials in total have finished",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field of the base preset (repeatable)",
    )
    p.add_argument(
        "--enqueue",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,FIELD=VALUE...]",
        help="a proposal to evaluate before the sampler's own (repeatable), e.g. a grid cell as a "
        "reference: --enqueue p=1,ebm_gradient=ml; searched fields left out are sampled; one already in "
        "the study is not added again",
    )
    launch.add_ray_arguments(p)
    lease.add_lease_arguments(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan of the base config (FLOPs, memory, hours with --target) and exit",
    )
    cost.add_target_arguments(p)
    p.add_argument(
        "--sampler-seed",
        type=int,
        default=DEFAULT_SAMPLER_SEED,
        help=f"seed of the TPE sampler (default {DEFAULT_SAMPLER_SEED})",
    )
    return p


# ---------------------------------------------------------------------------------------------- checks


def _config_diff(old: dict[str, Any], new: dict[str, Any], searched: set[str]) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in searched and old.get(k) != new.get(k)
    ]


def _check_objectives(args: argparse.Namespace) -> list[str]:
    """The metrics of the search (`--metric`, given once or several times) checked against the seeds
    per proposal and the scheduler; raises SearchError naming the conflict and the fix."""
    metrics = list(args.metric or [DEFAULT_METRIC])
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice:
        raise SearchError(f"--metric {twice[0]} is given twice; give each objective once")
    if args.repetitions < 1:
        raise SearchError(f"--repetitions {args.repetitions}: must be >= 1 (seeds per proposal)")
    if args.scheduler == "asha" and len(metrics) > 1:
        raise SearchError(
            f"--scheduler asha with {len(metrics)} --metric: ASHA stops trials on the intermediate value of "
            "one objective, and Optuna refuses intermediate values in a multi-objective study; use "
            "--scheduler none, or one --metric"
        )
    if args.scheduler == "asha" and args.repetitions > 1:
        raise SearchError(
            f"--scheduler asha with --repetitions {args.repetitions}: ASHA would stop one seed of a proposal "
            "on that seed's value while the search compares seed means; use --scheduler none, or "
            "--repetitions 1"
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a search; returns the exit code (argument errors exit with code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except (SearchError, launch.LaunchError) as err:
        parser.error(str(err))
    return 2  # not reached: parser.error exits


def _main(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise SearchError(f"--trials {args.trials}: must be >= 1")
    args.metrics = _check_objectives(args)
    try:
        storage = launch.storage_of(args)
        launch.check_ray_arguments(args)
        if args.name is not None:
            launch.run_location(storage, args.name)
        if args.study is not None:
            launch.check_name(args.study, "--study")
    except launch.LaunchError as err:
        raise SearchError(str(err)) from None
    if args.space is not None:
        given = [flag for flag, value in (("--p", args.p), ("--eta", args.eta)) if value is not None]
        if given:
            raise SearchError(
                f"{given[0]} with --space {args.space}: the space file says what is searched; put the "
                f"range in the file ({SHORTHANDS[given[0][2:]]}) and drop {given[0]}"
            )
        config = base_config(args.base, args.set, epochs=args.epochs, scheduler=args.scheduler, searched={})
        space = load_space(args.space, config)
        check_sets(space, parse_set_args(args.set))
    else:
        p_range, eta_range = args.p or DEFAULT_P, args.eta or DEFAULT_ETA
        space = search_space(tuple(p_range), tuple(eta_range))
        config = base_config(args.base, args.set, epochs=args.epochs, scheduler=args.scheduler)
    enqueued = [enqueued_proposal(text, space) for text in args.enqueue]
    n_dev = launch.devices_per_trial(args)
    if config.batch_size % n_dev:
        raise SearchError(
            f"batch_size {config.batch_size} is not divisible by {n_dev} devices per trial; "
            "use --set batch_size=N with N divisible by it, or fewer devices per trial"
        )
    # p and eta change no shape: the base config's plan is every trial's; a space file's fields may, so
    # its most expensive corner is planned (and priced) instead.
    planned = config if args.space is None else most_expensive_corner(space, config)
    try:
        plans, target = cost.plan([(f"{args.base}-thermo", planned)], args)
    except cost.PlanError as err:
        raise SearchError(str(err)) from None
    if args.dry_run:
        trials = args.trials * args.repetitions  # every proposal trains its seeds
        print(cost.format_plan(plans, trials, target))
        if args.price_per_gpu_hour is not None or args.spot_price_per_gpu_hour is not None:
            print(bill.format_bill(bill.run_bill([(plans[0], planned, trials)], args), args))
        return 0
    try:
        preflight.check_data([(f"{args.base}-thermo", config)], local=args.address is None)
    except launch.LaunchError as err:
        raise SearchError(str(err)) from None
    if "://" in storage and args.optuna_storage is None:  # before anything reads the remote storage
        raise SearchError(
            f"--storage {storage} is remote; SQLite cannot live there: pass "
            "--optuna-storage URL (e.g. postgresql://user@host/db)"
        )
    try:
        manifest = lease.unless_held(  # a second driver is refused, naming the first
            lambda: launch.existing_manifest(
                storage, args.name, SEARCH_MANIFEST_FILE, resume=args.resume, what="search"
            ),
            None if args.name is None else launch.run_location(storage, args.name),
            what=f"search {args.name!r}",
            take_over=args.take_over,
        )
    except launch.LaunchError as err:
        raise SearchError(str(err)) from None

    run = args.name or launch.default_run_name("search")
    run_uri = storage_join(storage, run)
    study_name = args.study or (manifest or {}).get("study") or run
    if manifest is not None and manifest.get("study") != study_name:
        raise SearchError(
            f"--study {study_name}: run {run!r} searches study {manifest.get('study')!r}; "
            f"drop --study or pass --study {manifest.get('study')}"
        )
    url = args.optuna_storage
    if url is None:
        if manifest is not None and manifest.get("optuna_storage") != "run":
            raise SearchError(
                f"run {run!r} keeps its study in {manifest.get('optuna_storage')}; pass "
                "--optuna-storage with that URL"
            )
        os.makedirs(run_uri, exist_ok=True)
        url = f"sqlite:///{run_uri}/{STUDY_DB_FILE}"
    if manifest is not None:
        diff = _config_diff(manifest["experiment"], config.to_dict(), searched_fields(space))
        if diff:
            raise SearchError(
                f"--resume: the trial config differs from the one search {run!r} started "
                f"with ({'; '.join(diff)}); rerun with its original --base/--set/--epochs/"
                "--scheduler"
            )

    optuna_storage = open_storage(url)
    held = lease.hold(
        run_uri,
        what=f"search {run!r}",
        resume=args.resume,
        take_over=args.take_over,
        study=(optuna_storage, study_name, masked(url)),
    )
    try:
        with held:
            return _checked_search(
                args,
                run=run,
                storage=storage,
                study_name=study_name,
                url=url,
                optuna_storage=optuna_storage,
                space=space,
                config=config,
                n_dev=n_dev,
                enqueued=enqueued,
            )
    except Exception as err:
        from sweep.diskfull import is_storage_full, storage_full_message

        if not is_storage_full(err):
            raise
        resume = f"python -m sweep.search --name {run} --resume (plus the flags it was started with)"
        print(storage_full_message(storage_join(storage), run, resume), file=sys.stderr, flush=True)
        return 1


def _checked_search(
    args: argparse.Namespace,
    *,
    run: str,
    storage: str,
    study_name: str,
    url: str,
    optuna_storage: Any,
    space: dict[str, Any],
    config: ExperimentConfig,
    n_dev: int,
    enqueued: list[dict[str, Any]],
) -> int:
    """The study checks of a search whose leases are held, then `run_search`."""
    study = load_study_or_none(optuna_storage, study_name)
    if study is not None:
        metrics = args.metrics
        check_study(
            study,
            space,
            metrics[0] if len(metrics) == 1 else metrics,
            masked(url),
            maximise=[METRICS[m] == "max" for m in metrics],
            repetitions=args.repetitions,
        )
        if not args.resume and study.get_trials(deepcopy=False):
            raise SearchError(
                f"study {study_name!r} in {masked(url)} already has "
                f"{len(study.get_trials(deepcopy=False))} trials; continue it with --resume "
                "--name RUN, or pick another --study"
            )
    elif args.resume:
        raise SearchError(
            f"--resume: study {study_name!r} is not in {masked(url)}; pass the "
            "--optuna-storage and --study the search was started with"
        )
    return run_search(
        args,
        run=run,
        storage=storage,
        study_name=study_name,
        url=url,
        optuna_storage=optuna_storage,
        space=space,
        config=config,
        n_dev=n_dev,
        enqueued=enqueued,
    )


def run_search(
    args: argparse.Namespace,
    *,
    run: str,
    storage: str,
    study_name: str,
    url: str,
    optuna_storage: Any,
    space: dict[str, Any],
    config: ExperimentConfig,
    n_dev: int,
    enqueued: list[dict[str, Any]],
) -> int:
    """Create or continue the study, run the remaining trials on Ray Tune, then print the best ones."""
    import optuna

    run_uri = storage_join(storage, run)
    results_uri = f"{run_uri}/results"
    metrics = args.metrics
    directions = ["maximize" if METRICS[m] == "max" else "minimize" for m in metrics]
    study = optuna.create_study(
        storage=optuna_storage, study_name=study_name, directions=directions, load_if_exists=True
    )
    if len(metrics) == 1:
        study.set_user_attr("metric", metrics[0])
    else:
        study.set_user_attr("metrics", metrics)
    if args.repetitions > 1:
        study.set_user_attr("repetitions", args.repetitions)
    study.set_user_attr(
        "search_space", {k: optuna.distributions.distribution_to_json(v) for k, v in space.items()}
    )
    study.set_user_attr("run", run)
    if not args.resume:
        write_json_uri(
            f"{run_uri}/{SEARCH_MANIFEST_FILE}",
            {
                "run": run,
                "study": study_name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "optuna_storage": "run" if args.optuna_storage is None else masked(url),
                **({"metric": metrics[0]} if len(metrics) == 1 else {"metrics": metrics}),
                "directions": directions,
                "repetitions": args.repetitions,
                "space": sorted(searched_fields(space)),
                "base": args.base,
                "scheduler": args.scheduler,
                "argv": args.argv,
                "experiment": config.to_dict(),
            },
        )
    for params in enqueued:  # evaluated before the sampler's own proposals, each once per study
        study.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
    interrupted = prepare_resume(study) if args.resume else []
    if interrupted:
        print(
            f"resume: Optuna trials {interrupted} were interrupted; marked FAIL and their proposals enqueued "
            "again",
            flush=True,
        )
    tables = ResultsTables(results_uri)
    sync_results(tables, study, run_uri)
    remaining = args.trials - len(finished_trials(study))
    goals = " and ".join(f"{d[:-1]}ing final {m}" for m, d in zip(metrics, directions, strict=True))
    seeds = f"seeds {config.seed}..{config.seed + args.repetitions - 1} (mean told to Optuna)"
    print(
        f"search {run}: study {study_name!r} in {masked(url)} ({state_counts(study)}); "
        f"{max(remaining, 0)} of {args.trials} trials to run; {goals} over {describe(space)}; "
        f"{config.epochs} epochs per trial"
        + (f"; {args.repetitions} {seeds}" if args.repetitions > 1 else ""),
        flush=True,
    )
    start = time.perf_counter()
    if remaining > 0:
        _fit(
            args,
            run=run,
            storage=storage,
            study=study,
            study_name=study_name,
            optuna_storage=optuna_storage,
            space=space,
            config=config,
            n_dev=n_dev,
            remaining=remaining,
        )
        study = optuna.load_study(study_name=study_name, storage=optuna_storage)
        tables = ResultsTables(results_uri)
        sync_results(tables, study, run_uri)

    done = len(finished_trials(study))
    print(
        f"\nsearch {run} finished in {time.perf_counter() - start:.0f} s: {done}/{args.trials} trials "
        f"finished ({state_counts(study)})"
    )
    columns = "search_value" if len(metrics) == 1 else ", ".join(f"search_value_{m}" for m in metrics)
    print(
        f"results:     {results_uri}/trials.parquet (columns search, optuna_trial, optuna_state, {columns})"
    )
    print(f"             {results_uri}/epochs.parquet")
    print(format_top(study, metrics[0]) if len(metrics) == 1 else format_front(study, metrics))
    print(f"\nwatch the study: optuna-dashboard {masked(url)}   (pip install 'thermosweep[dashboard]')")
    if done < args.trials:
        print(
            f"{args.trials - done} trials did not finish; continue with: python -m sweep.search "
            f"--name {run} --resume (plus the flags it was started with)"
        )
        return 1
    return 0


def _fit(
    args: argparse.Namespace,
    *,
    run: str,
    storage: str,
    study: Any,
    study_name: str,
    optuna_storage: Any,
    space: dict[str, Any],
    config: ExperimentConfig,
    n_dev: int,
    remaining: int,
) -> None:
    launch.set_ray_defaults(args, storage)  # before Ray is imported
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sweep.callback import ResultsCallback
    from sweep.optuna_search import searcher_class

    metrics = args.metrics

    run_uri = storage_join(storage, run)
    # The sampler's seed moves with the study's size, so a resumed search does not replay the proposals
    # (random start-up points) of its first run; TPE reads the whole history from the database.
    sampler = optuna.samplers.TPESampler(
        seed=args.sampler_seed + len(study.get_trials(deepcopy=False)), constant_liar=True
    )
    searcher = searcher_class()(
        space=space,
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=METRICS[metrics[0]] if len(metrics) == 1 else [METRICS[m] for m in metrics],
        sampler=sampler,
        study_name=study_name,
        storage=optuna_storage,
        experiment=config.to_dict(),
        repetitions=args.repetitions,
        proposals=remaining,
    )
    scheduler = None
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=metrics[0],
            mode=METRICS[metrics[0]],
            max_t=config.epochs,
            grace_period=1,
            reduction_factor=2,
        )
    launch.init_ray(args, n_dev)
    try:
        tuner = tune.Tuner(
            make_trainable(
                samples_uri=f"{run_uri}/samples",
                gpus_per_trial=args.gpus_per_trial,
                cpus_per_trial=args.cpus_per_trial,
                checkpoint_every_s=args.checkpoint_every_s,
                run_uri=run_uri,
                progress_every_s=args.progress_every_s,
            ),
            param_space={},
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=remaining * args.repetitions,  # the searcher ends sooner if proposals fail
                max_concurrent_trials=args.max_concurrent,
                reuse_actors=False,
                **launch.trial_naming(),
            ),
            run_config=launch.run_config(
                args,
                run=run,
                storage=storage,
                callbacks=[ResultsCallback(f"{run_uri}/results", run, resolve_trial)],
                metric_columns={"epoch": "epoch", "train_loss": "loss", **{m: m for m in metrics}},
                parameter_columns={"optuna_trial": "optuna", **{k: k for k in space}},
            ),
        )
        tuner.fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
