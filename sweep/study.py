"""The Optuna study of a search: its search space, its database, the checks that an existing study is the
one asked for, making it consistent after a killed driver, and bringing the Parquet rows in line with it.

The study lives in a real database (SQLite in the run directory by default, any SQLAlchemy URL), and the
database, not Ray Tune's experiment snapshot, is the source of truth for resuming (see `prepare_resume`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sweep.checkpoint import latest_history
from sweep.results import ResultsTables, final_columns
from sweep.text import text_table

if TYPE_CHECKING:
    import optuna

INTERRUPTED_ATTR = "interrupted_trials"  # study user attr: numbers of trials a killed driver left behind
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why the trial was told to Optuna as failed
SEEDS_ATTR = "seeds"  # trial user attrs of a proposal with several seeds: the seeds,
SEED_VALUES_ATTR = "seed_values"  # each metric's value per seed,
SE_ATTR = "standard_errors"  # and each metric's standard error of the mean told to Optuna


class SearchError(ValueError):
    """A search that cannot start as asked; the message names the value and the fix."""


def trial_id_of(number: int) -> str:
    """The Parquet `trial_id` (and trial directory) of Optuna trial `number`."""
    return f"optuna-{number:04d}"


def search_space(
    p_range: tuple[float, float], eta_range: tuple[float, float]
) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distributions of the search: p log-uniform, eta uniform. Raises SearchError on a bad
    range."""
    from optuna.distributions import FloatDistribution

    for flag, (low, high) in (("--p", p_range), ("--eta", eta_range)):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SearchError(f"{flag} {low:g} {high:g}: both ends must be finite numbers")
        if low >= high:
            raise SearchError(
                f"{flag} {low:g} {high:g}: LOW must be smaller than HIGH; pass the range "
                f"as {flag} LOW HIGH with LOW < HIGH"
            )
    if p_range[0] <= 0:
        raise SearchError(
            f"--p {p_range[0]:g} {p_range[1]:g}: p must be > 0 (it is sampled on a log scale "
            "and t_i = (i/(N_t-1))^p); e.g. --p 0.1 10"
        )
    if eta_range[0] < 0:
        raise SearchError(
            f"--eta {eta_range[0]:g} {eta_range[1]:g}: eta (the KL weight) must be >= 0; e.g. --eta 0.5 4"
        )
    return {
        "p": FloatDistribution(float(p_range[0]), float(p_range[1]), log=True),
        "eta": FloatDistribution(float(eta_range[0]), float(eta_range[1])),
    }


def _range_flag(name: str, dist: Any) -> str:
    if name not in ("p", "eta"):  # a space file's entry, as the search's header shows it
        from sweep.space import describe  # sweep.space imports this module

        return describe({name: dist})
    return f"--{name} {dist.low:g} {dist.high:g}" + (" (log)" if getattr(dist, "log", False) else "")


def check_study(
    study: optuna.Study,
    space: dict[str, Any],
    metric: str | list[str],
    where: str,
    *,
    maximise: bool | list[bool] = False,
    repetitions: int = 1,
) -> None:
    """Refuse an existing study whose directions, metrics, seeds per proposal or search space differ from
    what is asked (`metric`/`maximise`: one, or a list for a multi-objective search)."""
    import optuna

    metrics = [metric] if isinstance(metric, str) else list(metric)
    maximises = [maximise] if isinstance(maximise, bool) else list(maximise)
    name = study.study_name
    fix = "or start a new study with --study NAME (or a new --name)"
    asked = " ".join(f"--metric {m}" for m in metrics)
    stored_metrics = study.user_attrs.get("metrics") or [study.user_attrs.get("metric")]
    if len(study.directions) != len(metrics):
        theirs = " ".join(f"--metric {m}" for m in stored_metrics if m) or f"{len(study.directions)} metrics"
        raise SearchError(
            f"study {name!r} in {where} has {len(study.directions)} objective(s), this search "
            f"{len(metrics)} ({asked}); rerun with {theirs} {fix}"
        )
    verb = {True: "maximises", False: "minimises"}
    for m, up, direction in zip(metrics, maximises, study.directions, strict=True):
        wanted = optuna.study.StudyDirection.MAXIMIZE if up else optuna.study.StudyDirection.MINIMIZE
        if direction != wanted:
            what = "its objective" if len(metrics) == 1 else f"the objective in {m}'s place"
            raise SearchError(
                f"study {name!r} in {where} {verb[not up]} {what}; this search {verb[up]} {m}; {fix}"
            )
    if stored_metrics != [None] and stored_metrics != metrics:
        theirs = " ".join(f"--metric {m}" for m in stored_metrics)
        shown = " and ".join(f"{verb[up]} {m}" for m, up in zip(stored_metrics, maximises, strict=True))
        raise SearchError(
            f"study {name!r} in {where} {shown}, not {', '.join(metrics)}; rerun with {theirs} {fix}"
        )
    stored_r = int(study.user_attrs.get("repetitions", 1))
    if stored_r != repetitions:
        raise SearchError(
            f"study {name!r} in {where} trains {stored_r} seed(s) per proposal, this search {repetitions}; "
            f"rerun with --repetitions {stored_r} {fix}"
        )
    stored = study.user_attrs.get("search_space")
    spaces = []
    if stored:
        spaces.append({k: optuna.distributions.json_to_distribution(v) for k, v in stored.items()})
    # A trial a killed driver left RUNNING may hold only the parameters suggested before the kill.
    spaces += [t.distributions for t in study.get_trials(deepcopy=False) if t.distributions]
    for theirs in spaces:
        if not set(theirs) <= set(space):
            raise SearchError(
                f"study {name!r} in {where} searches {sorted(theirs)}, not {sorted(space)}; "
                f"it is not a p/eta search of this command: {fix}"
            )
        for key in theirs:
            if theirs[key] != space[key]:
                raise SearchError(
                    f"study {name!r} in {where} searches {_range_flag(key, theirs[key])} but this command "
                    f"asks for {_range_flag(key, space[key])}; rerun with "
                    f"{_range_flag(key, theirs[key]).replace(' (log)', '')} to continue it, {fix}"
                )


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database (created if new). Raises SearchError with the URL when it cannot be opened."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds
        raise SearchError(
            f"--optuna-storage {masked(url)}: cannot open the database ({err}); pass a "
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
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.number not in interrupted)
    ]


