"""Decision-based attacks: the failure modes other libraries are known for, checked on ours.

Each test is parametrized over the decision attacks of the registry (``family == "decision"``):

- one image without a starting point is marked ``failed`` while the rest of the batch runs on
  (Foolbox issue 541: one failed initialization failed the whole batch), untargeted (a model that
  never answers adversarial for it) and targeted (no pool image of its target class);
- images that are adversarial already (every search interval collapses to a point, every
  gradient-estimate vote agrees) give finite numbers, no NaN (ART issue 307 / Foolbox issue 670:
  HSJA's binary-search threshold ``dist * theta`` = 0 gave 0/0);
- every attack ends within its budget when nothing / everything / a random part of its queries is
  answered adversarial (Foolbox issue 435: the Boundary Attack looping forever);
- the returned point is the best adversarial point found (ART issue 923), also when the iterate
  wanders off under a noisy oracle;
- on a slightly stochastic model, points the attack believes adversarial from one lucky answer
  are rejected by the protocol's majority-of-9 check (Foolbox issue 243).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from jax.tree_util import Partial

from rnd_jax import data, pytree
from rnd_jax.attacks import ATTACKS, Context, driver, make_attack
from rnd_jax.evaluate import Protocol, compile_runner, make_runner, summarize
from rnd_jax.oracle import Oracle

DECISION = sorted(n for n, s in ATTACKS.items() if s.family == "decision")


@pytest.fixture(scope="module")
def pool():
    return data.load("digits", "train")


def _scripted(clean, p, const, x, keys):
    """``clean``'s top-1 class (or class ``const`` for every input, if ``const >= 0``), replaced by a random
    other class with probability ``p`` per query."""
    top = jnp.argmax(clean(x, None), -1)
    top = jnp.where(const >= 0, const, top)
    k = jax.vmap(jax.random.split)(keys)
    flip = jax.vmap(lambda kk: jax.random.uniform(kk) < p)(k[:, 0])
    other = (top + jax.vmap(lambda kk: jax.random.randint(kk, (), 1, 10))(k[:, 1])) % 10
    return jax.nn.one_hot(jnp.where(flip, other, top), 10)


def scripted(clean, p: float = 0.0, const: int = -1):
    """A label model as a pytree whose behaviour is in its leaves (``p``, ``const``), so the tests below that
    share an attack and a budget share one compiled program."""
    return Partial(_scripted, clean, jnp.float32(p), jnp.int32(const))


def constant_scorer(clean, cls: int):
    """A model that answers class ``cls`` for every input."""
    return scripted(clean, 0.0, cls)


def flip_scorer(clean, p: float):
    """``clean``'s top-1 class, replaced by a random other class with probability ``p`` per query."""
    return scripted(clean, p)


def build(name, ctx, targeted, **over):
    spec = ATTACKS[name]
    cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
    cfg.update(targeted=targeted, **over)
    return make_attack(name, ctx, **cfg)


def run_states(attack, scorer, x, y, t, budget, seed=0):
    """Final carries (state + queries) of a vmapped batch, jitted."""
    n = len(y)
    return as_np(_STATES((attack, Oracle(scorer, "label"), budget), x, y, t, keys(seed, n), keys(seed + 1, n)))


def _final_states(bundle, x, y, t, ka, kd):
    attack, oracle, budget = bundle

    def one(x, y, t, ka, kd):
        c = driver.start(attack, ka, x, y, t, budget)
        return driver.advance(attack, oracle, c, kd, budget)

    return jax.vmap(one)(x, y, t, ka, kd)


_STATES = pytree.jit(_final_states)  # the pool and the params are arguments of the program


_RUN_ON = {}


def run_on_attack(name, pool):
    """The untargeted attack run to the budget (``eps=None``), built once per attack: the missing-start and
    the noisy-answers tests run it in one compiled program (the scorers differ only in their leaves)."""
    if name not in _RUN_ON:
        _RUN_ON[name] = build(name, Context(train_images=pool[0], train_labels=pool[1]), False, eps=None)
    return _RUN_ON[name]


def run_on_budget(attack):
    """The budget of the two untargeted run-to-the-budget tests (one program per attack for both)."""
    return max(3 * attack.cost, 200) + 7


