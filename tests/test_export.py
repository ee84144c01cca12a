"""Every function a sweep compiles lowers for CUDA on a machine without a GPU (model.plan.export).

Lowering is not compiling: this catches an operation without a CUDA lowering (a CPU-only custom call, a
primitive the GPU backend lacks), not GPU speed, memory or numerics (docs/gpu.md).
"""

from __future__ import annotations

import re

import pytest

from model.config import get_preset
from model.plan import export

# Every gradient estimator and evidence rule of the thermodynamic objective (docs/estimators.md).
ESTIMATORS = {
    "vanilla": dict(objective="vanilla"),
    "thermo-chains": dict(objective="thermo", ebm_gradient="chains"),
    "thermo-none": dict(objective="thermo", ebm_gradient="none"),
    "thermo-ml": dict(objective="thermo", ebm_gradient="ml"),
    "thermo-ml-ml": dict(objective="thermo", ebm_gradient="ml", gen_gradient="ml"),
    "thermo-kl-example": dict(objective="thermo", ti_rule="kl_example", chains_per_example=6),
    "thermo-variance": dict(objective="thermo", ti_rule="variance", chains_per_example=2),
    "thermo-stepping-stone": dict(objective="thermo", ti_rule="stepping_stone", chains_per_example=2),
    "thermo-trapezoid": dict(objective="thermo", ti_rule="trapezoid"),
}
# Both transposed-convolution implementations for the gradient modes; the rules differ only after g(z).
CASES = [
    (e, c)
    for e in ESTIMATORS
    for c in (
        ("phases", "lax")
        if "-" not in e or e in ("thermo-chains", "thermo-none", "thermo-ml")
        else ("phases",)
    )
]


@pytest.mark.parametrize("estimator,conv_impl", CASES)
def test_step_functions_lower_for_cuda(estimator, conv_impl):
    config = get_preset("digits", conv_impl=conv_impl, num_temps=3, **ESTIMATORS[estimator])
    exported = export.export_step_functions(config, platforms=["cuda"])
    assert set(exported) == {"train_step", "eval_step", "generate"}
    for name, ex in exported.items():
        assert ex.platforms == ("cuda",), name
    train = exported["train_step"].mlir_module()
    # the gradient average over devices is in the module: the collectives were bound, not dropped
    assert "stablehlo.all_reduce" in train
    targets = set(re.findall(r"custom_call @(\w+)", train))
    assert not any(t.startswith("lapack") for t in targets), targets  # no CPU linear algebra
    if config.is_thermo and config.ti_rule == "kl_batch":  # Eq. 20's Cholesky lowers to cuSOLVER
        assert any(t.startswith("cusolver") for t in targets), targets


def test_inception_feature_pass_lowers_for_cuda():
    exported = export.export_inception(platforms=["cuda"], batch=2, image_size=32)
    assert exported.platforms == ("cuda",)
    assert [a.shape for a in exported.out_avals] == [(2, 2048)]


def test_an_operation_without_a_cuda_lowering_fails_the_export():
    """The check can fail: a primitive lowered for the CPU only is refused for CUDA."""
    import jax
    import jax.numpy as jnp
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    cpu_only = Primitive("cpu_only_double")
    cpu_only.def_impl(lambda x: 2 * x)
    cpu_only.def_abstract_eval(lambda x: x)
    mlir.register_lowering(cpu_only, mlir.lower_fun(lambda x: 2 * x, multiple_results=False), platform="cpu")
    f = jax.jit(lambda x: cpu_only.bind(x) + 1)
    jax.export.export(f, platforms=["cpu"])(jnp.ones(3))  # fine where it has a lowering
    with pytest.raises(NotImplementedError, match="cpu_only_double"):
        jax.export.export(f, platforms=["cuda"])(jnp.ones(3))
