import jax
import numpy as np
import pytest

from rnd_jax.calibrate import calibrate


@pytest.mark.parametrize("family", ["output_noise", "input_noise", "feature_noise"])
def test_calibration_hits_target(family, digits_model, digits_test):
    model, params = digits_model
    x, y = digits_test
    a = calibrate(model, params, family, 0.01, x, y, jax.random.key(0), draws=10)
    assert 0.0 <= 0.01 - a.drop <= 0.003, a  # within 0.3 points of accuracy, never above the target
    assert a.level > 0 and a.accuracy == pytest.approx(a.clean_accuracy - a.drop)


def test_calibration_is_deterministic_and_monotone(digits_model, digits_test):
    model, params = digits_model
    x, y = digits_test
    a = calibrate(model, params, "input_noise", 0.01, x, y, jax.random.key(0), draws=10)
    b = calibrate(model, params, "input_noise", 0.01, x, y, jax.random.key(0), draws=10)
    assert a == b  # same key, same bisection, same level
    c = calibrate(model, params, "input_noise", 0.02, x, y, jax.random.key(0), draws=10)
    assert c.level >= a.level and 0.0 <= 0.02 - c.drop <= 0.003


def test_feature_calibration_per_layer(digits_model, digits_test):
    model, params = digits_model
    x, y = digits_test
    levels = {layer: calibrate(model, params, "feature_noise", 0.02, x, y, jax.random.key(1), draws=5,
                               layers=layer).level for layer in ("conv1", "dense1")}
    assert len(set(np.round(list(levels.values()), 6))) == 2


@pytest.mark.parametrize("family,drop,msg", [("quantize", 0.01, "calibratable"), ("jpeg", 0.01, "calibratable"),
                                             ("output_noise", 0.0, r"\(0, 1\)"), ("output_noise", 1.5, r"\(0, 1\)")])
def test_bad_calibration_requests_raise(family, drop, msg, digits_model, digits_test):
    model, params = digits_model
    with pytest.raises(ValueError, match=msg):
        calibrate(model, params, family, drop, *digits_test, jax.random.key(0))


def test_unknown_option_raises(digits_model, digits_test):
    model, params = digits_model
    with pytest.raises(ValueError, match="conv9"):
        calibrate(model, params, "feature_noise", 0.01, *digits_test, jax.random.key(0), layers="conv9")
