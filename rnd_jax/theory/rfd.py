"""Randomized feature defense: Theorem 1 (eq. 26) and Sec. 3.4-3.5, from ``jax.grad`` of a model.

"Understanding the Robustness of Randomized Feature Defense Against Query-Based Adversarial
Attacks" (anonymous, under review), Sec. 3.3-3.5 and Appendix C.

The model is ``f = g o h``; the defense adds ``delta ~ N(0, nu^2 I)`` to ``h(x)`` at every query;
the attacker compares ``L(x + u)`` with ``L(x)`` for ``u ~ N(0, mu^2 I)``. Linearising ``L`` at
``x`` (eq. 16-20), the noisy difference over the clean one is ``1 + C`` with ``C`` a ratio of
independent centred normals, i.e. Cauchy with scale ``sqrt(r)``,

    r = 2 nu^2 ||grad_h L||^2 / (mu^2 ||grad_x L||^2),

and the attacker takes the opposite action (accepts a bad step or rejects a good one) with

    P[C < -1] = 1/2 + arctan(-r^{-1/2}) / pi                                  (eq. 26)

**Units.** The paper writes the noises as ``N(0, nu I)`` and ``N(0, mu I)``, i.e. its ``nu`` and
``mu`` are *variances*; here (as in :func:`rnd_jax.defenses.feature_noise` and
:func:`rnd_jax.defenses.input_noise`) ``nu`` and ``mu`` are *standard deviations*, so the paper's
ratio ``2 nu ||grad_h||^2 / (mu ||grad_x||^2)`` reads ``2 nu^2 ||grad_h||^2 / (mu^2 ||grad_x||^2)``.
Input noise is the special case ``h = identity``, where ``r = 2 nu^2/mu^2`` (Qin et al.'s ``nu/mu``).

Typo (Appendix C): the Cauchy scale is printed as ``sqrt(2 nu ||grad_h|| / (mu ||grad_x||))`` with
unsquared norms; eq. (23)-(24) and (26) use the squared norms, as implemented here.

Also here: the conditional flip probability given the probe (the step inside the proof),
Sec. 3.4's decision-based check (eq. 9) and Sec. 3.5's accuracy under feature noise (eq. 14).
The gradients at the input and at every ``perturb``-marked layer come from one ``jax.grad`` of
the loss with respect to ``(x, perturbations)`` (:func:`loss_gradients`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rnd_jax import losses
from rnd_jax.theory._util import Phi, nonnegative, positive, real, xp_of

__all__ = [
    "accuracy_probability",
    "conditional_flip_probability",
    "decision_flip_probability",
    "grad_sq_norms",
    "loss_gradients",
    "noise_ratio",
    "opposite_action_probabilities",
    "opposite_action_probability",
]

PERTURBATIONS = "perturbations"


def _margin_loss(probs, cls):
    return losses.margin(probs, cls)


def loss_gradients(model, params, x, cls, loss=None):
    """Per-example gradients of ``L(softmax(f(x)), cls)`` at the input and at every marked layer.

    Returns ``({"input": grad_x f32[B, H, W, C], name: grad_h f32[B, *shape], ...}, L f32[B])``.
    ``loss(probs, cls) -> f32[B]`` defaults to the untargeted margin :func:`rnd_jax.losses.margin`
    (``log F_y - max_{j != y} log F_j``, positive iff correctly classified; the paper's eq. 3 on
    log-probabilities). The layer gradients are ``jax.grad`` with respect to a zero
    ``perturbations`` collection, i.e. with respect to the marked activations ``h(x)``.
    """
    from rnd_jax.models import feature_shapes

    loss = loss or _margin_loss
    x = jnp.asarray(x)
    cls = jnp.broadcast_to(jnp.asarray(cls, jnp.int32), x.shape[:1])
    shapes = feature_shapes(model, x.shape[1:])
    zeros = {n: jnp.zeros((x.shape[0],) + s, x.dtype) for n, s in shapes.items()}

    def total(xx, pert):
        logits = model.apply({"params": params, PERTURBATIONS: pert}, xx)
        values = loss(jax.nn.softmax(logits, axis=-1), cls)
        return jnp.sum(values), values

    (_, values), (gx, gh) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, zeros)
    return {"input": gx, **gh}, values


def grad_sq_norms(grads):
    """``{name: ||grad||_2^2 per example}`` for a dict of batched gradients."""
    return {n: xp_of(g).sum(xp_of(g).reshape(g, (g.shape[0], -1)) ** 2, axis=1) for n, g in grads.items()}


def noise_ratio(grad_h_sq, grad_x_sq, nu, mu):
    """Theorem 1's ratio ``r = 2 nu^2 ||grad_h L||^2 / (mu^2 ||grad_x L||^2)`` (stds ``nu``, ``mu``)."""
    grad_h_sq = nonnegative("grad_h_sq", grad_h_sq, "a squared norm")
    grad_x_sq = positive("grad_x_sq", grad_x_sq, "the ratio divides by ||grad_x L||^2")
    nu = nonnegative("nu", nu, "the defense noise std")
    mu = positive("mu", mu, "the attacker's probe std; the ratio divides by it")
    return 2.0 * nu**2 * grad_h_sq / (mu**2 * grad_x_sq)


