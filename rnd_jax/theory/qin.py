"""Random noise defense (RND) vs zeroth-order attacks: Qin et al. (2021), Theorems 1-3.

Z. Qin, Y. Fan, H. Zha and B. Wu, "Random Noise Defense Against Query-Based Black-Box Attacks",
NeurIPS 2021 (slides). The attacker probes with step ``mu`` (``x + mu u``, ``u ~ N(0, I_d)``); the
defender answers every query at ``x + nu v``, ``v ~ N(0, I_d)``, so the zeroth-order estimator is

    g_{mu,nu}(x) = (f(x + mu u + nu v_1) - f(x + nu v_2)) / mu * u            (eq. 10)

``nu`` and ``mu`` are standard deviations (as in :func:`rnd_jax.defenses.input_noise`);
``alpha = nu/mu``. ``f`` is ``L_0``-Lipschitz (Assumption 1) with ``L_1``-Lipschitz gradient
(Assumption 2).

- Theorem 1: with the optimal constant step size the number of queries to reach
  ``E||grad f_{mu,nu}||^2 <= delta`` is ``O((alpha + sqrt(2)/2)^2 d^3 L_0^5 R / (eps delta^2))``;
  relative to no defense (``alpha = 0``) the factor is ``(1 + sqrt(2) alpha)^2``
  (:func:`query_factor`, :func:`query_complexity`).
- Theorem 2 (EOT with ``M`` repeated queries): the per-step error coefficient (eq. 14) and its
  ``M -> inf`` limit, whose ``nu^4 d^3/mu^2`` term the slides call dominant
  (:func:`eot_coefficient`, :func:`eot_limit_terms`).
- Theorem 3: ``P[sign h_nu != sign h_mu] <= 2 L_0 nu sqrt(d) / |h_mu|`` for the random-search
  comparison ``h = f(x + mu u) - f(x)`` (:func:`sign_flip_bound`).

These are *upper bounds*. For a linear ``f`` the exact values are available and are used by the
tests to check the bounds against Monte-Carlo: :func:`sign_flip_linear` and
:func:`second_moment_linear`. The latter also shows that for a linear (or quadratic) ``f`` EOT
removes the defense entirely as ``M -> inf``: the ``nu``-dependent excess of ``E||g||^2`` decays
as ``1/M``, so the ``nu^4`` term that survives in Theorem 2's limit is a property of the bound, not
of every ``f``.
"""

from __future__ import annotations

import math

import numpy as np


from rnd_jax.theory._util import Phi, check, nonnegative, positive, real, xp_of

__all__ = [
    "eot_coefficient",
    "eot_limit_terms",
    "query_complexity",
    "query_factor",
    "second_moment_linear",
    "sign_flip_bound",
    "sign_flip_linear",
]

_HALF_SQRT2 = math.sqrt(2.0) / 2.0


def _alpha(nu, mu):
    nu = nonnegative("nu", nu, "the defense noise std")
    mu = positive("mu", mu, "the attacker's finite-difference step; the bounds divide by it")
    return nu / mu


def query_factor(nu, mu):
    """Theorem 1's query complexity relative to no defense: ``(alpha + sqrt2/2)^2 / (1/2) = (1 + sqrt2 alpha)^2``."""
    return (1.0 + math.sqrt(2.0) * _alpha(nu, mu)) ** 2


def query_complexity(nu, mu, d, l0, radius, eps, delta):
    """Queries ``Q + 1`` at which Theorem 1's bound (eq. 12) reaches ``delta``.

    ``Q + 1 = 4 (alpha + sqrt2/2)^2 d^3 L_0^5 R / (eps delta^2)`` — the constant 4 comes from
    setting ``2 L_0^{5/2} R^{1/2} d^{3/2} (alpha + sqrt2/2) / ((Q+1)^{1/2} eps^{1/2}) = delta``.
    ``eps`` is the smoothing accuracy ``|f_{mu,nu} - f_nu| <= eps`` (so ``mu <= eps/(sqrt(d) L_0)``),
    ``radius`` the attack radius ``R``.
    """
    alpha = _alpha(nu, mu)
    d = check("d", d, lo=1.0, lo_open=False, what="the input dimension")
    l0 = positive("l0", l0, "a Lipschitz constant")
    radius = positive("radius", radius)
    eps = positive("eps", eps, "the smoothing accuracy; the bound divides by it")
    delta = positive("delta", delta, "the target squared gradient norm; the bound divides by it")
    return 4.0 * (alpha + _HALF_SQRT2) ** 2 * d**3 * l0**5 * radius / (eps * delta**2)


