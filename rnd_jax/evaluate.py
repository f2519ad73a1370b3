"""The evaluation protocol: image selection, stop rules, the success notions, and the metrics.

Each paper has its own protocol; :class:`Protocol` holds the choices, and every built-in grid names
the ones of the paper it reproduces (:mod:`rnd_jax.grids`).

- **Images.** ``n`` test images chosen by a fixed key (a key-driven permutation of the test set).
  ``pool="correct"`` (default; Aithal & Li, SND, RND): the first ``n`` that the *clean* model
  classifies correctly. ``pool="all"`` (the randomized feature defense paper, "1000 images that
  contain every class"): the first ``n`` whatever the clean model says; only the correctly
  classified ones are attacked, the others count as not robust. ``balanced=True`` takes ``n / K``
  images of each class (the first ``n mod K`` classes one more). Targeted runs draw a target
  uniformly among the classes other than the label, from a per-image key.
- **Keys.** Image ``i`` of the test set gets ``fold_in(k_attack, i)`` as attacker key and
  ``fold_in(k_defense, i)`` split into its query-noise key and its check-noise key. So one image
  attacked alone replays exactly what it did inside a batch, and the defender's check queries
  never share noise with the attack's queries.
- **Stop rule** (``stop_rule``; :class:`rnd_jax.attacks.driver.StopRule`): ``"single"`` — the attack's
  own noisy answer ends it; ``"verified"`` — the randomized feature defense paper's rule (App. D.4):
  at each claimed success ``check_queries`` fresh defended queries from the check stream (not counted
  unless ``count_checks``), stop only on a strict majority, else the attack continues; ``"clean"`` —
  the same with the undefended model as the judge of each claim (a measurement mode).
- **Success**, all reported:
  ``asr`` — the attack's final point fools the *defended* model in a majority of ``check_queries``
  (9) fresh check queries (points ``0..8`` of the image's check key: never the ones a stop rule
  used; not counted in the budget);
  ``asr_stop`` — the stop rule's verdict (single: the attack's own answer; verified: a confirmed
  majority; clean: the clean model fooled) — the randomized feature defense paper's success;
  ``asr_clean`` — the final point fools the undefended model;
  ``asr_lucky`` — the attack's own verdict at its last step, from one noisy answer (Aithal & Li's
  ASR). With ``eps`` set, each also needs the final point within the ``norm`` ball.
- **Robust accuracy**: ``robust = 1 - asr`` over the attacked images; ``robust_all`` over all selected
  images (misclassified ones count as not robust: RFD's denominator, so it is at most the clean
  accuracy of the selection); ``robust_stop`` / ``robust_all_stop`` from ``asr_stop``.
- **Queries**: mean and median over the ``asr`` successes, of all budgeted queries (success checks
  included) and of loss queries only (``loss_queries_*``: without the attack's pure success checks and
  the stop rule's checks — the convention of Ilyas et al., SignHunter and Parsimonious);
  ``check_queries_mean``: the stop rule's check queries per image.
- **Distortion** of the ``asr`` successes: L2, L_inf and per-pixel L2 = ``||delta||_2 / d`` with
  ``d = H*W*C`` (the scale of Aithal & Li's Table 12, printed there x 1e-4).
- **Invalid scores**: an image whose attack saw a non-finite answer stops there
  (``Result.invalid``); it counts as not fooled under every success notion, ``invalid_scores``
  is the number of such images and ``invalid`` marks them in the per-image records.
- **Clean accuracy of the defended model** on the whole test split: expected over the defense's
  noise (mean of ``acc_draws = 40`` independent draws) and the worst of those draws.

Callers compile the runners of :func:`make_runner` once, at the top, with :func:`compile_runner` (the
runner's params and pools become program arguments; :mod:`rnd_jax.pytree`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from rnd_jax.attacks.driver import (STOP_RULES, Attack, Result, StopRule, advance, finish, going, run, run_one, start,
                                    validate)
from rnd_jax import pytree
from rnd_jax.defenses import Scorer
from rnd_jax.oracle import Oracle, query_keys


POOLS = ("correct", "all")


@dataclasses.dataclass(frozen=True)
class Protocol:
    n_images: int = 100
    targeted: bool = True
    budget: int = 10_000
    check_queries: int = 9  # defended queries of the final point; success = strict majority
    acc_draws: int = 40  # noise draws for the defended model's clean accuracy
    eps: float | None = None  # if set, success also needs ||x_adv - x0||_norm <= eps (decision attacks)
    norm: str = "linf"
    stop_rule: str = "single"  # "single" | "verified" | "clean" (module docstring)
    count_checks: bool = False  # the verified rule's check queries count against the budget
    pool: str = "correct"  # "correct": n correctly classified images; "all": n images, misclassified not robust
    balanced: bool = False  # n / K images of each class

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"unknown norm {self.norm!r}; choose one of ('linf', 'l2')")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"unknown stop rule {self.stop_rule!r}; choose one of {STOP_RULES}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown image pool {self.pool!r}; choose one of {POOLS}")
        for name in ("count_checks", "balanced", "targeted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        for name in ("n_images", "budget", "check_queries", "acc_draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def stop(self) -> StopRule:
        """The driver's stop rule of this protocol."""
        return StopRule(self.stop_rule, self.check_queries, self.count_checks, self.eps, self.norm)


