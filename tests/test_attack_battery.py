"""The registry-driven battery: every registered attack goes through the same checks.

For each attack (``rnd_jax.attacks.ATTACKS``), with its ``AttackSpec.battery`` overrides
(``budget``, ``norm``, ``eps`` and any config keys):

- it succeeds on the undefended digits model: ASR >= 90% on 10 images within its budget and eps,
  untargeted and targeted (each where supported), success judged by the clean model;
- an eager query-counting oracle (``QueryCounter`` under ``jax.disable_jit``) proves the budget is
  never exceeded and that the driver's count equals the points the model was asked about;
- the same keys replay bit-identically; one image alone equals the same image inside the batch;
- a second call with new inputs does not retrace (``chex.assert_max_traces``);
- its ``bad_configs`` raise ``ValueError``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax import data
from rnd_jax.attacks import ATTACKS, Context, driver, make_attack
from rnd_jax.defenses import output_noise
from rnd_jax.oracle import Oracle, QueryCounter

NAMES = sorted(ATTACKS)


@pytest.fixture(scope="module")
def context(request):
    x, y = data.load("digits", "train")
    needs_surrogate = any("surrogate" in ATTACKS[n].needs for n in NAMES)
    surrogate = request.getfixturevalue("surrogate_scorer") if needs_surrogate else None
    return Context(train_images=x, train_labels=y, num_classes=10, surrogate=surrogate)


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


def run_batch(attack, oracle, sel, budget, n=None, seed=0):
    n = len(sel.labels) if n is None else n
    f = jax.jit(lambda x, y, t, ka, kd: driver.run(attack, oracle, x, y, t, ka, kd, budget))
    return as_np(f(sel.images[:n], sel.labels[:n], sel.targets[:n], keys(seed, n), keys(seed + 1, n)))


@pytest.mark.parametrize("name", NAMES)
def test_succeeds_undefended(name, context, clean_scorer, attack_set):
    spec = ATTACKS[name]
    for targeted in goals(name):
        attack, budget = build(name, context, targeted)
        res = run_batch(attack, oracle_for(attack, clean_scorer), attack_set, budget)
        pred = np.asarray(jnp.argmax(clean_scorer(res.x_adv, None), -1))
        fooled = (pred == attack_set.targets) if targeted else (pred != attack_set.labels)
        d = (res.x_adv - attack_set.images).reshape(len(pred), -1)
        dist = np.abs(d).max(1) if spec.battery["norm"] == "linf" else np.linalg.norm(d, axis=1)
        ok = fooled & (dist <= spec.battery["eps"] + 1e-5)
        assert ok.mean() >= 0.9, (name, "targeted" if targeted else "untargeted", ok, res.queries)
        assert res.queries.max() <= budget


@pytest.mark.parametrize("name", NAMES)
def test_eager_counter_proves_budget(name, context, clean_scorer, attack_set):
    attack, _ = build(name, context, goals(name)[-1])
    budget = 3 * attack.cost + attack.cost // 2  # a budget that is not a whole number of steps
    counter = QueryCounter(output_noise(clean_scorer, 1e-3))
    reported = 0
    for i in range(2):
        with jax.disable_jit():
            res = driver.run_one(attack, oracle_for(attack, counter), attack_set.images[i], attack_set.labels[i],
                                 attack_set.targets[i], jax.random.key(i), jax.random.key(50 + i), budget)
        assert int(res.queries) <= budget
        reported += int(res.queries)
    assert counter.count == reported


@pytest.mark.parametrize("name", NAMES)
def test_replay_batching_and_no_retrace(name, context, clean_scorer, attack_set):
    attack, _ = build(name, context, goals(name)[-1])
    oracle = oracle_for(attack, output_noise(clean_scorer, 1e-4))
    budget = 20 * attack.cost
    n = 4
    chex.clear_trace_counter()  # traces are counted per source location, shared by every parametrization

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, y, t, ka, kd):
        return driver.run(attack, oracle, x, y, t, ka, kd, budget)

    sel = attack_set
    args = lambda s, e: (sel.images[s:e], sel.labels[s:e], sel.targets[s:e], keys(0, n)[: e - s], keys(1, n)[: e - s])
    a, b = as_np(f(*args(0, n))), as_np(f(*args(0, n)))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    g = jax.jit(lambda x, y, t, ka, kd: driver.run(attack, oracle, x, y, t, ka, kd, budget))
    for i in range(n):
        alone = as_np(g(sel.images[i:i + 1], sel.labels[i:i + 1], sel.targets[i:i + 1], keys(0, n)[i:i + 1],
                        keys(1, n)[i:i + 1]))
        assert alone.queries[0] == a.queries[i] and alone.lucky[0] == a.lucky[i], (name, i)
        np.testing.assert_allclose(alone.x_adv[0], a.x_adv[i], atol=1e-6)
    # new inputs of the same shapes: no retrace (assert_max_traces raises otherwise)
    f(sel.images[n:2 * n], sel.labels[n:2 * n], sel.targets[n:2 * n], keys(5, n), keys(6, n))


@pytest.mark.parametrize("name", NAMES)
def test_bad_configs_raise(name):
    spec = ATTACKS[name]
    assert spec.bad_configs, f"{name} declares no bad configs to check"
    for kw in spec.bad_configs:
        with pytest.raises(ValueError):
            spec.config(**kw)
    with pytest.raises(ValueError):
        make_attack(name, Context(), not_an_option=1)
