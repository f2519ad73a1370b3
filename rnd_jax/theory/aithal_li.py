"""Output noise vs NES: the closed forms of Aithal & Li (2022), corrected where their algebra slips.

M. B. Aithal and X. Li, "Mitigating Black-Box Adversarial Attacks via Output Noise Perturbation",
IEEE Access 10 (2022), Sec. III, IV-A and Appendices A-F.

Setting (Sec. III-B). Targeted NES minimises ``f(x) = -log F_t(x)`` with antithetic pairs
``x -/+ beta*u_j``; each pair contributes ``g_j = a*u_j`` (eq. 3) with the scalar factor

    a = (1/beta) log( F_t(x - beta u) / F_t(x + beta u) ).

The defender answers ``F(x) + v``, ``v ~ N(0, sigma^2 I)``, so the attacker computes ``A`` from
noisy answers. Throughout, ``f_minus = F_t(x - beta u)`` and ``f_plus = F_t(x + beta u)``.

Functions (vectorised; inputs broadcast; concrete invalid arguments raise ``ValueError``):

=======================================  ================================================
:func:`nes_factor`                       ``a`` (eq. 3 / 12 / 18)
:func:`sigma_z2`                         ``sigma_Z^2`` of Theorem 1 (eq. 4)
:func:`nes_factor_density`               density of ``A`` (eq. 17, corrected)
:func:`nes_factor_density_gaussian`      its Gaussian approximation ``N(a, sigma_Z^2/beta^2)``
:func:`nes_factor_density_exact`         exact density of ``A`` for Gaussian output noise
:func:`snr_nes`, :func:`snr_nes_bound`   Lemma 1 (eq. 5) and its bound ``2 L^2 beta^2/sigma^2``
:func:`prob_factor_negative`             ``P[A < 0]`` (Remark 2, Fig. 6, corrected)
:func:`prob_factor_flip_exact`           exact sign-flip probability of ``A``
:func:`query_ratio`                      ``R`` of Theorem 2 (eq. 6)
:func:`autozoom_factor_variance`         Theorem 3 (eq. 7) and :func:`autozoom_snr_bound`
:func:`repeated_queries`                 ``N`` of Theorem 4 (eq. 8)
:func:`lemma3_estimator`                 the estimator of Lemma 3 (eq. 57) and consistent ones
:func:`section_iva`                      Section IV-A's numbers recomputed from Table 1
=======================================  ================================================

Errata (each is demonstrated by a Monte-Carlo test in ``tests/test_theory.py``)
-------------------------------------------------------------------------------
1. **Eq. (17)** prints ``exp(-e^{2 beta (x-a)} / (2 sigma_Z^2))``: the mean 1 of ``Z`` is missing.
   With ``Z = e^{beta (A-a)} ~ N(1, sigma_Z^2)`` the exponent is ``-(e^{beta(x-a)} - 1)^2 /
   (2 sigma_Z^2)``. The printed function integrates to 1/2, not 1, and peaks near
   ``a + log(sigma_Z)/beta`` instead of ``a``.
2. **Remark 2** prints ``P[A < x] = P_Z[Z < e^{-beta(x-a)}]``; the exponent's sign is wrong:
   ``A < x  <=>  Z < e^{beta(x-a)}``, so ``P[A < 0] = Phi((e^{-beta a} - 1)/sigma_Z)``. The
   printed form gives ``P[A < 0] > 1/2`` for every ``a > 0`` and tends to 1 as ``sigma -> 0``.
3. **Theorem 2 / Appendix C** state the noisy learning rate as ``A = a + sqrt(SNR) v``, i.e.
   ``A ~ N(a, SNR)`` (eq. 36-37), so more SNR would mean more noise. Eq. (38), (39) and (6) are
   the solution for ``A ~ N(a, a^2/SNR)`` (consistent with Lemma 1's ``SNR = a^2/Var``); that is
   the model implemented and checked here.
4. **Section IV-A** prints SNRs of -66, -34, -106 dB at ``sigma = 0.01``. Eq. (5) with
   ``F_t(x - beta u) ~ F_t(x + beta u)`` is ``Delta F_t^2 / (2 sigma^2)``: -69.0, -37.0, -109.0 dB.
   The printed values are ``10 log10(Delta F_t^2/sigma^2)``, 3.01 dB (a factor 2) too high. The
   printed ``R`` values (9e6, 5e3, 9e10) do follow from eq. (5) and (6), so only the dB figures
   carry the slip (see :func:`section_iva`).
5. **Lemma 3 (eq. 57)** linearises the likelihood equation (59) to first order in ``w = log z``
   but keeps ``sigma_Z^2``, which is second order: the dropped ``(3/2) w^2`` term has mean
   ``(3/2) sigma_Z^2``. The estimator ``mean(y) - sigma_Z^2/beta`` is biased by
   ``-(3/2) sigma_Z^2/beta`` (``mean(y)`` alone by ``-sigma_Z^2/(2 beta)``), and Theorem 4's
   ``N`` inherits it: eq. (8) has no solution once ``sigma_Z^2 >= a beta``. That is why Fig. 3(b)
   finds "no realistic N" for larger ``sigma``. Equation (59) itself is a quadratic in
   ``e^{-beta a}`` and has the closed-form root of :func:`mle_estimator`, which is consistent;
   with it (or with :func:`debiased_mean_estimator`) the number of repeated queries is finite
   for every ``sigma``: :func:`repeated_queries_consistent`. Eq. (8) is also only a necessary
   (lower-bound) count, by the direction of Jensen's inequality in (62).

Minor: Appendix B says "replacing sigma_Z^2 with (3)" for (4); Lemma 1's bound
``2 L^2 beta^2/sigma^2`` holds for ``||u|| = 1`` and ``F_t(x - beta u) ~ F_t(x + beta u)`` (in
general the factor ``F_-^2/(F_-^2 + F_+^2)`` can exceed 1/2, up to a bound of ``4 L^2 beta^2/
sigma^2``); Fig. 3(b)'s caption reads ``P[a_hat < 0.3] < 0.3`` for ``P[a_hat < 0] < 0.3``.
"""

