"""The attack registry: every attack module registers an :class:`AttackSpec` when imported.

``rnd_jax.attacks`` imports every module of ``rnd_jax/attacks/score/`` and
``rnd_jax/attacks/decision/``, so adding an attack is adding one module that ends with::

    register(AttackSpec(name="zoo", config=ZOOConfig, build=zoo, family="score",
                        battery=dict(norm="l2", eps=..., budget=...)))

``build(cfg, ctx)`` receives the validated config and a :class:`Context` with what some attacks need
besides the oracle (training images to start decision attacks from, a surrogate model for
transfer priors); attacks that need nothing ignore it. ``battery`` holds the config overrides and
the query budget with which the registry-driven test battery runs the attack on the undefended
digits model (the attack's documented budget and eps; the same eps for all attacks of a norm).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from rnd_jax.attacks.driver import Attack

FAMILIES = ("score", "decision")

# Battery radii shared by every attack of a norm (digits 8x8 in [0, 1]).
BATTERY_EPS = {"linf": 0.3, "l2": 2.0}


@dataclasses.dataclass(frozen=True)
class Context:
    """Side information an attack constructor may use (never the defended model itself)."""

    train_images: Any = None  # f32[N, H, W, C]: a pool to start targeted decision attacks from
    train_labels: Any = None  # i32[N]
    num_classes: int = 10
    surrogate: Any = None  # a clean scorer of a separately trained model (transfer priors)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    name: str
    config: type  # frozen dataclass validated in __post_init__
    build: Callable[[Any, Context], Attack]
    family: str  # "score" or "decision"
    battery: dict = dataclasses.field(default_factory=dict)  # config overrides + "budget"
    supports_targeted: bool = True
    supports_untargeted: bool = True
    needs: tuple[str, ...] = ()  # Context fields the constructor requires
    bad_configs: tuple[dict, ...] = ()  # config kwargs that must raise ValueError (battery-checked)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"attack family must be one of {FAMILIES}, got {self.family!r}")


ATTACKS: dict[str, AttackSpec] = {}


def register(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS and ATTACKS[spec.name] is not spec:
        raise ValueError(f"attack {spec.name!r} registered twice")
    ATTACKS[spec.name] = spec
    return spec


def get_spec(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name]


def make_attack(name: str, ctx: Context | None = None, **config) -> Attack:
    """Build a registered attack from keyword config (validated by its frozen config class)."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attack {name!r}; valid: {sorted(fields)}")
    ctx = ctx or Context()
    missing = [f for f in spec.needs if getattr(ctx, f) is None]
    if missing:
        raise ValueError(f"attack {name!r} needs {missing} in its Context")
    return spec.build(spec.config(**config), ctx)
