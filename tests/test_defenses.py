import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from conftest import const_scorer, identity_scorer
from rnd_jax.defenses import (DEFENSES, build_defense, correlated_noise, feature_noise, input_noise, output_noise,
                              quantize, resize_pad)
from rnd_jax.oracle import query_keys

K = 10


def draw(scorer, n, seed=0, shape=(8, 8, 1), fill=0.5):
    x = jnp.full((n,) + shape, fill, jnp.float32)
    return np.asarray(scorer(x, query_keys(jax.random.key(seed), 0, n)), np.float64)


def test_zero_level_is_exactly_clean(clean_scorer, digits_model, digits_test):
    model, params = digits_model
    x = jnp.asarray(digits_test[0][:32])
    ks = query_keys(jax.random.key(0), 0, 32)
    ref = np.asarray(clean_scorer(x, ks))
    for defense in (lambda s: output_noise(s, 0.0), lambda s: output_noise(s, 0.0, "logits"),
                    lambda s: input_noise(s, 0.0), lambda s: input_noise(s, 0.0, scale=(2, 2)),
                    lambda s: correlated_noise(s, 0.0), lambda s: resize_pad(s, 0)):
        np.testing.assert_array_equal(np.asarray(defense(clean_scorer)(x, ks)), ref)
    for name in ("none", "output_noise", "output_noise_logits", "input_noise", "feature_noise"):
        np.testing.assert_array_equal(np.asarray(build_defense(name, model, params, 0.0, (8, 8, 1))(x, ks)), ref)
    np.testing.assert_array_equal(np.asarray(feature_noise(model, params, {"conv1": 0.0, "dense1": 0.0},
                                                           (8, 8, 1))(x, ks)), ref)


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


def test_input_noise_beta_scale_moments():
    """k*nu*eta with k ~ Beta(a, b): mean 0, variance nu^2 E[k^2], E[k^2] = ab/((a+b)^2(a+b+1)) + (a/(a+b))^2."""
    nu = 0.1
    for a, b in ((1.0, 1.0), (2.0, 2.0), (0.5, 0.5)):
        d = (draw(input_noise(identity_scorer, nu, scale=(a, b)), 3000, fill=0.5) - 0.5).ravel()
        ek2 = a * b / ((a + b) ** 2 * (a + b + 1)) + (a / (a + b)) ** 2
        var = np.mean(d ** 2)
        se_var = np.sqrt(np.mean((d ** 2 - var) ** 2) / d.size) * np.sqrt(64)  # 64 pixels share one k per query
        assert abs(d.mean()) < 5 * np.sqrt(var * 64 / d.size)
        assert abs(var - nu ** 2 * ek2) < 5 * se_var, (a, b, var, nu ** 2 * ek2)


class LinearProbe(nn.Module):
    """Logits = a marked copy of the first 10 pixels: feature noise shows up unchanged in the logits."""

    @nn.compact
    def __call__(self, x, train=False):
        w = self.param("w", nn.initializers.ones, ())
        h = self.perturb("feat", x.reshape(x.shape[0], -1)[:, :10] * w)
        return self.perturb("head", h * w)


def test_feature_noise_moments_and_layer_choice():
    model = LinearProbe()
    params = {"w": jnp.ones(())}
    nu = 0.2
    x = jnp.full((3000, 8, 8, 1), 0.5)
    ks = query_keys(jax.random.key(1), 0, 3000)
    for layers in (None, "feat", ["feat", "head"]):
        out = np.asarray(feature_noise(model, params, nu, (8, 8, 1), layers)(x, ks), np.float64)
        d = np.log(out[:, 1:]) - np.log(out[:, :1])  # logit differences: nu*(delta_i - delta_0) per noisy layer
        n_layers = 2 if isinstance(layers, list) else 1
        _check_moments(d.ravel(), 0.0, nu * np.sqrt(2 * n_layers))
    with pytest.raises(ValueError, match="feat"):
        feature_noise(model, params, nu, (8, 8, 1), "conv9")
    with pytest.raises(ValueError):
        feature_noise(model, params, {"feat": -1.0}, (8, 8, 1))


def test_quantize_rounds_to_the_grid():
    p = np.array([0.0, 0.1, 0.2, 0.34, 0.5, 0.66, 0.9, 1.0, 0.3, 0.05])
    for bits in (1, 2, 4, 8, 16):
        out = draw(quantize(const_scorer(p), bits), 2)[0]
        levels = 2 ** bits - 1
        np.testing.assert_allclose(out * levels, np.round(out * levels), atol=1e-3)
        assert np.max(np.abs(out - p)) <= 0.5 / levels + 1e-6
    for bad in (0, 17, 2.5, True, "8"):
        with pytest.raises(ValueError):
            quantize(identity_scorer, bad)