from __future__ import annotations

import math

import numpy as np

from rnd_jax.theory._util import (Phi, Phi_inv, check, db, erf, nonnegative, open_unit, positive, probability, real,
                                  xp_of)

__all__ = [
    "PRINTED_SECTION_IVA",
    "TABLE1",
    "autozoom_factor_variance",
    "autozoom_snr_bound",
    "debiased_mean_estimator",
    "lemma3_estimator",
    "mle_estimator",
    "nes_factor",
    "nes_factor_density",
    "nes_factor_density_as_printed",
    "nes_factor_density_exact",
    "nes_factor_density_gaussian",
    "output_snr",
    "prob_factor_flip",
    "prob_factor_flip_exact",
    "prob_factor_negative",
    "prob_factor_negative_as_printed",
    "query_ratio",
    "ratio_density",
    "ratio_of_means_estimator",
    "repeated_queries",
    "repeated_queries_consistent",
    "section_iva",
    "sigma_z2",
    "snr_nes",
    "snr_nes_bound",
    "theorem2_iterations",
]

_SQRT2PI = math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------- Theorem 1


def nes_factor(f_minus, f_plus, beta):
    """``a = log(F_t(x - beta u) / F_t(x + beta u)) / beta`` — the NES factor (eq. 3, 12, 18)."""
    xp = xp_of(f_minus, f_plus, beta)
    f_minus = probability("f_minus", f_minus, "a softmax output, inside a log")
    f_plus = probability("f_plus", f_plus, "a softmax output, inside a log")
    beta = positive("beta", beta, "the NES search variance")
    return (xp.log(f_minus) - xp.log(f_plus)) / beta


