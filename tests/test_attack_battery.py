"""The registry-driven battery: every registered attack goes through the same checks.

For each attack (``rnd_jax.attacks.ATTACKS``), with its ``AttackSpec.battery`` overrides
(``budget``, ``norm``, ``eps`` and any config keys):

- it succeeds on the undefended digits model: ASR >= 90% on 10 images within its budget and eps,
  targeted where supported (untargeted too with -m slow), success judged by the clean model;
- a host-side query counter (``tap_scorer`` in the jitted one-image runs, under the verified stop rule; the
  variants that share another attack's code and the costliest decision attacks with -m slow) proves the
  budget is never exceeded and that the driver's count equals the points the model was asked about; the eager ``QueryCounter`` under ``jax.disable_jit`` does the same for RayS here and NES
  in ``test_nes.py`` (all with -m slow);
- the same keys replay bit-identically; one image alone equals the same image inside the batch (with the
  host counter above);
- a second call with new inputs does not retrace (``chex.assert_max_traces``);
- its ``bad_configs`` raise ``ValueError``;
- on the undefended model the three stop rules (single, verified, clean) give identical runs (eight attacks of
  every kind by default, all with -m slow).
"""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax import autoencoder, data, pytree
from rnd_jax.attacks import ATTACKS, Context, driver, make_attack
from rnd_jax.compact import pointwise
from rnd_jax.defenses import output_noise
from rnd_jax.evaluate import QueryTap, tap_scorer
from rnd_jax.oracle import Oracle, QueryCounter

NAMES = sorted(ATTACKS)


def by_attack(names, slow=()):
    """One param per attack, grouped per attack (``--dist loadgroup``: an attack's tests run on one xdist
    worker, which compiles its programs once for all of them); those in ``slow`` marked slow."""
    return [pytest.param(n, marks=[pytest.mark.xdist_group(f"battery-{n}")] + ([pytest.mark.slow] if n in slow else []))
            for n in names]


@pytest.fixture(scope="module")
def context(request):
    x, y = data.load("digits", "train")
    needs_surrogate = any({"surrogate", "surrogates"} & set(ATTACKS[n].needs) for n in NAMES)
    surrogate = request.getfixturevalue("surrogate_scorer") if needs_surrogate else None
    # one reference model for the Subspace attack (several: tests/test_subspace_evolutionary.py)
    surrogates = (surrogate,) if any("surrogates" in ATTACKS[n].needs for n in NAMES) else None
    decoder = None
    if any("autoencoder" in ATTACKS[n].needs for n in NAMES):  # trained once per session (its cache entry)
        decoder = autoencoder.load_decoder("digits", cache_dir=request.getfixturevalue("cache_dir"), progress=False)
    return Context(train_images=x, train_labels=y, num_classes=10, surrogate=surrogate, surrogates=surrogates,
                   autoencoder=decoder)


def build(name, context, targeted):
    spec = ATTACKS[name]
    cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
    cfg["targeted"] = targeted
    return make_attack(name, context, **cfg), spec.battery["budget"]


def goals(name):
    spec = ATTACKS[name]
    return [t for t, ok in ((False, spec.supports_untargeted), (True, spec.supports_targeted)) if ok]


def oracle_for(attack, scorer):
    return Oracle(scorer, attack.output)


_RUNNERS = {}
TAPS = {}


