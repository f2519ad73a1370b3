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

**Stop rules** (:class:`StopRule`; DESIGN.md, "Evaluation protocol"). After every step the driver
judges the attack's own claim ``state.done``:

- ``"single"``: the claim ends the image (one noisy answer suffices; the attack may be lucky).
- ``"verified"``: the randomized feature defense paper's rule (Nguyen et al. 2024, App. D.4): at each
  claimed success the evaluator asks ``checks`` (9) fresh *defended* queries at ``state.x``; the image
  stops only if a strict majority is adversarial, else ``done`` is reset to False and the attack
  continues from its current state. A claim at the very point whose verification was last rejected is
  not verified again and counts as rejected: its answer is stale (a decision attack keeps reporting the
  best point it once saw adversarial), and re-asking one point until a majority comes would make the
  check itself a lucky stop. The check noise comes from the defender's check stream of the
  image (``fold_in(check_key, CHECK_STREAM)``, query ``q`` of it ``fold_in(., q)``), never from the
  attack's query stream; the checks are reported in ``check_queries`` and counted in the budget only
  with ``count=True`` (then a claim is checked only while ``checks`` queries are left).
- ``"clean"``: at each claimed success the *undefended* model is asked at ``state.x`` (not counted); the
  image stops only if it is fooled there (and ``state.x`` is within ``eps``, if set), else the attack
  continues as under ``"verified"``. A measurement mode: no attacker can ask the undefended model; it
  measures an attack that is never deceived by a lucky answer.

On an undefended model the three rules give identical runs. The rule's verdict is ``Result.success``;
``Result.lucky`` keeps the attack's own verdict at its last step. The rule may also be a traced
``int32`` index into :data:`STOP_RULES` (``rule=`` of :func:`run`), so one compiled program serves
every rule.

