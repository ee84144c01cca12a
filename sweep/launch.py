"""The one launch path of `sweep.grid` and `sweep.search`: storage and run names, the shared flags, the
environment of every trial process, `ray.init`, and the Tune experiment (trial naming, RunConfig).

Nothing here imports Ray at module level: a dry run or an argument error never starts it.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable
from typing import Any

from sweep.storage import read_json_uri, storage_join
from sweep.trackers import add_watch_arguments, check_watch_arguments

DEFAULT_STORAGE = "runs"
STORAGE_ENV = "THERMOSWEEP_STORAGE"
DEFAULT_COMPILE_CACHE = os.path.join("~", ".cache", "thermosweep", "jax")
CHECKPOINTS_KEPT = 2


class LaunchError(ValueError):
    """A launch that cannot start as asked; the message names the value and the fix."""


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """Where runs live and what each trial gets from Ray: flags shared by sweep.grid and sweep.search."""
    p.add_argument(
        "--storage",
        default=None,
        help="where runs live: a directory, NFS path or s3://bucket/prefix "
        f"(default: ${STORAGE_ENV} or ./{DEFAULT_STORAGE})",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray instance)",
    )
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0.0,
        help="GPUs per trial (0: CPU; a fraction shares a GPU between trials)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="on CPU, XLA devices per trial to pmap over (default: --cpus-per-trial)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="at most this many trials at once (default: as many as the resources allow)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="retries of a crashed trial from its last checkpoint (default 2); a lost node is retried "
        "without limit and does not count",
    )
    p.add_argument(
        "--checkpoint-every-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="also checkpoint a trial after this many seconds of training inside an epoch, so a lost "
        "node costs at most that much work (default: at every epoch's end only)",
    )
    p.add_argument(
        "--compile-cache",
        default=DEFAULT_COMPILE_CACHE,
        help="JAX persistent compilation cache shared by trials ('none' disables)",
    )
    add_watch_arguments(p)  # --progress-every-s, --tracker


def check_ray_arguments(args: argparse.Namespace) -> None:
    """Refuse flag values no launch can use. Raises LaunchError."""
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise LaunchError(f"--cpu-devices {args.cpu_devices} must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise LaunchError(f"--max-concurrent {args.max_concurrent} must be >= 1 (or leave it out)")
    every = args.checkpoint_every_s
    if every is not None and not (every > 0 and every < float("inf")):
        raise LaunchError(
            f"--checkpoint-every-s {every:g} must be a number of seconds > 0, e.g. 600 (or leave it out "
            "to checkpoint at every epoch's end only)"
        )
    try:
        check_watch_arguments(args, storage_of(args))
    except ValueError as err:
        raise LaunchError(str(err)) from None


def storage_of(args: argparse.Namespace) -> str:
    """The storage root: --storage, else $THERMOSWEEP_STORAGE, else ./runs. Raises LaunchError if a local
    root is a file, or lies under one (nothing could be written there)."""
    storage = args.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if "://" not in storage:
        path = os.path.abspath(storage)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise LaunchError(
                f"--storage {storage}: {path} is a file, not a directory; pass a directory "
                "(created if missing) or s3://bucket/prefix"
            )
    return storage


_NAME = re.compile(r"[A-Za-z0-9._=+-]+")
NAME_MAX_BYTES = 255  # one path component on ext4, XFS, APFS, NTFS
KEY_MAX_BYTES = 1024  # an S3 object key
KEY_RESERVED_BYTES = 256  # below a run's prefix: <trial_id>/checkpoint_NNNNNN/state/<Orbax file>, Ray's files


def check_name(name: str, flag: str) -> str:
    """`name` if it is a safe run or study name (the cell-name rule: letters, digits and . _ = + -, not
    '.' or '..', not starting with '-'), so that it is one directory inside the storage. Raises
    LaunchError."""
    if not _NAME.fullmatch(name) or name in (".", "..") or name.startswith("-"):
        raise LaunchError(
            f"{flag} {name!r}: a name may hold only letters, digits and . _ = + -, and may not "
            "be '.' or '..' or start with '-' (it names a directory inside --storage)"
        )
    if len(name.encode()) > NAME_MAX_BYTES:
        raise LaunchError(
            f"{flag} {name[:40]}... is {len(name.encode())} bytes; a name is one directory and "
            f"filesystems allow at most {NAME_MAX_BYTES} bytes per path component: pick a shorter name"
        )
    return name


def check_key_length(run_uri: str, flag: str, name: str) -> None:
    """On an object store, refuse a run whose keys could pass S3's 1024-byte limit: the run's own prefix
    must leave `KEY_RESERVED_BYTES` for what lies below it (trial directories, Ray's and Orbax's file
    names). Raises LaunchError."""
    if "://" not in run_uri:
        return
    key = run_uri.split("://", 1)[1].partition("/")[2]
    room = KEY_MAX_BYTES - KEY_RESERVED_BYTES
    if len(key.encode()) > room:
        raise LaunchError(
            f"{flag} {name[:40]}{'...' if len(name) > 40 else ''}: the run's key prefix {key[:40]}... is "
            f"{len(key.encode())} bytes; S3 keys hold at most {KEY_MAX_BYTES} bytes and the run needs "
            f"{KEY_RESERVED_BYTES} below its prefix: use a shorter --name or --storage prefix"
        )


def run_location(storage: str, run: str, flag: str = "--name") -> str:
    """The run directory `<storage>/<run>` after checking the name and, for local storage, that it
    resolves inside the storage root (a symbolic link could lead elsewhere). Raises LaunchError."""
    check_name(run, flag)
    run_uri = storage_join(storage, run)
    check_key_length(run_uri, flag, run)
    if "://" not in run_uri:
        root = os.path.realpath(storage_join(storage))
        if os.path.commonpath([root, os.path.realpath(run_uri)]) != root:
            raise LaunchError(
                f"{flag} {run!r}: {run_uri} resolves to {os.path.realpath(run_uri)}, outside "
                f"--storage {root}; pick another name or remove the link"
            )
    return run_uri


def default_run_name(prefix: str) -> str:
    """`<prefix>-<UTC time>`, the name of a run started without --name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def existing_manifest(
    storage: str, run: str | None, manifest_file: str, *, resume: bool, what: str
) -> dict[str, Any] | None:
    """The manifest of run `run` under `storage` (None for a new run), after the checks every launch
    makes: --resume needs --name and an existing run; a new run must not reuse a name. Raises
    LaunchError naming the fix."""
    if resume and not run:
        raise LaunchError(f"--resume needs --name RUN (the {what} to continue, a directory under --storage)")
    if not run:
        return None
    try:
        manifest = read_json_uri(f"{run_location(storage, run)}/{manifest_file}")
    except OSError as err:  # e.g. an unreachable bucket or missing credentials
        raise LaunchError(
            f"--storage {storage}: cannot read it ({' '.join(str(err).split())[:200]}); check "
            "the path, the network and the credentials"
        ) from None
    if resume and manifest is None:
        raise LaunchError(
            f"--resume: no {what} {run!r} under {storage} (no {manifest_file}); start it "
            "without --resume, or pass the --storage it was started with"
        )
    if manifest is not None and not resume:
        raise LaunchError(
            f"run {run!r} already exists under {storage}; continue it with --resume or pick another --name"
        )
    return manifest


