import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax.oracle import Oracle, QueryCounter, Top1, query_keys


def noisy_scorer(x, keys):
    """Answers depend on the query key only: lets us see which key a point received."""
    return jax.vmap(lambda k: jax.nn.softmax(jax.random.normal(k, (10,))))(keys)


def test_query_numbering_and_counting():
    o = Oracle(noisy_scorer)
    k = jax.random.key(0)
    x = jnp.zeros((7, 8, 8, 1))
    ref = np.asarray(o.query(k, 5, x))
    b = o.bind(k, 5)
    a1, a2 = b(x[:3]), b(x[3:])
    assert b.used == 7
    np.testing.assert_array_equal(np.concatenate([a1, a2]), ref)
    expect = np.asarray(noisy_scorer(x, jnp.stack([jax.random.fold_in(k, q) for q in range(5, 12)])))
    np.testing.assert_array_equal(ref, expect)
    # the defense key, not the attacker, decides the noise
    assert not np.array_equal(np.asarray(o.query(jax.random.key(1), 5, x)), ref)


def test_output_types():
    x = jnp.zeros((4, 8, 8, 1))
    k = jax.random.key(0)
    probs = np.asarray(Oracle(noisy_scorer, "scores").query(k, 0, x))
    lab = np.asarray(Oracle(noisy_scorer, "label").query(k, 0, x))
    top = Oracle(noisy_scorer, "top1").query(k, 0, x)
    assert isinstance(top, Top1)
    np.testing.assert_array_equal(lab, probs.argmax(1))
    np.testing.assert_array_equal(np.asarray(top.label), lab)
    np.testing.assert_allclose(np.asarray(top.score), probs.max(1))


def test_bad_oracles_and_queries():
    with pytest.raises(ValueError, match="scores"):
        Oracle(noisy_scorer, "logits")
    with pytest.raises(ValueError):
        Oracle(42)
    with pytest.raises(ValueError, match="H, W, C"):
        Oracle(noisy_scorer).bind(jax.random.key(0), 0)(jnp.zeros((8, 8, 1)))


def test_query_counter_is_eager_only():
    c = QueryCounter(noisy_scorer)
    c(jnp.zeros((3, 8, 8, 1)), query_keys(jax.random.key(0), 0, 3))
    assert c.count == 3 and c.calls == 1
    with pytest.raises(RuntimeError, match="disable_jit"):
        jax.jit(c)(jnp.zeros((3, 8, 8, 1)), query_keys(jax.random.key(0), 0, 3))