def eot_coefficient(nu, mu, d, l0, l1, m):
    """Per-step coefficient of ``eta_t^2`` in Theorem 2 (eq. 14), EOT with ``M`` queries per point.

    ``L0^2 L1 d^2 (1/2 + 2 nu^2/(mu^2 M)) + nu^2 L0 L1^2 d^{5/2}/mu + nu^4 L1^3 (M+1) d^3/(2 mu^2 M)``;
    ``m = inf`` gives the limit.
    """
    alpha = _alpha(nu, mu)
    nu = nonnegative("nu", nu)
    mu = positive("mu", mu)
    d = check("d", d, lo=1.0, lo_open=False, what="the input dimension")
    l0 = nonnegative("l0", l0)
    l1 = nonnegative("l1", l1)
    m = check("M", m, lo=1.0, lo_open=False, finite=False, what="repeated queries per point")
    inv_m = 1.0 / m
    return (l0**2 * l1 * d**2 * (0.5 + 2.0 * alpha**2 * inv_m)
            + nu**2 * l0 * l1**2 * d**2.5 / mu
            + nu**4 * l1**3 * (1.0 + inv_m) * d**3 / (2.0 * mu**2))


def eot_limit_terms(nu, mu, d, l0, l1):
    """The three terms of Theorem 2's coefficient as ``M -> inf`` (dict), and which is largest.

    ``smoothing = L0^2 L1 d^2/2``, ``cross = nu^2 L0 L1^2 d^{5/2}/mu``, ``noise = nu^4 L1^3 d^3/(2 mu^2)``
    (the slides' "dominant" ``nu^4 d^3/mu^2`` term). ``dominant`` names the largest.
    """
    _alpha(nu, mu)
    nu = nonnegative("nu", nu)
    mu = positive("mu", mu)
    d = check("d", d, lo=1.0, lo_open=False, what="the input dimension")
    l0 = nonnegative("l0", l0)
    l1 = nonnegative("l1", l1)
    terms = {
        "smoothing": 0.5 * l0**2 * l1 * d**2,
        "cross": nu**2 * l0 * l1**2 * d**2.5 / mu,
        "noise": nu**4 * l1**3 * d**3 / (2.0 * mu**2),
    }
    names = list(terms)
    stacked = np.stack(np.broadcast_arrays(*(np.asarray(v) for v in terms.values())))  # needs concrete values
    terms["dominant"] = [names[i] for i in np.atleast_1d(np.argmax(stacked, axis=0)).tolist()]
    return terms


def sign_flip_bound(h_mu, nu, d, l0):
    """Theorem 3: ``P[sign(h_nu) != sign(h_mu)] <= 2 L_0 nu sqrt(d) / |h_mu|`` (values >= 1 are vacuous)."""
    xp = xp_of(h_mu, nu, d, l0)
    h_mu = real("h_mu", h_mu)
    check("|h_mu|", xp.abs(h_mu), lo=0.0, what="the bound divides by the clean difference")
    nu = nonnegative("nu", nu)
    d = check("d", d, lo=1.0, lo_open=False, what="the input dimension")
    l0 = nonnegative("l0", l0)
    return 2.0 * l0 * nu * xp.sqrt(d) / xp.abs(h_mu)


def sign_flip_linear(h_mu, nu, grad_norm):
    """Exact sign-flip probability for a linear ``f`` (and its first-order value for a smooth one).

    ``h_nu - h_mu = nu grad f . (v_1 - v_2) ~ N(0, 2 nu^2 ||grad f||^2)``, so
    ``P = Phi(-|h_mu| / (sqrt(2) nu ||grad f||))``.
    """
    xp = xp_of(h_mu, nu, grad_norm)
    h_mu = real("h_mu", h_mu)
    nu = positive("nu", nu, "the probability divides by the noise scale")
    grad_norm = positive("grad_norm", grad_norm, "the probability divides by the noise scale")
    return Phi(-xp.abs(h_mu) / (math.sqrt(2.0) * nu * grad_norm))


def second_moment_linear(grad_norm, d, nu, mu, m=1):
    """``E||g~||^2`` of the (EOT-averaged) estimator (13) for a linear ``f = c.x``, ``||c|| = grad_norm``.

    ``g~ = (c.u + alpha c.(vbar_1 - vbar_2)) u`` with ``vbar`` means of ``M`` draws, so
    ``E||g~||^2 = ||c||^2 (d + 2) + 2 alpha^2 ||c||^2 d / M`` (``E[(c.u)^2 ||u||^2] = ||c||^2 (d+2)``).
    Theorem 1 bounds its growth in ``alpha`` by the factor :func:`query_factor`.
    """
    grad_norm = nonnegative("grad_norm", grad_norm)
    d = check("d", d, lo=1.0, lo_open=False, what="the input dimension")
    alpha = _alpha(nu, mu)
    m = check("M", m, lo=1.0, lo_open=False, finite=False, what="repeated queries per point")
    return grad_norm**2 * (d + 2.0) + 2.0 * alpha**2 * grad_norm**2 * d / m
