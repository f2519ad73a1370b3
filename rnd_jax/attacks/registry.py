"""The attack registry: every attack module registers an :class:`AttackSpec` when imported.

``rnd_jax.attacks`` imports every module of ``rnd_jax/attacks/score/``, ``rnd_jax/attacks/decision/``
and ``rnd_jax/attacks/whitebox/`` (attacks that ask ``"gradient"`` queries), so adding an attack is adding one module that ends with::

    register(AttackSpec(name="zoo", config=ZOOConfig, build=zoo, family="score",
                        battery=dict(norm="l2", eps=..., budget=...)))

``build(cfg, ctx)`` receives the validated config and a :class:`Context` with what some attacks need
besides the oracle (training images to start decision attacks from, a surrogate model for
transfer priors); attacks that need nothing ignore it. ``battery`` holds the config overrides and
the query budget with which the registry-driven test battery runs the attack on the undefended
digits model (the attack's documented budget and eps; the same eps for all attacks of a norm).

**Field types are checked for every registered config.** :func:`register` makes the config class check
each field against its annotation (:func:`check_fields`) before the class's own ``__post_init__``, so a
config refuses, with a ``ValueError`` naming the field, a value of the wrong type (a string, ``None``
where the field is not optional, a bool where a number is expected, a float where an int is), a
float that is not finite in float32 (the attacks' precision) or is a nonzero float below its smallest
normal number, or an int outside int32, however it is built (``make_attack`` or the class itself).
The class's own checks then judge the ranges.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable

import numpy as np

from rnd_jax.attacks.driver import INT32_MAX, Attack

FAMILIES = ("score", "decision", "whitebox")

# Battery radii shared by every attack of a norm (digits 8x8 in [0, 1]).
BATTERY_EPS = {"linf": 0.3, "l2": 2.0}

# Training seeds of the models in ``Context.surrogates``, as offsets from the attacked model's seed (P-RGF's
# one ``Context.surrogate`` is offset 1): the sweeps and experiments train them on the training split.
SURROGATE_OFFSETS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Context:
    """Side information an attack constructor may use (never the defended model itself)."""

    train_images: Any = None  # f32[N, H, W, C]: a pool to start targeted decision attacks from
    train_labels: Any = None  # i32[N]
    num_classes: int = 10
    surrogate: Any = None  # a clean scorer of a separately trained model (transfer priors)
    autoencoder: Any = None  # the decoder of an autoencoder of the training images (rnd_jax.autoencoder.Decoder)
    surrogates: Any = None  # a tuple of clean scorers of separately trained models (Subspace's references)

    def __post_init__(self):
        k = self.num_classes
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 2 <= k <= INT32_MAX:
            raise ValueError(f"Context.num_classes must be an int >= 2, got {k!r}")
        if (self.train_images is None) != (self.train_labels is None):
            raise ValueError("Context needs train_images and train_labels together (or neither)")
        if self.train_images is not None:
            xs, ys = np.shape(self.train_images), np.shape(self.train_labels)
            if len(xs) != 4 or ys != xs[:1]:
                raise ValueError(f"Context.train_images must be f32[N, H, W, C] and train_labels i32[N]; got shapes "
                                 f"{xs} and {ys}")
        if self.surrogate is not None and not callable(self.surrogate):
            raise ValueError("Context.surrogate must be a scorer (x, keys) -> probabilities")
        if self.autoencoder is not None and not (callable(self.autoencoder) and all(
                isinstance(getattr(self.autoencoder, a, None), tuple) for a in ("latent_shape", "image_shape"))):
            raise ValueError("Context.autoencoder must be a decoder z -> D(z) with latent_shape and image_shape "
                             "(rnd_jax.autoencoder.Decoder)")
        if self.surrogates is not None:
            if not (isinstance(self.surrogates, (tuple, list)) and self.surrogates
                    and all(callable(s) for s in self.surrogates)):
                raise ValueError("Context.surrogates must be a non-empty tuple of scorers (x, keys) -> probabilities")
            object.__setattr__(self, "surrogates", tuple(self.surrogates))


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    name: str
    config: type  # frozen dataclass validated in __post_init__
    build: Callable[[Any, Context], Attack]
    family: str  # "score", "decision" or "whitebox" (gradient queries)
    battery: dict = dataclasses.field(default_factory=dict)  # config overrides + "budget"
    supports_targeted: bool = True
    supports_untargeted: bool = True
    needs: tuple[str, ...] = ()  # Context fields the constructor requires
    bad_configs: tuple[dict, ...] = ()  # config kwargs that must raise ValueError (battery-checked)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"attack family must be one of {FAMILIES}, got {self.family!r}")


ATTACKS: dict[str, AttackSpec] = {}

FLOAT32_MAX = float(np.finfo(np.float32).max)  # attacks compute in float32: a larger float is inf there
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smaller nonzero magnitudes are subnormal or 0 there
_NUMBERS = {bool: (bool, np.bool_), int: (int, np.integer), float: (int, float, np.integer, np.floating),
            str: (str,)}
_NAMES = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}


def _field_type(annotation):
    """(base type among bool/int/float/str or None when unchecked, optional?) of a field annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 and rest[0] in _NUMBERS else None), len(rest) < len(args)
    return (annotation if annotation in _NUMBERS else None), False