def dist(a, b, norm):
    d = (np.asarray(a) - np.asarray(b)).reshape(len(a), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


def grouped(names, slow=()):
    """One param per attack, grouped per attack on one xdist worker (``--dist loadgroup``), which then
    compiles the program the missing-start and noisy-answers tests share once; those in ``slow`` marked slow."""
    return [pytest.param(n, marks=[pytest.mark.xdist_group(f"decision-{n}")] + ([pytest.mark.slow] if n in slow else []))
            for n in names]


@pytest.mark.parametrize("name", grouped(DECISION))
def test_missing_start_fails_one_image_and_collapsed_searches_give_no_nan(name, pool, attack_set, clean_scorer):
    """A model that always answers the label of image 0: no start exists for image 0, which fails
    alone; for the others (other labels) every point, x0 included, is adversarial, so every search
    interval collapses to a point and every vote agrees -- the run goes on at distance ~0, no NaN."""
    spec = ATTACKS[name]
    sel = attack_set
    assert sel.labels[0] not in sel.labels[1:4]
    attack = run_on_attack(name, pool)  # run on to the budget
    budget = run_on_budget(attack)
    c = run_states(attack, constant_scorer(clean_scorer, int(sel.labels[0])), sel.images[:4], sel.labels[:4], sel.targets[:4], budget)
    assert c.state.failed[0] and not c.state.done[0]
    np.testing.assert_array_equal(c.state.x[0], sel.images[0])
    assert 0 < c.queries[0] <= budget - attack.cost  # stopped by the failure, not by the budget
    assert not c.state.failed[1:].any() and (c.queries[1:] > budget - attack.cost).all()  # the rest ran on
    assert (c.state.step[1:] >= 2).all()
    recorded = c.trace_loss[c.trace_queries >= 0]  # unused trace slots are NaN by the driver's convention
    for leaf in jax.tree.leaves(c.state) + [recorded]:
        if np.issubdtype(np.asarray(leaf).dtype, np.floating):
            assert not np.isnan(leaf).any(), name
    x = c.state.x[1:]
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert (dist(x, sel.images[1:4], spec.battery["norm"]) <= 1e-2).all(), name


@pytest.mark.parametrize("name", DECISION)
def test_target_class_missing_from_pool_fails_that_image_only(name, pool, attack_set, clean_scorer):
    spec = ATTACKS[name]
    if not spec.supports_targeted:
        pytest.skip(f"{name} is untargeted only")
    sel = attack_set
    t0 = sel.targets[0]
    assert t0 not in sel.targets[1:4]
    keep = pool[1] != t0
    ctx = Context(train_images=pool[0][keep], train_labels=pool[1][keep])
    attack = build(name, ctx, True)
    budget = 3 * attack.cost + 7
    c = run_states(attack, clean_scorer, sel.images[:4], sel.labels[:4], sel.targets[:4], budget)
    assert c.state.failed[0] and c.queries[0] == 0 and c.state.step[0] == 1  # failed at once, no query
    np.testing.assert_array_equal(c.state.x[0], sel.images[0])
    assert not c.state.failed[1:].any() and (c.queries[1:] > 0).all()
    pred = np.asarray(jnp.argmax(clean_scorer(c.state.x[1:], None), -1))
    assert (pred == sel.targets[1:4]).all()


# OPT shares Sign-OPT's ray search (decision/_common.ray_attack) and hsja_linf HSJA's code: -m slow here
SHARED_CODE = ("opt", "hsja_linf")


@pytest.mark.parametrize("name", grouped(DECISION, slow=SHARED_CODE))
def test_noisy_answers_end_within_budget_and_the_best_point_is_returned(name, attack_set, pool, clean_scorer):
    """A model whose answer is a random wrong class 30% of the time: every loop still ends within the
    budget with finite numbers (the eager count of the points asked is the battery's
    ``test_eager_counter_proves_budget``), and ``x`` is the closest point answered adversarial even
    when the iterate wanders off: the recorded distance never increases and ends at the returned
    point's distance; where the attack keeps a separate iterate (HSJA, GeoDA), it is never closer than
    the returned point."""
    spec = ATTACKS[name]
    norm = spec.battery["norm"]
    attack = run_on_attack(name, pool)
    sel = attack_set
    n = 4
    budget = run_on_budget(attack)
    c = run_states(attack, flip_scorer(clean_scorer, 0.3), sel.images[:n], sel.labels[:n], sel.targets[:n], budget)
    assert (c.queries <= budget).all() and (c.queries > budget - attack.cost).all(), name
    assert (c.state.step <= budget).all()  # every step asks at least one point (or ends the image)
    x = c.state.x
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
    d = dist(x, sel.images[:n], norm)
    np.testing.assert_allclose(d, c.state.dist, rtol=1e-5, atol=1e-7)
    for i in range(n):
        tr = c.trace_loss[i][c.trace_queries[i] >= 0]
        tr = tr[np.isfinite(tr)]
        assert len(tr) >= 2 and (np.diff(tr) <= 1e-6).all(), (name, i, tr)
        assert d[i] <= tr.min() + 1e-6, (name, i)
    if hasattr(c.state, "dist_b"):  # a separate iterate is never closer than the returned point
        assert (c.state.dist_b >= c.state.dist - 1e-6).all()


# The majority check belongs to the protocol, not to an attack: three attacks of different kinds run by
# default (a random walk, a gradient estimate, a sign estimate); the others run with -m slow.
MAJORITY_FAST = ("boundary", "hsja", "signopt")


@pytest.mark.parametrize("name", [n if n in MAJORITY_FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in DECISION])
def test_majority_vote_rejects_lucky_false_adversarials(name, attack_set, pool, clean_scorer):
    """A model that answers a random wrong class 10% of the time: the attack stops on single lucky
    answers near x0; the protocol's majority of 9 fresh answers rejects those points."""
    spec = ATTACKS[name]
    ctx = Context(train_images=pool[0], train_labels=pool[1])
    attack = build(name, ctx, False)
    sel = attack_set
    noisy = flip_scorer(clean_scorer, 0.1)
    protocol = Protocol(n_images=10, targeted=False, budget=min(spec.battery["budget"], 4 * attack.cost + 7),
                        eps=spec.battery["eps"], norm=spec.battery["norm"])
    runner = compile_runner(make_runner(attack, Oracle(noisy, "label"), clean_scorer, protocol))
    n = 10
    kc = keys(2, n)
    res, votes, clean_pred = runner(sel.images, sel.labels, sel.targets, keys(0, n), keys(1, n), kc)
    m = summarize(sel, res, votes, clean_pred, False, protocol.check_queries, protocol.eps, protocol.norm)
    lucky = np.asarray(res.lucky)
    fooled = np.asarray(clean_pred) != sel.labels
    false_adv = lucky & ~fooled
    assert false_adv.any(), name  # the noise does fool the attack's own single-answer check
    assert (np.asarray(votes)[false_adv] <= 0.5).all(), name  # ... and the majority check rejects them all
    assert m["asr"] <= m["asr_lucky"] and abs(m["asr"] - m["asr_clean"]) <= 0.1, (name, m)
