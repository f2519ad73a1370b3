"""Output randomization and top-1 flips: Park et al., Sec. 5, with their variance/std erratum fixed.

D. Park, H. Khan, A. Khan, A. Gittens and B. Yener, "Output Randomization: A Novel Defense for both
White-box and Black-box Adversarial Models", Sec. 5.1 (misclassification rate) and 5.2 (finite
difference gradient error).

The defended model answers ``d(p) = p + e`` with ``e ~ N(mu, sigma^2 I)``. For the top class ``m``
and another class ``i`` with margin ``delta_i = p_m - p_i >= 0``, ``e_i - e_m`` is
``N(mu_i - mu_m, sigma_i^2 + sigma_m^2)``, so

    K_i = P[d(p)_i > d(p)_m] = Phi( -(delta_i - mu_i + mu_m) / sqrt(sigma_i^2 + sigma_m^2) ),

which for zero-mean i.i.d. noise is ``Phi(-delta_i / (sqrt(2) sigma))`` and, solved for the noise
level, ``sigma = delta_i / (sqrt(2) |Phi^{-1}(K)|)``.

Erratum (Sec. 5.1): the paper standardises ``e_i`` by its *variance* ``sigma_i^2 + sigma_m^2``
instead of its standard deviation, printing ``K = Phi(-(delta_i - mu_i + mu_m)/(sigma_i^2 +
sigma_m^2))`` and hence ``sigma^2 = -delta_i / (2 Phi^{-1}(K))``. The correct inversion is
``sigma^2 = delta_i^2 / (2 Phi^{-1}(K)^2)``. The printed rule makes the flip rate at the chosen
noise level differ from ``K`` (the two standardisations agree only at ``sigma = 1/sqrt 2``); e.g.
``delta = 0.1, K = 0.01`` gives ``sigma = 0.147`` and an actual flip rate of 0.315 (see
``tests/test_theory.py``).

Erratum (Sec. 5.2): the expected finite-difference error uses
``E[log X] ~ log E[X] - Var[X]/(2 E[X]^2)`` on the ratio ``X = (p_c + e_c)/(p_o + e_o)`` with
``E[X] = p_c/p_o``, which drops the ``+sigma^2/p_o^2`` bias of ``E[1/(p_o + e_o)]``. That gives
``-(sigma^2/2)(sigma^2 + p_o^2 + p_c^2)/(p_c^2 p_o^2)`` for the bias of ``E[L(d(p))]``, where
expanding ``log(p_c + e_c) - log(p_o + e_o)`` term by term gives
``(sigma^2/2)(1/p_o^2 - 1/p_c^2)``: the two classes enter with opposite signs
(:func:`fd_loss_bias`). The printed difference also repeats the unprimed term twice
(``S(p) - S(p)`` where ``S(p) - S(p')`` is meant).

Beyond the paper: :func:`class_probability` gives the exact probability that the noisy top-1 is a
given class (one-dimensional integral, trapezoid rule), with or without the absolute-value
post-processing of :func:`rnd_jax.defenses.output_noise`; the paper's sum over classes is then the
union bound :func:`flip_union_bound` on its complement.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from rnd_jax.theory._util import (Phi, Phi_inv, check, log_Phi, nonnegative, open_unit, positive, probability, real,
                                  xp_of)

__all__ = [
    "class_probability",
    "fd_bias",
    "fd_loss_bias",
    "fd_loss_bias_as_printed",
    "flip_probability",
    "flip_union_bound",
    "margins",
    "pair_flip_probability",
    "pair_flip_probability_as_printed",
    "sigma_for_flip",
    "sigma_for_flip_as_printed",
    "sigma_for_union_flip",
]


def _pair_args(delta, sigma_i, sigma_m, mu_i, mu_m):
    delta = real("delta", delta)
    sigma_i = nonnegative("sigma_i", sigma_i, "a noise standard deviation")
    sigma_m = sigma_i if sigma_m is None else nonnegative("sigma_m", sigma_m, "a noise standard deviation")
    scale2 = sigma_i**2 + sigma_m**2
    positive("sigma_i^2 + sigma_m^2", scale2, "the flip probability divides by the noise scale")
    return delta, scale2, real("mu_i", mu_i), real("mu_m", mu_m)


def pair_flip_probability(delta, sigma_i, sigma_m=None, mu_i=0.0, mu_m=0.0):
    """``P[p_i + e_i > p_m + e_m] = Phi(-(delta - mu_i + mu_m)/sqrt(sigma_i^2 + sigma_m^2))`` (Sec. 5.1, corrected).

    ``delta = p_m - p_i``; ``sigma_m`` defaults to ``sigma_i`` (i.i.d. noise).
    """
    xp = xp_of(delta, sigma_i, sigma_m, mu_i, mu_m)
    delta, scale2, mu_i, mu_m = _pair_args(delta, sigma_i, sigma_m, mu_i, mu_m)
    return Phi(-(delta - mu_i + mu_m) / xp.sqrt(scale2))


def pair_flip_probability_as_printed(delta, sigma_i, sigma_m=None, mu_i=0.0, mu_m=0.0):
    """Sec. 5.1 as printed: the standardisation divides by the variance ``sigma_i^2 + sigma_m^2``."""
    delta, scale2, mu_i, mu_m = _pair_args(delta, sigma_i, sigma_m, mu_i, mu_m)
    return Phi(-(delta - mu_i + mu_m) / scale2)


def _flip_target(delta, k):
    delta = nonnegative("delta", delta, "a margin p_m - p_i to the top class")
    k = open_unit("K", k, "a misclassification probability")
    check("K", k, lo=0.0, hi=0.5, what="zero-mean noise flips a pair with probability < 1/2")
    return delta, k


def sigma_for_flip(delta, k):
    """Noise std giving flip probability ``K`` for margin ``delta``: ``delta / (sqrt(2) |Phi^{-1}(K)|)``."""
    delta, k = _flip_target(delta, k)
    return delta / (-math.sqrt(2.0) * Phi_inv(k))


def sigma_for_flip_as_printed(delta, k):
    """The printed rule ``sigma^2 = -delta/(2 Phi^{-1}(K))``, returned as a standard deviation."""
    xp = xp_of(delta, k)
    delta, k = _flip_target(delta, k)
    return xp.sqrt(-delta / (2.0 * Phi_inv(k)))


def margins(probs):
    """``(top, delta)``: the top-1 class ``i32[...]`` and ``delta_i = p_top - p_i`` ``f32[..., K]``."""
    xp = xp_of(probs)
    p = xp.asarray(probs)
    top = xp.argmax(p, axis=-1)
    return top, xp.max(p, axis=-1, keepdims=True) - p


def flip_union_bound(probs, sigma):
    """Park's bound ``sum_{i != m} Phi(-delta_i/(sqrt 2 sigma))`` on the top-1 flip probability."""
    xp = xp_of(probs, sigma)
    sigma = positive("sigma", sigma, "the bound divides by sigma")
    top, delta = margins(probs)
    terms = Phi(-delta / (math.sqrt(2.0) * sigma[..., None]))
    mask = xp.arange(delta.shape[-1]) != top[..., None]
    return xp.sum(xp.where(mask, terms, 0.0), axis=-1)