def sigma_z2(sigma, f_minus, f_plus):
    """Variance of ``Z`` in ``A = a + log(Z)/beta`` (Theorem 1, eq. 4).

    ``sigma_Z^2 = sigma^2/F_t(x - beta u)^2 + sigma^2/F_t(x + beta u)^2``: the first-order (delta
    method) variance of ``Z = (1 + v_1/F_-)/(1 + v_2/F_+)``, valid while ``sigma << F_t``.
    """
    sigma = nonnegative("sigma", sigma, "a noise standard deviation")
    f_minus = probability("f_minus", f_minus, "a softmax output")
    f_plus = probability("f_plus", f_plus, "a softmax output")
    return (sigma / f_minus) ** 2 + (sigma / f_plus) ** 2


def nes_factor_density(x, a, sigma_z, beta):
    """Density of ``A = a + log(Z)/beta`` with ``Z ~ N(1, sigma_Z^2)`` (eq. 17, corrected).

    ``p_A(x) = beta e^{beta(x-a)} phi((e^{beta(x-a)} - 1)/sigma_Z) / sigma_Z``. It integrates to
    ``P[Z > 0] = Phi(1/sigma_Z)`` (``A`` is undefined where ``Z <= 0``). The paper prints the
    exponent without the ``- 1`` (erratum 1 of the module docstring); see
    :func:`nes_factor_density_as_printed`.
    """
    xp = xp_of(x, a, sigma_z, beta)
    x, a = real("x", x), real("a", a)
    sigma_z = positive("sigma_z", sigma_z, "the density divides by it")
    beta = positive("beta", beta)
    w = xp.exp(beta * (x - a))
    return beta * w * xp.exp(-0.5 * ((w - 1.0) / sigma_z) ** 2) / (_SQRT2PI * sigma_z)


def nes_factor_density_as_printed(x, a, sigma_z, beta):
    """Eq. (17) exactly as printed, ``beta e^{beta(x-a)} exp(-e^{2 beta(x-a)}/(2 sigma_Z^2)) /
    (sqrt(2 pi) sigma_Z)`` — kept only to show that it is not a density of ``A`` (mass 1/2)."""
    xp = xp_of(x, a, sigma_z, beta)
    x, a = real("x", x), real("a", a)
    sigma_z = positive("sigma_z", sigma_z, "the density divides by it")
    beta = positive("beta", beta)
    w = xp.exp(beta * (x - a))
    return beta * w * xp.exp(-0.5 * (w / sigma_z) ** 2) / (_SQRT2PI * sigma_z)


def nes_factor_density_gaussian(x, a, sigma_z, beta):
    """Gaussian approximation of Theorem 1: ``A ~ N(a, sigma_Z^2 / beta^2)``."""
    xp = xp_of(x, a, sigma_z, beta)
    x, a = real("x", x), real("a", a)
    sigma_z = positive("sigma_z", sigma_z, "the density divides by it")
    beta = positive("beta", beta)
    s = sigma_z / beta
    return xp.exp(-0.5 * ((x - a) / s) ** 2) / (_SQRT2PI * s)


def ratio_density(w, m1, s1, m2, s2):
    """Density of ``W = X_1/X_2`` for independent ``X_i ~ N(m_i, s_i^2)`` (Hinkley 1969).

    Written with ``b^2 - c a^2 = -(m_1 - m_2 w)^2/(s_1^2 s_2^2)`` so the large exponents of the
    small-noise regime cancel analytically instead of numerically.
    """
    xp = xp_of(w, m1, s1, m2, s2)
    w, m1, m2 = real("w", w), real("m1", m1), real("m2", m2)
    s1 = positive("s1", s1, "a standard deviation")
    s2 = positive("s2", s2, "a standard deviation")
    a2 = w**2 / s1**2 + 1.0 / s2**2
    a = xp.sqrt(a2)
    b = m1 * w / s1**2 + m2 / s2**2
    c = m1**2 / s1**2 + m2**2 / s2**2
    d = xp.exp(-((m1 - m2 * w) ** 2) / (2.0 * s1**2 * s2**2 * a2))
    main = b * d / (a**3 * _SQRT2PI * s1 * s2) * erf(b / (a * math.sqrt(2.0)))
    tail = xp.exp(-0.5 * c) / (a2 * math.pi * s1 * s2)
    return main + tail


