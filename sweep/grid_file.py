"""Grids as data: load a grid file, check every cell against `ExperimentConfig`, expand it into trials.

A grid file (JSON or TOML) holds

- `preset`: the base `ExperimentConfig` preset (celeba, cifar10, svhn, digits),
- `base` (optional): field overrides applied to every cell,
- `repetitions`: how many times each cell runs (repetition r uses seed `base seed + r`),
- `cells`: a list of tables of field overrides. A list value expands (the cartesian product of a cell's
  lists gives several cells); `name` is a template such as `"vanilla-b{batch_size}"` filled from the cell's
  values (default: the objective plus the expanded `field=value` pairs),
- `description` (optional): one line for humans.

Every (cell, repetition) becomes one `TrialPlan`. Nothing is scheduled until every cell has been turned
into a valid config, so a bad grid is refused whole, with the cell and the key named.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from model import rules
from model.config import (
    ExperimentConfig,
    apply_overrides,
    check_devices,
    config_fields,
    get_preset,
    training_differences,
)
from sweep.text import text_table

GRID_KEYS = ("description", "preset", "base", "repetitions", "cells")
CELL_NAME_KEY = "name"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._=+-]+$")
_FIELD_IN_MESSAGE = re.compile(r"^(\w+)=")


class GridError(ValueError):
    """A grid file that cannot be run; the message names the grid, the cell and the key."""


@dataclass(frozen=True)
class TrialPlan:
    """One Ray Tune trial: a grid cell at one repetition, with its fully resolved config."""

    trial_id: str
    cell: str
    repetition: int
    seed: int
    config: ExperimentConfig
    cell_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grid:
    """A parsed grid: where it came from, its base preset and overrides, and its expanded cells."""

    name: str
    source: str
    description: str
    preset: str
    base: dict[str, Any]
    repetitions: int
    cells: tuple[tuple[str, dict[str, Any]], ...]  # (cell name, overrides incl. base) in grid order


def builtin_grids() -> list[str]:
    """Names of the grids shipped in `sweep/grids/` (usable as `--grid NAME`)."""
    root = resources.files("sweep.grids")
    return sorted(p.name.rsplit(".", 1)[0] for p in root.iterdir() if p.name.endswith((".json", ".toml")))


def _read_text(name_or_path: str) -> tuple[str, str, str]:
    """(grid name, source description, text) for a built-in grid name or a file path."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".toml") and path.is_file():
        return path.stem, str(path.resolve()), path.read_text()
    root = resources.files("sweep.grids")
    for suffix in (".json", ".toml"):
        candidate = root / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return name_or_path, f"sweep/grids/{name_or_path}{suffix}", candidate.read_text()
    raise GridError(
        f"grid {name_or_path!r} is neither a built-in grid ({', '.join(builtin_grids())}) "
        "nor an existing .json/.toml file; pass one of those names or a path to your grid file"
    )