def runner(name, context, clean_scorer, targeted, n, short=False):
    """One compiled program per (attack, goal, batch size, budget), shared by the tests below.

    The budget is the battery's, or with ``short`` at most 20 steps (the replay and alone tests). A short
    program asks the model, and differentiates the surrogates, point by point
    (:func:`rnd_jax.compact.pointwise`): XLA's CPU kernels round a point's answer differently in batches of
    different sizes, and an attack with a small finite-difference step or sign steps turns such last-bit
    differences into other iterates, so only a batch-independent model can show that an image alone does
    what it does in a batch. The costliest programs to compile (GeoDA, HSJA, OPT, Sign-OPT) reach their
    battery budget within 20 worst-case steps, so their replay test reuses the success test's program.

    The output-noise level ``sigma`` is an argument (0 answers exactly what the clean model answers), so
    the undefended run and the noisy replay runs are the same compiled program; so is the stop rule (a
    traced index into ``driver.STOP_RULES``, default 0 = single; ``kc`` are the check keys). Each program
    is wrapped in ``chex.assert_max_traces(n=1)`` under its own name, so any retrace of it fails the test
    that caused it.
    """
    if short:  # the model and the attacker's own surrogates answer point by point
        clean_scorer = pointwise(clean_scorer)
        context = dataclasses.replace(
            context, surrogate=context.surrogate and pointwise(context.surrogate),
            surrogates=context.surrogates and tuple(pointwise(s) for s in context.surrogates))
    attack, budget = build(name, context, targeted)
    if short:
        budget = min(budget, 20 * attack.cost)
    key = (name, targeted, n, budget)
    if key not in _RUNNERS:
        stop = driver.StopRule(eps=ATTACKS[name].battery["eps"], norm=ATTACKS[name].battery["norm"])

        def run(bundle, x, y, t, ka, kd, sigma, kc, rule):  # the pool and the params are arguments
            attack, clean = bundle
            return driver.run(attack, oracle_for(attack, output_noise(clean, sigma)), x, y, t, ka, kd, budget,
                              stop=stop, check_keys=kc, clean=clean, rule=jnp.asarray(rule, jnp.int32))

        if n == 1:  # one image alone: not vmapped, and every model call counted on the host (TAPS[name])
            tap = TAPS.setdefault(name, QueryTap())

            def run(bundle, x, y, t, ka, kd, sigma, kc, rule):
                attack, clean = bundle
                defended = output_noise(clean, sigma)
                res = driver.run_one(attack, oracle_for(attack, tap_scorer(defended, clean, tap)), x[0], y[0],
                                     t[0], ka[0], kd[0], budget, stop=stop, check_key=kc[0], clean=clean,
                                     rule=jnp.asarray(rule, jnp.int32), checker=defended)
                return jax.tree.map(lambda a: a[None], res)

        run.__name__ = f"battery_{name}_{'targeted' if targeted else 'untargeted'}_{n}_{budget}"
        compiled = pytree.jit(chex.assert_max_traces(run, n=1))
        _RUNNERS[key] = functools.partial(compiled, (attack, clean_scorer)), budget
    return _RUNNERS[key]


def by_goal(names):
    """(attack, targeted) per supported goal; the goal the other battery tests use (targeted where
    supported) by default, the other one with -m slow (both share every line of the attack's step but the
    loss and the verdict: tests/test_losses.py covers the losses, and the untargeted smokes of
    defense_comparison run NES, Square and SignHunter untargeted)."""
    return [pytest.param(n, t, marks=[pytest.mark.xdist_group(f"battery-{n}")]
                         + ([] if t == goals(n)[-1] else [pytest.mark.slow]), id=f"{n}-{'t' if t else 'u'}")
            for n in names for t in goals(n)]


@pytest.mark.parametrize("name, targeted", by_goal(NAMES))
def test_succeeds_undefended(name, targeted, context, clean_scorer, attack_set):
    spec = ATTACKS[name]
    n = len(attack_set.labels)
    _, budget = runner(name, context, clean_scorer, targeted, n)
    res = _undefended(name, context, clean_scorer, attack_set, targeted, 0)
    pred = np.asarray(jnp.argmax(clean_scorer(res.x_adv, None), -1))
    fooled = (pred == attack_set.targets) if targeted else (pred != attack_set.labels)
    d = (res.x_adv - attack_set.images).reshape(len(pred), -1)
    dist = np.abs(d).max(1) if spec.battery["norm"] == "linf" else np.linalg.norm(d, axis=1)
    ok = fooled & (dist <= spec.battery["eps"] + 1e-5)
    assert ok.mean() >= 0.9, (name, "targeted" if targeted else "untargeted", ok, res.queries)
    assert res.queries.max() <= budget
    # the model runs with one copy of its weights: a lax.cond / lax.switch on a per-image predicate around a
    # query (or a surrogate's gradient) would copy them per image, a grouped convolution (the digits CNN has none)
    f, _ = runner(name, context, clean_scorer, targeted, n)
    text = f.func.lower(*f.args, attack_set.images, attack_set.labels, attack_set.targets, keys(0, n), keys(1, n),
                        0.0, keys(2, n), 0).as_text()  # the program just run: its trace is cached
    assert "stablehlo.convolution" in text
    assert not [g for g in re.findall(r"(?:feature|batch)_group_count = (\d+)", text) if int(g) > 1], name