def _top1_integral(probs, cls, sigma, fold, complement, n_grid, width):
    """``int phi(z) q(z) dz`` with ``q = prod_j P[class j loses to cls | z]`` or ``1 - q`` (stable)."""
    xp = xp_of(probs, cls, sigma)
    p = check("probs", probs, lo=0.0, hi=1.0, lo_open=False, hi_open=False, what="class probabilities")
    sigma = positive("sigma", sigma, "the integral divides by sigma")
    cls = xp.broadcast_to(xp.asarray(cls, xp.int32), p.shape[:-1])
    z = xp.linspace(-width, width, n_grid)
    w = np.full((n_grid,), 2.0 * width / (n_grid - 1))
    w[[0, -1]] *= 0.5
    w = xp.asarray(w * np.exp(-0.5 * np.linspace(-width, width, n_grid) ** 2) / math.sqrt(2.0 * math.pi))
    s = sigma[..., None, None]
    p_cls = xp.take_along_axis(p, cls[..., None], axis=-1)  # [..., 1]
    x_cls = (p_cls + sigma[..., None] * z)[..., :, None]  # [..., n_grid, 1]
    pj = p[..., None, :]  # [..., 1, K]
    if fold:
        c = xp.abs(x_cls)
        inside = Phi((c - pj) / s) - Phi((-c - pj) / s)
        with np.errstate(divide="ignore"):  # log 0 = -inf: that class cannot lose
            logs = xp.log(xp.maximum(inside, 0.0))
    else:
        logs = log_Phi((x_cls - pj) / s)
    mask = (xp.arange(p.shape[-1]) != cls[..., None])[..., None, :]
    total = xp.sum(xp.where(mask, logs, 0.0), axis=-1)  # [..., n_grid]
    q = -xp.expm1(total) if complement else xp.exp(total)
    return xp.sum(w * q, axis=-1)


