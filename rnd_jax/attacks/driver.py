"""The attack driver: one ``lax.while_loop`` per image, ``vmap``-ed over images.

An attack is a pair of pure functions built by a constructor that closes over a frozen config::

    attack = nes(NESConfig(...))
    state = attack.init(key, x0, label, target)        # one image, unbatched
    state, info = attack.step(state, oracle)            # exactly attack.cost oracle points

``State`` is a NamedTuple pytree with at least ``x`` (the attack's current point, returned as the
adversarial candidate), ``done`` (the attack's own belief that ``x`` is adversarial, from its
own — possibly noisy — answers) and ``step``. A state may also carry ``failed`` (bool): once it
is true the driver stops that image (e.g. a decision attack that found no starting point), and the
other images of the batch run on. ``Info`` is a NamedTuple of per-step diagnostics
with at least ``loss``. Each step derives its randomness from ``fold_in(state.key, state.step)``.

The driver owns the query count. Before a step it binds the oracle to the image's defense key and
to the number of queries already spent; the bound oracle counts the points the step asks about,
which must equal ``attack.cost`` (checked when the step is traced). A step whose count is only
known at run time (a binary search inside ``lax.while_loop``) asks through ``oracle.at(offset, x)``
and reports those points in ``Info.queries``; then ``attack.cost`` is its worst case. The loop runs
while the attack has not succeeded and ``queries + cost <= budget``, so the budget is never
exceeded. Under ``vmap``
the loop runs until every image stops; an image that has stopped keeps its carry unchanged.

``advance`` can stop after ``max_steps`` steps and be called again on its result: running N steps,
then M more, gives exactly the N+M-step result.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax.oracle import Oracle


class Attack(NamedTuple):
    """A query attack: ``init(key, x0, label, target) -> State``, ``step(state, oracle)``."""

    init: Callable[..., Any]
    step: Callable[..., Any]
    cost: int  # oracle points per step (the worst case when the step reports Info.queries)
    output: str  # oracle output type the step needs: "scores", "top1" or "label"
    targeted: bool


class Carry(NamedTuple):
    """The driver's loop state for one image."""

    state: Any
    queries: jax.Array  # i32: oracle points spent
    trace_queries: jax.Array  # i32[T]: queries spent before each recorded step (-1 = unused)
    trace_loss: jax.Array  # f32[T]: the attack's loss at each recorded step (NaN = unused)


class Result(NamedTuple):
    """Per image (leading batch axis when vmapped)."""

    x_adv: jax.Array  # the attack's final point
    lucky: jax.Array  # bool: the attack's own belief of success (one noisy answer)
    queries: jax.Array  # i32: budgeted queries spent
    steps: jax.Array  # i32: steps taken
    trace_queries: jax.Array
    trace_loss: jax.Array


