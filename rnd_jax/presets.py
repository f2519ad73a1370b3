"""Per-attack settings at the papers' input sizes (CIFAR-10, ImageNet) and named evaluation protocols.

The config defaults of ``rnd_jax/attacks/score/*`` and ``rnd_jax/attacks/decision/*`` are set for the
8x8 digits. This module keeps them as they are and records, per attack, the overrides that give the
settings of the attack's paper -- or, where the paper leaves a value to its code, of the authors'
reference implementation -- for CIFAR-10 (32x32x3) and ImageNet:

- :data:`ATTACK_PRESETS` ``[attack][dataset]``: config overrides for ``"cifar10"`` and ``"imagenet"``
  (``"digits"`` has none: the config defaults are the digits settings). An empty dict means the paper
  and its code give no setting for that dataset, so the digits default stays (``·`` in the table).
- :data:`NORM_PRESETS` ``[attack][dataset][norm]``: overrides that the sources give per threat model
  (Bandits-TD's four constants, NES's step), applied on top when the attack runs in that norm.
- :data:`PROTOCOL_PRESETS`: named threat models -- dataset, norm, eps, query budget, targeted, the
  stop rule (DESIGN.md, "Evaluation protocol"), the papers it matches, and attack settings that a
  protocol's paper fixes for its own runs (RFD's NES and Square settings).
- :func:`attack_config`, :func:`protocol`, :func:`preset_config`, :func:`make_preset_attack`,
  :func:`stop_rule`, :func:`preset_table`.

Merge order (later wins): attack preset for the dataset < norm preset < the protocol's ``norm`` /
``eps`` / ``targeted`` < the protocol's own settings for the attack < explicit keyword overrides. The
norm that selects the norm preset is the explicit ``norm=``, else the protocol's, else the config
default. Presets never set ``eps``, ``norm`` or ``targeted``: those belong to the protocol.

Input sizes. CIFAR-10 presets are for 32x32x3. ImageNet presets are for 224x224x3, the input size of
this codebase's ImageNet models (ResNet-50, ViT-B/16); the "ImageNet res." column gives the size the
paper's ImageNet runs used (299 = Inception-v3). Most values do not depend on the size (probe radii in
pixel units, probabilities, fractions of the image); those that do are converted to 224:

- Bandits-TD ``tile``: the reference's data prior is a 50x50 grid of the image (6-pixel tiles on
  299x299 Inception-v3 inputs); on 224x224 that grid has 4.5-pixel tiles, so ``tile = 4`` (a 56x56
  grid; ``tile=6`` reproduces the 299 setting).
- AutoZOOM-BiLIN ``reduced = 32`` and SimBA-DCT ``freq_init = 28, stride = 7`` are kept in absolute
  size: the reference used 32x32x3 on 299 inputs, and 28 / 7 on 224 (38 / 9 on 299).
- HopSkipJump's bisection threshold ``theta = gamma / d^{3/2}`` (l2) or ``gamma / d^2`` (linf) is
  computed from the image by the attack itself: 19 (l2) / 25 (linf) halvings at d = 3 072, within the
  digits cap ``max_bisect = 25``; at d = 150 528 it asks for 27 (l2) / 36 (linf), whose last halvings
  move the queried pixels by less than their float32 spacing (about 6e-8 near 1), so the cap stays
  (further halvings would spend queries without changing the point). RayS's first bisection from
  sqrt(d) to ``tol = 1e-3`` needs 16 (CIFAR-10) / 19 (ImageNet) halvings, within its cap of 25.
- Parsimonious ``block_size = 24``: the reference's 32-pixel initial blocks make a 10x10 grid on 299x299
  inputs; 24 gives the same grid on 224x224 (``block_size=32`` reproduces the 299 setting).
- ZO-signSGD ``mu = 0.075``: the benchmark's probe of l_2 length 0.1 on 299x299x3 moves each pixel by
  ``0.1 / sqrt(d)``; the same per-pixel probe on 224x224x3 has length ``0.1 * 224 / 299``.

Settings that no config field expresses (so the preset cannot carry them): SFA's bilinear
dimensionality reduction (``resize_factor = 2`` on ImageNet), GenAttack's ``resize_dim = 96`` (so its
ImageNet preset is the reference's run *without* reduction), ZOO's attack-space resizing, importance
sampling, tanh space and binary search over c, the Boundary attack's step-size convergence stop,
OPT's absolute search tolerance ``beta / 500`` (here relative to the distance, ``tol_ratio``), and
the plateau annealing of the query-limited NES learning rate.

Three departures are forced by the driver's budget rule (a step runs only if its worst case,
``Attack.cost``, still fits in the budget, so a cap is part of the worst case of every step):

- HSJA ``max_evals = 600`` (reference 1e4). ``B_t = 100 sqrt(t)`` (rounded up to chunks of 20) reaches
  600 only at t = 34, after more than 13 000 gradient queries, so within the 10 000-query protocols the
  cap never binds, as the reference's never does; 1e4 would make one worst-case step larger than the
  whole budget.
- GeoDA ``max_probes = 1000``. The reference divides a known total budget over its iterations (first
  iteration 50-80 probes, 67 for Q = 10 000, then growing by mu^(-2/3)), ending with ~2 800 probes;
  here the count grows without knowing the budget, and the cap keeps the worst-case step at ~1 000.
- OPT ``min_beta = 1e-4``: one tenfold shrink of the reference's beta = 1e-3 (the reference goes on
  to 1e-8); the config requires ``min_beta <= beta``.

Table (``·``: no setting from the source, the digits default stays; ``linf: a, l2: b``: per norm)

| attack | field | digits | CIFAR-10 | ImageNet | ImageNet res. | source |
|---|---|---|---|---|---|---|
| hsja | init_evals | 100 | 100 | 100 | size-free | Chen et al. 2020 (HSJA); ref. hsja.py/main.py |
|  | max_evals | 400 | 600 | 600 |  |  |
|  | gamma | 1 | 1 | 1 |  |  |
|  | delta_first | 0.1 | 0.1 | 0.1 |  |  |
| hsja_linf | init_evals | 100 | 100 | 100 | size-free | Chen et al. 2020 (HSJA); ref. hsja.py/main.py |
|  | max_evals | 400 | 600 | 600 |  |  |
|  | gamma | 1 | 1 | 1 |  |  |
|  | delta_first | 0.1 | 0.1 | 0.1 |  |  |
| geoda | sub_dim | 6 | · | 75 | 224 | Rahmati et al. 2020 (GeoDA); ref. GeoDA.py (ImageNet only) |
|  | sigma | 0.0002 | · | 0.0002 |  |  |
|  | mu | 0.6 | · | 0.6 |  |  |
|  | init_probes | 20 | · | 70 |  |  |
|  | max_probes | 200 | · | 1000 |  |  |
|  | tol | 0.0001 | · | 0.0001 |  |  |
| signflip | alpha | 0.004 | 0.004 | 0.004 | 224 | Chen et al. 2020 (SFA); ref. SFA.py constants |
|  | flip_prob | 0.05 | 0.001 | 0.001 |  |  |
|  | p_min | 0.005 | 0.0001 | 0.0001 |  |  |
|  | p_max | 0.25 | 0.01 | 0.01 |  |  |
|  | flip_lr | 0.005 | 0.0001 | 0.0001 |  |  |
|  | adapt_every | 10 | 10 | 10 |  |  |
| bandits_td | tile | 1 | · | 4 | 299 | Ilyas et al. 2019; ref. configs/linf.json, l2.json (ImageNet only) |
|  | lr | None | · | linf: 0.01, l2: 0.5 |  |  |
|  | fd_eta | None | · | linf: 0.1, l2: 0.01 |  |  |
|  | exploration | None | · | linf: 1, l2: 0.01 |  |  |
|  | prior_lr | None | · | linf: 100, l2: 0.1 |  |  |
| autozoom | lr | 0.01 | 0.01 | 0.002 | 299 | Tu et al. 2019 (AutoZOOM); ref. main.py, README |
|  | c | 1 | 1 | 10 |  |  |
|  | switch_iters | 1000 | 1000 | 1000 |  |  |
| autozoom_ae | lr | 0.01 | 0.01 | 0.002 | 299 | Tu et al. 2019 (AutoZOOM); ref. main.py, README |
|  | c | 1 | 1 | 10 |  |  |
|  | switch_iters | 1000 | 1000 | 1000 |  |  |
| autozoom_bi | reduced | None | 8 | 32 | 299 | Tu et al. 2019 (AutoZOOM); ref. main.py, README |
|  | lr | 0.01 | 0.01 | 0.002 |  |  |
|  | c | 1 | 1 | 10 |  |  |
|  | switch_iters | 1000 | 1000 | 1000 |  |  |
| genattack | pop_size | 6 | 4 | 6 | 299 | Alzantot et al. 2019; ref. README commands |
|  | temp | 0.1 | 0.1 | 0.1 |  |  |
|  | rho_min | 0.1 | 0.05 | 0.005 |  |  |
|  | alpha_min | 0.15 | 0.25 | 0.15 |  |  |
|  | adaptive | True | False | False |  |  |
| prgf | samples | 10 | · | 50 | 299 | Cheng et al. 2019 (P-RGF); ref. attack.py (ImageNet only) |
|  | norm_samples | 10 | · | 10 |  |  |
|  | norm_every | 10 | · | 10 |  |  |
|  | sigma | 0.001 | · | 0.0001 |  |  |
| square_linf | p_init | 0.05 | 0.3 | 0.05 | 224/299 | Andriushchenko et al. 2020; ref. README |
| square_l2 | p_init | 0.1 | · | 0.1 | 224/299 | Andriushchenko et al. 2020; paper supp. B |
| simba_pixel | step_size | 0.2 | 0.2 | 0.2 | 224 | Guo et al. 2019 (SimBA); ref. README, run_simba*.py |
|  | passes | 8 | 1 | 1 |  |  |
| simba_dct | step_size | 0.2 | 0.2 | 0.2 | 224 | Guo et al. 2019 (SimBA); ref. README, run_simba*.py |
|  | passes | 8 | 1 | 1 |  |  |
|  | freq_init | None | 32 | 28 |  |  |
|  | stride | None | 7 | 7 |  |  |
| nes | samples | 50 | · | 50 | 299 | Ilyas et al. 2018 (NES); ref. main.py (ImageNet only) |
|  | beta | 0.001 | · | 0.001 |  |  |
|  | momentum | 0.9 | · | 0.9 |  |  |
|  | lr | None | · | linf: 0.01 |  |  |
| nes_pi | samples | 100 | · | 100 | 299 | Ilyas et al. 2018; ref. partial-info.sh (ImageNet only) |
|  | sigma | 1e-05 | · | 1e-05 |  |  |
|  | momentum | 0.9 | · | 0.9 |  |  |
|  | plateau_length | 20 | · | 20 |  |  |
|  | adv_thresh | 0.2 | · | 0.2 |  |  |
|  | min_lr_ratio | 10 | · | 10 |  |  |
| nes_label_only | samples | 10 | · | 100 | 299 | Ilyas et al. 2018; ref. label-only.sh (ImageNet only) |
|  | mc | 5 | · | 50 |  |  |
|  | mu | 0.01 | · | 0.002 |  |  |
|  | sigma | 0.05 | · | 0.001 |  |  |
|  | lr_max | 0.02 | · | 0.01 |  |  |
|  | lr_min | 0.001 | · | 0.0001 |  |  |
|  | decay | 0.01 | · | 0.5 |  |  |
|  | decay_restore | 0.002 | · | 0.1 |  |  |
|  | decay_min | 0.0001 | · | 0.002 |  |  |
| signhunter | — | | | | size-free | Al-Dujaili & O'Reilly 2020: no hyper-parameters |
| zoo | coords | 64 | 128 | 128 | 299 | Chen et al. 2017 (ZOO); ref. test_all.py, README |
|  | h | 0.0001 | 0.0001 | 0.0001 |  |  |
|  | c | 0.5 | 0.5 | 10 |  |  |
|  | lr | 0.01 | 0.01 | 0.002 |  |  |
| zoo_ae | coords | 16 | 128 | 128 | 299 | Tu et al. 2019 (AutoZOOM); ref. main.py, README |
|  | h | 0.0001 | 0.0001 | 0.0001 |  |  |
|  | c | 0.5 | 10 | 10 |  |  |
|  | lr | 0.01 | 0.01 | 0.002 |  |  |
| evolutionary | reduced | None | 32 | · | · | Dong et al. 2019; ARES test_iteration.sh (CIFAR-10 only) |
|  | sigma | 0.01 | 0.03 | · |  |  |
|  | mu | 0.01 | 0.01 | · |  |  |
|  | c_c | 0.01 | 0.01 | · |  |  |
|  | c_cov | 0.001 | 0.001 | · |  |  |
|  | coord_fraction | 0.05 | 0.05 | · |  |  |
|  | window | 30 | 30 | · |  |  |
| rays | tol | 0.001 | 0.001 | 0.001 | size-free | Chen & Gu 2020 (RayS); ref. RayS.py |
| signopt | k | 100 | 200 | 200 | size-free | Cheng et al. 2020 (Sign-OPT); ref. attack/Sign_OPT.py |
|  | alpha | 0.2 | 0.2 | 0.2 |  |  |
|  | beta | 0.001 | 0.001 | 0.001 |  |  |
| opt | q | 10 | 10 | 10 | size-free | Cheng et al. 2019 (OPT); ref. attack/OPT_attack.py |
|  | alpha | 0.2 | 0.2 | 0.2 |  |  |
|  | beta | 0.02 | 0.001 | 0.001 |  |  |
|  | min_beta | 0.002 | 0.0001 | 0.0001 |  |  |
| boundary | proposals | 5 | 1 | 1 | size-free | Brendel et al. 2018; ref. Foolbox BoundaryAttack |
|  | spherical_step | 0.01 | 0.01 | 0.01 |  |  |
|  | source_step | 0.01 | 0.01 | 0.01 |  |  |
|  | adaptation | 1.5 | 1.5 | 1.5 |  |  |
|  | spherical_every | 10 | 10 | 10 |  |  |
|  | spherical_window | 1 | 100 | 100 |  |  |
|  | step_window | 1 | 30 | 30 |  |  |
| zo_signsgd | q | 10 | 20 | 100 | 299 | Liu et al. 2019; l_inf settings: Al-Dujaili & O'Reilly's benchmark configs |
|  | mu | 0.0285714 | 0.01 | 0.075 |  |  |
|  | lr | None | 0.00784314 | 0.02 |  |  |
|  | directions | sphere | gaussian | gaussian |  |  |
| parsimonious | block_size | 2 | 4 | 24 | 299 | Moon et al. 2019; ref. cifar10/main.py, imagenet/main.py |
|  | batch_size | 64 | 64 | 64 |  |  |
|  | max_iters | 1 | 1 | 1 |  |  |
| cw | search_steps | 6 | 9 | 9 | size-free | Carlini & Wagner 2017; ref. l2_attack.py |
|  | steps | 100 | 10000 | 10000 |  |  |
|  | lr | 0.1 | 0.01 | 0.01 |  |  |
|  | abort_early | False | True | True |  |  |
| pgd | — | | | | size-free | Madry et al. 2018 (step eps/4: the default) |
| subspace | fd_eta | None | · | 0.1 | size-free | Guo et al. 2019; ref. attack.py defaults |

Protocols (:data:`PROTOCOL_PRESETS`; all untargeted; eps in [0, 1] pixel units)

| name | dataset | norm | eps | budget | stop rule | matches |
|---|---|---|---|---|---|---|
| digits_linf | digits | linf | 0.3 | 10 000 | single | the registry battery radius (BATTERY_EPS) |
| digits_l2 | digits | l2 | 2.0 | 10 000 | single | the registry battery radius (BATTERY_EPS) |
| cifar10_linf_8_255 | cifar10 | linf | 8/255 | 10 000 | single | RayS / SFA reference defaults (0.031) |
| cifar10_linf_0.05 | cifar10 | linf | 0.05 | 10 000 | verified (9) | RFD (Nguyen et al. 2024), App. D.3-D.4 |
| cifar10_l2_1 | cifar10 | l2 | 1.0 | 10 000 | single | SND (Byun et al. 2022), Table 2 |
| cifar10_l2_5 | cifar10 | l2 | 5.0 | 10 000 | verified (9) | RFD, App. E.1 / Table 9 |
| imagenet_linf_0.05 | imagenet | linf | 0.05 | 10 000 | verified (9) | RFD; Square, Bandits, NES, SignHunter |
| imagenet_l2_5 | imagenet | l2 | 5.0 | 10 000 | single | SND Table 3; Square, Bandits |

Example (builds an attack; nothing is traced until it runs)::

    from rnd_jax import presets
    attack = presets.make_preset_attack("hsja", "imagenet", "imagenet_l2_5", ctx=ctx)
    rule = presets.stop_rule("imagenet_l2_5")
    budget = presets.protocol("imagenet_l2_5")["budget"]
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from rnd_jax.attacks import ATTACKS, make_attack
from rnd_jax.attacks.driver import StopRule
from rnd_jax.attacks.registry import BATTERY_EPS, Context

DATASETS = ("digits", "cifar10", "imagenet")
THREAT_FIELDS = ("norm", "eps", "targeted")  # set by a protocol, never by an attack preset
ALIASES = {"bandits": "bandits_td", "simba": "simba_pixel"}  # names the papers use -> registered names

# HopSkipJump (Chen, Jordan & Wainwright, S&P 2020). The reference (Jianbo-Lab/HSJA, hsja.py and the call
# in main.py) uses the same constants on every dataset: gamma = 1.0, init_num_evals = 100 (B_0),
# delta = 0.1 * (clip_max - clip_min) at the first iteration, max_num_evals = 1e4 (see the module
# docstring for the cap of 600 here).
_HSJA = dict(init_evals=100,  # ref. init_num_evals = 100
             max_evals=600,  # ref. max_num_evals = 1e4, never reached; 600 never binds within 10k queries
             gamma=1.0,  # ref. gamma = 1.0 (theta = gamma / d^{3/2} or gamma / d^2)
             delta_first=0.1)  # ref. select_delta: 0.1 * (clip_max - clip_min) at t = 1

# Sign-Flip Attack (Chen, Zhang, Hu & Wu, ECCV 2020). The reference (cwllenny/Sign-Flip-Attack, SFA.py) has
# one set of constants for every input: alpha = 0.004, keep-sign probability 0.999 clamped to
# [0.99, 0.9999] (flip probability 1e-3 in [1e-4, 1e-2]), per-success update 1e-4, and every 10 steps
# a rate-driven change of alpha (x1.5) and of the probabilities (+-1e-3 = 10 * flip_lr).
_SFA = dict(alpha=0.004,  # ref. alpha = 0.004
            flip_prob=1e-3,  # ref. prob = 0.999 of keeping a sign
            p_min=1e-4, p_max=1e-2,  # ref. prob.clamp_(0.99, 0.9999)
            flip_lr=1e-4,  # ref. prob -= s * 1e-4 after a successful flip
            adapt_every=10)  # ref. reset % 10 == 0

# Sign-OPT (Cheng et al., ICLR 2020): the authors' attackbox, attack/Sign_OPT.py: k = 200 sign queries per
# estimate (class default), alpha = 0.2, beta = 0.001 (attack_untargeted defaults); the same on every dataset.
_SIGNOPT = dict(k=200, alpha=0.2, beta=1e-3)

# OPT (Cheng et al., ICLR 2019): the authors' attackbox, attack/OPT_attack.py: q = 10 directions, alpha = 0.2,
# beta = 0.001 (attack_untargeted), beta shrinking tenfold when alpha < 1e-4; min_beta is our floor.
_OPT = dict(q=10, alpha=0.2, beta=1e-3, min_beta=1e-4)

# Boundary Attack (Brendel, Rauber & Bethge, ICLR 2018), reference Foolbox BoundaryAttack (by the authors):
# spherical_step = source_step = 0.01, step_adaptation = 1.5, one candidate per step, statistics updated
# every 10th step, windows of the last 100 spherical and 30 candidate answers; the same on every dataset.
_BOUNDARY = dict(proposals=1, spherical_step=0.01, source_step=0.01, adaptation=1.5,
                 spherical_every=10, spherical_window=100, step_window=30)

# AutoZOOM (Tu et al., AAAI 2019), reference IBM/Autozoom-Attack main.py: lr 1e-2 (CIFAR-10) / 2e-3
# (ImageNet), c starts at init_const (default 1; 10 in the ImageNet README example), switch_iterations 1000.
_AUTOZOOM = {
    "cifar10": dict(lr=0.01, c=1.0, switch_iters=1000),  # ref. main.py (cifar10): lr = 1e-2; -c default 1
    "imagenet": dict(lr=2e-3, c=10.0, switch_iters=1000),  # ref. main.py (imagenet): lr = 2e-3; README -c 10
}

# ZOO's reference settings (huanzhang12/ZOO-Attack; the AutoZOOM reference's zoo and zoo_ae likewise): batch
# 128, h = 1e-4, -c 10.0 in the README's ImageNet runs (and AutoZOOM's zoo_ae CIFAR-10 example), ImageNet lr 2e-3.
_ZOO_REF = dict(coords=128, h=1e-4, c=10.0, lr=2e-3)

ATTACK_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "hsja": {"cifar10": dict(_HSJA), "imagenet": dict(_HSJA)},  # HSJA, l2 (and linf) on CIFAR-10 / ImageNet
    "hsja_linf": {"cifar10": dict(_HSJA), "imagenet": dict(_HSJA)},
    # GeoDA (Rahmati et al., CVPR 2020): ImageNet only (reference GeoDA.py, 224x224 ResNet-50).
    "geoda": {
        "cifar10": {},  # no CIFAR-10 setting in the paper or its code: digits defaults
        "imagenet": dict(
            sub_dim=75,  # ref. sub_dim = 75: the 75x75 low-frequency DCT block of the 224x224 image
            sigma=2e-4,  # ref. sigma = 0.0002
            mu=0.6,  # ref. mu = 0.6 (query allocation N_i ~ mu^(-2i/3))
            init_probes=70,  # ref. opt_query_iteration keeps N_0 in [50, 80] (67 for 10 000 queries)
            max_probes=1000,  # ours: the reference ends at ~2 800 probes (module docstring)
            tol=1e-4),  # ref. tol = 0.0001
    },
    "signflip": {"cifar10": dict(_SFA), "imagenet": dict(_SFA)},  # SFA: constants of the reference code
    # Bandits-TD (Ilyas, Engstrom & Madry, ICLR 2019): ImageNet only. Reference configs/linf.json and l2.json
    # with --tiling: tile_size = 50 is the side of the prior grid (50x50 cells upsampled to the image).
    "bandits_td": {
        "cifar10": {},  # ImageNet-only paper: digits defaults (tile = 1: no data prior)
        "imagenet": dict(tile=4),  # 50x50 grid = 6-px tiles on 299 (Inception-v3), 4.5 px on 224: tile 4
    },
    "autozoom": {"cifar10": dict(_AUTOZOOM["cifar10"]), "imagenet": dict(_AUTOZOOM["imagenet"])},
    # AutoZOOM-AE: the random-vector estimate in an autoencoder's code, with the same reference settings as
    # AutoZOOM (README example 3 is autozoom_ae on ImageNet: -c 10, switch 1000). The code's size is the
    # autoencoder's (rnd_jax.autoencoder: 8x8x3 at 32x32, the reference's cifar10_2).
    "autozoom_ae": {"cifar10": dict(_AUTOZOOM["cifar10"]), "imagenet": dict(_AUTOZOOM["imagenet"])},
    "autozoom_bi": {
        # reduced = 8: the reference's CIFAR-10 attack space (cifar10_2 codec, compress_mode = 2: 8x8x3,
        # d'/d = 6.25%); its BiLIN without --img_resize would attack the full 32x32 space.
        "cifar10": dict(reduced=8, lr=0.01, c=1.0, switch_iters=1000),
        # README example 4: autozoom_bilin on ImageNet with --img_resize 32 (32x32x3), -c 10, lr 2e-3.
        "imagenet": dict(reduced=32, lr=2e-3, c=10.0, switch_iters=1000),
    },
    # GenAttack (Alzantot et al., GECCO 2019), reference nesl/adversarial_genattack README commands.
    "genattack": {
        # "Attacking CIFAR-10 Model": --pop_size=4 --mutation_rate=0.05 --alpha=0.25 --adaptive=False --temp=0.1
        "cifar10": dict(pop_size=4, temp=0.1, rho_min=0.05, alpha_min=0.25, adaptive=False),
        # ImageNet run without dimensionality reduction (resize_dim is not available here): --pop_size=6
        # --mutation_rate=0.005 --alpha=0.15 --adaptive=False (the reduced run: 0.10, 0.15, adaptive, 96x96).
        "imagenet": dict(pop_size=6, temp=0.1, rho_min=0.005, alpha_min=0.15, adaptive=False),
    },
    # P-RGF (Cheng et al., NeurIPS 2019): ImageNet only; reference thu-ml/Prior-Guided-RGF attack.py.
    "prgf": {
        "cifar10": {},  # ImageNet-only paper: digits defaults
        "imagenet": dict(
            samples=50,  # ref. samples_per_draw = 50 (q)
            norm_samples=10,  # ref. s = 10 directions for the gradient-norm estimate
            norm_every=10,  # ref. every 10 iterations (and at iteration 3)
            sigma=1e-4),  # ref. ini_sigma = 1e-4 for plain models (1e-3 for its JPEG / randomized defenses)
        # lr stays None: eps/8 (l2) and eps/10 (linf) give the reference's 2.0 at eps = sqrt(1e-3 d) = 16.4
        # and 0.005 at eps = 0.05.
    },
    # Square Attack (Andriushchenko et al., ECCV 2020), reference max-andr/square-attack README.
    "square_linf": {
        "cifar10": dict(p_init=0.3),  # README: CIFAR-10 models (post-averaging 8/255, CLP/LSQ 16/255): --p=0.3
        "imagenet": dict(p_init=0.05),  # README: ImageNet ResNet-50 / VGG / Inception: --p=0.05, 10 000 iters
    },
    "square_l2": {
        "cifar10": {},  # no CIFAR-10 l2 setting given: digits default (0.1, the ImageNet value)
        "imagenet": dict(p_init=0.1),  # paper supp. B (eps = 5, 10 000 queries); RFD App. D.3 uses the same
    },
    # SimBA (Guo et al., ICML 2019), reference cg563/simple-blackbox-attack: epsilon = 0.2, one pass.
    "simba_pixel": {
        "cifar10": dict(step_size=0.2, passes=1),  # run_simba_cifar.py: --epsilon 0.2, max_iters = n_dims
        "imagenet": dict(step_size=0.2, passes=1),  # README: run_simba.py --pixel_attack (epsilon 0.2)
    },
    "simba_dct": {
        # run_simba_cifar.py defaults: --freq_dims 32 --order rand (every frequency, random order) --stride 7
        "cifar10": dict(step_size=0.2, passes=1, freq_init=32, stride=7),
        # README (ResNet-50, 224): --freq_dims 28 --order strided --stride 7 (Inception-v3 299: 38 and 9)
        "imagenet": dict(step_size=0.2, passes=1, freq_init=28, stride=7),
    },
    # NES (Ilyas et al., ICML 2018), query-limited: ImageNet only (reference labsix main.py, 299 Inception-v3).
    "nes": {
        "cifar10": {},  # ImageNet-only paper: digits defaults (RFD's CIFAR-10 settings: its protocols)
        "imagenet": dict(samples=50, beta=1e-3, momentum=0.9),  # ref. SAMPLES_PER_DRAW = 50, SIGMA = 1e-3
    },
    # NES partial information (same paper), reference partial-info.sh on top of the main.py defaults.
    "nes_pi": {
        "cifar10": {},  # ImageNet-only: digits defaults (which are the reference's)
        "imagenet": dict(samples=100, sigma=1e-5, momentum=0.9, plateau_length=20, adv_thresh=0.2,
                         min_lr_ratio=10.0),  # --samples-per-draw 100 --sigma 1e-5 ...; max 1e-2 / min 1e-3
    },
    # NES label-only (same paper), reference label-only.sh on top of the main.py defaults.
    "nes_label_only": {
        "cifar10": {},  # ImageNet-only: digits defaults
        "imagenet": dict(
            samples=100,  # --samples-per-draw 100 (J)
            mc=50,  # --zero-iters 50 (proxy-score samples per direction)
            mu=2e-3,  # --label-only-sigma 2e-3 (proxy sampling radius)
            sigma=1e-3,  # --sigma 1e-3 (NES search radius)
            lr_max=1e-2, lr_min=1e-4,  # --max-lr default 1e-2, --min-lr 1e-4
            decay=0.5,  # --starting-delta-eps default 0.5
            decay_restore=0.1,  # --min-delta-eps default 0.1
            decay_min=2e-3),  # attacks.py: a decrement below 2e-3 becomes 0
    },
    # SignHunter (Al-Dujaili & O'Reilly, ICLR 2020) has no hyper-parameter besides eps and the loss.
    "signhunter": {"cifar10": {}, "imagenet": {}},
    # ZOO (Chen et al., AISec 2017), reference huanzhang12/ZOO-Attack test_all.py / README.
    "zoo": {
        # BlackBoxL2(batch_size=128), lr = 1e-2, init_const 0.5 without binary search, h = 1e-4 (0.0001 probes)
        "cifar10": dict(coords=128, h=1e-4, c=0.5, lr=0.01),
        "imagenet": dict(_ZOO_REF),  # one binary-search step at -c 10.0
    },
    # ZOO-AE (Tu et al., AAAI 2019, reference main.py): ZOO's coordinate Adam in an autoencoder's code,
    # batch_size 128 for zoo and zoo_ae, lr 1e-2 (CIFAR-10) / 2e-3 (ImageNet); README example 2 runs zoo_ae on
    # CIFAR-10 with --init_const 10 (the ImageNet examples use 10 too). The reference adapts c every
    # switch_iterations; ZOO's config has a fixed c (as the zoo preset).
    "zoo_ae": {
        "cifar10": dict(_ZOO_REF, lr=0.01),  # 128 of the 8x8x3 code's 192 coordinates
        "imagenet": dict(_ZOO_REF),
    },
    # Evolutionary (Dong et al., CVPR 2019) has face-recognition settings only (112x112 faces, a 45x45 search
    # space: the config default scales it to the input). CIFAR-10: the authors' ARES library's benchmark run
    # (test/test_iteration.sh, ResNet-56): mu 1e-2, sigma 3e-2, decay factor 0.99 (= 1 - c_c), c 1e-3 (c_cov),
    # no dimension reduction (reduced = 32, the whole image); its worker keeps K = N / 20 coordinates and a
    # window of 30 offspring (the config defaults). ImageNet: no source; the paper's constants stay.
    "evolutionary": {
        "cifar10": dict(reduced=32, sigma=0.03, mu=0.01, c_c=0.01, c_cov=0.001, coord_fraction=0.05, window=30),
        "imagenet": {},
    },
    # RayS (Chen & Gu, KDD 2020), reference uclaml/RayS RayS.py: binary_search tol = 1e-3 on every dataset.
    "rays": {"cifar10": dict(tol=1e-3), "imagenet": dict(tol=1e-3)},
    "signopt": {"cifar10": dict(_SIGNOPT), "imagenet": dict(_SIGNOPT)},
    "opt": {"cifar10": dict(_OPT), "imagenet": dict(_OPT)},
    "boundary": {"cifar10": dict(_BOUNDARY), "imagenet": dict(_BOUNDARY)},
    # ZO-signSGD (Liu et al., ICLR 2019). Its l_inf-ball settings are those of Al-Dujaili & O'Reilly's
    # benchmark of it (blackbox-adv-examples-signhunter, config-jsons/*_zosignsgd_linf_config.json), whose
    # directions are N(0, I/d) ("gaussian"): fd_eta is the probe's l_2 length (mu), lr the sign step.
    "zo_signsgd": {
        "cifar10": dict(q=20, mu=0.01, lr=2 / 255, directions="gaussian"),  # fd_eta 2.55 / 255, lr 2 / 255
        "imagenet": dict(q=100, mu=0.075, lr=0.02, directions="gaussian"),  # fd_eta 0.1 on 299 (see above)
    },
    # Parsimonious (Moon, An & Song, ICML 2019), reference snu-mllab/parsimonious-blackbox-attack main.py
    # defaults (loss xent, max_iters 1, batch_size 64; block_size 4 on CIFAR-10, 32 on 299 ImageNet).
    "parsimonious": {
        "cifar10": dict(block_size=4, batch_size=64, max_iters=1),
        "imagenet": dict(block_size=24, batch_size=64, max_iters=1),  # 32 on 299 = 24 on 224 (see above)
    },
    # C&W l_2 (Carlini & Wagner, S&P 2017), the reference code's l2_attack.py defaults (MNIST, CIFAR-10 and
    # ImageNet alike): 9 binary-search steps of up to 10 000 Adam steps at 1e-2, aborting early; c0 = 1e-3
    # and kappa = 0 are the config defaults already. The schedule is 90 000 gradient queries.
    "cw": {
        "cifar10": dict(search_steps=9, steps=10_000, lr=1e-2, abort_early=True),
        "imagenet": dict(search_steps=9, steps=10_000, lr=1e-2, abort_early=True),
    },
    # PGD (Madry et al., ICLR 2018): the CIFAR-10 step 2/255 at eps 8/255 is the config default (eps / 4);
    # the number of steps is the query budget (7 to train, 20 to evaluate on CIFAR-10).
    "pgd": {"cifar10": {}, "imagenet": {}},
    # Subspace Attack (Guo et al., NeurIPS 2019), the argument defaults of the reference attack.py, which has no
    # dataset-specific ones: at 32x32x3 the config defaults are those values (fd_eta 0.1, image lr eps / 8,
    # exploration 0.1, prior lr 1, momentum prior, dropout 0 -> 0.5); the config scales fd_eta with
    # sqrt(d / 3072) for other sizes, where the code keeps 0.1.
    "subspace": {"cifar10": {}, "imagenet": dict(fd_eta=0.1)},
}

NORM_PRESETS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "bandits_td": {"imagenet": {
        # configs/linf.json (eps 0.05): image_lr 0.01, fd_eta 0.1, exploration 1.0, online_lr 100
        "linf": dict(lr=0.01, fd_eta=0.1, exploration=1.0, prior_lr=100.0),
        # configs/l2.json (eps 5): image_lr 0.5, fd_eta 0.01, exploration 0.01, online_lr 0.1
        "l2": dict(lr=0.5, fd_eta=0.01, exploration=0.01, prior_lr=0.1),
    }},
    # NES reference: --max-lr 1e-2 for eps = 0.05 (l_inf, the paper's threat model); l2 keeps lr = eps/5
    "nes": {"imagenet": {"linf": dict(lr=0.01)}},
}

# Short source of each attack's presets (the table's "source" column) and the paper's ImageNet input size.
SOURCES = {
    "hsja": "Chen et al. 2020 (HSJA); ref. hsja.py/main.py",
    "hsja_linf": "Chen et al. 2020 (HSJA); ref. hsja.py/main.py",
    "geoda": "Rahmati et al. 2020 (GeoDA); ref. GeoDA.py (ImageNet only)",
    "signflip": "Chen et al. 2020 (SFA); ref. SFA.py constants",
    "bandits_td": "Ilyas et al. 2019; ref. configs/linf.json, l2.json (ImageNet only)",
    "autozoom": "Tu et al. 2019 (AutoZOOM); ref. main.py, README",
    "autozoom_bi": "Tu et al. 2019 (AutoZOOM); ref. main.py, README",
    "genattack": "Alzantot et al. 2019; ref. README commands",
    "prgf": "Cheng et al. 2019 (P-RGF); ref. attack.py (ImageNet only)",
    "square_linf": "Andriushchenko et al. 2020; ref. README",
    "square_l2": "Andriushchenko et al. 2020; paper supp. B",
    "simba_pixel": "Guo et al. 2019 (SimBA); ref. README, run_simba*.py",
    "simba_dct": "Guo et al. 2019 (SimBA); ref. README, run_simba*.py",
    "nes": "Ilyas et al. 2018 (NES); ref. main.py (ImageNet only)",
    "nes_pi": "Ilyas et al. 2018; ref. partial-info.sh (ImageNet only)",
    "nes_label_only": "Ilyas et al. 2018; ref. label-only.sh (ImageNet only)",
    "signhunter": "Al-Dujaili & O'Reilly 2020: no hyper-parameters",
    "zoo": "Chen et al. 2017 (ZOO); ref. test_all.py, README",
    "rays": "Chen & Gu 2020 (RayS); ref. RayS.py",
    "signopt": "Cheng et al. 2020 (Sign-OPT); ref. attack/Sign_OPT.py",
    "opt": "Cheng et al. 2019 (OPT); ref. attack/OPT_attack.py",
    "boundary": "Brendel et al. 2018; ref. Foolbox BoundaryAttack",
    "zo_signsgd": "Liu et al. 2019; l_inf settings: Al-Dujaili & O'Reilly's benchmark configs",
    "parsimonious": "Moon et al. 2019; ref. cifar10/main.py, imagenet/main.py",
    "cw": "Carlini & Wagner 2017; ref. l2_attack.py",
    "pgd": "Madry et al. 2018 (step eps/4: the default)",
    "subspace": "Guo et al. 2019; ref. attack.py defaults",
    "autozoom_ae": "Tu et al. 2019 (AutoZOOM); ref. main.py, README",
    "zoo_ae": "Tu et al. 2019 (AutoZOOM); ref. main.py, README",
    "evolutionary": "Dong et al. 2019; ARES test_iteration.sh (CIFAR-10 only)",
}
IMAGENET_SIZE = {  # "size-free": no preset value depends on the input size
    "hsja": "size-free", "hsja_linf": "size-free", "geoda": "224", "signflip": "224", "bandits_td": "299",
    "autozoom": "299", "autozoom_bi": "299", "genattack": "299", "prgf": "299", "square_linf": "224/299",
    "square_l2": "224/299", "simba_pixel": "224", "simba_dct": "224", "nes": "299", "nes_pi": "299",
    "nes_label_only": "299", "signhunter": "size-free", "zoo": "299", "rays": "size-free",
    "signopt": "size-free", "opt": "size-free", "boundary": "size-free", "zo_signsgd": "299",
    "parsimonious": "299", "cw": "size-free", "pgd": "size-free", "subspace": "size-free",
    "autozoom_ae": "299", "zoo_ae": "299", "evolutionary": "·",
}

_VERIFIED = dict(name="verified", checks=9, count=False)  # RFD App. D.4: 9 fresh queries, not counted
_SINGLE = dict(name="single")

# RFD (Nguyen et al. 2024), App. D.3: its settings of the attacks it runs, per threat model.
_RFD_LINF = {"square_linf": dict(p_init=0.05),
             "nes": dict(samples=60, beta=0.01, lr=0.005)}  # 60 samples, finite-difference step 0.01, lr 0.005
_RFD_L2 = {"square_l2": dict(p_init=0.1),
           "nes": dict(samples=30, beta=0.005, lr=1.0)}  # 30 samples, finite-difference step 0.005, lr 1

PROTOCOL_PRESETS: dict[str, dict[str, Any]] = {
    "digits_linf": dict(
        dataset="digits", norm="linf", eps=BATTERY_EPS["linf"], budget=10_000, targeted=False,
        stop_rule=_SINGLE, image_size=8,
        papers=("the registry battery radius (registry.BATTERY_EPS); the battery itself runs each attack "
                "at its AttackSpec.battery budget (1 000-10 000)",)),
    "digits_l2": dict(
        dataset="digits", norm="l2", eps=BATTERY_EPS["l2"], budget=10_000, targeted=False,
        stop_rule=_SINGLE, image_size=8,
        papers=("the registry battery radius (registry.BATTERY_EPS); the battery itself runs each attack "
                "at its AttackSpec.battery budget (1 000-10 000)",)),
    "cifar10_linf_8_255": dict(
        dataset="cifar10", norm="linf", eps=8 / 255, budget=10_000, targeted=False,
        stop_rule=_SINGLE, image_size=32,
        papers=("the standard CIFAR-10 l_inf radius; RayS reference defaults (epsilon 0.031, query_limit "
                "10 000)", "SFA reference default linf = 0.031",
                "Square Attack README, post-averaging CIFAR-10 model (eps 8/255, 20 000 iterations)")),
    "cifar10_linf_0.05": dict(
        dataset="cifar10", norm="linf", eps=0.05, budget=10_000, targeted=False,
        stop_rule=_VERIFIED, image_size=224, attack_overrides=_RFD_LINF,
        papers=("RFD (Nguyen et al. 2024): App. D.3 (l_inf radius 0.05; tables at 1 000 and 10 000 queries), "
                "App. D.4 (9 verification queries, not counted); D.1: images resized to 224x224",)),
    "cifar10_l2_1": dict(
        dataset="cifar10", norm="l2", eps=1.0, budget=10_000, targeted=False,
        stop_rule=_SINGLE, image_size=32,
        papers=("SND (Byun et al. 2022), Sec. 4.1 (eps 1.0) and Table 2 (2K / 5K / 10K queries; BA, Sign-OPT, "
                "HSJA, GeoDA), success = within eps and budget",)),
    "cifar10_l2_5": dict(
        dataset="cifar10", norm="l2", eps=5.0, budget=10_000, targeted=False,
        stop_rule=_VERIFIED, image_size=224, attack_overrides=_RFD_L2,
        papers=("RFD: App. D.3 (l2 radius 5), App. E.1 / Table 9 (CIFAR-10, 1 000 and 10 000 queries); "
                "images resized to 224x224",)),
    "imagenet_linf_0.05": dict(
        dataset="imagenet", norm="linf", eps=0.05, budget=10_000, targeted=False,
        stop_rule=_VERIFIED, image_size=224, attack_overrides=_RFD_LINF,
        papers=("RFD: App. D.3-D.4 (radius 0.05, 10 000 queries, verified)",
                "Square Attack, Bandits-TD, NES, SignHunter on ImageNet: eps 0.05, 10 000 queries "
                "(undefended, where the stop rules coincide)")),
    "imagenet_l2_5": dict(
        dataset="imagenet", norm="l2", eps=5.0, budget=10_000, targeted=False,
        stop_rule=_SINGLE, image_size=224,
        papers=("SND (Byun et al. 2022): eps 5.0, Table 3 (5K / 10K / 20K queries; SimBA, SimBA-DCT, "
                "Bandit-TD)", "Square Attack, Bandits-TD on ImageNet: eps 5, 10 000 queries")),
}


# ----------------------------------------------------------------------------- look-ups

def _resolve(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return name


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")


def config_fields(name: str) -> dict[str, Any]:
    """``{field: default}`` of attack ``name``'s config class (an alias is accepted)."""
    spec = ATTACKS[_resolve(name)]
    return {f.name: f.default for f in dataclasses.fields(spec.config)}


