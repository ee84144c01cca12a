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
from sweep.study import FAIL_REASON_ATTR, SearchError, trial_id_of
from sweep.trainable import trial_spec

SEARCHED_FIELDS = {"temp_power": "--p", "kl_weight": "--eta"}


def searcher_class() -> type:
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
            if not is_epoch_result(result):  # a mid-epoch checkpoint: Optuna hears epochs only
                return
            self._report(trial_id, result.get(self.metric), result.get("epoch"))

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
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
                self._ot_study.tell(
                    ot_trial, float(value) if state == optuna.trial.TrialState.COMPLETE else None, state=state
                )
            except Exception as exc:  # noqa: BLE001 - e.g. told already; never stop the whole search
                print(f"warning: could not tell Optuna trial {ot_trial.number}: {exc}", file=sys.stderr)
            self._completed_trials.add(trial_id)

    _SEARCHER = ThermoOptunaSearch
    return _SEARCHER


_SEARCHER: type | None = None


def search_trial_config(
    experiment: dict[str, Any], study: str, number: int, p: float, eta: float
) -> dict[str, Any]:
    """The Tune config of one search trial: a grid-like trial spec whose experiment is the base config with
    temp_power = p and kl_weight = eta, plus the `search` and `optuna_trial` columns."""
    config = ExperimentConfig(**{**experiment, "temp_power": float(p), "kl_weight": float(eta)})
    trial_id = trial_id_of(number)
    spec = trial_spec(
        config,
        trial_id=trial_id,
        cell=trial_id,
        repetition=0,
        grid="search",
        columns={"search": study, "optuna_trial": number},
    )
    return {"trial": spec, "p": float(p), "eta": float(eta), "optuna_trial": number}


def base_config(preset: str, sets: list[str], *, epochs: int | None, scheduler: str) -> ExperimentConfig:
    """The config every trial starts from: the preset with `--set`/`--epochs`, objective thermo, and
    evaluation on (every epoch with ASHA, else the preset's cadence, which always includes the last epoch).
    p and eta are filled per trial. Raises SearchError naming the key and the fix."""
    try:
        overrides: dict[str, Any] = parse_set_args(sets)
        for key in overrides:
            if key in SEARCHED_FIELDS:
                raise SearchError(
                    f"--set {key}=...: {key} is what the search varies; give its range with "
                    f"{SEARCHED_FIELDS[key]} LOW HIGH instead"
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
        config = get_preset(preset, **overrides)
    except (ValueError, TypeError) as err:
        raise SearchError(f"--base {preset} with --set {' '.join(sets) or '(none)'}: {err}") from None
    if scheduler == "asha":
        config = replace(config, eval_every=1)
    elif config.eval_every == 0:
        config = replace(config, eval_every=config.epochs)  # evaluate at the last epoch only
    return config


# ---------------------------------------------------------------------------------------------- driver
