"""EOT by repeated queries (``rnd_jax.attacks.adaptive``).

- the reductions against closed forms, with a scorer whose answers depend only on the query keys;
- counting: the model sees exactly ``m`` times the points (eager ``QueryCounter``), and
  ``at(offset, x)`` calls land on outer offsets ``offset*m``;
- every registered attack, wrapped, asks twice the points per step (traced, fast); with ``-m slow``
  each one also runs eagerly on 2 images, and on the clean (deterministic) model ``eot(attack, 2)``
  with twice the budget replays the plain attack exactly at twice the queries;
- (``tests/test_sweep.py`` checks that at equal total queries EOT does not give NES its undefended
  success back against output noise.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import autoencoder, data
from rnd_jax.attacks import ATTACKS, Context, driver, make_attack
from rnd_jax.attacks.adaptive import RepeatedOracle, eot, majority, make_adaptive
from rnd_jax.defenses import output_noise
from rnd_jax.oracle import BoundOracle, Oracle, QueryCounter, query_keys

NAMES = sorted(ATTACKS)
K = 5


@jax.jit
def _scores(keys):
    return jax.vmap(lambda k: jax.nn.softmax(3.0 * jax.random.normal(k, (K,))))(keys)


@jax.jit
def _onehot(keys):
    lab = jax.vmap(lambda k: jax.random.randint(k, (), 0, 3))(keys)
    score = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (), minval=0.4, maxval=1.0))(keys)
    return jax.nn.one_hot(lab, K) * score[:, None]


def key_scores(x, keys):
    """Answers that depend only on each query's key: a random probability vector per query."""
    return _scores(keys)


def key_onehot(x, keys):
    """A random one-hot answer (label in 0..2, many ties) per query key, score in the label's slot."""
    return _onehot(keys)


def np_majority(labels):
    """Closed form: most frequent label per row, ties to the smallest (bincount + first argmax)."""
    return np.asarray([np.argmax(np.bincount(r, minlength=K)) for r in np.asarray(labels)])


def test_majority_ties_go_to_the_smallest_label():
    got = np.asarray(majority(jnp.asarray([[2, 1, 2, 1, 0], [3, 3, 1, 1, 1], [4, 4, 4, 4, 4], [2, 0, 1, 9, 7]])))
    np.testing.assert_array_equal(got, [1, 1, 4, 0])


@pytest.mark.parametrize("m", [4])
def test_reductions_match_closed_forms(m):
    dkey, q0, n = jax.random.key(3), 17, 6
    x = jnp.zeros((n, 2, 2, 1))
    raw = lambda s, first, count: np.asarray(s(None, query_keys(dkey, first, count)))

    # scores: mean probability vector of the m answers of each point
    bound = Oracle(key_scores, "scores").bind(dkey, q0)
    rep = RepeatedOracle(bound, m)
    got = np.asarray(rep(x))
    assert bound.used == n * m and rep.used == n
    want = raw(key_scores, q0, n * m).reshape(n, m, K).mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # at(offset): inner offset o is outer offset o*m (after the n*m points above)
    got_at = np.asarray(rep.at(n + 2, x[:3]))
    want_at = raw(key_scores, q0 + (n + 2) * m, 3 * m).reshape(3, m, K).mean(1)
    np.testing.assert_allclose(got_at, want_at, rtol=1e-6, atol=1e-7)

    # labels: majority vote, ties -> smallest label
    labels = raw(key_onehot, q0, n * m).argmax(-1).reshape(n, m)
    got_lab = np.asarray(RepeatedOracle(Oracle(key_onehot, "label").bind(dkey, q0), m)(x))
    np.testing.assert_array_equal(got_lab, np_majority(labels))

    # top1: the majority label with the mean score of the answers that gave it
    p = raw(key_onehot, q0, n * m)
    lab, score = p.argmax(-1).reshape(n, m), p.max(-1).reshape(n, m)
    win = np_majority(lab)
    want_score = np.asarray([score[i][lab[i] == win[i]].mean() for i in range(n)])
    top = RepeatedOracle(Oracle(key_onehot, "top1").bind(dkey, q0), m)(x)
    np.testing.assert_array_equal(np.asarray(top.label), win)
    np.testing.assert_allclose(np.asarray(top.score), want_score, rtol=1e-6)


def test_eot_of_one_is_the_attack_and_bad_m_raises():
    attack = make_attack("nes", samples=4)
    assert eot(attack, 1) is attack
    wrapped = make_adaptive("nes", None, 3, samples=4)
    assert wrapped.cost == 3 * attack.cost and wrapped.output == attack.output
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(ValueError):
            eot(attack, bad)


