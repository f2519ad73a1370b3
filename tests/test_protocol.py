"""The evaluation protocol's choices: stop rules, query conventions, image pools and robust accuracy.

The stop-rule tests use a model that answers a uniformly random class other than its clean top-1
with probability 10% per query: a lucky answer is then the only way a non-adversarial point can look
adversarial, so the undefended model tells a lucky stop from a real one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax.attacks import driver, make_attack
from rnd_jax.attacks.adaptive import eot
from rnd_jax.evaluate import Protocol, QueryTap, Selection, robust_accuracy, select_images, summarize, tap_scorer
from rnd_jax.oracle import Oracle

RATE = 0.1
EPS = 0.15


def lucky_scorer(clean, rate=RATE, num_classes=10):
    """``clean`` that answers, with probability ``rate`` per query, a one-hot of a random wrong class."""

    def scores(x, keys_):
        p = clean(x, None)
        top = jnp.argmax(p, -1)
        pairs = jax.vmap(lambda k: jax.random.split(k))(keys_)
        u = jax.vmap(jax.random.uniform)(pairs[:, 0])
        shift = jax.vmap(lambda k: jax.random.randint(k, (), 1, num_classes))(pairs[:, 1])
        wrong = jax.nn.one_hot((top + shift) % num_classes, num_classes, dtype=p.dtype)
        return jnp.where((u < rate)[:, None], wrong, p)

    return scores


def _fooled(clean, x_adv, labels):
    return np.asarray(jnp.argmax(clean(jnp.asarray(x_adv), None), -1)) != labels


@pytest.fixture(scope="module")
def untargeted_set(clean_scorer, digits_test):
    x, y = digits_test
    return select_images(jax.random.key(3), clean_scorer, x, y, 12, False, 10)


@pytest.fixture(scope="module")
def nes_rules(clean_scorer, untargeted_set):
    """Untargeted NES (J = 20, eps 0.15, 2 000 queries) on the lucky model, under every stop rule (one program)."""
    sel, n = untargeted_set, len(untargeted_set.labels)
    attack = make_attack("nes", None, targeted=False, eps=EPS, samples=20)
    oracle = Oracle(lucky_scorer(clean_scorer))
    stop = driver.StopRule(eps=EPS)
    f = jax.jit(lambda rule: driver.run(attack, oracle, sel.images, sel.labels, sel.targets, keys(0, n), keys(1, n),
                                        2_000, stop=stop, check_keys=keys(2, n), clean=clean_scorer, rule=rule))
    return {name: as_np(f(i)) for i, name in enumerate(driver.STOP_RULES)}


def test_single_stops_on_lucky_answers(nes_rules, clean_scorer, untargeted_set):
    res = nes_rules["single"]
    fooled = _fooled(clean_scorer, res.x_adv, untargeted_set.labels)
    assert res.success.all()  # every image stops long before 2 000 queries ...
    # ... most of them on a point the model does not really misclassify: a lucky 10% answer
    assert (res.success & ~fooled).sum() >= len(fooled) // 2, (res.success, fooled, res.queries)
    np.testing.assert_array_equal(res.check_queries, 0)


def test_verified_keeps_attacking_and_ends_only_on_confirmed_successes(nes_rules, clean_scorer, untargeted_set):
    single, ver = nes_rules["single"], nes_rules["verified"]
    fooled = _fooled(clean_scorer, ver.x_adv, untargeted_set.labels)
    # A non-adversarial point passes a majority of 9 lucky answers with P[Bin(9, 0.1) >= 5] < 1e-3 per claim:
    # over the few dozen claims of this run, more than one false confirmation would be a broken rule.
    rejected_claims = int(ver.claims.sum() - ver.success.sum())
    assert rejected_claims >= 5, ver.claims  # claims were rejected and the attack went on
    assert (ver.success & ~fooled).sum() <= 1, (ver.success, fooled)
    assert ver.success.sum() >= 1
    # 9 checks per claim at a new point (a claim at the last rejected point is not checked again), never counted
    assert (ver.check_queries % 9 == 0).all() and (ver.check_queries <= 9 * ver.claims).all()
    assert (ver.check_queries >= 9 * ver.success).all()
    assert (ver.queries <= 2_000).all()
    lucky_single = single.success & ~_fooled(clean_scorer, single.x_adv, untargeted_set.labels)
    # ... and an image that single ended on a lucky answer runs on past that point
    assert (ver.queries[lucky_single] > single.queries[lucky_single]).all()
    # the attack's own last verdict may still be a (rejected) claim: lucky is kept apart from success
    assert (ver.success <= ver.lucky).all()


def test_clean_rule_ends_only_where_the_undefended_model_is_fooled(nes_rules, clean_scorer, untargeted_set):
    res = nes_rules["clean"]
    fooled = _fooled(clean_scorer, res.x_adv, untargeted_set.labels)
    np.testing.assert_array_equal(res.success, res.success & fooled)
    assert res.success.any() and (res.claims > res.success).any()
    np.testing.assert_array_equal(res.check_queries, 0)


def test_loss_queries_leave_out_the_success_checks(nes_rules):
    for res in nes_rules.values():  # NES asks one pure success check (its current point) per step
        np.testing.assert_array_equal(res.loss_queries, res.queries - res.steps)


@pytest.mark.parametrize("count", [False, True])
def test_host_counter_sees_every_check(count, clean_scorer, untargeted_set):
    """A host-side counter of every model call (``tap_scorer``, compiled) sees the attack's queries and the
    verified rule's checks: with ``count`` the checks are in the budgeted count (which stays within the
    budget), without it they are reported apart."""
    sel = untargeted_set
    attack = eot(make_attack("nes", None, targeted=False, eps=EPS, samples=4), 2)
    budget = 250
    counter = QueryTap()
    scorer = tap_scorer(lucky_scorer(clean_scorer, rate=0.5), clean_scorer, counter)
    stop = driver.StopRule("verified", count=count)
    res = jax.jit(lambda: driver.run_one(attack, Oracle(scorer), sel.images[0], sel.labels[0], -1, jax.random.key(0),
                                         jax.random.key(1), budget, stop=stop, check_key=jax.random.key(2)))()
    jax.effects_barrier()
    # EOT does not repeat the evaluator's checks: 9 per verified claim
    assert int(res.claims) >= 2 and int(res.check_queries) % 9 == 0 and int(res.check_queries) >= 18
    assert int(res.queries) <= budget
    if count:
        assert counter.n == int(res.queries)
        assert int(res.loss_queries) == int(res.queries) - int(res.check_queries) - attack.checks * int(res.steps)
    else:
        assert counter.n == int(res.queries) + int(res.check_queries)
        assert int(res.loss_queries) == int(res.queries) - attack.checks * int(res.steps)


def test_verified_decision_attack_on_the_lucky_model(clean_scorer, untargeted_set, digits_test):
    """RayS claims success on lucky answers too; under the verified rule only confirmed points end an image."""
    sel, n = untargeted_set, 6
    attack = make_attack("rays", None, targeted=False, eps=EPS)
    oracle = Oracle(lucky_scorer(clean_scorer), "label")
    f = jax.jit(lambda rule: driver.run(attack, oracle, sel.images[:n], sel.labels[:n], sel.targets[:n], keys(3, n),
                                        keys(4, n), 1_000, stop=driver.StopRule(eps=EPS), check_keys=keys(5, n),
                                        clean=clean_scorer, rule=rule))
    single, ver = as_np(f(0)), as_np(f(1))
    fooled_single = _fooled(clean_scorer, single.x_adv, sel.labels[:n])
    fooled_ver = _fooled(clean_scorer, ver.x_adv, sel.labels[:n])
    assert (single.success & ~fooled_single).any()
    assert (ver.success & ~fooled_ver).sum() <= 1
    # RayS keeps claiming its best point at every step; that point is verified once, not at every claim
    assert (ver.check_queries < 9 * ver.claims).any() and (ver.check_queries % 9 == 0).all()


def test_bad_rules_raise():
    for kw in (dict(name="majority"), dict(checks=0), dict(checks=True), dict(count=1), dict(norm="l1"),
               dict(eps=-1.0), dict(eps=float("nan"))):
        with pytest.raises(ValueError):
            driver.StopRule(**kw)
    for kw in (dict(stop_rule="lucky"), dict(pool="some"), dict(count_checks="yes"), dict(balanced=1)):
        with pytest.raises(ValueError):
            Protocol(**kw)
    attack = make_attack("nes", None, targeted=False, eps=EPS, samples=4)
    with pytest.raises(ValueError, match="check keys"):
        driver.run_one(attack, Oracle(lambda x, k: jnp.ones((x.shape[0], 10)) / 10), jnp.zeros((8, 8, 1)), 0, -1,
                       jax.random.key(0), jax.random.key(1), 50, stop=driver.StopRule("verified"))
    with pytest.raises(ValueError):
        driver.run_one(attack, Oracle(lambda x, k: jnp.ones((x.shape[0], 10)) / 10), jnp.zeros((8, 8, 1)), 0, -1,
                       jax.random.key(0), jax.random.key(1), 50, rule=3)


# ----------------------------------------------------------------------------- images and robust accuracy

def test_pool_all_and_balanced_selection(clean_scorer, digits_test):
    x, y = digits_test
    k = jax.random.key(11)
    correct = select_images(k, clean_scorer, x, y, 40, False, 10)
    assert correct.selected == 40 and len(correct.labels) == 40
    every = select_images(k, clean_scorer, x, y, 40, False, 10, pool="all")
    pred = np.asarray(jnp.argmax(clean_scorer(jnp.asarray(x), None), -1))
    order = np.asarray(jax.random.permutation(jax.random.split(k)[0], len(y)))[:40]
    np.testing.assert_array_equal(every.index, order[pred[order] == y[order]])  # the correct ones of the first 40
    assert every.selected == 40
    bal = select_images(k, clean_scorer, x, y, 43, True, 10, pool="correct", balanced=True)
    counts = np.bincount(bal.labels, minlength=10)
    np.testing.assert_array_equal(counts, [5, 5, 5, 4, 4, 4, 4, 4, 4, 4])
    assert (bal.targets != bal.labels).all()
    bal_all = select_images(k, clean_scorer, x, y, 30, False, 10, pool="all", balanced=True)
    assert bal_all.selected == 30 and np.bincount(y[bal_all.index], minlength=10).max() <= 3


def test_robust_accuracy_over_attacked_and_selected():
    sel = Selection(np.arange(4), np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int32), -np.ones(4, np.int32),
                    n_selected=5)  # one of the 5 selected images was misclassified and not attacked
    ok = np.array([True, False, False, True])
    q = np.array([10, 5, 7, 300])
    assert robust_accuracy(sel, ok) == (0.5, 2 / 5)
    assert robust_accuracy(sel, ok, q, budget=100) == (0.75, 3 / 5)
    res = driver.Result(x_adv=jnp.zeros((4, 2, 2, 1)), lucky=jnp.asarray(ok), queries=jnp.asarray(q),
                        steps=jnp.asarray(q), trace_queries=None, trace_loss=None,
                        success=jnp.asarray([1, 1, 0, 0], bool),
                        loss_queries=jnp.asarray(q - 1), check_queries=jnp.asarray([9, 18, 0, 0]),
                        claims=jnp.asarray([1, 2, 0, 0]))
    votes = np.array([1.0, 0.0, 0.0, 6 / 9])
    m = summarize(sel, res, votes, np.array([1, 0, 0, 0]), False, 9)
    assert m["asr"] == 0.5 and m["robust"] == 0.5 and m["robust_all"] == 0.4
    assert m["asr_stop"] == 0.5 and m["robust_all_stop"] == 0.4 and m["asr_lucky"] == 0.5 and m["asr_clean"] == 0.25
    assert m["queries_mean"] == 155 and m["loss_queries_mean"] == 154 and m["check_queries_mean"] == 6.75
    assert m["n_selected"] == 5 and m["n_images"] == 4


def test_attacks_declare_their_pure_success_checks():
    """The point an attack asks only to check success (not in its estimate) is declared, so loss queries leave it
    out; EOT repeats it m times."""
    from rnd_jax.attacks import ATTACKS

    from rnd_jax import autoencoder, data
    from rnd_jax.attacks import ATTACKS, Context

    x, y = data.load("digits", "train")
    ctx = Context(x, y, 10, surrogate=lambda xx, kk: None, surrogates=(lambda xx, kk: None,),
                  autoencoder=autoencoder.placeholder((8, 8, 1)))
    pure_check = {"nes", "zoo", "zoo_ae", "bandits_td", "nes_pi", "subspace"}  # the answer at the current point is not in the estimate
    for name, spec in ATTACKS.items():
        cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
        attack = make_attack(name, ctx, **cfg)
        assert attack.checks == (1 if name in pure_check else 0), name
        assert eot(attack, 3).checks == 3 * attack.checks