def prepare_resume(study: optuna.Study) -> list[int]:
    """Make the study consistent after a killed driver; returns the numbers of the interrupted trials.

    The database, not Ray Tune's experiment snapshot, is the source of truth. Trials the killed driver left
    RUNNING are marked FAIL (listed in the study's `interrupted_trials` user attr so they do not count) and
    their parameters (when all were drawn) are enqueued again, so the next trials evaluate what the sampler
    proposed.
    The caller then runs a fresh Tune experiment with `--trials - finished` samples over the same study.
    `Tuner.restore` is not used: its searcher snapshot lags the database (a trial told COMPLETE after the
    last snapshot would be resumed and told twice, a trial asked after it would stay RUNNING forever), while
    the fresh experiment only ever asks the database for new trials. The cost is that an interrupted trial
    restarts from epoch 0 instead of its last checkpoint (at most --max-concurrent trials' work is lost).
    Assumes no other driver is running on this study."""
    from optuna.trial import TrialState

    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    searched = set(study.user_attrs.get("search_space") or ("p", "eta"))
    interrupted = list(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for t in running:
        study.tell(t.number, state=TrialState.FAIL)
        interrupted.append(t.number)
        study.set_user_attr(INTERRUPTED_ATTR, sorted(set(interrupted)))
        if set(t.params) == searched:  # a complete proposal (a kill may come between two suggestions)
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return [t.number for t in running]


def sync_results(tables: ResultsTables, study: optuna.Study, run_uri: str) -> None:
    """Bring the search's Parquet rows in line with the study: `optuna_state` and `search_value` columns,
    the reason of every FAIL in `error` (not on a seed of a failed proposal that itself trained fine),
    and rows a killed driver left RUNNING closed as ERROR (with the epochs their newest checkpoint
    recorded). Flushes the tables."""
    from optuna.trial import TrialState

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for trial_id, row in list(tables.trials.items()):
        number = row.get("optuna_trial")
        if row.get("search") != study.study_name or number is None or int(number) not in by_number:
            continue
        t = by_number[int(number)]
        values: dict[str, Any] = {"optuna_state": t.state.name, **search_values(study, t)}
        if row.get("status") not in ("TERMINATED", "ERROR") and t.state != TrialState.RUNNING:
            history = latest_history(run_uri, trial_id)
            if history:
                tables.upsert_epochs(
                    trial_id,
                    history,
                    run=row.get("run"),
                    cell=row.get("cell"),
                    repetition=row.get("repetition"),
                )
                values.update(final_columns(history))
            ended = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            values["status"] = "TERMINATED" if ended else "ERROR"
        finished = values.get("status", row.get("status")) == "TERMINATED"  # a seed that trained fine
        if t.state == TrialState.FAIL and not row.get("error") and not finished:
            if t.number in interrupted:
                values["error"] = (
                    "interrupted: the search driver stopped before the trial finished; its proposal "
                    "was enqueued again as a new Optuna trial"
                )
            else:
                values["error"] = t.user_attrs.get(FAIL_REASON_ATTR, "Optuna trial failed")
        tables.upsert_trial(trial_id, **values)
        for column in search_values(study, t):  # a column even when all are null
            tables.trials[trial_id][column] = values[column]
    tables.flush()


def study_metrics(study: optuna.Study) -> list[str]:
    """The metrics a search's study optimises, in objective order (`metric` of a single-objective study,
    `metrics` of a multi-objective one)."""
    return list(study.user_attrs.get("metrics") or [study.user_attrs.get("metric", "objective")])


def search_values(study: optuna.Study, t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The Parquet columns a search adds from its Optuna trial `t`: the value told to Optuna (the mean
    over the proposal's seeds), None unless COMPLETE; `search_value` (and `search_se`, the standard error
    of that mean, with several seeds per proposal) for one objective, `search_value_<metric>` and
    `search_se_<metric>` per objective for several."""
    from optuna.trial import TrialState

    metrics = study_metrics(study)
    several = int(study.user_attrs.get("repetitions", 1)) > 1
    done = t.state == TrialState.COMPLETE
    told = list(t.values) if done and t.values is not None else [None] * len(metrics)
    errors = t.user_attrs.get(SE_ATTR, {}) if done else {}
    if len(metrics) == 1:
        out = {"search_value": told[0]}
        if several:
            out["search_se"] = errors.get(metrics[0])
        return out
    out = {}
    for m, v in zip(metrics, told, strict=True):
        out[f"search_value_{m}"] = v
        if several:
            out[f"search_se_{m}"] = errors.get(m)
    return out


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {_param_cell(v)}" for k, v in params.items())


def _value_text(t: optuna.trial.FrozenTrial, i: int, metric: str) -> str:
    """Objective `i` of a COMPLETE trial: the value, `mean +- SE` over seeds when it has several."""
    value = t.values[i]
    se = t.user_attrs.get(SE_ATTR, {}).get(metric)
    return f"{value:.6g}" if se is None else f"{value:.6g} +- {se:.2g}"


def format_top(study: optuna.Study, metric: str, top: int = 5) -> str:
    """Best proposal and the `top` best ones (parameters and objective, mean +- SE over seeds when a
    proposal trains several), as text."""
    import optuna

    best_first = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    done = sorted(completed(study), key=lambda t: best_first * t.value)
    if not done:
        return "no trial completed yet"
    best = done[0]
    lines = [
        f"best: {_params_text(best.params)}, {metric} = {_value_text(best, 0, metric)} "
        f"(Optuna trial {best.number}, {trial_id_of(best.number)})",
        "",
        f"top {min(top, len(done))} trials:",
    ]
    names = list(best.params)
    header = ["rank", "optuna_trial", _id_header(study), *names, metric]
    rows = [
        [
            str(i + 1),
            str(t.number),
            trial_id_of(t.number),
            *(_param_cell(t.params.get(k)) for k in names),
            _value_text(t, 0, metric),
        ]
        for i, t in enumerate(done[:top])
    ]
    return "\n".join(lines + [text_table(header, rows)])


def _id_header(study: optuna.Study) -> str:
    """`trial_id` with one seed per proposal; `cell` with several (the seeds' rows are `<cell>-sR`)."""
    return "cell" if int(study.user_attrs.get("repetitions", 1)) > 1 else "trial_id"


def _param_cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_front(study: optuna.Study, metrics: list[str]) -> str:
    """The Pareto front of a multi-objective study (Optuna's `best_trials`: the COMPLETE proposals no
    other proposal beats in every objective), one row per proposal with its parameters and each
    objective as mean +- SE over its seeds, as text."""
    front = sorted(study.best_trials, key=lambda t: t.number)
    if not front:
        return "no trial completed yet"
    directions = ", ".join(
        f"{m} {'max' if d.name == 'MAXIMIZE' else 'min'}"
        for m, d in zip(metrics, study.directions, strict=True)
    )
    names = sorted({k for t in front for k in t.params})
    header = ["optuna_trial", _id_header(study), *names, *metrics]
    rows = [
        [
            str(t.number),
            trial_id_of(t.number),
            *(_param_cell(t.params.get(k)) for k in names),
            *(_value_text(t, i, m) for i, m in enumerate(metrics)),
        ]
        for t in front
    ]
    title = f"Pareto front ({len(front)} of {len(completed(study))} complete proposals; {directions}):"
    return "\n".join([title, text_table(header, rows)])


def completed(study: optuna.Study) -> list[Any]:
    """The study's COMPLETE trials."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def state_counts(study: optuna.Study) -> str:
    """How many trials the study holds in each state, e.g. "3 COMPLETE, 1 FAIL"."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