def nes_factor_density_exact(x, f_minus, f_plus, sigma, beta, fold: bool = True):
    """Exact density of ``A = log(X_1/X_2)/beta``, ``X_1 ~ N(F_-, sigma^2)``, ``X_2 ~ N(F_+, sigma^2)``.

    No small-noise approximation: ``X_1/X_2`` is a ratio of independent normals
    (:func:`ratio_density`). With ``fold=True`` the answers are ``|F + sigma v|`` (the paper's and
    this codebase's post-processing, :func:`rnd_jax.defenses.output_noise`; the clip at 1 is
    ignored), so ``e^{beta A} = |X_1/X_2|`` and the density folds both signs of the ratio; it then
    integrates to 1. With ``fold=False`` only ``X_1/X_2 > 0`` defines ``A`` (mass < 1).
    """
    xp = xp_of(x, f_minus, f_plus, sigma, beta)
    x = real("x", x)
    f_minus = probability("f_minus", f_minus)
    f_plus = probability("f_plus", f_plus)
    sigma = positive("sigma", sigma, "the density divides by it")
    beta = positive("beta", beta)
    w = xp.exp(beta * x)
    dens = ratio_density(w, f_minus, sigma, f_plus, sigma)
    if fold:
        dens = dens + ratio_density(-w, f_minus, sigma, f_plus, sigma)
    return beta * w * dens


# ----------------------------------------------------------------------------- Lemma 1, Remark 2


def snr_nes(sigma, f_minus, f_plus):
    """SNR of the noisy NES factor (Lemma 1, eq. 5): ``a^2 / E[(A - a)^2]`` for small beta, sigma.

    ``SNR = (F_- - F_+)^2 F_-^2 / (sigma^2 (F_-^2 + F_+^2))``; ``~ Delta F_t^2 / (2 sigma^2)``
    when ``F_- ~ F_+``. Linear scale; :func:`rnd_jax.theory.db` converts to dB.
    """
    sigma = positive("sigma", sigma, "the SNR divides by sigma^2")
    f_minus = probability("f_minus", f_minus)
    f_plus = probability("f_plus", f_plus)
    # = ((F_- - F_+)/sigma)^2 / (1 + (F_+/F_-)^2): no fourth powers of tiny probabilities.
    return ((f_minus - f_plus) / sigma) ** 2 / (1.0 + (f_plus / f_minus) ** 2)


def snr_nes_bound(lipschitz, beta, sigma):
    """Lemma 1's bound ``SNR <= 2 L^2 beta^2 / sigma^2`` (eq. 5, for ``||u|| = 1``, ``F_- ~ F_+``)."""
    lipschitz = nonnegative("lipschitz", lipschitz, "a Lipschitz constant")
    beta = positive("beta", beta)
    sigma = positive("sigma", sigma, "the bound divides by sigma^2")
    return 2.0 * lipschitz**2 * beta**2 / sigma**2


def prob_factor_negative(a, sigma_z, beta):
    """``P[A < 0] = P[Z < e^{-beta a}] = Phi((e^{-beta a} - 1)/sigma_Z)`` (Remark 2, Fig. 6).

    Under Theorem 1's model ``Z ~ N(1, sigma_Z^2)`` (``Z <= 0`` counts as ``A = -inf``). For
    ``a > 0`` this is the probability that the noise reverses the descent direction. The paper's
    printed CDF has the exponent's sign flipped (erratum 2): :func:`prob_factor_negative_as_printed`.
    """
    xp = xp_of(a, sigma_z, beta)
    a = real("a", a)
    sigma_z = positive("sigma_z", sigma_z, "the probability divides by it")
    beta = positive("beta", beta)
    return Phi(xp.expm1(-beta * a) / sigma_z)


