"""Ray Tune's Optuna searcher, adapted to thermosweep trials: every proposal of (p, eta) fills the search's
base config (`base_config`) into a whole trial spec (like a grid trial), reported per epoch, and told to
Optuna by the final-epoch rule.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

from model.config import ExperimentConfig, get_preset, parse_set_args, parse_value
from sweep.partial import is_epoch_result
from sweep.space import proposal_config
from sweep.study import (
    FAIL_REASON_ATTR,
    SE_ATTR,
    SEED_VALUES_ATTR,
    SEEDS_ATTR,
    SearchError,
    trial_id_of,
)
from sweep.trainable import trial_spec

SEARCHED_FIELDS = {"temp_power": "--p", "kl_weight": "--eta"}


def searcher_class() -> type:
    """`ThermoOptunaSearch`, defined lazily so importing this module does not import Ray."""
    global _SEARCHER
    if _SEARCHER is not None:
        return _SEARCHER
    import optuna
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class ThermoOptunaSearch(OptunaSearch):
        """Ray's OptunaSearch with the search trial's whole Tune config built from each proposal, the
        epoch (not Tune's iteration) as the report step, `repetitions` seeds per proposal, and the
        final-epoch rule: a seed's trial is COMPLETE with the metrics at its last epoch, PRUNED if a
        scheduler stopped it earlier, FAIL if it crashed, diverged or ended without finite metrics. The
        proposal is told to Optuna once all its seeds have ended: COMPLETE with each metric's seed mean
        (the seeds, each seed's value and the standard errors in the trial's user attrs), PRUNED, or
        FAIL with the reason in the trial's user attrs.

        Seeds base + 0..R-1 of one proposal are R Tune trials asked one after the other (so they share
        no process and each checkpoints and resumes as a grid trial does). With `proposals`, the
        searcher ends the experiment (Searcher.FINISHED) once it has asked that many proposals and
        handed out all their seeds; a proposal the config refuses (`proposal_config`) is told FAIL at
        once with the config's message and counts as one of them."""

        def __init__(
            self,
            *,
            experiment: dict[str, Any],
            study_name: str,
            repetitions: int = 1,
            proposals: int | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(study_name=study_name, **kwargs)
            self._experiment = experiment
            self._epochs = int(experiment["epochs"])
            self._repetitions = int(repetitions)
            self._proposals_left = proposals
            self._metrics = list(self.metric) if isinstance(self.metric, list) else [self.metric]
            self._reported: dict[str, set[int]] = {}
            self._queue: list[tuple[int, int]] = []  # (Optuna trial number, repetition) still to hand out
            self._seed_of: dict[str, tuple[int, int]] = {}  # Tune trial id -> (number, repetition)
            self._proposal: dict[int, Any] = {}  # number -> its Optuna trial
            self._ended: dict[int, dict[int, tuple[str, list[float] | None, str | None]]] = {}

        def _report(self, trial_id: str, value: Any, epoch: Any) -> None:
            """The metric of `epoch` as the trial's intermediate value, once per epoch, if it is finite
            (single-objective searches with one seed per proposal only: Optuna refuses intermediate
            values of several objectives, and one seed's value is not the proposal's)."""
            if len(self._metrics) > 1 or self._repetitions > 1:
                return
            if epoch is None or not (isinstance(value, int | float) and math.isfinite(value)):
                return
            steps = self._reported.setdefault(trial_id, set())
            if int(epoch) not in steps:
                self._ot_trials[trial_id].report(float(value), int(epoch))
                steps.add(int(epoch))

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            while not self._queue:
                if self._proposals_left is not None and self._proposals_left <= 0:
                    return Searcher.FINISHED
                params = super().suggest(trial_id)
                if not isinstance(params, dict):
                    return params
                ot_trial = self._ot_trials.pop(trial_id)
                if self._proposals_left is not None:
                    self._proposals_left -= 1
                try:
                    proposal_config(self._experiment, ot_trial.params)
                except (ValueError, TypeError) as err:  # a combination the config refuses: its FAIL
                    self._tell(ot_trial, optuna.trial.TrialState.FAIL, None, f"config refused: {err}")
                    continue
                self._proposal[ot_trial.number] = ot_trial
                self._queue += [(ot_trial.number, r) for r in range(self._repetitions)]
            number, repetition = self._queue.pop(0)
            self._ot_trials[trial_id] = self._proposal[number]
            self._seed_of[trial_id] = (number, repetition)
            return search_trial_config(
                self._experiment,
                self._study_name,
                number,
                self._proposal[number].params,
                repetition=repetition,
                repetitions=self._repetitions,
            )

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            if not is_epoch_result(result):  # a mid-epoch checkpoint: Optuna hears epochs only
                return
            self._report(trial_id, result.get(self._metrics[0]), result.get("epoch"))

        def _seed_outcome(
            self, result: dict[str, Any], error: bool
        ) -> tuple[str, list[float] | None, str | None]:
            """(state name, the metrics at the last epoch, failure reason) of one seed's trial."""
            values, epoch = [result.get(m) for m in self._metrics], result.get("epoch")
            if error:
                return "FAIL", None, "the Ray Tune trial ended in ERROR (see the Parquet row's error)"
            if epoch is None:
                return "FAIL", None, "stopped before its first epoch was reported"
            if int(epoch) < self._epochs:
                return "PRUNED", None, None  # a scheduler (ASHA) stopped it early
            for m, v in zip(self._metrics, values, strict=True):
                if not (isinstance(v, int | float) and math.isfinite(v)):
                    return "FAIL", None, f"{m} is {v!r} at the last epoch {epoch}, not a finite number"
            return "COMPLETE", [float(v) for v in values], None

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            result = result or {}
            # Tune hands a result that stops the trial (ASHA's decision, or its last epoch) to
            # on_trial_complete only, so it is reported here.
            self._report(trial_id, result.get(self._metrics[0]), result.get("epoch"))
            number, repetition = self._seed_of.pop(trial_id)
            ended = self._ended.setdefault(number, {})
            ended[repetition] = self._seed_outcome(result, error)
            if ended[repetition][0] == "FAIL":  # the proposal has failed: seeds not started are dropped
                self._queue = [q for q in self._queue if q[0] != number]
            pending = [*self._queue, *self._seed_of.values()]  # seeds still to hand out, or running
            if any(n == number for n, _ in pending):
                return
            self._tell_proposal(self._proposal.pop(number), self._ended.pop(number))

        def _tell_proposal(
            self, ot_trial: Any, ended: dict[int, tuple[str, list[float] | None, str | None]]
        ) -> None:
            state = optuna.trial.TrialState
            states = {s for s, _, _ in ended.values()}
            if "FAIL" in states:
                reasons = [f"seed {r}: {why}" for r, (s, _, why) in sorted(ended.items()) if s == "FAIL"]
                reason = reasons[0].split(": ", 1)[1] if self._repetitions == 1 else "; ".join(reasons)
                self._tell(ot_trial, state.FAIL, None, reason)
            elif "PRUNED" in states:
                self._tell(ot_trial, state.PRUNED, None, None)
            else:
                per_seed = [ended[r][1] for r in sorted(ended)]
                means, errors = seed_summary(per_seed)
                if self._repetitions > 1:
                    seed0 = int(self._experiment["seed"])
                    ot_trial.set_user_attr(SEEDS_ATTR, [seed0 + r for r in sorted(ended)])
                    ot_trial.set_user_attr(
                        SEED_VALUES_ATTR, {m: [v[i] for v in per_seed] for i, m in enumerate(self._metrics)}
                    )
                    ot_trial.set_user_attr(SE_ATTR, dict(zip(self._metrics, errors, strict=True)))
                self._tell(ot_trial, state.COMPLETE, means, None)

        def _tell(self, ot_trial: Any, state: Any, values: list[float] | None, reason: str | None) -> None:
            try:
                if reason:
                    ot_trial.set_user_attr(FAIL_REASON_ATTR, reason)
                told = None if values is None else (values[0] if len(values) == 1 else values)
                self._ot_study.tell(ot_trial, told, state=state)
            except Exception as exc:  # noqa: BLE001 - e.g. told already; never stop the whole search
                print(f"warning: could not tell Optuna trial {ot_trial.number}: {exc}", file=sys.stderr)

    _SEARCHER = ThermoOptunaSearch
    return _SEARCHER


_SEARCHER: type | None = None


def seed_summary(per_seed: list[list[float]]) -> tuple[list[float], list[float]]:
    """(means, standard errors) over seeds of each metric, from one list of metric values per seed: the
    mean is what Optuna is told; the standard error is std (ddof=1) / sqrt(R), NaN for one seed."""
    n = len(per_seed)
    means = [math.fsum(column) / n for column in zip(*per_seed, strict=True)]
    errors = [
        math.sqrt(math.fsum((v - mu) ** 2 for v in column) / (n - 1) / n) if n > 1 else math.nan
        for column, mu in zip(zip(*per_seed, strict=True), means, strict=True)
    ]
    return means, errors


def seed_trial_id(number: int, repetition: int, repetitions: int) -> str:
    """The Parquet `trial_id` of one seed of Optuna trial `number`: `optuna-NNNN` with one seed per
    proposal (as before repetitions existed), `optuna-NNNN-sR` with several."""
    return trial_id_of(number) if repetitions == 1 else f"{trial_id_of(number)}-s{repetition}"


def search_trial_config(
    experiment: dict[str, Any],
    study: str,
    number: int,
    params: dict[str, Any],
    *,
    repetition: int = 0,
    repetitions: int = 1,
) -> dict[str, Any]:
    """The Tune config of one seed of one proposal: a grid-like trial spec whose experiment is the base
    config with the proposal's fields and seed base + `repetition` (a grid's repetitions use the same
    seeds), plus the `search` and `optuna_trial` columns; the proposal's parameters at the top level."""
    config = proposal_config(experiment, params)
    config = replace(config, seed=config.seed + repetition)
    trial_id = seed_trial_id(number, repetition, repetitions)
    spec = trial_spec(
        config,
        trial_id=trial_id,
        cell=trial_id_of(number),
        repetition=repetition,
        grid="search",
        columns={"search": study, "optuna_trial": number},
    )
    return {"trial": spec, **params, "optuna_trial": number}


def base_model(base: str) -> tuple[str, dict[str, Any]]:
    """(preset, field overrides) of `--base`: a preset name (`digits`), or a grid and one of its cells
    (`digits-estimators:thermo-p1-ml`, a built-in grid or a grid file's path before the colon), whose
    grid base and cell values become the overrides. Raises SearchError naming the grid's cells."""
    if ":" not in base:
        return base, {}
    from sweep.grid_file import GridError, coerce_field, load_grid

    grid_name, cell = base.rsplit(":", 1)
    try:
        grid = load_grid(grid_name)
    except GridError as err:
        raise SearchError(f"--base {base}: {err}") from None
    cells = dict(grid.cells)
    if cell not in cells:
        raise SearchError(
            f"--base {base}: grid {grid.name!r} has no cell {cell!r}; its cells: {', '.join(cells)}"
        )
    return grid.preset, {k: coerce_field(k, v) for k, v in {**grid.base, **cells[cell]}.items()}


def base_config(
    preset: str,
    sets: list[str],
    *,
    epochs: int | None,
    scheduler: str,
    searched: dict[str, str] | None = None,
) -> ExperimentConfig:
    """The config every trial starts from: the `--base` model (a preset, or a grid's cell: `base_model`)
    with `--set`/`--epochs`, objective thermo, and evaluation on (every epoch with ASHA, else the base's
    cadence, which always includes the last epoch). The searched fields (`searched`: field -> the flag
    that gives its range; default p and eta) are filled per proposal. Raises SearchError naming the key
    and the fix."""
    searched = SEARCHED_FIELDS if searched is None else searched
    base, (preset, model) = preset, base_model(preset)
    if model.get("objective", "thermo") != "thermo":
        raise SearchError(
            f"--base {base}: that cell trains objective={model['objective']}; the search trains the "
            "thermodynamic objective: pick a thermo cell"
        )
    try:
        overrides: dict[str, Any] = parse_set_args(sets)
        for key in overrides:
            if key in searched:
                raise SearchError(
                    f"--set {key}=...: {key} is what the search varies; give its range with "
                    f"{searched[key]} instead"
                )
        if "objective" in overrides and overrides["objective"] != "thermo":
            raise SearchError(
                f"--set objective={overrides['objective']}: the search tunes the thermodynamic "
                "objective's p and eta; drop --set objective"
            )
        eval_every = parse_value("eval_every", overrides["eval_every"]) if "eval_every" in overrides else None
    except ValueError as err:
        raise SearchError(str(err)) from None
    if eval_every == 0:
        raise SearchError(
            "--set eval_every=0 turns evaluation off, but the search's objective is the metric "
            "at the last epoch; drop it or use --set eval_every=N with N >= 1"
        )
    if scheduler == "asha" and eval_every not in (None, 1):
        raise SearchError(
            f"--set eval_every={eval_every} with --scheduler asha: ASHA compares trials on the "
            "metric every epoch; drop --set eval_every (it becomes 1) or use --scheduler none"
        )
    if epochs is not None:
        if epochs < 1:
            raise SearchError(f"--epochs {epochs}: must be >= 1")
        overrides["epochs"] = epochs
    overrides["objective"] = "thermo"
    try:
        config = get_preset(preset, **{**model, **overrides})
    except (ValueError, TypeError) as err:
        raise SearchError(f"--base {base} with --set {' '.join(sets) or '(none)'}: {err}") from None
    if scheduler == "asha":
        config = replace(config, eval_every=1)
    elif config.eval_every == 0:
        config = replace(config, eval_every=config.epochs)  # evaluate at the last epoch only
    return config


# ---------------------------------------------------------------------------------------------- driver
