"""The attacker's only view of the model: what a query returns, and which noise it gets.

An :class:`Oracle` pairs a (possibly defended) scorer with an output type:

- ``"scores"``: the full probability vector ``f32[B, K]`` (soft-label attacks: NES, ZOO, ...);
- ``"top1"``: only the top-1 class and its score, a :class:`Top1` (partial-information attacks);
- ``"label"``: only the top-1 class ``i32[B]`` (hard-label / decision-based attacks);
- ``"gradient"``: white-box access, a :class:`Gradient`: the probabilities ``f32[B, K]`` and the
  pullback (vector-Jacobian product) of the defended scorer at the ``B`` points, with the noise of
  those very queries (white-box attacks: PGD, C&W; :func:`loss_gradient` turns it into the gradient
  of a loss of the probabilities).

It owns the defender's randomness: point number ``q`` of an attack (queries are numbered from 0 in
the order the attack asks them, one point = one query) is answered with noise from the key
``fold_in(defense_key, q)``. The attacker never holds ``defense_key``; the driver binds it into a
:class:`BoundOracle` for each step, starting at the number of queries already spent, and counts
the points the step asks about. Two attacks with the same budget therefore face the same noise
stream, and any run is a deterministic function of (attack key, defense key).

**Checked answers.** When a query is traced, the scorer's output must be probabilities ``f[B, K]``
for the ``B`` points asked, with ``K >= 2`` classes (``K = Oracle.num_classes`` when that is set):
anything else is a ``ValueError`` at trace time. At run time every answer is checked for
non-finite scores (one ``isfinite`` reduction per call, on the probabilities before they are
reduced to a label): the driver watches a step (:func:`watch`) and stops an image whose answers
were not all finite. The flag travels out of the loops an attack builds with :func:`live_while`
and :func:`live_cond`; answers asked inside a bare ``lax`` loop (or a ``vmap`` inside a step) are
not seen by the watcher, so attacks build their query loops with those two.

**Gradient queries.** A ``"gradient"`` oracle answers point ``q`` with the defended scorer evaluated
with key ``fold_in(defense_key, q)``, as every other output type does, and differentiates that very
evaluation: ``Gradient.probs`` are the noisy probabilities and ``Gradient.pullback(v)`` (``v: f[B, K]``)
is ``sum_k v[i, k] d probs[i, k] / d x[i]`` for each point ``i`` (a point's answer depends only on its
own input and key). One point = one query, whatever the attack does with the pullback (it may apply it
to several losses: it is the same draw of the defender's noise). :func:`loss_gradient` gives
``(loss[B], d loss[i] / d x[i])`` for a loss ``f(probs[B, K]) -> f32[B]``. Its gradient is checked for
non-finite values like the probabilities. The scorer is differentiated outside the driver's
live-point predicates (:func:`outside_loops`), so a compacted scorer (:mod:`rnd_jax.compact`, whose
``custom_vmap`` has no reverse-mode rule) is evaluated as its wrapped scorer there: on every point of
the batch, not only the live ones. A scorer that cannot be differentiated (a host callback such as
:mod:`rnd_jax.foreign`; JPEG's rounding has a zero gradient) cannot answer gradient queries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import core as _core

from rnd_jax.defenses import Scorer

OUTPUTS = ("scores", "top1", "label", "gradient")


class Top1(NamedTuple):
    """A partial-information answer: the top-1 class and its (possibly noisy) score."""

    label: jax.Array  # i32[B]
    score: jax.Array  # f32[B]


class Gradient(NamedTuple):
    """A white-box answer: the (possibly noisy) probabilities and the pullback of the scorer at the points."""

    probs: jax.Array  # f32[B, K]
    pullback: Any  # v: f32[B, K] -> f32[B, H, W, C], the vector-Jacobian product of this answer


def loss_gradient(answer: Gradient, loss):
    """``(loss(probs) f32[B], d loss[i] / d x[i] f32[B, H, W, C])`` of a :class:`Gradient` answer.

    ``loss(probs[B, K]) -> f32[B]`` is a per-point loss (e.g. ``lambda p: losses.margin(p, y)``); the
    gradient goes through the defended scorer with the noise of the query's own key. A non-finite
    gradient is reported to the innermost :func:`watch` (it ends the image, as a non-finite answer does).
    """
    if not isinstance(answer, Gradient):
        raise ValueError(f"loss_gradient needs a Gradient answer (a 'gradient' oracle's), got {type(answer).__name__}")
    value, dloss = jax.vjp(loss, answer.probs)
    if jnp.shape(value) != jnp.shape(answer.probs)[:1]:
        raise ValueError(f"the loss must map probabilities f[B, K] to one value per point f[B]; got shape "
                         f"{jnp.shape(value)} for B = {jnp.shape(answer.probs)[0]}")
    (v,) = dloss(jnp.ones_like(value))
    grad = answer.pullback(v)
    _report(~jnp.all(jnp.isfinite(grad)))
    return value, grad


def query_keys(defense_key, first_query, n: int):
    """Keys of queries ``first_query .. first_query + n - 1``: ``fold_in(defense_key, q)``."""
    q = jnp.asarray(first_query, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(defense_key, q)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scorer"], meta_fields=["output", "num_classes"])
@dataclasses.dataclass(frozen=True)
class Oracle:
    """A scorer seen through an output type. ``oracle.bind(key, q0)(x)`` answers queries.

    ``num_classes``: the number of classes the scorer must answer (checked when a query is traced);
    ``None`` takes it from the scorer's output shape (:func:`class_count`). A pytree whose leaves
    are the scorer's arrays (:mod:`rnd_jax.pytree`).
    """

    scorer: Scorer
    output: str = "scores"
    num_classes: int | None = None

    def __post_init__(self):
        if not isinstance(self.output, str) or self.output not in OUTPUTS:
            raise ValueError(f"unknown oracle output {self.output!r}; choose one of {OUTPUTS}")
        if not callable(self.scorer):
            raise ValueError("Oracle.scorer must be a callable (x, keys) -> probabilities")
        k = self.num_classes
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
            raise ValueError(f"Oracle.num_classes must be an int >= 2 or None, got {k!r}")

    def answer(self, probs):
        """Reduce probabilities ``f32[B, K]`` to this oracle's output type (not ``"gradient"``: :meth:`query`)."""
        if self.output == "gradient":
            raise ValueError("a 'gradient' answer needs the points, not only their probabilities: use query()")
        if self.output == "scores":
            return probs
        label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        if self.output == "label":
            return label
        return Top1(label, jnp.take_along_axis(probs, label[:, None], axis=-1)[:, 0])

    def query(self, defense_key, first_query, x):
        """Answer the points ``x: f32[B, H, W, C]`` numbered ``first_query, first_query+1, ...``.

        The scores' shape is checked (module docstring) and their finiteness reported to the
        innermost :func:`watch`.
        """
        return self._ask(defense_key, first_query, x)[0]

    def _ask(self, defense_key, first_query, x):
        """(answer, number of classes K) of :meth:`query`."""
        return self._ask_keys(query_keys(defense_key, first_query, x.shape[0]), x)

    def _ask_keys(self, keys, x):
        """(answer, K) for the points ``x`` with the query keys ``keys``."""
        if self.output == "gradient":
            return self._differentiate(x, keys)
        probs = self.scorer(x, keys)
        k = check_scores(probs, x.shape[0], self.num_classes, "the oracle's scorer")
        _report(~jnp.all(jnp.isfinite(probs)))
        return self.answer(probs), k

    def _differentiate(self, x, keys):
        """(:class:`Gradient` answer, K): the scorer and its pullback at ``x`` with the query keys ``keys``."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"gradient queries need floating-point points, got dtype {x.dtype}")
        with outside_loops():  # differentiable path of a compacted scorer (module docstring)
            probs, pullback = jax.vjp(lambda z: self.scorer(z, keys), x)
        k = check_scores(probs, x.shape[0], self.num_classes, "the oracle's scorer")
        _report(~jnp.all(jnp.isfinite(probs)))
        return Gradient(probs, lambda v: pullback(jnp.asarray(v, probs.dtype))[0]), k

    def bind(self, defense_key, first_query, budget: int | None = None) -> "BoundOracle":
        return BoundOracle(self, defense_key, first_query, budget)


def check_scores(probs, n: int, num_classes: int | None = None, what: str = "the scorer") -> int:
    """Trace-time check that ``probs`` are scores ``f[n, K]`` (``K >= 2``, ``= num_classes`` if set); returns K."""
    shape, dtype = jnp.shape(probs), getattr(probs, "dtype", None)
    if len(shape) != 2 or shape[0] != n or shape[1] < 2:
        raise ValueError(f"{what} must return probabilities f32[B, K] (K >= 2 classes) for B = {n} points; "
                         f"got shape {tuple(shape)}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{what} must return floating-point probabilities; got dtype {dtype}")
    if num_classes is not None and shape[1] != num_classes:
        raise ValueError(f"{what} answers {shape[1]} classes; the oracle declares num_classes={num_classes}")
    return int(shape[1])


def class_count(oracle: Oracle, point_shape) -> int:
    """The number of classes ``oracle`` answers for points of shape ``(H, W, C)``, without running the model.

    ``oracle.num_classes`` if set, else the scorer's output shape on one abstract point
    (``jax.eval_shape``; a :class:`QueryCounter` inside does not count it). A scorer that cannot take
    such points, or answers anything but ``f[1, K]``, raises ``ValueError``.
    """
    if oracle.num_classes is not None:
        return oracle.num_classes
    point = jax.ShapeDtypeStruct((1,) + tuple(point_shape), jnp.float32)
    _PROBE.depth = getattr(_PROBE, "depth", 0) + 1
    try:
        out = jax.eval_shape(lambda x: oracle.scorer(x, query_keys(jax.random.key(0), 0, 1)), point)
    except Exception as e:  # the model's own error, whatever its type, means these images do not fit it
        raise ValueError(f"the oracle's scorer cannot answer images of shape {tuple(point_shape)}: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        _PROBE.depth -= 1
    return check_scores(out, 1, None, "the oracle's scorer")


_PROBE = threading.local()  # depth > 0 while class_count traces a scorer abstractly


def _check_batch(x):
    if x.ndim != 4:
        raise ValueError(f"oracle queries are batches f32[B, H, W, C]; got shape {x.shape}")


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
        self.classes = None  # K of the scorer's answers, once a query was traced

    @property
    def spent(self):
        """Queries spent before this step (traced inside the driver)."""
        return self._first

    @property
    def output(self) -> str:
        return self._oracle.output

    def __call__(self, x):
        """Answer ``x``; its points are numbered after every point this step has asked so far."""
        _check_batch(x)
        out, self.classes = self._oracle._ask(self._key, self._first + self.used, x)
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
        _check_batch(x)
        out, self.classes = self._oracle._ask(self._key, self._first + offset, x)
        return out

    def numbered(self, numbers, x, live=None):
        """Answer ``x`` with point ``i`` numbered ``numbers[i]`` of the step (``i32[B]``, may be traced).

        For attacks that run several searches in lock-step: each iteration asks the next point of every
        search still going, and numbers those points consecutively after the points asked before. The
        same contract as :meth:`at`: points not added to ``used``, reported in ``Info.queries``, numbered
        without gaps or repeats. ``live`` (``bool[B]``): the points really asked (:func:`live`; a
        compacted or foreign scorer evaluates only those); the others' numbers and answers are ignored.
        """
        _check_batch(x)
        numbers = jnp.asarray(numbers, jnp.int32)
        if numbers.shape != x.shape[:1]:
            raise ValueError(f"numbered(): one number per point, got {numbers.shape} for {x.shape[0]} points")
        q = jnp.asarray(self._first, jnp.int32) + numbers
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(self._key, q)
        with contextlib.nullcontext() if live is None else _living(live):
            out, self.classes = self._oracle._ask_keys(keys, x)
        return out


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
def outside_loops():
    """Trace as if no loop predicate were in force: :func:`live` is ``None`` inside (for a scorer that is
    handed only the live points, e.g. :func:`rnd_jax.compact.compacted`'s wrapped one)."""
    stack = getattr(_LIVE, "stack", None)
    saved = list(stack) if stack else []
    if stack:
        stack.clear()
    try:
        yield
    finally:
        if stack is not None:
            stack.extend(saved)


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
    """``jax.lax.while_loop(cond, body, init)`` whose body's points are live only while ``cond`` holds.

    The loop also carries whether any answer its body saw was non-finite, and reports it to the
    enclosing :func:`watch` after the loop.
    """

    asked = []

    def wrapped(c):
        inner, bad = c
        with _living(cond(inner)), watch() as seen:
            out = body(inner)
        asked.append(seen.asked)
        return out, bad | seen.invalid

    out, bad = jax.lax.while_loop(lambda c: cond(c[0]), wrapped, (init, jnp.zeros((), bool)))
    if any(asked):  # a query was traced in the body
        _report(bad)
    return out


def live_cond(pred, true_fn, false_fn, *operands):
    """``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``; each branch's points are live only
    when it is the branch taken.

    Built as two ``while_loop`` s of at most one trip (one per branch, through :func:`live_while`), not
    as a ``lax.cond``: under ``vmap`` a ``lax.cond`` with a per-image predicate becomes a select that
    runs both branches for every image and first broadcasts every array the branches close over to one
    copy per image, a model's params included, so a query there ran the model with per-image weights
    (a grouped convolution, several times slower, that no compaction could shrink). A loop's body keeps
    those arrays as they are and runs while any image takes its branch; the images that do not keep
    their carry. Whether the taken branch saw a non-finite answer is reported to the enclosing
    :func:`watch`. ``false_fn`` is traced twice (once for the shapes of the result); not differentiable
    in reverse mode (a loop).
    """
    pred = jnp.asarray(pred, bool)
    shapes = jax.eval_shape(false_fn, *operands)
    blank = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def once(when, fn):
        def body(c):
            return jnp.zeros((), bool), fn(*operands)
        return live_while(lambda c: c[0], body, (when, blank))[1]

    taken, other = once(pred, true_fn), once(~pred, false_fn)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), taken, other)