def prob_factor_negative_as_printed(a, sigma_z, beta):
    """Remark 2's printed ``P_A[A < x] = P_Z[Z < e^{-beta(x-a)}]`` at ``x = 0``: ``Phi((e^{beta a}-1)/sigma_Z)``."""
    xp = xp_of(a, sigma_z, beta)
    a = real("a", a)
    sigma_z = positive("sigma_z", sigma_z, "the probability divides by it")
    beta = positive("beta", beta)
    return Phi(xp.expm1(beta * a) / sigma_z)


def prob_factor_flip(a, sigma_z, beta):
    """``P[sign(A) != sign(a)]`` under Theorem 1's model: :func:`prob_factor_negative` for
    ``a > 0`` and ``P[A > 0]`` for ``a < 0`` (``Phi(-|e^{-beta a} - 1|/sigma_Z)``)."""
    xp = xp_of(a, sigma_z, beta)
    a = real("a", a)
    sigma_z = positive("sigma_z", sigma_z, "the probability divides by it")
    beta = positive("beta", beta)
    return Phi(-xp.abs(xp.expm1(-beta * a)) / sigma_z)


def prob_factor_flip_exact(f_minus, f_plus, sigma):
    """Exact ``P[sign(A) != sign(a)]`` for answers ``|F + sigma v|`` (no small-noise approximation).

    ``A < 0  <=>  |X_1| < |X_2|  <=>  (X_1 - X_2)(X_1 + X_2) < 0``, and for equal variances
    ``D = X_1 - X_2 ~ N(F_- - F_+, 2 sigma^2)`` and ``S = X_1 + X_2 ~ N(F_- + F_+, 2 sigma^2)`` are
    independent, so with ``d = |F_- - F_+|/(sqrt 2 sigma)`` and ``s = (F_- + F_+)/(sqrt 2 sigma)``:
    ``P = Phi(-d) Phi(s) + Phi(d) Phi(-s)``. For ``a > 0`` this is ``P[A < 0]``. (Exact for the
    absolute-value post-processing of :func:`rnd_jax.defenses.output_noise` except for its clip at 1.)
    """
    xp = xp_of(f_minus, f_plus, sigma)
    f_minus = probability("f_minus", f_minus)
    f_plus = probability("f_plus", f_plus)
    sigma = positive("sigma", sigma, "the probability divides by it")
    d = xp.abs(f_minus - f_plus) / (math.sqrt(2.0) * sigma)
    s = (f_minus + f_plus) / (math.sqrt(2.0) * sigma)
    return Phi(-d) * Phi(s) + Phi(d) * Phi(-s)


# ----------------------------------------------------------------------------- Theorem 2


def _theorem2_args(snr, a, lam, eta, v0, eps):
    snr = positive("snr", snr, "a signal-to-noise power ratio; R divides by it")
    a = positive("a", a, "the noiseless learning rate")
    lam = positive("lam", lam, "lambda, minus the largest eigenvalue in (28)")
    v0 = positive("v0", v0, "the initial distance")
    eta = nonnegative("eta", eta, "the target distance")
    eps = open_unit("eps", eps, "a tail probability in (36)")
    ratio = eta / v0
    check("eta/v0", ratio, lo=0.0, hi=1.0, lo_open=False, what="the target must be closer than the start")
    return snr, a, lam, ratio, eps


