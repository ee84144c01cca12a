"""Presets against the paper's Tables 3-4, and config validation."""

import pytest

from model.config import ExperimentConfig, apply_overrides, get_preset, parse_set_args

TABLE_3_CELEBA = dict(
    dataset="celeb_a",
    epochs=50,
    batch_size=75,
    num_train=12000,
    num_val=4500,
    z_dim=80,
    ebm_width=100,
    ebm_leak=0.1,
    gen_width=64,
    gen_leak=0.2,
    prior_sigma=1.0,
    lkhood_sigma=0.3,
    ebm_lr=2e-5,
    gen_lr=1e-4,
    ebm_final_lr=1e-5,
    gen_final_lr=5e-5,
    ebm_beta1=0.5,
    ebm_beta2=0.999,
    gen_beta1=0.5,
    gen_beta2=0.999,
    lr_decay_begin=1,
    lr_decay=0.975,
    prior_step_size=0.16,
    posterior_step_size=0.01,
    prior_steps=60,
    posterior_steps=20,
    num_temps=10,
    kl_weight=1.0,
    image_size=64,
    channels=3,
)
TABLE_4_CIFAR10 = TABLE_3_CELEBA | dict(dataset="cifar10", z_dim=100, posterior_steps=40, image_size=32)


@pytest.mark.parametrize(
    "preset,table",
    [
        ("celeba", TABLE_3_CELEBA),
        ("cifar10", TABLE_4_CIFAR10),
        ("svhn", TABLE_4_CIFAR10 | dict(dataset="svhn_cropped")),
    ],
)
def test_presets_reproduce_the_paper_tables_field_by_field(preset, table):
    cfg = get_preset(preset)
    for field, value in table.items():
        assert getattr(cfg, field) == value, (preset, field)
    # the method as the paper describes it, with the paper's estimator and one chain per example
    assert (cfg.ebm_gradient, cfg.gen_gradient, cfg.ti_rule, cfg.chains_per_example) == (
        "chains",
        "ti",
        "kl_batch",
        1,
    )


def test_digits_preset_is_small_and_offline():
    cfg = get_preset("digits")
    assert (cfg.dataset, cfg.image_size, cfg.channels) == ("digits", 16, 1)
    assert cfg.num_train + cfg.num_val == 1797


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("num_temps", 1, "num_temps=1"),
        ("temp_power", 0.0, "temp_power=0.0"),
        ("temp_power", -2.0, "temp_power"),
        ("prior_step_size", -0.1, "prior_step_size=-0.1"),
        ("posterior_step_size", 0.0, "posterior_step_size"),
        ("objective", "vae", "objective='vae'"),
        ("dataset", "mnist", "dataset='mnist'"),
        ("image_size", 24, "image_size=24"),
        ("kl_weight", -1.0, "kl_weight"),
        ("batch_size", 0, "batch_size"),
        ("eval_every", -1, "eval_every=-1"),
        ("sample_every", -1, "sample_every=-1"),
    ],
)
def test_bad_values_are_refused_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        ExperimentConfig(**{field: value})


def test_overrides_parse_types_and_refuse_unknown_names():
    cfg = apply_overrides(
        get_preset("digits"),
        parse_set_args(["temp_power=6", "objective=thermo", "ebm_gradient=none", "num_temps=20"]),
    )
    assert (cfg.temp_power, cfg.objective, cfg.ebm_gradient, cfg.num_temps) == (6.0, "thermo", "none", 20)
    with pytest.raises(ValueError, match="unknown config field 'tempo'"):
        apply_overrides(cfg, {"tempo": "3"})
    with pytest.raises(ValueError, match="not an integer"):
        apply_overrides(cfg, {"num_temps": "ten"})
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        get_preset("imagenet")


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(ti_rule="kl"), "ti_rule='kl' is unknown"),
        (dict(ebm_gradient="exact"), "ebm_gradient='exact' is unknown"),
        (dict(gen_gradient="chains"), "gen_gradient='chains' is unknown"),
        (dict(chains_per_example=0), "chains_per_example=0 must be a positive integer"),
        (
            dict(ti_rule="variance"),
            "chains_per_example=1 is too few for ti_rule=variance.*chains_per_example=2",
        ),
        (dict(ti_rule="stepping_stone"), "chains_per_example=1 is too few for ti_rule=stepping_stone"),
        (
            dict(ti_rule="kl_example", chains_per_example=5),
            "chains_per_example=5 is too few for ti_rule=kl_example.*chains_per_example=6 or more",
        ),
    ],
)
def test_estimator_fields_are_checked_with_the_fix_in_the_message(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        ExperimentConfig(**overrides)


def test_estimator_fields_accept_what_the_rules_need():
    for overrides in (
        dict(ti_rule="kl_example", chains_per_example=6),
        dict(ti_rule="variance", chains_per_example=2),
        dict(ti_rule="stepping_stone", chains_per_example=2),
        dict(ti_rule="trapezoid"),
        dict(ebm_gradient="ml", gen_gradient="ml"),
    ):
        ExperimentConfig(**overrides)


def test_chain_gradient_is_refused_naming_its_replacement():
    with pytest.raises(ValueError, match="chain_gradient=false is ebm_gradient=none"):
        apply_overrides(get_preset("digits"), parse_set_args(["chain_gradient=false"]))
    with pytest.raises(ValueError, match="replaced by ebm_gradient and gen_gradient"):
        apply_overrides(get_preset("digits"), {"chain_gradient": True})


def test_kl_batch_warns_when_the_batch_cannot_span_z():
    with pytest.warns(UserWarning, match=r"= 75 \* 1 = 75 <= z_dim=80.*rank-deficient"):
        get_preset("celeba", objective="thermo")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_preset("celeba", objective="thermo", ti_rule="trapezoid")
        get_preset("celeba")  # vanilla fits no Gaussians


def test_kl_batch_rank_counts_every_chain():
    """kl_batch fits its Gaussians on batch_size * chains_per_example rows: 75 * 2 = 150 rows span
    z_dim=80, while 8 * 2 = 16 rows do not span z_dim=16 (rank 15)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_preset("celeba", objective="thermo", chains_per_example=2)
    with pytest.warns(UserWarning, match=r"batch_size \* chains_per_example = 8 \* 2 = 16 <= z_dim=16"):
        get_preset("digits", objective="thermo", batch_size=8, chains_per_example=2)
