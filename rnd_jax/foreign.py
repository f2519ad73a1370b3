"""Foreign models: any classifier with a host-side ``predict`` is a scorer every attack can query.

::

    model = HostModel(predict, num_classes=10, outputs="probs")   # predict(np.ndarray[B, H, W, C]) -> [B, K]
    scorer = host_scorer(model)                                  # (x, keys) -> f32[B, K], a pytree
    defended = output_noise(scorer, 0.01)                        # defenses compose as on any scorer

``predict`` receives float32 images ``[B, H, W, C]`` in ``[0, 1]`` (NumPy) and returns probabilities
(``outputs="probs"``) or logits (``outputs="logits"``: the scorer applies the softmax) as anything
``np.asarray`` reads: a NumPy or scikit-learn model, a PyTorch module (:func:`torch_predict`), an ONNX
Runtime session, a remote API.

The scorer calls ``predict`` through ``jax.pure_callback`` with ``vmap_method="broadcast_all"``: the
vmapped driver sends **one host call per oracle call for all images** (the batch's points are
concatenated), not one per image, and only the **live** points (:func:`rnd_jax.oracle.live`): under
``vmap`` the driver's loop keeps evaluating images that have stopped, and a ``while_loop`` / ``cond``
inside a step evaluates lanes that are not running; those points never reach ``predict`` (their answer is
unused and is filled with zeros). So :attr:`HostModel.points` counts exactly the points the driver
counts (``Result.queries``, plus ``check_queries`` when the stop rule's checks ask this scorer), and
:attr:`HostModel.calls` the host round trips.

A host model is a static part of the compiled program (hashed by identity): recompiling is needed
only for another model object. Everything else about the scorer is as for a JAX model: one key per
point (unused by a deterministic model), noise from defenses wrapped around it.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from rnd_jax.oracle import live

OUTPUTS = ("probs", "logits")


class HostModel:
    """A host-side classifier and its counters (module docstring).

    ``batch_size`` (optional) splits each host call into ``predict`` calls of at most that many points
    (a remote API's request limit, a GPU's memory); ``calls`` counts host round trips, ``predict_calls``
    the calls of ``predict``.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], num_classes: int, outputs: str = "probs",
                 batch_size: int | None = None):
        if not callable(predict):
            raise ValueError("predict must be a callable np.ndarray[B, H, W, C] -> [B, K]")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if outputs not in OUTPUTS:
            raise ValueError(f"unknown outputs {outputs!r}; choose one of {OUTPUTS}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.predict, self.num_classes, self.outputs, self.batch_size = predict, num_classes, outputs, batch_size
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.points = 0  # points sent to predict
        self.calls = 0  # host round trips that sent at least one point
        self.predict_calls = 0

    def __repr__(self) -> str:
        return f"HostModel({getattr(self.predict, '__name__', type(self.predict).__name__)}, K={self.num_classes})"

    def _predict(self, x: np.ndarray) -> np.ndarray:
        chunks = [x] if self.batch_size is None else [x[i:i + self.batch_size] for i in range(0, len(x),
                                                                                           self.batch_size)]
        outs = []
        for c in chunks:
            out = np.asarray(self.predict(c), np.float32)
            self.predict_calls += 1
            if out.shape != (len(c), self.num_classes):
                raise ValueError(f"predict returned shape {out.shape} for {len(c)} images; expected "
                                 f"({len(c)}, {self.num_classes})")
            if not np.all(np.isfinite(out)):
                raise ValueError(f"predict returned non-finite {self.outputs} for "
                                 f"{int(np.sum(~np.isfinite(out).all(1)))} of {len(c)} images")
            outs.append(out)
        return np.concatenate(outs)

    def answer(self, x, mask) -> np.ndarray:
        """Host side: answer the live rows of ``x`` (leading dims ``[..., B]``), zeros elsewhere."""
        x, mask = np.asarray(x, np.float32), np.asarray(mask, bool)
        lead = x.shape[:-3]
        flat = x.reshape((-1,) + x.shape[-3:])
        keep = np.broadcast_to(mask, lead).reshape(-1)
        out = np.zeros((flat.shape[0], self.num_classes), np.float32)
        n = int(keep.sum())
        if n:
            out[keep] = self._predict(np.ascontiguousarray(flat[keep]))
            self.points += n
            self.calls += 1
        return out.reshape(lead + (self.num_classes,))


def _host_scores(model: HostModel, x, keys):
    del keys
    pred = live()
    mask = jnp.ones(x.shape[:1], bool) if pred is None else jnp.broadcast_to(pred, x.shape[:1])
    shape = jax.ShapeDtypeStruct(x.shape[:1] + (model.num_classes,), jnp.float32)
    out = jax.pure_callback(model.answer, shape, x.astype(jnp.float32), mask, vmap_method="broadcast_all")
    return jax.nn.softmax(out, axis=-1) if model.outputs == "logits" else out


def host_scorer(model: HostModel | Callable, num_classes: int | None = None, outputs: str = "probs",
                batch_size: int | None = None):
    """The scorer of a :class:`HostModel` (or of a ``predict`` function, wrapped with the other arguments)."""
    if not isinstance(model, HostModel):
        if num_classes is None:
            raise ValueError("host_scorer(predict, num_classes=K): the class count is needed to trace the callback")
        model = HostModel(model, num_classes, outputs, batch_size)
    return Partial(_host_scores, model)


def separately_compiled(model, params, input_shape, batch_size: int | None = None):
    """A Flax model compiled once on its own, queried by attack programs through the host callback.

    An attack program inlines the model at every point it queries it (HSJA: the start search, two
    boundary searches, the gradient estimate, the step search, the success checks), and XLA compiles
    each copy: with a ResNet-50 at 224x224 that is most of the program's compile time. Through this
    scorer the program holds none of them: the model is compiled once per batch size (the live points of
    an oracle call, padded to a power of two) and each oracle call runs it on the live points only. The price is a copy of the points to the host and back per
    oracle call (cheap on a CPU, a transfer on an accelerator).

    Known limit: its ``predict`` runs a JAX program from inside the attack's program. On a CPU, an
    attack whose step makes several oracle calls that XLA may run at once (GenAttack's) can leave
    every XLA worker thread inside a callback, each waiting for a program that has no thread left to
    run on (seen on 2 cores: GenAttack under output noise hangs). The attacks of ``benchmarks.scale``
    (NES, Square, SimBA-DCT, HSJA, Sign-OPT, GeoDA, RayS) run through it; a ``predict`` that runs no
    JAX (NumPy, PyTorch, a remote API) is not affected.
    """
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    k = jax.eval_shape(fwd, params, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)).shape[-1]

    def predict(x: np.ndarray) -> np.ndarray:
        n = len(x)
        size = 1 << max(0, (n - 1).bit_length())  # padded to a power of two: a few batch shapes, a few compiles
        if size > n:
            x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
        return np.asarray(fwd(params, x))[:n]

    predict.__name__ = type(model).__name__
    return host_scorer(HostModel(predict, int(k), "logits", batch_size))