def trace_stride(budget: int, cost: int, trace_len: int) -> tuple[int, int]:
    """(number of trace slots, steps between recorded steps) for a budget."""
    max_steps = max(1, budget // cost)
    slots = max(1, min(trace_len, max_steps))
    return slots, math.ceil(max_steps / slots)


def validate(attack: Attack, oracle: Oracle, budget, x0, label, target=None, batched: bool = True):
    """Check a run's configuration and inputs in plain Python, before anything is traced.

    Raises ``ValueError`` on: a budget that is not a positive int or is smaller than one step; an
    oracle whose output type the attack cannot use; images of the wrong rank, non-finite or outside
    [0, 1]; labels/targets of the wrong shape or out of range; a target equal to the label.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be a positive int (queries), got {budget!r}")
    if budget < attack.cost:
        raise ValueError(f"budget {budget} is smaller than one step of this attack ({attack.cost} queries)")
    if oracle.output != attack.output:
        raise ValueError(f"this attack needs a {attack.output!r} oracle, got a {oracle.output!r} one")
    x0 = np.asarray(x0)
    rank = 4 if batched else 3
    if x0.ndim != rank:
        raise ValueError(f"images must have rank {rank} ({'[N, H, W, C]' if batched else '[H, W, C]'}), got shape {x0.shape}")
    if not np.all(np.isfinite(x0)):
        raise ValueError(f"images must be finite and in [0, 1]; {np.size(x0) - np.isfinite(x0).sum()} values are NaN/inf")
    if x0.min() < 0.0 or x0.max() > 1.0:
        raise ValueError(f"images must be in [0, 1]; got range [{x0.min()}, {x0.max()}]")
    label = np.asarray(label)
    want = x0.shape[:1] if batched else ()
    if label.shape != want:
        raise ValueError(f"labels must have shape {want}, got {label.shape}")
    if attack.targeted:
        if target is None:
            raise ValueError("a targeted attack needs target classes")
        target = np.asarray(target)
        if target.shape != want:
            raise ValueError(f"targets must have shape {want}, got {target.shape}")
        if np.any(target < 0) or np.any(label < 0):
            raise ValueError("labels and targets must be class indices >= 0")
        if np.any(target == label):
            bad = np.flatnonzero(np.atleast_1d(target == label)).tolist()
            raise ValueError(f"target equals the true label for image(s) {bad[:10]}")


def start(attack: Attack, key, x0, label, target, budget: int, trace_len: int = 256) -> Carry:
    """The carry before the first step of one image."""
    slots, _ = trace_stride(budget, attack.cost, trace_len)
    return Carry(
        state=attack.init(key, x0, label, target),
        queries=jnp.zeros((), jnp.int32),
        trace_queries=jnp.full((slots,), -1, jnp.int32),
        trace_loss=jnp.full((slots,), jnp.nan, jnp.float32),
    )


def advance(attack: Attack, oracle: Oracle, carry: Carry, defense_key, budget: int,
            trace_len: int = 256, max_steps: int | None = None) -> Carry:
    """Step one image until success, budget exhaustion, or ``max_steps`` more steps."""
    slots, stride = trace_stride(budget, attack.cost, trace_len)
    stop_at = None if max_steps is None else carry.state.step + max_steps

    def cond(c: Carry):
        go = jnp.logical_not(c.state.done) & (c.queries + attack.cost <= budget)
        if hasattr(c.state, "failed"):
            go = go & jnp.logical_not(c.state.failed)
        if stop_at is not None:
            go = go & (c.state.step < stop_at)
        return go

    def body(c: Carry) -> Carry:
        bound = oracle.bind(defense_key, c.queries)
        state, info = attack.step(c.state, bound)
        spent = _spent(attack, bound.used, info)
        s = c.state.step
        slot = jnp.minimum(s // stride, slots - 1)
        record = (s % stride) == 0
        tq = jnp.where(record, c.trace_queries.at[slot].set(c.queries), c.trace_queries)
        tl = jnp.where(record, c.trace_loss.at[slot].set(jnp.asarray(info.loss, jnp.float32)), c.trace_loss)
        return Carry(state, c.queries + spent, tq, tl)

    return jax.lax.while_loop(cond, body, carry)


def _spent(attack: Attack, used: int, info):
    """Points one step asked: its plain oracle calls (static) plus its reported ``Info.queries``."""
    dynamic = getattr(info, "queries", None)
    if dynamic is None:
        if used != attack.cost:
            raise ValueError(f"attack step asked {used} oracle points but declares cost {attack.cost}")
        return attack.cost
    if used > attack.cost:
        raise ValueError(f"attack step asked {used} oracle points, more than its worst-case cost {attack.cost}")
    return used + jnp.asarray(dynamic, jnp.int32)


def finish(carry: Carry) -> Result:
    s = carry.state
    return Result(s.x, s.done, carry.queries, s.step, carry.trace_queries, carry.trace_loss)


def run_one(attack: Attack, oracle: Oracle, x0, label, target, attack_key, defense_key,
            budget: int, trace_len: int = 256) -> Result:
    """Attack one image ``x0: f32[H, W, C]``. Pure; jit it at the top with static attack/oracle/budget."""
    carry = start(attack, attack_key, x0, label, target, budget, trace_len)
    return finish(advance(attack, oracle, carry, defense_key, budget, trace_len))


def run(attack: Attack, oracle: Oracle, x0, labels, targets, attack_keys, defense_keys,
        budget: int, trace_len: int = 256) -> Result:
    """Attack a batch ``x0: f32[N, H, W, C]`` (one key of each kind per image), vmapped."""
    if targets is None:
        targets = jnp.full(jnp.shape(labels), -1, jnp.int32)
    fn = lambda x, y, t, ka, kd: run_one(attack, oracle, x, y, t, ka, kd, budget, trace_len)
    return jax.vmap(fn)(x0, labels, targets, attack_keys, defense_keys)