def class_probability(probs, cls, sigma, fold: bool = False, n_grid: int = 2001, width: float = 9.0):
    """Exact ``P[argmax(p + sigma v) = cls]`` (``fold=False``) or ``P[argmax |p + sigma v| = cls]``.

    Conditioning on the noise ``z`` of class ``cls``,
    ``P = int phi(z) prod_{j != cls} P[X_j < p_cls + sigma z] dz`` with ``X_j = p_j + sigma v_j``
    (``|X_j| < |p_cls + sigma z|`` when folded). The integral is a trapezoid rule on ``n_grid``
    points of ``[-width, width]``. The clip at 1 of :func:`rnd_jax.defenses.output_noise` is ignored
    (it matters only when a non-``cls`` answer exceeds 1). ``probs: [..., K]``, ``cls: [...]``.
    """
    return _top1_integral(probs, cls, sigma, fold, False, n_grid, width)


def flip_probability(probs, sigma, fold: bool = False, n_grid: int = 2001, width: float = 9.0):
    """Exact probability that output noise changes the top-1 class (``1 - class_probability(top)``,
    integrated as ``int phi(z) (1 - prod ...) dz`` so that tiny probabilities keep their digits)."""
    top, _ = margins(probs)
    return _top1_integral(probs, top, sigma, fold, True, n_grid, width)


def sigma_for_union_flip(probs, k, iters: int = 200):
    """Largest ``sigma`` whose union bound :func:`flip_union_bound` is at most ``K`` (bisection).

    Guarantees ``P[top-1 flips] <= K``. ``NaN`` where no ``sigma > 0`` achieves it (ties at the
    top make the bound at least 1/2 per tied class).
    """
    xp = xp_of(probs, k)
    p = xp.asarray(probs)
    k = open_unit("K", k, "a misclassification probability")
    top, delta = margins(p)
    mask = xp.arange(p.shape[-1]) != top[..., None]
    big = xp.max(xp.where(mask, delta, 0.0), axis=-1)
    small = xp.min(xp.where(mask & (delta > 0), delta, xp.inf), axis=-1)
    lo = xp.log(xp.where(xp.isfinite(small), small, 1.0) * 1e-3)
    hi = xp.log(xp.maximum(big, 1e-30) * 1e6)

    def bound(log_sigma):
        terms = Phi(-delta / (math.sqrt(2.0) * xp.exp(log_sigma)[..., None]))
        return xp.sum(xp.where(mask, terms, 0.0), axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = bound(mid) <= k
        return xp.where(ok, mid, lo), xp.where(ok, hi, mid)

    if xp is np:
        for i in range(iters):
            lo, hi = body(i, (lo, hi))
    else:
        lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return xp.where(bound(lo) <= k, xp.exp(lo), xp.nan)


def fd_loss_bias(p_c, p_o, sigma):
    """``E[L(p + e)] - L(p)`` for ``L = log(p_c/p_o)``, ``e ~ N(0, sigma^2 I)``: ``(sigma^2/2)(1/p_o^2 - 1/p_c^2)``.

    Second-order Taylor expansion of each log (Sec. 5.2, corrected).
    """
    p_c = probability("p_c", p_c)
    p_o = probability("p_o", p_o)
    sigma = nonnegative("sigma", sigma)
    return 0.5 * sigma**2 * (1.0 / p_o**2 - 1.0 / p_c**2)


def fd_loss_bias_as_printed(p_c, p_o, sigma):
    """Sec. 5.2's per-point bias as printed: ``-(sigma^2/2)(sigma^2 + p_o^2 + p_c^2)/(p_c^2 p_o^2)``."""
    p_c = probability("p_c", p_c)
    p_o = probability("p_o", p_o)
    sigma = nonnegative("sigma", sigma)
    return -0.5 * sigma**2 * (sigma**2 + p_o**2 + p_c**2) / (p_c**2 * p_o**2)


def fd_bias(p_c, p_o, p_c2, p_o2, sigma, h):
    """``E[gamma_i] - g_i`` of the defended finite difference ``(L(d(p)) - L(d(p')))/(2h)`` (Sec. 5.2).

    ``(sigma^2/(4h)) [(1/p_o^2 - 1/p_c^2) - (1/p_o'^2 - 1/p_c'^2)]``; ``p`` at ``x + h e_i``, ``p'``
    at ``x - h e_i``.
    """
    h = positive("h", h, "the finite-difference step")
    return (fd_loss_bias(p_c, p_o, sigma) - fd_loss_bias(p_c2, p_o2, sigma)) / (2.0 * h)
