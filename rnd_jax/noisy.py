"""Noise layers trained into a classifier: Random Self-Ensemble and Parametric Noise Injection.

Both defenses are *architectures*: the noise is part of the network during training and at inference.
:func:`noisy_model` turns any classifier of :mod:`rnd_jax.models` (a Flax module that marks its hidden
layers with ``self.perturb``) into a subclass of its own class with the same fields plus the noise
configuration, so its parameters are the base model's plus the trainable noise scales, and

* ``model.apply({"params": p}, x)`` is the network **without** noise (the deterministic net);
* ``model.apply({"params": p}, x, rngs={"noise": key})`` draws every noise of one forward pass from ``key``.

Random Self-Ensemble (RSE; X. Liu, M. Cheng, H. Zhang, C.-J. Hsieh, "Towards Robust Neural Networks via
Random Self-ensemble", ECCV 2018): a noise layer before each convolution, ``h + N(0, sigma^2 I)``, with a
larger std ``rse_init`` on the input (before the first convolution) than the std ``rse_inner`` before
the others (the paper's CIFAR-10 setting, as SND quotes it: 0.2 and 0.1). The inner noise sits at the marks
that feed a convolution (:data:`RSE_LAYERS`: ``conv1`` of ``digits_cnn`` and ``mnist_cnn``, ``conv1`` ...
``conv6`` of ``cifar10_cnn``; every mark for a model not listed). The network is trained with the noise on,
and at inference the prediction is the mean of the probabilities of several noisy passes (the ensemble:
:func:`rnd_jax.defenses.rse`).

Parametric Noise Injection (PNI; Z. He, A. S. Rakin, D. Fan, "Parametric Noise Injection: Trainable
Randomness to Improve Deep Neural Network Robustness against Adversarial Attack", CVPR 2019, Eq. 2-3):
``v + alpha * eta`` with ``eta ~ N(0, std(v)^2)``, the std taken without gradient and ``alpha`` a trainable
scale (initialised to ``pni_init`` = 0.25, the authors' value), on

* weights (PNI-W, the paper's default): every convolution and dense kernel of the top-level network,
  ``std`` the std of the kernel, ``alpha`` one scalar per layer (layer-wise, the paper) or one per output
  channel (``pni_channelwise``, the authors' code's channel-wise variant);
* activations (PNI-A): the marked activations, ``std`` the std of each example's activation (the authors
  take the std of the whole batch tensor; per example, a query's noise never depends on its batch).

The scales only stay away from zero under adversarial training (:mod:`rnd_jax.train`, ``adv_eps``), as the
paper says; the noise stays on at inference (:func:`rnd_jax.defenses.pni`).

Parameter names: ``pni_w_<layer>`` (weight scales of the child module ``<layer>``, e.g. ``pni_w_Conv_0``) and
``pni_a_<mark>`` (activation scales), at the top level of ``params``. RSE adds no parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["NOISE_RNG", "PNI_KINDS", "RSE_LAYERS", "has_noise", "noise_config", "noisy_model", "recording_model",
           "marked_values"]

NOISE_RNG = "noise"
"""The rng stream of the noise layers: ``apply(..., rngs={"noise": key})``."""

PNI_KINDS = ("", "weight", "activation", "both")
"""PNI variants: none, PNI-W (weights), PNI-A (marked activations), both."""

RSE_LAYERS: dict[str, tuple[str, ...]] = {
    "digits_cnn": ("conv1",),
    "mnist_cnn": ("conv1",),
    "cifar10_cnn": ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6"),
}
"""Model name -> the marks that are the input of a convolution (RSE's inner noise layers)."""

_NOISE_FIELDS = ("rse_init", "rse_inner", "rse_layers", "pni_weights", "pni_acts", "pni_init", "record")


def _noisy_perturb(self, name, value, collection="perturbations"):
    value = nn.Module.perturb(self, name, value, collection)
    if self.record:
        self.sow("intermediates", name, value)
    noisy = self.has_rng(NOISE_RNG)
    if name in self.rse_layers and self.rse_inner > 0 and noisy:
        value = value + self.rse_inner * jax.random.normal(self.make_rng(NOISE_RNG), value.shape, value.dtype)
    if name in self.pni_acts:
        alpha = self.param(f"pni_a_{name}", nn.initializers.constant(self.pni_init), (), jnp.float32)
        if noisy:
            std = jax.lax.stop_gradient(jnp.std(value.reshape(value.shape[0], -1), axis=1))
            std = std.reshape((-1,) + (1,) * (value.ndim - 1))
            eta = jax.random.normal(self.make_rng(NOISE_RNG), value.shape, value.dtype)
            value = value + alpha.astype(value.dtype) * std * eta
    return value


def _noisy_call(self, x, train: bool = False):
    noisy = self.has_rng(NOISE_RNG)
    if self.rse_init > 0 and noisy:
        x = x + self.rse_init * jax.random.normal(self.make_rng(NOISE_RNG), x.shape, x.dtype)
    call = super(type(self), self).__call__
    if not self.pni_weights:
        return call(x, train)
    table = {n: (i, size) for i, (n, size) in enumerate(self.pni_weights)}
    key = self.make_rng(NOISE_RNG) if noisy else None
    top = self

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if (context.method_name != "__call__" or not isinstance(mod, (nn.Conv, nn.Dense)) or mod.name not in table
                or mod.scope is None or tuple(mod.scope.path[:-1]) != tuple(top.scope.path)):
            return next_fun(*args, **kwargs)
        index, size = table[mod.name]
        alpha = top.param(f"pni_w_{mod.name}", nn.initializers.constant(top.pni_init), () if size == 1 else (size,),
                          jnp.float32)
        y = next_fun(*args, **kwargs)
        if key is None:
            return y
        w = mod.get_variable("params", "kernel")
        std = jax.lax.stop_gradient(jnp.std(w))
        delta = alpha.astype(w.dtype) * std * jax.random.normal(jax.random.fold_in(key, index), w.shape, w.dtype)
        # Convolutions and dense layers are linear in the kernel: y(w + delta) = y(w) + y_without_bias(delta).
        linear = mod.clone(parent=None, name=None, use_bias=False)
        return y + linear.apply({"params": {"kernel": delta}}, args[0])

    with nn.intercept_methods(interceptor):
        return call(x, train)


@functools.lru_cache(maxsize=None)
def _noisy_class(cls):
    """The subclass of ``cls`` with the noise fields (one per base class, so equal configs are equal modules)."""
    attrs = {
        "__annotations__": {"rse_init": float, "rse_inner": float, "rse_layers": tuple, "pni_weights": tuple,
                            "pni_acts": tuple, "pni_init": float, "record": bool},
        "rse_init": 0.0, "rse_inner": 0.0, "rse_layers": (), "pni_weights": (), "pni_acts": (), "pni_init": 0.25,
        "record": False, "perturb": _noisy_perturb, "__call__": _noisy_call,
        "__doc__": f"{cls.__name__} with trained noise layers (see :mod:`rnd_jax.noisy`).",
        "__module__": __name__,
    }
    return type(f"Noisy{cls.__name__}", (cls,), attrs)


def _base_fields(model: nn.Module) -> tuple[type, dict]:
    cls = type(model)
    if getattr(cls, "__module__", None) == __name__ and hasattr(model, "rse_init"):
        cls = cls.__mro__[1]
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name") and f.name not in _NOISE_FIELDS}
    return cls, fields


def _std(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def noisy_model(model: nn.Module, input_shape, *, rse_init=0.0, rse_inner=0.0, rse_layers=None, pni: str = "",
                pni_init=0.25, pni_channelwise: bool = False, model_name: str | None = None) -> nn.Module:
    """``model`` with RSE and/or PNI noise layers (see the module docstring); validated, shapes only.

    ``input_shape``: per-example ``(H, W, C)``. ``rse_layers``: the marks that get the inner noise (default:
    :data:`RSE_LAYERS` of ``model_name``, else every mark). ``pni``: one of :data:`PNI_KINDS`. Returns the
    model itself when no noise is asked for.
    """
    from rnd_jax.models import perturb_names

    rse_init, rse_inner = _std("rse_init", rse_init), _std("rse_inner", rse_inner)
    pni_init = _std("pni_init", pni_init)
    if pni not in PNI_KINDS:
        raise ValueError(f"unknown PNI kind {pni!r}; choose one of {PNI_KINDS}")
    if not isinstance(pni_channelwise, bool):
        raise ValueError(f"pni_channelwise must be a bool, got {pni_channelwise!r}")
    cls, fields = _base_fields(model)
    if rse_init == 0 and rse_inner == 0 and not pni:
        return cls(**fields)
    marks = perturb_names(cls(**fields), input_shape)
    if rse_layers is None:
        rse_layers = RSE_LAYERS.get(model_name, marks) if rse_inner > 0 else ()
    if isinstance(rse_layers, str) or not all(isinstance(n, str) for n in rse_layers):
        raise ValueError(f"rse_layers must be a list of mark names, got {rse_layers!r}")
    unknown = [n for n in rse_layers if n not in marks]
    if unknown:
        raise ValueError(f"unknown RSE layer(s) {unknown}; this model marks {list(marks)}")
    weights = ()
    if pni in ("weight", "both"):
        x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.float32)
        params = jax.eval_shape(functools.partial(cls(**fields).init, jax.random.key(0)), x)["params"]
        weights = tuple((n, int(v["kernel"].shape[-1]) if pni_channelwise else 1) for n, v in params.items()
                        if isinstance(v, dict) and "kernel" in v)
        if not weights:
            raise ValueError("PNI on weights needs top-level convolution or dense layers with a 'kernel'")
    acts = tuple(marks) if pni in ("activation", "both") else ()
    return _noisy_class(cls)(**fields, rse_init=rse_init, rse_inner=rse_inner, rse_layers=tuple(rse_layers),
                             pni_weights=weights, pni_acts=acts, pni_init=pni_init)


def has_noise(model) -> bool:
    """Whether ``model`` has noise layers (:func:`noisy_model`)."""
    c = noise_config(model)
    return bool(c["rse_init"] or c["rse_inner"] or c["pni_weights"] or c["pni_acts"])


def noise_config(model) -> dict:
    """The noise fields of ``model`` (all zero / empty for a model without noise layers)."""
    return {k: getattr(model, k, d) for k, d in (("rse_init", 0.0), ("rse_inner", 0.0), ("rse_layers", ()),
                                                  ("pni_weights", ()), ("pni_acts", ()))}


def recording_model(model: nn.Module) -> nn.Module:
    """``model`` (noise layers kept) that also sows the value of every mark into ``"intermediates"``."""
    cls, fields = _base_fields(model)
    noise = {k: getattr(model, k) for k in _NOISE_FIELDS if hasattr(model, k) and k != "record"}
    return _noisy_class(cls)(**fields, **noise, record=True)


def marked_values(model: nn.Module, params, x, rngs=None) -> dict:
    """``{mark: value}`` of every marked activation of ``model`` on the batch ``x`` (the values the next layer
    would see before any perturbation is added; noise layers draw from ``rngs`` when given)."""
    _, state = recording_model(model).apply({"params": params}, x, rngs=rngs or {}, mutable=["intermediates"])
    return {k: v[0] for k, v in state["intermediates"].items()}
