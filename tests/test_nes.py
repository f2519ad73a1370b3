"""NES through the driver: success, noise effect, budget, resume, traces, NaN safety, bad input.

Replay, one-image-vs-batch and no-retrace checks run for every attack in test_attack_battery.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax.attacks import NESConfig, make_attack, nes
from rnd_jax.attacks import driver
from rnd_jax.defenses import output_noise
from rnd_jax.oracle import Oracle, QueryCounter

BUDGET = 10_000


def run(attack, oracle, sel, budget=BUDGET, n=None, seed=0):
    n = len(sel.labels) if n is None else n
    f = jax.jit(lambda x, y, t, ka, kd: driver.run(attack, oracle, x, y, t, ka, kd, budget))
    return as_np(f(sel.images[:n], sel.labels[:n], sel.targets[:n], keys(seed, n), keys(seed + 1, n)))


def fooled(clean_scorer, res, sel):
    return np.asarray(jnp.argmax(clean_scorer(res.x_adv, None), -1)) == sel.targets[: len(res.queries)]


def test_targeted_nes_succeeds_undefended_within_budget(clean_scorer, attack_set):
    res = run(nes(NESConfig()), Oracle(clean_scorer), attack_set)
    ok = fooled(clean_scorer, res, attack_set)
    assert ok.mean() >= 0.9, res.queries
    np.testing.assert_array_equal(res.lucky, ok)  # no noise: the attack's belief is the truth
    assert res.queries.max() <= BUDGET and np.all(res.queries % 51 == 0)
    d = (res.x_adv - attack_set.images).reshape(len(ok), -1)
    assert np.abs(d).max() <= 0.3 + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_untargeted_l2_nes_succeeds(clean_scorer, attack_set):
    res = run(nes(NESConfig(norm="l2", eps=2.0, targeted=False)), Oracle(clean_scorer), attack_set, budget=5_000)
    pred = np.asarray(jnp.argmax(clean_scorer(res.x_adv, None), -1))
    assert np.mean(pred != attack_set.labels) >= 0.9
    l2 = np.linalg.norm((res.x_adv - attack_set.images).reshape(len(pred), -1), axis=1)
    assert l2.max() <= 2.0 + 1e-5


def test_output_noise_cuts_success(clean_scorer, attack_set):
    clean = fooled(clean_scorer, run(nes(NESConfig()), Oracle(clean_scorer), attack_set), attack_set).mean()
    noisy = fooled(clean_scorer, run(nes(NESConfig()), Oracle(output_noise(clean_scorer, 1e-2)), attack_set),
                   attack_set).mean()
    assert noisy <= clean - 0.4, (clean, noisy)


@pytest.mark.parametrize("budget", [51, pytest.param(300, marks=pytest.mark.slow)])  # the battery's NES witness
def test_eager_counter_proves_budget(clean_scorer, attack_set, budget):
    counter = QueryCounter(output_noise(clean_scorer, 1e-3))
    attack = nes(NESConfig())
    for i in range(2):
        with jax.disable_jit():
            res = driver.run_one(attack, Oracle(counter), attack_set.images[i], attack_set.labels[i],
                                 attack_set.targets[i], jax.random.key(i), jax.random.key(100 + i), budget)
        assert int(res.queries) <= budget
    assert counter.count == 2 * (budget // 51) * 51  # every step fully counted, no free success checks
    assert counter.calls == 2 * (budget // 51)  # one oracle call per step


def test_resume_n_then_m_steps_equals_n_plus_m(clean_scorer, attack_set):
    o = Oracle(output_noise(clean_scorer, 1e-3))
    attack = nes(NESConfig())
    x, y, t = attack_set.images[0], attack_set.labels[0], attack_set.targets[0]
    ka, kd = jax.random.key(5), jax.random.key(6)
    budget = 1_020  # 20 steps

    @jax.jit
    def go(max1, max2):
        c = driver.start(attack, ka, x, y, t, budget)
        whole = driver.advance(attack, o, c, kd, budget, max_steps=max1 + max2)
        part = driver.advance(attack, o, driver.advance(attack, o, c, kd, budget, max_steps=max1), kd, budget,
                              max_steps=max2)
        return whole, part

    whole, part = as_np(go(7, 13))
    assert whole.state.step == 20 or whole.state.done
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
        np.testing.assert_array_equal(a, b)


def test_no_nan_under_large_output_noise(clean_scorer, attack_set):
    for sigma in (1e-1, 1.0):
        res = run(nes(NESConfig()), Oracle(output_noise(clean_scorer, sigma)), attack_set, budget=1_020, n=4)
        assert np.all(np.isfinite(res.x_adv))
        rec = res.trace_queries >= 0
        assert rec.any() and np.all(np.isfinite(res.trace_loss[rec]))


def test_trace_records_queries_and_loss(clean_scorer, attack_set):
    res = run(nes(NESConfig()), Oracle(clean_scorer), attack_set, budget=BUDGET, n=2)
    for i in range(2):
        rec = res.trace_queries[i] >= 0
        assert rec.sum() == res.steps[i]  # stride 1: every step recorded while it ran
        np.testing.assert_array_equal(res.trace_queries[i][rec], 51 * np.arange(rec.sum()))


@pytest.mark.parametrize("kw", [dict(samples=3), dict(samples=0), dict(samples=1), dict(eps=0.0), dict(eps=-1.0),
                                dict(eps=float("nan")), dict(beta=0.0), dict(norm="l1"), dict(momentum=1.0),
                                dict(lr=-0.1), dict(loss="margin"), dict(targeted=False, loss="cw")])
def test_bad_nes_configs_raise(kw):
    with pytest.raises(ValueError):
        NESConfig(**kw)


def test_bad_run_inputs_raise_before_tracing(clean_scorer, attack_set):
    attack, o = nes(NESConfig()), Oracle(clean_scorer)
    x, y, t = attack_set.images[:3], attack_set.labels[:3], attack_set.targets[:3]
    driver.validate(attack, o, 1000, x, y, t)  # fine
    cases = [
        (dict(budget=0), "budget"), (dict(budget=-5), "budget"), (dict(budget=50), "smaller than one step"),
        (dict(budget=1.5e3), "budget"),
        (dict(x0=x + 0.9), r"\[0, 1\]"), (dict(x0=x - 0.9), r"\[0, 1\]"), (dict(x0=x * np.nan), r"\[0, 1\]"),
        (dict(x0=x[0]), "rank"), (dict(x0=x[..., 0]), "rank"),
        (dict(t=y), "target equals"), (dict(t=None), "target"), (dict(y=y[:2]), "labels"),
        (dict(oracle=Oracle(clean_scorer, "label")), "scores"),
    ]
    for kw, msg in cases:
        args = dict(budget=1000, x0=x, y=y, t=t, oracle=o) | kw
        with pytest.raises(ValueError, match=msg):
            driver.validate(attack, args["oracle"], args["budget"], args["x0"], args["y"], args["t"])


def test_registry():
    a = make_attack("nes", samples=10)
    assert a.cost == 11 and a.output == "scores" and a.targeted
    with pytest.raises(ValueError, match="nes"):
        make_attack("zoo_nonexistent")
