"""Attack registry: ``ATTACKS[name] = (ConfigClass, constructor)``; ``make_attack(name, **cfg)``."""

from __future__ import annotations

from rnd_jax.attacks.driver import Attack, Result, run, run_one, validate
from rnd_jax.attacks.score.nes import NESConfig, nes

ATTACKS = {
    "nes": (NESConfig, nes),
}


def make_attack(name: str, **config) -> Attack:
    """Build a registered attack from keyword config (validated by its frozen config class)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    cfg_cls, ctor = ATTACKS[name]
    return ctor(cfg_cls(**config))


__all__ = ["ATTACKS", "Attack", "NESConfig", "Result", "make_attack", "nes", "run", "run_one", "validate"]
