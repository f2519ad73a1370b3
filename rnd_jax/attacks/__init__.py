"""Query attacks: the driver, the registry, and every attack module (imported to register).

``ATTACKS[name]`` is an :class:`AttackSpec`; ``make_attack(name, ctx, **config)`` builds one.
"""

from __future__ import annotations

import importlib
import pkgutil

from rnd_jax.attacks import decision as _decision
from rnd_jax.attacks import score as _score
from rnd_jax.attacks import whitebox as _whitebox
from rnd_jax.attacks.driver import Attack, Result, run, run_one, validate
from rnd_jax.attacks.registry import ATTACKS, AttackSpec, Context, get_spec, make_attack, register
from rnd_jax.attacks.score.nes import NESConfig, nes

for _pkg in (_score, _decision, _whitebox):
    for _m in pkgutil.iter_modules(_pkg.__path__):
        importlib.import_module(f"{_pkg.__name__}.{_m.name}")

__all__ = ["ATTACKS", "Attack", "AttackSpec", "Context", "NESConfig", "Result", "get_spec", "make_attack", "nes",
           "register", "run", "run_one", "validate"]