def query_ratio(snr, a=0.1, lam=2.0, eta=0.01, v0=1.0, eps=0.01):
    """Query-count ratio ``R`` of Theorem 2 (eq. 6): noisy over noiseless iterations.

    ``R = (sqrt(K^2 + 4) - K)^2 / 4``, ``K = Phi^{-1}(eps) sqrt(a lam) / sqrt(SNR (1 - eta/v0))``,
    evaluated as ``4 / (sqrt(K^2 + 4) + K)^2`` when ``K > 0`` (no cancellation for either sign). The
    noisy rate is modelled as ``A ~ N(a, a^2/SNR)`` (erratum 3: the text's ``N(a, SNR)`` does not
    give eq. 6). Defaults are Section IV-A's ``a = 0.1, lambda = 2, eta = eps = 0.01, v0 = 1``.
    For small SNR, ``R ~ Phi^{-1}(eps)^2 a lam / ((1 - eta/v0) SNR)``.
    """
    xp = xp_of(snr, a, lam, eta, v0, eps)
    snr, a, lam, ratio, eps = _theorem2_args(snr, a, lam, eta, v0, eps)
    k = Phi_inv(eps) * xp.sqrt(a * lam) / xp.sqrt(snr * (1.0 - ratio))
    root = xp.sqrt(k**2 + 4.0)
    # Two algebraically equal forms; each avoids the cancellation of the other's sign of K.
    return xp.where(k < 0, (root - k) ** 2 / 4.0, 4.0 / (root + k) ** 2)


def theorem2_iterations(snr, a=0.1, lam=2.0, eta=0.01, v0=1.0, eps=0.01):
    """``(N_a, N_A)``: iterations without noise (eq. 30) and with ``A ~ N(a, a^2/SNR)`` (eq. 38).

    ``N_a = c/a`` with ``c = (1 - eta/v0)/lam``; ``N_A`` is the smallest (real) ``n`` with
    ``P[sum_{i<n} A_i < c] <= eps`` (eq. 36), ``N_A = R N_a``.
    """
    snr, a, lam, ratio, eps = _theorem2_args(snr, a, lam, eta, v0, eps)
    c = (1.0 - ratio) / lam
    n_clean = c / a
    return n_clean, n_clean * query_ratio(snr, a, lam, eta, v0, eps)


# ----------------------------------------------------------------------------- Theorem 3 (AutoZOOM)


def autozoom_factor_variance(sigma, beta, fmax_x, fmax_xu, ft_x, ft_xu):
    """Variance of the noisy AutoZOOM factor ``A`` (Theorem 3, eq. 7), small noise.

    ``Var A = (sigma^2/beta^2) (1/F_max(x)^2 + 1/F_max(x+beta u)^2 + 1/F_t(x)^2 + 1/F_t(x+beta u)^2)``
    for the C&W loss ``log(F_max/F_t)`` and the one-sided estimator ``(f(x + beta u) - f(x))/beta``.
    """
    sigma = nonnegative("sigma", sigma)
    beta = positive("beta", beta)
    terms = [probability(n, v) for n, v in
             (("fmax_x", fmax_x), ("fmax_xu", fmax_xu), ("ft_x", ft_x), ("ft_xu", ft_xu))]
    return sigma**2 / beta**2 * sum(1.0 / t**2 for t in terms)


def autozoom_snr_bound(lipschitz, beta, sigma):
    """Theorem 3's bound ``SNR <= L^2 beta^2 / (2 sigma^2)`` (``L`` for the vector ``F``, ``||u|| = 1``)."""
    lipschitz = nonnegative("lipschitz", lipschitz)
    beta = positive("beta", beta)
    sigma = positive("sigma", sigma, "the bound divides by sigma^2")
    return lipschitz**2 * beta**2 / (2.0 * sigma**2)


# ----------------------------------------------------------------------------- Theorem 4, Lemma 3


def _repeated_args(a, beta, eps):
    a = positive("a", a, "Theorem 4 assumes a > 0")
    beta = positive("beta", beta)
    eps = open_unit("eps", eps, "a tail probability")
    check("eps", eps, lo=0.0, hi=0.5, what="P[a_hat < 0] < eps is only a constraint for eps < 1/2")
    return a, beta, eps