# ----------------------------------------------------------------------------- non-finite answers

class Watch:
    """What the queries traced inside one :func:`watch` saw: ``invalid`` (bool, traced) and ``asked``."""

    def __init__(self):
        self.trace = _core.trace_ctx.trace
        self.invalid = jnp.zeros((), bool)
        self.asked = False


_WATCH = threading.local()


@contextlib.contextmanager
def watch():
    """Collect, while tracing its block, whether any oracle answer asked there was non-finite.

    ``with watch() as w: ...`` then ``w.invalid`` is a bool (traced under ``jit``) that is True if
    some scores of a query answered in the block were NaN or inf, and ``w.asked`` says whether any
    query was traced there. Queries in loops and conds built with :func:`live_while` and
    :func:`live_cond` are included; those in a bare ``lax`` loop are not (module docstring).
    """
    if not hasattr(_WATCH, "stack"):
        _WATCH.stack = []
    w = Watch()
    _WATCH.stack.append(w)
    try:
        yield w
    finally:
        _WATCH.stack.pop()


def _report(bad):
    """Add ``bad`` to the innermost watch, if it was opened at the current trace level (else drop it)."""
    stack = getattr(_WATCH, "stack", None)
    if not stack:
        return
    w = stack[-1]
    if _core.trace_ctx.trace is not w.trace:  # inside a bare lax loop of this block: its values cannot leave
        return
    w.invalid = w.invalid | bad
    w.asked = True


class QueryCounter:
    """A scorer wrapper that counts, eagerly, every point the model is asked about.

    It is the independent witness for budget tests: run an attack under ``jax.disable_jit()``
    on one image (no ``vmap``), so every query reaches this wrapper as a concrete array, then
    compare ``count`` with the budget and with the count the driver reports. It refuses to run
    under tracing, where a Python counter would count traces instead of queries. A gradient query
    reaches it as a differentiation tracer of a concrete point (eager ``jax.vjp``): that is one
    concrete evaluation, counted like any other.
    """

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.count = 0
        self.calls = 0

    def __call__(self, x, keys):
        if isinstance(x, jax.core.Tracer) and getattr(_PROBE, "depth", 0):
            return self.scorer(x, keys)  # an abstract shape probe (class_count), not a query
        if isinstance(x, jax.core.Tracer) and not _core.is_concrete(x):
            raise RuntimeError("QueryCounter counts concrete queries: run under jax.disable_jit() without vmap")
        self.count += int(x.shape[0])
        self.calls += 1
        return self.scorer(x, keys)
