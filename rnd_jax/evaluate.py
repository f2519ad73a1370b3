"""The evaluation protocol: image selection, the three success notions, and the metrics.

Protocol (Aithal & Li 2022, Sec. IV-B; shared by every experiment):

- **Images.** ``n`` test images that the *clean* model classifies correctly, chosen by a fixed key
  (a key-driven permutation of the test set, then the first ``n`` correct ones). Targeted runs draw
  a target uniformly among the classes other than the label, from a per-image key.
- **Keys.** Image ``i`` of the test set gets ``fold_in(k_attack, i)`` as attacker key and
  ``fold_in(k_defense, i)`` split into its query-noise key and its check-noise key. So one image
  attacked alone replays exactly what it did inside a batch, and the defender's check queries
  never share noise with the attack's queries.
- **Success**, all three reported:
  ``asr`` — the attack's final point fools the *defended* model in a majority of ``9`` extra check
  queries (not counted in the budget, never added to the query counts);
  ``asr_clean`` — it fools the undefended model;
  ``asr_lucky`` — the attack's own belief, from the single noisy answer it stopped on.
- **Queries**: mean and median over the ``asr`` successes (budgeted queries only).
- **Distortion** of the ``asr`` successes: L2, L_inf and per-pixel L2 = ``||delta||_2 / d`` with
  ``d = H*W*C`` (the scale of Aithal & Li's Table 12, printed there x 1e-4).
- **Clean accuracy of the defended model** on the whole test split: expected over the defense's
  noise (mean of ``acc_draws = 40`` independent draws) and the worst of those draws.

Nothing here jits: callers jit the functions returned by :func:`make_runner` once, at the top.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax.attacks.driver import Attack, Result, run, validate
from rnd_jax.defenses import Scorer
from rnd_jax.oracle import Oracle, query_keys


@dataclasses.dataclass(frozen=True)
class Protocol:
    n_images: int = 100
    targeted: bool = True
    budget: int = 10_000
    check_queries: int = 9  # defended queries of the final point; success = strict majority
    acc_draws: int = 40  # noise draws for the defended model's clean accuracy
    eps: float | None = None  # if set, success also needs ||x_adv - x0||_norm <= eps (decision attacks)
    norm: str = "linf"

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"unknown norm {self.norm!r}; choose one of ('linf', 'l2')")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        for name in ("n_images", "budget", "check_queries", "acc_draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


class Selection(NamedTuple):
    index: np.ndarray  # i32[n]: positions in the test split
    images: np.ndarray  # f32[n, H, W, C]
    labels: np.ndarray  # i32[n]
    targets: np.ndarray  # i32[n] (-1 when untargeted)


def predict(scorer: Scorer, images, keys=None, batch_size: int = 2048) -> np.ndarray:
    """Top-1 classes of ``scorer`` over ``images`` in batches (keys: one per image, or None)."""
    out = []
    for s in range(0, len(images), batch_size):
        k = None if keys is None else keys[s:s + batch_size]
        out.append(np.asarray(jnp.argmax(scorer(jnp.asarray(images[s:s + batch_size]), k), -1)))
    return np.concatenate(out).astype(np.int32)


def select_images(key, clean: Scorer, images, labels, n: int, targeted: bool, num_classes: int) -> Selection:
    """``n`` correctly classified images in key order, with random targets != label if targeted."""
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    k_perm, k_target = jax.random.split(key)
    order = np.asarray(jax.random.permutation(k_perm, len(labels)))
    correct = predict(clean, images) == labels
    chosen = order[correct[order]][:n]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} correctly classified test images; asked for {n}")
    y = labels[chosen]
    if targeted:
        shift = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(k_target, i), (), 1, num_classes))(
            jnp.asarray(chosen))
        t = (y + np.asarray(shift)) % num_classes
    else:
        t = np.full_like(y, -1)
    return Selection(chosen.astype(np.int32), images[chosen], y, t.astype(np.int32))


def image_keys(k_attack, k_defense, index):
    """Per image: (attacker key, defender query-noise key, defender check-noise key)."""
    index = jnp.asarray(index, jnp.int32)
    ka = jax.vmap(jax.random.fold_in, (None, 0))(k_attack, index)
    kd = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(k_defense, i)))(index)
    return ka, kd[:, 0], kd[:, 1]


def check_success(defended: Scorer, x_adv, labels, targets, check_keys, targeted: bool, m: int):
    """Fraction of ``m`` defended answers per image that are adversarial: f32[n]."""

    def one(x, y, t, k):
        pred = jnp.argmax(defended(jnp.broadcast_to(x, (m,) + x.shape), query_keys(k, 0, m)), -1)
        return jnp.mean((pred == t) if targeted else (pred != y))

    return jax.vmap(one)(x_adv, labels, targets, check_keys)


def make_runner(attack: Attack, oracle: Oracle, clean: Scorer, protocol: Protocol):
    """The pure function to jit: ``(x0, labels, targets, ka, kd, kc) -> (Result, votes, clean_pred)``."""

    def runner(x0, labels, targets, ka, kd, kc):
        res: Result = run(attack, oracle, x0, labels, targets, ka, kd, protocol.budget)
        votes = check_success(oracle.scorer, res.x_adv, labels, targets, kc, attack.targeted,
                              protocol.check_queries)
        clean_pred = jnp.argmax(clean(res.x_adv, None), -1)
        return res, votes, clean_pred

    return runner


def defended_accuracy(defended: Scorer, images, labels, key, draws: int) -> np.ndarray:
    """Accuracy of the defended model on ``images`` for each of ``draws`` noise draws: f32[draws]."""
    labels = np.asarray(labels)
    accs = []
    for d in range(draws):
        keys = query_keys(jax.random.fold_in(key, d), 0, len(labels))
        accs.append(np.mean(predict(defended, images, keys) == labels))
    return np.asarray(accs, np.float64)


def _mean(a):
    return float(np.mean(a)) if len(a) else math.nan


def summarize(sel: Selection, res: Result, votes, clean_pred, targeted: bool, check_queries: int,
              eps: float | None = None, norm: str = "linf") -> dict[str, Any]:
    """Per-image arrays -> the protocol's metrics (NaN where no image succeeded).

    With ``eps`` set, ``asr`` and ``asr_clean`` also require the final point to lie within the
    ``norm`` ball of radius ``eps`` (up to 1e-5 of float slack); ``within_eps`` reports that part.
    """
    votes, clean_pred = np.asarray(votes), np.asarray(clean_pred)
    q = np.asarray(res.queries)
    delta = (np.asarray(res.x_adv) - sel.images).reshape(len(q), -1)
    l2 = np.linalg.norm(delta, axis=1)
    linf = np.abs(delta).max(axis=1)
    within = _within(sel, res, eps, norm)
    success = _success(votes, check_queries) & within
    fooled_clean = ((clean_pred == sel.targets) if targeted else (clean_pred != sel.labels)) & within
    s = success
    return {
        "within_eps": float(np.mean(within)),
        "n_images": int(len(q)),
        "asr": float(np.mean(success)),
        "asr_clean": float(np.mean(fooled_clean)),
        "asr_lucky": float(np.mean(np.asarray(res.lucky))),
        "queries_mean": _mean(q[s]),
        "queries_median": float(np.median(q[s])) if s.any() else math.nan,
        "queries_total": int(q.sum()),
        "l2": _mean(l2[s]),
        "linf": _mean(linf[s]),
        "l2_per_pixel": _mean(l2[s] / delta.shape[1]),
    }


def per_image(sel: Selection, res: Result, votes, clean_pred) -> dict[str, list]:
    """Per-image records for saving (JSON-friendly lists)."""
    return {
        "index": sel.index.tolist(),
        "label": sel.labels.tolist(),
        "target": sel.targets.tolist(),
        "queries": np.asarray(res.queries).tolist(),
        "steps": np.asarray(res.steps).tolist(),
        "lucky": np.asarray(res.lucky).tolist(),
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
                  budgets=(), output: str | None = None, compiler_options: dict | None = None):
    """Run one (attack, defense) cell of the protocol: validate, jit once, run, summarize.

    ``keys = (ka, kd, kc)`` from :func:`image_keys`. ``budgets`` adds ``asr_at_<B>`` (success with
    at most ``B`` budgeted queries) for each ``B <= protocol.budget``. ``compiler_options`` go to
    XLA (e.g. ``{"xla_backend_optimization_level": 0}`` when compiling many one-off cells costs more
    than running them). Returns ``(metrics, per_image_records)``.
    """
    oracle = Oracle(defended, output or attack.output)
    validate_selection(attack, oracle, protocol, sel)
    runner = jax.jit(make_runner(attack, oracle, clean, protocol))
    if compiler_options:
        runner = runner.lower(*cell_inputs(sel, keys)).compile(compiler_options=compiler_options)
    return run_cell(runner, sel, keys, protocol, budgets)


def cell_inputs(sel: Selection, keys):
    """The arguments of a :func:`make_runner` runner for a selection and its ``(ka, kd, kc)`` keys."""
    return (sel.images, sel.labels, sel.targets, *keys)


def run_cell(runner, sel: Selection, keys, protocol: Protocol, budgets=()):
    """Run a (jitted) :func:`make_runner` runner on a selection and summarize it, as :func:`evaluate_cell`."""
    res, votes, clean_pred = jax.block_until_ready(runner(*cell_inputs(sel, keys)))
    row = summarize(sel, res, votes, clean_pred, protocol.targeted, protocol.check_queries, protocol.eps,
                    protocol.norm)
    q = np.asarray(res.queries)
    ok = _success(votes, protocol.check_queries) & _within(sel, res, protocol.eps, protocol.norm)
    for b in budgets:
        row[f"asr_at_{b}"] = float(np.mean(ok & (q <= b)))
    return row, per_image(sel, res, votes, clean_pred)


def _success(votes, m):
    return np.asarray(votes) * m > m / 2


def _within(sel, res, eps, norm):
    d = (np.asarray(res.x_adv) - sel.images).reshape(len(sel.labels), -1)
    if eps is None:
        return np.ones(len(sel.labels), bool)
    dist = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    return dist <= eps + 1e-5
