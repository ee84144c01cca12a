"""Ray Tune's Optuna searcher, adapted to thermosweep trials: every proposal of (p, eta) becomes a whole
trial spec (like a grid trial), reported per epoch, and told to Optuna by the final-epoch rule.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from model.config import ExperimentConfig
from sweep.study import FAIL_REASON_ATTR, trial_id_of
from sweep.trainable import trial_spec


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
