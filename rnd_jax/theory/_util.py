"""Shared helpers of :mod:`rnd_jax.theory`: argument checks, array namespace, normal cdf, dB.

**Array namespace.** Every closed form computes with numpy/scipy (float64, nothing to compile)
when its arguments are Python numbers or numpy arrays, and with ``jax.numpy`` (traceable: use it
under ``jit``/``vmap``/``grad``) as soon as one argument is a jax array. :func:`xp_of` picks the
namespace; :func:`Phi`, :func:`Phi_inv`, :func:`log_Phi`, :func:`erf` and :func:`db` follow the type
of their argument.

**Checks.** Every public closed form validates its arguments when they are concrete (Python
numbers, numpy or concrete jax arrays) and raises ``ValueError`` naming the argument, the allowed
range and the offending value. Traced arguments cannot be inspected and pass through unchecked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special as sps
from jax.scipy import special as jsps

__all__ = ["Phi", "Phi_inv", "db", "erf", "from_db", "log_Phi", "xp_of"]


def xp_of(*arrays):
    """``jax.numpy`` if any argument is a jax array (or tracer), else ``numpy``."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


def _concrete(x):
    """``x`` as a float64 numpy array, or None when it is traced (cannot be checked)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"expected a real number or array, got {x!r}") from None


def _fmt(v: np.ndarray) -> str:
    if v.ndim == 0:
        return repr(float(v))
    return f"{v.ravel()[:4].tolist()}{' ...' if v.size > 4 else ''}"


def check(name: str, x, *, lo=None, hi=None, lo_open=True, hi_open=True, finite=True, what=""):
    """Return ``x`` (a jax array, or else a float64 numpy array) after checking every concrete
    entry lies in the interval.

    ``lo``/``hi`` are bounds (None: unbounded), ``lo_open``/``hi_open`` whether they are excluded.
    ``what`` says in words why the formula needs the range; it goes into the error message.
    """
    v = _concrete(x)
    if v is not None:
        bad = np.isnan(v)
        if finite:
            bad |= ~np.isfinite(v)
        if lo is not None:
            bad |= (v <= lo) if lo_open else (v < lo)
        if hi is not None:
            bad |= (v >= hi) if hi_open else (v > hi)
        if np.any(bad):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            why = f" ({what})" if what else ""
            raise ValueError(f"{name} must lie in {left}{lo_s}, {hi_s}{right}{why}; got {_fmt(v[bad])}")
    if _is_jax(x):
        return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))
    return np.asarray(x, np.float64)


def positive(name, x, what=""):
    return check(name, x, lo=0.0, what=what)


def nonnegative(name, x, what=""):
    return check(name, x, lo=0.0, lo_open=False, what=what)


def probability(name, x, what=""):
    """A probability in (0, 1] (a softmax output, which may be exactly 1 but never 0 for a log)."""
    return check(name, x, lo=0.0, hi=1.0, hi_open=False, what=what)


def open_unit(name, x, what=""):
    """A probability in (0, 1) (a tail probability or confidence level such as epsilon or K)."""
    return check(name, x, lo=0.0, hi=1.0, what=what)


def real(name, x):
    return check(name, x)


def Phi(z):
    """Standard normal cdf."""
    return jsps.ndtr(z) if _is_jax(z) else sps.ndtr(z)


def log_Phi(z):
    """``log Phi(z)``, accurate in the lower tail."""
    return jsps.log_ndtr(z) if _is_jax(z) else sps.log_ndtr(z)


def Phi_inv(p):
    """Inverse standard normal cdf (probit)."""
    return jsps.ndtri(p) if _is_jax(p) else sps.ndtri(p)


def erf(z):
    return jsps.erf(z) if _is_jax(z) else sps.erf(z)


def db(x):
    """``10 log10(x)`` (a power ratio in decibels)."""
    return 10.0 * xp_of(x).log10(x)


def from_db(x_db):
    """Inverse of :func:`db`."""
    return 10.0 ** (x_db / 10.0)