class Selection(NamedTuple):
    """The attacked images (correctly classified by the clean model) and the size of the selection."""

    index: np.ndarray  # i32[n]: positions in the test split
    images: np.ndarray  # f32[n, H, W, C]
    labels: np.ndarray  # i32[n]
    targets: np.ndarray  # i32[n] (-1 when untargeted)
    n_selected: int = -1  # images selected, misclassified ones included (pool="all"); -1: = n

    @property
    def selected(self) -> int:
        return len(self.labels) if self.n_selected < 0 else self.n_selected


def predict(scorer: Scorer, images, keys=None, batch_size: int = 2048) -> np.ndarray:
    """Top-1 classes of ``scorer`` over ``images`` in batches (keys: one per image, or None).

    Compiled once per scorer structure and batch shape, with the scorer's arrays as arguments.
    """
    out = []
    for s in range(0, len(images), batch_size):
        k = None if keys is None else keys[s:s + batch_size]
        out.append(np.asarray(pytree.call(Partial(_top1, scorer), jnp.asarray(images[s:s + batch_size]), k)))
    return np.concatenate(out).astype(np.int32)


def _top1(scorer, x, keys):
    return jnp.argmax(scorer(x, keys), -1)


def select_images(key, clean: Scorer, images, labels, n: int, targeted: bool, num_classes: int,
                  pool: str = "correct", balanced: bool = False) -> Selection:
    """Images in key order (see the module docstring), with random targets != label if targeted.

    ``pool="correct"``: the first ``n`` correctly classified images; ``pool="all"``: the first ``n``
    images, of which the correctly classified ones are returned (``n_selected = n``). With
    ``balanced`` the ``n`` are split evenly over the classes.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown image pool {pool!r}; choose one of {POOLS}")
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    k_perm, k_target = jax.random.split(key)
    order = np.asarray(jax.random.permutation(k_perm, len(labels)))
    correct = predict(clean, images) == labels
    candidates = order[correct[order]] if pool == "correct" else order
    if balanced:
        quota = [n // num_classes + (c < n % num_classes) for c in range(num_classes)]
        picked = []
        for c in range(num_classes):
            of_c = candidates[labels[candidates] == c][:quota[c]]
            if len(of_c) < quota[c]:
                raise ValueError(f"only {len(of_c)} {'correctly classified ' if pool == 'correct' else ''}test "
                                 f"images of class {c}; a balanced selection of {n} needs {quota[c]}")
            picked.append(of_c)
        rank = {int(i): r for r, i in enumerate(candidates)}
        chosen = np.asarray(sorted(np.concatenate(picked), key=lambda i: rank[int(i)]), dtype=order.dtype)
    else:
        chosen = candidates[:n]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} {'correctly classified ' if pool == 'correct' else ''}test images; "
                         f"asked for {n}")
    n_selected = len(chosen)
    chosen = chosen[correct[chosen]]
    if len(chosen) == 0:
        raise ValueError(f"none of the {n_selected} selected images is correctly classified: nothing to attack")
    y = labels[chosen]
    if targeted:
        shift = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(k_target, i), (), 1, num_classes))(
            jnp.asarray(chosen))
        t = (y + np.asarray(shift)) % num_classes
    else:
        t = np.full_like(y, -1)
    return Selection(chosen.astype(np.int32), images[chosen], y, t.astype(np.int32), int(n_selected))


def image_keys(k_attack, k_defense, index):
    """Per image: (attacker key, defender query-noise key, defender check-noise key)."""
    index = jnp.asarray(index, jnp.int32)
    ka = jax.vmap(jax.random.fold_in, (None, 0))(k_attack, index)
    kd = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(k_defense, i)))(index)
    return ka, kd[:, 0], kd[:, 1]


def check_success(defended: Scorer, x_adv, labels, targets, check_keys, targeted: bool, m: int):
    """Fraction of ``m`` defended answers per image that are adversarial: f32[n]."""

    def one(x, y, t, k):
        p = defended(jnp.broadcast_to(x, (m,) + x.shape), query_keys(k, 0, m))
        pred = jnp.argmax(p, -1)
        fooled = (pred == t) if targeted else (pred != y)
        return jnp.mean(fooled & jnp.all(jnp.isfinite(p), -1))  # a non-finite answer is not adversarial

    return jax.vmap(one)(x_adv, labels, targets, check_keys)


def make_runner(attack: Attack, oracle: Oracle, clean: Scorer, protocol: Protocol, rule=None):
    """The pure function to compile: ``(x0, labels, targets, ka, kd, kc) -> (Result, votes, clean_pred)``.

    The attack runs under ``protocol.stop`` (``rule``: an optional, possibly traced, index into
    :data:`rnd_jax.attacks.driver.STOP_RULES` that overrides the protocol's rule). A pytree
    (:mod:`rnd_jax.pytree`) whose leaves are the arrays of the attack, the oracle and the clean scorer:
    compile it with ``pytree.jit`` so they are program arguments, not constants.
    """
    return Partial(_runner, attack, oracle, clean, protocol, rule)


def _runner(attack, oracle, clean, protocol, rule, x0, labels, targets, ka, kd, kc):
    res: Result = run(attack, oracle, x0, labels, targets, ka, kd, protocol.budget, stop=protocol.stop,
                      check_keys=kc, clean=clean, rule=rule)
    return _judged(attack, oracle, clean, protocol, res, labels, targets, kc)


def _judged(attack, oracle, clean, protocol, res, labels, targets, kc):
    votes = check_success(oracle.scorer, res.x_adv, labels, targets, kc, attack.targeted, protocol.check_queries)
    clean_pred = jnp.argmax(clean(res.x_adv, None), -1)
    return res, votes, clean_pred


class Chunked(NamedTuple):
    """A :func:`make_runner` runner cut into pieces, so a long cell can stop and resume between steps.

    Each piece is a pytree like the runner (compile each with ``pytree.jit``):

    - ``start(x0, labels, targets, ka) -> carry`` (the driver's :class:`~rnd_jax.attacks.driver.Carry`,
      batched over images);
    - ``advance(carry, kd, kc) -> carry``: every image at most ``steps`` more steps;
    - ``going(carry) -> bool[n]``: the images that would take another step (none: the run is over);
    - ``end(carry, labels, targets, kc) -> (Result, votes, clean_pred)``, as the runner.

    ``start``, then ``advance`` until no image is ``going``, then ``end`` gives exactly the runner's
    output (the driver's N-then-M-steps property): a carry saved between two ``advance`` calls (see
    :mod:`rnd_jax.artifacts`) resumes the run bit for bit.
    """

    start: Any
    advance: Any
    going: Any
    end: Any


def make_chunked_runner(attack: Attack, oracle: Oracle, clean: Scorer, protocol: Protocol, steps: int) -> Chunked:
    """:func:`make_runner`'s run in pieces of at most ``steps`` attack steps per image (:class:`Chunked`)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 2**31 - 1:
        raise ValueError(f"chunk steps must be an int in 1..2**31-1, got {steps!r}")
    return Chunked(Partial(_chunk_start, attack, protocol), Partial(_chunk_advance, attack, oracle, clean, protocol,
                                                                    int(steps)),
                   Partial(_chunk_going, attack, protocol), Partial(_chunk_end, attack, oracle, clean, protocol))


def _chunk_start(attack, protocol, x0, labels, targets, ka):
    return jax.vmap(lambda x, y, t, k: start(attack, k, x, y, t, protocol.budget))(x0, labels, targets, ka)


def _chunk_advance(attack, oracle, clean, protocol, steps, carry, kd, kc):
    fn = lambda c, d, k: advance(attack, oracle, c, d, protocol.budget, max_steps=steps, stop=protocol.stop,
                                 check_key=k, clean=clean)
    return jax.vmap(fn)(carry, kd, kc)


def _chunk_going(attack, protocol, carry):
    return jax.vmap(lambda c: going(attack, c, protocol.budget))(carry)


def _chunk_end(attack, oracle, clean, protocol, carry, labels, targets, kc):
    res = jax.vmap(lambda c: finish(c, attack, protocol.stop))(carry)
    return _judged(attack, oracle, clean, protocol, res, labels, targets, kc)


def defended_accuracy(defended: Scorer, images, labels, key, draws: int, clean_pred=None):
    """Accuracy of the defended model on ``images`` for each of ``draws`` noise draws: f64[draws].

    With ``clean_pred`` (the clean model's classes of ``images``) also returns, per draw, the share
    of images whose defended class differs from the clean one (SND's ``P_mis`` on clean images).
    """
    labels = np.asarray(labels)
    accs, flips = [], []
    for d in range(draws):
        keys = query_keys(jax.random.fold_in(key, d), 0, len(labels))
        pred = predict(defended, images, keys)
        accs.append(np.mean(pred == labels))
        if clean_pred is not None:
            flips.append(np.mean(pred != np.asarray(clean_pred)))
    accs = np.asarray(accs, np.float64)
    return accs if clean_pred is None else (accs, np.asarray(flips, np.float64))


class QueryTap:
    """Host-side record of every query point of one image: count, label flips, last point.

    ``P_mis`` (SND, Byun et al. 2022, Table 4) and the distance of the last query image (their Table 3)
    need every point an attack asks, which it never returns. :func:`tap_scorer` reports each query
    batch here through ``jax.debug.callback``; run images one at a time, unbatched (under ``vmap``
    images that have stopped keep evaluating discarded points), and check ``n`` against the driver's
    count.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.n, self.mis, self.last = 0, 0, None

    def record(self, noisy, clean, x):
        noisy, clean, x = np.asarray(noisy), np.asarray(clean), np.asarray(x)
        self.n += len(noisy)
        self.mis += int(np.sum(noisy != clean))
        if len(x):
            self.last = x[-1]


def tap_scorer(defended: Scorer, clean: Scorer, tap: QueryTap) -> Scorer:
    """``defended`` that also reports each query batch (defended and clean classes, points) to ``tap``."""
    return Partial(_tapped_scores, defended, clean, tap)


def _tapped_scores(defended, clean, tap, x, keys):
    p = defended(x, keys)
    jax.debug.callback(tap.record, jnp.argmax(p, -1), jnp.argmax(clean(x, None), -1), x, ordered=True)
    return p


def make_tapped_runner(attack: Attack, defended_at, clean: Scorer, protocol: Protocol, tap: QueryTap):
    """The pure function to compile for ONE image: ``(level, x0, label, target, ka, kd, kc) -> (Result, vote, clean_pred)``.

    ``defended_at(level)`` builds the defended scorer (``level`` may be traced). The attack asks through
    :func:`tap_scorer`; the stop rule's and the protocol's checks ask the untapped defended scorer, so
    ``tap`` sees exactly the attack's queries. A pytree, as :func:`make_runner`.
    """
    return Partial(_tapped_runner, attack, defended_at, clean, protocol, tap)


def _tapped_runner(attack, defended_at, clean, protocol, tap, level, x0, label, target, ka, kd, kc):
    defended = defended_at(level)
    oracle = Oracle(tap_scorer(defended, clean, tap), attack.output)
    res = run_one(attack, oracle, x0, label, target, ka, kd, protocol.budget, stop=protocol.stop,
                  check_key=kc, clean=clean, checker=defended)
    vote = check_success(defended, res.x_adv[None], label[None], target[None], kc[None], attack.targeted,
                         protocol.check_queries)[0]
    return res, vote, jnp.argmax(clean(res.x_adv[None], None), -1)[0]


def run_tapped(runner, tap: QueryTap, sel: Selection, keys, protocol: Protocol, level=0.0):
    """Run a jitted :func:`make_tapped_runner` image by image: ``(Result, votes, clean_pred, taps)``.

    ``taps`` holds ``p_mis`` (label flips over all the attack's queries, pooled over images) and
    ``l2_query`` (mean ``||x0 - x^q||_2`` of each image's last query point). Raises if the tap saw a
    different number of points than the driver counted.
    """
    ka, kd, kc = keys
    outs, n_q, n_mis, l2_last = [], 0, 0, []
    for i in range(len(sel.labels)):
        tap.reset()
        out = jax.block_until_ready(runner(level, sel.images[i], sel.labels[i], sel.targets[i], ka[i], kd[i], kc[i]))
        jax.effects_barrier()
        res = out[0]
        asked = int(res.queries) - (int(res.check_queries) if protocol.count_checks else 0)
        if tap.n != asked:
            raise RuntimeError(f"image {i}: the model was asked {tap.n} points; the driver counted {asked}")
        outs.append(jax.tree.map(np.asarray, out))
        n_q += tap.n
        n_mis += tap.mis
        if tap.last is not None:
            l2_last.append(float(np.linalg.norm((tap.last - sel.images[i]).ravel())))
    res, votes, clean_pred = jax.tree.map(lambda *a: np.stack(a), *outs)
    taps = {"p_mis": n_mis / n_q if n_q else math.nan, "l2_query": _mean(np.asarray(l2_last))}
    return res, votes, clean_pred, taps


def _mean(a):
    return float(np.mean(a)) if len(a) else math.nan


SUCCESS_KINDS = ("asr", "asr_stop", "asr_clean", "asr_lucky")


def success_key(kind: str) -> str:
    """The per-image record of a success notion: ``asr`` -> ``success``, ``asr_stop`` -> ``success_stop``, ..."""
    return "success" + kind[3:]


def cell_artifact(cell_id: str, sel: Selection, res: Result, votes, clean_pred, protocol: Protocol,
                  clean: Scorer | None = None) -> dict:
    """The artifact arrays of one cell (:func:`rnd_jax.artifacts.cell_arrays`): its records, every success
    flag under ``protocol`` and, with ``clean``, the clean scores of the final points."""
    from rnd_jax import artifacts

    res = jax.tree.map(np.asarray, res)
    ok = successes(sel, res, votes, clean_pred, protocol.targeted, protocol.check_queries, protocol.eps,
                   protocol.norm)
    scores_clean = None if clean is None else np.asarray(pytree.call(clean, jnp.asarray(res.x_adv), None))
    return artifacts.cell_arrays(cell_id, sel, res, votes, clean_pred, None, scores_clean,
                                 {success_key(k): v for k, v in ok.items()})


def successes(sel: Selection, res: Result, votes, clean_pred, targeted: bool, check_queries: int,
              eps: float | None = None, norm: str = "linf") -> dict[str, np.ndarray]:
    """Per image, for each success notion of :data:`SUCCESS_KINDS` (module docstring): bool[n].

    With ``eps`` set, each also requires the final point within the ``norm`` ball of radius ``eps``
    (up to 1e-5 of float slack).
    """
    within = _within(sel, res, eps, norm) & ~_invalid(res, len(sel.labels))
    clean_pred = np.asarray(clean_pred)
    return {
        "asr": _success(votes, check_queries) & within,
        "asr_stop": np.asarray(res.success, bool) & within,
        "asr_clean": ((clean_pred == sel.targets) if targeted else (clean_pred != sel.labels)) & within,
        "asr_lucky": np.asarray(res.lucky, bool) & within,
    }


def robust_accuracy(sel: Selection, ok, queries=None, budget: int | None = None) -> tuple[float, float]:
    """(over attacked images, over all selected images) of images not fooled within ``budget`` queries."""
    ok = np.asarray(ok, bool)
    if budget is not None:
        ok = ok & (np.asarray(queries) <= budget)
    n = len(ok)
    robust = n - int(ok.sum())
    return robust / n, robust / sel.selected


def summarize(sel: Selection, res: Result, votes, clean_pred, targeted: bool, check_queries: int,
              eps: float | None = None, norm: str = "linf") -> dict[str, Any]:
    """Per-image arrays -> the protocol's metrics (NaN where no image succeeded).

    With ``eps`` set, every success notion also requires the final point to lie within the ``norm``
    ball of radius ``eps`` (up to 1e-5 of float slack); ``within_eps`` reports that part.
    """
    q = np.asarray(res.queries)
    lq = np.asarray(res.loss_queries)
    delta = (np.asarray(res.x_adv) - sel.images).reshape(len(q), -1)
    l2 = np.linalg.norm(delta, axis=1)
    linf = np.abs(delta).max(axis=1)
    ok = successes(sel, res, votes, clean_pred, targeted, check_queries, eps, norm)
    s = ok["asr"]
    out = {
        "within_eps": float(np.mean(_within(sel, res, eps, norm))),
        "n_images": int(len(q)),
        "n_selected": int(sel.selected),
        **{k: float(np.mean(v)) for k, v in ok.items()},
    }
    out["robust"], out["robust_all"] = robust_accuracy(sel, ok["asr"])
    out["robust_stop"], out["robust_all_stop"] = robust_accuracy(sel, ok["asr_stop"])
    out.update({
        "queries_mean": _mean(q[s]),
        "queries_median": float(np.median(q[s])) if s.any() else math.nan,
        "loss_queries_mean": _mean(lq[s]),
        "loss_queries_median": float(np.median(lq[s])) if s.any() else math.nan,
        "queries_total": int(q.sum()),
        "check_queries_mean": float(np.mean(np.asarray(res.check_queries))),
        "invalid_scores": int(_invalid(res, len(q)).sum()),
        "claims_mean": float(np.mean(np.asarray(res.claims))),
        "l2": _mean(l2[s]),
        "linf": _mean(linf[s]),
        "l2_per_pixel": _mean(l2[s] / delta.shape[1]),
    })
    return out


def per_image(sel: Selection, res: Result, votes, clean_pred) -> dict[str, list]:
    """Per-image records for saving (JSON-friendly lists)."""
    return {
        "index": sel.index.tolist(),
        "label": sel.labels.tolist(),
        "target": sel.targets.tolist(),
        "queries": np.asarray(res.queries).tolist(),
        "loss_queries": np.asarray(res.loss_queries).tolist(),
        "check_queries": np.asarray(res.check_queries).tolist(),
        "claims": np.asarray(res.claims).tolist(),
        "steps": np.asarray(res.steps).tolist(),
        "lucky": np.asarray(res.lucky).tolist(),
        "stopped_success": np.asarray(res.success).tolist(),
        "invalid": _invalid(res, len(sel.labels)).tolist(),
        "check_votes": np.asarray(votes).tolist(),
        "clean_pred": np.asarray(clean_pred).tolist(),
    }


def validate_selection(attack: Attack, oracle: Oracle, protocol: Protocol, sel: Selection):
    """Configuration checks of :func:`rnd_jax.attacks.driver.validate` for a selection."""
    if attack.targeted != protocol.targeted:
        raise ValueError("attack and protocol disagree on targeted vs untargeted")
    validate(attack, oracle, protocol.budget, sel.images, sel.labels,
             sel.targets if protocol.targeted else None)


def evaluate_cell(attack: Attack, defended: Scorer, clean: Scorer, sel: Selection, keys, protocol: Protocol,
                  budgets=(), output: str | None = None, compiler_options: dict | None = None, keep: dict | None = None):
    """Run one (attack, defense) cell of the protocol: validate, jit once, run, summarize.

    ``keys = (ka, kd, kc)`` from :func:`image_keys`. ``budgets`` adds ``asr_at_<B>`` (success with
    at most ``B`` budgeted queries) for each ``B <= protocol.budget``. ``compiler_options`` go to
    XLA (e.g. ``{"xla_backend_optimization_level": 0}`` when compiling many one-off cells costs more
    than running them). ``keep``: a dict that receives the cell's arrays (:func:`run_cell`). Returns
    ``(metrics, per_image_records)``.
    """
    oracle = Oracle(defended, output or attack.output)
    validate_selection(attack, oracle, protocol, sel)
    runner = compile_runner(make_runner(attack, oracle, clean, protocol))
    if compiler_options:
        runner = runner.lower(*cell_inputs(sel, keys)).compile(compiler_options=compiler_options)
    return run_cell(runner, sel, keys, protocol, budgets, keep=keep, clean=clean)


def compile_runner(runner, compiler_options: dict | None = None):
    """A runner of :func:`make_runner` / :func:`make_tapped_runner`, compiled with its arrays as arguments.

    Returns ``f(*inputs)`` (with ``f.lower(*inputs)``); runners of the same structure (and options) share
    one program. ``compiler_options`` go to XLA (e.g. :func:`rnd_jax.pytree.fast_compile`).
    """
    compiled = pytree.jit(pytree.apply, compiler_options=compiler_options)

    class Bound:
        def __call__(self, *args):
            return compiled(runner, *args)

        def lower(self, *args):
            return compiled.lower(runner, *args)

    return Bound()


def cell_inputs(sel: Selection, keys):
    """The arguments of a :func:`make_runner` runner for a selection and its ``(ka, kd, kc)`` keys."""
    return (sel.images, sel.labels, sel.targets, *keys)


def run_cell(runner, sel: Selection, keys, protocol: Protocol, budgets=(), keep: dict | None = None,
             clean: Scorer | None = None):
    """Run a (jitted) :func:`make_runner` runner on a selection and summarize it, as :func:`evaluate_cell`.

    For each ``B`` in ``budgets``: ``<kind>_at_<B>`` for every success notion (success with at most
    ``B`` budgeted queries, from the same run: the attack's trajectory up to ``B`` queries does not
    depend on a larger budget, except for attacks whose schedule spans the budget, e.g. Square's).

    ``keep``: a dict that receives the cell's artifact arrays (:func:`rnd_jax.artifacts.cell_arrays`: final
    points, traces, per-image counts and success flags; with ``clean``, the clean scores of the final points).
    """
    res, votes, clean_pred = jax.block_until_ready(runner(*cell_inputs(sel, keys)))
    row = summarize(sel, res, votes, clean_pred, protocol.targeted, protocol.check_queries, protocol.eps,
                    protocol.norm)
    q = np.asarray(res.queries)
    ok = successes(sel, res, votes, clean_pred, protocol.targeted, protocol.check_queries, protocol.eps,
                   protocol.norm)
    for b in budgets:
        for kind, v in ok.items():
            row[f"{kind}_at_{b}"] = float(np.mean(v & (q <= b)))
    if keep is not None:
        keep.update(cell_artifact("", sel, res, votes, clean_pred, protocol, clean))
    return row, per_image(sel, res, votes, clean_pred)


def _invalid(res, n: int) -> np.ndarray:
    """bool[n]: images stopped on a non-finite answer (``Result.invalid``; none when it is not set)."""
    return np.zeros(n, bool) if res.invalid is None else np.asarray(res.invalid, bool).reshape(n)


def _success(votes, m):
    return np.asarray(votes) * m > m / 2


def _within(sel, res, eps, norm):
    return within_eps(res.x_adv, sel.images, eps, norm)


def within_eps(x_adv, x0, eps: float | None, norm: str) -> np.ndarray:
    """bool[n]: ``||x_adv - x0||_norm <= eps`` per image (1e-5 of float slack); all True for ``eps=None``."""
    d = (np.asarray(x_adv) - np.asarray(x0)).reshape(len(x0), -1)
    if eps is None:
        return np.ones(len(x0), bool)
    dist = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    return dist <= eps + 1e-5
