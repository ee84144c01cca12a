"""Experiment configuration: one frozen dataclass and the paper's named presets.

Field names follow the paper (Tables 3-4); the codebase variable each one mirrors is in its comment.
Nothing here is read at import time by any other module: functions take the config they need.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from model import rules

OBJECTIVES = ("vanilla", "thermo")
DATASETS = ("digits", "cifar10", "celeb_a", "svhn_cropped")
# How log p(x) is estimated from the chains, and which gradient each network gets: the names of the
# registries in model/rules.py (docs/estimators.md).
TI_RULES = tuple(rules.EVIDENCE_RULES)
EBM_GRADIENTS = tuple(rules.EBM_GRADIENTS)
GEN_GRADIENTS = tuple(rules.GEN_GRADIENTS)
# Fields that no longer exist, and what to set instead.
REPLACED_FIELDS = {
    "chain_gradient": "it is replaced by ebm_gradient and gen_gradient: chain_gradient=true is "
    "ebm_gradient=chains, chain_gradient=false is ebm_gradient=none (both with "
    "gen_gradient=ti)",
}
CONV_IMPLS = ("auto", "phases", "lax")


class RankDeficientKLWarning(UserWarning):
    """ti_rule=kl_batch with batch_size * chains_per_example <= z_dim: the KL term is set by kl_ridge.
    A class of its own so that code building such a config on purpose (a benchmark timing the paper's
    settings) can leave it out without hiding other warnings."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs. Presets below fill it for each data set."""

    # data
    dataset: str = "digits"  # DATASET
    image_size: int = 16  # generator output resolution (square)
    channels: int = 1
    num_train: int = 1438  # NUM_TRAIN_DATA
    num_val: int = 359  # NUM_VAL_DATA
    data_dir: str | None = None  # TFDS data dir; None -> $TFDS_DATA_DIR or TFDS's default
    # networks (Table 5)
    z_dim: int = 16  # Z_CHANNELS
    ebm_width: int = 64  # EBM_FEATURE_DIM, ne_z
    ebm_leak: float = 0.1  # EBM_LEAK
    gen_width: int = 8  # GEN_FEATURE_DIM, ng_z
    gen_leak: float = 0.2  # GEN_LEAK
    conv_impl: str = "auto"  # generator transposed convs: "phases" (matmuls), "lax" (nn.ConvTranspose) or
    # "auto": the one measured fastest on the backend the step is built for (model.nets.resolve_conv_impl)
    prior_sigma: float = 1.0  # p0_SIGMA, sigma_0
    lkhood_sigma: float = 0.3  # LKHOOD_SIGMA, sigma_l
    # optimisation
    epochs: int = 10  # NUM_EPOCHS
    batch_size: int = 50  # BATCH_SIZE
    ebm_lr: float = 2e-5  # E_INITIAL_LR
    gen_lr: float = 1e-4  # G_INITIAL_LR
    ebm_final_lr: float = 1e-5  # E_FINAL_LR
    gen_final_lr: float = 5e-5  # G_FINAL_LR
    ebm_beta1: float = 0.5  # E_BETA_1
    ebm_beta2: float = 0.999  # E_BETA_2
    gen_beta1: float = 0.5  # G_BETA_1
    gen_beta2: float = 0.999  # G_BETA_2
    lr_decay: float = 0.975  # DECAY_RATE, applied once per epoch
    lr_decay_begin: int = 1  # BEGIN_EPOCH
    # Langevin (Eq. 10-12, 17)
    prior_step_size: float = 0.16  # E_STEP_SIZE
    prior_steps: int = 60  # E_SAMPLE_STEPS
    posterior_step_size: float = 0.01  # G_STEP_SIZE
    posterior_steps: int = 20  # G_SAMPLE_STEPS
    # objective
    objective: str = "vanilla"  # "vanilla" (Eq. 7-9) or "thermo" (Eq. 15-22)
    temp_power: float = 1.0  # TEMP_POWER, p in Eq. 21
    num_temps: int = 10  # NUM_TEMPS, N_t in Eq. 18 (both ends included)
    kl_weight: float = 1.0  # KL_BIAS_WEIGHT, eta in Eq. 22
    kl_ridge: float = 1e-3  # added to the diagonal of each batch-fitted covariance (Eq. 20, kl_batch)
    ti_rule: str = "kl_batch"  # log p(x) from the chains: one of TI_RULES (kl_batch: Eq. 20 as published)
    chains_per_example: int = 1  # M posterior chains per example at every temperature
    ebm_gradient: str = "chains"  # chains (the paper's text), none (the published code: KILL_GRADIENT), ml
    gen_gradient: str = "ti"  # ti (differentiate the TI estimate) or ml (E_{t=1}[grad log p(x|z)])
    # run
    seed: int = 0
    eval_every: int = 0  # evaluate FID/KID every this many epochs (0: never)
    eval_num_min: int = 1000  # smallest sample size of the infinity extrapolation
    eval_num_max: int = 4500  # largest sample size
    eval_num_points: int = 10
    eval_with_replacement: bool = False  # each N drawn with replacement from the N_max pools (paper's code)
    # readings taken every eval_every epochs beside FID/KID (model.readings); 0 turns one off
    val_ll_examples: int = 16  # fixed validation subset of the AIS log-likelihood (0: off)
    val_ll_temps: int = 100  # AIS temperatures per stage (f on, then the likelihood on)
    val_ll_chains: int = 4  # AIS chains per validation example
    val_ll_prior_chains: int = 256  # AIS chains of the shared log Z_alpha path
    grad_noise_draws: int = 8  # G minibatches (two chain keys each) of the gradient-noise reading (0: off)
    sample_every: int = 5  # save an image grid every this many epochs (0: never)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def is_thermo(self) -> bool:
        return self.objective == "thermo"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fail(name: str, value: Any, why: str) -> None:
    raise ValueError(f"{name}={value!r} {why}")