def repeated_queries(sigma, f_t, a, beta, eps):
    """Repeated queries ``N`` of Theorem 4 (eq. 8), with ``sigma_Z^2 = 2 sigma^2/F_t^2`` (eq. 56).

    ``N = sigma_Z^2 (Phi^{-1}(eps) / (e^{sigma_Z^2 - a beta} - 1))^2``, returned as ``inf`` where
    ``sigma_Z^2 >= a beta``: then the biased estimator (57) is negative more often than not and no
    ``N`` meets ``P[a_hat < 0] < eps``. A necessary count for estimator (57) only (erratum 5);
    compare :func:`repeated_queries_consistent`.
    """
    xp = xp_of(sigma, f_t, a, beta, eps)
    sigma = positive("sigma", sigma, "the noise standard deviation")
    f_t = probability("f_t", f_t)
    a, beta, eps = _repeated_args(a, beta, eps)
    s2 = 2.0 * sigma**2 / f_t**2
    with np.errstate(divide="ignore", over="ignore"):
        gap = xp.expm1(s2 - a * beta)
        n = s2 * (Phi_inv(eps) / gap) ** 2
    return xp.where(gap < 0, n, xp.inf)


def repeated_queries_consistent(var_z, a, beta, eps):
    """Repeated queries for a consistent estimator of ``a`` (:func:`debiased_mean_estimator` or
    :func:`mle_estimator`): ``N = (Phi^{-1}(eps) sigma_Z / (a beta))^2``.

    Such an estimator is ``~ N(a, sigma_Z^2/(N beta^2))``, so ``P[a_hat < 0] = eps`` at this
    ``N``. Finite for every noise level (to first order in ``sigma_Z^2``).
    """
    s2 = nonnegative("var_z", var_z, "a variance")
    a, beta, eps = _repeated_args(a, beta, eps)
    return Phi_inv(eps) ** 2 * s2 / (a * beta) ** 2


def lemma3_estimator(y, var_z, beta, axis=-1):
    """Lemma 3's estimator ``a_hat = mean(y) - sigma_Z^2/beta`` (eq. 57), as printed.

    Biased by ``-(3/2) sigma_Z^2/beta`` to first order (erratum 5); kept for comparison.
    """
    xp = xp_of(y, var_z, beta)
    s2 = nonnegative("var_z", var_z)
    beta = positive("beta", beta)
    return xp.mean(xp.asarray(y), axis=axis) - s2 / beta


def debiased_mean_estimator(y, var_z, beta, axis=-1):
    """``mean(y) + sigma_Z^2/(2 beta)``: removes ``E[log z] = -sigma_Z^2/2 + O(sigma_Z^4)``."""
    xp = xp_of(y, var_z, beta)
    s2 = nonnegative("var_z", var_z)
    beta = positive("beta", beta)
    return xp.mean(xp.asarray(y), axis=axis) + s2 / (2.0 * beta)


def mle_estimator(y, var_z, beta, axis=-1):
    """Exact root of the likelihood equation (59) of Lemma 3: the maximum-likelihood ``a_hat``.

    With ``s_n = e^{beta y_n}`` and ``t = e^{-beta a}``, (59) reads
    ``t^2 sum s_n^2 - t sum s_n - N sigma_Z^2 = 0``; its positive root gives
    ``a_hat = -log(t)/beta``. Consistent (``t -> e^{-beta a}`` as ``N -> inf``), unlike eq. (57).
    """
    xp = xp_of(y, var_z, beta)
    s2 = positive("var_z", var_z, "the likelihood of Theorem 1's model needs sigma_Z > 0")
    beta = positive("beta", beta)
    y = xp.asarray(y)
    by = beta * y
    m = xp.max(by, axis=axis, keepdims=True)
    s = xp.exp(by - m)
    n = y.shape[axis]
    s1 = xp.sum(s, axis=axis)
    s2sum = xp.sum(s * s, axis=axis)
    t = (s1 + xp.sqrt(s1**2 + 4.0 * s2sum * n * s2)) / (2.0 * s2sum)
    return (xp.squeeze(m, axis=axis) - xp.log(t)) / beta


