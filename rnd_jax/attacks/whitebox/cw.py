"""C&W l_2: the Carlini & Wagner attack with the model's gradients (white-box).

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017, Sec. V-A/VI.
The perturbation lives in tanh space, ``x = (tanh(w) + 1) / 2`` (always in [0, 1]), and Adam
minimises

    ||x - x0||_2^2 + c * f(x),    f(x) = max(Z_y - max_{j!=y} Z_j, -kappa)       (untargeted)
                                  f(x) = max(max_{j!=t} Z_j - Z_t, -kappa)       (targeted)

with ``Z`` the logits; here log-probabilities, whose differences are the logits' differences
(:func:`rnd_jax.losses.margin` / :func:`~rnd_jax.losses.targeted_cw`; noisy probabilities are floored
before the log). The constant ``c`` is found by binary search: stage ``s`` runs ``steps`` Adam steps
from ``w0 = atanh((2 x0 - 1)(1 - 1e-6))`` (the image itself) with a fresh Adam state; if some answer of
the stage was adversarial the upper bound becomes ``c``, else the lower bound; the next ``c`` is the
bounds' midpoint, or ``10 c`` while no upper bound is known. Every stage has ``steps`` steps, or with
``abort_early=True`` (the reference code's ``ABORT_EARLY``) fewer: every ``max(1, steps // 10)`` steps of
a stage (its step 0 included) the stage's loss at the current point is compared with its value at the
previous such check, and the stage ends there if it is above ``0.9999`` times that value (the loss
stopped falling); the queries a stage does not use go to the next stages.

Queries: every Adam step asks ONE gradient query at its current point (:mod:`rnd_jax.oracle`, output
``"gradient"``; ``cost = 1``); the distortion term's gradient is closed-form (no query). The whole
schedule costs ``search_steps * steps`` queries (with ``eot(cw, M)``: ``M`` times that, one
``M``-query EOT gradient per Adam step). Two ways to end:

- ``eps`` set (the threat model of the query attacks; default): the attack stops at the first point
  whose answer is adversarial and within ``||x - x0||_2 <= eps``; ``x`` is the current iterate;
- ``eps=None`` (minimum distortion, the paper's): it runs the whole schedule and returns the adversarial
  point of smallest l_2 distortion it saw (the last iterate if none), claiming success at its last step
  if it saw one; give the driver a budget of at least ``search_steps * steps``.

Defaults: ``kappa = 0`` and the initial ``c = 1e-3`` are the paper's (its reference code's); its 9 search
stages of up to 10 000 steps at Adam's learning rate ``1e-2`` are for 28x28 to 299x299 images; here 6
stages of 100 steps (600 queries; ``c`` from 1e-3 to 100 when every stage fails) at a learning rate of
``0.1`` on the 8x8 digits. In tanh space a pixel at 0 or 1 sits at ``w = -+7.25``, and Adam moves ``w``
by about the learning rate per step: at ``1e-2`` a 100-step stage cannot move such pixels, and on the
registry battery's ten digits images the targeted attack fooled 4 of 10 within 600 queries (``eps`` 2.0)
against 10 of 10 at ``0.1`` (untargeted: 9 and 10 of 10).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnd_jax import losses
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial
from rnd_jax.attacks.whitebox._common import expected_gradient

SHRINK = 1.0 - 1e-6  # atanh of (2 x0 - 1) * SHRINK stays finite at pixels 0 and 1 (the reference's 0.999999)


@dataclasses.dataclass(frozen=True)
class CWConfig:
    """C&W l_2 hyper-parameters (module docstring)."""

    eps: float | None = 2.0  # stop at the first adversarial answer within this l_2 radius; None: minimum distortion
    norm: str = "l2"  # the attack is l_2 only
    targeted: bool = False
    steps: int = 100  # Adam steps per search stage
    search_steps: int = 6  # binary-search stages over c
    lr: float = 0.1  # Adam learning rate (in tanh space; the paper's 1e-2 with up to 10 000 steps a stage)
    c0: float = 1e-3  # initial constant c
    kappa: float = 0.0  # confidence: the margin must reach -kappa
    abort_early: bool = False  # end a stage whose loss stopped falling (the reference code's ABORT_EARLY)

    def __post_init__(self):
        if self.norm != "l2":
            raise ValueError(f"C&W is an l_2 attack; norm must be 'l2', got {self.norm!r}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"C&W eps must be a finite number > 0 or None, got {self.eps!r}")
        for name in ("steps", "search_steps"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"C&W {name} must be an int >= 1, got {v!r}")
        for name in ("lr", "c0"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"C&W {name} must be a finite number > 0, got {v!r}")
        if not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"C&W kappa must be a finite number >= 0, got {self.kappa!r}")
        if not isinstance(self.targeted, bool):
            raise ValueError(f"targeted must be a bool, got {self.targeted!r}")
        if not isinstance(self.abort_early, bool):
            raise ValueError(f"C&W abort_early must be a bool, got {self.abort_early!r}")
        if self.steps * self.search_steps > 2 ** 31 - 1:
            raise ValueError(f"C&W's schedule of {self.search_steps} x {self.steps} steps does not fit int32")

    @property
    def schedule(self) -> int:
        """Queries of the whole schedule (without EOT)."""
        return self.steps * self.search_steps


class CWState(NamedTuple):
    x: jax.Array  # the returned point: the current iterate (eps set) or the best adversarial point (eps None)
    w: jax.Array  # current iterate in tanh space
    x0: jax.Array
    w0: jax.Array
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32: steps taken (all stages)
    done: jax.Array  # bool
    c: jax.Array  # f32: the constant of the current stage
    lo: jax.Array  # f32: binary-search bounds of c (hi = inf: none yet)
    hi: jax.Array
    hit: jax.Array  # bool: an answer of the current stage was adversarial
    best: jax.Array  # f32: smallest squared l_2 distortion of an adversarial answer (inf: none)
    opt_state: optax.OptState
    stage: jax.Array  # i32: index of the current search stage
    stage_step: jax.Array  # i32: steps taken in the current stage
    prev: jax.Array  # f32: the stage's loss at its last abort-early check (inf: none yet)


class CWInfo(NamedTuple):
    loss: jax.Array  # ||x - x0||^2 + c f(x) at the current point (from its noisy answer)
    margin: jax.Array  # f(x)
    c: jax.Array


def to_box(w):
    return (jnp.tanh(w) + 1.0) / 2.0


def cw(cfg: CWConfig) -> Attack:
    """Build the C&W l_2 attack for ``cfg``; see the module docstring."""
    margin_fn = losses.targeted_cw if cfg.targeted else losses.margin
    kappa, steps = float(cfg.kappa), cfg.steps
    period = max(1, steps // 10)  # abort-early checks every period steps of a stage
    opt = optax.adam(cfg.lr)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        w0 = jnp.arctanh((2.0 * x0 - 1.0) * SHRINK)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        return CWState(to_box(w0), w0, x0, w0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                       f32(cfg.c0), f32(0.0), f32(jnp.inf), jnp.zeros((), bool), f32(jnp.inf), opt.init(w0),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), f32(jnp.inf))

    def step(state: CWState, oracle):
        x = to_box(state.w)
        f = lambda p: jnp.maximum(margin_fn(p, state.cls), -kappa)
        probs, value, g = expected_gradient(oracle, x[None], f)
        adversarial = is_adversarial(probs[0], state.cls, cfg.targeted)
        d2 = jnp.sum((x - state.x0) ** 2)
        # d/dx of ||x - x0||^2 + c f(x), through x = (tanh(w) + 1) / 2
        grad_w = (2.0 * (x - state.x0) + state.c * g[0]) * (1.0 - jnp.tanh(state.w) ** 2) / 2.0
        updates, opt_state = opt.update(grad_w, state.opt_state, state.w)
        w = state.w + updates
        hit = state.hit | adversarial
        better = adversarial & (d2 < state.best)
        best = jnp.where(better, d2, state.best)
        # end of a stage: move c, restart from the image with a fresh Adam state
        total = d2 + state.c * value[0]
        end = state.stage_step + 1 == steps
        prev = state.prev
        if cfg.abort_early:
            check = state.stage_step % period == 0
            end = end | (check & (total > 0.9999 * state.prev))
            prev = jnp.where(check, total, state.prev)
        hi = jnp.where(end & hit, jnp.minimum(state.hi, state.c), state.hi)
        lo = jnp.where(end & ~hit, jnp.maximum(state.lo, state.c), state.lo)
        c_next = jnp.where(jnp.isinf(hi), state.c * 10.0, (lo + hi) / 2.0)
        c = jnp.where(end, c_next, state.c)
        w = jnp.where(end, state.w0, w)
        opt_state = jax.tree.map(lambda fresh, new: jnp.where(end, fresh, new), opt.init(state.w0), opt_state)
        new = state._replace(x=to_box(state.w + updates), w=w, step=state.step + 1, c=c, lo=lo, hi=hi,
                             hit=jnp.where(end, False, hit), best=best, opt_state=opt_state,
                             stage=state.stage + end.astype(jnp.int32),
                             stage_step=jnp.where(end, 0, state.stage_step + 1),
                             prev=jnp.where(end, jnp.inf, prev).astype(jnp.float32))
        if cfg.eps is None:  # minimum distortion: keep the best adversarial point, claim it at the last step
            new = new._replace(x=jnp.where(better, x, jnp.where(jnp.isinf(best), new.x, state.x)),
                               done=(state.stage == cfg.search_steps - 1) & end & jnp.isfinite(best))
        else:  # the threat model of the query attacks: stop at the first adversarial answer within eps
            done = adversarial & (d2 <= float(cfg.eps) ** 2)
            stay = state._replace(x=x, step=state.step + 1, done=done)  # the point, kept if a stop rule rejects it
            new = jax.tree.map(lambda a, b: jnp.where(done, a, b), stay, new._replace(done=done))
        return new, CWInfo(loss=total, margin=value[0], c=state.c)

    return Attack(init=init, step=step, cost=1, output="gradient", targeted=cfg.targeted)


register(AttackSpec(name="cw", config=CWConfig, build=lambda cfg, ctx: cw(cfg), family="whitebox",
                    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=600),
                    bad_configs=(dict(norm="linf"), dict(eps=0.0), dict(eps=float("nan")), dict(steps=0),
                                 dict(search_steps=-1), dict(lr=0.0), dict(c0=-1.0), dict(kappa=-0.5),
                                 dict(steps=2.5), dict(abort_early=1))))