def devices_per_trial(args: argparse.Namespace) -> int:
    """How many devices each trial trains on: its GPUs, or its CPU devices."""
    if args.gpus_per_trial > 0:
        return max(1, int(args.gpus_per_trial))
    return args.cpu_devices or max(1, int(args.cpus_per_trial))


def resources_of(args: argparse.Namespace) -> dict[str, float]:
    return {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}


def trial_env(
    *,
    gpus_per_trial: float,
    cpus_per_trial: int,
    cpu_devices: int,
    compilation_cache: str | None = None,
    base_xla_flags: str = "",
) -> dict[str, str]:
    """Environment variables for the trial processes (passed with `ray.init(runtime_env=...)`).

    - GPU trials: no memory preallocation, so trials sharing a GPU do not fail on the first allocation.
    - CPU trials: JAX on the CPU only; `cpu_devices` > 1 splits the host into that many XLA devices (the
      trial pmaps over them); with one device per CPU each device runs single-threaded. BLAS/OpenMP
      threads are capped at the trial's CPUs, so concurrent trials do not fight over cores.
    - A persistent compilation cache lets repetitions of a cell (same shapes) reuse compiled steps.
    """
    threads = str(max(1, int(cpus_per_trial)))
    env = {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    # The device count is this function's to set: drop one inherited from the driver's environment.
    flags = [f for f in base_xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    if gpus_per_trial <= 0:
        env["JAX_PLATFORMS"] = "cpu"
        if cpu_devices > 1:
            flags.append(f"--xla_force_host_platform_device_count={cpu_devices}")
        if cpu_devices >= int(cpus_per_trial):
            flags.append("--xla_cpu_multi_thread_eigen=false")
    # XLA stops reading XLA_FLAGS at the first word that is not a `--flag`, so only flags go in, each once.
    flags = list(dict.fromkeys(f for f in flags if f.startswith("--")))
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    if compilation_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def ray_trial_env(args: argparse.Namespace, n_dev: int) -> dict[str, str]:
    """The environment of every trial process of this launch: `trial_env` from the flags (thread caps, its
    devices, the shared compilation cache `--compile-cache`), and Ray's auth token off for a local
    instance."""
    cache = None if str(args.compile_cache).lower() == "none" else os.path.expanduser(args.compile_cache)
    env = trial_env(
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=int(args.cpus_per_trial),
        cpu_devices=n_dev,
        compilation_cache=cache,
        base_xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    if args.address is None:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def set_ray_defaults(args: argparse.Namespace, storage: str) -> None:
    """Ray's settings for our launches. Ray reads these when it is imported, so this runs before the first
    import of ray; a value the user set in the environment wins."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic progress table
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every trial's epoch line, not "[repeated 4x]"
    # A diverged trial's last report carries the error, not the metric: let Tune accept it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # One line per failed trial from sweep.failures.TrialFailures instead of Tune's traceback (the trace
    # stays in the trial's error.txt).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    if "://" not in storage:
        # Snapshot Tune's experiment state often (cheap on a local disk), so that after a crash a
        # resumed trial starts from its newest checkpoint rather than an older one the snapshot knew.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if args.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts trial workers at niceness 15; the trials are this command's work, so run them at
        # the priority of the command itself (set RAY_worker_niceness to keep Ray's default).
        os.environ.setdefault("RAY_worker_niceness", "0")


def init_ray(args: argparse.Namespace, n_dev: int) -> None:
    """Start a local Ray instance (or join --address) with the trials' environment."""
    import ray

    local = args.address is None
    ray.init(
        address=args.address,
        runtime_env={"env_vars": ray_trial_env(args, n_dev)},
        include_dashboard=False if local else None,
        log_to_driver=True,
    )


def trial_naming() -> dict[str, Callable[[Any], str]]:
    """TuneConfig arguments that name every trial (and its directory) by its `trial_id`."""

    def name(trial: Any) -> str:
        return str(trial.config["trial"]["trial_id"])

    return {"trial_name_creator": name, "trial_dirname_creator": name}


def run_config(
    args: argparse.Namespace,
    *,
    run: str,
    storage: str,
    callbacks: list[Any],
    metric_columns: dict[str, str],
    parameter_columns: dict[str, str],
) -> Any:
    """The Tune RunConfig of a launch: the run's storage, its progress table (with the trials' progress
    inside epochs, `sweep.progress`), the trackers (`sweep.tracker_callbacks`), checkpoint retention and
    retries of crashed trials (none for an error a retry cannot cure: `sweep.failures`)."""
    from ray import tune

    from sweep.diskfull import StorageGuard
    from sweep.failures import TrialFailures, count_node_losses_apart
    from sweep.progress import progress_reporter
    from sweep.tracker_callbacks import tracker_callbacks

    count_node_losses_apart()
    run_uri = storage_join(storage, run)
    trackers = tracker_callbacks(args, run=run, run_uri=run_uri)
    callbacks = [StorageGuard(), *callbacks, *trackers, TrialFailures(args.max_failures)]
    reporter = progress_reporter(
        run_uri, metric_columns=metric_columns, parameter_columns=parameter_columns, max_report_frequency=30
    )
    return tune.RunConfig(
        name=run,
        storage_path=storage_join(storage),
        callbacks=callbacks,
        progress_reporter=reporter,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        verbose=1,
    )
