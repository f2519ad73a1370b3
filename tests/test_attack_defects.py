"""Regression tests for attack defects: each test states the behaviour the attack's reference has and
fails on the defect it guards against.

- Square: the p-schedule is stretched over the run's budget (``n_iters=None``), never jumps back to
  its initial window, and an explicit ``n_iters`` still works.
- NES label-only: each step's step-size search starts at ``lr_max`` and the radius decay recovers
  after a successful shrink, so the distance keeps decreasing late in a run.
- OPT: the distance keeps decreasing after the first shrink of ``beta``.
- HSJA: the registered name ``hsja_linf`` decides the norm.
- NES-PI: the line search's declared worst case covers an eps decrement below the floor.
- Boundary: spherical candidates are asked only every 10th step of the walk.
- SignHunter, Bandits-TD, P-RGF: the untargeted default loss is the references' cross-entropy.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax import data, losses, pytree
from rnd_jax.attacks import ATTACKS, Context, make_attack
from rnd_jax.attacks.adaptive import eot
from rnd_jax.attacks.decision.boundary import BoundaryConfig
from rnd_jax.attacks.decision.hsja import HSJAConfig
from rnd_jax.attacks.decision.nes_label_only import NESLabelOnlyConfig
from rnd_jax.attacks.score import square as sq
from rnd_jax.attacks.score.nes_pi import NESPIConfig, nes_pi
from rnd_jax.oracle import Oracle, Top1


def stepped(attack, scorer, n_steps: int, budget=None):
    """A jitted program running ``n_steps`` steps of ``attack`` on a batch, recording every state and Info.

    Each step gets a bound oracle numbered like the driver's (queries spent so far, ``budget`` as the
    driver passes it), with no stop rule and no budget check: the tests read the whole trail.
    Returns ``f(x, y, t, ka, kd) -> (states, infos, queries_before_each_step)``, leading axes
    ``[image, step]``.
    """
    compiled = pytree.jit(_trail)
    return functools.partial(compiled, (attack, Oracle(scorer, attack.output), budget, n_steps))


def _trail(bundle, x, y, t, ka, kd):
    attack, oracle, budget, n_steps = bundle

    def one(x, y, t, ka, kd):
        def body(c, _):
            s, q = c
            bound = oracle.bind(kd, q, budget)
            s2, info = attack.step(s, bound)
            dynamic = getattr(info, "queries", None)
            spent = attack.cost if dynamic is None else bound.used + jnp.asarray(dynamic, jnp.int32)
            return (s2, q + spent), (s2, info, q)

        _, trail = jax.lax.scan(body, (attack.init(ka, x, y, t), jnp.zeros((), jnp.int32)), None, length=n_steps)
        return trail

    return jax.vmap(one)(x, y, t, ka, kd)


def run_trail(attack, scorer, sel, n_images: int, n_steps: int, budget=None):
    """The first ``n_images`` images of ``sel`` attacked untargeted for ``n_steps`` steps (numpy trail)."""
    n = n_images
    f = stepped(attack, scorer, n_steps, budget)
    return as_np(f(sel.images[:n], sel.labels[:n], jnp.full((n,), -1, jnp.int32), keys(0, n), keys(1, n)))


@pytest.fixture(scope="module")
def context():
    """The digits training pool decision attacks and NES-PI start from."""
    x, y = data.load("digits", "train")
    return Context(train_images=x, train_labels=y, num_classes=10)


# ----------------------------------------------------------------------------------------- Square

@pytest.mark.parametrize("name, runs", [("square_linf", ((150, 1), (600, 2))), ("square_l2", ((200, 1),))])
def test_square_p_schedule_follows_the_budget(name, runs, clean_scorer, attack_set):
    """With the default ``n_iters=None`` the window fraction p over a run is non-increasing, starts at
    ``p_init`` and reaches the schedule's smallest value ``p_init / 512`` in the last fifth of the budget:
    for budgets 150 and 200, and 600 under EOT with 2 repeats (whose oracle budget is 300, the budget
    divided by the repeats). Untargeted with a tiny eps, so the run cannot stop early."""
    p_init = 0.05 if name == "square_linf" else 0.1
    attack = make_attack(name, targeted=False, eps=1e-3, memory=64)
    for budget, m in runs:
        inner = budget // m
        _, info, q = run_trail(eot(attack, m), clean_scorer, attack_set, 1, inner, budget)
        p = info.p[0]
        assert q[0, -1] == budget - m  # the run used the whole budget
        assert np.all(np.diff(p) <= 0), (budget, m)  # never back to a larger window
        assert p[0] == pytest.approx(p_init) and p[-1] == pytest.approx(p_init / 512), (budget, m)
        first_smallest = int(np.argmax(p <= p_init / 512 * (1 + 1e-6)))
        # the reference's last breakpoint: iteration 8000 of 10 000 (iteration = step - 1)
        assert 0.8 * inner <= first_smallest < inner, (budget, m, first_smallest)


def test_square_explicit_n_iters_still_works(clean_scorer, attack_set):
    """``n_iters=100`` in a 300-query run: the schedule ends at iteration 100 and then stays at its
    smallest window (the reference would return to ``p_init``)."""
    attack = make_attack("square_linf", targeted=False, eps=1e-3, memory=64, n_iters=100)
    _, info, _ = run_trail(attack, clean_scorer, attack_set, 1, 300, 300)
    p = info.p[0]
    assert np.all(np.diff(p) <= 0)
    smallest = np.flatnonzero(p <= 0.05 / 512 * (1 + 1e-6))
    assert 80 <= smallest[0] <= 82 and smallest[-1] == 299 and len(smallest) == 300 - smallest[0]
    # an oracle bound outside the driver (no budget): iteration = step - 1 of the documented 10 000
    assert sq.schedule_position(Oracle(clean_scorer).bind(jax.random.key(0), 0), 12, None)[1] == sq.DEFAULT_N_ITERS
    np.testing.assert_allclose([float(sq.p_schedule(0.05, it, sq.DEFAULT_N_ITERS)) for it in (10, 11)], [0.05, 0.025])


# ------------------------------------------------------------------------------- NES label-only

def test_nes_label_only_step_size_and_decay_recover(clean_scorer, attack_set, context):
    """Over ~4 000 queries on the undefended model (l_2, untargeted, run to the budget): every step's
    search starts at ``lr_max`` (a step accepted at its first proposal used ``lr_max``, also after steps
    that had backtracked to a smaller lr), the decay is restored after successful shrinks and never falls
    below ``decay_min`` (below it the ball would stop shrinking for good), and the distance still
    decreases over the second half of the run for every image."""
    attack = make_attack("nes_label_only", context, norm="l2", targeted=False)
    cfg = NESLabelOnlyConfig(norm="l2", targeted=False)
    n, steps = 4, 70
    states, info, q = run_trail(attack, clean_scorer, attack_set, n, steps)
    assert (q[:, -1] > 3_000).all()
    walk = states.found & np.concatenate([np.zeros((n, 1), bool), states.found[:, :-1]], axis=1)  # iterations
    assert (states.decay[walk] >= cfg.decay_min).all()
    acc = info.accepted & walk
    first = acc & (info.tries == 1)
    assert first.any() and np.allclose(states.lr[first], cfg.lr_max)
    # after a step that accepted a backtracked lr, a later step accepts lr_max again
    recovered = 0
    for i in range(n):
        lrs = states.lr[i][acc[i]]
        small = np.flatnonzero(lrs < cfg.lr_max * (1 - 1e-6))
        recovered += int(len(small) > 0 and np.any(np.isclose(lrs[small[0]:], cfg.lr_max)))
    assert recovered >= n // 2, recovered
    # the decay goes back up after a shrink (restored to >= decay_restore)
    dec = np.where(walk, states.decay, np.nan)
    assert (np.nan_to_num(np.diff(dec, axis=1)) > 0).any()
    half = np.array([states.dist[i][q[i] <= q[i, -1] // 2][-1] for i in range(n)])
    assert (states.dist[:, -1] < half).all(), (half, states.dist[:, -1])


# ------------------------------------------------------------------------------------------- OPT

def test_opt_keeps_improving_after_beta_shrinks(clean_scorer, attack_set, context):
    """On the undefended model OPT's distance keeps decreasing after its first ``beta`` shrink: the
    searches resolve ``g`` far below ``beta * g``, so the finite differences stay informative (with
    ``beta`` and the tolerance both floored at 1e-3 the distance stayed exactly constant from there)."""
    attack = make_attack("opt", context, targeted=False)
    n, steps = 3, 52  # about 5 000 queries; the first shrink comes after 2 300-3 100
    states, info, q = run_trail(attack, clean_scorer, attack_set, n, steps)
    shrunk = states.beta < states.beta[:, :1]
    tested = 0
    for i in range(n):
        if not shrunk[i].any():
            continue
        r = int(np.argmax(shrunk[i]))
        if steps - r < 5:
            continue
        tested += 1
        assert states.dist[i, -1] < states.dist[i, r], (i, r, q[i, r], states.dist[i, r], states.dist[i, -1])
    assert tested >= 2, shrunk.any(1)


# ------------------------------------------------------------------------------------------ HSJA

def test_hsja_linf_is_the_linf_attack_by_default(context):
    """``make_attack("hsja_linf")`` without ``norm`` builds the l_inf attack: its config is, field by
    field, ``HSJAConfig(norm="linf")`` (the builder reads nothing else); ``norm="linf"`` is accepted,
    any other norm raises; ``hsja`` stays the l_2 attack."""
    cfg = ATTACKS["hsja_linf"].config()
    assert dataclasses.asdict(cfg) == dataclasses.asdict(HSJAConfig(norm="linf"))
    assert ATTACKS["hsja_linf"].config(norm="linf") == cfg and ATTACKS["hsja"].config().norm == "l2"
    make_attack("hsja_linf", context, norm="linf")
    with pytest.raises(ValueError, match="hsja_linf"):
        make_attack("hsja_linf", context, norm="l2")


# ---------------------------------------------------------------------------------------- NES-PI

class LineSearchStub:
    """A top-1 oracle for one NES-PI step. The plain call (success check + J samples) shows another
    class at the returned point and the target with score 0.99 at every sample (so the loss is below
    ``adv_thresh`` and the line search proposes an eps decrement); a line-search point (asked through
    ``at``) shows the target only from the search's ``accept_from``-th point on."""

    output = "top1"

    def __init__(self, cls: int, samples: int, accept_from: int):
        self.cls, self.samples, self.accept_from = cls, samples, accept_from

    def __call__(self, x):
        n = x.shape[0]
        label = jnp.full((n,), self.cls, jnp.int32).at[0].set((self.cls + 1) % 10)
        return Top1(label, jnp.full((n,), 0.99, jnp.float32))

    def at(self, offset, x):
        asked = offset - 1 - self.samples
        label = jnp.where(asked >= self.accept_from, self.cls, (self.cls + 1) % 10).astype(jnp.int32)
        return Top1(jnp.full((x.shape[0],), label), jnp.full((x.shape[0],), 0.99, jnp.float32))


