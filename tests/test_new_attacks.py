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
  vertex that minimises it, ``x0 - eps * sign(w)``, with one candidate per call and with several;
- Parsimonious run alone equals the same image inside the vmapped batch under output noise, and a host
  counter sees exactly the driver's count (the battery's version of this check runs it with -m slow).

The battery's eager query counter (``test_eager_counter_proves_budget``) runs both with -m slow; by
default queries are counted on the host by the battery's alone-vs-batch test (ZO-signSGD) and here
(Parsimonious).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import keys
from rnd_jax.attacks import driver, make_attack
from rnd_jax.attacks.score.zo_signsgd import sample_directions
from rnd_jax.defenses import output_noise
from rnd_jax.evaluate import QueryTap, tap_scorer
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


_PROGRAMS = {}


def programs(evals):
    """(attack, budget, vmapped run, one-image run with a host tap, the tap) of Parsimonious, compiled once;
    the output-noise level ``sigma`` is an argument (0: the scorer's exact answers)."""
    if evals not in _PROGRAMS:
        attack = make_attack("parsimonious", targeted=False, evals=evals, block_size=2)
        budget, tap = 120, QueryTap()

        def batch(xs, ys, ka, kd, sigma):
            return driver.run(attack, Oracle(output_noise(linear_scorer, sigma), "scores"), xs, ys, None, ka, kd,
                              budget)

        def alone(x, ka, kd, sigma):
            scorer = tap_scorer(output_noise(linear_scorer, sigma), linear_scorer, tap)
            return driver.run_one(attack, Oracle(scorer, "scores"), x, 0, None, ka, kd, budget)

        _PROGRAMS[evals] = attack, budget, jax.jit(batch), jax.jit(alone), tap
    return _PROGRAMS[evals]


IMAGES = jnp.stack([X0, X0 + 0.1, X0 - 0.1])  # each vertex of the 0.3-ball around them lies inside [0, 1]


@pytest.mark.parametrize("evals", [1, 3])
def test_parsimonious_reaches_the_optimum_of_a_modular_loss(evals):
    """One candidate per call (the sequential search; each image alone) and three (the vmapped batch)."""
    attack, budget, batch, alone, _ = programs(evals)
    assert attack.cost == evals
    ka, kd = keys(0, 3), keys(1, 3)
    if evals == 1:
        res = [alone(IMAGES[i], ka[i], kd[i], 0.0) for i in range(3)]
        x_adv, lucky, queries = (np.stack([np.asarray(getattr(r, f)) for r in res]) for f in ("x_adv", "lucky",
                                                                                              "queries"))
    else:
        res = batch(IMAGES, jnp.zeros((3,), jnp.int32), ka, kd, 0.0)
        x_adv, lucky, queries = np.asarray(res.x_adv), np.asarray(res.lucky), np.asarray(res.queries)
    np.testing.assert_array_equal(x_adv, np.asarray(IMAGES - 0.3 * jnp.sign(W)[None]))
    assert not lucky.any() and np.all(queries <= budget)


def test_parsimonious_alone_equals_batch_and_host_count():
    """Under output noise each image run alone (not vmapped) equals the same image inside the batch, and a
    host-side counter of the alone run sees exactly the driver's count, within the budget."""
    _, budget, batch, alone, tap = programs(3)
    ka, kd = keys(0, 3), keys(1, 3)
    b = batch(IMAGES, jnp.zeros((3,), jnp.int32), ka, kd, 0.05)
    for i in range(3):
        tap.reset()
        r = alone(IMAGES[i], ka[i], kd[i], 0.05)
        jax.effects_barrier()
        assert int(r.queries) == int(b.queries[i]) and int(r.steps) == int(b.steps[i]), i
        assert bool(r.lucky) == bool(b.lucky[i])
        np.testing.assert_allclose(np.asarray(r.x_adv), np.asarray(b.x_adv[i]), atol=1e-6)
        assert tap.n == int(r.queries) <= budget, (i, tap.n)