def check_field(owner: str, name: str, annotation, value) -> None:
    """``ValueError`` unless ``value`` fits the field annotation ``annotation`` (module docstring)."""
    base, optional = _field_type(annotation)
    if base is None or (value is None and optional):
        return
    ok = isinstance(value, _NUMBERS[base])
    if base is not bool and isinstance(value, (bool, np.bool_)):
        ok = False
    if ok and base is int:
        ok = -INT32_MAX <= value <= INT32_MAX
    if ok and base is float:  # finite in float32, and not a nonzero value that float32 rounds to 0
        v = float(value)
        ok = math.isfinite(v) and abs(v) <= FLOAT32_MAX and (v == 0 or abs(v) >= FLOAT32_TINY)
    if not ok:
        extra = {int: " (within int32)", float: " (in float32: 0 or of magnitude 1.2e-38 .. 3.4e38)"}.get(base, "")
        raise ValueError(f"{owner}.{name} must be {_NAMES[base]}{extra}{' or None' if optional else ''}, "
                         f"got {value!r}")


_HINTS: dict[type, dict] = {}


def check_fields(cfg) -> None:
    """Check every field of the dataclass instance ``cfg`` against its annotation (:func:`check_field`)."""
    cls = type(cfg)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    hints = _HINTS[cls]
    for f in dataclasses.fields(cfg):
        check_field(cls.__name__, f.name, hints.get(f.name), getattr(cfg, f.name))


def _checked(config: type) -> type:
    """Make ``config`` run :func:`check_fields` before its own ``__post_init__`` (once per class)."""
    own = getattr(config, "__post_init__", None)
    if getattr(own, "_checks_fields", None) is config:
        return config

    def __post_init__(self):
        check_fields(self)
        if own is not None:
            own(self)

    __post_init__._checks_fields = config
    config.__post_init__ = __post_init__
    return config


def register(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS and ATTACKS[spec.name] is not spec:
        raise ValueError(f"attack {spec.name!r} registered twice")
    if not (isinstance(spec.config, type) and dataclasses.is_dataclass(spec.config)):
        raise ValueError(f"attack {spec.name!r}: config must be a dataclass, got {spec.config!r}")
    _checked(spec.config)
    ATTACKS[spec.name] = spec
    return spec


def get_spec(name: str) -> AttackSpec:
    if not isinstance(name, str) or name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name]


def make_attack(name: str, ctx: Context | None = None, **config) -> Attack:
    """Build a registered attack from keyword config (validated by its frozen config class)."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attack {name!r}; valid: {sorted(fields)}")
    if ctx is not None and not isinstance(ctx, Context):
        raise ValueError(f"ctx must be a Context or None, got {type(ctx).__name__}")
    ctx = ctx or Context()
    missing = [f for f in spec.needs if getattr(ctx, f) is None]
    if missing:
        raise ValueError(f"attack {name!r} needs {missing} in its Context")
    return spec.build(spec.config(**config), ctx)
