"""The attacker's only view of the model: what a query returns, and which noise it gets.

An :class:`Oracle` pairs a (possibly defended) scorer with an output type:

- ``"scores"``: the full probability vector ``f32[B, K]`` (soft-label attacks: NES, ZOO, ...);
- ``"top1"``: only the top-1 class and its score, a :class:`Top1` (partial-information attacks);
- ``"label"``: only the top-1 class ``i32[B]`` (hard-label / decision-based attacks).

It owns the defender's randomness: point number ``q`` of an attack (queries are numbered from 0 in
the order the attack asks them, one point = one query) is answered with noise from the key
``fold_in(defense_key, q)``. The attacker never holds ``defense_key``; the driver binds it into a
:class:`BoundOracle` for each step, starting at the number of queries already spent, and counts
the points the step asks about. Two attacks with the same budget therefore face the same noise
stream, and any run is a deterministic function of (attack key, defense key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnd_jax.defenses import Scorer

OUTPUTS = ("scores", "top1", "label")


class Top1(NamedTuple):
    """A partial-information answer: the top-1 class and its (possibly noisy) score."""

    label: jax.Array  # i32[B]
    score: jax.Array  # f32[B]


def query_keys(defense_key, first_query, n: int):
    """Keys of queries ``first_query .. first_query + n - 1``: ``fold_in(defense_key, q)``."""
    q = jnp.asarray(first_query, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(defense_key, q)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scorer"], meta_fields=["output"])
@dataclasses.dataclass(frozen=True)
class Oracle:
    """A scorer seen through an output type. ``oracle.bind(key, q0)(x)`` answers queries.

    A pytree whose leaves are the scorer's arrays (:mod:`rnd_jax.pytree`).
    """

    scorer: Scorer
    output: str = "scores"

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown oracle output {self.output!r}; choose one of {OUTPUTS}")
        if not callable(self.scorer):
            raise ValueError("Oracle.scorer must be a callable (x, keys) -> probabilities")

    def answer(self, probs):
        """Reduce probabilities ``f32[B, K]`` to this oracle's output type."""
        if self.output == "scores":
            return probs
        label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        if self.output == "label":
            return label
        return Top1(label, jnp.take_along_axis(probs, label[:, None], axis=-1)[:, 0])

    def query(self, defense_key, first_query, x):
        """Answer the points ``x: f32[B, H, W, C]`` numbered ``first_query, first_query+1, ...``."""
        return self.answer(self.scorer(x, query_keys(defense_key, first_query, x.shape[0])))

    def bind(self, defense_key, first_query, budget: int | None = None) -> "BoundOracle":
        return BoundOracle(self, defense_key, first_query, budget)


class BoundOracle:
    """An oracle with the defense key and the next query number bound in; counts what it answers.

    ``used`` is the number of points asked so far. Shapes are static under ``jit``, so ``used`` is
    a plain int even while tracing: the driver reads it after tracing one step and checks it
    against the attack's declared cost.

    ``budget`` is the run's total query budget (a static int; ``None`` when the oracle is bound
    outside the driver) and ``spent`` the queries spent before this step (``first_query``, traced
    inside the driver). Attacks whose schedule is defined over the whole run (Square's
    ``p``-schedule over its iterations) read them; no attack may use them to exceed the budget.
    """

    def __init__(self, oracle: Oracle, defense_key, first_query, budget: int | None = None):
        self._oracle = oracle
        self._key = defense_key
        self._first = first_query
        self.budget = budget
        self.used = 0

    @property
    def spent(self):
        """Queries spent before this step (traced inside the driver)."""
        return self._first

    @property
    def output(self) -> str:
        return self._oracle.output

    def __call__(self, x):
        """Answer ``x``; its points are numbered after every point this step has asked so far."""
        if x.ndim != 4:
            raise ValueError(f"oracle queries are batches f32[B, H, W, C]; got shape {x.shape}")
        out = self._oracle.query(self._key, self._first + self.used, x)
        self.used += x.shape[0]
        return out

    def at(self, offset, x):
        """Answer ``x`` as the step's points ``offset, offset + 1, ...`` (``offset`` may be traced).

        For queries inside ``lax`` loops, whose count is only known at run time: they are not added
        to ``used``; the step reports how many points it asked this way in ``Info.queries`` and
        numbers them after its plain calls (offsets ``used, used + 1, ...``) without gaps or
        repeats. The driver adds ``Info.queries`` to the count; the eager
        :class:`QueryCounter` witnesses that the report is honest.
        """
        if x.ndim != 4:
            raise ValueError(f"oracle queries are batches f32[B, H, W, C]; got shape {x.shape}")
        return self._oracle.query(self._key, self._first + offset, x)


# ----------------------------------------------------------------------------- live points

_LIVE = threading.local()


def live():
    """At trace time: the predicate "the points asked here are really asked" (``None``: always).

    Under ``vmap`` a ``lax.while_loop`` runs its body for every image while any image's loop goes on,
    and a ``lax.cond`` with a batched predicate runs both branches: points of images whose loop has
    ended (or of the branch not taken) are computed and discarded. The driver and the attacks build
    their loops with :func:`live_while` and :func:`live_cond`, which record, while their body is
    traced, the per-image predicate under which it really runs. A scorer that costs real time or money
    per point (a foreign model, :mod:`rnd_jax.foreign`) reads it and sends only the live points.
    """
    stack = getattr(_LIVE, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def _living(pred):
    outer = live()
    pred = jnp.asarray(pred, bool)
    if outer is not None:
        pred = pred & outer
    if not hasattr(_LIVE, "stack"):
        _LIVE.stack = []
    _LIVE.stack.append(pred)
    try:
        yield
    finally:
        _LIVE.stack.pop()


def live_while(cond, body, init):
    """``jax.lax.while_loop(cond, body, init)`` whose body's points are live only while ``cond`` holds."""

    def wrapped(c):
        with _living(cond(c)):
            return body(c)

    return jax.lax.while_loop(cond, wrapped, init)


def live_cond(pred, true_fn, false_fn, *operands):
    """``jax.lax.cond`` whose branches' points are live only when the branch is the one taken."""
    pred = jnp.asarray(pred, bool)

    def t(*a):
        with _living(pred):
            return true_fn(*a)

    def f(*a):
        with _living(~pred):
            return false_fn(*a)

    return jax.lax.cond(pred, t, f, *operands)


class QueryCounter:
    """A scorer wrapper that counts, eagerly, every point the model is asked about.

    It is the independent witness for budget tests: run an attack under ``jax.disable_jit()``
    on one image (no ``vmap``), so every query reaches this wrapper as a concrete array, then
    compare ``count`` with the budget and with the count the driver reports. It refuses to run
    under tracing, where a Python counter would count traces instead of queries.
    """

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.count = 0
        self.calls = 0

    def __call__(self, x, keys):
        if isinstance(x, jax.core.Tracer):
            raise RuntimeError("QueryCounter counts concrete queries: run under jax.disable_jit() without vmap")
        self.count += int(x.shape[0])
        self.calls += 1
        return self.scorer(x, keys)