def ratio_of_means_estimator(f1, f2, beta, axis=-1):
    """Remark 6's second estimator ``log(mean F_1 / mean F_2)/beta`` (eq. 63-65), consistent."""
    xp = xp_of(f1, f2, beta)
    beta = positive("beta", beta)
    m1 = xp.mean(xp.asarray(f1), axis=axis)
    m2 = xp.mean(xp.asarray(f2), axis=axis)
    return xp.log(m1 / m2) / beta


# ----------------------------------------------------------------------------- Fig. 2(b), Section IV-A


def output_snr(mean_sq_norm, sigma, num_classes):
    """SNR of the noisy outputs ``F(x) + v`` (Fig. 2(b), "Output"): ``E||F||^2 / (K sigma^2)``."""
    mean_sq_norm = nonnegative("mean_sq_norm", mean_sq_norm)
    sigma = positive("sigma", sigma, "the SNR divides by sigma^2")
    k = check("num_classes", num_classes, lo=1.0, lo_open=False)
    return mean_sq_norm / (k * sigma**2)


TABLE1 = {
    "MNIST": dict(acc=0.99, mean_ft=4e-4, beta=1e-3, mean_dF=5e-6, median_dF=1e-21, std_dF=1e-4),
    "CIFAR10": dict(acc=0.83, mean_ft=1e-3, beta=1e-3, mean_dF=2e-4, median_dF=3e-8, std_dF=1e-3),
    "IMAGENET": dict(acc=0.78, mean_ft=3e-4, beta=1e-5, mean_dF=5e-8, median_dF=4e-9, std_dF=1e-6),
}
"""Aithal & Li (2022), Table 1: output statistics of their three models (no noise)."""

PRINTED_SECTION_IVA = {
    "MNIST": dict(snr_db=-66.0, R=9e6),
    "CIFAR10": dict(snr_db=-34.0, R=5e3),
    "IMAGENET": dict(snr_db=-106.0, R=9e10),
}
"""Section IV-A's printed values at ``sigma = 0.01``: SNR of ``A`` (dB) and ``R`` (eq. 6)."""


def _one_significant(x: float) -> float:
    return float(f"{x:.0e}")


def section_iva(sigma=0.01, a=0.1, lam=2.0, eta=0.01, v0=1.0, eps=0.01, table=None):
    """Recompute Section IV-A's SNR (Lemma 1) and ``R`` (Theorem 2) from Table 1's statistics.

    As in the paper, ``Delta F_t`` is Table 1's mean and ``F_t(x - beta u) ~ F_t(x + beta u)``, so
    eq. (5) is ``Delta F_t^2/(2 sigma^2)``. Returns one dict per model with the recomputed SNR
    (linear and dB), the printed dB, the dB value of ``Delta F_t^2/sigma^2`` (what was printed),
    ``R`` from eq. (5)+(6) (and rounded to the printed one significant digit), the printed ``R``,
    and ``R`` had the printed SNR been used.
    """
    sigma = positive("sigma", sigma)
    rows = []
    for name, t in (table or TABLE1).items():
        d_f = t["mean_dF"]
        snr = float(d_f**2 / (2.0 * float(sigma) ** 2))
        snr_no_half = float(d_f**2 / float(sigma) ** 2)
        r = float(query_ratio(snr, a, lam, eta, v0, eps))
        printed = PRINTED_SECTION_IVA.get(name, {})
        row = dict(model=name, sigma=float(sigma), mean_ft=t["mean_ft"], beta=t["beta"], mean_dF=d_f,
                   snr=snr, snr_db=float(db(snr)), snr_db_without_half=float(db(snr_no_half)),
                   R=r, R_rounded=_one_significant(r),
                   R_if_printed_snr=float(query_ratio(snr_no_half, a, lam, eta, v0, eps)))
        if printed:
            row.update(snr_db_printed=printed["snr_db"], R_printed=printed["R"],
                       snr_db_error=printed["snr_db"] - row["snr_db"],
                       R_matches=row["R_rounded"] == printed["R"])
        rows.append(row)
    return rows
