"""What the white-box attacks share: the gradient query with expectation over transformation (EOT).

Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018, Sec. 4.3:
against a randomized model the attacker follows ``E_t[grad f(t(x))]``, estimated by averaging the
gradient over ``M`` draws of the randomness. Here a draw is one query of a ``"gradient"`` oracle
(:mod:`rnd_jax.oracle`): the defender's noise of query ``q`` comes from ``fold_in(defense_key, q)``,
so ``M`` queries of the same point are ``M`` independent draws.

EOT is :func:`rnd_jax.attacks.adaptive.eot` (``eot(make_attack("pgd", ...), M)``, ``make_adaptive``,
or a grid entry's ``"eot": [M]``), as for the score and decision attacks: the wrapped attack costs ``M``
times as many queries per step and the sweep's ``eot_budget: "scaled"`` gives it ``M`` times the
budget (the papers' EOT tables). Its :class:`~rnd_jax.attacks.adaptive.RepeatedOracle` reduces scores
and labels, not gradients, so :func:`expected_gradient` recognises it and asks the ``M`` repeats of each
point itself: ONE batched call of ``n*M`` points (``M`` consecutive repeats per point, the order of
``RepeatedOracle``), answered ``(mean probabilities, mean loss, mean gradient)`` over the repeats. With
``M = 1`` (no wrapper) it is the plain gradient query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnd_jax.attacks.adaptive import RepeatedOracle, reduce_answers
from rnd_jax.oracle import loss_gradient


def expected_gradient(oracle, x, loss):
    """``(probs f32[n, K], loss f32[n], grad f32[n, H, W, C])`` at the points ``x[n]``, averaged over EOT repeats.

    ``oracle``: the step's bound ``"gradient"`` oracle, or an EOT :class:`RepeatedOracle` around one
    (module docstring); ``loss(probs[B, K]) -> f32[B]`` a per-point loss (minimised by the attack).
    """
    if x.ndim != 4:
        raise ValueError(f"oracle queries are batches f32[B, H, W, C]; got shape {x.shape}")
    m = 1
    if isinstance(oracle, RepeatedOracle):  # EOT: ask the repeats here (reduce_answers knows no gradients)
        m, oracle = oracle._m, oracle._bound
    if oracle.output != "gradient":
        raise ValueError(f"a white-box attack needs a 'gradient' oracle, got a {oracle.output!r} one")
    answer = oracle(jnp.repeat(x, m, axis=0) if m > 1 else x)
    value, grad = loss_gradient(answer, loss)
    if m == 1:
        return answer.probs, value, grad
    probs = reduce_answers(answer.probs, m, "scores")
    value = jnp.mean(value.reshape(-1, m), axis=1)
    grad = jnp.mean(grad.reshape((-1, m) + grad.shape[1:]), axis=1)
    return probs, value, grad


def random_start(key, x0, eps: float, norm: str):
    """A uniform point of the eps-ball around ``x0`` (l_inf: the cube; l_2: the ball), clipped to [0, 1].

    Madry et al. (2018) start PGD from ``x0 + U(-eps, eps)^d``; the l_2 ball is sampled as a Gaussian
    direction times ``eps * U^(1/d)``.
    """
    if norm == "linf":
        d = jax.random.uniform(key, x0.shape, x0.dtype, -eps, eps)
    else:
        k_dir, k_rad = jax.random.split(key)
        u = jax.random.normal(k_dir, x0.shape, x0.dtype)
        r = eps * jax.random.uniform(k_rad, (), x0.dtype) ** (1.0 / x0.size)
        d = u * (r / jnp.maximum(jnp.sqrt(jnp.sum(u * u)), 1e-12))
    return jnp.clip(x0 + d, 0.0, 1.0)
