"""Subspace Attack: bandit gradient estimation along the gradients of reference models.

Guo, Yan & Zhang, "Subspace Attack: Exploiting Promising Subspaces for Query-Efficient Black-box
Attacks", NeurIPS 2019, Algorithm 1 (l_inf; the l_2 variant of their code is selectable).

The attacker owns ``K`` reference models, trained separately on the training split (the paper's
locally trained substitutes; ``Context.surrogates``, clean scorers). It keeps a prior ``g`` on the
gradient of the attacked model's objective ``f`` (``f = -loss``, ascended) and, at each step:

1. draws one reference model uniformly at random and takes the gradient ``u`` of ``f`` computed on
   that model at the current point ``x`` (with dropout, below), scaled to unit l_2 length: the search
   direction (the gradients of the references span the "promising subspace");
2. asks the attacked model about ``x + delta q1/||q1||`` and ``x + delta q2/||q2||`` with
   ``q1 = g + tau u``, ``q2 = g - tau u`` (the bandit exploration of Ilyas et al. 2019 along ``u``
   instead of a random direction) and forms ``Delta = (f(probe 1) - f(probe 2)) / (tau delta)``;
3. updates the prior, by default as the authors' code does (``prior_update="momentum"``):
   ``g <- g + eta_g Delta u / ||Delta u||_1``, a step of fixed l_1 length ``eta_g`` along
   ``sign(Delta) u``; ``"gd"`` is the plain step ``g <- g + eta_g Delta u`` of Algorithm 1;
4. steps ``x <- Proj(x + eta sign(g))`` (l_inf) or ``x <- Proj(x + eta g / ||g||_2)`` (l_2), projected
   onto the eps-ball and [0, 1].

Gradients of the references are the attacker's own white-box computation (``jax.grad`` through the
scorer), never queries. The references are arguments of the compiled program: the step is a
``Partial`` holding the tuple of scorers, whose weights are its pytree leaves (:mod:`rnd_jax.pytree`).
With more than one reference every reference's gradient is computed and the one of a drawn index
selected (:func:`reference_direction`), for the live images only.

**Dropout.** The paper regularises the references with dropout whose ratio grows during the attack
(the authors' code: ``p_t = p_0`` for the first ``drop_grow`` steps, then
``p_max - (p_max - p_0) exp(-(t - drop_grow) gamma)``, with ``p_0 = 0``, ``p_max = 0.5``,
``drop_grow = 10``, ``gamma = 0.01``), so that the search directions are not confined to the
references' exact gradients. The authors drop hidden units of reference networks built with dropout
layers; a scorer exposes only its input, so here the units dropped are the reference model's input
units: a Bernoulli mask ``m`` (keep probability ``1 - p_t``, scaled by ``1 / (1 - p_t)``) multiplies
the point the reference sees, and ``u`` is the gradient of ``f(reference(m * x))`` with respect to
``x`` (the mask enters it by the chain rule). ``drop_max = 0`` turns it off (then ``u`` is exactly the
drawn reference's gradient).

Queries. One step sends ONE batch of 3 points: the current point ``x`` (the success check; the attack
stops there if it is adversarial) and the two probes, so ``cost = 3`` with ``checks = 1``: the paper
counts the two probes per step (Algorithm 1; its code asks the success check without counting it),
which is ``Result.loss_queries`` here; ``Result.queries`` counts the check too.

Defaults (``SubspaceConfig``): the argument defaults of the authors' code (attack.py, which its
README command uses for CIFAR-10): ``tau = 0.1``, ``delta = 0.1``, ``eta_g = 1``, the l_1-normalised
prior step, ``eta = 1/255`` at ``eps = 8/255`` (``lr = eps/8`` here, for any eps and norm), the
dropout schedule above and the C&W margin on logits, which on probabilities is the log-probability
margin (``margin`` untargeted, ``cw`` targeted; ``xent`` is selectable). ``delta`` is an l_2 length
set for 32x32x3 images (``d = 3 072``); ``fd_eta=None`` scales it by ``sqrt(d / 3 072)`` so that the
probe keeps its per-pixel size (0.0144 on the 8x8 digits). The registered budget is the code's
``max_query = 10 000``. Not reproduced: the tiled prior (``delta_size``: a prior on a coarser grid,
upsampled to the image), the code's reuse of the attacked model's logit gradient for the reference
backward pass (here each reference differentiates its own loss, as in Algorithm 1), and its
``fix_grad`` option.

On digits (10 battery images, l_inf eps 0.3, one reference of another seed, targeted) the defaults
fool every image, the slowest after 1 335 queries. Algorithm 1's plain step lets the prior outgrow
the exploration ``tau u`` within a few steps, after which the two probes point almost the same way:
with ``tau = 1, eta_g = 0.1`` one image of ten, with ``tau = 0.1, eta_g = 0.1`` two, stay at a
non-adversarial vertex until the 10 000 queries are spent; so does one image without dropout
(``drop_max = 0``, l_1-normalised step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax import compact, losses
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial, project

NORMS = ("linf", "l2")
PRIOR_UPDATES = ("gd", "momentum")
FD_ETA_REF, D_REF = 0.1, 32 * 32 * 3  # delta = 0.1 for 32x32x3 CIFAR-10 images (paper, Sec. 4)


def _positive(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"Subspace {name} must be a finite number > 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class SubspaceConfig:
    """Subspace Attack hyper-parameters; ``None`` picks the scaled paper default (module docstring)."""

    eps: float = 0.3
    norm: str = "linf"  # the paper's threat model; "l2" also supported
    targeted: bool = False
    lr: float | None = None  # eta: image step (eps/8)
    fd_eta: float | None = None  # delta: l_2 length of the probes (0.1 * sqrt(d / 3072))
    exploration: float = 0.1  # tau
    prior_lr: float = 1.0  # eta_g
    prior_update: str = "momentum"  # "momentum" (the authors' code: l_1-normalised) or "gd" (Algorithm 1)
    drop_init: float = 0.0  # dropout ratio of the references for the first drop_grow steps
    drop_max: float = 0.5  # the ratio it grows towards
    drop_grow: int = 10  # steps before the ratio starts growing
    drop_gamma: float = 0.01  # growth rate
    loss: str | None = None  # untargeted: "margin" (default) or "xent"; targeted: "cw" (default) or "xent"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.prior_update not in PRIOR_UPDATES:
            raise ValueError(f"unknown Subspace prior_update {self.prior_update!r}; choose one of {PRIOR_UPDATES}")
        for name in ("eps", "exploration", "prior_lr", "drop_gamma"):
            _positive(name, getattr(self, name))
        for name in ("lr", "fd_eta"):
            _positive(name, getattr(self, name), allow_none=True)
        for name in ("drop_init", "drop_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v < 1):
                raise ValueError(f"Subspace {name} must be a number in [0, 1), got {v!r}")
        if self.drop_init > self.drop_max:
            raise ValueError(f"Subspace drop_init ({self.drop_init}) must be <= drop_max ({self.drop_max})")
        if isinstance(self.drop_grow, bool) or not isinstance(self.drop_grow, int) or self.drop_grow < 0:
            raise ValueError(f"Subspace drop_grow must be an int >= 0, got {self.drop_grow!r}")
        losses.check_goal("Subspace", self.targeted, self.loss)

    @property
    def loss_name(self) -> str:
        return self.loss or ("cw" if self.targeted else "margin")

    def resolved(self, image_dim: int) -> tuple[float, float]:
        """(eta, delta) for images of ``image_dim`` pixels."""
        lr = self.lr if self.lr is not None else self.eps / 8
        fd_eta = self.fd_eta if self.fd_eta is not None else FD_ETA_REF * math.sqrt(image_dim / D_REF)
        return float(lr), float(fd_eta)


class SubspaceState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array
    cls: jax.Array  # i32: target if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x was adversarial
    prior: jax.Array  # g: f32[H, W, C]


class SubspaceInfo(NamedTuple):
    loss: jax.Array  # loss at the current point (its answer this step)
    est_deriv: jax.Array  # Delta: finite-difference derivative of the ascended objective along u
    ref: jax.Array  # i32: index of the reference model drawn this step
    drop: jax.Array  # dropout ratio of the reference this step


def drop_rate(cfg: SubspaceConfig, t):
    """The references' dropout ratio at step ``t`` (the schedule of the module docstring)."""
    t = jnp.asarray(t, jnp.float32)
    grown = cfg.drop_max - (cfg.drop_max - cfg.drop_init) * jnp.exp(-(t - cfg.drop_grow) * cfg.drop_gamma)
    return jnp.where(t < cfg.drop_grow, cfg.drop_init, grown).astype(jnp.float32)