def test_model_sees_m_times_the_points_under_output_noise(clean_scorer, attack_set):
    """Two eager steps (no tracing, so the counter sees concrete queries) of eot(NES, 3)."""
    m = 3
    plain = make_attack("nes", targeted=True, samples=10)
    attack = eot(plain, m)
    counter = QueryCounter(output_noise(clean_scorer, 1e-3))
    oracle = Oracle(counter, "scores")
    state = attack.init(jax.random.key(0), attack_set.images[0], attack_set.labels[0], attack_set.targets[0])
    for s in range(2):
        bound = oracle.bind(jax.random.key(1), jnp.int32(s * attack.cost))
        state, info = attack.step(state, bound)
        assert bound.used == attack.cost == m * plain.cost
        assert driver._spent(attack, bound.used, info) == m * 11  # what the driver adds to the count
    assert counter.count == 2 * 11 * m  # 2 steps of J+1 = 11 points, each asked m times
    assert counter.calls == 2  # one batched call per step


@pytest.fixture(scope="module")
def context(clean_scorer):
    x, y = data.load("digits", "train")
    # any clean scorer will do as a transfer prior here: only the query counts are checked
    return Context(train_images=x, train_labels=y, num_classes=10, surrogate=clean_scorer, surrogates=(clean_scorer,),
                   autoencoder=autoencoder.placeholder((8, 8, 1)))  # an untrained decoder: only counts checked


def _config(name):
    spec = ATTACKS[name]
    return {k: v for k, v in spec.battery.items() if k != "budget"} | {"targeted": not spec.supports_untargeted}


class SpyOracle(BoundOracle):
    """A bound oracle that logs how many points each traced call asks, plain or through ``at``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log = []

    def __call__(self, x):
        self.log.append(("call", x.shape[0]))
        return super().__call__(x)

    def at(self, offset, x):
        self.log.append(("at", x.shape[0]))
        return super().at(offset, x)


@pytest.mark.parametrize("name", NAMES)
def test_every_attack_wrapped_asks_twice_the_points(name, context, clean_scorer, attack_set):
    """Traced, not compiled: every oracle call of one eot(attack, 2) step asks twice the plain step's points."""
    plain = make_attack(name, context, **_config(name))
    wrapped = eot(plain, 2)
    assert wrapped.cost == 2 * plain.cost and wrapped.output == plain.output and wrapped.targeted == plain.targeted
    args = (jax.random.key(0), attack_set.images[0], attack_set.labels[0], attack_set.targets[0])
    spies, shapes = {}, {}
    for which, attack in (("plain", plain), ("eot", wrapped)):
        def one_step(state, dkey, attack=attack, which=which):
            spies[which] = SpyOracle(Oracle(clean_scorer, attack.output), dkey, jnp.int32(0))
            return attack.step(state, spies[which])
        state = jax.eval_shape(attack.init, *args)
        shapes[which] = jax.eval_shape(one_step, state, jax.random.key(1))
    assert spies["plain"].log, f"{name}: a step asks no points"
    assert spies["eot"].log == [(kind, 2 * n) for kind, n in spies["plain"].log], name
    assert spies["eot"].used == 2 * spies["plain"].used
    assert jax.tree.structure(shapes["eot"]) == jax.tree.structure(shapes["plain"])
    assert [a.shape for a in jax.tree.leaves(shapes["eot"])] == [a.shape for a in jax.tree.leaves(shapes["plain"])]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_attack_wrapped_runs_and_counts_twice(name, context, clean_scorer, attack_set):
    """Eager runs on 2 images: the model sees what the driver counts, and on the clean (deterministic)
    model eot(attack, 2) with twice the budget replays the plain attack at exactly twice the queries."""
    plain = make_attack(name, context, **_config(name))
    wrapped = eot(plain, 2)
    budget = 2 * plain.cost
    runs = {}
    for i, attack, b in ((0, plain, budget), (0, wrapped, 2 * budget), (1, wrapped, 2 * budget)):
        counter = QueryCounter(clean_scorer)
        with jax.disable_jit():
            res = driver.run_one(attack, Oracle(counter, attack.output), attack_set.images[i], attack_set.labels[i],
                                 attack_set.targets[i], jax.random.key(i), jax.random.key(100 + i), b)
        assert int(res.queries) == counter.count <= b, (name, i)
        runs[i, attack is wrapped] = res
    a, b = runs[0, False], runs[0, True]
    assert int(b.queries) == 2 * int(a.queries) and int(b.steps) == int(a.steps), name
    np.testing.assert_allclose(np.asarray(b.x_adv), np.asarray(a.x_adv), atol=1e-6)