def _validate_estimators(cfg: ExperimentConfig) -> None:
    """The TI rule, the gradient choices and the chains per example they need (model/rules.py)."""
    for name, registry in rules.REGISTRY_FIELDS.items():
        if getattr(cfg, name) not in registry:
            raise ValueError(rules.unknown(name, getattr(cfg, name), registry))
    m = cfg.chains_per_example
    rule = rules.EVIDENCE_RULES[cfg.ti_rule]
    if (why := rules.too_few_chains(rule.name, m)) is not None:
        _fail("chains_per_example", m, why)
    rows = cfg.batch_size * m  # kl_batch fits each temperature's Gaussian on every chain of the batch
    if cfg.is_thermo and rule.batch_fit and rows <= cfg.z_dim:
        warnings.warn(
            f"ti_rule=kl_batch with batch_size * chains_per_example = {cfg.batch_size} * {m} = "
            f"{rows} <= z_dim={cfg.z_dim}: the "
            "Gaussians fitted across the batch are rank-deficient and their KL is set by kl_ridge "
            "(noise of hundreds of nats); use ti_rule=kl_example, variance or stepping_stone for a "
            "correction that estimates something",
            RankDeficientKLWarning,
            stacklevel=3,
        )


def _check_types(cfg: ExperimentConfig) -> None:
    """Integer fields hold integers and number fields finite numbers: NaN fails every `<`/`>` test, so
    without this a NaN would slip through the range checks below."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(f.default, bool):
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if isinstance(f.default, int) and not (number and isinstance(value, numbers.Integral)):
            _fail(f.name, value, "must be an integer")
        if isinstance(f.default, float) and not (number and math.isfinite(value)):
            _fail(f.name, value, "must be a finite number")


def validate(cfg: ExperimentConfig) -> None:
    """Refuse values the maths or the shapes cannot take, naming the field and the fix."""
    _check_types(cfg)
    if cfg.objective not in OBJECTIVES:
        _fail("objective", cfg.objective, f"is unknown; use one of {', '.join(OBJECTIVES)}")
    if cfg.dataset not in DATASETS:
        _fail("dataset", cfg.dataset, f"is unknown; use one of {', '.join(DATASETS)}")
    if cfg.conv_impl not in CONV_IMPLS:
        _fail("conv_impl", cfg.conv_impl, "is unknown; use 'auto' (measured fastest), 'phases' or 'lax'")
    if cfg.num_temps < 2:
        _fail("num_temps", cfg.num_temps, "must be >= 2 (the schedule includes t=0 and t=1)")
    if not (cfg.temp_power > 0 and math.isfinite(cfg.temp_power)):
        _fail("temp_power", cfg.temp_power, "must be a finite number > 0 (t_i = (i/(N_t-1))^p)")
    for name in ("prior_step_size", "posterior_step_size"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            _fail(name, v, "must be a finite step size > 0 (Langevin, Eq. 10)")
    for name in (
        "prior_steps",
        "posterior_steps",
        "epochs",
        "batch_size",
        "z_dim",
        "ebm_width",
        "gen_width",
        "num_train",
        "num_val",
        "channels",
        "chains_per_example",
    ):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _fail(name, v, "must be a positive integer")
    for name in ("prior_sigma", "lkhood_sigma", "ebm_lr", "gen_lr", "ebm_final_lr", "gen_final_lr"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            _fail(name, v, "must be a finite number > 0")
    if not (0 < cfg.lr_decay <= 1):
        _fail("lr_decay", cfg.lr_decay, "must be in (0, 1]")
    if cfg.kl_weight < 0 or not math.isfinite(cfg.kl_weight):
        _fail("kl_weight", cfg.kl_weight, "must be a finite number >= 0 (eta in Eq. 22)")
    if not cfg.kl_ridge >= 0:
        _fail("kl_ridge", cfg.kl_ridge, "must be a finite number >= 0 (added to each fitted covariance)")
    # Only the kl_batch evidence rule fits a covariance to the batch's chains (the others use no kl_ridge).
    rows = cfg.batch_size * cfg.chains_per_example
    rule = rules.EVIDENCE_RULES.get(cfg.ti_rule)  # an unknown rule is refused by _validate_estimators
    if cfg.is_thermo and rule is not None and rule.batch_fit and cfg.kl_ridge == 0 and rows <= cfg.z_dim:
        _fail(
            "kl_ridge",
            cfg.kl_ridge,
            f"with batch_size * chains_per_example = {rows} <= z_dim={cfg.z_dim} "
            "makes the kl_batch rule fit a singular covariance (n samples span at most n-1 dimensions); "
            "set kl_ridge > 0 (e.g. 1e-3), a larger batch, or another ti_rule",
        )
    for name in ("ebm_beta1", "ebm_beta2", "gen_beta1", "gen_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            _fail(name, getattr(cfg, name), "must be in [0, 1) (an Adam decay rate)")
    _validate_estimators(cfg)
    size = cfg.image_size
    if size < 4 or size & (size - 1):
        _fail("image_size", size, "must be a power of two >= 4 (the generator doubles 4x4 up)")
    if cfg.batch_size > cfg.num_train:
        _fail("batch_size", cfg.batch_size, f"exceeds num_train={cfg.num_train}")
    if cfg.eval_every < 0:
        _fail("eval_every", cfg.eval_every, "must be >= 0 (0 disables evaluation)")
    if cfg.val_ll_examples < 0 or cfg.val_ll_examples == 1:
        _fail("val_ll_examples", cfg.val_ll_examples, "must be 0 (off) or >= 2 (a standard error needs two)")
    for name in ("val_ll_temps", "val_ll_chains", "val_ll_prior_chains"):
        if getattr(cfg, name) < 1:
            _fail(name, getattr(cfg, name), "must be >= 1")
    if cfg.grad_noise_draws < 0 or cfg.grad_noise_draws == 1:
        _fail("grad_noise_draws", cfg.grad_noise_draws, "must be 0 (off) or >= 2 (a variance needs two)")
    if cfg.sample_every < 0:
        _fail("sample_every", cfg.sample_every, "must be >= 0 (0 saves no image grids)")


def inert_fields(cfg: ExperimentConfig) -> dict[str, str]:
    """The config fields that cannot change what `cfg` trains (its parameters after every step), each with
    the reason. Cells that differ only in these train identically (they may still read differently: the
    loss value, or images generated for evaluation)."""
    if not cfg.is_thermo:
        why = "vanilla has no temperatures and no TI estimate"
        return {
            f: why
            for f in (
                "temp_power",
                "num_temps",
                "kl_weight",
                "kl_ridge",
                "ti_rule",
                "chains_per_example",
                "ebm_gradient",
                "gen_gradient",
            )
        }
    inert: dict[str, str] = {}
    ebm, gen = rules.EBM_GRADIENTS[cfg.ebm_gradient], rules.GEN_GRADIENTS[cfg.gen_gradient]
    rule = rules.EVIDENCE_RULES[cfg.ti_rule]
    if not ebm.prior_chain:
        why = f"with ebm_gradient={cfg.ebm_gradient} the prior chain runs only to make evaluation images"
        inert |= {"prior_steps": why, "prior_step_size": why}
    if not ebm.through_chains:
        why = (
            f"with ebm_gradient={cfg.ebm_gradient} the chains are stop-gradient, so the KL term is a constant"
        )
        inert |= {"kl_weight": why, "kl_ridge": why}
        if not gen.from_estimate:
            why = (
                f"with ebm_gradient={cfg.ebm_gradient} and gen_gradient=ml no gradient depends on the TI "
                "estimate"
            )
            inert |= {f: why for f in ("temp_power", "ti_rule", "kl_weight", "kl_ridge")}
    if not rule.has_kl:
        inert.setdefault("kl_weight", f"ti_rule={cfg.ti_rule} has no KL term")
    if not rule.batch_fit:
        inert.setdefault("kl_ridge", f"only ti_rule=kl_batch uses it, not {cfg.ti_rule}")
    return inert


def equivalent_values(cfg: ExperimentConfig) -> dict[str, tuple[str, str]]:
    """The config fields whose value `cfg` trains like a whole class of values: name -> (class, reason).
    Two configs that differ in such a field train identically when both map it to the same class (a
    pairwise notion that `inert_fields` cannot express: ti_rule matters, but only up to its class)."""
    if (
        cfg.is_thermo
        and not rules.EBM_GRADIENTS[cfg.ebm_gradient].through_chains
        and rules.GEN_GRADIENTS[cfg.gen_gradient].from_estimate
        and rules.EVIDENCE_RULES[cfg.ti_rule].trapezium_plus_kl
    ):
        kl_rules = " and ".join(r.name for r in rules.EVIDENCE_RULES.values() if r.has_kl)
        why = (
            f"with ebm_gradient={cfg.ebm_gradient} and gen_gradient=ti the chains are stop-gradient, so "
            f"the KL terms of {kl_rules} are constants and those rules train like trapezoid"
        )
        return {"ti_rule": ("trapezoid", why)}
    return {}


def training_differences(a: ExperimentConfig, b: ExperimentConfig) -> dict[str, str] | None:
    """The fields in which `a` and `b` differ, each with why it cannot change what either trains (see
    `inert_fields` and `equivalent_values`); None when some difference can. Empty when they are equal."""
    inert_a, inert_b = inert_fields(a), inert_fields(b)
    same_a, same_b = equivalent_values(a), equivalent_values(b)
    out: dict[str, str] = {}
    for f in fields(ExperimentConfig):
        name = f.name
        if getattr(a, name) == getattr(b, name):
            continue
        if name in inert_a and name in inert_b:
            out[name] = inert_a[name]
        elif name in same_a and name in same_b and same_a[name][0] == same_b[name][0]:
            out[name] = same_a[name][1]
        else:
            return None
    return out


# Paper Table 3 (CelebA) and Table 4 (CIFAR-10); SVHN uses the CIFAR-10 family at 32x32.
_PAPER_COMMON = dict(
    num_train=12000,
    num_val=4500,
    ebm_width=100,
    gen_width=64,
    epochs=50,
    batch_size=75,
    ebm_lr=2e-5,
    gen_lr=1e-4,
    ebm_final_lr=1e-5,
    gen_final_lr=5e-5,
    prior_step_size=0.16,
    prior_steps=60,
    posterior_step_size=0.01,
    num_temps=10,
    kl_weight=1.0,
    lkhood_sigma=0.3,
    prior_sigma=1.0,
    channels=3,
    eval_every=5,
    eval_num_min=1000,
    eval_num_max=4500,
)

PRESETS: dict[str, dict[str, Any]] = {
    "celeba": dict(_PAPER_COMMON, dataset="celeb_a", image_size=64, z_dim=80, posterior_steps=20),
    "cifar10": dict(_PAPER_COMMON, dataset="cifar10", image_size=32, z_dim=100, posterior_steps=40),
    "svhn": dict(_PAPER_COMMON, dataset="svhn_cropped", image_size=32, z_dim=100, posterior_steps=40),
    # The embedded default: sklearn's 1797 digits at 16x16x1, small enough for a 2-core laptop. The `digits`
    # grid (sweep/grids/digits.json) trains a smaller model still: its base overrides z, widths, N_t, batch.
    # Larger learning rates than the paper's because the run is 10 short epochs, not 50 long ones.
    "digits": dict(
        dataset="digits",
        image_size=16,
        channels=1,
        num_train=1438,
        num_val=359,
        z_dim=16,
        ebm_width=64,
        gen_width=2,
        epochs=10,
        batch_size=50,
        ebm_lr=2e-4,
        gen_lr=1e-3,
        ebm_final_lr=1e-4,
        gen_final_lr=5e-4,
        prior_steps=30,
        posterior_steps=10,
        posterior_step_size=0.01,
        num_temps=5,
        eval_every=5,
        eval_num_min=100,
        eval_num_max=350,
        eval_num_points=5,
    ),
}


def config_fields() -> dict[str, type]:
    return {f.name: f.type for f in fields(ExperimentConfig)}


def parse_value(name: str, text: str) -> Any:
    """Turn a command-line string into the type of field `name`."""
    types = {f.name: f for f in fields(ExperimentConfig)}
    if name in REPLACED_FIELDS:
        raise ValueError(f"config field {name!r} no longer exists; {REPLACED_FIELDS[name]}")
    if name not in types:
        known = ", ".join(sorted(types))
        raise ValueError(f"unknown config field {name!r}; known fields: {known}")
    default = types[name].default
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={text!r} is not a boolean; use true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a number") from None
    if default is None and text.lower() in ("none", "null", ""):
        return None
    return text


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """Return `cfg` with `overrides` applied; string values are parsed to the field's type."""
    parsed = {k: parse_value(k, v) if isinstance(v, str) else v for k, v in overrides.items()}
    unknown = set(parsed) - set(config_fields())
    for name in sorted(unknown & set(REPLACED_FIELDS)):
        raise ValueError(f"config field {name!r} no longer exists; {REPLACED_FIELDS[name]}")
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}; known: {sorted(config_fields())}")
    return replace(cfg, **parsed)


def get_preset(name: str, **overrides: Any) -> ExperimentConfig:
    """The named preset (celeba, cifar10, svhn, digits) with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return apply_overrides(ExperimentConfig(**PRESETS[name]), overrides)


def check_devices(batch_size: int, devices: int | Sequence[Any], fix: str | None = None) -> None:
    """Refuse a batch that cannot be split evenly over `devices` (a count or the devices themselves),
    naming both numbers and `fix` (default: the nearest batch sizes that divide, or fewer devices)."""
    n = devices if isinstance(devices, int) else len(devices)
    if batch_size % n:
        lower = batch_size - batch_size % n
        fix = fix or f"use a multiple of {n} (e.g. {lower or n} or {lower + n}) or run on fewer devices"
        raise ValueError(f"batch_size {batch_size} is not divisible by {n} devices; {fix}")


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """Parse repeated `--set key=value` arguments into a dict (values stay strings)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not key=value (e.g. --set temp_power=6)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
