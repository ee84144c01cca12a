"""`python -m sweep.search`: an Optuna search over the temperature power p and the KL weight eta.

Optuna (TPE, fixed seed) proposes (p, eta); Ray Tune runs each proposal as a trial exactly like a grid trial
(the same trainable, Orbax checkpoints and Parquet rows in `<storage>/<run>/results/`), with the extra
columns `search` (the study name) and `optuna_trial` (the Optuna trial number). The objective told to Optuna
is the metric (default `kid_rbf_inf`, minimised) at the trial's last epoch.

The study lives in a real database (`sqlite:///<storage>/<run>/optuna.db` by default, any SQLAlchemy URL
with `--optuna-storage`), and that database is the source of truth for resuming: `--resume` counts the
finished trials there and runs a fresh Tune experiment for the rest, over the same study (see
`prepare_resume` for why this is preferred to `Tuner.restore`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from model.config import ExperimentConfig, get_preset, parse_set_args, parse_value
from sweep.grid import DEFAULT_STORAGE, add_ray_arguments, devices_per_trial, ray_trial_env
from sweep.results import ResultsTables, filesystem_for, read_json_uri, write_json_uri
from sweep.trainable import make_trainable, resolve_trial, storage_join, trial_spec

if TYPE_CHECKING:
    import optuna

MANIFEST_FILE = "search.json"
STUDY_DB_FILE = "optuna.db"
METRICS = ("kid_rbf_inf", "kid_poly_inf", "fid_inf")
DEFAULT_P = (0.1, 10.0)
DEFAULT_ETA = (0.5, 4.0)
DEFAULT_SAMPLER_SEED = 0
SEARCHED_FIELDS = {"temp_power": "--p", "kl_weight": "--eta"}
INTERRUPTED_ATTR = "interrupted_trials"  # study user attr: numbers of trials a killed driver left behind
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why the trial was told to Optuna as failed


class SearchError(ValueError):
    """A search that cannot start as asked; the message names the value and the fix."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sweep.search`."""
    p = argparse.ArgumentParser(
        prog="python -m sweep.search",
        description="Search the temperature power p and the KL weight eta with Optuna (TPE), each proposal "
                    "run as a Ray Tune trial like a grid trial, minimising the final KID_inf.",
    )
    p.add_argument("--base", default="digits", help="base preset (default: digits)")
    p.add_argument("--study", default=None, help="Optuna study name (default: the run name)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="SQLAlchemy URL of the study's database, e.g. postgresql://user@host/db "
                        f"(default: sqlite:///<storage>/<run>/{STUDY_DB_FILE}; required for s3:// storage)")
    p.add_argument("--trials", type=int, default=20, help="trials in total (default 20)")
    p.add_argument("--p", type=float, nargs=2, default=list(DEFAULT_P), metavar=("LOW", "HIGH"),
                   help="range of the temperature power p, sampled log-uniformly (default 0.1 10)")
    p.add_argument("--eta", type=float, nargs=2, default=list(DEFAULT_ETA), metavar=("LOW", "HIGH"),
                   help="range of the KL weight eta, sampled uniformly (default 0.5 4)")
    p.add_argument("--metric", default="kid_rbf_inf", choices=METRICS,
                   help="objective, minimised at the last epoch (default kid_rbf_inf)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the preset's)")
    p.add_argument("--scheduler", default="none", choices=("none", "asha"),
                   help="asha: stop weak trials early on the per-epoch metric (evaluates every epoch)")
    p.add_argument("--name", help="run name (default: search-<UTC time>); results go to <storage>/<name>/")
    p.add_argument("--resume", action="store_true",
                   help="continue the search --name until --trials trials in total have finished")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the base preset (repeatable)")
    add_ray_arguments(p)
    p.add_argument("--sampler-seed", type=int, default=DEFAULT_SAMPLER_SEED,
                   help=f"seed of the TPE sampler (default {DEFAULT_SAMPLER_SEED})")
    return p


# ---------------------------------------------------------------------------------------------- checks