**Checked inputs and answers.** :func:`run` and :func:`run_one` call :func:`validate` first: on concrete
inputs every check (``ValueError`` naming the option); on inputs traced by an outer ``jit`` only what
shapes and dtypes allow (those callers validate the concrete values first, as
:func:`rnd_jax.evaluate.evaluate_cell` does). The scorer's answers are checked for shape when traced
(:func:`rnd_jax.oracle.check_scores`) and for finiteness at run time: a step whose answers (or the stop
rule's checks) were not all finite ends its image with ``Result.invalid`` set, ``success`` and ``lucky``
False and ``x_adv`` the point before that step (its queries are counted).

**Queries.** ``Result.queries`` counts every budgeted query (success checks of the attack included, and
the stop rule's checks with ``count=True``). ``Result.loss_queries`` leaves out the points an attack
asks only to check success (``Attack.checks`` per step: NES's query at its current point, ...), the
convention of Ilyas et al. (2018), SignHunter and Parsimonious, and the stop rule's checks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax.oracle import Oracle, check_scores, class_count, live_while, query_keys, watch

STOP_RULES = ("single", "verified", "clean")
NORMS = ("linf", "l2")
CHECK_STREAM = 0x7FFFFFFF  # sub-stream of an image's check key used by the stop rule's checks
INT32_MAX = 2 ** 31 - 1  # queries are counted in int32


class Attack(NamedTuple):
    """A query attack: ``init(key, x0, label, target) -> State``, ``step(state, oracle)``."""

    init: Callable[..., Any]
    step: Callable[..., Any]
    cost: int  # oracle points per step (the worst case when the step reports Info.queries)
    output: str  # oracle output type the step needs: "scores", "top1" or "label"
    targeted: bool
    checks: int = 0  # points of each step asked only to check success (not loss queries)


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When an image's attack ends: ``"single"``, ``"verified"`` or ``"clean"`` (module docstring).

    ``checks``: defended queries per verification (strict majority decides); ``count``: verification
    queries count against the budget; ``eps`` / ``norm``: the ``"clean"`` rule also needs the point
    within this radius (an attack's claims already include it).
    """

    name: str = "single"
    checks: int = 9
    count: bool = False
    eps: float | None = None
    norm: str = "linf"

    def __post_init__(self):
        if self.name not in STOP_RULES:
            raise ValueError(f"unknown stop rule {self.name!r}; choose one of {STOP_RULES}")
        if isinstance(self.checks, bool) or not isinstance(self.checks, int) or self.checks < 1:
            raise ValueError(f"stop-rule checks must be an int >= 1, got {self.checks!r}")
        if not isinstance(self.count, bool):
            raise ValueError(f"stop-rule count must be a bool, got {self.count!r}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.eps is not None and (isinstance(self.eps, bool) or not isinstance(self.eps, (int, float))
                                     or not math.isfinite(self.eps) or self.eps <= 0):
            raise ValueError(f"stop-rule eps must be a finite number > 0 or None, got {self.eps!r}")


SINGLE = StopRule()


class Carry(NamedTuple):
    """The driver's loop state for one image."""

    state: Any
    queries: jax.Array  # i32: budgeted oracle points spent
    trace_queries: jax.Array  # i32[T]: queries spent before each recorded step (-1 = unused)
    trace_loss: jax.Array  # f32[T]: the attack's loss at each recorded step (NaN = unused)
    trace_claimed: jax.Array  # bool[T]: the attack's own verdict after each recorded step
    trace_l2: jax.Array  # f32[T]: ||x - x0||_2 of the attack's point after each recorded step (NaN = unused)
    trace_linf: jax.Array  # f32[T]: ||x - x0||_inf of that point (NaN = unused)
    x0: jax.Array  # the original image
    label: jax.Array  # i32
    target: jax.Array  # i32 (-1 when untargeted)
    claimed: jax.Array  # bool: the attack's own verdict after its last step (before the stop rule)
    rejected: jax.Array  # the point whose verification was last rejected (NaN: none)
    claims: jax.Array  # i32: steps after which the attack claimed success
    check_queries: jax.Array  # i32: queries the stop rule asked (verified: 9 per claim)
    invalid: jax.Array  # bool: an answer of the attack's queries or of the rule's checks was NaN/inf


class Result(NamedTuple):
    """Per image (leading batch axis when vmapped)."""

    x_adv: jax.Array  # the attack's final point
    lucky: jax.Array  # bool: the attack's own verdict at its last step (one noisy answer)
    queries: jax.Array  # i32: budgeted queries spent
    steps: jax.Array  # i32: steps taken
    trace_queries: jax.Array
    trace_loss: jax.Array
    success: jax.Array  # bool: the stop rule's verdict (single: = lucky)
    loss_queries: jax.Array  # i32: queries without the attack's pure success checks and the rule's checks
    check_queries: jax.Array  # i32: the stop rule's check queries
    claims: jax.Array  # i32: steps that ended with the attack claiming success
    invalid: Any = None  # bool: stopped on a non-finite answer (then success and lucky are False); None: unknown
    trace_claimed: Any = None  # bool[T]: the attack's own verdict after each recorded step (None: not recorded)
    trace_l2: Any = None  # f32[T]: ||x - x0||_2 after each recorded step
    trace_linf: Any = None  # f32[T]: ||x - x0||_inf after each recorded step


def trace_stride(budget: int, cost: int, trace_len: int) -> tuple[int, int]:
    """(number of trace slots, steps between recorded steps) for a budget."""
    max_steps = max(1, budget // cost)
    slots = max(1, min(trace_len, max_steps))
    return slots, math.ceil(max_steps / slots)


def _traced(a) -> bool:
    return isinstance(a, jax.core.Tracer)


def _dtype(a):
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def validate(attack: Attack, oracle: Oracle, budget, x0, label, target=None, batched: bool = True,
             stop: StopRule = SINGLE, trace_len: int = 256):
    """Check a run's configuration and inputs in plain Python, before anything is traced.

    Raises ``ValueError`` on: an ``attack`` that is not an :class:`Attack`, an ``oracle`` that is not an
    :class:`rnd_jax.oracle.Oracle` or whose output type the attack cannot use; a budget that is not a
    positive int, is smaller than one step, or does not fit the int32 query count with one step and the
    stop rule's checks on top; a ``stop`` that is not a :class:`StopRule`; a ``trace_len`` that is not a
    positive int; images of the wrong rank or dtype (floating point), non-finite or outside [0, 1];
    labels/targets of the wrong shape or dtype (integer), outside ``0 .. K-1`` (``K``: the oracle's
    number of classes, :func:`rnd_jax.oracle.class_count`, found without running the model); a target
    equal to the label; a targeted attack without targets. Targets of an untargeted attack are ignored.

    Inputs traced by an outer ``jit`` (the experiments and the sweep jit :func:`run` at the top) are
    checked for what their shapes and dtypes allow; their values (finite, in range, target != label)
    only when concrete. Costs a pass of NumPy over the concrete images and, for concrete labels, one
    abstract evaluation of the scorer (``jax.eval_shape``) to find ``K``.
    """
    if not isinstance(attack, Attack):
        raise ValueError(f"attack must be an Attack (make_attack(...)), got {type(attack).__name__}")
    if not isinstance(oracle, Oracle):
        raise ValueError(f"oracle must be an rnd_jax.oracle.Oracle (Oracle(scorer, output)), "
                         f"got {type(oracle).__name__}")
    if not isinstance(stop, StopRule):
        raise ValueError(f"stop must be a StopRule, got {type(stop).__name__}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be a positive int (queries), got {budget!r}")
    if budget < attack.cost:
        raise ValueError(f"budget {budget} is smaller than one step of this attack ({attack.cost} queries)")
    limit = INT32_MAX - attack.cost - stop.checks
    if budget > limit:
        raise ValueError(f"budget {budget} is too large: queries are counted in int32, so the budget must be at "
                         f"most {limit} for this attack and stop rule")
    if isinstance(trace_len, bool) or not isinstance(trace_len, (int, np.integer)) or trace_len < 1:
        raise ValueError(f"trace_len must be a positive int, got {trace_len!r}")
    if oracle.output != attack.output:
        raise ValueError(f"this attack needs a {attack.output!r} oracle, got a {oracle.output!r} one")
    rank = 4 if batched else 3
    shape = tuple(np.shape(x0))
    if len(shape) != rank:
        raise ValueError(f"images must have rank {rank} ({'[N, H, W, C]' if batched else '[H, W, C]'}), "
                         f"got shape {shape}")
    if not np.issubdtype(_dtype(x0), np.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {_dtype(x0)}")
    want = shape[:1] if batched else ()
    targets = [("labels", label)] + ([("targets", target)] if attack.targeted else [])
    if attack.targeted and target is None:
        raise ValueError("a targeted attack needs target classes")
    for name, a in targets:
        if tuple(np.shape(a)) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(np.shape(a))}")
        if not np.issubdtype(_dtype(a), np.integer):
            raise ValueError(f"{name} must be integer class indices, got dtype {_dtype(a)}")
    if not _traced(x0):
        x = np.asarray(x0)
        finite = np.isfinite(x)
        if not finite.all():
            raise ValueError(f"images must be finite and in [0, 1]; {x.size - int(finite.sum())} values are NaN/inf")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"images must be in [0, 1]; got range [{x.min()}, {x.max()}]")
    concrete = [(name, np.asarray(a)) for name, a in targets if not _traced(a)]
    if concrete:
        k = class_count(oracle, shape[1:] if batched else shape)
        for name, a in concrete:
            if a.size and (a.min() < 0 or a.max() >= k):
                raise ValueError(f"{name} must be class indices in 0..{k - 1} (the oracle answers {k} classes); "
                                 f"got range [{a.min()}, {a.max()}]")
    if len(concrete) == 2:
        same = np.atleast_1d(concrete[0][1] == concrete[1][1])
        if same.any():
            raise ValueError(f"target equals the true label for image(s) {np.flatnonzero(same)[:10].tolist()}")


def start(attack: Attack, key, x0, label, target, budget: int, trace_len: int = 256) -> Carry:
    """The carry before the first step of one image."""
    slots, _ = trace_stride(budget, attack.cost, trace_len)
    zero = jnp.zeros((), jnp.int32)
    return Carry(
        state=attack.init(key, x0, label, target),
        queries=zero,
        trace_queries=jnp.full((slots,), -1, jnp.int32),
        trace_loss=jnp.full((slots,), jnp.nan, jnp.float32),
        trace_claimed=jnp.zeros((slots,), bool),
        trace_l2=jnp.full((slots,), jnp.nan, jnp.float32),
        trace_linf=jnp.full((slots,), jnp.nan, jnp.float32),
        x0=jnp.asarray(x0, jnp.float32),
        label=jnp.asarray(label, jnp.int32),
        target=jnp.asarray(-1 if target is None else target, jnp.int32),
        claimed=jnp.zeros((), bool),
        rejected=jnp.full(jnp.shape(x0), jnp.nan, jnp.float32),
        claims=zero,
        check_queries=zero,
        invalid=jnp.zeros((), bool),
    )


def run_if(pred, fn, operand):
    """``fn(operand)`` if ``pred`` else ``operand``, as a ``while_loop`` of at most one iteration.

    Under ``vmap`` the body runs while any image needs it (the others keep their operand), so work no
    image of the batch needs costs nothing, and none is queried for the images that do not need it
    (``lax.cond`` under ``vmap`` becomes a select that evaluates both branches).
    """
    def body(c):
        _, x = c
        return jnp.zeros((), bool), fn(x)

    _, out = live_while(lambda c: c[0], body, (jnp.asarray(pred, bool), operand))
    return out


def within(x, x0, eps, norm: str):
    """``||x - x0||_norm <= eps`` (1e-5 of float slack); always True for ``eps=None``."""
    if eps is None:
        return jnp.ones((), bool)
    d = (x - x0).ravel()
    dist = jnp.max(jnp.abs(d)) if norm == "linf" else jnp.sqrt(jnp.sum(d * d))
    return dist <= eps + 1e-5


def _rule_index(stop: StopRule, rule):
    """(index, traced?) of the stop rule in force: ``rule`` (a traced / int index) overrides ``stop.name``."""
    if rule is None:
        return STOP_RULES.index(stop.name), False
    if isinstance(rule, str):
        return STOP_RULES.index(StopRule(rule).name), False
    if isinstance(rule, (int, np.integer)) and not isinstance(rule, bool):
        if not 0 <= rule < len(STOP_RULES):
            raise ValueError(f"stop-rule index must be in 0..{len(STOP_RULES) - 1}, got {rule}")
        return int(rule), False
    return jnp.asarray(rule, jnp.int32), True


def _judge(attack: Attack, checker, stop: StopRule, rule, c: Carry, state, queries, budget: int, check_key, clean,
           classes=None):
    """Apply the stop rule after one step: ``(state with done = verdict, queries, check queries, rejected, bad)``.

    ``bad``: the rule's checks saw a non-finite score (the verdict is then False). ``classes``: the number of
    classes of the oracle's answers (the checker and the clean scorer must answer as many).
    """
    mode, traced = _rule_index(stop, rule)
    bad = jnp.zeros((), bool)
    if not traced and mode == 0:
        return state, queries, c.check_queries, c.rejected, bad

    def is_(k):
        return (mode == k) if traced else jnp.asarray(mode == k)

    def adversarial(pred):
        return (pred == c.target) if attack.targeted else (pred != c.label)

    claimed = jnp.asarray(state.done, bool)
    fresh = claimed & jnp.any(state.x != c.rejected)
    verdict = claimed
    n_checks = c.check_queries
    rejected = c.rejected
    if traced or mode == 1:
        if check_key is None:
            raise ValueError("the 'verified' stop rule needs check keys (the defender's check stream)")
        m = stop.checks
        want = fresh & is_(1)
        if stop.count:
            want = want & (queries + m <= budget)
        stream = jax.random.fold_in(check_key, CHECK_STREAM)

        def votes(_):
            xs = jnp.broadcast_to(state.x, (m,) + state.x.shape)
            p = checker(xs, query_keys(stream, c.check_queries, m))
            check_scores(p, m, classes, "the stop rule's checker (the defended scorer)")
            pred = jnp.argmax(p, -1)
            return jnp.sum(adversarial(pred)).astype(jnp.int32), ~jnp.all(jnp.isfinite(p))

        v, bad_v = run_if(want, votes, (jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
        bad = bad | bad_v
        ok = want & ~bad_v & (2 * v > m)
        rejected = jnp.where(want & ~ok, state.x, rejected)
        verdict = jnp.where(is_(1), ok, verdict)
        spent = jnp.where(want, m, 0).astype(jnp.int32)
        n_checks = n_checks + spent
        if stop.count:
            queries = queries + spent
    if traced or mode == 2:
        if clean is None:
            raise ValueError("the 'clean' stop rule needs the undefended scorer (clean=...)")

        def fooled(_):
            p = clean(state.x[None], None)
            check_scores(p, 1, classes, "the clean scorer of the 'clean' stop rule")
            return adversarial(jnp.argmax(p, -1)[0]), ~jnp.all(jnp.isfinite(p))

        want = fresh & is_(2)
        f, bad_f = run_if(want, fooled, (jnp.zeros((), bool), jnp.zeros((), bool)))
        bad = bad | bad_f
        f = f & ~bad_f & within(state.x, c.x0, stop.eps, stop.norm)
        rejected = jnp.where(want & ~f, state.x, rejected)
        verdict = jnp.where(is_(2), f, verdict)
    return state._replace(done=verdict), queries, n_checks, rejected, bad


def advance(attack: Attack, oracle: Oracle, carry: Carry, defense_key, budget: int,
            trace_len: int = 256, max_steps: int | None = None, stop: StopRule = SINGLE, check_key=None,
            clean=None, rule=None, checker=None) -> Carry:
    """Step one image until the stop rule ends it, the budget is spent, or ``max_steps`` more steps.

    ``checker``: the defended scorer the verified rule asks (default ``oracle.scorer``; a caller that
    taps the oracle's scorer passes the untapped one, so the evaluator's checks are not seen as queries).
    """
    checker = oracle.scorer if checker is None else checker
    slots, stride = trace_stride(budget, attack.cost, trace_len)
    stop_at = None if max_steps is None else carry.state.step + max_steps

    def cond(c: Carry):
        go = going(attack, c, budget)
        if stop_at is not None:
            go = go & (c.state.step < stop_at)
        return go

    def body(c: Carry) -> Carry:
        bound = oracle.bind(defense_key, c.queries, budget)
        with watch() as seen:
            state, info = attack.step(c.state, bound)
        spent = _spent(attack, bound.used, info)
        # a step that saw a non-finite answer is undone (its queries stay counted) and ends the image
        bad = seen.invalid
        steps = state.step
        state = jax.tree.map(lambda new, old: jnp.where(bad, old, new), state, c.state)._replace(step=steps)
        claimed = jnp.asarray(state.done, bool)
        state, queries, n_checks, rejected, bad_checks = _judge(attack, checker, stop, rule, c, state,
                                                                c.queries + spent, budget, check_key, clean,
                                                                bound.classes)
        invalid = c.invalid | bad | bad_checks
        s = c.state.step
        slot = jnp.minimum(s // stride, slots - 1)
        record = (s % stride) == 0
        tq = jnp.where(record, c.trace_queries.at[slot].set(c.queries), c.trace_queries)
        tl = jnp.where(record, c.trace_loss.at[slot].set(jnp.asarray(info.loss, jnp.float32)), c.trace_loss)
        d = (jnp.asarray(state.x, jnp.float32) - c.x0).ravel()
        tc = jnp.where(record, c.trace_claimed.at[slot].set(claimed & ~invalid), c.trace_claimed)
        t2 = jnp.where(record, c.trace_l2.at[slot].set(jnp.sqrt(jnp.sum(d * d))), c.trace_l2)
        ti = jnp.where(record, c.trace_linf.at[slot].set(jnp.max(jnp.abs(d))), c.trace_linf)
        return c._replace(state=state, queries=queries, trace_queries=tq, trace_loss=tl, trace_claimed=tc,
                          trace_l2=t2, trace_linf=ti, claimed=claimed & ~invalid,
                          rejected=rejected, claims=c.claims + claimed.astype(jnp.int32), check_queries=n_checks,
                          invalid=invalid)

    return live_while(cond, body, carry)


def going(attack: Attack, carry: Carry, budget: int):
    """Whether the image of ``carry`` takes another step (bool; per image under ``vmap``): the attack has
    not ended (succeeded under the stop rule, failed, or seen a non-finite answer) and one more step fits
    the budget. A chunked run (:func:`advance` with ``max_steps``) is over when no image is going."""
    go = jnp.logical_not(carry.state.done | carry.invalid) & (carry.queries + attack.cost <= budget)
    if hasattr(carry.state, "failed"):
        go = go & jnp.logical_not(carry.state.failed)
    return go


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


def finish(carry: Carry, attack: Attack | None = None, stop: StopRule = SINGLE) -> Result:
    s = carry.state
    checks = 0 if attack is None else attack.checks
    loss_q = carry.queries - checks * s.step - (carry.check_queries if stop.count else 0)
    return Result(s.x, carry.claimed, carry.queries, s.step, carry.trace_queries, carry.trace_loss,
                  jnp.asarray(s.done, bool) & ~carry.invalid, loss_q.astype(jnp.int32), carry.check_queries,
                  carry.claims, carry.invalid, carry.trace_claimed, carry.trace_l2, carry.trace_linf)


def run_one(attack: Attack, oracle: Oracle, x0, label, target, attack_key, defense_key,
            budget: int, trace_len: int = 256, stop: StopRule = SINGLE, check_key=None, clean=None,
            rule=None, checker=None) -> Result:
    """Attack one image ``x0: f32[H, W, C]``. Pure; jit it at the top with static attack/oracle/budget.

    ``stop``: the stop rule (module docstring); ``check_key`` (the image's check-noise key) is needed by
    ``"verified"``, ``clean`` (the undefended scorer) by ``"clean"``; ``rule`` optionally overrides
    ``stop.name`` with an index into :data:`STOP_RULES` that may be traced; ``checker`` see :func:`advance`.
    Inputs are checked by :func:`validate` (``batched=False``): fully when concrete, statically when traced.
    """
    validate(attack, oracle, budget, x0, label, target, batched=False, stop=stop, trace_len=trace_len)
    return _run_one(attack, oracle, x0, label, target, attack_key, defense_key, budget, trace_len, stop, check_key,
                    clean, rule, checker)


def _run_one(attack, oracle, x0, label, target, attack_key, defense_key, budget, trace_len, stop, check_key, clean,
             rule, checker):
    carry = start(attack, attack_key, x0, label, target, budget, trace_len)
    carry = advance(attack, oracle, carry, defense_key, budget, trace_len, stop=stop, check_key=check_key,
                    clean=clean, rule=rule, checker=checker)
    return finish(carry, attack, stop)


def run(attack: Attack, oracle: Oracle, x0, labels, targets, attack_keys, defense_keys,
        budget: int, trace_len: int = 256, stop: StopRule = SINGLE, check_keys=None, clean=None,
        rule=None) -> Result:
    """Attack a batch ``x0: f32[N, H, W, C]`` (one key of each kind per image), vmapped.

    ``check_keys``: one check-noise key per image (the ``"verified"`` rule); see :func:`run_one`.

    Inputs are checked by :func:`validate` first: every check when they are concrete; under an outer
    ``jit`` (traced inputs) only shapes and dtypes, so validate the concrete values before jitting (NaN
    images, labels or targets out of range and target = label are then not caught here). Non-finite
    answers end an image with ``Result.invalid`` (module docstring).
    """
    validate(attack, oracle, budget, x0, labels, targets, batched=True, stop=stop, trace_len=trace_len)
    if targets is None:
        targets = jnp.full(jnp.shape(labels), -1, jnp.int32)
    if check_keys is None:
        fn = lambda x, y, t, ka, kd: _run_one(attack, oracle, x, y, t, ka, kd, budget, trace_len, stop, None, clean,
                                              rule, None)
        return jax.vmap(fn)(x0, labels, targets, attack_keys, defense_keys)
    fn = lambda x, y, t, ka, kd, kc: _run_one(attack, oracle, x, y, t, ka, kd, budget, trace_len, stop, kc, clean,
                                              rule, None)
    return jax.vmap(fn)(x0, labels, targets, attack_keys, defense_keys, check_keys)
