import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax.defenses import DEFENSES, input_noise, make_defense, output_noise
from rnd_jax.oracle import query_keys

K = 10


def const_scorer(p):
    p = jnp.asarray(p, jnp.float32)
    return lambda x, keys: jnp.broadcast_to(p, (x.shape[0], p.shape[0]))


def identity_scorer(x, keys):
    """Exposes the (noisy) input as the 'answer', to check input noise."""
    return x.reshape(x.shape[0], -1)


def draw(scorer, n, seed=0, shape=(8, 8, 1), fill=0.5):
    x = jnp.full((n,) + shape, fill, jnp.float32)
    return np.asarray(scorer(x, query_keys(jax.random.key(seed), 0, n)), np.float64)


def test_zero_level_is_exactly_clean(clean_scorer, digits_test):
    x = jnp.asarray(digits_test[0][:32])
    ks = query_keys(jax.random.key(0), 0, 32)
    ref = np.asarray(clean_scorer(x, ks))
    for defense in (lambda s: output_noise(s, 0.0), lambda s: output_noise(s, 0.0, "logits"),
                    lambda s: input_noise(s, 0.0), make_defense("output_noise", 0.0)):
        np.testing.assert_array_equal(np.asarray(defense(clean_scorer)(x, ks)), ref)


def _check_moments(samples, mean, std):
    """Sample mean and std against the truth within 5 standard errors."""
    n = samples.size
    se_mean = std / np.sqrt(n)
    se_std = std / np.sqrt(2 * (n - 1))
    assert abs(samples.mean() - mean) < 5 * se_mean, (samples.mean(), mean)
    assert abs(samples.std(ddof=1) - std) < 5 * se_std, (samples.std(ddof=1), std)


def test_output_noise_probs_is_gaussian_away_from_the_clip():
    sigma = 0.01
    out = draw(output_noise(const_scorer(np.full(K, 0.5)), sigma), 4000)
    _check_moments(out.ravel(), 0.5, sigma)


def test_output_noise_probs_post_processing_is_half_normal_at_zero_and_clipped_at_one():
    sigma = 0.1
    out = draw(output_noise(const_scorer([0.0] * 5 + [1.0] * 5), sigma), 4000)
    at0, at1 = out[:, :5].ravel(), out[:, 5:].ravel()
    assert at0.min() >= 0 and at1.max() <= 1.0
    # |sigma v|: mean sigma*sqrt(2/pi), std sigma*sqrt(1 - 2/pi)
    _check_moments(at0, sigma * np.sqrt(2 / np.pi), sigma * np.sqrt(1 - 2 / np.pi))
    # min(|1 + sigma v|, 1) = 1 - sigma*max(-v, 0) (for |v| < 10): E = sigma/sqrt(2 pi),
    # E[max(-v,0)^2] = 1/2, so Var = sigma^2 (1/2 - 1/(2 pi))
    _check_moments(1 - at1, sigma / np.sqrt(2 * np.pi), sigma * np.sqrt(0.5 - 0.5 / np.pi))
    assert 0.45 < np.mean(at1 == 1.0) < 0.55


def test_output_noise_logits_adds_gaussian_to_log_probs():
    sigma = 0.3
    p = np.exp(np.linspace(-3, 0, K))
    p /= p.sum()
    out = draw(output_noise(const_scorer(p), sigma, "logits"), 4000)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)
    logits = np.log(out)
    # differences of log-probs remove logsumexp: log out_i - log out_0 = log p_i - log p_0 + sigma (v_i - v_0)
    d = (logits[:, 1:] - logits[:, :1]) - (np.log(p[1:]) - np.log(p[0]))
    _check_moments(d.ravel(), 0.0, sigma * np.sqrt(2))


def test_input_noise_moments():
    nu = 0.05
    out = draw(input_noise(identity_scorer, nu), 1000, fill=0.25)
    _check_moments(out.ravel(), 0.25, nu)


def test_noise_depends_only_on_query_key():
    s = output_noise(const_scorer(np.full(K, 0.5)), 0.01)
    x = jnp.zeros((6, 8, 8, 1))
    ks = query_keys(jax.random.key(3), 10, 6)
    full = np.asarray(s(x, ks))
    np.testing.assert_array_equal(np.asarray(s(x[2:5], ks[2:5])), full[2:5])
    assert np.unique(full[:, 0]).size == 6  # every query its own draw


def test_composed_defenses_draw_independent_noise():
    base = const_scorer(np.full(K, 0.5))
    twice = draw(output_noise(output_noise(base, 0.01), 0.01), 4000)
    _check_moments(twice.ravel(), 0.5, 0.01 * np.sqrt(2))  # correlated draws would give std 0.02


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), "x", None])
def test_bad_levels_raise(bad):
    with pytest.raises(ValueError):
        output_noise(identity_scorer, bad)
    with pytest.raises(ValueError):
        input_noise(identity_scorer, bad)
    with pytest.raises(ValueError):
        make_defense("output_noise", bad)


def test_unknown_names_raise_listing_choices():
    with pytest.raises(ValueError, match="probs"):
        output_noise(identity_scorer, 0.1, "softmax")
    with pytest.raises(ValueError, match="input_noise"):
        make_defense("jpeg", 0.1)
    assert set(DEFENSES) >= {"none", "output_noise", "output_noise_logits", "input_noise"}
