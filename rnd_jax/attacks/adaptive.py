"""Adaptive attacks: expectation over transformation (EOT) by repeated queries, and countermeasures.

Against a randomized defense the attacker can ask the same point several times and average the
answers, trading queries for a less noisy view of the model. :func:`eot` turns any attack into one
that does this for *every* point it asks about, without changing the attack:

    attack = eot(make_attack("nes", ctx, beta=1e-2), m=10)   # or make_adaptive("nes", ctx, 10, beta=1e-2)

Each point of a step is repeated ``m`` times in ONE batched oracle call of ``n*m`` points (so the
``m`` copies are ``m`` separate queries, with ``m`` independent draws of the defender's noise),
and the ``m`` answers are reduced to one, by the oracle's output type:

- ``"scores"``: the mean probability vector (the expectation attack of SND, Byun et al. 2022,
  Table 5; RND's EOT with M samples, Qin et al. 2021, Theorem 2; randomized-feature defense Table 7);
- ``"label"``: the majority label; ties go to the smallest label among the most frequent ones;
- ``"top1"``: the majority label (same tie rule) with the mean of the scores of the answers that
  gave it.

Every repeat counts: the wrapped attack costs ``m * attack.cost`` per step, and a step that asks
through ``oracle.at(offset, x)`` inside a loop (reported in ``Info.queries``) is mapped to outer
offsets ``offset*m`` with ``Info.queries`` multiplied by ``m``, so the driver's count (static
points plus ``Info.queries``) is exactly the number of points the model answered. At a fixed query
budget the attack takes ``m`` times fewer steps. ``eot(attack, 1)`` is ``attack`` itself.

Attacker countermeasures are configs, not code forks (see :mod:`rnd_jax.grids`):

- the finite-difference step (NES ``beta``, RND's ``mu``; Aithal & Li 2022 Table 6): a larger step
  raises the signal of ``F(x + beta u) - F(x - beta u)`` above the output noise (their Lemma 1:
  SNR grows as ``beta**2 / sigma**2``), and, against input noise, RND's ratio ``nu / mu`` decides
  whether the finite difference is dominated by the defender's noise (Qin et al. 2021, Theorem 1);
- more samples per gradient estimate (NES ``samples`` = J; Aithal & Li Table 8);
- ``N`` repeated queries of the same point (Aithal & Li Table 7 and Theorem 4, eq. 8) — that is
  ``eot(attack, N)`` at an equal total budget;
- the expectation attack of SND / RND / randomized-feature defense: ``eot(attack, M)`` over the
  defender's input or feature noise level ``nu``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import Context, make_attack
from rnd_jax.oracle import Top1

__all__ = ["RepeatedOracle", "eot", "majority", "make_adaptive", "reduce_answers"]


def _check_m(m) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"EOT repeats m must be an int >= 1, got {m!r}")
    return m


def majority(labels):
    """The most frequent entry of each row of ``labels: i32[n, m]``; ties -> the smallest label."""
    labels = jnp.asarray(labels, jnp.int32)
    counts = jnp.sum(labels[:, :, None] == labels[:, None, :], axis=-1)  # [n, m]: votes of each answer's label
    best = jnp.max(counts, axis=-1, keepdims=True)
    big = jnp.iinfo(jnp.int32).max
    return jnp.min(jnp.where(counts == best, labels, big), axis=-1)


def reduce_answers(answers, m: int, output: str):
    """Reduce ``n*m`` answers (``m`` consecutive repeats per point) to ``n`` answers."""
    if output == "scores":
        return jnp.mean(answers.reshape((-1, m) + answers.shape[1:]), axis=1)
    if output == "label":
        return majority(answers.reshape(-1, m))
    if output == "top1":
        lab = answers.label.reshape(-1, m)
        score = answers.score.reshape(-1, m)
        win = majority(lab)
        agree = lab == win[:, None]
        mean = jnp.sum(jnp.where(agree, score, 0.0), axis=1) / jnp.sum(agree, axis=1)
        return Top1(win, mean.astype(answers.score.dtype))
    raise ValueError(f"unknown oracle output {output!r}")


class RepeatedOracle:
    """A bound oracle seen through ``m`` repeats: what an EOT attack's inner step talks to.

    ``oracle(x)`` asks the wrapped bound oracle about ``repeat(x, m)`` in one call (counted there as
    ``n*m`` points) and returns the reduced answers; ``oracle.at(offset, x)`` does the same at outer
    offset ``offset*m``. ``used`` is the count in the inner attack's units (points before repeats).
    """

    def __init__(self, bound, m: int):
        self._bound = bound
        self._m = _check_m(m)

    @property
    def output(self) -> str:
        return self._bound.output

    @property
    def used(self) -> int:
        return self._bound.used // self._m

    @property
    def budget(self):
        """The run's budget in the inner attack's units (points before repeats), or None."""
        b = getattr(self._bound, "budget", None)
        return None if b is None else b // self._m

    @property
    def spent(self):
        """Queries spent before this step, in the inner attack's units."""
        return self._bound.spent // self._m

    def _ask(self, x):
        if x.ndim != 4:
            raise ValueError(f"oracle queries are batches f32[B, H, W, C]; got shape {x.shape}")
        return jnp.repeat(x, self._m, axis=0)

    def __call__(self, x):
        return reduce_answers(self._bound(self._ask(x)), self._m, self.output)

    def at(self, offset, x):
        return reduce_answers(self._bound.at(offset * self._m, self._ask(x)), self._m, self.output)


def eot(attack: Attack, m: int) -> Attack:
    """``attack`` with every query repeated ``m`` times and the answers reduced (module docstring).

    The state, ``init`` and the attack's randomness are unchanged; ``cost`` becomes
    ``m * attack.cost`` and a reported ``Info.queries`` is multiplied by ``m``.
    """
    m = _check_m(m)
    if m == 1:
        return attack

    return Attack(init=attack.init, step=Partial(_eot_step, attack.step, m), cost=attack.cost * m, output=attack.output, targeted=attack.targeted,
                  checks=attack.checks * m)


def _eot_step(inner, m, state, oracle):
    new, info = inner(state, RepeatedOracle(oracle, m))
    dynamic = getattr(info, "queries", None)
    if dynamic is not None:
        info = info._replace(queries=jnp.asarray(dynamic, jnp.int32) * m)
    return new, info


def make_adaptive(name: str, ctx: Context | None = None, m: int = 1, **config) -> Attack:
    """``eot(make_attack(name, ctx, **config), m)``: any registered attack with ``m`` repeats."""
    return eot(make_attack(name, ctx, **config), m)

