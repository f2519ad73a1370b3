"""Every closed form of rnd_jax.theory against a Monte-Carlo simulation of its own assumptions.

Tolerances are ``Z`` standard errors of the Monte-Carlo estimate (fixed keys, no seed search),
plus, where a closed form is itself a small-noise approximation, a stated bound on the neglected
order. Each erratum is shown twice: the corrected form agrees with the simulation, the printed one
misses it by many standard errors.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from rnd_jax import models
from rnd_jax.theory import aithal_li as al
from rnd_jax.theory import db, montecarlo as mc, park, qin, rfd

Z = 4.0  # standard errors allowed between a closed form and its Monte-Carlo estimate


def key(i):
    return jax.random.key(1000 + i)


def f64(x):
    return np.asarray(x, np.float64)


def close(estimate, se, truth, extra=0.0):
    """|estimate - truth| within Z standard errors (+ a stated approximation bound)."""
    return abs(float(estimate) - float(truth)) <= Z * float(se) + extra


def var_se(x):
    """Sample variance and its standard error (from the fourth central moment)."""
    x = f64(x)
    d = x - x.mean()
    v = np.mean(d**2)
    return v, math.sqrt(max(np.mean(d**4) - v**2, 0.0) / len(x))


def bin_check(samples, density, edges, points_per_bin=200):
    """Max over bins of |empirical mass - integrated density| / binomial standard error."""
    samples = f64(samples)
    samples = samples[np.isfinite(samples)]
    n = len(samples)
    counts, _ = np.histogram(samples, edges)
    worst = 0.0
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        g = np.linspace(lo, hi, points_per_bin)
        vals = f64(density(g))
        p = float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(g)))
        se = math.sqrt(max(p * (1 - p), 1.0 / n) / n)
        worst = max(worst, abs(c / n - p) / se)
    return worst


# ----------------------------------------------------------------------------- Aithal & Li, Theorem 1


def test_sigma_z2_is_the_variance_of_the_noise_ratio():
    fm, fp, sigma, n = 0.02, 0.018, 2e-4, 100_000
    k1, k2 = jax.random.split(key(0))
    z = (1 + sigma * mc.standard_normal(k1, (n,)) / fm) / (1 + sigma * mc.standard_normal(k2, (n,)) / fp)
    v, se = var_se(z)
    s2 = float(al.sigma_z2(sigma, fm, fp))
    # Neglected order: relative O(3 sigma_Z^2) ~ 1e-4, far below the 4-SE tolerance (~1%).
    assert close(v, se, s2, extra=3 * s2**2)


def test_eq17_corrected_density_matches_theorem1_samples_and_printed_one_does_not():
    a, sz, beta, n = 2.0, 0.2, 1e-3, 100_000
    samples = mc.theorem1_samples(key(1), n, a, sz, beta)
    lo, hi = np.nanquantile(f64(samples), [0.005, 0.995])
    edges = np.linspace(lo, hi, 31)
    assert bin_check(samples, lambda x: al.nes_factor_density(x, a, sz, beta), edges) < 4.5
    assert bin_check(samples, lambda x: al.nes_factor_density_as_printed(x, a, sz, beta), edges) > 50
    # Mass: corrected P[Z > 0] = Phi(1/sZ); printed 1/2 (it is a half-normal in e^{beta(x-a)}).
    grid = np.linspace(a - 15 / beta, a + 5 * sz / beta, 400_001)  # z = e^{beta(x-a)} from e^-15
    for fn, mass in ((al.nes_factor_density, sps.norm.cdf(1 / sz)), (al.nes_factor_density_as_printed, 0.5)):
        vals = f64(fn(grid, a, sz, beta))
        assert abs(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(grid)) - mass) < 2e-3


def test_exact_density_holds_without_the_small_noise_assumption():
    """sigma/F_t = 0.4: the Gaussian approximation fails, the ratio-of-normals density does not."""
    fm, fp, sigma, beta, n = 0.012, 0.010, 0.004, 1e-3, 100_000
    samples = mc.nes_factor_samples(key(2), n, fm, fp, sigma, beta, fold=True)
    lo, hi = np.quantile(f64(samples), [0.005, 0.995])
    edges = np.linspace(lo, hi, 31)
    assert bin_check(samples, lambda x: al.nes_factor_density_exact(x, fm, fp, sigma, beta), edges) < 4.5
    a = float(al.nes_factor(fm, fp, beta))
    sz = math.sqrt(float(al.sigma_z2(sigma, fm, fp)))
    assert bin_check(samples, lambda x: al.nes_factor_density_gaussian(x, a, sz, beta), edges) > 20
    grid = np.linspace(-8000, 8000, 400_001)
    vals = f64(al.nes_factor_density_exact(grid, fm, fp, sigma, beta))
    assert abs(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(grid)) - 1.0) < 5e-3


# ----------------------------------------------------------------------------- Lemma 1, Remark 2


def test_lemma1_snr_matches_monte_carlo():
    fm, fp, beta, n = 0.01001, 0.01, 1e-3, 100_000
    a = float(al.nes_factor(fm, fp, beta))  # ~1.0
    sigma = 7e-6  # sigma_Z ~ 1e-3: SNR ~ 1
    samples = f64(mc.nes_factor_samples(key(4), n, fm, fp, sigma, beta))
    err2 = (samples - a) ** 2
    mse, se = err2.mean(), err2.std(ddof=1) / math.sqrt(n)
    pred = float(al.snr_nes(sigma, fm, fp))
    # eq. (19) linearises log(F_-/F_+): relative error ~ (F_- - F_+)/F_+ = 1e-3.
    assert abs(a**2 / mse / pred - 1) <= Z * se / mse + 2e-3


def test_lemma1_bound_is_attained_by_the_aligned_direction():
    """F_t(x) = c + L w.x with ||u|| = 1: SNR <= 2 L^2 beta^2 / sigma^2, with equality for u = +-w."""
    c, lip, beta, sigma, n = 0.01, 0.01, 1e-3, 1e-5, 100_000
    bound = float(al.snr_nes_bound(lip, beta, sigma))
    for i, cos in enumerate((1.0, -1.0, 0.6, 0.1)):
        fm, fp = c - lip * beta * cos, c + lip * beta * cos
        a = float(al.nes_factor(fm, fp, beta))
        err2 = (f64(mc.nes_factor_samples(key(10 + i), n, fm, fp, sigma, beta)) - a) ** 2
        snr, rel_se = a**2 / err2.mean(), err2.std(ddof=1) / math.sqrt(n) / err2.mean()
        slack = Z * rel_se + 4 * lip * beta / c  # F_-/F_+ - 1 = O(L beta / c)
        assert snr <= bound * (1 + slack)
        if abs(cos) == 1.0:
            assert snr >= bound * (1 - slack)


def test_remark2_probability_negative_corrected_vs_printed():
    a, f_t, sigma, beta, n = 5.0, 0.01, 1e-4, 1e-3, 100_000
    sz = math.sqrt(float(al.sigma_z2(sigma, f_t, f_t)))
    p, se = mc.prob_se(~(f64(mc.theorem1_samples(key(20), n, a, sz, beta)) >= 0))
    assert close(p, se, al.prob_factor_negative(a, sz, beta))
    assert abs(p - float(al.prob_factor_negative_as_printed(a, sz, beta))) > 50 * se
    assert float(al.prob_factor_negative_as_printed(a, sz, beta)) > 0.5  # impossible for a > 0
    # Fig. 6's claim: F_t = 0.01, sigma = 1e-3 already gives P[A < 0] ~ 1/2.
    assert float(al.prob_factor_negative(1.0, math.sqrt(2) * 1e-3 / 0.01, beta)) > 0.49
    # For a < 0 the flip probability is P[A > 0].
    p_neg, se_neg = mc.prob_se(f64(mc.theorem1_samples(key(21), n, -a, sz, beta)) > 0)
    assert close(p_neg, se_neg, al.prob_factor_flip(-a, sz, beta))


@pytest.mark.parametrize("fm,fp,sigma", [(0.0102, 0.0100, 1e-4), (0.012, 0.010, 0.004), (0.002, 0.001, 0.01)])
def test_exact_flip_probability_for_absolute_value_answers(fm, fp, sigma):
    n = 50_000
    samples = f64(mc.nes_factor_samples(key(22), n, fm, fp, sigma, 1e-3, fold=True))
    p, se = mc.prob_se(samples < 0)
    assert close(p, se, al.prob_factor_flip_exact(fm, fp, sigma))


# ----------------------------------------------------------------------------- Theorem 2


def test_theorem2_R_is_the_first_passage_of_the_noisy_learning_rate():
    """eq. (6) solves P[sum_{i<n} A_i < c] = eps for A_i ~ N(a, a^2/SNR), not for N(a, SNR)."""
    snr, ra = 0.05, dict(a=0.1, lam=2.0, eta=0.01, v0=1.0, eps=0.05)
    c = (1 - ra["eta"] / ra["v0"]) / ra["lam"]
    n_clean, n_noisy = (float(v) for v in al.theorem2_iterations(snr, **ra))
    assert n_clean == pytest.approx(c / ra["a"])
    assert n_noisy / n_clean == pytest.approx(float(al.query_ratio(snr, **ra)), rel=1e-5)

    def exact(n, var):
        return sps.norm.cdf((c - n * ra["a"]) / math.sqrt(n * var))

    var = ra["a"] ** 2 / snr
    assert exact(n_noisy, var) == pytest.approx(ra["eps"], rel=1e-4)  # the real-n solution is exact
    assert exact(math.floor(n_noisy), var) > ra["eps"] > exact(math.ceil(n_noisy), var)
    for i, steps in enumerate((math.floor(n_noisy), math.ceil(n_noisy))):
        sums = f64(mc.learning_rate_sums(key(30 + i), 20_000, steps, ra["a"], var))
        p, se = mc.prob_se(sums < c)
        assert close(p, se, exact(steps, var))
    printed_model = f64(mc.learning_rate_sums(key(32), 20_000, math.ceil(n_noisy), ra["a"], snr))
    assert mc.prob_se(printed_model < c)[0] < ra["eps"] / 10


def test_theorem2_small_snr_limit_and_section_iva_recomputation():
    for snr in (1e-6, 1e-9, 1e-12):
        r = float(al.query_ratio(snr))
        c0 = sps.norm.ppf(0.01) ** 2 * 0.1 * 2.0 / 0.99
        assert r * snr == pytest.approx(c0, rel=1e-3)
    rows = {r["model"]: r for r in al.section_iva()}
    for name, printed in al.PRINTED_SECTION_IVA.items():
        row = rows[name]
        assert row["R_rounded"] == printed["R"] and row["R_matches"]  # R reproduced to its printed digit
        assert row["snr_db_error"] == pytest.approx(10 * math.log10(2), abs=0.05)  # printed SNR 3 dB high
        assert row["snr_db_without_half"] == pytest.approx(printed["snr_db"], abs=0.05)
        assert f"{row['R_if_printed_snr']:.0e}" != f"{printed['R']:.0e}"


# ----------------------------------------------------------------------------- Theorem 3


def test_theorem3_autozoom_variance_and_bound():
    fmx, fmxu, ftx, ftxu, sigma, beta, n = 0.5, 0.49, 0.1, 0.11, 1e-4, 1e-3, 100_000
    v, se = var_se(mc.autozoom_factor_samples(key(40), n, fmx, fmxu, ftx, ftxu, sigma, beta))
    pred = float(al.autozoom_factor_variance(sigma, beta, fmx, fmxu, ftx, ftxu))
    assert close(v, se, pred, extra=pred * 1e-3)
    # ||F(x + beta u) - F(x)|| = L beta: SNR <= L^2 beta^2/(2 sigma^2).
    lip = math.hypot(fmxu - fmx, ftxu - ftx) / beta
    a = (math.log(fmxu / ftxu) - math.log(fmx / ftx)) / beta
    samples = f64(mc.autozoom_factor_samples(key(41), n, fmx, fmxu, ftx, ftxu, sigma, beta))
    mse = np.mean((samples - a) ** 2)
    assert a**2 / mse <= float(al.autozoom_snr_bound(lip, beta, sigma)) * (1 + Z * math.sqrt(2 / n))


# ----------------------------------------------------------------------------- Theorem 4, Lemma 3


def test_lemma3_estimator_is_biased_and_the_exact_mle_is_not():
    a, beta, vz, reps, trials = 10.0, 1e-3, 0.0025, 64, 4000
    y = f64(mc.repeated_factor_samples(key(50), trials, reps, a, vz, beta))
    unit = vz / beta  # bias unit sigma_Z^2 / beta = 2.5
    for est, bias in ((al.lemma3_estimator, -1.5), (al.mle_estimator, 0.0), (al.debiased_mean_estimator, 0.0)):
        m, se = mc.mean_se(f64(est(y, vz, beta)) - a)
        assert close(m, se, bias * unit, extra=3 * vz**2 / beta), est.__name__  # O(sigma_Z^4) terms
    m, se = mc.mean_se(y.mean(axis=1) - a)
    assert close(m, se, -0.5 * unit, extra=3 * vz**2 / beta)
    # Remark 6's ratio-of-means estimator (from the raw noisy answers) is consistent too.
    fm, fp, sigma = 0.0101, 0.0099, 3e-5
    k1, k2 = jax.random.split(key(51))
    f1 = fm + sigma * f64(mc.standard_normal(k1, (1000, 256)))
    f2 = fp + sigma * f64(mc.standard_normal(k2, (1000, 256)))
    est = f64(al.ratio_of_means_estimator(f1, f2, beta))
    m, se = mc.mean_se(est)
    assert close(m, se, al.nes_factor(fm, fp, beta), extra=0.01)


def test_theorem4_repeated_queries():
    a, beta, vz, eps = 10.0, 1e-3, 0.0025, 0.1
    n_c = float(al.repeated_queries_consistent(vz, a, beta, eps))
    assert n_c == pytest.approx(sps.norm.ppf(eps) ** 2 * vz / (a * beta) ** 2, rel=1e-5)
    reps = math.ceil(n_c)
    y = f64(mc.repeated_factor_samples(key(60), 10_000, reps, a, vz, beta))
    exact = sps.norm.cdf(-a * beta * math.sqrt(reps / vz))
    for est in (al.debiased_mean_estimator, al.mle_estimator):
        p, se = mc.prob_se(f64(est(y, vz, beta)) < 0)
        assert close(p, se, exact, extra=0.005), est.__name__
    # eq. (8): with sigma_Z^2 = 2 sigma^2/F_t^2 it is (only) a necessary count for eq. (57).
    f_t = 0.01
    sigma = f_t * math.sqrt(vz / 2)
    n8 = float(al.repeated_queries(sigma, f_t, a, beta, eps))
    assert n8 == pytest.approx(vz * (sps.norm.ppf(eps) / math.expm1(vz - a * beta)) ** 2, rel=1e-4)
    y = f64(mc.repeated_factor_samples(key(61), 10_000, math.ceil(n8), a, vz, beta))
    p, se = mc.prob_se(f64(al.lemma3_estimator(y, vz, beta)) < 0)
    assert p >= eps - Z * se
    # Once sigma_Z^2 >= a beta eq. (8) has no solution: (57) is negative more often than not,
    # while a consistent estimator still converges.
    a_small = 2.0
    assert np.isinf(float(al.repeated_queries(sigma, f_t, a_small, beta, eps)))
    reps = 256
    y = f64(mc.repeated_factor_samples(key(62), 4000, reps, a_small, vz, beta))
    p, se = mc.prob_se(f64(al.lemma3_estimator(y, vz, beta)) < 0)
    biased_mean, spread = a_small - 1.5 * vz / beta, math.sqrt(vz / reps) / beta
    assert p > 0.5 + Z * se and close(p, se, sps.norm.cdf(-biased_mean / spread), extra=0.02)
    p, se = mc.prob_se(f64(al.mle_estimator(y, vz, beta)) < 0)
    assert close(p, se, sps.norm.cdf(-a_small * beta * math.sqrt(256 / vz)), extra=0.01)


def test_output_snr():
    probs = np.asarray([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    sigma, n = 0.01, 100_000
    noise = sigma * f64(mc.standard_normal(key(70), (n, 2, 3)))
    power, se = mc.mean_se(np.sum(noise**2, -1).ravel())
    sq = float(np.mean(np.sum(probs**2, -1)))
    pred = float(al.output_snr(sq, sigma, 3))
    assert abs(sq / power / pred - 1) <= Z * se / power


# ----------------------------------------------------------------------------- Park et al.


def test_park_pair_flip_probability_and_noise_level_erratum():
    delta, k, n = 0.1, 0.01, 100_000
    sig = float(park.sigma_for_flip(delta, k))
    sig_printed = float(park.sigma_for_flip_as_printed(delta, k))
    assert sig == pytest.approx(delta / (math.sqrt(2) * -sps.norm.ppf(k)), rel=1e-5)
    for i, s in enumerate((sig, sig_printed, 0.05)):
        e = f64(s * mc.standard_normal(key(80 + i), (n, 2)))
        p, se = mc.prob_se(e[:, 0] - e[:, 1] > delta)
        assert close(p, se, park.pair_flip_probability(delta, s))
        if s == sig:
            assert close(p, se, k)
        else:
            assert abs(p - float(park.pair_flip_probability_as_printed(delta, s))) > 20 * se
    # The printed noise level targets K = 1% but flips 31% of the time.
    assert float(park.pair_flip_probability(delta, sig_printed)) > 0.3
    # Unequal stds and means: e_i - e_m ~ N(mu_i - mu_m, s_i^2 + s_m^2).
    ei = 0.01 + 0.04 * mc.standard_normal(key(84), (n,))
    em = -0.02 + 0.07 * mc.standard_normal(key(85), (n,))
    p, se = mc.prob_se(f64(ei - em) > delta)
    assert close(p, se, park.pair_flip_probability(delta, 0.04, 0.07, 0.01, -0.02))


@pytest.mark.parametrize("fold", [False, True])
def test_park_exact_top1_probabilities(fold):
    probs = np.asarray([0.45, 0.3, 0.15, 0.07, 0.03])
    sigma, n = 0.15, 100_000
    top = np.asarray(mc.noisy_top1(key(90 + fold), n, probs, sigma, fold))
    exact = park.class_probability(np.broadcast_to(probs, (5, 5)), np.arange(5), sigma, fold=fold)
    assert exact.sum() == pytest.approx(1.0, abs=1e-4)
    for cls in range(5):
        p, se = mc.prob_se(top == cls)
        assert close(p, se, exact[cls], extra=1e-4), cls
    p, se = mc.prob_se(top != 0)
    assert close(p, se, park.flip_probability(probs, sigma, fold=fold), extra=1e-4)
    assert float(park.flip_probability(probs, sigma)) <= float(park.flip_union_bound(probs, sigma))


def test_park_noise_level_for_a_union_bound_target():
    probs = np.asarray([[0.6, 0.25, 0.1, 0.05], [0.9, 0.05, 0.03, 0.02]])
    k = 0.05
    sig = park.sigma_for_union_flip(probs, k)
    np.testing.assert_allclose(f64(park.flip_union_bound(probs, sig)), k, rtol=1e-4)
    for i in range(2):
        top = np.asarray(mc.noisy_top1(key(95 + i), 50_000, probs[i], float(sig[i])))
        p, se = mc.prob_se(top != 0)
        assert p <= k + Z * se
    assert np.isnan(float(park.sigma_for_union_flip(np.asarray([0.4, 0.4, 0.2]), 0.2)))  # a tie at the top


def test_park_finite_difference_bias_erratum():
    p_c, p_o, s, n = 0.6, 0.3, 0.03, 200_000
    m, se = mc.mean_se(f64(mc.log_ratio_samples(key(100), n, p_c, p_o, s)) - math.log(p_c / p_o))
    corrected = float(park.fd_loss_bias(p_c, p_o, s))
    fourth = 0.75 * s**4 * (1 / p_o**4 + 1 / p_c**4)  # next order of E[log(1 + e/p)]
    assert close(m, se, corrected, extra=fourth)
    assert abs(m - float(park.fd_loss_bias_as_printed(p_c, p_o, s))) > 20 * se
    h = 1e-4
    assert float(park.fd_bias(p_c, p_o, 0.55, 0.35, s, h)) == pytest.approx(
        (corrected - float(park.fd_loss_bias(0.55, 0.35, s))) / (2 * h), rel=1e-5)


# ----------------------------------------------------------------------------- Qin et al. (RND)


def test_qin_sign_flip_bound_and_linear_exact():
    d, mu, nu, n = 64, 0.01, 0.005, 50_000
    c = f64(mc.standard_normal(key(110), (d,)))
    h_mu, h_nu, _ = mc.rnd_linear_samples(key(111), n, c, mu, nu)
    h_mu, h_nu = f64(h_mu), f64(h_nu)
    cond = f64(qin.sign_flip_linear(h_mu, nu, float(np.linalg.norm(c))))
    flip = np.sign(h_nu) != np.sign(h_mu)
    p, se = mc.prob_se(flip)
    assert close(p, se, cond.mean())
    bound = f64(qin.sign_flip_bound(h_mu, nu, d, float(np.linalg.norm(c))))
    assert np.all(bound >= cond)  # Theorem 3 holds probe by probe
    far = np.abs(h_mu) > np.median(np.abs(h_mu))
    assert flip[far].mean() <= np.minimum(bound[far], 1).mean()


@pytest.mark.parametrize("m", [1, 4])
def test_qin_second_moment_of_the_estimator(m):
    d, mu, nu, n = 32, 0.01, 0.02, 20_000
    c = f64(mc.standard_normal(key(120), (d,)))
    _, _, g = mc.rnd_linear_samples(key(121 + m), n, c, mu, nu, m)
    m2, se = mc.mean_se(np.sum(f64(g) ** 2, -1))
    gn = float(np.linalg.norm(c))
    assert close(m2, se, qin.second_moment_linear(gn, d, nu, mu, m))
    clean = float(qin.second_moment_linear(gn, d, 0.0, mu))
    assert m2 / clean <= float(qin.query_factor(nu, mu))  # Theorem 1's factor bounds the growth


def test_qin_complexity_and_eot_limit():
    nu, mu, d, l0, l1 = 0.02, 0.005, 3072, 1.0, 1.0
    q0 = float(qin.query_complexity(0.0, mu, d, l0, 1.0, 0.1, 0.1))
    assert float(qin.query_complexity(nu, mu, d, l0, 1.0, 0.1, 0.1)) / q0 == pytest.approx(
        float(qin.query_factor(nu, mu)), rel=1e-5)
    assert float(qin.query_factor(nu, mu)) == pytest.approx((1 + math.sqrt(2) * nu / mu) ** 2, rel=1e-6)
    coeffs = [float(qin.eot_coefficient(nu, mu, d, l0, l1, m)) for m in (1, 10, 100, 1e6)]
    assert all(x > y for x, y in zip(coeffs, coeffs[1:]))
    limit = qin.eot_limit_terms(nu, mu, d, l0, l1)
    total = float(limit["smoothing"] + limit["cross"] + limit["noise"])
    assert float(qin.eot_coefficient(nu, mu, d, l0, l1, math.inf)) == pytest.approx(total, rel=1e-5)
    assert limit["dominant"] == ["noise"]  # nu/mu = 4, d = 3072: the nu^4 d^3/mu^2 term dominates


# ----------------------------------------------------------------------------- randomized feature defense


@pytest.mark.parametrize("nu", [0.002, 0.01, 0.05])
def test_rfd_eq26_matches_a_linear_feature_model(nu):
    d, k, mu, n = 64, 16, 0.01, 100_000
    w_in = mc.standard_normal(key(130), (k, d)) / math.sqrt(d)
    w_out = mc.standard_normal(key(131), (k,))
    clean, noisy = mc.rfd_linear_samples(key(132), n, w_in, w_out, mu, nu)
    p, se = mc.prob_se(np.sign(f64(noisy)) != np.sign(f64(clean)))
    w_in, w_out = f64(w_in), f64(w_out)
    gx2, gh2 = float(np.sum((w_in.T @ w_out) ** 2)), float(np.sum(w_out**2))
    ratio = rfd.noise_ratio(gh2, gx2, nu, mu)
    assert close(p, se, rfd.opposite_action_probability(ratio))
    cond = f64(rfd.conditional_flip_probability(f64(clean), gh2, nu))
    assert close(p, se, cond.mean())


def test_rfd_decision_check_and_accuracy_probabilities():
    k, nu, n = 16, 0.05, 100_000
    g_h = mc.standard_normal(key(140), (k,))
    noise = f64(nu * mc.standard_normal(key(141), (n, k)) @ g_h)
    gh2 = float(np.sum(f64(g_h) ** 2))
    # Sec. 3.4: L(x + r d) ~ (r - g(d)) grad.d + grad_h . delta; a check errs when the sign flips.
    r, g_d, dgrad = 0.9, 1.0, 0.4
    clean = (r - g_d) * dgrad
    p, se = mc.prob_se(np.sign(clean + noise) != np.sign(clean))
    assert close(p, se, rfd.decision_flip_probability(r, g_d, dgrad, gh2, nu))
    # Sec. 3.5: P[L + grad_h . delta > 0] = Phi(L / (nu ||grad_h||)).
    for loss in (0.1, -0.05):
        p, se = mc.prob_se(loss + noise > 0)
        assert close(p, se, rfd.accuracy_probability(loss, gh2, nu))


class _TinyNet(nn.Module):
    """Two marked hidden layers; small enough to compile in a blink (the digits CNN is exercised by
    the experiment's smoke run)."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.tanh(nn.Dense(12)(x.reshape(x.shape[0], -1)))
        h = self.perturb("h1", h)
        h = nn.relu(nn.Dense(8)(h)) + 0.1 * h[:, :8]
        h = self.perturb("h2", h)
        return nn.Dense(5)(h)


def test_rfd_gradients_are_those_of_the_marked_layers():
    model = _TinyNet()
    x = mc.standard_normal(key(151), (3, 4, 4, 1))
    y = jnp.asarray([0, 3, 4])
    abstract = jax.eval_shape(model.init, key(150), x)["params"]  # random weights without init's samplers
    leaves, tree = jax.tree.flatten(abstract)
    params = jax.tree.unflatten(tree, [0.5 * mc.standard_normal(jax.random.fold_in(key(150), i), leaf.shape)
                                       for i, leaf in enumerate(leaves)])
    shapes = models.feature_shapes(model, (4, 4, 1))
    assert list(shapes) == ["h1", "h2"]
    v = mc.standard_normal(key(152), (3,) + shapes["h2"])
    from rnd_jax.losses import margin

    @jax.jit
    def everything(params):
        zeros = {n: jnp.zeros((3,) + s) for n, s in shapes.items()}

        def loss(xx, pert):
            return margin(jax.nn.softmax(model.apply({"params": params, "perturbations": pert}, xx), -1), y)

        grads, values = rfd.loss_gradients(model, params, x, y)
        direct = jax.grad(lambda xx: jnp.sum(loss(xx, zeros)))(x)
        slope = jax.jvp(lambda t: jnp.sum(loss(x, {**zeros, "h2": t * v})), (0.0,), (1.0,))[1]
        probs = rfd.opposite_action_probabilities(model, params, x, y, {"input": 0.01, "h2": 0.01}, 0.01)
        return grads, values, loss(x, zeros), direct, slope, probs

    grads, values, values_direct, direct, slope, probs = everything(params)
    assert set(grads) == {"input", *shapes}
    assert all(grads[n].shape == (3,) + s for n, s in shapes.items())
    np.testing.assert_allclose(values, values_direct, rtol=1e-6)
    np.testing.assert_allclose(grads["input"], direct, rtol=1e-5, atol=1e-7)
    # The directional derivative along a perturbation of the marked layer is <grad_h, v>.
    assert float(slope) == pytest.approx(float(jnp.sum(grads["h2"] * v)), rel=1e-4, abs=1e-6)
    assert set(probs) == {"input", "h2"}
    np.testing.assert_allclose(probs["input"][1], 2.0, rtol=1e-5)  # h = x: ratio 2 nu^2/mu^2
    np.testing.assert_allclose(probs["input"][0], 0.5 - math.atan(2**-0.5) / math.pi, rtol=1e-5)
    sq = {n: f64(g) for n, g in rfd.grad_sq_norms(grads).items()}
    np.testing.assert_allclose(probs["h2"][1], 2 * sq["h2"] / sq["input"], rtol=1e-4)


def test_db_helpers():
    assert float(db(100.0)) == pytest.approx(20.0)
    assert float(db(0.5)) == pytest.approx(-3.0103, abs=1e-4)


# ----------------------------------------------------------------------------- bad arguments


BAD = [
    (al.sigma_z2, (-1e-3, 0.1, 0.1), "sigma"),
    (al.snr_nes, (0.0, 0.1, 0.1), "sigma"),
    (al.snr_nes, (1e-3, 0.0, 0.1), "f_minus"),
    (al.snr_nes, (1e-3, 0.1, 1.5), "f_plus"),
    (al.snr_nes_bound, (1.0, 1e-3, 0.0), "sigma"),
    (al.nes_factor, (0.1, 0.1, 0.0), "beta"),
    (al.nes_factor_density, (0.0, 1.0, 0.0, 1e-3), "sigma_z"),
    (al.nes_factor_density_exact, (0.0, 0.1, 0.1, -1.0, 1e-3), "sigma"),
    (al.prob_factor_negative, (1.0, 0.0, 1e-3), "sigma_z"),
    (al.prob_factor_flip_exact, (0.1, 0.1, 0.0), "sigma"),
    (al.query_ratio, (0.0,), "snr"),
    (al.query_ratio, (1e-3, 0.1, 2.0, 0.01, 1.0, 0.0), "eps"),
    (al.query_ratio, (1e-3, 0.1, 2.0, 0.01, 1.0, 1.0), "eps"),
    (al.query_ratio, (1e-3, 0.1, 2.0, 2.0, 1.0, 0.01), "eta/v0"),
    (al.repeated_queries, (0.0, 0.01, 1.0, 1e-3, 0.3), "sigma"),
    (al.repeated_queries, (1e-3, 0.01, 1.0, 1e-3, 1.2), "eps"),
    (al.repeated_queries, (1e-3, 0.01, 1.0, 1e-3, 0.7), "eps"),
    (al.repeated_queries, (1e-3, 0.01, -1.0, 1e-3, 0.3), "a"),
    (al.repeated_queries, (1e-3, 0.0, 1.0, 1e-3, 0.3), "f_t"),
    (al.repeated_queries_consistent, (0.01, 1.0, 1e-3, 0.0), "eps"),
    (al.mle_estimator, (np.ones(4), 0.0, 1e-3), "var_z"),
    (al.autozoom_factor_variance, (1e-3, 1e-3, 0.5, 0.5, 0.0, 0.1), "ft_x"),
    (al.output_snr, (1.0, 0.0, 10), "sigma"),
    (park.sigma_for_flip, (0.1, 0.0), "K"),
    (park.sigma_for_flip, (0.1, 1.5), "K"),
    (park.sigma_for_flip, (0.1, 0.6), "K"),
    (park.sigma_for_flip, (-0.1, 0.1), "delta"),
    (park.pair_flip_probability, (0.1, 0.0), "sigma"),
    (park.flip_union_bound, (np.array([0.5, 0.5]), -0.1), "sigma"),
    (park.class_probability, (np.array([0.5, 1.5]), 0, 0.1), "probs"),
    (park.sigma_for_union_flip, (np.array([0.6, 0.4]), 1.0), "K"),
    (park.fd_bias, (0.6, 0.3, 0.6, 0.3, 0.01, 0.0), "h"),
    (qin.query_factor, (0.1, 0.0), "mu"),
    (qin.query_factor, (-0.1, 0.1), "nu"),
    (qin.sign_flip_bound, (0.0, 0.1, 10, 1.0), "h_mu"),
    (qin.eot_coefficient, (0.1, 0.1, 10, 1.0, 1.0, 0.5), "M"),
    (qin.query_complexity, (0.1, 0.1, 10, 1.0, 1.0, 0.0, 0.1), "eps"),
    (rfd.noise_ratio, (1.0, 0.0, 0.1, 0.1), "grad_x_sq"),
    (rfd.noise_ratio, (1.0, 1.0, 0.1, 0.0), "mu"),
    (rfd.opposite_action_probability, (-1.0,), "ratio"),
    (rfd.conditional_flip_probability, (0.1, 1.0, 0.0), "nu"),
]


@pytest.mark.parametrize("fn,args,name", BAD,
                         ids=[f"{f.__module__.split('.')[-1]}.{f.__name__}-{n}" for f, _, n in BAD])
def test_invalid_arguments_raise_value_error(fn, args, name):
    with pytest.raises(ValueError, match=name.replace("/", ".")):
        fn(*args)


def test_traced_arguments_are_not_checked_so_closed_forms_jit():
    f = jax.jit(lambda s: al.query_ratio(al.snr_nes(s, 0.0101, 0.0099)))
    assert float(f(1e-3)) == pytest.approx(float(al.query_ratio(al.snr_nes(1e-3, 0.0101, 0.0099))), rel=1e-6)
    g = jax.vmap(lambda s: park.sigma_for_flip(0.1, s))
    np.testing.assert_allclose(g(jnp.asarray([0.01, 0.1])), park.sigma_for_flip(0.1, jnp.asarray([0.01, 0.1])))
