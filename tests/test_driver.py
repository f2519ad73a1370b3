"""Driver mechanics with toy attacks: static cost checks and run-time (reported) query counts."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax.attacks import driver
from rnd_jax.attacks.driver import Attack
from rnd_jax.oracle import Oracle, QueryCounter, query_keys


class S(NamedTuple):
    x: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    seen: jax.Array  # sum of first scores seen: proves which query numbers were answered


class I(NamedTuple):
    loss: jax.Array
    queries: jax.Array


def key_scorer(x, keys):
    """Answers depend only on the query key."""
    return jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys)


def variable_cost_attack(worst: int = 5) -> Attack:
    """Each step asks 1 plain point, then r ~ U{0..worst-1} more, one at a time, in a while_loop."""

    def init(key, x0, label, target):
        return S(x0, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros(()))

    def step(s, oracle):
        seen = s.seen + oracle(s.x[None])[0, 0]
        r = jax.random.randint(jax.random.fold_in(s.key, s.step), (), 0, worst)

        def body(c):
            i, acc = c
            return i + 1, acc + oracle.at(1 + i, s.x[None])[0, 0]

        n, seen = jax.lax.while_loop(lambda c: c[0] < r, body, (jnp.zeros((), jnp.int32), seen))
        return s._replace(step=s.step + 1, seen=seen), I(loss=seen, queries=n)

    return Attack(init, step, cost=1 + worst, output="scores", targeted=False)


def test_reported_queries_are_counted_exactly_and_never_exceed_budget():
    attack = variable_cost_attack()
    x0 = jnp.zeros((2, 2, 1))
    for budget in (6, 37, 100):
        counter = QueryCounter(key_scorer)
        kd = jax.random.key(3)
        with jax.disable_jit():
            eager = driver.run_one(attack, Oracle(counter), x0, 0, -1, jax.random.key(1), kd, budget)
        carry = jax.jit(lambda: driver.advance(attack, Oracle(key_scorer),
                                               driver.start(attack, jax.random.key(1), x0, 0, -1, budget), kd,
                                               budget))()
        assert int(eager.queries) == counter.count <= budget
        assert budget - counter.count < attack.cost  # stopped only when a worst-case step no longer fits
        assert int(carry.queries) == counter.count
        # every query number 0..count-1 answered exactly once: the sum of their first scores
        expect = np.asarray(key_scorer(None, query_keys(kd, 0, counter.count)))[:, 0].sum()
        np.testing.assert_allclose(float(carry.state.seen), expect, rtol=1e-5)


def test_step_asking_other_than_its_cost_is_rejected_at_trace_time():
    lying = variable_cost_attack()._replace(step=lambda s, o: _ask(s, o, 9))  # asks 9 > worst case 6
    with pytest.raises(ValueError, match="worst-case"):
        driver.run_one(lying, Oracle(key_scorer), jnp.zeros((2, 2, 1)), 0, -1, jax.random.key(0), jax.random.key(1), 50)


def _ask(s, oracle, n):
    oracle(jnp.stack([s.x] * n))
    return s._replace(step=s.step + 1), I(loss=jnp.zeros(()), queries=jnp.zeros((), jnp.int32))
