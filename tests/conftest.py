"""Shared fixtures: one trained digits model per test session, in a private checkpoint cache.

Under pytest-xdist the workers of one session share the cache folder, and a file lock lets one of
them train each model while the others wait and load it (saves are atomic, see ``rnd_jax.train``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

# The suite compiles hundreds of small programs and runs each briefly, so compile time is most of its CPU
# time: XLA's backend optimisation level 1 (instead of the default 3) and the CPU backend's classic fusion
# emitters (--xla_cpu_use_fusion_emitters=false) each cut it by about a third, and the programs still run
# as fast. Training epochs ask for the full level themselves (rnd_jax.train.EPOCH_COMPILER_OPTIONS), so the
# shared models still train at full speed. Set before JAX starts its backend; subprocesses started by
# tests inherit them. A flag already in XLA_FLAGS wins.
for _flag, _value in (("xla_backend_optimization_level", "1"), ("xla_cpu_use_fusion_emitters", "false")):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import data, train
from rnd_jax.defenses import model_scorer


def _shared_cache(basetemp):
    return basetemp / "rnd_jax_cache"


def pytest_sessionstart(session):
    """Under pytest-xdist, each worker trains one of the two shared digits models as it starts (worker 0 the
    default one, worker 1 the surrogate, in parallel), then loads the other once it is saved: otherwise
    one worker trains while the other waits on the lock with nothing to do."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or getattr(session.config.option, "collectonly", False):
        return
    d = _shared_cache(session.config._tmp_path_factory.getbasetemp().parent)
    d.mkdir(exist_ok=True)
    first = int(worker.removeprefix("gw") or 0) % 2
    for seed in (first, 1 - first):
        _trained(d, seed)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make ``--dist loadgroup`` group again under pytest >= 9: pytest-xdist marks a test of an
    ``xdist_group`` by appending ``@<group>`` to its node id on the worker (the controller then sends a
    group to one worker, which compiles the group's shared programs once), through an attribute that
    pytest 9 no longer reads (``Node._nodeid``; the id is ``Node._id`` now). Done here the same way."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not config.getvalue("loadgroup"):
        return
    try:
        from _pytest.nodes import coerce_node_id
    except ImportError:  # pytest < 9: pytest-xdist's own suffix works
        return
    for item in items:
        if "@" in item.nodeid.rsplit("]", 1)[-1]:
            continue
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the session's base folder is shared by its workers
        d = _shared_cache(tmp_path_factory.getbasetemp().parent)
        d.mkdir(exist_ok=True)
    else:
        d = tmp_path_factory.mktemp("rnd_jax_cache")
    old = os.environ.get("RND_JAX_CACHE")
    os.environ["RND_JAX_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("RND_JAX_CACHE", None)
    else:
        os.environ["RND_JAX_CACHE"] = old


@contextlib.contextmanager
def _locked(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _trained(cache_dir, seed: int):
    with _locked(cache_dir / f".train-digits-{seed}.lock"):
        return train.load_or_train("digits_cnn", "digits", train.TrainConfig(seed=seed), cache_dir=cache_dir,
                                   progress=False)


@pytest.fixture(scope="session")
def digits_model(cache_dir):
    """(model, params) of the default digits classifier, trained once per session."""
    return _trained(cache_dir, 0)


@pytest.fixture(scope="session")
def clean_scorer(digits_model):
    model, params = digits_model
    return model_scorer(model, params)


@pytest.fixture(scope="session")
def surrogate_scorer(cache_dir):
    """A separately trained digits model (another seed): the transfer prior of P-RGF-like attacks."""
    model, params = _trained(cache_dir, 1)
    return model_scorer(model, params)


@pytest.fixture(scope="session")
def digits_test():
    return data.load("digits", "test")


@pytest.fixture(scope="session")
def attack_set(clean_scorer, digits_test):
    """Ten correctly classified test images with targets != labels (fixed key)."""
    from rnd_jax.evaluate import select_images

    x, y = digits_test
    return select_images(jax.random.key(7), clean_scorer, x, y, 10, True, 10)


def const_scorer(p):
    """A scorer answering the probability vector ``p`` to every point."""
    p = jnp.asarray(p, jnp.float32)
    return lambda x, keys: jnp.broadcast_to(p, (x.shape[0], p.shape[0]))


def identity_scorer(x, keys):
    """Exposes the (noisy) input as the 'answer', to check input noise."""
    return x.reshape(x.shape[0], -1)


def keys(seed: int, n: int):
    return jax.random.split(jax.random.key(seed), n)


def as_np(tree):
    """Device arrays -> numpy (PRNG keys as their raw key data), for exact comparisons."""
    def conv(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.asarray(a)

    return jax.tree.map(conv, tree)