def test_nes_pi_line_search_bound_covers_a_decrement_below_the_floor(attack_set, context):
    """With ``delta_eps`` below the 2e-3 floor the line search tries that decrement and then 0 (two rows
    of step sizes): the declared worst case counts both rows, so a step whose only working candidate is
    in the d = 0 row finds it (the bound used to count one row and cut the search before it)."""
    cfg = NESPIConfig(samples=2, start_delta_eps=1e-3, min_delta_eps=1e-3)
    attack = nes_pi(cfg, context.train_images, context.train_labels)
    lrs, rows = cfg.line_search_bound()
    assert (lrs, rows) == (4, 2) and attack.cost == 1 + 2 + lrs * rows
    x, y, t = attack_set.images[0], attack_set.labels[0], int(attack_set.targets[0])
    s0 = attack.init(jax.random.key(0), x, y, t)
    # the first point of the d = 0 row is the only one that works
    s1, info = attack.step(s0, LineSearchStub(t, 2, accept_from=lrs))
    assert int(info.queries) == lrs + 1
    assert not np.array_equal(np.asarray(s1.adv), np.asarray(s0.adv))  # it moved
    assert float(s1.eps_t) == float(s0.eps_t)  # with decrement 0
    # nothing works: the search asks exactly its declared worst case
    s1, info = attack.step(s0, LineSearchStub(t, 2, accept_from=10 ** 6))
    assert int(info.queries) == attack.cost - 1 - 2
    np.testing.assert_array_equal(np.asarray(s1.adv), np.asarray(s0.adv))