def _norm(t, p: int = 2):
    n = jnp.sum(jnp.abs(t)) if p == 1 else jnp.sqrt(jnp.sum(t * t))
    return n + (n == 0) * 1e-8


def reference_direction(surrogates, x, cls, mask, idx, objective):
    """Gradient of ``objective(reference(mask * x), cls)`` w.r.t. ``x`` for reference ``idx`` (unit l_2).

    Inside a driver loop under ``vmap`` it is computed for the live images only
    (:func:`rnd_jax.compact.on_live`), and every reference's gradient is taken and the drawn one picked:
    a ``lax.switch`` on a per-image index would become a select that copies each reference's weights
    once per image (a grouped convolution, several times slower)."""
    return compact.on_live(Partial(_reference_gradient, objective, surrogates), x, cls, mask, idx)


def _reference_gradient(objective, surrogates, live, x, cls, mask, idx):
    del live
    grads = [jax.grad(lambda y, s=s: objective(s((mask * y)[None], None)[0], cls))(x) for s in surrogates]
    g = grads[0] if len(grads) == 1 else jnp.stack(grads)[idx]
    return g / _norm(g)


def subspace(cfg: SubspaceConfig, surrogates: Any) -> Attack:
    """Build the Subspace Attack for ``cfg`` with the reference models ``surrogates`` (a tuple of scorers)."""
    if callable(surrogates):
        surrogates = (surrogates,)
    if not (isinstance(surrogates, (tuple, list)) and surrogates and all(callable(s) for s in surrogates)):
        raise ValueError("the Subspace attack needs a non-empty tuple of reference scorers (x, keys) -> "
                         "probabilities (Context.surrogates)")
    surrogates = tuple(surrogates)
    loss_fn = (losses.TARGETED if cfg.targeted else losses.UNTARGETED)[cfg.loss_name]

    def objective(probs, cls):  # ascended
        return -loss_fn(probs, cls)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return SubspaceState(x0, x0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros_like(x0))

    def step(surrogates, state: SubspaceState, oracle):
        x, cls = state.x, state.cls
        lr, fd_eta = cfg.resolved(x.size)
        tau = cfg.exploration
        k_ref, k_drop = jax.random.split(jax.random.fold_in(state.key, state.step))
        p = drop_rate(cfg, state.step)
        idx = jax.random.randint(k_ref, (), 0, len(surrogates))
        keep = jax.random.bernoulli(k_drop, 1.0 - p, x.shape)
        mask = jnp.where(keep, 1.0 / (1.0 - p), 0.0).astype(x.dtype)
        u = reference_direction(surrogates, x, cls, mask, idx, objective)
        q1, q2 = state.prior + tau * u, state.prior - tau * u
        probs = oracle(jnp.stack([x, x + fd_eta * q1 / _norm(q1), x + fd_eta * q2 / _norm(q2)]))
        success = is_adversarial(probs[0], cls, cfg.targeted)
        f = objective(probs, cls)
        est_deriv = (f[1] - f[2]) / (tau * fd_eta)
        g = est_deriv * u
        if cfg.prior_update == "momentum":
            g = g / _norm(g, 1)
        prior = state.prior + cfg.prior_lr * g
        move = jnp.sign(prior) if cfg.norm == "linf" else prior / _norm(prior)
        x_new = project(x + lr * move, state.x0, cfg.eps, cfg.norm)
        new = SubspaceState(x=jnp.where(success, x, x_new), x0=state.x0, cls=cls, key=state.key,
                            step=state.step + 1, done=success, prior=jnp.where(success, state.prior, prior))
        return new, SubspaceInfo(loss=-f[0], est_deriv=est_deriv, ref=idx.astype(jnp.int32), drop=p)

    return Attack(init=init, step=Partial(step, surrogates), cost=3, output="scores", targeted=cfg.targeted,
                  checks=1)


register(AttackSpec(
    name="subspace", config=SubspaceConfig, build=lambda cfg, ctx: subspace(cfg, ctx.surrogates), family="score",
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=10_000), needs=("surrogates",),
    bad_configs=(dict(eps=0.0), dict(eps=float("nan")), dict(norm="l1"), dict(lr=-1.0), dict(fd_eta=0.0),
                 dict(exploration=float("inf")), dict(prior_lr=-0.1), dict(prior_update="eg"), dict(drop_max=1.0),
                 dict(drop_init=-0.1), dict(drop_init=0.3, drop_max=0.2), dict(drop_grow=-1), dict(drop_gamma=0.0),
                 dict(loss="nope"), dict(targeted=True, loss="margin"))))
