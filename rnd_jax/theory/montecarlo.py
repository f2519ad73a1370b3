"""Monte-Carlo simulators of the closed forms' own assumptions (pure functions of a PRNG key).

Each simulator draws exactly the random variables a theorem is about — nothing more, nothing less —
so comparing its sample statistics with the closed form checks the algebra, not the modelling.
:func:`mean_se` and :func:`prob_se` turn samples into an estimate and its standard error (float64
numpy), from which the tests derive their tolerances.

=====================================  ==============================================================
simulator                              assumption of
=====================================  ==============================================================
:func:`nes_factor_samples`             Aithal & Li Theorem 1 / Lemma 1 (Gaussian output noise)
:func:`theorem1_samples`               Theorem 1's model ``A = a + log(Z)/beta``, ``Z ~ N(1, s^2)``
:func:`autozoom_factor_samples`        Theorem 3 (C&W loss, one-sided estimator)
:func:`learning_rate_sums`             Theorem 2, eq. (36): sums of i.i.d. ``N(a, var)`` rates
:func:`repeated_factor_samples`        Theorem 4 / Lemma 3: ``N`` repeated queries of one pair
:func:`noisy_top1`                     Park Sec. 5.1: top-1 of ``p + sigma v`` (or ``|p + sigma v|``)
:func:`log_ratio_samples`              Park Sec. 5.2: ``log((p_c + e_c)/(p_o + e_o))``
:func:`rnd_linear_samples`             Qin Theorems 1-3 for a linear ``f``
:func:`rfd_linear_samples`             Randomized feature defense Theorem 1 for ``L = w.(W x)``
=====================================  ==============================================================
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "autozoom_factor_samples",
    "learning_rate_sums",
    "log_ratio_samples",
    "mean_se",
    "nes_factor_samples",
    "noisy_top1",
    "prob_se",
    "repeated_factor_samples",
    "rfd_linear_samples",
    "rnd_linear_samples",
    "standard_normal",
    "theorem1_samples",
]


_BLOCK = 1 << 17


def standard_normal(key, shape) -> jax.Array:
    """``N(0, 1)`` samples of ``shape`` (float32), drawn in fixed blocks of 2^17 from
    ``fold_in(key, block)``: every shape reuses one compiled sampler."""
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    blocks = [jax.random.normal(jax.random.fold_in(key, i), (_BLOCK,)) for i in range(-(-size // _BLOCK))]
    return jnp.concatenate(blocks)[:size].reshape(shape)


def mean_se(samples, axis=None):
    """``(mean, standard error)`` in float64, ignoring NaNs."""
    x = np.asarray(samples, np.float64)
    n = np.sum(~np.isnan(x), axis=axis)
    return np.nanmean(x, axis=axis), np.nanstd(x, axis=axis, ddof=1) / np.sqrt(n)


def prob_se(indicator, axis=None):
    """``(frequency, binomial standard error)`` of a boolean sample."""
    x = np.asarray(indicator, np.float64)
    n = x.size if axis is None else x.shape[axis]
    p = x.mean(axis=axis)
    return p, np.sqrt(np.maximum(p * (1 - p), 1e-300) / n)


def nes_factor_samples(key, n, f_minus, f_plus, sigma, beta, fold: bool = False):
    """``A = log(X_1/X_2)/beta`` with ``X_1 = F_- + sigma v_1``, ``X_2 = F_+ + sigma v_2`` (eq. 13-14).

    ``fold=True`` uses ``|X_i|`` (the absolute-value post-processing); otherwise a negative ratio
    gives NaN (``A`` undefined).
    """
    k1, k2 = jax.random.split(key)
    x1 = f_minus + sigma * standard_normal(k1, (n,))
    x2 = f_plus + sigma * standard_normal(k2, (n,))
    if fold:
        x1, x2 = jnp.abs(x1), jnp.abs(x2)
    return jnp.log(x1 / x2) / beta


def theorem1_samples(key, n, a, sigma_z, beta):
    """``A = a + log(Z)/beta`` with ``Z ~ N(1, sigma_Z^2)`` (Theorem 1's model; NaN where ``Z <= 0``)."""
    z = 1.0 + sigma_z * standard_normal(key, (n,))
    return a + jnp.log(z) / beta


def autozoom_factor_samples(key, n, fmax_x, fmax_xu, ft_x, ft_xu, sigma, beta):
    """Noisy AutoZOOM factor ``A = (f(x + beta u) - f(x))/beta``, ``f = log(F_max/F_t)`` (eq. 42-44).

    The noise enters the four answers independently; the index of the maximum is held fixed
    (Remark 5's small-noise assumption).
    """
    v = sigma * standard_normal(key, (4, n))
    f_xu = jnp.log((fmax_xu + v[0]) / (ft_xu + v[1]))
    f_x = jnp.log((fmax_x + v[2]) / (ft_x + v[3]))
    return (f_xu - f_x) / beta


def learning_rate_sums(key, n_paths, n_steps, a, var):
    """``sum_{i < n_steps} A_i`` for ``n_paths`` independent paths, ``A_i ~ N(a, var)`` i.i.d."""
    steps = a + jnp.sqrt(var) * standard_normal(key, (n_paths, n_steps))
    return jnp.sum(steps, axis=1)


def repeated_factor_samples(key, n_trials, n_repeats, a, var_z, beta):
    """``y_n = a + log(z_n)/beta`` (eq. 55), ``z_n ~ N(1, var_z)``: ``f32[n_trials, n_repeats]``."""
    z = 1.0 + jnp.sqrt(var_z) * standard_normal(key, (n_trials, n_repeats))
    return a + jnp.log(z) / beta


def noisy_top1(key, n, probs, sigma, fold: bool = False):
    """Top-1 class of ``p + sigma v`` (``|p + sigma v|`` if ``fold``) for ``n`` draws: ``i32[n]``."""
    p = jnp.asarray(probs)
    noisy = p + sigma * standard_normal(key, (n, p.shape[-1]))
    if fold:
        noisy = jnp.abs(noisy)
    return jnp.argmax(noisy, axis=-1)


def log_ratio_samples(key, n, p_c, p_o, sigma):
    """``log((p_c + e_c)/(p_o + e_o))``, ``e ~ N(0, sigma^2)`` i.i.d. (the untargeted loss of Sec. 5.2)."""
    e = sigma * standard_normal(key, (2, n))
    return jnp.log((p_c + e[0]) / (p_o + e[1]))


def rnd_linear_samples(key, n, c, mu, nu, m: int = 1):
    """RND against ``f(x) = c.x``: ``(h_mu, h_nu, g)`` for ``n`` probes, EOT over ``m`` queries.

    ``h_mu = f(x + mu u) - f(x)``; ``h_nu`` the same with ``m``-averaged defense noise at both
    points (eq. 13 / 15); ``g = h_nu/mu * u`` the estimator ``f32[n, d]``.
    """
    c = jnp.asarray(c)
    d = c.shape[0]
    ku, k1, k2 = jax.random.split(key, 3)
    u = standard_normal(ku, (n, d))
    v1 = jnp.mean(standard_normal(k1, (n, m, d)), axis=1)
    v2 = jnp.mean(standard_normal(k2, (n, m, d)), axis=1)
    h_mu = mu * (u @ c)
    h_nu = (mu * u + nu * v1 - nu * v2) @ c
    return h_mu, h_nu, (h_nu / mu)[:, None] * u


def rfd_linear_samples(key, n, w_in, w_out, mu, nu):
    """Feature noise against ``L(x) = w_out . (W_in x)`` (``h = W_in x``): clean and noisy differences.

    ``u ~ N(0, mu^2 I)``; ``delta_1, delta_2 ~ N(0, nu^2 I)`` at ``h``. Returns
    ``(L(x+u) - L(x), L_rand(x+u) - L_rand(x))``; their signs differ with probability eq. (26),
    ``grad_x L = W_in^T w_out``, ``grad_h L = w_out``.
    """
    w_in, w_out = jnp.asarray(w_in), jnp.asarray(w_out)
    ku, k1, k2 = jax.random.split(key, 3)
    u = mu * standard_normal(ku, (n, w_in.shape[1]))
    d1 = nu * standard_normal(k1, (n, w_in.shape[0]))
    d2 = nu * standard_normal(k2, (n, w_in.shape[0]))
    clean = (u @ w_in.T) @ w_out
    noisy = (u @ w_in.T + d1 - d2) @ w_out
    return clean, noisy
