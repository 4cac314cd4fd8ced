"""The algorithm registry: every policy optimizer as one frozen record of traits.  Imports nothing heavy.

Every layer reads an algorithm through its traits, never through its name:

- config validation asks "does it have a clipped objective", "does it train a critic", "may the KL go in the
  reward" (``rlhf_core/config/rules.py``), and resolves ``kl.reward_coef: auto`` / ``kl.loss_coef: auto`` from
  ``Traits.kl_defaults``;
- the advantages stage picks ``Traits.estimator`` from the table in ``rlhf_core/rl/advantages.py``;
- optimize runs ``rlhf_core.rl.algorithms.train.train_round`` (one signature for all), which picks the update loop
  by ``Traits.objective`` (trust region, one on-policy pass, or optim.epochs of a per-token objective from
  ``OBJECTIVES`` in ``rlhf_core/rl/algorithms/ppo.py``);
- the docs and tests iterate over ``ALGORITHMS``.

Adding an algorithm is one ``register(Algorithm(...))`` here, plus its pure loss in ``OBJECTIVES`` when its
objective is new (tests/test_stages.py adds one that way and runs the round stages with it).

An algorithm whose traits depend on its own params (reinforce's baseline, rloo's objective, reinforce_pp's
baseline) gives a ``variant``: a function of the params tree and its base traits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

# Advantage estimators (rlhf_core/rl/advantages.py: ESTIMATORS) and what each computes, per response i:
#   gae              GAE(γ, λ) over the token rewards with the critic's values
#   return           G − b: the sequence return or reward-to-go, less no baseline, a moving average of past
#                    returns, or the leave-one-out group mean (reinforce.*)
#   group            (s_i − mean_g s) / (std_g s + ε) from the scores of the prompt's k samples (grpo.*; GDPO)
#   leave_one_out    G_i − mean_{j≠i in the group} G_j
#   batch_rtg        the reward-to-go, whitened over the whole batch (optionally less the group's mean score)
ESTIMATORS = ("gae", "return", "group", "leave_one_out", "batch_rtg")
# Update loops, by objective: trust_region (algorithms/trpo.py), policy_gradient (one on-policy pass,
# algorithms/reinforce.py), and every per-token objective of ppo.OBJECTIVES over optim.epochs (algorithms/ppo.py).
UPDATE_LOOPS = ("trust_region", "policy_gradient")
CRITICS = ("trained", "regressed", "none")  # by optim's value loss; by the trust region's own regression; none


@dataclass(frozen=True)
class Traits:
    """What an algorithm does, as every layer asks it."""

    estimator: str  # one of ESTIMATORS
    objective: str  # trust_region, policy_gradient, or a per-token objective of ppo.OBJECTIVES (clipped, cispo, sapo)
    critic: str  # one of CRITICS
    group_baseline: bool = False  # the advantages compare the samples of each prompt (needs samples_per_prompt >= 2)
    kl_in_reward: bool = True  # kl.reward_coef may be > 0 (a per-token penalty in the reward)
    kl_in_loss: bool = True  # kl.loss_coef may be > 0 (a KL term in the loss)
    kl_defaults: tuple[float, float] = (0.05, 0.0)  # what kl.reward_coef: auto and kl.loss_coef: auto become
    line_search: bool = True  # trust_region: backtrack until the KL bound and the improvement hold (trpo; npg: no)

    @property
    def first_order(self) -> bool:
        """An AdamW step on a per-token loss (everything but the trust region)."""
        return self.objective != "trust_region"

    @property
    def clipped(self) -> bool:
        """PPO's clipped surrogate: ppo.clip_range_high, dual_clip and ratio_level apply."""
        return self.objective == "clipped"

    @property
    def trains_critic(self) -> bool:
        """A critic trained by optim's updates (its value loss at optim.vf_coef; critic_warmup_epochs apply)."""
        return self.critic == "trained"

    @property
    def has_critic(self) -> bool:
        """A critic at all: trained by optim's value loss, or regressed by the trust region's own fit."""
        return self.critic != "none"

    @property
    def epochs_from_optim(self) -> bool:
        """optim.epochs passes over the round (a per-token objective); else one pass or the trust-region steps."""
        return self.objective not in UPDATE_LOOPS


