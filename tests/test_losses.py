import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import losses


P = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])


def test_closed_forms():
    np.testing.assert_allclose(losses.targeted_xent(P, 1), -np.log([0.2, 0.3]), rtol=1e-6)
    np.testing.assert_allclose(losses.untargeted_xent(P, 0), np.log([0.7, 0.1]), rtol=1e-6)
    np.testing.assert_allclose(losses.margin(P, 0), np.log([0.7 / 0.2, 0.1 / 0.6]), rtol=1e-6)
    np.testing.assert_allclose(losses.targeted_cw(P, 2), np.log([0.7 / 0.1, 0.3 / 0.6]), rtol=1e-6)
    # per-row classes broadcast
    np.testing.assert_allclose(losses.targeted_xent(P, jnp.array([0, 2])), -np.log([0.7, 0.6]), rtol=1e-6)


def test_margin_sign_matches_top1():
    assert float(losses.margin(P[0], 0)) > 0 and float(losses.margin(P[1], 0)) < 0
    assert float(losses.targeted_cw(P[1], 2)) < 0 and float(losses.targeted_cw(P[0], 2)) > 0


@pytest.mark.parametrize("fn", [losses.targeted_xent, losses.untargeted_xent, losses.margin, losses.targeted_cw])
def test_noisy_probabilities_never_give_nan(fn):
    bad = jnp.array([[0.0, -0.3, 1.7], [jnp.nan, 0.0, 0.0], [-1.0, -2.0, -3.0], [1e-45, 1.0, 0.0]])
    for cls in range(3):
        v = np.asarray(fn(bad, cls))
        assert np.all(np.isfinite(v)), (fn.__name__, cls, v)


def test_safe_log_is_monotone_and_floored():
    p = jnp.array([-1.0, 0.0, 1e-40, 1e-20, 0.5, 1.0])
    v = np.asarray(losses.safe_log(p))
    assert np.all(np.diff(v) >= 0) and v[0] == v[1] == np.float32(np.log(np.float32(losses.TINY)))
