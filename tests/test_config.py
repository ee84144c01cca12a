"""Presets against the paper's Tables 3-4, and config validation."""

import pytest

from model.config import ExperimentConfig, apply_overrides, get_preset, parse_set_args

TABLE_3_CELEBA = dict(dataset="celeb_a", epochs=50, batch_size=75, num_train=12000, num_val=4500, z_dim=80,
                      ebm_width=100, ebm_leak=0.1, gen_width=64, gen_leak=0.2, prior_sigma=1.0,
                      lkhood_sigma=0.3, ebm_lr=2e-5, gen_lr=1e-4, ebm_final_lr=1e-5, gen_final_lr=5e-5,
                      ebm_beta1=0.5, ebm_beta2=0.999, gen_beta1=0.5, gen_beta2=0.999, lr_decay_begin=1,
                      lr_decay=0.975, prior_step_size=0.16, posterior_step_size=0.01, prior_steps=60,
                      posterior_steps=20, num_temps=10, kl_weight=1.0, image_size=64, channels=3)
TABLE_4_CIFAR10 = TABLE_3_CELEBA | dict(dataset="cifar10", z_dim=100, posterior_steps=40, image_size=32)


@pytest.mark.parametrize("preset,table", [("celeba", TABLE_3_CELEBA), ("cifar10", TABLE_4_CIFAR10),
                                          ("svhn", TABLE_4_CIFAR10 | dict(dataset="svhn_cropped"))])
def test_presets_reproduce_the_paper_tables_field_by_field(preset, table):
    cfg = get_preset(preset)
    for field, value in table.items():
        assert getattr(cfg, field) == value, (preset, field)
    assert cfg.chain_gradient is True  # the method as the paper describes it


def test_digits_preset_is_small_and_offline():
    cfg = get_preset("digits")
    assert (cfg.dataset, cfg.image_size, cfg.channels) == ("digits", 16, 1)
    assert cfg.num_train + cfg.num_val == 1797


@pytest.mark.parametrize("field,value,needle", [
    ("num_temps", 1, "num_temps=1"), ("temp_power", 0.0, "temp_power=0.0"),
    ("temp_power", -2.0, "temp_power"),
    ("prior_step_size", -0.1, "prior_step_size=-0.1"), ("posterior_step_size", 0.0, "posterior_step_size"),
    ("objective", "vae", "objective='vae'"), ("dataset", "mnist", "dataset='mnist'"),
    ("image_size", 24, "image_size=24"), ("kl_weight", -1.0, "kl_weight"), ("batch_size", 0, "batch_size"),
    ("eval_every", -1, "eval_every=-1"), ("sample_every", -1, "sample_every=-1"),
])
def test_bad_values_are_refused_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        ExperimentConfig(**{field: value})


def test_overrides_parse_types_and_refuse_unknown_names():
    cfg = apply_overrides(get_preset("digits"), parse_set_args(["temp_power=6", "objective=thermo",
                                                                "chain_gradient=false", "num_temps=20"]))
    assert (cfg.temp_power, cfg.objective, cfg.chain_gradient, cfg.num_temps) == (6.0, "thermo", False, 20)
    with pytest.raises(ValueError, match="unknown config field 'tempo'"):
        apply_overrides(cfg, {"tempo": "3"})
    with pytest.raises(ValueError, match="not an integer"):
        apply_overrides(cfg, {"num_temps": "ten"})
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        get_preset("imagenet")