@dataclass(frozen=True)
class Algorithm:
    """One entry of the registry."""

    name: str
    summary: str  # what it is for, one line (docs: the algorithm table's guide column)
    own_params: str  # the params it reads beyond optim.* and kl.* (the same table)
    traits: Traits
    sections: tuple[str, ...] = ()  # params sections only it reads: set while another algorithm runs, an error
    variant: Callable | None = field(default=None, compare=False)  # (params, traits) -> traits, for params-set traits
    reference: str = ""  # the paper

    def traits_for(self, params) -> Traits:
        """The traits under ``params`` (the variant's, when the algorithm has one)."""
        return self.traits if self.variant is None else self.variant(params, self.traits)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` to the registry (its name must be new, its traits known values)."""
    traits = algorithm.traits
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    if traits.estimator not in ESTIMATORS:
        raise ValueError(f"{algorithm.name}: estimator {traits.estimator!r} must be one of {', '.join(ESTIMATORS)}")
    if traits.critic not in CRITICS:
        raise ValueError(f"{algorithm.name}: critic {traits.critic!r} must be one of {', '.join(CRITICS)}")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get(name: str) -> Algorithm:
    """The registered algorithm ``name``; KeyError names the registered ones."""
    if name not in ALGORITHMS:
        raise KeyError(f"algorithm.name = {name!r}: must be one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def traits_of(params) -> Traits:
    """The traits of params.algorithm.name under ``params``."""
    return get(params.algorithm.name).traits_for(params)


# ---------------------------------------------------------------------------------------------------
# The built-in algorithms

_GAE_CRITIC = Traits(estimator="gae", objective="policy_gradient", critic="trained")
# Group-relative advantages carry no per-token reward, so the KL can only go in the loss; auto leaves it out
# (KL-free, as TRL's GRPO default beta = 0 and DAPO), and kl.loss_coef (GRPO's paper: 0.04) adds it.
_GROUP = Traits(estimator="group", objective="clipped", critic="none", group_baseline=True, kl_in_reward=False,
                kl_defaults=(0.0, 0.0))


def _reinforce_variant(params, traits: Traits) -> Traits:
    baseline = params.reinforce.baseline
    if baseline == "value":  # a learned value: GAE and a critic, as a2c
        return dataclasses.replace(traits, estimator="gae", critic="trained")
    return dataclasses.replace(traits, group_baseline=baseline == "leave_one_out")


def _rloo_variant(params, traits: Traits) -> Traits:
    return dataclasses.replace(traits, objective="clipped") if params.rloo.objective == "clipped" else traits


def _reinforce_pp_variant(params, traits: Traits) -> Traits:
    return dataclasses.replace(traits, group_baseline=params.reinforce_pp.baseline == "group_mean")


for _algorithm in (
    Algorithm("reinforce", "the simplest baseline, one on-policy pass", "reinforce.*",
              Traits(estimator="return", objective="policy_gradient", critic="none"), variant=_reinforce_variant,
              reference="Williams 1992"),
    Algorithm("a2c", "REINFORCE with a learned value and GAE", "advantages.*, optim.vf_coef", _GAE_CRITIC,
              reference="Mnih et al. 2016"),
    Algorithm("ppo", "the default: a learned critic gives per-token credit", "ppo.*, advantages.gamma/lam, optim.vf_coef",
              dataclasses.replace(_GAE_CRITIC, objective="clipped"), reference="Schulman et al. 2017"),
    Algorithm("trpo", "a hard KL bound on every step", "trpo.*",
              Traits(estimator="gae", objective="trust_region", critic="regressed", kl_in_loss=False),
              reference="Schulman et al. 2015"),
    Algorithm("npg", "the natural-gradient step, no line search", "trpo.max_kl, trpo.cg_*",
              Traits(estimator="gae", objective="trust_region", critic="regressed", kl_in_loss=False,
                     line_search=False), reference="Kakade 2001"),
    Algorithm("grpo", "no critic: k samples per prompt, normalised in their group", "grpo.*, kl.loss_coef, ppo.clip_*",
              _GROUP, reference="Shao et al. 2024"),
    Algorithm("rloo", "no critic: the other samples of the prompt as baseline", "rloo.objective",
              Traits(estimator="leave_one_out", objective="policy_gradient", critic="none", group_baseline=True),
              variant=_rloo_variant, reference="Ahmadian et al. 2024"),
    Algorithm("cispo", "grpo where no token may lose its gradient to the clip (long reasoning)",
              "cispo.max_weight, grpo.*", dataclasses.replace(_GROUP, objective="cispo"), sections=("cispo",),
              reference="MiniMax-M1, arXiv 2506.13585"),
    Algorithm("sapo", "grpo with a smooth soft gate in place of the clip", "sapo.tau_pos, sapo.tau_neg, grpo.*",
              dataclasses.replace(_GROUP, objective="sapo"), sections=("sapo",), reference="arXiv 2511.20347"),
    Algorithm("reinforce_pp", "no critic and no groups: a batch baseline, KL per token",
              "reinforce_pp.baseline, ppo.clip_*",
              Traits(estimator="batch_rtg", objective="clipped", critic="none"), sections=("reinforce_pp",),
              variant=_reinforce_pp_variant, reference="Hu et al. 2025, arXiv 2501.03262"),
):
    register(_algorithm)
