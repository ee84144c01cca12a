"""The estimator choices of the thermodynamic objective, each named once: the evidence rules (`ti_rule`:
how log p(x) is estimated from the chains, Eq. 18-22 and the alternatives in docs/estimators.md) and the
gradient estimators (`ebm_gradient`, `gen_gradient`: what each network's update is).

Each entry is plain metadata (no jax): the config validates against it, `model.config.training_differences`
reads which fields a choice makes inert, `sweep.grid --dry-run` prints the names, and
`model.objectives.ti_estimate` maps each rule's name to its function (`model.objectives.RULE_ESTIMATES`,
checked at import to cover this registry). Adding a rule is one entry here, its function there, and a row
in docs/estimators.md (tests/test_docs.py checks the docs list every entry with its minimum chains).
"""

from __future__ import annotations

from dataclasses import dataclass

# The fewest chains per example for a per-example diagonal Gaussian fit (ti_rule=kl_example): a fitted
# variance has M - 1 degrees of freedom and the KL's trace term holds its inverse, which has a finite
# variance only for M - 1 = 5 > 4, i.e. M >= 6.
MIN_CHAINS_DIAGONAL = 6


@dataclass(frozen=True)
class EvidenceRule:
    """One value of `ti_rule`: an estimate of log p(x) from the N_t tempered posteriors' chains.

    min_chains: the fewest chains per example M it is defined for, and `too_few` the reason, as it
        continues "chains_per_example=M is too few for ti_rule=NAME".
    has_kl: it adds eta/2 sum_i [KL(p_{i-1}||p_i) - KL(p_i||p_{i-1})] of Gaussians fitted to the chains
        (Eq. 19-22), so `kl_weight` (eta) enters it.
    batch_fit: its Gaussians are fitted across the batch (Eq. 20 as the paper computes it), so `kl_ridge`
        enters it and batch_size * M <= z_dim makes them rank-deficient.
    trapezium_plus_kl: its estimate is the trapezium plus at most a KL term of the chains alone, so with
        stop-gradient chains (and gen_gradient=ti) it trains exactly like `trapezoid`.
    """

    name: str
    description: str
    min_chains: int = 1
    too_few: str = ""
    has_kl: bool = False
    batch_fit: bool = False
    trapezium_plus_kl: bool = False


@dataclass(frozen=True)
class GradientEstimator:
    """One value of `ebm_gradient` or `gen_gradient`: the gradient a network's update follows.

    through_chains: (EBM) the TI estimate is differentiated through the Langevin chains.
    prior_chain: (EBM) it runs the prior chain (`prior_steps`, `prior_step_size`) during training.
    from_estimate: (generator) it differentiates the TI estimate rather than taking the ml gradient.
    """

    name: str
    description: str
    through_chains: bool = False
    prior_chain: bool = False
    from_estimate: bool = False


_SPREAD = ", which works from the spread of each example's chains"

EVIDENCE_RULES: dict[str, EvidenceRule] = {
    r.name: r
    for r in (
        EvidenceRule(
            "kl_batch",
            "trapezium + eta/2 KL difference of Gaussians fitted across the batch (Eq. 20-22 as published)",
            has_kl=True,
            batch_fit=True,
            trapezium_plus_kl=True,
        ),
        EvidenceRule(
            "kl_example",
            "trapezium + eta/2 KL difference of Gaussians fitted per example from its M chains",
            min_chains=MIN_CHAINS_DIAGONAL,
            too_few=": the per-example KL's trace term has no finite variance below "
            f"{MIN_CHAINS_DIAGONAL} chains",
            has_kl=True,
            trapezium_plus_kl=True,
        ),
        EvidenceRule(
            "variance",
            "trapezium - sum_i dt_i^2/12 (V_i - V_{i-1}) (Friel, Hurn & Wyse 2014)",
            min_chains=2,
            too_few=_SPREAD,
        ),
        EvidenceRule(
            "stepping_stone",
            "sum_i log-mean-exp over the M chains at t_{i-1} of dt_i log p(x|z) (Xie et al. 2011)",
            min_chains=2,
            too_few=_SPREAD,
        ),
        EvidenceRule(
            "trapezoid",
            "sum_i dt_i (E_{i-1} + E_i)/2 (Eq. 18-19 without the KL term)",
            trapezium_plus_kl=True,
        ),
    )
}

EBM_GRADIENTS: dict[str, GradientEstimator] = {
    g.name: g
    for g in (
        GradientEstimator(
            "chains",
            "the TI estimate differentiated through the Langevin chains (the paper's text)",
            through_chains=True,
        ),
        GradientEstimator("none", "none: stop-gradient chains (the published code, KILL_GRADIENT)"),
        GradientEstimator(
            "ml",
            "mean grad f(z_{t=1}) - mean grad f(z_prior), the maximum-likelihood gradient",
            prior_chain=True,
        ),
    )
}

GEN_GRADIENTS: dict[str, GradientEstimator] = {
    g.name: g
    for g in (
        GradientEstimator(
            "ti", "the TI estimate differentiated (the paper's 'shaped' gradient)", from_estimate=True
        ),
        GradientEstimator("ml", "E_{t=1}[grad_beta log p(x|z)], the exact gradient given posterior samples"),
    )
}

# Each config field whose value names an entry of a registry, and that registry.
REGISTRY_FIELDS: dict[str, dict[str, EvidenceRule] | dict[str, GradientEstimator]] = {
    "ti_rule": EVIDENCE_RULES,
    "ebm_gradient": EBM_GRADIENTS,
    "gen_gradient": GEN_GRADIENTS,
}


def too_few_chains(rule: str, chains: int) -> str | None:
    """Why `chains` chains per example are too few for evidence rule `rule`, as an error message's tail
    after "chains_per_example=M ", or None when they suffice."""
    r = EVIDENCE_RULES[rule]
    if chains >= r.min_chains:
        return None
    return f"is too few for ti_rule={r.name}{r.too_few}; set chains_per_example={r.min_chains} or more"


def unknown(field: str, value: object, registry: dict[str, object]) -> str:
    """The message refusing `value` of `field` that is not in `registry`."""
    return f"{field}={value!r} is unknown; use one of {', '.join(registry)}"
