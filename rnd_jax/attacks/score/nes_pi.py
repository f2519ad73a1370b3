"""NES partial-information attack: only the top-k (here top-1) class and score are visible.

Ilyas, Engstrom, Athalye & Lin, "Black-box Adversarial Attacks with Limited Queries and
Information", ICML 2018 (arXiv:1804.08598): the partial-information attack.

A targeted l_inf attack that starts from an image ``x_t`` of the target class (from the training
pool of :class:`~rnd_jax.attacks.registry.Context`, chosen at random with the attack key) and
alternates between (a) increasing the target's probability and (b) shrinking an l_inf ball around
the original image ``x0`` from ``eps_0 = 1`` down to the goal ``eps``, keeping the target the top-1
class all along. With a top-1 oracle the target's score is visible only at points where the
target is the top-1 class. Each step:

1. NES gradient of the target cross-entropy ``-log p_t`` from ``J`` antithetic Gaussian samples
   ``adv + sigma*u_j``, averaged over the samples whose answer shows the target (the others carry
   no score and are dropped, as in the reference implementation); momentum 0.9;
2. plateau annealing: if the mean loss of the last ``plateau_length`` steps went up, ``max_lr`` is
   halved (down to ``min_lr``);
3. a line search over the step size and the eps decrement: the candidate
   ``clip(adv - lr*sign(g), x0 -+ (eps_t - d))`` must keep the target top-1. It starts at
   ``lr = max_lr``, ``d = delta_eps`` (only when the mean loss is below ``adv_thresh``, else
   ``d = 0``), halves ``lr`` down to ``min_lr``, then halves ``d`` and restarts ``lr`` (``d`` below
   ``2e-3`` becomes 0). The first candidate that works is taken; then ``eps_t`` decreases by
   ``d / conservative`` and ``delta_eps = max(d, min_delta_eps)``.

The attack succeeds when the point it returns -- ``adv`` projected onto the goal ball -- is
answered with the target as top-1.

Queries. A step sends one batch of ``1 + J`` points: the returned point (the success check: it
equals ``adv`` once ``eps_t`` reaches the goal; before that, an early success of the projection
also counts) and the ``J`` samples. The line search is sequential and asks one point at a time
through ``oracle.at`` inside a ``lax.while_loop``; those points are reported in ``Info.queries``,
so a step costs ``1 + J + (line-search points)`` and ``cost`` is the worst case
``1 + J + rows * lrs`` (see :func:`nes_pi`). A line-search candidate accepted inside the goal
ball is already a verdict at the returned point, so the attack stops there.

Defaults: the reference implementation's partial-information run (its ``partial-info.sh`` on top
of its defaults): ``J = 100``, ``sigma = 1e-5``, momentum 0.9, ``eps_0 = 1``, ``delta_eps = 0.5``,
``min_delta_eps = 0.1``, ``conservative = 2``, plateau length 20 and drop 2, ``adv_thresh = 0.2``,
``max_lr = 0.01`` and ``min_lr = 0.001`` (``min_lr_ratio = 10``). That ``max_lr`` goes with the
ImageNet goal ``eps = 0.05``; ``max_lr=None`` keeps the ratio, ``max_lr = eps / 5``. (With the
generic query-limited defaults -- ``J = 50``, ``sigma = 1e-3``, plateau length 5,
``min_lr_ratio = 200`` -- the attack stalls on some digits at ``eps_t = 0.5``: the target stays
top-1 with ``p_t < 0.8``, so ``adv_thresh`` never allows a decay, and the annealed step size
stops moving the point.) Differences: the reference does not count its per-iteration success check
(here it is a counted query at the returned point); where the reference aborts ("did not
converge") when no step size works at ``d = 0``, this attack stays at ``adv`` and draws new samples
next step. Only ``norm="linf"`` and targeted attacks exist (the paper's setting).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial
import numpy as np

from rnd_jax import losses
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.oracle import live_while

INIT_STREAM = 2**31 - 1  # fold_in index of the start-image draw (no step index reaches it)
DELTA_FLOOR = 2e-3  # an eps decrement below this becomes 0 (reference implementation)


def _finite_positive(name, v):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"NES-PI {name} must be a finite number > 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class NESPIConfig:
    """NES partial-information hyper-parameters (reference defaults; see the module docstring)."""

    eps: float = 0.3  # goal radius of the l_inf ball around the original image
    norm: str = "linf"
    targeted: bool = True
    samples: int = 100  # J (even: antithetic pairs)
    sigma: float = 1e-5  # NES search variance
    momentum: float = 0.9
    max_lr: float | None = None  # None = eps / 5
    min_lr_ratio: float = 10.0  # min_lr = max_lr / min_lr_ratio
    start_eps: float = 1.0
    start_delta_eps: float = 0.5
    min_delta_eps: float = 0.1
    conservative: float = 2.0
    adv_thresh: float = 0.2  # decay eps only when the mean loss is below this
    plateau_length: int = 20
    plateau_drop: float = 2.0

    def __post_init__(self):
        if self.norm != "linf":
            raise ValueError(f"NES-PI is an l_inf attack; got norm {self.norm!r}")
        if self.targeted is not True:
            raise ValueError("NES-PI is a targeted attack (it starts from an image of the target class)")
        for name in ("eps", "sigma", "start_eps", "start_delta_eps", "min_delta_eps", "adv_thresh"):
            _finite_positive(name, getattr(self, name))
        if self.max_lr is not None:
            _finite_positive("max_lr", self.max_lr)
        for name in ("min_lr_ratio", "conservative", "plateau_drop"):
            _finite_positive(name, getattr(self, name))
            if getattr(self, name) < 1:
                raise ValueError(f"NES-PI {name} must be >= 1, got {getattr(self, name)!r}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"NES-PI momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2 or self.samples % 2:
            raise ValueError(f"NES-PI samples J must be an even int >= 2, got {self.samples!r}")
        if isinstance(self.plateau_length, bool) or not isinstance(self.plateau_length, int) or self.plateau_length < 1:
            raise ValueError(f"NES-PI plateau_length must be an int >= 1, got {self.plateau_length!r}")
        if self.start_eps < self.eps:
            raise ValueError(f"NES-PI start_eps {self.start_eps} is below the goal eps {self.eps}")
        if not np.float32(self.lr_min) >= np.finfo(np.float32).tiny:  # the line search halves down to it
            raise ValueError(f"NES-PI smallest step size max_lr / min_lr_ratio = {self.lr_min!r} underflows float32; "
                             f"lower min_lr_ratio")

    @property
    def lr_max(self) -> float:
        return self.eps / 5 if self.max_lr is None else float(self.max_lr)

    @property
    def lr_min(self) -> float:
        return self.lr_max / self.min_lr_ratio

    def line_search_bound(self) -> tuple[int, int]:
        """(step sizes per eps decrement, eps decrements incl. 0): worst-case line-search shape.

        Counted by running the search's own float32 recursions (:func:`line_search_rows`), so the
        bound is exact at every boundary case: a row per step size ``max_lr, max_lr/2, ...`` while
        ``lr >= 2 min_lr``, and a row per decrement from the largest ``delta_eps`` the state can
        hold, ``max(start_delta_eps, min_delta_eps)``, halved until below :data:`DELTA_FLOOR` and
        then 0. The largest decrement is tried even when it is already below the floor (only the
        halved ones are floored), so the search then has two rows, that decrement and 0.
        """
        return line_search_lrs(self.lr_max, self.lr_min), line_search_rows(max(self.start_delta_eps,
                                                                               self.min_delta_eps))


def line_search_lrs(max_lr: float, min_lr: float) -> int:
    """Step sizes the line search tries per decrement, starting at ``max_lr`` (float32, as traced)."""
    lr, lo, n = np.float32(max_lr), np.float32(min_lr), 1
    while lr >= np.float32(2) * lo:
        lr, n = lr / np.float32(2), n + 1
    return n


def line_search_rows(delta_eps: float) -> int:
    """Decrements the line search tries from ``delta_eps``: itself, its halvings >= DELTA_FLOOR, then 0."""
    de, n = np.float32(delta_eps), 1
    while de != 0:
        half = de / np.float32(2)
        de = np.float32(0) if half < np.float32(DELTA_FLOOR) else half
        n += 1
    return n


class NESPIState(NamedTuple):
    x: jax.Array  # returned point: adv projected onto the goal ball, f32[H, W, C]
    adv: jax.Array  # working point (inside the current ball eps_t)
    x0: jax.Array
    cls: jax.Array  # i32 target class
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x had the target as top-1
    failed: jax.Array  # bool: the pool holds no image of the target class
    eps_t: jax.Array  # f32 current radius
    delta_eps: jax.Array  # f32 current eps decrement
    max_lr: jax.Array  # f32 (annealed on plateaus)
    g: jax.Array  # momentum buffer
    recent: jax.Array  # f32[plateau_length]: last mean losses (newest last)
    n_recent: jax.Array  # i32: how many of them are valid


class NESPIInfo(NamedTuple):
    loss: jax.Array  # mean target cross-entropy over the visible samples (inf if none visible)
    queries: jax.Array  # i32: line-search points asked through oracle.at
    eps_t: jax.Array  # radius after the step
    visible: jax.Array  # i32: samples whose answer showed the target


def goal_projection(adv, x0, eps):
    return jnp.clip(jnp.clip(adv, x0 - eps, x0 + eps), 0.0, 1.0)


def pick_start(key, pool_images, pool_labels, target):
    """A random pool image of class ``target`` (and whether one exists)."""
    u = jax.random.uniform(key, pool_labels.shape)
    match = pool_labels == target
    idx = jnp.argmax(jnp.where(match, u, -1.0))
    return pool_images[idx], jnp.any(match)


def nes_pi(cfg: NESPIConfig, pool_images, pool_labels) -> Attack:
    """Build NES-PI for ``cfg`` starting from images of ``pool_images``/``pool_labels``."""
    pool_images = jnp.asarray(np.asarray(pool_images, np.float32))
    pool_labels = jnp.asarray(np.asarray(pool_labels, np.int32))
    if pool_images.ndim != 4 or pool_labels.shape != pool_images.shape[:1]:
        raise ValueError(f"NES-PI needs a pool f32[N, H, W, C] with labels i32[N]; got {pool_images.shape}, "
                         f"{pool_labels.shape}")
    J, sigma, goal = cfg.samples, cfg.sigma, cfg.eps
    lrs, rows = cfg.line_search_bound()
    max_asks = lrs * rows
    P = cfg.plateau_length

    def init(pool, key, x0, label, target):
        pool_images, pool_labels = pool
        x0 = jnp.asarray(x0, jnp.float32)
        start, ok = pick_start(jax.random.fold_in(key, INIT_STREAM), pool_images, pool_labels, target)
        if start.shape != x0.shape:
            raise ValueError(f"NES-PI pool images have shape {start.shape}, the attacked image {x0.shape}")
        eps0 = jnp.asarray(cfg.start_eps, jnp.float32)
        adv = goal_projection(start, x0, eps0)
        return NESPIState(
            x=goal_projection(adv, x0, goal), adv=adv, x0=x0, cls=jnp.asarray(target, jnp.int32), key=key,
            step=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool), failed=jnp.logical_not(ok), eps_t=eps0,
            delta_eps=jnp.asarray(cfg.start_delta_eps, jnp.float32),
            max_lr=jnp.asarray(cfg.lr_max, jnp.float32), g=jnp.zeros_like(x0),
            recent=jnp.zeros((P,), jnp.float32), n_recent=jnp.zeros((), jnp.int32))

    def line_search(state: NESPIState, oracle, g, prop_de0, max_lr, skip):
        lr_min = cfg.lr_min
        step_dir = jnp.sign(g)

        def candidate(lr, de):
            e = jnp.maximum(state.eps_t - de, goal)
            lo, hi = jnp.clip(state.x0 - e, 0.0, 1.0), jnp.clip(state.x0 + e, 0.0, 1.0)
            return jnp.clip(state.adv - lr * step_dir, lo, hi)

        def cond(c):
            lr, de, asked, found, gave_up = c
            return jnp.logical_not(found | gave_up) & (asked < max_asks)

        def body(c):
            lr, de, asked, _, _ = c
            ans = oracle.at(1 + J + asked, candidate(lr, de)[None])
            found = ans.label[0] == state.cls
            shrink_lr = jnp.logical_not(found) & (lr >= 2 * lr_min)
            new_de = jnp.where(de / 2 < DELTA_FLOOR, 0.0, de / 2)
            restart = jnp.logical_not(found | shrink_lr)
            gave_up = restart & (de == 0)
            lr_next = jnp.where(found, lr, jnp.where(shrink_lr, lr / 2, max_lr))
            de_next = jnp.where(restart & jnp.logical_not(gave_up), new_de, de)
            return lr_next, de_next, asked + 1, found, gave_up

        c0 = (max_lr, prop_de0, jnp.zeros((), jnp.int32), jnp.zeros((), bool), skip)
        lr, de, asked, found, _ = live_while(cond, body, c0)
        return candidate(lr, de), de, asked, found

    def step(state: NESPIState, oracle):
        k = jax.random.fold_in(state.key, state.step)
        half = jax.random.normal(k, (J // 2,) + state.x.shape, jnp.float32)
        u = jnp.concatenate([half, -half])
        ans = oracle(jnp.concatenate([state.x[None], state.adv[None] + sigma * u]))
        success = ans.label[0] == state.cls

        vis = (ans.label[1:] == state.cls).astype(jnp.float32)
        n_vis = jnp.sum(vis)
        f = -losses.safe_log(ans.score[1:]) * vis
        g_hat = jnp.tensordot(f, u, axes=1) / (jnp.maximum(n_vis, 1.0) * sigma)
        loss = jnp.where(n_vis > 0, jnp.sum(f) / jnp.maximum(n_vis, 1.0), jnp.inf)
        g = cfg.momentum * state.g + (1.0 - cfg.momentum) * g_hat

        recent = jnp.concatenate([state.recent[1:], loss[None]])
        n_recent = jnp.minimum(state.n_recent + 1, P)
        plateau = (n_recent == P) & (recent[-1] > recent[0])
        lr_floor = cfg.lr_min
        max_lr = jnp.where(plateau & (state.max_lr > lr_floor),
                           jnp.maximum(state.max_lr / cfg.plateau_drop, lr_floor), state.max_lr)
        n_recent = jnp.where(plateau, 0, n_recent)

        prop_de0 = jnp.where((loss < cfg.adv_thresh) & (state.eps_t > goal), state.delta_eps, 0.0)
        # after a success the line search asks nothing (it starts as "gave up")
        cand, de, asked, found = line_search(state, oracle, g, prop_de0, max_lr, success)
        adv = jnp.where(found, cand, state.adv)
        decayed = found & (de > 0)
        delta_eps = jnp.where(decayed, jnp.maximum(de, cfg.min_delta_eps), state.delta_eps)
        n_recent = jnp.where(decayed, 0, n_recent)
        eps_t = jnp.where(found, jnp.maximum(state.eps_t - de / cfg.conservative, goal), state.eps_t)
        inside_goal = found & (jnp.maximum(state.eps_t - de, goal) <= goal)  # cand answered top-1 = target

        keep = lambda old, new: jnp.where(success, old, new)
        new = NESPIState(
            x=keep(state.x, goal_projection(adv, state.x0, goal)), adv=keep(state.adv, adv), x0=state.x0,
            cls=state.cls, key=state.key, step=state.step + 1, done=success | inside_goal, failed=state.failed,
            eps_t=keep(state.eps_t, eps_t), delta_eps=keep(state.delta_eps, delta_eps),
            max_lr=keep(state.max_lr, max_lr), g=keep(state.g, g), recent=keep(state.recent, recent),
            n_recent=keep(state.n_recent, n_recent))
        return new, NESPIInfo(loss=loss, queries=asked, eps_t=new.eps_t, visible=n_vis.astype(jnp.int32))

    return Attack(init=Partial(init, (pool_images, pool_labels)), step=step, cost=1 + J + max_asks, output="top1", targeted=True, checks=1)


def _build(cfg: NESPIConfig, ctx) -> Attack:
    return nes_pi(cfg, ctx.train_images, ctx.train_labels)


register(AttackSpec(
    name="nes_pi", config=NESPIConfig, build=_build, family="score",
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=10_000),
    supports_untargeted=False, needs=("train_images", "train_labels"),
    bad_configs=(dict(targeted=False), dict(norm="l2"), dict(samples=3), dict(sigma=0.0), dict(momentum=1.0),
                 dict(max_lr=-1.0), dict(min_lr_ratio=0.5), dict(start_eps=0.1), dict(plateau_length=0),
                 dict(adv_thresh=float("nan")))))