def _check_fields(name: str, keys) -> None:
    fields = config_fields(name)
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attack {name!r}; valid: {sorted(fields)}")


def attack_config(name: str, dataset: str, **overrides) -> dict[str, Any]:
    """Config overrides of attack ``name`` for ``dataset``, merged with explicit ``overrides`` (they win).

    The dataset preset (:data:`ATTACK_PRESETS`), then the norm preset (:data:`NORM_PRESETS`) of the
    norm the attack will run in (``overrides["norm"]``, else its config default), then ``overrides``.
    ``"digits"`` has no presets (the config defaults are the digits settings), so it returns the
    overrides alone; so does a registered attack without presets. Raises ``ValueError`` for an unknown
    attack, dataset or config field, listing the valid ones.
    """
    name = _resolve(name)
    _check_dataset(dataset)
    _check_fields(name, overrides)
    cfg = dict(ATTACK_PRESETS.get(name, {}).get(dataset, {}))
    norm = overrides.get("norm", config_fields(name).get("norm"))
    cfg.update(NORM_PRESETS.get(name, {}).get(dataset, {}).get(norm, {}))
    cfg.update(overrides)
    return cfg


def protocol(name: str) -> dict[str, Any]:
    """A copy of the named protocol (:data:`PROTOCOL_PRESETS`); ``ValueError`` lists the valid names."""
    if name not in PROTOCOL_PRESETS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOL_PRESETS)}")
    return copy.deepcopy(PROTOCOL_PRESETS[name])