# ----------------------------------------------------------------------------- PyTorch


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("PyTorch is not installed: pip install 'rnd_jax[torch]' (CPU: pip install torch)") from None
    return torch


def torch_predict(module, device: str = "cpu", channels_last: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` for a PyTorch ``nn.Module`` (eval mode, no grad): NHWC [0, 1] float32 in, its outputs out.

    The module receives NCHW float32 tensors on ``device`` (NHWC with ``channels_last=True``); put any
    normalisation inside the module, so the attack keeps its [0, 1] interface.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(module).__name__}")
    module.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.from_numpy(np.array(x, np.float32)).to(device)  # a writable copy
            if not channels_last:
                t = t.permute(0, 3, 1, 2)
            return module(t).float().cpu().numpy()

    predict.__name__ = type(module).__name__
    return predict


def torch_scorer(module, num_classes: int, outputs: str = "logits", device: str = "cpu",
                 channels_last: bool = False, batch_size: int | None = None):
    """The scorer of a PyTorch classifier (logits by default), through :func:`torch_predict`."""
    return host_scorer(HostModel(torch_predict(module, device, channels_last), num_classes, outputs, batch_size))


def sklearn_predict(estimator, image_shape) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` for a fitted scikit-learn classifier on flattened images (its ``predict_proba``)."""
    if not hasattr(estimator, "predict_proba"):
        raise ValueError(f"{type(estimator).__name__} has no predict_proba")
    d = math.prod(image_shape)

    def predict(x: np.ndarray) -> np.ndarray:
        return estimator.predict_proba(x.reshape(len(x), d))

    predict.__name__ = type(estimator).__name__
    return predict
