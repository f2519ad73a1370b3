"""Arrays are arguments: compile a pure function whose inputs mix arrays and static objects.

Scorers, oracles, attacks and runners are pytrees: a built-in scorer is a
:class:`jax.tree_util.Partial` of a module-level function whose arguments hold the model's
params, the training pool, the surrogate's weights, as leaves; a decision attack's ``step`` is a
``Partial`` holding its starting-point pool. Their other leaves are static: noise levels given
as Python numbers, names, flags, Flax modules, the functions themselves.

:func:`partition` splits any such pytree into its **array leaves** (``jax.Array`` / ``np.ndarray``
/ tracers) and a hashable **static part** (the tree structure and every other leaf), and
:func:`combine` puts them back together. :func:`jit` compiles ``fn(obj, *args)`` with the array
leaves of ``obj`` passed as arguments of the compiled program and its static part as a compile-time
constant, so compile time and program size do not grow with params or pools, and two objects of the
same structure (the same attack config against another model's params of the same shapes) share
one compiled program::

    run = pytree.jit(lambda runner, *inputs: runner(*inputs))
    out = run(make_runner(attack, oracle, clean, protocol), *cell_inputs(sel, keys))

A plain Python closure over arrays is still a valid scorer or attack, but its arrays are then
compiled into the program as constants: the built-in constructors avoid closures over arrays for
that reason. Python scalars are static (a noise level given as a float compiles to a constant, as
before); pass a ``jnp`` scalar to make it an argument instead (e.g. to sweep a level without
recompiling).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np


def is_array(x) -> bool:
    """A leaf that travels as an argument of the compiled program."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and not isinstance(x, (bool, int, float))


class _Hashed:
    """A static leaf, hashed by value when it can be and by identity otherwise."""

    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        try:
            hash(value)
            self._key = ("v", type(value), value)
        except TypeError:
            self._key = ("id", id(value))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        if not isinstance(other, _Hashed) or type(self.value) is not type(other.value):
            return False
        if self._key[0] == "id" or other._key[0] == "id":
            return self.value is other.value
        try:
            return bool(self.value == other.value)
        except Exception:  # a value whose == is not a plain bool
            return self.value is other.value


class Static:
    """The static part of a pytree: its structure and its non-array leaves (hashable)."""

    __slots__ = ("treedef", "leaves", "_hash")

    def __init__(self, treedef, leaves):
        self.treedef = treedef
        self.leaves = tuple(None if leaf is None else _Hashed(leaf) for leaf in leaves)
        self._hash = hash((treedef, self.leaves))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Static) and self.treedef == other.treedef and self.leaves == other.leaves


def partition(tree) -> tuple[list, Static]:
    """``(arrays, static)``: the array leaves of ``tree`` (``None`` in the other slots) and its static part."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = [leaf if is_array(leaf) else None for leaf in leaves]
    static = Static(treedef, [None if is_array(leaf) else leaf for leaf in leaves])
    return arrays, static


def combine(arrays, static: Static):
    """Inverse of :func:`partition`."""
    leaves = [a if s is None else s.value for a, s in zip(arrays, static.leaves)]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


def n_bytes(tree) -> int:
    """Bytes of the array leaves of ``tree`` (what travels as arguments)."""
    return int(sum(np.asarray(a).nbytes if not isinstance(a, jax.Array) else a.nbytes
                   for a in partition(tree)[0] if a is not None))


def _combined(fn, static, arrays, *args):
    return fn(combine(arrays, static), *args)


_SHARED = jax.jit(_combined, static_argnums=(0, 1))


def _shift(spec, n: int):
    """Shift ``jax.jit`` argument-position options past the two leading (fn, static) arguments."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return spec + n
    return tuple(int(i) + n for i in spec)


_BY_OPTIONS: dict = {}


