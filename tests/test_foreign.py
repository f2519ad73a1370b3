"""Foreign models: a host ``predict`` behind ``pure_callback``, only live points sent, counts exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import data, pytree
from rnd_jax.attacks import Context, make_attack
from rnd_jax.attacks.driver import StopRule, run
from rnd_jax.defenses import model_scorer, output_noise
from rnd_jax.evaluate import image_keys
from rnd_jax.foreign import HostModel, host_scorer, sklearn_predict, torch_predict
from rnd_jax.oracle import Oracle

N = 6


@pytest.fixture(scope="module")
def digits():
    x, y = data.load("digits", "train")
    xt, yt = data.load("digits", "test")
    # a least-squares linear classifier: a real NumPy model, no JAX inside
    w = np.linalg.lstsq(np.asarray(x).reshape(len(x), -1), np.eye(10)[y], rcond=None)[0].astype(np.float32)
    return x, y, np.asarray(xt[:N]), np.asarray(yt[:N]), 5.0 * w


def linear_predict(w):
    return lambda xb: xb.reshape(len(xb), -1) @ w


def _go(bundle, x0, labels, targets, ka, kd, kc):
    attack, oracle, budget, stop = bundle
    return run(attack, oracle, x0, labels, targets, ka, kd, budget, stop=stop, check_keys=kc)


GO = pytree.jit(_go)


def attack_run(attack, scorer, output, x0, y0, budget, stop=StopRule()):
    ka, kd, kc = image_keys(jax.random.key(1), jax.random.key(2), jnp.arange(len(y0)))
    targets = None if not attack.targeted else (y0 + 1) % 10
    return GO((attack, Oracle(scorer, output), budget, stop), x0, y0, targets, ka, kd, kc)


def test_host_scores_equal_the_same_model_in_jax(digits):
    *_, xt, _, w = digits
    s = host_scorer(linear_predict(w), 10, "logits")
    keys = jax.random.split(jax.random.key(0), N)
    ref = jax.nn.softmax(jnp.asarray(xt).reshape(N, -1) @ w, -1)
    np.testing.assert_allclose(s(jnp.asarray(xt), keys), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pytree.call(s, jnp.asarray(xt), keys), ref, rtol=1e-5, atol=1e-6)
    probs = HostModel(lambda xb: np.asarray(ref)[: len(xb)], 10, "probs")  # probabilities pass through
    np.testing.assert_array_equal(host_scorer(probs)(jnp.asarray(xt), keys), np.asarray(ref))


@pytest.mark.parametrize("name,output,budget", [("nes", "scores", 600), ("square_linf", "scores", 300),
                                                ("hsja", "label", 800)])
def test_host_count_equals_driver_count_under_vmap(digits, name, output, budget):
    x, y, xt, yt, w = digits
    model = HostModel(linear_predict(w), 10, "logits")
    attack = make_attack(name, Context(jnp.asarray(x), jnp.asarray(y)), targeted=False)
    for scorer in (host_scorer(model), output_noise(host_scorer(model), 0.01)):
        model.reset()
        res = attack_run(attack, scorer, output, xt, yt, budget)
        q = np.asarray(res.queries)
        assert model.points == int(q.sum()) > 0
        assert len(set(q.tolist())) > 1 or name == "hsja"  # images stop at different times
        if name == "nes":  # one step = one oracle call, sent once for all images
            assert model.calls == int(np.max(res.steps))


def test_host_count_includes_the_verified_rules_checks(digits):
    x, y, xt, yt, w = digits
    model = HostModel(linear_predict(w), 10, "logits")
    attack = make_attack("nes", targeted=False)
    res = attack_run(attack, output_noise(host_scorer(model), 0.05), "scores", xt, yt, 600, StopRule("verified"))
    checks = int(np.sum(res.check_queries))
    assert checks > 0
    assert model.points == int(np.sum(res.queries)) + checks


def test_prgf_conditional_estimates_are_sent_only_when_taken(digits):
    x, y, xt, yt, w = digits
    model = HostModel(linear_predict(w), 10, "logits")
    jw = jnp.asarray(w * 0.8)
    surrogate = model_scorer(_Linear(), {"w": jw})
    attack = make_attack("prgf", Context(surrogate=surrogate), targeted=False)
    res = attack_run(attack, host_scorer(model), "scores", xt, yt, 400)
    assert model.points == int(np.sum(res.queries)) > 0


class _Linear:
    """A JAX linear model with the flax ``apply`` signature (a surrogate for P-RGF)."""

    def apply(self, variables, x):
        return x.reshape(x.shape[0], -1) @ variables["params"]["w"]

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Linear)


def test_bad_host_models_raise(digits):
    *_, xt, _, w = digits
    with pytest.raises(ValueError, match="num_classes"):
        HostModel(linear_predict(w), 1)
    with pytest.raises(ValueError, match="outputs"):
        HostModel(linear_predict(w), 10, "logprobs")
    with pytest.raises(ValueError, match="num_classes=K"):
        host_scorer(linear_predict(w))
    keys = jax.random.split(jax.random.key(0), N)
    wrong = host_scorer(lambda xb: np.zeros((len(xb), 3)), 10)
    with pytest.raises(Exception, match="predict returned shape"):
        jax.block_until_ready(wrong(jnp.asarray(xt), keys))
    nan = host_scorer(lambda xb: np.full((len(xb), 10), np.nan), 10)
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(nan(jnp.asarray(xt), keys))


def test_batch_size_splits_host_calls(digits):
    *_, xt, _, w = digits
    model = HostModel(linear_predict(w), 10, "logits", batch_size=4)
    host_scorer(model)(jnp.asarray(xt), jax.random.split(jax.random.key(0), N))
    assert (model.points, model.calls, model.predict_calls) == (N, 1, 2)


def test_sklearn_model(digits):
    from sklearn.linear_model import LogisticRegression

    x, y, xt, *_ = digits
    clf = LogisticRegression(max_iter=200).fit(np.asarray(x).reshape(len(x), -1), y)
    s = host_scorer(sklearn_predict(clf, (8, 8, 1)), 10)
    got = s(jnp.asarray(xt), jax.random.split(jax.random.key(0), N))
    np.testing.assert_allclose(got, clf.predict_proba(xt.reshape(N, -1)), rtol=1e-5, atol=1e-6)


def test_torch_module():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10))
    x = np.array(jax.random.uniform(jax.random.key(0), (3, 8, 8, 1)))
    s = host_scorer(HostModel(torch_predict(net), 10, "logits"))
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(x).permute(0, 3, 1, 2)), -1).numpy()
    np.testing.assert_allclose(s(jnp.asarray(x), jax.random.split(jax.random.key(0), 3)), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nn.Module"):
        torch_predict(lambda t: t)


def test_separately_compiled_model_answers_as_the_inlined_one(clean_scorer, digits_model, digits):
    from rnd_jax.foreign import separately_compiled

    model, params = digits_model
    *_, xt, _, _ = digits
    s = separately_compiled(model, params, (8, 8, 1))
    keys = jax.random.split(jax.random.key(0), 5)
    x = jnp.asarray(xt[:5])  # 5 points: padded to 8 on the host, sliced back
    np.testing.assert_allclose(pytree.call(s, x, keys), clean_scorer(x, keys), rtol=1e-5, atol=1e-6)
    host = s.args[0]
    assert (host.points, host.calls) == (5, 1)
