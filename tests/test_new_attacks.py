"""ZO-signSGD and the Parsimonious attack: fast checks of their behaviour on models with a known loss.

The registry battery (tests/test_attack_battery.py) runs both on the digits model (undefended success,
replay, one image alone = inside the batch, its queries counted on the host). The checks here use a
synthetic two-class scorer on 4x4 images whose ``log F_y`` is linear in the pixels,
``log F_y = log(0.8) + w . (x - x0)`` (so the untargeted losses, ``log F_y`` and the margin, increase with
``w . x``), where the right answer of each step is known:

- ZO-signSGD's sign step goes exactly against ``sign(w)`` (its estimate's error per coordinate is about
  ``||w|| / sqrt(q)``, sixteen times smaller than every ``|w_i|`` with the ``q`` used), and a point
  whose answer is already adversarial is kept;
- a linear loss is modular, where the lazy-greedy rule is exact: the Parsimonious search ends on the
  vertex that minimises it, ``x0 - eps * sign(w)``, with one candidate per call and with several.

The eager query counter (``test_eager_counter_proves_budget``) runs both with -m slow; by default the
battery's alone-vs-batch test counts their queries on the host.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax.attacks import driver, make_attack
from rnd_jax.attacks.score.zo_signsgd import sample_directions
from rnd_jax.oracle import Oracle

SHAPE = (4, 4, 1)
D = math.prod(SHAPE)
X0 = jnp.full(SHAPE, 0.5, jnp.float32)  # eps = 0.3 around 0.5 never clips
# every |w_i| = ||w|| / 4; mixed signs; the optimum x0 - eps * sign(w) keeps F_y >= 0.8 * exp(-0.3 * 0.64) > 0.5
W = jnp.asarray(np.where(np.arange(D) % 3 == 0, 0.04, -0.04).reshape(SHAPE), jnp.float32)


def linear_scorer(x, keys):
    """Two classes: ``F_0 = 0.8 * exp(w . (x - x0))``, ``F_1 = 1 - F_0`` (class 0 stays top-1 in the ball)."""
    f0 = 0.8 * jnp.exp(jnp.sum((x - X0) * W, axis=(1, 2, 3)))
    return jnp.stack([f0, 1.0 - f0], axis=-1)


def one_step(attack, x0, label):
    state = attack.init(jax.random.key(3), x0, label, None)
    return attack.step(state, lambda pts: linear_scorer(pts, None))


@pytest.mark.parametrize("directions", ["sphere", "gaussian"])
def test_zo_signsgd_steps_against_the_gradient_sign(directions):
    attack = make_attack("zo_signsgd", targeted=False, q=4096, mu=0.01, lr=0.1, directions=directions)
    assert attack.cost == 4097 and attack.checks == 0
    state, info = one_step(attack, X0, 0)
    np.testing.assert_array_equal(np.asarray(state.x), np.asarray(X0 - 0.1 * jnp.sign(W)))
    assert not bool(state.done)
    np.testing.assert_allclose(float(info.loss), math.log(0.8 / 0.2), rtol=1e-6)  # the margin at x0
    # the answer at the current point is the success check: a point already adversarial is kept
    state, _ = one_step(attack, X0, 1)  # label 1: the model answers class 0
    assert bool(state.done)
    np.testing.assert_array_equal(np.asarray(state.x), np.asarray(X0))


def test_zo_signsgd_directions_have_unit_mean_square_length():
    """Both kinds have E||u||^2 = 1 and E[d u_i^2] = 1 (so mu is the probe length in both); sphere exactly."""
    n = 4000
    for kind in ("sphere", "gaussian"):
        u = np.asarray(sample_directions(jax.random.key(0), n, SHAPE, kind)).reshape(n, D)
        sq = (u * u).sum(1)
        if kind == "sphere":
            np.testing.assert_allclose(sq, 1.0, rtol=1e-5)
        else:  # ||u||^2 ~ chi2_d / d: variance 2 / d
            assert abs(sq.mean() - 1.0) < 4 * math.sqrt(2 / D / n)
        per = D * (u * u).mean(0)  # each d * u_i^2 has mean 1 and variance <= 2 (Gaussian; sphere smaller)
        assert np.all(np.abs(per - 1.0) < 4 * math.sqrt(2 / n) + 1e-6), (kind, per)


@pytest.mark.parametrize("evals", [1, 3])
def test_parsimonious_reaches_the_optimum_of_a_modular_loss(evals):
    attack = make_attack("parsimonious", targeted=False, evals=evals, block_size=2)
    assert attack.cost == evals
    budget = 120
    run = jax.jit(lambda x, ka, kd: driver.run_one(attack, Oracle(linear_scorer, "scores"), x, 0, None, ka, kd,
                                                   budget))
    res = run(X0, jax.random.key(0), jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(res.x_adv), np.asarray(X0 - 0.3 * jnp.sign(W)))
    assert not bool(res.lucky) and int(res.queries) <= budget