def stop_rule(name: str) -> StopRule:
    """The :class:`~rnd_jax.attacks.driver.StopRule` of the named protocol."""
    return StopRule(**protocol(name)["stop_rule"])


def preset_config(name: str, dataset: str, protocol_name: str | None = None, **overrides) -> dict[str, Any]:
    """The keyword config :func:`make_preset_attack` builds attack ``name`` from.

    Merge order (later wins): :func:`attack_config` for ``dataset`` (its norm preset chosen by the norm
    the attack will run in), the protocol's ``norm`` / ``eps`` / ``targeted`` where the config has those
    fields, the protocol's settings for this attack (``attack_overrides``), explicit ``overrides``. The
    protocol must be for ``dataset``.
    """
    name = _resolve(name)
    _check_dataset(dataset)
    _check_fields(name, overrides)
    fields = config_fields(name)
    threat: dict[str, Any] = {}
    own: dict[str, Any] = {}
    if protocol_name is not None:
        p = protocol(protocol_name)
        if p["dataset"] != dataset:
            raise ValueError(f"protocol {protocol_name!r} is for {p['dataset']!r}, not {dataset!r}")
        threat = {k: p[k] for k in THREAT_FIELDS if k in fields}
        own = p.get("attack_overrides", {}).get(name, {})
    norm = {"norm": overrides.get("norm", threat.get("norm"))} if "norm" in fields else {}
    cfg = attack_config(name, dataset, **{k: v for k, v in norm.items() if v is not None})
    cfg.update(threat)
    cfg.update(own)
    cfg.update(overrides)
    return cfg