def search_space(p_range: tuple[float, float], eta_range: tuple[float, float]
                 ) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distributions of the search: p log-uniform, eta uniform. Raises SearchError on a bad
    range."""
    from optuna.distributions import FloatDistribution

    for flag, (low, high) in (("--p", p_range), ("--eta", eta_range)):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SearchError(f"{flag} {low:g} {high:g}: both ends must be finite numbers")
        if low >= high:
            raise SearchError(f"{flag} {low:g} {high:g}: LOW must be smaller than HIGH; pass the range "
                              f"as {flag} LOW HIGH with LOW < HIGH")
    if p_range[0] <= 0:
        raise SearchError(f"--p {p_range[0]:g} {p_range[1]:g}: p must be > 0 (it is sampled on a log scale "
                          "and t_i = (i/(N_t-1))^p); e.g. --p 0.1 10")
    if eta_range[0] < 0:
        raise SearchError(f"--eta {eta_range[0]:g} {eta_range[1]:g}: eta (the KL weight) must be >= 0; "
                          "e.g. --eta 0.5 4")
    return {"p": FloatDistribution(float(p_range[0]), float(p_range[1]), log=True),
            "eta": FloatDistribution(float(eta_range[0]), float(eta_range[1]))}


def base_config(preset: str, sets: list[str], *, epochs: int | None, scheduler: str) -> ExperimentConfig:
    """The config every trial starts from: the preset with `--set`/`--epochs`, objective thermo, and
    evaluation on (every epoch with ASHA, else the preset's cadence, which always includes the last epoch).
    p and eta are filled per trial. Raises SearchError naming the key and the fix."""
    try:
        overrides: dict[str, Any] = parse_set_args(sets)
        for key in overrides:
            if key in SEARCHED_FIELDS:
                raise SearchError(f"--set {key}=...: {key} is what the search varies; give its range with "
                                  f"{SEARCHED_FIELDS[key]} LOW HIGH instead")
        if "objective" in overrides and overrides["objective"] != "thermo":
            raise SearchError(f"--set objective={overrides['objective']}: the search tunes the thermodynamic "
                              "objective's p and eta; drop --set objective")
        eval_every = parse_value("eval_every", overrides["eval_every"]) if "eval_every" in overrides else None
    except ValueError as err:
        raise SearchError(str(err)) from None
    if eval_every == 0:
        raise SearchError("--set eval_every=0 turns evaluation off, but the search's objective is the metric "
                          "at the last epoch; drop it or use --set eval_every=N with N >= 1")
    if scheduler == "asha" and eval_every not in (None, 1):
        raise SearchError(f"--set eval_every={eval_every} with --scheduler asha: ASHA compares trials on the "
                          "metric every epoch; drop --set eval_every (it becomes 1) or use --scheduler none")
    if epochs is not None:
        if epochs < 1:
            raise SearchError(f"--epochs {epochs}: must be >= 1")
        overrides["epochs"] = epochs
    overrides["objective"] = "thermo"
    try:
        config = get_preset(preset, **overrides)
    except (ValueError, TypeError) as err:
        raise SearchError(f"--base {preset} with --set {' '.join(sets) or '(none)'}: {err}") from None
    if scheduler == "asha":
        config = replace(config, eval_every=1)
    elif config.eval_every == 0:
        config = replace(config, eval_every=config.epochs)  # evaluate at the last epoch only
    return config


def _range_flag(name: str, dist: Any) -> str:
    flag = {"p": "--p", "eta": "--eta"}.get(name, name)
    return f"{flag} {dist.low:g} {dist.high:g}" + (" (log)" if getattr(dist, "log", False) else "")


def check_study(study: optuna.Study, space: dict[str, Any], metric: str, where: str) -> None:
    """Refuse an existing study whose direction, metric or search space differs from what is asked."""
    import optuna

    name = study.study_name
    fix = "or start a new study with --study NAME (or a new --name)"
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise SearchError(f"study {name!r} in {where} maximises its objective; this search minimises "
                          f"{metric}; {fix}")
    stored_metric = study.user_attrs.get("metric")
    if stored_metric not in (None, metric):
        raise SearchError(f"study {name!r} in {where} minimises {stored_metric}, not {metric}; rerun with "
                          f"--metric {stored_metric} {fix}")
    stored = study.user_attrs.get("search_space")
    spaces = []
    if stored:
        spaces.append({k: optuna.distributions.json_to_distribution(v) for k, v in stored.items()})
    # A trial a killed driver left RUNNING may hold only the parameters suggested before the kill.
    spaces += [t.distributions for t in study.get_trials(deepcopy=False) if t.distributions]
    for theirs in spaces:
        if not set(theirs) <= set(space):
            raise SearchError(f"study {name!r} in {where} searches {sorted(theirs)}, not {sorted(space)}; "
                              f"it is not a p/eta search of this command: {fix}")
        for key in theirs:
            if theirs[key] != space[key]:
                raise SearchError(
                    f"study {name!r} in {where} searches {_range_flag(key, theirs[key])} but this command "
                    f"asks for {_range_flag(key, space[key])}; rerun with "
                    f"{_range_flag(key, theirs[key]).replace(' (log)', '')} to continue it, {fix}")


# ---------------------------------------------------------------------------------------------- Optuna

def _searcher_class() -> type:
    """`ThermoOptunaSearch`, defined lazily so importing this module does not import Ray."""
    global _SEARCHER
    if _SEARCHER is not None:
        return _SEARCHER
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class ThermoOptunaSearch(OptunaSearch):
        """Ray's OptunaSearch with the search trial's whole Tune config built from each proposal, the
        epoch (not Tune's iteration) as the report step, and the final-epoch rule: a trial is COMPLETE
        with the metric at its last epoch, PRUNED if a scheduler stopped it earlier, FAIL if it crashed,
        diverged or ended without a finite metric (the reason goes to the trial's user attrs)."""

        def __init__(self, *, experiment: dict[str, Any], study_name: str, **kwargs: Any) -> None:
            super().__init__(study_name=study_name, **kwargs)
            self._experiment = experiment
            self._epochs = int(experiment["epochs"])
            self._reported: dict[str, set[int]] = {}

        def _report(self, trial_id: str, value: Any, epoch: Any) -> None:
            """The metric of `epoch` as the trial's intermediate value, once per epoch, if it is finite."""
            if epoch is None or not (isinstance(value, int | float) and math.isfinite(value)):
                return
            steps = self._reported.setdefault(trial_id, set())
            if int(epoch) not in steps:
                self._ot_trials[trial_id].report(float(value), int(epoch))
                steps.add(int(epoch))

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            params = super().suggest(trial_id)
            if not isinstance(params, dict):
                return params
            number = self._ot_trials[trial_id].number
            return search_trial_config(self._experiment, self._study_name, number, params["p"], params["eta"])

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._report(trial_id, result.get(self.metric), result.get("epoch"))

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                              error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            result = result or {}
            value, epoch = result.get(self.metric), result.get("epoch")
            # Tune hands a result that stops the trial (ASHA's decision, or its last epoch) to
            # on_trial_complete only, so it is reported here.
            self._report(trial_id, value, epoch)
            state, reason = optuna.trial.TrialState.FAIL, None
            if error:
                reason = "the Ray Tune trial ended in ERROR (see the Parquet row's error)"
            elif epoch is None:
                reason = "stopped before its first epoch was reported"
            elif int(epoch) < self._epochs:
                state = optuna.trial.TrialState.PRUNED  # a scheduler (ASHA) stopped it early
            elif not (isinstance(value, int | float) and math.isfinite(value)):
                reason = f"{self.metric} is {value!r} at the last epoch {epoch}, not a finite number"
            else:
                state = optuna.trial.TrialState.COMPLETE
            try:
                if reason:
                    ot_trial.set_user_attr(FAIL_REASON_ATTR, reason)
                self._ot_study.tell(ot_trial, float(value) if state == optuna.trial.TrialState.COMPLETE
                                    else None, state=state)
            except Exception as exc:  # noqa: BLE001 - e.g. told already; never stop the whole search
                print(f"warning: could not tell Optuna trial {ot_trial.number}: {exc}", file=sys.stderr)
            self._completed_trials.add(trial_id)

    _SEARCHER = ThermoOptunaSearch
    return _SEARCHER


_SEARCHER: type | None = None


def trial_id_of(number: int) -> str:
    """The Parquet `trial_id` (and trial directory) of Optuna trial `number`."""
    return f"optuna-{number:04d}"


def search_trial_config(experiment: dict[str, Any], study: str, number: int, p: float, eta: float
                        ) -> dict[str, Any]:
    """The Tune config of one search trial: a grid-like trial spec whose experiment is the base config with
    temp_power = p and kl_weight = eta, plus the `search` and `optuna_trial` columns."""
    config = ExperimentConfig(**{**experiment, "temp_power": float(p), "kl_weight": float(eta)})
    trial_id = trial_id_of(number)
    spec = trial_spec(config, trial_id=trial_id, cell=trial_id, repetition=0, grid="search",
                      columns={"search": study, "optuna_trial": number})
    return {"trial": spec, "p": float(p), "eta": float(eta), "optuna_trial": number}


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database (created if new). Raises SearchError with the URL when it cannot be opened."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds
        raise SearchError(f"--optuna-storage {masked(url)}: cannot open the database ({err}); pass a "
                          "SQLAlchemy URL such as sqlite:///path/optuna.db or postgresql://user@host/db"
                          ) from None


def load_study_or_none(storage: Any, name: str) -> optuna.Study | None:
    """The study `name` in `storage`, or None if there is none of that name."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def masked(url: str) -> str:
    """`url` with any password hidden (for messages and the manifest)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: shown as given
        return url


def finished_trials(study: optuna.Study) -> list[Any]:
    """Trials that count towards --trials: COMPLETE, PRUNED, and FAIL except those a killed driver left
    behind (their proposals are re-enqueued instead)."""
    from optuna.trial import TrialState

    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in interrupted)]


def prepare_resume(study: optuna.Study) -> list[int]:
    """Make the study consistent after a killed driver; returns the numbers of the interrupted trials.

    The database, not Ray Tune's experiment snapshot, is the source of truth. Trials the killed driver left
    RUNNING are marked FAIL (listed in the study's `interrupted_trials` user attr so they do not count) and
    their parameters (when both were drawn) are enqueued again, so the next trials evaluate what the sampler
    proposed.
    The caller then runs a fresh Tune experiment with `--trials - finished` samples over the same study.
    `Tuner.restore` is not used: its searcher snapshot lags the database (a trial told COMPLETE after the
    last snapshot would be resumed and told twice, a trial asked after it would stay RUNNING forever), while
    the fresh experiment only ever asks the database for new trials. The cost is that an interrupted trial
    restarts from epoch 0 instead of its last checkpoint (at most --max-concurrent trials' work is lost).
    Assumes no other driver is running on this study."""
    from optuna.trial import TrialState

    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    interrupted = list(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for t in running:
        study.tell(t.number, state=TrialState.FAIL)
        interrupted.append(t.number)
        study.set_user_attr(INTERRUPTED_ATTR, sorted(set(interrupted)))
        if set(t.params) == {"p", "eta"}:  # a complete proposal (a kill may come between two suggestions)
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return [t.number for t in running]


# ---------------------------------------------------------------------------------------------- results

def _latest_history(run_uri: str, trial_id: str) -> list[dict[str, Any]] | None:
    """The readings history in the newest checkpoint of `trial_id` under the run directory, if any."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(f"{run_uri}/{trial_id}")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    for info in sorted((i for i in infos if i.base_name.startswith("checkpoint_")),
                       key=lambda i: i.base_name, reverse=True):
        try:
            with fs.open_input_stream(f"{info.path}/history.json") as stream:
                return json.loads(stream.readall().decode())
        except (FileNotFoundError, OSError):
            continue
    return None


def sync_results(tables: ResultsTables, study: optuna.Study, run_uri: str) -> None:
    """Bring the search's Parquet rows in line with the study: `optuna_state` and `search_value` columns,
    the reason of every FAIL in `error`, and rows a killed driver left RUNNING closed as ERROR (with the
    epochs their newest checkpoint recorded). Flushes the tables."""
    from optuna.trial import TrialState

    from sweep.results import final_columns

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for trial_id, row in list(tables.trials.items()):
        number = row.get("optuna_trial")
        if row.get("search") != study.study_name or number is None or int(number) not in by_number:
            continue
        t = by_number[int(number)]
        values: dict[str, Any] = {"optuna_state": t.state.name,
                                  "search_value": t.value if t.state == TrialState.COMPLETE else None}
        if row.get("status") not in ("TERMINATED", "ERROR") and t.state != TrialState.RUNNING:
            history = _latest_history(run_uri, trial_id)
            if history:
                tables.upsert_epochs(trial_id, history, run=row.get("run"), cell=row.get("cell"),
                                     repetition=row.get("repetition"))
                values.update(final_columns(history))
            ended = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            values["status"] = "TERMINATED" if ended else "ERROR"
        if t.state == TrialState.FAIL and not row.get("error"):
            if t.number in interrupted:
                values["error"] = ("interrupted: the search driver stopped before the trial finished; its p "
                                   "and eta were enqueued again as a new Optuna trial")
            else:
                values["error"] = t.user_attrs.get(FAIL_REASON_ATTR, "Optuna trial failed")
        tables.upsert_trial(trial_id, **values)
        tables.trials[trial_id]["search_value"] = values["search_value"]  # a column even when all are null
    tables.flush()


def format_top(study: optuna.Study, metric: str, top: int = 5) -> str:
    """Best p, eta and objective, and the `top` best trials, as text."""
    from optuna.trial import TrialState

    done = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
                  key=lambda t: t.value)
    if not done:
        return "no trial completed yet"
    best = done[0]
    lines = [f"best: p = {best.params['p']:.4g}, eta = {best.params['eta']:.4g}, {metric} = {best.value:.6g} "
             f"(Optuna trial {best.number}, {trial_id_of(best.number)})", "",
             f"top {min(top, len(done))} trials:"]
    header = ["rank", "optuna_trial", "trial_id", "p", "eta", metric]
    rows = [[str(i + 1), str(t.number), trial_id_of(t.number), f"{t.params['p']:.4g}",
             f"{t.params['eta']:.4g}", f"{t.value:.6g}"] for i, t in enumerate(done[:top])]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def state_counts(study: optuna.Study) -> str:
    """How many trials the study holds in each state, e.g. "3 COMPLETE, 1 FAIL"."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"


# ---------------------------------------------------------------------------------------------- driver

def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ("temp_power", "kl_weight") and old.get(k) != new.get(k)]


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a search; returns the exit code (argument errors exit with code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except SearchError as err:
        parser.error(str(err))
    return 2  # not reached: parser.error exits


def _main(args: argparse.Namespace) -> int:
    storage = args.storage or os.environ.get("THERMOSWEEP_STORAGE") or DEFAULT_STORAGE
    if args.trials < 1:
        raise SearchError(f"--trials {args.trials}: must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SearchError(f"--max-concurrent {args.max_concurrent}: must be >= 1 (or leave it out)")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise SearchError(f"--cpu-devices {args.cpu_devices}: must be >= 1")
    if args.resume and not args.name:
        raise SearchError("--resume needs --name RUN (the search to continue, a directory under --storage)")
    space = search_space(tuple(args.p), tuple(args.eta))
    config = base_config(args.base, args.set, epochs=args.epochs, scheduler=args.scheduler)
    n_dev = devices_per_trial(args)
    if config.batch_size % n_dev:
        raise SearchError(f"batch_size {config.batch_size} is not divisible by {n_dev} devices per trial; "
                          "use --set batch_size=N with N divisible by it, or fewer devices per trial")

    run = args.name or f"search-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    run_uri = storage_join(storage, run)
    remote = "://" in run_uri
    if remote and args.optuna_storage is None:
        raise SearchError(f"--storage {storage} is remote; SQLite cannot live there: pass "
                          "--optuna-storage URL (e.g. postgresql://user@host/db)")
    manifest = read_json_uri(f"{run_uri}/{MANIFEST_FILE}")
    if args.resume and manifest is None:
        raise SearchError(f"--resume: no search {run!r} under {storage} (no {MANIFEST_FILE}); start it "
                          "without --resume, or pass the --storage it was started with")
    if manifest is not None and not args.resume:
        raise SearchError(f"run {run!r} already exists under {storage}; continue it with --resume or pick "
                          "another --name")
    study_name = args.study or (manifest or {}).get("study") or run
    if manifest is not None and manifest.get("study") != study_name:
        raise SearchError(f"--study {study_name}: run {run!r} searches study {manifest.get('study')!r}; "
                          f"drop --study or pass --study {manifest.get('study')}")
    url = args.optuna_storage
    if url is None:
        if manifest is not None and manifest.get("optuna_storage") != "run":
            raise SearchError(f"run {run!r} keeps its study in {manifest.get('optuna_storage')}; pass "
                              "--optuna-storage with that URL")
        os.makedirs(run_uri, exist_ok=True)
        url = f"sqlite:///{run_uri}/{STUDY_DB_FILE}"
    if manifest is not None:
        diff = _config_diff(manifest["experiment"], config.to_dict())
        if diff:
            raise SearchError(f"--resume: the trial config differs from the one search {run!r} started "
                              f"with ({'; '.join(diff)}); rerun with its original --base/--set/--epochs/"
                              "--scheduler")

    optuna_storage = open_storage(url)
    study = load_study_or_none(optuna_storage, study_name)
    if study is not None:
        check_study(study, space, args.metric, masked(url))
        if not args.resume and study.get_trials(deepcopy=False):
            raise SearchError(f"study {study_name!r} in {masked(url)} already has "
                              f"{len(study.get_trials(deepcopy=False))} trials; continue it with --resume "
                              "--name RUN, or pick another --study")
    elif args.resume:
        raise SearchError(f"--resume: study {study_name!r} is not in {masked(url)}; pass the "
                          "--optuna-storage and --study the search was started with")
    return run_search(args, run=run, storage=storage, study_name=study_name, url=url,
                      optuna_storage=optuna_storage, space=space, config=config, n_dev=n_dev)


def run_search(args: argparse.Namespace, *, run: str, storage: str, study_name: str, url: str,
               optuna_storage: Any, space: dict[str, Any], config: ExperimentConfig, n_dev: int) -> int:
    """Create or continue the study, run the remaining trials on Ray Tune, then print the best ones."""
    import optuna

    run_uri = storage_join(storage, run)
    results_uri = f"{run_uri}/results"
    study = optuna.create_study(storage=optuna_storage, study_name=study_name, direction="minimize",
                                load_if_exists=True)
    study.set_user_attr("metric", args.metric)
    study.set_user_attr("search_space", {k: optuna.distributions.distribution_to_json(v)
                                         for k, v in space.items()})
    study.set_user_attr("run", run)
    if not args.resume:
        write_json_uri(f"{run_uri}/{MANIFEST_FILE}", {
            "run": run, "study": study_name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "optuna_storage": "run" if args.optuna_storage is None else masked(url),
            "metric": args.metric, "base": args.base, "scheduler": args.scheduler, "argv": args.argv,
            "experiment": config.to_dict()})
    interrupted = prepare_resume(study) if args.resume else []
    if interrupted:
        print(f"resume: Optuna trials {interrupted} were interrupted; marked FAIL and their p, eta enqueued "
              "again", flush=True)
    tables = ResultsTables(results_uri)
    sync_results(tables, study, run_uri)
    remaining = args.trials - len(finished_trials(study))
    print(f"search {run}: study {study_name!r} in {masked(url)} ({state_counts(study)}); "
          f"{max(remaining, 0)} of {args.trials} trials to run; minimising final {args.metric} over "
          f"p in [{space['p'].low:g}, {space['p'].high:g}] (log) and eta in [{space['eta'].low:g}, "
          f"{space['eta'].high:g}]; {config.epochs} epochs per trial", flush=True)
    start = time.perf_counter()
    if remaining > 0:
        _fit(args, run=run, storage=storage, study=study, study_name=study_name,
             optuna_storage=optuna_storage, space=space, config=config, n_dev=n_dev, remaining=remaining)
        study = optuna.load_study(study_name=study_name, storage=optuna_storage)
        tables = ResultsTables(results_uri)
        sync_results(tables, study, run_uri)

    done = len(finished_trials(study))
    print(f"\nsearch {run} finished in {time.perf_counter() - start:.0f} s: {done}/{args.trials} trials "
          f"finished ({state_counts(study)})")
    print(f"results:     {results_uri}/trials.parquet (columns search, optuna_trial, optuna_state, "
          "search_value)")
    print(f"             {results_uri}/epochs.parquet")
    print(format_top(study, args.metric))
    print(f"\nwatch the study: optuna-dashboard {masked(url)}   (pip install 'thermosweep[dashboard]')")
    if done < args.trials:
        print(f"{args.trials - done} trials did not finish; continue with: python -m sweep.search "
              f"--name {run} --resume (plus the flags it was started with)")
        return 1
    return 0


def _fit(args: argparse.Namespace, *, run: str, storage: str, study: Any, study_name: str,
         optuna_storage: Any, space: dict[str, Any], config: ExperimentConfig, n_dev: int,
         remaining: int) -> None:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sweep.callback import ResultsCallback

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # A diverged trial's last report carries the error, not the metric: let Tune accept it (the searcher
    # tells Optuna FAIL and the results callback records the reason).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    local = args.address is None
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_worker_niceness", "0")
    run_uri = storage_join(storage, run)
    env = ray_trial_env(args, n_dev, local)
    # The sampler's seed moves with the study's size, so a resumed search does not replay the proposals
    # (random start-up points) of its first run; TPE reads the whole history from the database.
    sampler = optuna.samplers.TPESampler(seed=args.sampler_seed + len(study.get_trials(deepcopy=False)),
                                         constant_liar=True)
    searcher = _searcher_class()(space=space, metric=args.metric, mode="min", sampler=sampler,
                                 study_name=study_name, storage=optuna_storage, experiment=config.to_dict())
    scheduler = None
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric=args.metric, mode="min", max_t=config.epochs,
                                  grace_period=1, reduction_factor=2)
    reporter = tune.CLIReporter(metric_columns={"epoch": "epoch", "train_loss": "loss",
                                                args.metric: args.metric},
                                parameter_columns={"optuna_trial": "optuna", "p": "p", "eta": "eta"},
                                max_report_frequency=30)
    ray.init(address=args.address, runtime_env={"env_vars": env}, include_dashboard=False if local else None,
             log_to_driver=True)
    try:
        tuner = tune.Tuner(
            make_trainable(samples_uri=f"{run_uri}/samples", gpus_per_trial=args.gpus_per_trial,
                           cpus_per_trial=args.cpus_per_trial),
            param_space={},
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                max_concurrent_trials=args.max_concurrent, reuse_actors=False,
                trial_name_creator=lambda t: str(t.config["trial"]["trial_id"]),
                trial_dirname_creator=lambda t: str(t.config["trial"]["trial_id"]),
            ),
            run_config=tune.RunConfig(
                name=run, storage_path=storage_join(storage), progress_reporter=reporter, verbose=1,
                callbacks=[ResultsCallback(f"{run_uri}/results", run, resolve_trial)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
            ),
        )
        tuner.fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