def parse_grid_text(text: str, fmt: str, name: str, source: str = "<text>") -> Grid:
    """Parse grid `text` (`fmt` "json" or "toml") and check its shape (not yet the config values)."""
    try:
        raw = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise GridError(f"grid {name!r} ({source}) is not valid {fmt.upper()}: {err}") from None
    if not isinstance(raw, dict):
        raise GridError(f"grid {name!r}: the top level must be a table with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"grid {name!r}: unknown top-level key(s) {unknown}; allowed: {', '.join(GRID_KEYS)}")
    preset = raw.get("preset", "digits")
    base = raw.get("base", {})
    if not isinstance(base, dict):
        raise GridError(f"grid {name!r}: 'base' must be a table of config overrides, got {base!r}")
    unknown_base = sorted(set(base) - set(config_fields()))
    if unknown_base:
        raise GridError(
            f"grid {name!r}, base: unknown key(s) {unknown_base}; use ExperimentConfig fields "
            f"({', '.join(sorted(config_fields()))})"
        )
    reps = raw.get("repetitions", 1)
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise GridError(f"grid {name!r}: repetitions={reps!r} must be a positive integer")
    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise GridError(f"grid {name!r}: 'cells' must be a non-empty list of tables of config overrides")
    cells: list[tuple[str, dict[str, Any]]] = []
    for index, cell in enumerate(cells_raw):
        if not isinstance(cell, dict):
            raise GridError(f"grid {name!r}: cell #{index} must be a table of overrides, got {cell!r}")
        cells.extend(_expand_cell(name, index, cell))
    seen: set[str] = set()
    for cell_name, _ in cells:
        if cell_name in seen:
            raise GridError(
                f"grid {name!r}: cell name {cell_name!r} appears twice; "
                "give the cells distinct 'name' templates"
            )
        seen.add(cell_name)
    return Grid(name, source, str(raw.get("description", "")), str(preset), dict(base), reps, tuple(cells))


def _expand_cell(grid: str, index: int, cell: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    template = cell.get(CELL_NAME_KEY)
    values = {k: v for k, v in cell.items() if k != CELL_NAME_KEY}
    label = repr(template) if template else f"#{index}"
    known = config_fields()
    for key, value in values.items():
        if key not in known:
            raise GridError(
                f"grid {grid!r}, cell {label}: unknown key {key!r}; use ExperimentConfig fields "
                f"({', '.join(sorted(known))})"
            )
        if isinstance(value, list) and not value:
            raise GridError(
                f"grid {grid!r}, cell {label}: key {key!r} is an empty list; give at least one value"
            )
        if isinstance(value, dict):
            raise GridError(
                f"grid {grid!r}, cell {label}: key {key!r} has a table value {value!r}; use a plain value"
            )
    listed = [k for k, v in values.items() if isinstance(v, list)]
    out = []
    for combo in itertools.product(*(values[k] for k in listed)):
        overrides = dict(values)
        overrides.update(zip(listed, combo, strict=True))
        if template:
            try:
                cell_name = str(template).format(**overrides)
            except (KeyError, IndexError, ValueError) as err:
                raise GridError(
                    f"grid {grid!r}, cell {label}: name template cannot be filled ({err}); "
                    "use {field} placeholders naming keys of this cell"
                ) from None
        else:
            parts = [str(overrides.get("objective", "cell"))] + [f"{k}={overrides[k]}" for k in listed]
            cell_name = "-".join(parts)
        if not _SAFE_NAME.match(cell_name):
            raise GridError(
                f"grid {grid!r}, cell {cell_name!r}: the name may hold only letters, digits and . _ = + - "
                "(it names directories); change the cell's 'name'"
            )
        out.append((cell_name, overrides))
    return out


def load_grid(name_or_path: str) -> Grid:
    """A built-in grid by name (`digits`, `paper-celeba`, ...) or a user's .json/.toml grid file."""
    name, source, text = _read_text(name_or_path)
    fmt = "toml" if source.endswith(".toml") else "json"
    return parse_grid_text(text, fmt, name, source)


def coerce_field(key: str, value: Any) -> Any:
    """Give a grid value its field's type where that is lossless (1 -> 1.0 for a float field)."""
    default = {f.name: f.default for f in fields(ExperimentConfig)}[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _config_for(grid: Grid, cell: str, overrides: dict[str, Any], where: str) -> ExperimentConfig:
    """The cell's config, with any failure reraised as a GridError naming `where`, the cell and the key."""
    try:
        base = get_preset(grid.preset)
    except ValueError as err:
        raise GridError(f"grid {grid.name!r}: preset {grid.preset!r}: {err}") from None
    for key in overrides:
        if key not in config_fields():
            raise GridError(
                f"grid {grid.name!r}, cell {cell!r}: unknown key {key!r} ({where}); "
                f"use ExperimentConfig fields ({', '.join(sorted(config_fields()))})"
            )
    try:
        return apply_overrides(base, {k: coerce_field(k, v) for k, v in overrides.items()})
    except (ValueError, TypeError) as err:
        message = str(err)
        match = _FIELD_IN_MESSAGE.match(message)
        key = match.group(1) if match else next(iter(overrides), "?")
        raise GridError(f"grid {grid.name!r}, cell {cell!r}, key {key!r} ({where}): {message}") from None


def expand(
    grid: Grid,
    *,
    repetitions: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[TrialPlan]:
    """Every (cell, repetition) of `grid` as a `TrialPlan`, validated; `overrides` (from `--set`/`--epochs`)
    apply on top of every cell and `repetitions` replaces the grid's count.

    Repetition r runs with seed `config.seed + r`, so a rerun of the same grid reproduces each trial.
    """
    reps = grid.repetitions if repetitions is None else repetitions
    if not isinstance(reps, int) or reps < 1:
        raise GridError(f"repetitions={reps!r} must be a positive integer")
    extra = dict(overrides or {})
    configs = []
    for cell, cell_values in grid.cells:
        merged = {**grid.base, **cell_values, **extra}
        where = "grid base + cell" + (" + --set" if extra else "")
        configs.append((cell, cell_values, _config_for(grid, cell, merged, where)))
    plans: list[TrialPlan] = []
    # Repetition-major order: every cell runs once before any runs twice, so a partial sweep covers the
    # whole grid and later repetitions of a cell find its compiled steps in the compilation cache.
    for rep in range(reps):
        for cell, cell_values, cfg in configs:
            seed = cfg.seed + rep
            plans.append(
                TrialPlan(
                    trial_id=f"{cell}-r{rep}",
                    cell=cell,
                    repetition=rep,
                    seed=seed,
                    config=replace(cfg, seed=seed),
                    cell_overrides=dict(cell_values),
                )
            )
    return plans


def identical_cells(plans: list[TrialPlan]) -> list[str]:
    """One line per pair of cells that train identically: their configs (at the same repetition) differ
    only in fields that `model.config.training_differences` says cannot change what either trains (inert
    in both, or values of one training class), named with why."""
    first = {}
    for plan in plans:
        first.setdefault(plan.cell, plan.config)
    cells = list(first.items())
    lines = []
    for i, (cell_a, a) in enumerate(cells):
        for cell_b, b in cells[i + 1 :]:
            differ = training_differences(a, b)
            if differ:
                why = "; ".join(dict.fromkeys(differ.values()))
                lines.append(
                    f"cells {cell_a!r} and {cell_b!r} train identically: they differ only in "
                    f"{', '.join(differ)} ({why})"
                )
    return lines


def check_plan_devices(plans: list[TrialPlan], devices_per_trial: int, fix: str) -> None:
    """Refuse a plan whose batch size cannot be split over each trial's devices, before anything runs."""
    for plan in plans:
        try:
            check_devices(plan.config.batch_size, devices_per_trial, fix)
        except ValueError as err:
            raise GridError(f"cell {plan.cell!r}: {err}") from None


def trial_table(plans: list[TrialPlan], resources: dict[str, float]) -> str:
    """The plain-text table `--dry-run` prints: one line per trial with its seed, key fields and resources."""
    res = " ".join(f"{k}={v:g}" for k, v in resources.items() if v)
    header = [
        "#",
        "trial_id",
        "cell",
        "rep",
        "seed",
        "objective",
        "batch",
        "p",
        "N_t",
        "eta",
        "rule/M",
        "ebm/gen",
        "K_post",
        "K_prior",
        "epochs",
        "resources",
    ]
    rows = []
    for i, p in enumerate(plans):
        c = p.config
        thermo = c.is_thermo
        rows.append(
            [
                str(i),
                p.trial_id,
                p.cell,
                str(p.repetition),
                str(p.seed),
                c.objective,
                str(c.batch_size),
                f"{c.temp_power:g}" if thermo else "-",
                str(c.num_temps) if thermo else "-",
                f"{c.kl_weight:g}" if thermo else "-",
                f"{c.ti_rule}/{c.chains_per_example}" if thermo else "-",
                f"{c.ebm_gradient}/{c.gen_gradient}" if thermo else "-",
                str(c.posterior_steps),
                str(c.prior_steps),
                str(c.epochs),
                res,
            ]
        )
    return text_table(header, rows)


def estimator_legend(plans: list[TrialPlan]) -> str:
    """One line per evidence rule and gradient estimator the grid's thermo trials use, with its one-line
    description from the registries of model/rules.py (what the table's `rule/M` and `ebm/gen` mean)."""
    thermo = [p.config for p in plans if p.config.is_thermo]
    lines = []
    for field_name, registry in rules.REGISTRY_FIELDS.items():
        used = {getattr(c, field_name) for c in thermo}
        lines += [
            f"{field_name}={name}: {entry.description}" for name, entry in registry.items() if name in used
        ]
    return "\n".join(lines)