def make_preset_attack(name: str, dataset: str, protocol_name: str | None = None, ctx: Context | None = None,
                       **overrides):
    """Build attack ``name`` with its ``dataset`` presets under protocol ``protocol_name`` (if given).

    The protocol sets ``norm`` / ``eps`` / ``targeted`` where the attack's config has those fields (see
    :func:`preset_config` for the merge order); then :func:`rnd_jax.attacks.make_attack` builds the
    attack with ``ctx``. Building traces nothing. A combination the attack does not support (an l2
    protocol for an l_inf-only attack, an untargeted protocol for NES-PI) raises ``ValueError``.
    """
    cfg = preset_config(name, dataset, protocol_name, **overrides)
    name = _resolve(name)
    try:
        return make_attack(name, ctx, **cfg)
    except ValueError as e:
        where = f" under protocol {protocol_name!r}" if protocol_name is not None else ""
        raise ValueError(f"attack {name!r} with the {dataset!r} presets{where}: {e}") from e


# ----------------------------------------------------------------------------- the docstring table

def _fmt(v) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _cell(base: dict, norms: dict, field: str) -> str:
    parts = [_fmt(base[field])] if field in base else []
    parts += [f"{n}: {_fmt(o[field])}" for n, o in norms.items() if field in o]
    return ", ".join(parts) if parts else "·"


