"""Attack losses on probability vectors, safe for noisy answers.

A defended model may answer with "probabilities" that are exactly zero, negative, above one or
even NaN (output noise before or without post-processing). Every loss here floors its argument
before taking a logarithm, so a loss is always finite: ``log(max(p, TINY))`` with NaN mapped to
``TINY`` as well. None of these losses is differentiated by the attacks (they are black-box), so the
floor only has to keep values finite and monotone in ``p``.

Losses are *minimised* by the attacker:

- :func:`targeted_xent` — ``-log F_t(x)``, the NES targeted loss of Aithal & Li (2022), eq. (2)/(9).
- :func:`margin` — the untargeted C&W-style margin ``log F_y - max_{j != y} log F_j``; negative iff
  the label ``y`` is no longer the top-1 class.
- :func:`untargeted_xent` — ``log F_y``.
- :func:`targeted_cw` — ``max_{j != t} log F_j - log F_t``; negative iff ``t`` is the top-1 class
  (the AutoZOOM loss of Aithal & Li Sec. III-C, ``log(F_max / F_t)``).

All take ``probs: f32[..., K]`` and a class index broadcastable to ``probs.shape[:-1]`` and return
``f32[...]``.
"""

from __future__ import annotations

import jax.numpy as jnp

TINY = 1e-30  # floor for probabilities before a log; log(TINY) ~ -69


def safe_log(p):
    """``log(p)`` with ``p <= TINY`` (zero, negative) and NaN mapped to ``log(TINY)``."""
    p = jnp.asarray(p)
    return jnp.log(jnp.where(p > TINY, p, TINY))  # NaN > TINY is False -> TINY


def _pick(values, cls):
    cls = jnp.asarray(cls, jnp.int32)
    cls = jnp.broadcast_to(cls, values.shape[:-1])
    return jnp.take_along_axis(values, cls[..., None], axis=-1)[..., 0]


def _max_other(values, cls):
    cls = jnp.broadcast_to(jnp.asarray(cls, jnp.int32), values.shape[:-1])
    mask = jnp.arange(values.shape[-1]) == cls[..., None]
    return jnp.max(jnp.where(mask, -jnp.inf, values), axis=-1)


def targeted_xent(probs, target):
    """Cross-entropy towards ``target``: ``-log F_t`` (Aithal & Li 2022, eq. 2)."""
    return -_pick(safe_log(probs), target)


def margin(probs, label):
    """Untargeted margin ``log F_y - max_{j!=y} log F_j`` (negative once ``y`` is not top-1)."""
    logp = safe_log(probs)
    return _pick(logp, label) - _max_other(logp, label)


def targeted_cw(probs, target):
    """Targeted margin ``max_{j!=t} log F_j - log F_t`` (negative once ``t`` is top-1)."""
    logp = safe_log(probs)
    return _max_other(logp, target) - _pick(logp, target)


def untargeted_xent(probs, label):
    """``log F_y``: pushing the true class's probability down (untargeted cross-entropy)."""
    return _pick(safe_log(probs), label)


# Losses by name and goal; each is minimised and takes (probs, class) where class is the target
# for targeted losses and the true label for untargeted ones.
TARGETED = {"xent": targeted_xent, "cw": targeted_cw}
UNTARGETED = {"margin": margin, "xent": untargeted_xent}


def goal_loss(targeted: bool, loss: str | None) -> str:
    """The loss name in force: ``loss``, or the goal's default (``xent`` targeted, ``margin`` untargeted)."""
    return loss or ("xent" if targeted else "margin")


def check_goal(attack: str, targeted, loss) -> None:
    """Validate an attack config's ``targeted`` flag and ``loss`` name (``None`` = the goal's default)."""
    if not isinstance(targeted, bool):
        raise ValueError(f"targeted must be a bool, got {targeted!r}")
    table = TARGETED if targeted else UNTARGETED
    if loss is not None and loss not in table:
        goal = "targeted" if targeted else "untargeted"
        raise ValueError(f"unknown {goal} {attack} loss {loss!r}; choose one of {sorted(table)}")
