"""Measured statistics of the trained digits model, beside the theory's predictions for them.

The accuracy / output-SNR and sign-flip measurements are exercised against their predictions by
the experiment's smoke run (tests/test_theory_experiment.py), which shares this session's model.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from rnd_jax import stats
from rnd_jax.compact import pointwise
from rnd_jax.defenses import model_scorer, output_noise


@pytest.fixture(scope="module")
def setup(digits_model, digits_test):
    model, params = digits_model
    scorer = model_scorer(model, params)
    x, y = digits_test
    return model, params, scorer, jax.jit(scorer), np.asarray(x), np.asarray(y)


@pytest.fixture(scope="module")
def pairs(setup):
    """Table 1 and NES-pair samples of 24 test images, two directions each."""
    _, _, _, clean, x, y = setup
    return stats.table1(clean, x[:24], y[:24], jax.random.key(1), beta=1e-3, n_dirs=2)


def test_table1_statistics_and_samples(setup, pairs):
    model, params, _, clean, x, y = setup
    t1, s = pairs
    probs = np.asarray(clean(jnp.asarray(x[:24]), None), np.float64)
    top = probs.argmax(-1)
    assert t1.acc == pytest.approx(np.mean(top == y[:24]))
    others = np.arange(10)[None] != top[:, None]
    assert t1.mean_ft == pytest.approx(probs[others].mean(), rel=1e-5)
    assert 0 < t1.mean_ft < 1 / 9
    assert len(s.a) + s.dropped == 24 * 2 * 9 and s.x_minus.shape == (48, 8, 8, 1)
    d_f = np.abs(s.f_minus.astype(np.float64) - s.f_plus.astype(np.float64))
    if s.dropped == 0:
        assert t1.mean_dF == pytest.approx(d_f.mean(), rel=1e-6)
        assert t1.median_dF == pytest.approx(np.median(d_f), rel=1e-6)
    u = stats.probe_directions(jax.random.key(1), 24, 2, (8, 8, 1)).reshape(48, 8, 8, 1)
    np.testing.assert_array_equal(stats.probe_directions(jax.random.key(1), 1, 2, (8, 8, 1))[0], u[:2])
    np.testing.assert_allclose(s.x_plus - s.x_minus, 2e-3 * u, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose((s.x_plus + s.x_minus) / 2, np.repeat(x[:24], 2, axis=0), atol=1e-6)
    np.testing.assert_allclose(s.a, (np.log(s.f_minus.astype(np.float64)) - np.log(s.f_plus.astype(np.float64))) / 1e-3)
    # Replay: same key, same answer; an image's probes do not depend on the other images.
    t1b, sb = stats.table1(clean, x[:24], y[:24], jax.random.key(1), beta=1e-3, n_dirs=2)
    assert t1b == t1
    np.testing.assert_array_equal(sb.a, s.a)
    sub = stats.select_samples(s, [3, 7], 2)
    np.testing.assert_array_equal(sub.x_minus, s.x_minus[[6, 7, 14, 15]])
    keep = np.isin(s.point, [6, 7, 14, 15])
    np.testing.assert_array_equal(sub.a, s.a[keep])
    np.testing.assert_array_equal(sub.x_minus[sub.point], s.x_minus[s.point[keep]])


def test_nes_factor_snr_and_sign_flips_under_the_real_output_noise(setup, pairs):
    _, s = pairs
    draws, sigma = 64, 1e-6
    # each point answered by the one-point program (compact.pointwise): the chunking check below compares
    # batches of 16 and 32 draws, whose float32 answers XLA's CPU kernels may round differently
    defended = jax.jit(lambda x, keys: output_noise(pointwise(setup[2]), sigma)(x, keys))
    noise = stats.measure_factor_noise(defended, s, jax.random.key(2), draws=draws, chunk=32)
    row = stats.compare_factor(s, noise, sigma)
    assert row["n_valid"] >= 10
    # Lemma 1 where sigma << F_t: within 3 dB sample by sample (64 draws: ~0.8 dB Monte-Carlo noise).
    assert abs(row["snr_delta_db"]) <= 1.0 and row["frac_within_3db"] >= 0.9
    # Where it does not hold, the prediction collapses while the measured SNR saturates.
    assert row["snr_meas_db_invalid"] > row["snr_pred_db_invalid"] + 10
    # The exact flip probability holds for every sample (no small-noise assumption).
    assert abs(row["pflip_meas"] - row["pflip_exact"]) <= 4 * row["pflip_se"]
    assert abs(row["pflip_meas_valid"] - row["pflip_thm1_valid"]) <= 0.03
    # Chunking the draws does not change the measurement (keys are per draw).
    again = stats.measure_factor_noise(defended, s, jax.random.key(2), draws=draws, chunk=16)
    np.testing.assert_allclose(again.mse, noise.mse, rtol=1e-12)  # the same draws, summed in another order
    np.testing.assert_array_equal(again.flip, noise.flip)


def test_flip_predictions_combine_the_closed_forms():
    """The theory side of the sign-flip measurement (measured against it in the experiment's smoke run)."""
    sq = {"input": np.array([4.0, 1.0]), "dense1": np.array([1.0, 9.0])}
    values = np.array([0.5, -0.2])
    h = np.array([[0.01, -0.02, 0.0], [0.003, 0.1, -0.05]])
    mu, nu = 1e-3, 2e-3
    pred = stats.flip_predictions(sq, values, mu, "input", nu, h=h, dim=64)
    np.testing.assert_allclose(pred["ratio"], 2 * nu**2 / mu**2)  # h = x: the gradients cancel
    np.testing.assert_allclose(pred["eq26"], np.arctan(np.sqrt(8.0)) / np.pi)
    cond = sps.norm.cdf(-np.abs(h) / (np.sqrt(2) * nu * np.sqrt(sq["input"])[:, None]))
    np.testing.assert_allclose(pred["conditional"], cond.mean(1))
    bound = np.minimum(1, 2 * np.sqrt(sq["input"])[:, None] * nu * 8 / np.maximum(np.abs(h), 1e-30))
    np.testing.assert_allclose(pred["qin_bound"], bound.mean(1))
    np.testing.assert_allclose(pred["acc_pred"], sps.norm.cdf(values / (nu * np.sqrt(sq["input"]))))
    pred = stats.flip_predictions(sq, values, mu, "dense1", nu, h=h)
    np.testing.assert_allclose(pred["ratio"], 2 * nu**2 * sq["dense1"] / (mu**2 * sq["input"]))
    assert "qin_bound" not in pred


def test_bad_arguments_raise(setup, pairs):
    model, params, _, clean, x, y = setup
    _, s = pairs
    with pytest.raises(ValueError, match="beta"):
        stats.table1(clean, x[:4], y[:4], jax.random.key(0), beta=0.0)
    with pytest.raises(ValueError, match="n_dirs"):
        stats.table1(clean, x[:4], y[:4], jax.random.key(0), n_dirs=0)
    with pytest.raises(ValueError, match="images/labels"):
        stats.table1(clean, x[:4], y[:3], jax.random.key(0))
    with pytest.raises(ValueError, match="draws"):
        stats.measure_factor_noise(clean, s, jax.random.key(0), draws=0)
    with pytest.raises(ValueError, match="sigma"):
        stats.compare_factor(s, stats.FactorNoise(np.ones(len(s.a)), np.zeros(len(s.a)), s.a, 1), 0.0)
    with pytest.raises(ValueError, match="mu"):
        stats.sign_flip_rates(clean, clean, x[:2], y[:2], jax.random.key(0), mu=-1.0)
    sq = {"input": np.ones(2), "dense1": np.ones(2)}
    with pytest.raises(ValueError, match="layer"):
        stats.flip_predictions(sq, np.ones(2), 1e-3, "conv9", 1e-3)
    with pytest.raises(ValueError, match="nu"):
        stats.flip_predictions(sq, np.ones(2), 1e-3, "dense1", 0.0)
