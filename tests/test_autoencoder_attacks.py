"""ZOO-AE / AutoZOOM-AE and their autoencoder (rnd_jax.autoencoder, rnd_jax.attacks.score.autoencoder_zoo).

The registry battery (tests/test_attack_battery.py) runs both attacks on the undefended model (success, replay,
alone = batch, budget); here: the trained autoencoder, the points the attacks ask, the decoder's weights as
arguments of one compiled program, bad input, and the grids that use them.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import autoencoder, data, grids, pytree, sweep
from rnd_jax.attacks import Context, driver, make_attack
from rnd_jax.attacks.score.autozoom import unit_directions
from rnd_jax.oracle import Oracle

NAMES = ("zoo_ae", "autozoom_ae")


@pytest.fixture(scope="module")
def trained(cache_dir):
    """The default digits autoencoder, trained once per session in its cache (the battery uses the same one)."""
    return autoencoder.load_or_train("digits", cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def decoder(trained):
    return autoencoder.decoder(*trained)


def test_autoencoder_reconstructs_digits_better_than_the_mean_image(trained, cache_dir):
    module, params = trained
    x_train, _ = data.load("digits", "train")
    x_test, _ = data.load("digits", "test")
    err = autoencoder.mse(module, params, x_test)
    mean_err = float(np.mean((x_test - x_train.mean(0)) ** 2))
    assert err < 0.5 * mean_err, (err, mean_err)  # measured: 0.021 vs 0.074
    # the cache entry holds these params (a second call loads them) and records the same numbers
    _, again = autoencoder.load_or_train("digits", cache_dir=cache_dir, progress=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = autoencoder.read_meta("digits", cache_dir=cache_dir)
    assert meta["latent_shape"] == [4, 4, 1] and meta["test_mse"] == pytest.approx(err, rel=1e-5)
    # the decoder has no biases: the zero code is the zero perturbation
    dec = autoencoder.decoder(module, params)
    assert dec.latent_shape == (4, 4, 1) and dec.image_shape == (8, 8, 1)
    np.testing.assert_array_equal(np.asarray(dec(jnp.zeros((3, 4, 4, 1)))), 0.0)


class _Stash:
    """An oracle that answers with the clean model and keeps the (traced) points it was asked."""

    def __init__(self, scorer):
        self.scorer, self.points = scorer, []

    def __call__(self, x):
        self.points.append(x)
        return self.scorer(x, None)


def _step_points(bundle, state):
    attack, scorer = bundle
    oracle = _Stash(scorer)
    state, _ = attack.step(state, oracle)
    return state, oracle.points[0]


@pytest.mark.parametrize("name", NAMES)
def test_points_lie_in_the_decoders_range(name, decoder, clean_scorer):
    """Every point asked is ``x0 + D(code)``: the current code, or the probes' codes (ZOO-AE: the pairs
    ``z +- h e_i``; AutoZOOM-AE: ``z + beta u_j``, ``u_j`` on the unit sphere, ``beta = 1/d'``); the iterate
    is ``x0 + D(z)``. A mid-grey image and a large l2 ball keep every point inside the box and the ball, so
    no projection hides a point outside the range."""
    x0 = jnp.full((8, 8, 1), 0.5, jnp.float32)
    attack = make_attack(name, Context(autoencoder=decoder), eps=100.0, norm="l2", targeted=True)
    state = attack.init(jax.random.key(3), x0, 0, 7)
    latent = decoder.latent_shape
    d = int(np.prod(latent))
    step = pytree.jit(_step_points)
    for s in range(3):
        z = np.asarray(state.z if name == "zoo_ae" else state.delta)
        np.testing.assert_allclose(np.asarray(state.x), np.asarray(x0 + decoder(z)), atol=1e-6)
        state, pts = step((attack, clean_scorer), state)
        pts = np.asarray(pts)
        assert pts.shape[0] == attack.cost and 0.0 < pts.min() and pts.max() < 1.0
        np.testing.assert_allclose(pts[0], np.asarray(x0 + decoder(z)), atol=1e-6)  # the current point
        if name == "zoo_ae":
            e = np.eye(d, dtype=np.float32).reshape((d,) + latent)
            plus, minus = (np.asarray(x0 + decoder(z + sign * 1e-4 * e)) for sign in (1, -1))  # [d', H, W, C]
            gap = lambda p, c: np.abs(p[:, None] - c[None]).reshape(len(p), d, -1).max(-1)  # noqa: E731
            # probe pair k is (x0 + D(z + h e_i), x0 + D(z - h e_i)) for one latent coordinate i
            pair = np.maximum(gap(pts[1::2], plus), gap(pts[2::2], minus))
            assert (pair.min(1) < 1e-6).all(), pair.min(1)
        else:
            u = unit_directions(jax.random.fold_in(jax.random.key(3), s), 1, latent)
            np.testing.assert_allclose(pts[1:], np.asarray(x0 + decoder(z + u / d)), atol=1e-6)
    assert np.abs(np.asarray(state.x) - np.asarray(x0)).max() > 0  # it moved


def _run(bundle, x, y, t, ka, kd):
    attack, scorer = bundle
    return driver.run(attack, Oracle(scorer, attack.output), x, y, t, ka, kd, 60)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_weights_are_arguments(name, decoder, clean_scorer, attack_set):
    """Two decoders of the same shapes (trained, untrained) run in one compiled program, with different
    results: the weights travel as the program's arguments (array leaves of the attack), not as constants. The
    second attack is the first's static part with the other decoder's arrays (what a sweep does when it swaps
    weights)."""
    attack = make_attack(name, Context(autoencoder=decoder), targeted=True)
    arrays, static = pytree.partition(attack)
    assert {id(a) for a in jax.tree.leaves(decoder)} <= {id(a) for a in arrays if a is not None}
    other = make_attack(name, Context(autoencoder=autoencoder.placeholder((8, 8, 1))), targeted=True)
    swapped = pytree.combine(pytree.partition(other)[0], static)
    def run(*args):
        return _run(*args)

    run.__name__ = run.__qualname__ = f"ae_weights_{name}"  # chex counts traces per function name
    fn = pytree.jit(chex.assert_max_traces(run, n=1))  # a second trace (weights compiled in) fails the test
    sel = attack_set
    ka, kd = jax.random.split(jax.random.key(0), 2), jax.random.split(jax.random.key(1), 2)
    out = [np.asarray(fn((a, clean_scorer), sel.images[:2], sel.labels[:2], sel.targets[:2], ka, kd).x_adv)
           for a in (attack, swapped)]
    assert np.abs(out[0] - out[1]).max() > 1e-3  # the weights passed in are the ones used


def test_bad_input_raises(decoder):
    ctx = Context(autoencoder=decoder)
    for name, kw in (("zoo_ae", dict(coords=0)), ("zoo_ae", dict(coords=17)), ("zoo_ae", dict(h=-1.0)),
                     ("autozoom_ae", dict(q=0)), ("autozoom_ae", dict(beta=float("nan"))),
                     ("autozoom_ae", dict(eps=0.0)), ("zoo_ae", dict(norm="l1"))):
        with pytest.raises(ValueError):
            make_attack(name, ctx, **kw)
    for name in NAMES:
        with pytest.raises(ValueError, match="autoencoder"):
            make_attack(name, Context())  # no decoder
        wrong = make_attack(name, Context(autoencoder=autoencoder.placeholder((16, 16, 1))))
        with pytest.raises(ValueError, match="shape"):
            wrong.init(jax.random.key(0), jnp.zeros((8, 8, 1)), 0, 1)  # decoder for 16x16 images, 8x8 image
    with pytest.raises(ValueError, match="autoencoder"):
        Context(autoencoder=lambda z: z)  # a callable without its shapes
    for kw in (dict(width=0), dict(epochs=1.5), dict(latent=0), dict(learning_rate=float("inf")), dict(seed=-1)):
        with pytest.raises(ValueError):
            autoencoder.AutoencoderConfig(**kw)
    with pytest.raises(ValueError, match="latent side"):
        autoencoder.build((8, 8, 1), autoencoder.AutoencoderConfig(latent=3))
    with pytest.raises(ValueError):
        autoencoder.load_or_train("digits", cfg={"width": 8})


NEW_GRIDS = ("aithal_table4", "aithal_table11", "rfd_table5_aaa")


def test_grids_with_the_new_attacks_expand_and_validate():
    """The new grids and the Aithal & Li tables that list ZOO-AE / AZ-AE expand at every size and every cell
    is valid (attack configs, budgets, defenses) before anything runs."""
    for name in NEW_GRIDS + ("aithal_table2", "aithal_table5", "aithal_table9"):
        grid = grids.GRIDS[name]
        assert grid["table"]["note"] and "Differs" in grid["table"]["note"], name
        assert not sweep.missing_attacks(grid), name
        for size in sweep.SIZES:
            cells = sweep.expand(sweep.resolve(grid, size))
            assert cells, (name, size)
            sweep.plan(cells)
    full = {c.d["attack"]["name"] for c in sweep.expand(sweep.resolve(grids.GRIDS["aithal_table2"], "full"))}
    assert {"zoo_ae", "autozoom_ae"} <= full
    t9 = sweep.expand(sweep.resolve(grids.GRIDS["aithal_table9"], "default"))
    assert "autozoom_ae" in {c.d["attack"]["name"] for c in t9} and not any(c.d["targeted"] for c in t9)
    aaa = {c.d["defense"]["name"] for c in sweep.expand(sweep.resolve(grids.GRIDS["rfd_table5_aaa"], "default"))}
    assert "aaa" in aaa
