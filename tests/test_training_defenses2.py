"""Training-time defenses: PGD-AT, RND-GF's loss, RSE and PNI noise layers, per-feature-std feature noise, and
the sweep's cell-level training option.

One tiny adversarially trained model (2 epochs of PGD-AT fine-tuning from the session's clean model) is shared
by the tests of this module; the noise-statistics tests use a one-layer model at its initial parameters.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnd_jax import data, sweep, train
from rnd_jax.defenses import FEATURE_STD, build_defense, feature_noise, pni, rse, with_feature_std
from rnd_jax.noisy import NOISE_RNG, noisy_model

EPS = 0.1
AT = {"finetune": True, "adv_eps": EPS, "adv_steps": 3, "epochs": 2, "batch_size": 128}


@pytest.fixture(scope="module")
def at_model(digits_model, cache_dir):
    """(model, params) of the PGD-AT fine-tuned digits model (its clean start is the session's model)."""
    return train.load_or_train("digits_cnn", "digits", train.TrainConfig(**AT), cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def test_batch(digits_test):
    x, y = digits_test
    return jnp.asarray(x[:100]), jnp.asarray(y[:100])


@functools.partial(jax.jit, static_argnums=0)
def _pgd(model, params, x, y):
    """10 steps of l_inf PGD at EPS (one compiled program for both models: they are equal modules)."""
    return train.pgd_attack(lambda z, i: model.apply({"params": params}, z), x, y, jax.random.key(3), EPS, 10, EPS / 4)


def _ce(model, params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y)


# ----------------------------------------------------------------------------- PGD-AT


def test_pgd_inner_attack_increases_the_loss_within_the_ball(digits_model, test_batch):
    model, params = digits_model
    x, y = test_batch
    xa = _pgd(model, params, x, y)
    clean, adv = _ce(model, params, x, y), _ce(model, params, xa, y)
    assert float(jnp.abs(xa - x).max()) <= EPS + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    assert bool(jnp.all(adv >= clean - 1e-5)), "a PGD step lowered some example's loss"
    assert float(adv.mean()) > 5 * float(clean.mean()), (float(clean.mean()), float(adv.mean()))
    # the attack beats a random start of the same radius: the ascent, not the noise, raises the loss
    xr = jnp.clip(x + jax.random.uniform(jax.random.key(3), x.shape, x.dtype, -EPS, EPS), 0, 1)
    assert float(adv.mean()) > 2 * float(_ce(model, params, xr, y).mean())


def test_pgd_at_model_is_more_robust_than_the_clean_one(digits_model, at_model, test_batch):
    x, y = test_batch
    robust = {}
    for name, (model, params) in (("clean", digits_model), ("pgd_at", at_model)):
        xa = _pgd(model, params, x, y)
        robust[name] = float(jnp.mean(jnp.argmax(model.apply({"params": params}, xa), -1) == y))
    assert robust["pgd_at"] >= robust["clean"] + 0.05, robust
    assert train.accuracy(*at_model, x, y) >= 0.9


# ----------------------------------------------------------------------------- RND-GF


def test_gf_loss_is_the_log_of_the_monte_carlo_mean_of_probabilities(digits_model, test_batch):
    model, params = digits_model
    x, y = test_batch[0][:8], test_batch[1][:8]
    f = lambda z, m: model.apply({"params": params}, z)  # noqa: E731
    key, nu, m = jax.random.key(5), 0.3, 6
    loss = float(train.gf_loss(f, x, y, key, nu, m))
    # the same draws, eagerly, in float64: -log of the mean of the probabilities
    deltas = jnp.stack([nu * jax.random.normal(jax.random.fold_in(key, i), x.shape) for i in range(m)])
    probs = np.asarray(jax.nn.softmax(f((x[None] + deltas).reshape((-1,) + x.shape[1:]), 0)), np.float64)
    probs = probs.reshape(m, 8, -1)
    want = float(np.mean(-np.log(probs.mean(0)[np.arange(8), np.asarray(y)])))
    assert loss == pytest.approx(want, rel=1e-5)
    # it is not the mean cross-entropy of the draws (Jensen), which is larger
    assert float(np.mean(-np.log(probs[:, np.arange(8), np.asarray(y)]))) > loss


@pytest.mark.slow
def test_gf_loss_with_many_draws_is_minus_log_of_the_expected_probability(digits_model, test_batch):
    model, params = digits_model
    x, y = test_batch[0][:2], test_batch[1][:2]
    f = lambda z, m: model.apply({"params": params}, z)  # noqa: E731
    nu = 0.3
    # many draws: -log E[F(x + delta)]_y of an independent Monte-Carlo estimate, within its standard error
    n = 4000
    big = float(jax.jit(lambda k: train.gf_loss(f, x, y, k, nu, n))(jax.random.key(6)))
    z = x[:2, None] + nu * jax.random.normal(jax.random.key(7), (2, n) + x.shape[1:])
    py = np.asarray(jax.nn.softmax(f(z.reshape((2 * n,) + x.shape[1:]), 0)), np.float64).reshape(2, n, -1)
    py = py[np.arange(2), :, np.asarray(y)]  # [2, n]: p_y of each draw
    mean, se = py.mean(1), py.std(1) / math.sqrt(n)
    # both estimates carry a Monte-Carlo error of about se / mean in the log
    assert big == pytest.approx(float(np.mean(-np.log(mean))), abs=float(np.mean(se / mean)) * 5 * math.sqrt(2) + 1e-4)


def test_gf_loss_is_finite_where_probabilities_underflow():
    x = jnp.zeros((2, 3))
    y = jnp.array([0, 1])
    logits = lambda z, m: jnp.stack([z[:, 0] * 0 - 200.0, z[:, 0] * 0 + 200.0], -1)  # noqa: E731  p_y(0) = e^-400
    loss, grad = jax.jit(jax.value_and_grad(lambda s: train.gf_loss(lambda z, m: s * logits(z, m), x, y,
                                                                     jax.random.key(0), 0.1, 3)))(1.0)
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(400.0 / 2, rel=1e-6)
    assert float(grad) == pytest.approx(200.0, rel=1e-5)  # d/ds of s * 400 / 2


# ----------------------------------------------------------------------------- RSE and PNI noise statistics


class _Linear(nn.Module):
    """logits = W h + b with h the flattened image, marked: the smallest model with a mark before a layer."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        h = self.perturb("h", x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes, name="Dense_0")(h)


SHAPE = (2, 2, 1)


N_DRAWS = 4000


def _draws(model, params, x, n=N_DRAWS):
    """n noisy logits of each row of x, minus the noise-free logits: f32[n, B, K]."""
    clean = model.apply({"params": params}, x)
    out = jax.jit(jax.vmap(lambda k: model.apply({"params": params}, x, rngs={NOISE_RNG: k})))(jax.random.split(
        jax.random.key(11), n))
    return np.asarray(out - clean, np.float64)


def _check_variance(noise, want):
    n = noise.shape[0]
    var = noise.var(0)
    assert np.allclose(noise.mean(0), 0, atol=5 * np.sqrt(want / n).max())
    assert np.allclose(var, want, rtol=5 * math.sqrt(2 / n)), (var, want)


def test_rse_noise_and_ensemble_match_closed_forms():
    model = noisy_model(_Linear(), SHAPE, rse_init=0.2, rse_inner=0.1, rse_layers=("h",))
    params = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))["params"]
    x = jax.random.uniform(jax.random.key(1), (2, *SHAPE))
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    # logits noise = W^T (0.2 eta_0 + 0.1 eta_1): variance (0.2^2 + 0.1^2) ||W_k||^2 per class
    _check_variance(_draws(model, params, x), np.broadcast_to((0.04 + 0.01) * (w ** 2).sum(0), (2, 3)))
    # the defense: the mean of `ensemble` noisy passes, pass m of point q drawn from fold_in(key_q, m)
    keys = jax.random.split(jax.random.key(2), 2)
    scorer = jax.jit(lambda xx, kk: rse(model, params, 4)(xx, kk))
    got = np.asarray(scorer(x, keys))
    mine = jax.vmap(lambda k: jax.random.split(k)[0])(keys)
    one = jax.jit(lambda xi, k: jax.nn.softmax(model.apply({"params": params}, xi, rngs={NOISE_RNG: k})[0]))
    want = np.stack([np.mean([np.asarray(one(x[i:i + 1], jax.random.fold_in(mine[i], m))) for m in range(4)], 0)
                     for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a point's answer does not depend on its batch
    np.testing.assert_allclose(np.asarray(scorer(x[::-1], keys[::-1])), got[::-1], rtol=1e-6)


def test_pni_weight_and_activation_noise_match_closed_forms():
    x = jax.random.uniform(jax.random.key(1), (2, *SHAPE))
    h = np.asarray(x.reshape(2, -1), np.float64)
    for kind, alpha in (("weight", 0.3), ("activation", 0.5)):
        model = noisy_model(_Linear(), SHAPE, pni=kind)
        params = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))["params"]
        name = "pni_w_Dense_0" if kind == "weight" else "pni_a_h"
        assert float(params[name]) == 0.25  # the authors' initial scale
        params = {**params, name: jnp.asarray(alpha, jnp.float32)}
        w = np.asarray(params["Dense_0"]["kernel"], np.float64)
        if kind == "weight":  # (W + alpha std(W) eta) h: variance alpha^2 std(W)^2 ||h||^2
            want = alpha ** 2 * w.std() ** 2 * (h ** 2).sum(1)[:, None] * np.ones((1, 3))
        else:  # W^T (h + alpha std(h) eta), std per example: variance alpha^2 std(h)^2 ||W_k||^2
            want = alpha ** 2 * h.std(1)[:, None] ** 2 * (w ** 2).sum(0)[None, :]
        _check_variance(_draws(model, params, x), want)
        # the defense answers with the noise on; one pass per query by default
        keys = jax.random.split(jax.random.key(4), 2)
        p = np.asarray(jax.jit(lambda xx, kk: pni(model, params)(xx, kk))(x, keys))
        mine = jax.vmap(lambda k: jax.random.split(k)[0])(keys)
        want_p = np.asarray(jax.nn.softmax(model.apply({"params": params}, x[:1], rngs={
            NOISE_RNG: jax.random.fold_in(mine[0], 0)})[0]))
        np.testing.assert_allclose(p[0], want_p, rtol=1e-6)


# ----------------------------------------------------------------------------- per-feature std


def test_feature_std_matches_numpy_and_scales_the_feature_noise(digits_model, cache_dir):
    model, params = digits_model
    images, _ = data.load("digits", "train")
    values = train._marked(model, params, jnp.asarray(images))
    # the marked values are what the next layer sees: dense1 -> logits through Dense_1
    k, b = params["Dense_1"]["kernel"], params["Dense_1"]["bias"]
    np.testing.assert_allclose(values["dense1"] @ k + b, model.apply({"params": params}, jnp.asarray(images)),
                               rtol=1e-4, atol=1e-4)
    stats = train.feature_std("digits_cnn", "digits", train.TrainConfig(), cache_dir=cache_dir)
    for name, v in values.items():
        np.testing.assert_allclose(stats[name], np.asarray(v, np.float64).std(0), rtol=1e-4, atol=1e-6)
    assert (train.cache_path("digits_cnn", "digits", train.TrainConfig(), cache_dir) / train.FEATURE_STD).exists()
    again = train.feature_std("digits_cnn", "digits", train.TrainConfig(), cache_dir=cache_dir)
    assert all(np.array_equal(again[n], stats[n]) for n in stats)
    # noise nu * s * eta at dense1: the logits move by W^T (nu s eta), variance nu^2 sum_j s_j^2 W_jk^2
    x = jnp.asarray(images[:1])
    nu, n = 0.5, N_DRAWS
    scorer = feature_noise(model, with_feature_std(params, stats), nu, (8, 8, 1), scale="std")
    explicit = feature_noise(model, params, nu, (8, 8, 1), scale={"dense1": stats["dense1"]})
    keys = jax.random.split(jax.random.key(9), n)
    p = jax.jit(scorer)(jnp.repeat(x, n, 0), keys)
    np.testing.assert_array_equal(np.asarray(scorer(jnp.repeat(x, 8, 0), keys[:8])),
                                  np.asarray(explicit(jnp.repeat(x, 8, 0), keys[:8])))
    logits = np.log(np.asarray(p, np.float64))
    logits -= logits.mean(1, keepdims=True)  # log-probabilities up to the per-row constant: centre both
    clean = np.asarray(model.apply({"params": params}, x), np.float64)
    clean -= clean.mean(1, keepdims=True)
    w = np.asarray(k, np.float64)
    wc = w - w.mean(1, keepdims=True)  # the centring acts on the class axis of W
    want = nu ** 2 * (stats["dense1"].astype(np.float64)[:, None] ** 2 * wc ** 2).sum(0)
    _check_variance(logits - clean, want[None, :])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kw", [dict(adv_eps=-0.1), dict(adv_eps=math.nan), dict(adv_steps=0), dict(adv_norm="l2"),
                                dict(adv_weight=1.5), dict(gf_noise=-1.0), dict(gf_samples=0), dict(pni="weights"),
                                dict(pni_init=math.inf), dict(rse_layers="conv1"), dict(rse_inner=True),
                                dict(finetune=1), dict(gf_noise=0.1, logit_noise=1.0)])
def test_bad_training_options_raise(kw):
    with pytest.raises(ValueError):
        train.TrainConfig(**kw)


def test_bad_defense_and_layer_options_raise(digits_model):
    model, params = digits_model
    with pytest.raises(ValueError, match="RSE"):
        build_defense("rse", model, params, 10, (8, 8, 1))  # a model trained without RSE
    with pytest.raises(ValueError, match="PNI"):
        build_defense("pni", model, params, 1, (8, 8, 1))
    with pytest.raises(ValueError, match="unknown RSE layer"):
        train.build_model("digits_cnn", 10, train.TrainConfig(rse_inner=0.1, rse_layers=("nope",)))
    noisy = train.build_model("digits_cnn", 10, train.TrainConfig(rse_init=0.2, rse_inner=0.1))
    for level in (0, 2.5, True, -1, 10 ** 6):
        with pytest.raises(ValueError):
            build_defense("rse", noisy, None, level, (8, 8, 1))
    for scale in ("var", 1.0, {"dense1": np.ones(3, np.float32)}, {"dense1": -np.ones(64, np.float32)}, {}):
        with pytest.raises(ValueError):
            feature_noise(model, params, 0.1, (8, 8, 1), scale=scale)
    with pytest.raises(ValueError, match=FEATURE_STD):
        feature_noise(model, params, 0.1, (8, 8, 1), scale="std")  # no stds attached


GRID = {"name": "t", "attacks": [{"name": "nes", "config": {"samples": 10}}], "defenses": ["none"],
        "budgets": [100], "n_images": 2}


@pytest.mark.parametrize("entry", [{"seed": 1}, {"bogus": 1}, {"adv_eps": -1.0}, {"pni": "x"}, [1],
                                   {"rse_inner": 0.1, "rse_layers": ["nope"]}, {"epochs": 1.5}])
def test_bad_cell_training_options_raise(entry):
    with pytest.raises(ValueError, match="datasets"):
        sweep.expand({**GRID, "datasets": [{"dataset": "digits", "train": entry}]})


def test_a_defense_needing_trained_noise_is_refused_by_plan():
    grid = {**GRID, "defenses": [{"name": "rse", "levels": [4]}]}
    with pytest.raises(ValueError, match="RSE"):
        sweep.plan(sweep.expand({**grid, "datasets": ["digits"]}))
    rse_cells = sweep.expand({**grid, "datasets": [{"dataset": "digits", "train": {"rse_init": 0.2, "rse_inner": 0.1},
                                                    "label": "rse"}]})
    assert rse_cells[0].label.endswith("[rse]")
    sweep.plan(rse_cells)  # shapes only: nothing is trained


# ----------------------------------------------------------------------------- cache keys


def test_training_configs_reach_the_cache_key_and_the_cell(digits_model, at_model, cache_dir):
    paths = [train.cache_path("digits_cnn", "digits", cfg, cache_dir) for cfg in (train.TrainConfig(),
                                                                                  train.TrainConfig(**AT))]
    assert paths[0] != paths[1] and all((p / "meta.json").exists() for p in paths)
    assert train.TrainConfig(**AT).defended and not train.TrainConfig(augment_noise=0.1).defended
    # the cell-level option: part of the cell (its id), canonical (defaults dropped), and of the model it loads
    clean, default, at = (sweep.expand({**GRID, "datasets": [d]})[0] for d in (
        "digits", {"dataset": "digits", "train": {"epochs": 40, "adv_weight": 1}},
        {"dataset": "digits", "train": dict(AT, adv_eps=int(EPS * 10) / 10)}))
    assert clean.id == default.id and at.id != clean.id
    assert at.d["train"] == {k: AT[k] for k in sorted(AT)}
    sw = sweep.Sweeper(cache_dir=cache_dir)
    assert sw.has_model(clean.d) and sw.has_model(at.d)
    assert not sw.has_model({**at.d, "train": dict(at.d["train"], epochs=3)})
    model, params, *_ = sw.model(at.d)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, at_model[1]))
    assert not jnp.array_equal(sw.model(clean.d)[1]["Dense_1"]["kernel"], params["Dense_1"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(rse_init=0.2, rse_inner=0.1), dict(pni="both", adv_eps=EPS, adv_steps=2,
                                                                         adv_weight=0.5),
                                dict(finetune=True, gf_noise=0.05, gf_samples=2, learning_rate=1e-3)],
                         ids=["rse", "pni_at", "gf"])
def test_every_training_defense_trains_and_reloads(kw, digits_model, digits_test, cache_dir, capsys):
    cfg = train.TrainConfig(epochs=2, batch_size=128, **kw)
    model, params = train.load_or_train("digits_cnn", "digits", cfg, cache_dir=cache_dir, progress=False)
    again, loaded = train.load_or_train("digits_cnn", "digits", cfg, cache_dir=cache_dir, progress=False)
    assert "loaded from cache" in capsys.readouterr().err and again == model  # the noise layers come back too
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, loaded))
    acc = train.accuracy(model, params, *digits_test)
    assert acc >= (train.accuracy(*digits_model, *digits_test) - 0.05 if cfg.finetune else 0.5), acc
    alphas = {k: float(jnp.mean(v)) for k, v in params.items() if k.startswith("pni_")}
    assert bool(alphas) == bool(cfg.pni) and all(a != 0.25 for a in alphas.values()), alphas