# -------------------------------------------------------------------------------------- Boundary

def test_boundary_asks_spherical_candidates_every_tenth_step(clean_scorer, attack_set, context):
    """After the start, a step asks its ``proposals`` candidates, and every 10th step of the walk also
    their spherical candidates (the reference's schedule): 55 P queries for 50 steps of P candidates,
    instead of 100 P. The step sizes change only on those steps, from their statistics."""
    attack = make_attack("boundary", context, targeted=False)
    P = BoundaryConfig().proposals
    n, steps = 2, 51
    states, info, q = run_trail(attack, clean_scorer, attack_set, n, steps)
    for i in range(n):
        walk = states.walk[i]
        assert walk[0] == 0 and (walk[1:] == np.arange(1, steps)).all()  # step 0 found the start
        sph = info.spherical[i][1:]
        np.testing.assert_array_equal(sph, np.arange(1, steps) % 10 == 0)
        np.testing.assert_array_equal(info.queries[i][1:], np.where(sph, 2 * P, P))
        assert info.queries[i][1:].sum() == 55 * P
        changed = np.diff(states.delta[i]) != 0
        assert changed.any() and not changed[~sph].any()


# ------------------------------------------------------------------------- untargeted default losses

@pytest.mark.parametrize("name", ["signhunter", "bandits_td", "prgf"])
def test_untargeted_default_loss_is_the_cross_entropy(name, clean_scorer, attack_set):
    """SignHunter, Bandits-TD and P-RGF attack the untargeted cross-entropy ``log F_y`` by default, as
    their reference implementations do (the margin stays selectable): the loss a first step reports is
    the cross-entropy of the clean model's answer at the point it judged, not the margin. (P-RGF's
    surrogate here is the model itself: only the loss matters.)"""
    spec = ATTACKS[name]
    cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
    assert spec.config(**cfg, targeted=False).loss_name == "xent"
    assert spec.config(**cfg, targeted=False, loss="margin").loss_name == "margin"
    attack = make_attack(name, Context(surrogate=clean_scorer), targeted=False, **cfg)
    x, y = attack_set.images[:1], attack_set.labels[:1]
    s0 = attack.init(jax.random.key(0), x[0], y[0], -1)
    s1, info = attack.step(s0, Oracle(clean_scorer).bind(jax.random.key(1), 0))
    judged = s1.x if name == "signhunter" else s0.x  # SignHunter: its first vertex; the others: x itself
    probs = clean_scorer(jnp.asarray(judged)[None], None)
    np.testing.assert_allclose(float(info.loss), float(losses.untargeted_xent(probs, y)[0]), rtol=1e-5, atol=1e-7)
    assert abs(float(info.loss) - float(losses.margin(probs, y)[0])) > 1e-3
