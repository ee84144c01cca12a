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
    flag = {"p": "--p", "eta": "--eta"}.get(name, name)
    return f"{flag} {dist.low:g} {dist.high:g}" + (" (log)" if getattr(dist, "log", False) else "")


def check_study(
    study: optuna.Study, space: dict[str, Any], metric: str, where: str, *, maximise: bool = False
) -> None:
    """Refuse an existing study whose direction, metric or search space differs from what is asked."""
    import optuna

    name = study.study_name
    fix = "or start a new study with --study NAME (or a new --name)"
    wanted = optuna.study.StudyDirection.MAXIMIZE if maximise else optuna.study.StudyDirection.MINIMIZE
    verb = {True: "maximises", False: "minimises"}
    if study.direction != wanted:
        raise SearchError(
            f"study {name!r} in {where} {verb[not maximise]} its objective; this search "
            f"{verb[maximise]} {metric}; {fix}"
        )
    stored_metric = study.user_attrs.get("metric")
    if stored_metric not in (None, metric):
        raise SearchError(
            f"study {name!r} in {where} {verb[maximise]} {stored_metric}, not {metric}; rerun "
            f"with --metric {stored_metric} {fix}"
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


def sync_results(tables: ResultsTables, study: optuna.Study, run_uri: str) -> None:
    """Bring the search's Parquet rows in line with the study: `optuna_state` and `search_value` columns,
    the reason of every FAIL in `error`, and rows a killed driver left RUNNING closed as ERROR (with the
    epochs their newest checkpoint recorded). Flushes the tables."""
    from optuna.trial import TrialState

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for trial_id, row in list(tables.trials.items()):
        number = row.get("optuna_trial")
        if row.get("search") != study.study_name or number is None or int(number) not in by_number:
            continue
        t = by_number[int(number)]
        values: dict[str, Any] = {
            "optuna_state": t.state.name,
            "search_value": t.value if t.state == TrialState.COMPLETE else None,
        }
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
        if t.state == TrialState.FAIL and not row.get("error"):
            if t.number in interrupted:
                values["error"] = (
                    "interrupted: the search driver stopped before the trial finished; its p "
                    "and eta were enqueued again as a new Optuna trial"
                )
            else:
                values["error"] = t.user_attrs.get(FAIL_REASON_ATTR, "Optuna trial failed")
        tables.upsert_trial(trial_id, **values)
        tables.trials[trial_id]["search_value"] = values["search_value"]  # a column even when all are null
    tables.flush()


def format_top(study: optuna.Study, metric: str, top: int = 5) -> str:
    """Best p, eta and objective, and the `top` best trials, as text."""
    import optuna
    from optuna.trial import TrialState

    best_first = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    done = sorted(
        (t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
        key=lambda t: best_first * t.value,
    )
    if not done:
        return "no trial completed yet"
    best = done[0]
    lines = [
        f"best: p = {best.params['p']:.4g}, eta = {best.params['eta']:.4g}, {metric} = {best.value:.6g} "
        f"(Optuna trial {best.number}, {trial_id_of(best.number)})",
        "",
        f"top {min(top, len(done))} trials:",
    ]
    header = ["rank", "optuna_trial", "trial_id", "p", "eta", metric]
    rows = [
        [
            str(i + 1),
            str(t.number),
            trial_id_of(t.number),
            f"{t.params['p']:.4g}",
            f"{t.params['eta']:.4g}",
            f"{t.value:.6g}",
        ]
        for i, t in enumerate(done[:top])
    ]
    return "\n".join(lines + [text_table(header, rows)])


def state_counts(study: optuna.Study) -> str:
    """How many trials the study holds in each state, e.g. "3 COMPLETE, 1 FAIL"."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
