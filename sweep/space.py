"""The search space of `python -m sweep.search --space FILE`: any config field, each a float range (linear
or log), an int range or a list of choices, read from a JSON file, checked before anything starts, and
turned into each proposal's config (docs/search.md, "Searching any config field").

Two kinds of refusal are kept apart. A value that no proposal can take (num_temps=1, an unknown
ebm_gradient, chains_per_example=1 when the base's ti_rule=variance is not searched) is a mistake in the
space file: `load_space` raises SearchError before anything starts. A value refused only with some values
of the other searched fields (chains_per_example=1 with ti_rule=variance when both are searched) is a
proposal the space may well make: `proposal_config` raises the config's ValueError and the searcher tells
Optuna FAIL with it. `_refused` tells them apart by trying the value on the base config at every corner of
the searched fields that a cross-field check reads (CROSS_FIELDS).

Imports no Ray and no JAX (optuna and the cost model are imported inside the functions that need them).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any

from model.config import REPLACED_FIELDS, ExperimentConfig, config_fields
from sweep.study import SearchError

if TYPE_CHECKING:
    import optuna

# The Optuna parameter names of the --p/--eta space (sweep.study.search_space) and the fields they set.
SHORTHANDS = {"p": "temp_power", "eta": "kl_weight"}  # Optuna names of the --p/--eta space
_SHORTHAND_FLAGS = {"p": "--p", "eta": "--eta", "temp_power": "--p", "kl_weight": "--eta"}

_DATA = (
    "it changes the data the metric is measured on, so proposals would not be comparable; "
    "set it with --base/--set"
)
_KID = "it changes how KID/FID are read, so proposals would not be measured alike; set it with --set"
_VAL_LL = "it changes how val_ll is read, so proposals would not be measured alike; set it with --set"
_READING = (
    "it is a reading or output setting that changes nothing a trial trains or is ranked on; set it with --set"
)
# Fields a search cannot vary, each with the reason (docs/search.md lists them).
NOT_SEARCHABLE: dict[str, str] = {
    "seed": "the seeds are the search's repetitions (every proposal trains the same seeds)",
    "objective": "the search trains the thermodynamic objective",
    "epochs": "it is the trial length that ASHA and the final-epoch rule read; set it with --epochs",
    "eval_every": "the evaluation cadence is the search's (every epoch with ASHA, always the last epoch)",
    "dataset": _DATA,
    "data_dir": _DATA,
    "image_size": _DATA,
    "channels": _DATA,
    "num_train": _DATA,
    "num_val": _DATA,
    "eval_num_min": _KID,
    "eval_num_max": _KID,
    "eval_num_points": _KID,
    "eval_with_replacement": _KID,
    "val_ll_examples": _VAL_LL,
    "val_ll_temps": _VAL_LL,
    "val_ll_chains": _VAL_LL,
    "val_ll_prior_chains": _VAL_LL,
    "grad_noise_draws": _READING,
    "sample_every": _READING,
    "conv_impl": "it picks an implementation of the same network (model.nets), not a model; "
    "set it with --set",
}

_RANGE_KEYS = {"low", "high", "log", "step", "type"}
_ENTRY_KEYS = _RANGE_KEYS | {"choices"}
# The fields whose value another field's check reads (model.config.validate): chains per example and the
# evidence rule, the kl_batch covariance (kl_ridge, batch_size * chains vs z_dim), the batch vs num_train.
CROSS_FIELDS = ("ti_rule", "chains_per_example", "kl_ridge", "batch_size", "z_dim")
# Corners planned by most_expensive_corner before it climbs field by field instead.
MAX_CORNERS = 4096


def _kind(name: str) -> type:
    """The Python type a field holds, from its default (annotations are strings here)."""
    default = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}[name]
    for t in (bool, int, float, str):
        if isinstance(default, t):
            return t
    return type(None)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _refused(base: ExperimentConfig, field: str, value: Any, space: dict[str, Any]) -> str | None:
    """Why the config refuses `field` = `value` on `base` with every other searched field that a cross-field
    check reads (CROSS_FIELDS) at each of its corners, or None when some corner accepts it. The checks of
    model.config are monotone in each of these fields, so the corners decide."""
    others = [k for k in CROSS_FIELDS if k in space and k != field]
    first = None
    for point in itertools.product(*(_corner_values(space[k]) for k in others)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ExperimentConfig(**{**base.to_dict(), **dict(zip(others, point, strict=True)), field: value})
            return None
        except (ValueError, TypeError) as err:
            first = first or str(err)
    return first


def _field_name(where: str, name: str) -> None:
    if name in SHORTHANDS:
        raise SearchError(
            f"{where}: {name!r} is the {_SHORTHAND_FLAGS[name]} shorthand of the command line; in a space "
            f"file write the field's name, {SHORTHANDS[name]!r}"
        )
    if name in REPLACED_FIELDS:
        raise SearchError(f"{where}: config field {name!r} no longer exists; {REPLACED_FIELDS[name]}")
    known = config_fields()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SearchError(
            f"{where}: {name!r} is not a config field; {hint}the fields are those of "
            "model.config.ExperimentConfig (docs/search.md lists the ones a search cannot vary)"
        )
    if name in NOT_SEARCHABLE:
        raise SearchError(
            f"{where}: {name} cannot be searched: {NOT_SEARCHABLE[name]}; remove it from the file"
        )


def _choices(where: str, name: str, entry: dict[str, Any]) -> Any:
    from optuna.distributions import CategoricalDistribution

    extra = sorted(set(entry) - {"choices"})
    if extra:
        raise SearchError(
            f"{where}: {name} has both choices and {', '.join(extra)}; give either a list of choices or a "
            "range (low, high), not both"
        )
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        raise SearchError(f"{where}: {name} choices {choices!r} must be a non-empty list, e.g. [1, 2]")
    kind = _kind(name)
    out = []
    for c in choices:
        if isinstance(c, float) and not math.isfinite(c):
            raise SearchError(f"{where}: {name} choice {c!r} is not a finite number")
        if kind is float and _is_number(c):
            c = float(c)
        ok = {
            bool: isinstance(c, bool),
            int: isinstance(c, int) and not isinstance(c, bool),
            float: isinstance(c, float),
            str: isinstance(c, str),
        }.get(kind, c is None or isinstance(c, str))
        if not ok:
            raise SearchError(
                f"{where}: {name} choice {c!r} is not a {kind.__name__}; {name} holds {kind.__name__} values"
            )
        if c in out:
            raise SearchError(f"{where}: {name} choice {c!r} is listed twice; list each choice once")
        out.append(c)
    return CategoricalDistribution(out)


def _range(where: str, name: str, entry: dict[str, Any]) -> Any:
    from optuna.distributions import FloatDistribution, IntDistribution

    missing = [k for k in ("low", "high") if k not in entry]
    if missing:
        raise SearchError(
            f"{where}: {name} {entry!r} has no {' and no '.join(missing)}; give a range "
            '{"low": L, "high": H} or a list {"choices": [...]}'
        )
    kind = _kind(name)
    if kind not in (int, float):
        raise SearchError(
            f"{where}: {name} holds {kind.__name__} values, which have no range; give its values as "
            '{"choices": [...]}'
        )
    wanted = entry.get("type", "float")
    if wanted not in ("int", "float"):
        raise SearchError(f'{where}: {name} "type": {wanted!r} is unknown; use "int" or "float"')
    if wanted != kind.__name__:
        fix = 'add "type": "int"' if kind is int else 'drop "type": "int"'
        raise SearchError(f"{where}: {name} holds {kind.__name__} values; {fix}")
    low, high, log, step = entry["low"], entry["high"], entry.get("log", False), entry.get("step")
    if not isinstance(log, bool):
        raise SearchError(f'{where}: {name} "log": {log!r} must be true or false')
    for key, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not (_is_number(v) and math.isfinite(v)):
            raise SearchError(f"{where}: {name} {key} = {v!r} must be a finite number")
        if kind is int and not float(v).is_integer():
            raise SearchError(f"{where}: {name} is an int range; {key} = {v!r} must be an integer")
    if not low < high:
        raise SearchError(f"{where}: {name} low = {low!r} must be smaller than high = {high!r}")
    if log and low <= 0:
        raise SearchError(f"{where}: {name} low = {low!r} must be > 0 on a log scale; raise low or drop log")
    if step is not None:
        if not step > 0:
            raise SearchError(f"{where}: {name} step = {step!r} must be > 0")
        if log:
            raise SearchError(f"{where}: {name} has both log and step; Optuna takes one or the other")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise SearchError(
                f"{where}: {name} high - low = {high - low!r} is not a multiple of step = {step!r}; "
                "make high = low + k * step"
            )
    if kind is int:
        low, high, step = int(low), int(high), int(step or 1)
        return IntDistribution(low, high, log=log, step=step)
    low, high = float(low), float(high)
    return FloatDistribution(low, high, log=log, step=float(step) if step is not None else None)


def load_space(path: str, base: ExperimentConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """Read and check a space file; keys are config field names (the Optuna parameter names). Raises
    SearchError naming the file, the field, the value and the fix."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise SearchError(
            f"--space {path}: cannot read it ({err.strerror or err}); give a JSON file"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SearchError(f"--space {path}: not JSON ({err}); see docs/search.md for the format") from None
    if not isinstance(data, dict):
        raise SearchError(
            f"--space {path}: holds a {type(data).__name__}, not an object; write "
            '{"FIELD": {"low": L, "high": H}, ...}'
        )
    if not data:
        raise SearchError(f"--space {path}: is empty; name at least one config field to search")
    space = {}
    where = f"--space {path}"
    for name, entry in data.items():
        _field_name(where, name)
        if not isinstance(entry, dict):
            raise SearchError(
                f"{where}: {name} = {entry!r} is not an object; write "
                '{"low": L, "high": H} or {"choices": [...]}'
            )
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise SearchError(
                f"{where}: {name} has unknown key(s) {', '.join(unknown)}; an entry takes low, high, log, "
                "step, type (a range) or choices"
            )
        if "choices" in entry:
            space[name] = _choices(where, name, entry)
        else:
            space[name] = _range(where, name, entry)
    # Values second, once every entry is known: a value refused only with some values of the other searched
    # fields is a proposal that fails, not a mistake in the file.
    for name, dist in space.items():
        for value in _corner_values(dist):
            why = _refused(base, name, value, space)
            if why is not None:
                raise SearchError(f"{where}: {name} = {value!r} is refused by the config: {why}")
    return space