EAGER_FAST = ("rays",)  # the eager witness by default (NES: tests/test_nes.py); all with -m slow (the host tap
# above witnesses every attack's count in compiled runs)


@pytest.mark.parametrize("name", by_attack(NAMES, slow=[n for n in NAMES if n not in EAGER_FAST]))
def test_eager_counter_proves_budget(name, context, clean_scorer, attack_set):
    attack, _ = build(name, context, goals(name)[-1])
    budget = 2 * attack.cost + attack.cost // 2  # a budget that is not a whole number of steps
    counter = QueryCounter(output_noise(clean_scorer, 1e-3))
    with jax.disable_jit():
        res = driver.run_one(attack, oracle_for(attack, counter), attack_set.images[0], attack_set.labels[0],
                             attack_set.targets[0], jax.random.key(0), jax.random.key(50), budget)
    assert int(res.queries) <= budget
    assert counter.count == int(res.queries) > 0


_NOISY = {}


def _noisy_batch(name, context, clean_scorer, attack_set, short=True):
    """The batch under output noise (sigma = 1e-4) and the verified rule (a superset of the single rule's work)."""
    if (name, short) not in _NOISY:
        sel, n = attack_set, len(attack_set.labels)
        f, _ = runner(name, context, clean_scorer, goals(name)[-1], n, short=short)
        _NOISY[name, short] = as_np(f(sel.images, sel.labels, sel.targets, keys(0, n), keys(1, n), 1e-4, keys(2, n), 1))
    return _NOISY[name, short]


# One image alone (its own unvmapped program) for attacks of every kind by default; the variants that share
# their code with one of these (OPT ~ Sign-OPT, hsja_linf ~ hsja, parsimonious: tests/test_new_attacks.py) and
# the costliest decision programs with -m slow; so do the white-box attacks (gradient programs compile slowest;
# tests/test_whitebox.py runs PGD and C&W alone, eagerly, against the same images inside the batch).
ALONE_SLOW = ("opt", "hsja_linf", "geoda", "signflip", "nes_label_only", "boundary", "parsimonious", "pgd", "cw",
              "evolutionary", "subspace")  # evolutionary ~ boundary; subspace: tests/test_subspace_evolutionary.py


@pytest.mark.parametrize("name", by_attack(NAMES))
def test_replay_is_bit_identical(name, context, clean_scorer, attack_set):
    """Under output noise and the verified stop rule the same keys replay bit for bit; the program does not
    retrace (it is the success test's for the costliest attacks, called there with other inputs)."""
    sel, n = attack_set, len(attack_set.labels)
    # the short program is the alone test's; where that test is slow, replay the success test's program
    # (parsimonious, subspace: their full budget under noise runs longer than the short program compiles)
    short = name not in ALONE_SLOW or name in ("parsimonious", "subspace")
    a = _noisy_batch(name, context, clean_scorer, attack_set, short)
    f, _ = runner(name, context, clean_scorer, goals(name)[-1], n, short=short)
    b = as_np(f(sel.images, sel.labels, sel.targets, keys(0, n), keys(1, n), 1e-4, keys(2, n), 1))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)




# P-RGF's l_2 steps follow alpha and lambda*, finite differences divided by sigma = 1e-3: a last-bit difference in
# the attack's own reductions (XLA rounds them differently batched and alone) moves its iterate continuously
# (3.7e-3 after 20 steps, on AVX2), with the same queries and decisions, which the test still checks exactly.
ALONE_ATOL = {"prgf": 1e-2}


