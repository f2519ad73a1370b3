"""Attack presets for CIFAR-10 / ImageNet and protocol presets (rnd_jax.presets): configs only.

Nothing here traces or compiles: configs are built as dataclasses, and attacks are only constructed
(``Attack.cost`` is a Python int computed from the config).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import presets
from rnd_jax.autoencoder import AutoencoderConfig
from rnd_jax.attacks import ATTACKS, make_attack
from rnd_jax.attacks.driver import StopRule
from rnd_jax.attacks.registry import BATTERY_EPS, Context

# The attacks the presets must cover (registered names; "bandits" and "simba" are aliases).
REQUIRED = ("hsja", "hsja_linf", "geoda", "signflip", "bandits_td", "autozoom_bi", "genattack", "prgf",
            "square_linf", "square_l2", "simba_pixel", "simba_dct", "nes", "signhunter", "zoo", "rays",
            "signopt", "opt", "boundary", "nes_label_only", "nes_pi", "evolutionary", "zoo_ae", "autozoom_ae")


def _fields(name):
    return {f.name for f in dataclasses.fields(ATTACKS[name].config)}


class _Decoder:
    """A stand-in decoder with the shapes the AE attacks check (D(z) = 0 upsampled)."""

    def __init__(self, latent_shape, image_shape):
        self.latent_shape, self.image_shape = latent_shape, image_shape

    def __call__(self, z):
        return jnp.zeros(z.shape[:-3] + self.image_shape, jnp.float32)


def _pool_ctx(size=32, n=20):
    images = np.linspace(0.0, 1.0, n * size * size * 3, dtype=np.float32).reshape(n, size, size, 3)
    return Context(train_images=images, train_labels=np.arange(n, dtype=np.int32) % 10)


def test_presets_cover_the_required_attacks_for_both_datasets():
    for name in REQUIRED:
        assert name in presets.ATTACK_PRESETS, name
        assert set(presets.ATTACK_PRESETS[name]) == {"cifar10", "imagenet"}, name
        assert name in presets.SOURCES and name in presets.IMAGENET_SIZE, name
    assert set(presets.ATTACK_PRESETS) <= set(ATTACKS)
    assert set(presets.NORM_PRESETS) <= set(presets.ATTACK_PRESETS)


def test_presets_name_only_existing_fields_and_never_the_threat_model():
    def check(name, overrides):
        unknown = set(overrides) - _fields(name)
        assert not unknown, (name, unknown)
        assert not set(overrides) & set(presets.THREAT_FIELDS), (name, overrides)

    for name, per in presets.ATTACK_PRESETS.items():
        for ds, overrides in per.items():
            assert ds in presets.DATASETS and ds != "digits"
            check(name, overrides)
    for name, per in presets.NORM_PRESETS.items():
        for ds, by_norm in per.items():
            assert ds in presets.DATASETS
            for norm, overrides in by_norm.items():
                assert norm in ("linf", "l2")
                check(name, overrides)
    for p in presets.PROTOCOL_PRESETS.values():
        for name, overrides in p.get("attack_overrides", {}).items():
            assert name in ATTACKS
            unknown = set(overrides) - _fields(name)
            assert not unknown, (name, unknown)


def test_every_preset_is_accepted_by_its_config_class():
    for name, per in presets.ATTACK_PRESETS.items():
        spec = ATTACKS[name]
        for ds in presets.DATASETS:
            cfg = presets.attack_config(name, ds)
            built = spec.config(**cfg)  # validated in __post_init__
            for k, v in cfg.items():
                assert getattr(built, k) == v
            for norm in presets.NORM_PRESETS.get(name, {}).get(ds, {}):
                spec.config(**presets.attack_config(name, ds, norm=norm))
    # the protocols' own attack settings, under the protocol's threat model
    for pname, p in presets.PROTOCOL_PRESETS.items():
        for name in p.get("attack_overrides", {}):
            ATTACKS[name].config(**presets.preset_config(name, p["dataset"], pname))


def test_presets_change_the_digits_defaults_they_are_meant_to():
    defaults = presets.config_fields("hsja")
    cfg = presets.attack_config("hsja", "imagenet")
    assert cfg["max_evals"] > defaults["max_evals"] and cfg["init_evals"] == 100 and cfg["gamma"] == 1.0
    assert presets.attack_config("geoda", "imagenet")["sub_dim"] == 75
    assert presets.attack_config("simba_dct", "imagenet")["freq_init"] == 28
    assert presets.attack_config("autozoom_bi", "imagenet")["reduced"] == 32
    assert presets.attack_config("square_linf", "imagenet")["p_init"] == 0.05
    assert presets.attack_config("bandits_td", "imagenet")["tile"] == 4
    assert presets.attack_config("bandits_td", "imagenet")["prior_lr"] == 100.0  # config default norm: linf
    assert presets.attack_config("bandits_td", "imagenet", norm="l2")["prior_lr"] == 0.1
    # no setting in the paper for that dataset: the digits defaults stay
    assert presets.attack_config("geoda", "cifar10") == {}
    assert presets.attack_config("prgf", "cifar10") == {}


def test_digits_has_no_overrides():
    for name in ATTACKS:
        assert presets.attack_config(name, "digits") == {}
    assert presets.attack_config("nes", "digits", samples=20) == {"samples": 20}


def test_aliases_resolve_to_registered_attacks():
    assert presets.attack_config("bandits", "imagenet") == presets.attack_config("bandits_td", "imagenet")
    assert presets.attack_config("simba", "cifar10") == presets.attack_config("simba_pixel", "cifar10")


def test_bad_names_raise_value_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="hsja"):
        presets.attack_config("no_such_attack", "cifar10")
    with pytest.raises(ValueError, match="imagenet"):
        presets.attack_config("hsja", "mnist")
    with pytest.raises(ValueError, match="init_evals"):
        presets.attack_config("hsja", "cifar10", no_such_field=1)
    with pytest.raises(ValueError, match="cifar10_linf_8_255"):
        presets.protocol("no_such_protocol")
    with pytest.raises(ValueError, match="unknown attack"):
        presets.make_preset_attack("no_such_attack", "cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        presets.preset_config("nes", "svhn")
    with pytest.raises(ValueError, match="is for 'imagenet'"):  # a protocol of another dataset
        presets.preset_config("nes", "cifar10", "imagenet_linf_0.05")


def test_explicit_overrides_win_over_dataset_and_norm_presets():
    cfg = presets.attack_config("hsja", "cifar10", init_evals=7, max_evals=700)
    assert cfg["init_evals"] == 7 and cfg["max_evals"] == 700 and cfg["gamma"] == 1.0
    cfg = presets.attack_config("bandits_td", "imagenet", norm="l2", lr=0.25)
    assert cfg["lr"] == 0.25 and cfg["fd_eta"] == 0.01 and cfg["tile"] == 4 and cfg["norm"] == "l2"
    # the protocol's norm selects the norm preset; its eps / targeted / own settings beat the presets
    cfg = presets.preset_config("bandits_td", "imagenet", "imagenet_l2_5")
    assert (cfg["norm"], cfg["eps"], cfg["targeted"], cfg["lr"]) == ("l2", 5.0, False, 0.5)
    cfg = presets.preset_config("square_linf", "cifar10", "cifar10_linf_0.05")
    assert cfg["p_init"] == 0.05  # RFD's setting beats the Square paper's CIFAR-10 p = 0.3
    assert presets.attack_config("square_linf", "cifar10")["p_init"] == 0.3
    # explicit overrides beat the protocol too
    cfg = presets.preset_config("nes", "cifar10", "cifar10_linf_0.05", eps=0.1, samples=8, targeted=True)
    assert (cfg["eps"], cfg["samples"], cfg["targeted"], cfg["norm"]) == (0.1, 8, True, "linf")
    cfg = presets.preset_config("bandits_td", "imagenet", "imagenet_l2_5", norm="linf")
    assert cfg["norm"] == "linf" and cfg["prior_lr"] == 100.0


def test_protocol_presets():
    eps = {"cifar10_linf_8_255": 8 / 255, "cifar10_linf_0.05": 0.05, "cifar10_l2_1": 1.0, "cifar10_l2_5": 5.0,
           "imagenet_linf_0.05": 0.05, "imagenet_l2_5": 5.0, "digits_linf": BATTERY_EPS["linf"],
           "digits_l2": BATTERY_EPS["l2"]}
    for name, value in eps.items():
        p = presets.protocol(name)
        assert p["eps"] == pytest.approx(value, rel=0, abs=1e-12), name
        assert p["norm"] == ("linf" if "linf" in name else "l2"), name
        assert p["dataset"] == name.split("_")[0] and p["dataset"] in presets.DATASETS
        assert isinstance(p["budget"], int) and p["budget"] > 0
        assert p["targeted"] is False
        assert isinstance(presets.stop_rule(name), StopRule)
        assert p["papers"]
    assert presets.protocol("cifar10_linf_8_255")["eps"] == pytest.approx(0.0313725, abs=1e-7)
    assert presets.protocol("imagenet_l2_5")["budget"] == 10_000
    rfd = presets.stop_rule("cifar10_linf_0.05")
    assert (rfd.name, rfd.checks, rfd.count) == ("verified", 9, False)
    assert presets.stop_rule("cifar10_l2_1").name == "single"
    # protocol() returns a copy
    p = presets.protocol("imagenet_linf_0.05")
    p["eps"] = 1.0
    p["attack_overrides"]["nes"]["samples"] = 2
    assert presets.protocol("imagenet_linf_0.05")["eps"] == 0.05
    assert presets.protocol("imagenet_linf_0.05")["attack_overrides"]["nes"]["samples"] == 60


def test_make_preset_attack_cost_follows_the_sample_counts():
    ctx = _pool_ctx()
    # HSJA: the worst-case step grows with the cap on the gradient evaluations
    base = make_attack("hsja", ctx)
    hsja = presets.make_preset_attack("hsja", "cifar10", "cifar10_l2_1", ctx=ctx)
    assert hsja.cost != base.cost and hsja.cost == base.cost + 200  # max_evals 400 -> 600
    assert hsja.output == "label" and hsja.targeted is False
    # NES: J + 1 points a step; RFD's 60 samples on CIFAR-10 l_inf
    nes = presets.make_preset_attack("nes", "cifar10", "cifar10_linf_0.05")
    assert make_attack("nes").cost == 51 and nes.cost == 61
    assert nes.targeted is False  # the protocol's goal beats the config default (targeted)
    # ZOO: 2B + 1 points a step
    assert presets.make_preset_attack("zoo", "imagenet", "imagenet_l2_5").cost == 2 * 128 + 1
    # P-RGF: 2 + S + q in the worst case
    prgf = presets.make_preset_attack("prgf", "imagenet", "imagenet_l2_5",
                                      ctx=Context(surrogate=lambda x, keys: x))
    assert prgf.cost == 2 + 10 + 50 and make_attack("prgf", Context(surrogate=lambda x, keys: x)).cost == 22
    # GenAttack: the population; Sign-OPT: K + line search; GeoDA: the cap on the probes of a step
    assert presets.make_preset_attack("genattack", "cifar10", "cifar10_linf_8_255").cost == 4
    assert presets.make_preset_attack("signopt", "imagenet", "imagenet_l2_5", ctx=ctx).cost == 200 + 150
    geoda = presets.make_preset_attack("geoda", "imagenet", "imagenet_l2_5", ctx=ctx)
    assert geoda.cost == make_attack("geoda", ctx).cost + 1000 - 200  # max_probes 200 -> 1000
    # ZOO-AE: 2B + 1 points a step over the autoencoder's code (8x8x3 at 32x32x3, as the reference's codec)
    decoder = _Decoder(AutoencoderConfig().latent_shape((32, 32, 3)), (32, 32, 3))
    zoo_ae = presets.make_preset_attack("zoo_ae", "cifar10", "cifar10_l2_1", ctx=Context(autoencoder=decoder))
    assert zoo_ae.cost == 2 * 128 + 1 and make_attack("zoo_ae", Context(autoencoder=decoder)).cost == 2 * 16 + 1
    # the Evolutionary attack's CIFAR-10 search space is the whole image (ARES's benchmark: no reduction)
    evo = ATTACKS["evolutionary"].config(**presets.preset_config("evolutionary", "cifar10", "cifar10_l2_1"))
    assert evo.grid((32, 32, 3)) == (32, 32, 3) and evo.coords(32 * 32 * 3) == 154 and evo.sigma == 0.03
    assert ATTACKS["evolutionary"].config().grid((32, 32, 3)) == (13, 13, 3)  # the face setting, scaled
    # explicit overrides still win
    assert presets.make_preset_attack("nes", "cifar10", "cifar10_linf_0.05", samples=10).cost == 11


def test_make_preset_attack_rejects_threat_models_the_attack_lacks():
    with pytest.raises(ValueError, match="imagenet_l2_5"):
        presets.make_preset_attack("genattack", "imagenet", "imagenet_l2_5")  # l_inf-only attack
    with pytest.raises(ValueError, match="targeted"):
        presets.make_preset_attack("nes_pi", "imagenet", "imagenet_linf_0.05", ctx=_pool_ctx())


def test_docstring_table_matches_the_presets():
    assert presets.preset_table() in presets.__doc__