def proposal_fields(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna params -> config field values: the shorthands p/eta become temp_power/kl_weight, a number
    takes its field's type (ints stay ints, floats float), anything else is passed as given."""
    known = config_fields()
    out = {}
    for key, value in params.items():
        name = SHORTHANDS.get(key, key)
        if name not in known:
            raise SearchError(
                f"Optuna parameter {key!r} is not a config field nor one of {sorted(SHORTHANDS)}"
            )
        kind = _kind(name)
        if kind is float and _is_number(value):
            value = float(value)
        elif kind is int and _is_number(value) and float(value).is_integer():
            value = int(value)
        out[name] = value
    return out


def proposal_config(experiment: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """The base experiment (a dict from ExperimentConfig.to_dict()) with the proposal's fields. Raises
    ValueError with the config's own message when the combination is refused (the searcher tells Optuna
    FAIL with it)."""
    return ExperimentConfig(**{**experiment, **proposal_fields(params)})


def searched_fields(space: dict[str, Any]) -> list[str]:
    """The config fields a space varies (shorthands resolved)."""
    return [SHORTHANDS.get(k, k) for k in space]


def check_sets(space: dict[str, Any], sets: dict[str, str]) -> None:
    """Refuse `--set KEY=...` on a field the space searches."""
    shorthand = set(space) <= set(SHORTHANDS)
    searched = set(searched_fields(space))
    for key in sets:
        if key not in searched:
            continue
        if shorthand:
            flag = _SHORTHAND_FLAGS[key]
            raise SearchError(
                f"--set {key}=...: {key} is searched by {flag}; give its range with {flag} LOW HIGH instead"
            )
        raise SearchError(
            f"--set {key}=...: {key} is searched by the space file; drop --set {key} or remove {key} "
            "from the space file"
        )


def _corner_values(dist: Any) -> list[Any]:
    if hasattr(dist, "choices"):
        return list(dist.choices)
    return [dist.low, dist.high]


def _cost(config: ExperimentConfig) -> tuple[float, int]:
    """A trial's planned FLOPs, then its peak step memory (model.plan): the cost a corner is ranked by."""
    from model.plan.cost import trial_flops
    from model.plan.memory import estimate_step_memory

    return trial_flops(config), estimate_step_memory(config, 1, "gpu")


def most_expensive_corner(space: dict[str, Any], base: ExperimentConfig) -> ExperimentConfig:
    """The base config at the corner of `space` (each range's two ends x every choice) whose trial the
    project's plan (`model.plan.cost.trial_flops`, then `model.plan.memory.estimate_step_memory`) makes the
    most expensive; corners the config refuses are skipped, ties go to the first corner. Above MAX_CORNERS
    corners it climbs instead (from the first corner, each field in turn set to its most expensive end or
    choice, until no field changes) and warns that it did. Raises SearchError when every corner is
    refused."""
    names = list(space)
    values = [_corner_values(space[k]) for k in names]
    experiment = base.to_dict()
    best: tuple[tuple[float, int], ExperimentConfig] | None = None
    refused: list[str] = []

    def consider(point: tuple[Any, ...]) -> tuple[float, int] | None:
        nonlocal best
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = proposal_config(experiment, dict(zip(names, point, strict=True)))
        except ValueError as err:
            refused.append(str(err))
            return None
        cost = _cost(config)
        if best is None or cost > best[0]:
            best = (cost, config)
        return cost

    total = math.prod(len(v) for v in values)
    if total <= MAX_CORNERS:
        for point in itertools.product(*values):
            consider(point)
    else:
        warnings.warn(
            f"the space has {total} corners, more than {MAX_CORNERS}: the dry run plans the corner found by "
            "raising one field at a time to its most expensive value, which may miss the costliest",
            stacklevel=2,
        )
        point = [v[0] for v in values]
        changed, passes = True, 0
        while changed and passes < 50:  # each pass raises the cost or ends it (a cap against ties)
            changed, passes = False, passes + 1
            for i, options in enumerate(values):
                costs = [consider(tuple(point[:i] + [o] + point[i + 1 :])) for o in options]
                ranked = [(c, j) for j, c in enumerate(costs) if c is not None]
                if ranked:
                    j = max(ranked, key=lambda cj: (cj[0], -cj[1]))[1]
                    if options[j] != point[i]:
                        point[i], changed = options[j], True
    if best is None:
        raise SearchError(
            f"every corner of the space is refused by the config (e.g. {refused[0]}); change the base "
            "config (--set) or the space"
        )
    return best[1]


def _fmt(v: Any) -> str:
    return f"{v:g}" if _is_number(v) else str(v)


def describe(space: dict[str, Any]) -> str:
    """One line for the search's header, e.g. 'temp_power in [0.1, 10] (log), ebm_gradient in {none,
    chains, ml}'."""
    parts = []
    for key, dist in space.items():
        name = SHORTHANDS.get(key, key)
        if hasattr(dist, "choices"):
            parts.append(f"{name} in {{{', '.join(_fmt(c) for c in dist.choices)}}}")
            continue
        notes = []
        if type(dist).__name__ == "IntDistribution":
            notes.append("int")
        if dist.log:
            notes.append("log")
        if dist.step is not None and not (type(dist).__name__ == "IntDistribution" and dist.step == 1):
            notes.append(f"step {_fmt(dist.step)}")
        parts.append(
            f"{name} in [{_fmt(dist.low)}, {_fmt(dist.high)}]" + (f" ({', '.join(notes)})" if notes else "")
        )
    return ", ".join(parts)


def enqueued_proposal(text: str, space: dict[str, Any]) -> dict[str, Any]:
    """The Optuna parameters of one `--enqueue FIELD=VALUE[,FIELD=VALUE...]`, each inside `space` (a
    field may be named by its config name or its parameter name, temp_power or p). Raises SearchError
    naming the pair and the fix."""
    from model.config import parse_value

    by_field = {SHORTHANDS.get(name, name): name for name in space}
    params: dict[str, Any] = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        key = key.strip()
        name = key if key in space else by_field.get(key)
        if not sep or name is None:
            raise SearchError(
                f"--enqueue {text}: {pair.strip()!r} is not FIELD=VALUE with a searched field; the "
                f"search varies {', '.join(space)}"
            )
        try:
            parsed = parse_value(SHORTHANDS.get(name, name), value.strip())
        except ValueError as err:
            raise SearchError(f"--enqueue {text}: {err}") from None
        dist = space[name]
        inside = (
            parsed in dist.choices
            if hasattr(dist, "choices")
            else _is_number(parsed) and dist.low <= parsed <= dist.high
        )
        if not inside:
            raise SearchError(
                f"--enqueue {text}: {key}={value.strip()} is outside the search space "
                f"({describe({name: dist})}); widen the space or drop it"
            )
        params[name] = parsed
    return params