class _Compiled:
    """What :func:`jit` returns: call it, or ``lower`` it (e.g. to pass XLA compiler options)."""

    def __init__(self, fn: Callable, **jit_kwargs):
        self._fn = fn
        if set(jit_kwargs) == {"compiler_options"} and jit_kwargs["compiler_options"] is None:
            jit_kwargs = {}
        if set(jit_kwargs) == {"compiler_options"}:  # one shared cache per set of options
            key = tuple(sorted(jit_kwargs["compiler_options"].items()))
            if key not in _BY_OPTIONS:
                _BY_OPTIONS[key] = jax.jit(_combined, static_argnums=(0, 1), compiler_options=dict(key))
            self._jitted = _BY_OPTIONS[key]
        elif jit_kwargs:
            kw = dict(jit_kwargs)
            for name in ("static_argnums", "donate_argnums"):
                if name in kw:  # positions counted in (obj, *args): obj's arrays sit at position 2
                    kw[name] = _shift(kw[name], 2)
            if "in_shardings" in kw:
                raise ValueError("pytree.jit does not take in_shardings: place the arguments instead")
            self._jitted = jax.jit(_combined, static_argnums=(0, 1) + tuple(kw.pop("static_argnums", ()) or ()), **kw)
        else:
            self._jitted = _SHARED
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, obj, *args):
        arrays, static = partition(obj)
        return self._jitted(self._fn, static, arrays, *args)

    def lower(self, obj, *args):
        arrays, static = partition(obj)
        lowered = self._jitted.lower(self._fn, static, arrays, *args)
        return _Lowered(lowered, arrays)


class _Lowered:
    def __init__(self, lowered, arrays):
        self._lowered, self._arrays = lowered, arrays

    def as_text(self) -> str:
        return self._lowered.as_text()

    def compile(self, compiler_options: dict | None = None):
        compiled = self._lowered.compile(compiler_options=compiler_options)
        arrays = self._arrays
        return lambda *args: compiled(arrays, *args)


def jit(fn: Callable[..., Any], **jit_kwargs) -> _Compiled:
    """Compile ``fn(obj, *args)`` with the array leaves of ``obj`` as program arguments (module docstring).

    ``fn`` must be a module-level function or one stable object (it is part of the compile-cache key);
    ``args`` are ordinary jit arguments (arrays or pytrees of arrays). ``jit_kwargs`` go to ``jax.jit``
    (e.g. ``out_shardings``); without them every caller shares one cache.
    """
    return _Compiled(fn, **jit_kwargs)


FAST_CPU_COMPILE = {"xla_llvm_disable_expensive_passes": True}
"""XLA options that turn LLVM's expensive passes off on the CPU. Measured on 2 cores: a ResNet-50 forward
alone compiles in 0.9 s instead of 1.2 s and runs as fast; whole attack programs at 224x224 (HSJA,
Sign-OPT, GeoDA) compile no faster (``benchmarks.scale --xla fast``): their time goes elsewhere."""


def fast_compile() -> dict | None:
    """:data:`FAST_CPU_COMPILE` on the CPU backend, ``None`` (XLA's defaults) elsewhere."""
    return dict(FAST_CPU_COMPILE) if jax.default_backend() == "cpu" else None


def call(obj, *args):
    """``obj(*args)`` compiled with :func:`jit` (the shared, cached program for ``obj``'s structure)."""
    return _CALL(obj, *args)


def apply(obj, *args):
    """``obj(*args)``: the function :func:`call` compiles (pass it to :func:`jit` with options)."""
    return obj(*args)


_CALL = _Compiled(apply)


def compiled(obj):
    """``obj`` (a pytree callable, e.g. a scorer) as a function that runs it compiled with :func:`call`."""
    return functools.partial(call, obj)


def place(tree, sharding):
    """``tree`` with its array leaves put on ``sharding`` (e.g. replicated over a mesh); the rest as is."""
    arrays, static = partition(tree)
    return combine([None if a is None else jax.device_put(a, sharding) for a in arrays], static)
