"""Arrays are arguments: params and pools are inputs of the compiled program, never constants in it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import pytree
from rnd_jax.attacks import Context, make_attack
from rnd_jax.defenses import model_scorer, output_noise
from rnd_jax.evaluate import Protocol, compile_runner, image_keys, make_runner
from rnd_jax.oracle import Oracle


class Wide(nn.Module):
    """An MLP on 8x8x1 whose hidden width sets the parameter count."""

    width: int

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(h)


def scorer_of(width, seed=0):
    model = Wide(width)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    return model_scorer(model, params)


def inputs(n=2):
    x = jax.random.uniform(jax.random.key(3), (n, 8, 8, 1))
    labels = jnp.arange(n, dtype=jnp.int32)
    ka, kd, kc = image_keys(jax.random.key(1), jax.random.key(2), jnp.arange(n))
    return x, labels, jnp.full((n,), -1, jnp.int32), ka, kd, kc


def program_text(runner):
    return compile_runner(runner).lower(*inputs()).as_text()


def test_partition_combine_round_trip_and_static_part_ignores_values():
    s1, s2 = output_noise(scorer_of(32, 0), 0.01), output_noise(scorer_of(32, 1), 0.01)
    a1, st1 = pytree.partition(s1)
    a2, st2 = pytree.partition(s2)
    assert st1 == st2 and hash(st1) == hash(st2)  # same structure and levels, other params
    assert any(a is not None for a in a1)
    x = jnp.ones((3, 8, 8, 1))
    keys = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(pytree.combine(a1, st1)(x, keys), s1(x, keys))
    assert pytree.partition(output_noise(scorer_of(32, 0), 0.02))[1] != st1  # a float level is static


def test_program_size_does_not_grow_with_params():
    protocol = Protocol(n_images=2, targeted=False, budget=60)
    attack = make_attack("nes", samples=10, targeted=False)
    sizes = []
    for width in (16, 4096):  # 1.4K vs 300K parameters
        clean = scorer_of(width)
        sizes.append(len(program_text(make_runner(attack, Oracle(output_noise(clean, 0.01)), clean, protocol))))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0], sizes
    # the witness: the same runner closed over by a plain jit grows by the params' text
    clean = scorer_of(4096)
    runner = make_runner(attack, Oracle(output_noise(clean, 0.01)), clean, protocol)
    closed = len(jax.jit(lambda *a: runner(*a)).lower(*inputs()).as_text())
    assert closed > 10 * sizes[1]


def test_program_size_does_not_grow_with_the_pool():
    protocol = Protocol(n_images=2, targeted=True, budget=500)
    clean = scorer_of(16)
    sizes = []
    for n_pool in (20, 20_000):
        pool = jax.random.uniform(jax.random.key(5), (n_pool, 8, 8, 1))
        ctx = Context(pool, jnp.arange(n_pool, dtype=jnp.int32) % 10)
        attack = make_attack("hsja", ctx, targeted=True)
        x, labels, _, ka, kd, kc = inputs()
        targets = (labels + 1) % 10
        runner = make_runner(attack, Oracle(clean, "label"), clean, protocol)
        sizes.append(len(compile_runner(runner).lower(x, labels, targets, ka, kd, kc).as_text()))
    assert abs(sizes[1] - sizes[0]) < 0.02 * sizes[0], sizes


def test_compiled_runner_matches_the_closure_and_shares_its_program():
    protocol = Protocol(n_images=2, targeted=False, budget=60)
    attack = make_attack("nes", samples=10, targeted=False)
    results = []
    for seed in (0, 1):
        clean = scorer_of(32, seed)
        runner = make_runner(attack, Oracle(output_noise(clean, 0.01)), clean, protocol)
        res = compile_runner(runner)(*inputs())
        ref = jax.jit(lambda *a: runner(*a))(*inputs())
        for a, b in zip(jax.tree.leaves(res), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a, b)
        results.append(res)
    # two models of the same shapes: one program (the second call hit the cache)
    size = pytree._SHARED._cache_size()
    clean = scorer_of(32, 2)
    compile_runner(make_runner(attack, Oracle(output_noise(clean, 0.01)), clean, protocol))(*inputs())
    assert pytree._SHARED._cache_size() == size


def test_array_level_is_an_argument():
    clean = scorer_of(16)
    x = jnp.ones((2, 8, 8, 1))
    keys = jax.random.split(jax.random.key(0), 2)
    size = pytree._SHARED._cache_size()
    outs = [pytree.call(output_noise(clean, jnp.float32(s)), x, keys) for s in (0.0, 0.01, 0.1)]
    assert pytree._SHARED._cache_size() == size + 1  # one program for every level
    np.testing.assert_array_equal(outs[0], clean(x, keys))  # level 0 as an array adds zero noise
    np.testing.assert_allclose(outs[2], output_noise(clean, 0.1)(x, keys), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="sigma"):
        output_noise(clean, jnp.float32(-1.0))



TRACES = []


class Counted(nn.Module):
    """A linear model that records each trace of its forward pass (a Python side effect at trace time)."""

    tag: object = 0  # hashable by default; an array here makes the module unhashable

    @nn.compact
    def __call__(self, x, train=False):
        TRACES.append(x.shape)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("hashable", [True, False])
def test_the_model_is_traced_once_per_batch_shape_however_many_places_ask(hashable):
    model = Counted() if hashable else Counted(np.zeros(3))
    params = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))["params"]
    scorer = model_scorer(model, params)
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))

    def many(x):  # three places ask 4 points, one place 2
        a = scorer(x, None)
        b = jax.lax.fori_loop(0, 2, lambda i, acc: acc + scorer(x * 0.5, None), jnp.zeros((4, 10)))
        c = jax.lax.cond(x[0, 0, 0, 0] > 0.5, lambda: scorer(x, None), lambda: scorer(x * 2, None))
        return a + b + c, scorer(x[:2], None)

    TRACES.clear()
    out = jax.jit(many)(x)
    if hashable:
        assert TRACES == [(4, 8, 8, 1), (2, 8, 8, 1)]
    else:  # an unhashable module is traced at every place, with the same answers
        assert len(TRACES) == 5
    d = params["Dense_0"]
    np.testing.assert_allclose(out[1], jax.nn.softmax(x[:2].reshape(2, -1) @ d["kernel"] + d["bias"], -1), rtol=1e-6)
