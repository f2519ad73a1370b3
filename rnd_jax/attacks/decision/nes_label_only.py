"""NES label-only: NES on a Monte-Carlo proxy score, inside a shrinking l_inf or l_2 ball.

Ilyas, Engstrom, Athalye & Lin, "Black-box Adversarial Attacks with Limited Queries and
Information", ICML 2018 (arXiv:1804.08598), Sec. 2.3-2.4 (partial information, Alg. 2) and Sec. 2.5
(label-only).

With only the top-1 label, the score of a point is replaced by the proxy (their eq. for the
label-only setting with ``k = 1``)

    S(x) = E_{delta ~ U[-mu, mu]^D} [ R(x + delta) ],   R = 1[adversarial],

estimated with ``n`` uniform samples. NES estimates the gradient of ``S`` with ``J`` antithetic
Gaussian directions, ``g = 1/(J s) sum_j S(x + s u_j) u_j`` (``J n`` queries in one batch). As in the
partial-information attack, the search starts at an adversarial image and shrinks the radius
``e_t`` of the ball around ``x0``: each step proposes ``x' = Proj_{e_t - d}(x + lr v)`` (ascent on
``S``; ``v = sign(g)`` for l_inf, the paper's threat model, or ``v = sqrt(D) g/||g||_2`` for l_2, the
variant Aithal & Li (2022) evaluate) and accepts it if adversarial (one query).

Step-size and decay search (the reference implementation's line search, Alg. 2's back-off). Every
step starts at ``lr = lr_max`` and the current decay ``d = delta``. A rejected proposal halves
``lr``; once ``lr`` would fall below ``lr_min`` the search halves ``d`` and starts again at
``lr = lr_max``; a ``d`` below ``decay_min`` becomes 0 (propose without shrinking), and a rejection
at ``d = 0`` and ``lr_min`` ends the search. An accepted proposal that shrank the ball restores the
decay, ``delta <- max(d, decay_restore)`` (the reference's ``delta_eps = max(prop_de,
min_delta_eps)``); one accepted at ``d = 0`` leaves ``delta`` as it was. So neither the step size
nor the decay stays small after a run of rejections. A step asks at most ``max_tries`` proposals;
a search cut by that cap continues at the next step from the decay it had reached (with
``lr = lr_max`` again), since the reference searches until it succeeds.

Start: a training image of the target class (targeted; the paper's start) or of another class /
uniform noise (untargeted), then 10 halvings towards ``x0`` along the norm's path (the shared
boundary search), which only shortens the paper's shrinking phase.

Defaults, scaled to 64-pixel digits: ``J = 10`` directions and ``n = 5`` samples (the paper's
``J = 50``, ``n = 50`` is for ImageNet, where the attack needs millions of queries); ``s = 0.05`` and
``mu = 0.01`` (the paper's ``1e-3`` makes every probe land on the same side of the boundary as soon
as a step moves ``x`` a little inside the adversarial region: all proxy scores are 1 and the
antithetic estimate is exactly 0); ``lr_max = 0.02`` and decay ``d = 0.01`` per step, in pixel
units: for l_2 both are multiplied by ``sqrt(D)`` (the l_2 size of a per-pixel step of that size).
The reference's decay starts at 0.5 with restore floor 0.1 and zero threshold 2e-3 (fractions of
the image range 1 for ImageNet); here the decay starts at 0.01, is restored to at least
``decay_restore = 0.002`` (the reference's ratio 1/5) and becomes 0 below ``decay_min = 1e-4``.
Not reproduced: the reference's plateau annealing of ``lr_max`` (driven by its proxy loss) and its
``conservative`` factor (its recorded radius shrinks by ``d / conservative`` while the proposal is
projected with ``d``); here the radius is the one the accepted proposal was projected onto.
On 8x8 digits the l_inf variant stalls near radius 0.3-0.45 (the proposals of a 64-dimensional
sign step from a 10-20 direction estimate are rarely still adversarial once the ball shrinks), so
the registry's battery runs the l_2 variant. One step costs at most ``J n + max_tries`` queries.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.oracle import live_while

START_HALVINGS = 10


@dataclasses.dataclass(frozen=True)
class NESLabelOnlyConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "linf"  # "linf" (the paper's) or "l2" (Aithal & Li's variant)
    targeted: bool = False
    samples: int = 10  # J: NES directions per step (even; antithetic pairs)
    mc: int = 5  # n: Monte-Carlo samples of the proxy score per direction
    mu: float = 0.01  # proxy-score sampling radius
    sigma: float = 0.05  # NES search radius s
    lr_max: float = 0.02
    lr_min: float = 1e-3
    decay: float = 0.01  # initial radius decay per step (delta)
    decay_min: float = 1e-4  # a decay below this becomes 0 (no shrink)
    decay_restore: float = 0.002  # after a shrink delta = max(d, decay_restore) (reference min_delta_eps)
    max_tries: int = 8  # proposals per step
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2 or self.samples % 2:
            raise ValueError(f"samples J must be an even int >= 2 (antithetic pairs), got {self.samples!r}")
        C.check_int("mc", self.mc)
        C.check_int("max_tries", self.max_tries)
        for name in ("mu", "sigma", "lr_max", "lr_min", "decay", "decay_min", "decay_restore"):
            C.check_real(name, getattr(self, name), upper=1.0)
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must be <= lr_max ({self.lr_max})")
        if self.decay_min > self.decay_restore:
            raise ValueError(f"decay_min ({self.decay_min}) must be <= decay_restore ({self.decay_restore})")


class NESLabelOnlyState(NamedTuple):
    x: jax.Array  # best adversarial point
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array
    dist: jax.Array  # distance of x
    xc: jax.Array  # current iterate (adversarial, inside the ball of radius e_t)
    radius: jax.Array  # e_t
    lr: jax.Array  # step size of the last accepted proposal (each step's search starts at lr_max)
    decay: jax.Array  # delta: the decay the next step's search starts with


class NESLabelOnlyInfo(NamedTuple):
    loss: jax.Array
    queries: jax.Array
    proxy: jax.Array  # mean proxy score of this step's NES points
    tries: jax.Array  # i32: proposals asked this step
    accepted: jax.Array  # bool: a proposal was accepted this step


def nes_label_only(cfg: NESLabelOnlyConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build NES label-only for ``cfg``; ``pool`` holds training images for starting points."""
    targeted, J, n, norm = cfg.targeted, cfg.samples, cfg.mc, cfg.norm

    def project(x, x0, r):
        if norm == "linf":
            return jnp.clip(jnp.clip(x, x0 - r, x0 + r), 0.0, 1.0)
        d = x - x0
        return jnp.clip(x0 + d * jnp.minimum(1.0, C.safe_div(r, jnp.sqrt(jnp.sum(d * d)))), 0.0, 1.0)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return NESLabelOnlyState(x0, x0, cls, key, z, f, f, f, z, inf, x0, inf, jnp.asarray(cfg.lr_max, jnp.float32),
                                 jnp.asarray(cfg.decay, jnp.float32))

    def step(pool, state: NESLabelOnlyState, oracle):
        k = jax.random.fold_in(state.key, state.step)
        k_start, k_u, k_mc = jax.random.split(k, 3)
        x0, cls = state.x0, state.cls

        def search(c):
            st, off, *_ = c
            s, off = C.start_step(oracle, off, k_start, x0, cls, st.tries, cfg, pool)
            xb, off = C.run_if(s.found, lambda cc: C.boundary(oracle, cc[1], x0, cc[0], norm, 2.0 ** -START_HALVINGS,
                                                               START_HALVINGS, cls, targeted), (s.x, off))
            d = C.distance(xb, x0, norm)
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries, x=jnp.where(s.found, xb, st.x),
                             dist=jnp.where(s.found, d, st.dist), xc=jnp.where(s.found, xb, st.xc),
                             radius=jnp.where(s.found, d, st.radius))
            return st, off, jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((), bool)

        def iterate(c):
            st, off, *_ = c
            x = st.xc
            half = jax.random.normal(k_u, (J // 2,) + x.shape)
            u = jnp.concatenate([half, -half])
            delta = jax.random.uniform(k_mc, (J, n) + x.shape, minval=-cfg.mu, maxval=cfg.mu)
            pts = jnp.clip(x[None, None] + cfg.sigma * u[:, None] + delta, 0.0, 1.0)
            adv, off = C.ask(oracle, off, pts.reshape((J * n,) + x.shape), cls, targeted)
            proxy = adv.reshape(J, n).mean(1)
            g = jnp.tensordot(proxy, u, axes=1) / (J * cfg.sigma)
            direction = jnp.sign(g) if norm == "linf" else C.unit(g)
            scale = 1.0 if norm == "linf" else math.sqrt(math.prod(x.shape))

            def cond(cc):
                i, ok, stop, *_ = cc
                return (i < cfg.max_tries) & ~ok & ~stop

            def body(cc):
                i, _, _, lr, dec, x_acc, r_acc, off = cc
                r_new = jnp.where(dec > 0, jnp.maximum(st.radius - scale * dec, 0.0), st.radius)
                prop = project(x + scale * lr * direction, x0, r_new)
                a, off = C.ask(oracle, off, prop[None], cls, targeted)
                ok = a[0]
                halve_lr = ~ok & (lr >= 2.0 * cfg.lr_min)
                next_row = ~ok & ~halve_lr  # lr exhausted at this decay: halve the decay, restart lr
                stop = next_row & (dec == 0)
                half = 0.5 * dec
                dec_next = jnp.where(next_row & ~stop, jnp.where(half < cfg.decay_min, 0.0, half), dec)
                lr_next = jnp.where(halve_lr, 0.5 * lr, jnp.where(next_row, cfg.lr_max, lr))
                return (i + 1, ok, stop, jnp.where(ok, lr, lr_next), dec_next, jnp.where(ok, prop, x_acc),
                        jnp.where(ok, r_new, r_acc), off)

            lr0 = jnp.asarray(cfg.lr_max, jnp.float32)
            f = jnp.zeros((), bool)
            tries, ok, _, lr, dec, x_new, r_new, off = live_while(
                cond, body, (jnp.zeros((), jnp.int32), f, f, lr0, st.decay, x, st.radius, off))
            # accepted with a shrink: restore the decay; accepted without one: keep it; cut by the cap:
            # continue next step from the decay reached (unless that is 0); search exhausted: start over
            decay = jnp.where(ok, jnp.where(dec > 0, jnp.maximum(dec, cfg.decay_restore), st.decay),
                              jnp.where(dec > 0, dec, st.decay))
            best, dist = C.keep_best(st.x, st.dist, x_new, C.distance(x_new, x0, norm), ok)
            st = st._replace(x=best, dist=dist, xc=jnp.where(ok, x_new, x), radius=jnp.where(ok, r_new, st.radius),
                             lr=jnp.where(ok, lr, st.lr), decay=decay)
            return st, off, proxy.mean(), tries, ok

        zero, no = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
        st, off, *_ = C.run_if(~state.found, search, (state, zero, jnp.zeros(()), zero, no))
        st, off, proxy, tries, accepted = C.run_if(state.found, iterate, (st, off, jnp.zeros(()), zero, no))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, NESLabelOnlyInfo(loss=st.dist, queries=off, proxy=proxy, tries=tries, accepted=accepted)

    cost = max(cfg.start_candidates + START_HALVINGS, J * n + cfg.max_tries)
    return Attack(init=init, step=Partial(step, pool), cost=cost, output="label", targeted=targeted)


register(AttackSpec(
    name="nes_label_only", config=NESLabelOnlyConfig, build=lambda cfg, ctx: nes_label_only(cfg, C.make_pool(ctx)),
    family="decision", needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=5_000),
    bad_configs=(dict(norm="l1"), dict(eps=0.0), dict(samples=3), dict(mc=0), dict(mu=0.0), dict(sigma=-1.0),
                 dict(lr_min=0.5), dict(max_tries=0), dict(decay=2.0), dict(decay_restore=0.0),
                 dict(decay_min=0.01, decay_restore=0.001))))
