"""Noise calibration: the largest defense level whose clean accuracy drops by at most a target.

The protocol of the randomized feature defense paper (Sec. 4.1): defenses are compared at the
level that costs the same clean accuracy (e.g. ~1% and ~2%), not at the same nominal noise.

Expected accuracy of the defended model is measured on a fixed image set over ``draws`` noise
draws with fixed evaluation keys (common random numbers: every level sees the same standard-normal
draws, scaled), so accuracy is a deterministic function of the level and the bisection is
deterministic for a fixed key. The level is bracketed by decades from ``lo`` upwards, then bisected
in log-space; the returned level is the largest one found whose drop is within the target.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax.defenses import DEFENSES, build_defense
from rnd_jax.oracle import query_keys


@dataclasses.dataclass(frozen=True)
class Calibration:
    family: str
    target_drop: float  # allowed drop of expected clean accuracy (fraction, e.g. 0.01)
    level: float  # calibrated noise level
    accuracy: float  # expected clean accuracy of the defended model at ``level``
    clean_accuracy: float
    drop: float  # clean_accuracy - accuracy
    evaluations: int
    history: tuple  # ((level, accuracy), ...) in evaluation order


def accuracy_fn(model, params, family: str, images, labels, key, draws: int, **options):
    """A jitted ``level -> expected accuracy`` of family ``family`` over ``draws`` noise draws."""
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    shape = tuple(images.shape[1:])
    n = len(labels)

    @jax.jit
    def acc(level, images, labels, params):  # arrays as arguments: closed-over arrays would be compiled in
        scorer = build_defense(family, model, params, level, shape, **options)

        def one(d):
            keys = query_keys(jax.random.fold_in(key, d), 0, n)
            return jnp.mean(jnp.argmax(scorer(images, keys), -1) == labels)

        return jnp.mean(jax.lax.map(one, jnp.arange(draws)))

    return lambda level: acc(level, images, labels, params)


def calibrate(model, params, family: str, target_drop: float, images, labels, key, draws: int = 20,
              lo: float = 1e-4, max_level: float = 1e4, rtol: float = 1e-3, max_evals: int = 60,
              **options) -> Calibration:
    """Largest level of ``family`` with ``clean - expected accuracy <= target_drop``.

    Raises ``ValueError`` for a family without a calibratable noise level, a target outside
    (0, 1), or a bracket that cannot be found (even ``lo`` drops too much, or ``max_level`` drops
    too little).
    """
    if family not in DEFENSES or not DEFENSES[family].calibratable:
        ok = sorted(k for k, v in DEFENSES.items() if v.calibratable)
        raise ValueError(f"cannot calibrate {family!r}; calibratable defenses: {ok}")
    if not (isinstance(target_drop, (int, float)) and 0 < target_drop < 1):
        raise ValueError(f"target_drop must be in (0, 1), got {target_drop!r}")
    if not (0 < lo < max_level and math.isfinite(max_level)):
        raise ValueError(f"need 0 < lo < max_level < inf, got lo={lo!r}, max_level={max_level!r}")
    build_defense(family, model, params, lo, tuple(np.shape(images)[1:]), **options)  # validate options now
    f = accuracy_fn(model, params, family, images, labels, key, draws, **options)
    history = []

    def acc(level):
        a = float(f(jnp.float32(level)))
        history.append((float(level), a))
        return a

    clean = float(np.mean(np.asarray(jnp.argmax(build_defense("none", model, params, 0.0, ())(jnp.asarray(images), None),
                                                 -1)) == np.asarray(labels)))
    ok = lambda a: clean - a <= target_drop
    a_lo = acc(lo)
    if not ok(a_lo):
        raise ValueError(f"{family} at the smallest level {lo:g} already drops accuracy by {clean - a_lo:.4f}")
    hi = lo
    while True:
        hi *= 10
        if hi > max_level:
            raise ValueError(f"{family} drops accuracy by at most {clean - a_lo:.4f} up to level {max_level:g}")
        a_hi = acc(hi)
        if not ok(a_hi):
            break
        lo, a_lo = hi, a_hi
    while hi / lo > 1 + rtol and len(history) < max_evals:
        mid = math.sqrt(lo * hi)
        a_mid = acc(mid)
        if ok(a_mid):
            lo, a_lo = mid, a_mid
        else:
            hi = mid
    return Calibration(family, float(target_drop), lo, a_lo, clean, clean - a_lo, len(history), tuple(history))
