"""The Python entry points refuse bad input, and scores are checked (shape when traced, finiteness when run).

- ``run`` / ``run_one`` call ``validate`` on concrete inputs (NaN images, missing / out-of-range targets,
  target = label, the wrong oracle, budgets below one step or beyond int32 raise ``ValueError`` before
  anything runs); under an outer ``jit`` they check what shapes and dtypes allow.
- ``validate`` checks labels and targets against the oracle's number of classes, found without running
  the model (``jax.eval_shape``; an eager ``QueryCounter`` does not count it).
- a scorer answering the wrong shape or number of classes is refused when traced;
- a non-finite answer ends the image with ``Result.invalid`` (never a success, ``x_adv`` finite), through
  plain calls, ``live_while`` / ``live_cond`` loops and the stop rule's checks; ``evaluate_cell`` counts
  such images in ``invalid_scores``.

Toy linear scorers on 2x2x1 images keep every program tiny.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax.attacks import driver, make_attack, run, run_one, validate
from rnd_jax.attacks.driver import Attack
from rnd_jax.evaluate import Protocol, Selection, check_success, evaluate_cell, image_keys, summarize
from rnd_jax.oracle import Oracle, QueryCounter, class_count, live_cond, live_while, watch

K = 3  # classes of the toy scorer
W = np.array([[3.0, -1.0, 0.0], [0.0, 2.0, -1.0], [-1.0, 0.0, 2.0], [1.0, 1.0, -2.0]], np.float32)


def toy(x, keys):
    """Softmax of a fixed linear map of the 4 pixels: f32[B, 3]."""
    return jax.nn.softmax(x.reshape(x.shape[0], -1) @ W, -1)


def nan_far(x, keys):
    """``toy``, but NaN for points more than 0.05 (L-inf) away from the all-0.5 image."""
    far = jnp.max(jnp.abs(x.reshape(x.shape[0], -1) - 0.5), -1) > 0.05
    return jnp.where(far[:, None], jnp.nan, toy(x, keys))


X = np.full((2, 2, 2, 1), 0.5, np.float32)
Y = np.argmax(np.asarray(toy(X, None)), -1).astype(np.int32)
T = (Y + 1) % K


def nes(targeted=True):
    return make_attack("nes", targeted=targeted, samples=2, eps=0.3)


def ks(seed, n=2):
    return jax.random.split(jax.random.key(seed), n)


def go(attack=None, oracle=None, x=X, y=Y, t=T, budget=40, **kw):
    attack = nes() if attack is None else attack
    oracle = Oracle(toy) if oracle is None else oracle
    return run(attack, oracle, x, y, t, ks(0, len(y)), ks(1, len(y)), budget, **kw)


# ----------------------------------------------------------------------------- run refuses bad input

@pytest.mark.parametrize("case, match", [
    (dict(x=np.where(np.eye(2, dtype=bool)[:, :, None, None], np.nan, X)), "NaN"),
    (dict(x=X + 1.0), r"\[0, 1\]"),
    (dict(x=X.astype(np.int32)), "floating"),
    (dict(x=X[0]), "rank 4"),
    (dict(t=None), "target classes"),
    (dict(t=np.array([K, 0], np.int32)), r"targets must be class indices in 0\.\.2"),
    (dict(t=np.array([-1, 0], np.int32)), r"targets must be class indices in 0\.\.2"),
    (dict(y=np.array([0, 7], np.int32), t=np.array([1, 1], np.int32)), "labels must be class indices"),
    (dict(t=Y), "target equals the true label"),
    (dict(t=T.astype(np.float32)), "integer"),
    (dict(t=T[:1]), "targets must have shape"),
    (dict(oracle=Oracle(toy, "label")), "needs a 'scores' oracle"),
    (dict(oracle=toy), "must be an rnd_jax.oracle.Oracle"),
    (dict(budget=2), "smaller than one step"),  # NES with 2 samples asks 3 points a step
    (dict(budget=0), "positive int"),
    (dict(budget=40.0), "positive int"),
    (dict(budget=3 * 10 ** 9), "budget 3000000000 is too large"),
    (dict(trace_len=0), "trace_len"),
    (dict(stop="single"), "StopRule"),
])
def test_run_refuses_bad_input(case, match):
    with pytest.raises(ValueError, match=match):
        go(**case)


def test_run_one_refuses_bad_input_and_checks_classes():
    a, o = nes(), Oracle(toy)
    args = (jax.random.key(0), jax.random.key(1), 40)
    with pytest.raises(ValueError, match="NaN"):
        run_one(a, o, np.full((2, 2, 1), np.nan, np.float32), 0, 1, *args)
    with pytest.raises(ValueError, match=r"in 0\.\.2"):
        run_one(a, o, X[0], 0, K, *args)
    with pytest.raises(ValueError, match="target equals"):
        run_one(a, o, X[0], 1, 1, *args)
    with pytest.raises(ValueError, match="rank 3"):
        run_one(a, o, X, 0, 1, *args)
    validate(nes(False), o, 40, X[0], 0, 7, batched=False)  # an untargeted attack ignores targets


def test_traced_inputs_get_the_static_checks():
    """Under an outer jit the values are unknown: shapes, dtypes, budget and oracle are still checked; the
    values are checked by validate before jitting (the callers' pattern)."""
    a, o = nes(), Oracle(toy)
    f = lambda x, y, t: run(a, o, x, y, t, ks(0), ks(1), 40)
    with pytest.raises(ValueError, match="targets must have shape"):
        jax.jit(f)(X, Y, T[:1])
    with pytest.raises(ValueError, match="integer"):
        jax.jit(f)(X, Y.astype(np.float32), T)
    with pytest.raises(ValueError, match="too large"):
        jax.jit(lambda x, y, t: run(a, o, x, y, t, ks(0), ks(1), 2 ** 31))(X, Y, T)
    bad = X.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        validate(a, o, 40, bad, Y, T)


def test_validate_finds_the_class_count_without_running_the_model():
    counter = QueryCounter(toy)
    assert class_count(Oracle(counter), (2, 2, 1)) == K
    validate(nes(), Oracle(counter), 40, X, Y, T)
    assert counter.count == 0 and counter.calls == 0  # the abstract probe is not a query
    assert class_count(Oracle(toy, num_classes=K), (5, 5, 5)) == K  # declared: no probe
    with pytest.raises(ValueError, match="cannot answer images of shape"):
        class_count(Oracle(toy), (3, 3, 1))  # 9 pixels do not fit the 4x3 map
    with pytest.raises(ValueError, match="num_classes"):
        Oracle(toy, num_classes=1)


# ----------------------------------------------------------------------------- scores checked when traced

@pytest.mark.parametrize("scorer, match", [
    (lambda x, k: toy(x, k)[:, 0], r"f32\[B, K\]"),                # one score per point
    (lambda x, k: toy(x, k)[:1], r"for B = 5 points"),              # not one row per point
    (lambda x, k: toy(x, k)[:, :1], r"K >= 2"),                     # a single class
    (lambda x, k: jnp.argmax(toy(x, k), -1, keepdims=True) * jnp.ones((1, 3), jnp.int32), "floating"),
])
def test_scorer_of_the_wrong_shape_is_refused_at_trace_time(scorer, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: Oracle(scorer).bind(jax.random.key(0), 0)(x), jnp.zeros((5, 2, 2, 1)))


def test_scorer_with_the_wrong_number_of_classes_is_refused():
    o = Oracle(toy, num_classes=10)
    with pytest.raises(ValueError, match="answers 3 classes; the oracle declares num_classes=10"):
        jax.eval_shape(lambda x: o.bind(jax.random.key(0), 0)(x), jnp.zeros((5, 2, 2, 1)))
    with pytest.raises(ValueError, match=r"labels must be class indices in 0\.\.9"):
        go(oracle=Oracle(toy, num_classes=10), y=np.array([0, 10], np.int32), t=np.array([1, 1], np.int32))
    # the clean rule's scorer must answer as many classes as the oracle
    ten = lambda x, k: jnp.ones((x.shape[0], 10)) / 10
    with pytest.raises(ValueError, match="clean scorer"):
        jax.eval_shape(lambda: go(stop=driver.StopRule("clean"), clean=ten))


# ----------------------------------------------------------------------------- non-finite answers at run time

class S(NamedTuple):
    x: jax.Array
    step: jax.Array
    done: jax.Array


class I(NamedTuple):
    loss: jax.Array
    queries: jax.Array


def looping_attack(kind: str) -> Attack:
    """Each step moves every pixel up by 0.02 and asks 1 point there: plainly, inside a live_while or inside a
    live_cond (reported in Info.queries for the last two). Claims success after 10 steps."""

    def init(key, x0, label, target):
        return S(x0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def step(s, oracle):
        x = s.x + 0.02
        if kind == "plain":
            p, n = oracle(x[None])[0], 0
        elif kind == "while":
            p, n = live_while(lambda c: c[0] < 1, lambda c: (c[0] + 1, oracle.at(0, x[None])[0]),
                              (jnp.zeros((), jnp.int32), jnp.zeros((K,))))[1], 1
        else:
            p, n = live_cond(s.step >= 0, lambda: oracle.at(0, x[None])[0], lambda: jnp.zeros((K,))), 1
        new = S(x, s.step + 1, s.step + 1 >= 10)
        return new, I(loss=jnp.sum(p), queries=jnp.asarray(n, jnp.int32))

    return Attack(init, step, cost=1, output="scores", targeted=False)


@pytest.mark.parametrize("kind", ["while", "cond"])  # "plain": test_evaluate_cell_counts_invalid_scores
def test_non_finite_answer_ends_the_image_as_invalid(kind):
    """Steps 1 and 2 are within 0.05 of the start (finite), step 3 is not (NaN): the image stops there,
    invalid, not a success, at the point of step 2, with the 3 queries counted; on the finite scorer the same
    attack claims success after 10 steps. The answers come from inside a live_while / live_cond."""
    a = looping_attack(kind)
    f = jax.jit(lambda scorer_is_nan: run(a, Oracle(jax.tree_util.Partial(_switch, scorer_is_nan)), X, Y, None,
                                          ks(0), ks(1), 50))
    bad = f(True)
    np.testing.assert_array_equal(bad.invalid, [True, True])
    assert not bad.success.any() and not bad.lucky.any()
    np.testing.assert_array_equal(bad.queries, [3, 3])
    np.testing.assert_allclose(bad.x_adv, X + 0.04, atol=1e-6)
    good = f(False)
    assert not good.invalid.any() and good.success.all()
    np.testing.assert_array_equal(good.queries, [10, 10])


def _switch(is_nan, x, keys):
    return jnp.where(is_nan, nan_far(x, keys), toy(x, keys))


def test_watch_sees_plain_loop_and_cond_answers_only():
    """watch() collects the flag from plain calls, live_while and live_cond; a bare lax loop is not seen."""
    o = Oracle(nan_far).bind(jax.random.key(0), 0)
    far, near = jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 0.5)

    def seen(fn):
        def f():
            with watch() as w:
                fn()
            return w.invalid
        return bool(jax.jit(f)())

    assert seen(lambda: o(far)) and not seen(lambda: o(near))
    assert seen(lambda: live_while(lambda c: c < 2, lambda c: c + 1 + 0 * o.at(0, far)[0, 0].astype(jnp.int32),
                                   jnp.zeros((), jnp.int32)))
    assert seen(lambda: live_cond(True, lambda: o.at(0, far)[0], lambda: jnp.zeros(K)))
    assert not seen(lambda: live_cond(False, lambda: o.at(0, far)[0], lambda: jnp.zeros(K)))
    assert not seen(lambda: jax.lax.fori_loop(0, 2, lambda i, c: c + o.at(0, far)[0, 0], 0.0))


def test_non_finite_check_answers_of_the_verified_rule_are_invalid():
    """The attack's own answers are finite (the toy scorer); the verified rule's checker answers NaN: the first
    claim ends the image as invalid, never as a success."""
    a = looping_attack("plain")
    nan_checker = lambda x, k: jnp.full((x.shape[0], K), jnp.nan)
    res = jax.jit(lambda: driver.advance(a, Oracle(toy), driver.start(a, jax.random.key(0), X[0], 0, -1, 50),
                                         jax.random.key(1), 50, stop=driver.StopRule("verified"),
                                         check_key=jax.random.key(2), checker=nan_checker))()
    out = driver.finish(res, a, driver.StopRule("verified"))
    assert bool(out.invalid) and not bool(out.success) and not bool(out.lucky)
    assert int(out.steps) == 10 and int(out.check_queries) == 9


def test_evaluate_cell_counts_invalid_scores():
    """The looping attack on the scorer that answers NaN once it moves: both images invalid; the metrics count
    them (the sweep records these metrics) and the per-image records mark them."""
    sel = Selection(np.arange(2, dtype=np.int32), X, Y, -np.ones(2, np.int32), 2)
    protocol = Protocol(n_images=2, targeted=False, budget=30, acc_draws=1)
    keys = image_keys(jax.random.key(0), jax.random.key(1), sel.index)
    metrics, records = evaluate_cell(looping_attack("plain"), nan_far, toy, sel, keys, protocol)
    assert metrics["invalid_scores"] == 2 and records["invalid"] == [True, True]
    assert records["stopped_success"] == [False, False] and records["lucky"] == [False, False]
    assert records["queries"] == [3, 3]  # steps 1, 2 finite; step 3 NaN: stopped there, its query counted


def test_invalid_images_are_never_a_success():
    """An image flagged invalid counts as not fooled under every success notion, even where its verdicts and
    the fresh check votes say adversarial."""
    sel = Selection(np.arange(3), np.zeros((3, 2, 2, 1), np.float32), np.zeros(3, np.int32), -np.ones(3, np.int32))
    yes = jnp.ones(3, bool)
    res = driver.Result(x_adv=jnp.zeros((3, 2, 2, 1)), lucky=yes, queries=jnp.asarray([4, 5, 6]),
                        steps=jnp.asarray([4, 5, 6]), trace_queries=None, trace_loss=None, success=yes,
                        loss_queries=jnp.asarray([4, 5, 6]), check_queries=jnp.zeros(3, jnp.int32),
                        claims=jnp.ones(3, jnp.int32), invalid=jnp.asarray([False, True, False]))
    m = summarize(sel, res, np.ones(3), np.ones(3, np.int32), False, 9)
    assert m["invalid_scores"] == 1
    assert m["asr"] == m["asr_stop"] == m["asr_lucky"] == m["asr_clean"] == 2 / 3
    assert m["queries_mean"] == 5.0  # over the two valid successes (4 and 6)
    nan = lambda x, k: jnp.full((x.shape[0], K), jnp.nan)
    votes = np.asarray(jax.jit(lambda: check_success(nan, jnp.asarray(X), Y, T, ks(0), True, 9))())
    np.testing.assert_array_equal(votes, [0.0, 0.0])  # a NaN answer is not an adversarial vote