def preset_table() -> str:
    """The module docstring's table of :data:`ATTACK_PRESETS` and :data:`NORM_PRESETS` (markdown)."""
    rows = ["| attack | field | digits | CIFAR-10 | ImageNet | ImageNet res. | source |",
            "|---|---|---|---|---|---|---|"]
    for name, per in ATTACK_PRESETS.items():
        defaults = config_fields(name)
        norms = NORM_PRESETS.get(name, {})
        fields: list[str] = []
        for ds in ("cifar10", "imagenet"):
            for f in list(per.get(ds, {})) + [f for o in norms.get(ds, {}).values() for f in o]:
                if f not in fields:
                    fields.append(f)
        if not fields:
            rows.append(f"| {name} | — | | | | {IMAGENET_SIZE[name]} | {SOURCES[name]} |")
            continue
        for i, f in enumerate(fields):
            cells = [_cell(per.get(ds, {}), norms.get(ds, {}), f) for ds in ("cifar10", "imagenet")]
            head = (name, IMAGENET_SIZE[name], SOURCES[name]) if i == 0 else ("", "", "")
            rows.append(f"| {head[0]} | {f} | {_fmt(defaults[f])} | {cells[0]} | {cells[1]} | {head[1]} | "
                        f"{head[2]} |")
    return "\n".join(rows)