def test_correlated_noise_is_a_rescaling_plus_white_part():
    p = np.linspace(0.01, 0.19, K)
    np.testing.assert_allclose(draw(correlated_noise(const_scorer(p), 0.1), 3), np.tile(1.1 * p, (3, 1)), rtol=1e-6)
    out = draw(correlated_noise(const_scorer(np.full(K, 0.5)), 0.1, 0.01), 3000)
    _check_moments(out.ravel(), 0.55, 0.01)


def test_resize_pad_is_random_per_query_and_keeps_shape():
    s = resize_pad(identity_scorer, 2)
    x = jnp.tile(jnp.linspace(0, 1, 64).reshape(1, 8, 8, 1), (64, 1, 1, 1))
    ks = query_keys(jax.random.key(0), 0, 64)
    out = np.asarray(s(x, ks))
    assert out.shape == (64, 64) and np.all(np.isfinite(out))
    assert len({row.tobytes() for row in out.round(6)}) > 3  # several sizes/offsets drawn
    np.testing.assert_array_equal(out, np.asarray(s(x, ks)))  # a function of the query keys
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            resize_pad(identity_scorer, bad)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), "x", None])
def test_bad_levels_raise(bad, digits_model):
    model, params = digits_model
    with pytest.raises(ValueError):
        output_noise(identity_scorer, bad)
    with pytest.raises(ValueError):
        input_noise(identity_scorer, bad)
    with pytest.raises(ValueError):
        correlated_noise(identity_scorer, bad)
    for name in ("output_noise", "input_noise", "feature_noise"):
        with pytest.raises(ValueError):
            build_defense(name, model, params, bad, (8, 8, 1))


@pytest.mark.parametrize("scale", [(0, 1), (1, -2), (float("nan"), 1), "x", (1,), (1e300, 1.0), (1.0, 1e20)])
def test_bad_beta_parameters_raise(scale):
    with pytest.raises(ValueError, match="Beta|pair"):
        input_noise(identity_scorer, 0.1, scale=scale)


def test_unknown_names_raise_listing_choices(digits_model):
    model, params = digits_model
    with pytest.raises(ValueError, match="probs"):
        output_noise(identity_scorer, 0.1, "softmax")
    with pytest.raises(ValueError, match="input_noise"):
        build_defense("jpeg2000", model, params, 0.1, (8, 8, 1))
    with pytest.raises(ValueError, match="dense1"):
        build_defense("feature_noise", model, params, 0.1, (8, 8, 1), layers="conv7")
    with pytest.raises(ValueError, match="valid"):
        build_defense("output_noise", model, params, 0.1, (8, 8, 1), layers="conv1")
    assert set(DEFENSES) >= {"none", "output_noise", "output_noise_logits", "input_noise", "feature_noise",
                             "quantize", "correlated_noise", "resize_pad", "random_resize_pad", "jpeg",
                             "output_noise_park", "aaa"}
    with pytest.raises(ValueError, match="valid"):
        build_defense("aaa", model, params, 4.0, (8, 8, 1), sigma=0.1)


@pytest.mark.parametrize("build, name", [
    (lambda level: input_noise(identity_scorer, level), "nu"),
    (lambda level: output_noise(identity_scorer, level, "logits"), "sigma"),
    (lambda level: output_noise(identity_scorer, level), "sigma"),
    (lambda level: correlated_noise(identity_scorer, level), "alpha"),
    (lambda level: correlated_noise(identity_scorer, 0.1, level), "sigma"),
    (lambda level: build_defense("output_noise_park", None, None, level, (8, 8, 1)), "variance"),
    (lambda level: build_defense("aaa", None, None, level, (8, 8, 1)), "attractor_interval"),
])
def test_levels_that_overflow_float32_are_refused_when_built(build, name):
    """A level whose square (or whose noise on [0, 1] data) overflows float32 is refused, naming the level;
    the largest accepted level, about 1.8e19, still gives finite noise and a finite variance."""
    for level in (1e38, 1e300, jnp.float32(1e38), 2e19):
        with pytest.raises(ValueError, match=f"{name} = .* overflows float32"):
            build(level)
    build(1e19)


def test_overflowing_levels_are_refused_by_every_noise_family(digits_model):
    model, params = digits_model
    for name in ("input_noise", "output_noise", "output_noise_logits", "feature_noise", "output_noise_park"):
        with pytest.raises(ValueError, match="overflows float32"):
            build_defense(name, model, params, 1e38, (8, 8, 1))
    assert np.isfinite(np.float32(1e19) ** 2)  # the largest accepted std keeps a finite variance
    out = draw(input_noise(identity_scorer, 1e19), 2)  # and finite noisy data
    assert np.all(np.isfinite(out)) and out.std() > 1e18