@pytest.mark.parametrize("name", by_attack(NAMES, slow=ALONE_SLOW))
def test_alone_equals_batch_and_host_count(name, context, clean_scorer, attack_set):
    """An image run alone (not vmapped) equals the same image inside the noisy batch, its checks too; a
    host-side counter of that run (``tap_scorer``) sees exactly the driver's count, within the budget; the
    one-image program runs two images without retracing."""
    sel, n = attack_set, len(attack_set.labels)
    a = _noisy_batch(name, context, clean_scorer, attack_set)
    ka, kd, kc = keys(0, n), keys(1, n), keys(2, n)
    g, budget = runner(name, context, clean_scorer, goals(name)[-1], 1, short=True)
    tap = TAPS[name]
    for i in (0, n - 1):
        tap.reset()
        alone = as_np(g(sel.images[i:i + 1], sel.labels[i:i + 1], sel.targets[i:i + 1], ka[i:i + 1], kd[i:i + 1],
                        1e-4, kc[i:i + 1], 1))
        jax.effects_barrier()
        assert alone.queries[0] == a.queries[i] and alone.lucky[0] == a.lucky[i], (name, i)
        assert alone.success[0] == a.success[i] and alone.check_queries[0] == a.check_queries[i], (name, i)
        np.testing.assert_allclose(alone.x_adv[0], a.x_adv[i], atol=ALONE_ATOL.get(name, 1e-6))
        # the host saw exactly the driver's count, within the budget (the rule's checks ask the untapped scorer)
        assert tap.n == alone.queries[0] <= budget, (name, i, tap.n)


@pytest.mark.parametrize("name", by_attack(NAMES))
def test_bad_configs_raise(name):
    spec = ATTACKS[name]
    assert spec.bad_configs, f"{name} declares no bad configs to check"
    for kw in spec.bad_configs:
        with pytest.raises(ValueError):
            spec.config(**kw)
    with pytest.raises(ValueError):
        make_attack(name, Context(), not_an_option=1)


_UNDEFENDED = {}


def _undefended(name, context, clean_scorer, attack_set, targeted, rule, short=False):
    k = (name, targeted, rule, short)
    if k not in _UNDEFENDED:
        n = len(attack_set.labels)
        f, _ = runner(name, context, clean_scorer, targeted, n, short=short)
        _UNDEFENDED[k] = as_np(f(attack_set.images, attack_set.labels, attack_set.targets, keys(0, n), keys(1, n), 0.0,
                                 keys(2, n), rule))
    return _UNDEFENDED[k]


AGREE_FAST = ("nes", "zoo", "square_linf", "simba_dct", "nes_pi", "hsja", "rays", "boundary")


@pytest.mark.parametrize("name", by_attack(NAMES, slow=[n for n in NAMES if n not in AGREE_FAST]))
def test_stop_rules_agree_undefended(name, context, clean_scorer, attack_set):
    """Without a defense every claim is true: verified and clean stop exactly where single does, with the same
    trajectory, and verified asks its 9 checks once per successful image (the claim that ends it). On the
    success test's program (undefended, most images stop early). The rule lives in the driver, so score and
    decision attacks of fixed and run-time cost run by default; every attack with -m slow."""
    targeted = goals(name)[-1]
    single = _undefended(name, context, clean_scorer, attack_set, targeted, 0)
    assert single.success.any(), name
    for rule in (1, 2):
        other = _undefended(name, context, clean_scorer, attack_set, targeted, rule)
        for field in ("x_adv", "queries", "steps", "lucky", "success", "loss_queries", "claims", "trace_queries"):
            np.testing.assert_array_equal(getattr(other, field), getattr(single, field), err_msg=f"{name} {field}")
        np.testing.assert_array_equal(single.success, single.lucky)
        np.testing.assert_array_equal(single.claims, single.success.astype(int))
    verified = _undefended(name, context, clean_scorer, attack_set, targeted, 1)
    np.testing.assert_array_equal(verified.check_queries, 9 * single.success.astype(int))