def opposite_action_probability(ratio):
    """Eq. (26): ``P = 1/2 + arctan(-ratio^{-1/2})/pi``, evaluated as the equal ``arctan(sqrt(ratio))/pi``.

    (``arctan(1/t) = pi/2 - arctan(t)`` for ``t > 0``.) 0 at ratio 0, 1/4 at 1, 1/2 as ratio -> inf.
    """
    xp = xp_of(ratio)
    ratio = nonnegative("ratio", ratio, "a ratio of variances")
    return xp.arctan(xp.sqrt(ratio)) / math.pi


def opposite_action_probabilities(model, params, x, cls, nu, mu, loss=None):
    """Eq. (26) at the input and every marked layer: ``{layer: (P f32[B], ratio f32[B])}``.

    ``nu`` is one std for every layer or a dict ``{layer: std}`` (``"input"`` for input noise);
    layers missing from the dict are skipped. ``mu`` is the attacker's probe std.
    """
    grads, _ = loss_gradients(model, params, x, cls, loss)
    sq = grad_sq_norms(grads)
    levels = nu if isinstance(nu, dict) else {n: nu for n in sq}
    out = {}
    for name, level in levels.items():
        if name not in sq:
            raise ValueError(f"unknown layer {name!r}; this model has {list(sq)}")
        r = noise_ratio(sq[name], sq["input"], level, mu)
        out[name] = (opposite_action_probability(r), r)
    return out


def conditional_flip_probability(h_mu, grad_h_sq, nu):
    """Sign-flip probability given the probe: ``Phi(-|h_mu| / (sqrt(2) nu ||grad_h L||))``.

    ``h_mu = L(x + u) - L(x)`` (clean); the noise adds ``grad_h L . (delta_1 - delta_2)`` (eq. 23).
    Averaging over ``u ~ N(0, mu^2 I)`` with ``h_mu ~ grad_x L . u`` gives eq. (26).
    """
    xp = xp_of(h_mu, grad_h_sq, nu)
    h_mu = real("h_mu", h_mu)
    grad_h_sq = nonnegative("grad_h_sq", grad_h_sq, "a squared norm")
    nu = positive("nu", nu, "the probability divides by the noise scale")
    return Phi(-xp.abs(h_mu) / (math.sqrt(2.0) * nu * xp.sqrt(grad_h_sq)))


def decision_flip_probability(r, g_d, directional_grad, grad_h_sq, nu):
    """Sec. 3.4, eq. (9): probability that one noisy check at radius ``r`` along ``d`` is wrong.

    ``L(f_rand(x + r d/||d||)) ~ (r - g(d)) grad_x L . d/||d|| + grad_h L . delta``; the check errs
    when the noise flips the sign of the first term: ``Phi(-|(r - g(d)) grad_x L . d_hat| /
    (nu ||grad_h L||))`` (one noisy query, no second noise to subtract).
    """
    xp = xp_of(r, g_d, directional_grad, grad_h_sq, nu)
    r, g_d = real("r", r), real("g_d", g_d)
    directional_grad = real("directional_grad", directional_grad)
    grad_h_sq = nonnegative("grad_h_sq", grad_h_sq, "a squared norm")
    nu = positive("nu", nu, "the probability divides by the noise scale")
    return Phi(-xp.abs((r - g_d) * directional_grad) / (nu * xp.sqrt(grad_h_sq)))


def accuracy_probability(loss_value, grad_h_sq, nu):
    """Sec. 3.5, eq. (14): ``P[L(g(h(x) + delta)) > 0] ~ Phi(L / (nu ||grad_h L||))`` per example.

    With the margin loss (positive iff correct) its mean over a test set is the randomized
    model's expected accuracy.
    """
    xp = xp_of(loss_value, grad_h_sq, nu)
    loss_value = real("loss_value", loss_value)
    grad_h_sq = nonnegative("grad_h_sq", grad_h_sq, "a squared norm")
    nu = positive("nu", nu, "the probability divides by the noise scale")
    return Phi(loss_value / (nu * xp.sqrt(grad_h_sq)))
