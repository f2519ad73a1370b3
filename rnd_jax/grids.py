"""Built-in sweep grids: one per table of the papers, on our data (see :mod:`rnd_jax.sweep` for the format).

``GRIDS[name]`` is a plain grid dict. Attack names are looked up in the attack registry only when a
grid is used (:func:`rnd_jax.sweep.expand` fails naming any attack that is not registered;
``experiments.sweep --skip-missing`` runs the rest and says which are missing). Each grid has three
sizes: ``--smoke`` (seconds to a few minutes, for tests), the default (minutes on 2 CPU cores) and
``--full`` (the paper's attacks, more images and budgets, for an accelerator). The ``table`` block
tells :mod:`experiments.paper_tables` how to lay the results out: ``rows`` and ``cols`` are keys of
:func:`rnd_jax.sweep.flat` rows, ``values`` are metrics (also ``<kind>@B``: a success notion
``asr`` / ``asr_stop`` / ``asr_clean`` / ``asr_lucky`` within ``B`` queries, ``robust[_all][_stop]@B`` the
matching robust accuracy, ``@BxM`` with ``B`` scaled by the cell's EOT repeats; ``failure`` =
1 - asr, ``acc_drop``, ``l2_per_pixel_e4``).

**Each grid follows the protocol of its paper** (:mod:`rnd_jax.evaluate`), and its ``note`` says, point
by point, what still differs from the paper:

- Aithal & Li, "Mitigating Black-Box Adversarial Attacks via Output Noise Perturbation", IEEE Access
  2022 (output noise ``sigma`` on the probabilities). Their ASR is the attack's own verdict from its
  noisy answers: stop rule ``single``, reported as ``asr_lucky``, with ``asr`` (majority of 9 fresh
  defended checks at the final point) beside it. Hard-label answers are ``argmax(F(x) + sigma v)``
  (``output_noise`` with ``postprocess=False``); soft labels are post-processed ``min(|F + sigma v|, 1)``.
  Every query counts.
- SND: Byun, Go & Kim, "On the Effectiveness of Small Input Noise for Defending Against Query-based
  Black-Box Attacks", WACV 2022 (input noise ``nu``). Success: the attack found an adversarial image
  within eps and the query budget (its own verdict at its final point: ``asr_lucky``, stop rule
  ``single``), at 2K / 5K / 10K (CIFAR-10) or 5K / 10K / 20K (ImageNet) queries; ``P_mis`` over the
  attack's queries and on clean images; budgets ``2K x T`` for the expectation attack.
- RND: Qin, Fan, Zha & Wu, "Random Noise Defense Against Query-Based Black-Box Attacks", NeurIPS
  2021 (input noise ``nu`` vs the attacker's finite-difference step ``mu``): attack failure rate,
  stop rule ``single``; EOT in the "adaptive" setting (budget x M) and the "fixed" one (equal budget).
- RFD: Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against Query-Based
  Adversarial Attacks", ICLR 2024 (feature noise at a hidden layer). Stop rule ``verified`` (9 defended
  checks at each claimed success, not counted), images drawn from the whole test set with every class
  (``pool="all"``, ``balanced``), robust accuracy over all of them (``robust_all_stop``), at 1 000 and
  10 000 queries; defenses calibrated to the same clean-accuracy drop (ImageNet tables 1% / 2%,
  CIFAR-10 tables 2% / 4%); the attacks' settings of App. D.3.

What differs from every paper: the data are scikit-learn's 8x8 digits in [0, 1] (not MNIST / CIFAR-10
/ ImageNet), the model is ``digits_cnn`` (3 marked layers), and image counts and budgets are smaller
(each grid's ``note``). Targeted grids use each attack's registry battery threat model (l_inf eps 0.3,
l_2 eps 2.0); untargeted grids use :data:`UNTARGETED_EPS` (l_inf 0.15, l_2 1.0), because at the battery
radii most untargeted attacks succeed within a few queries whatever the defense. Input-noise levels are
on the same [0, 1] pixel scale as the papers' and are used as printed; feature-noise levels are
calibrated, never copied.
"""

from __future__ import annotations

SIGMAS = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # Aithal & Li's output-noise levels
FULL_IMAGES = 300  # --full: digits has 353 correctly classified test images
RFD_FULL_IMAGES = 350  # --full of the RFD grids (pool "all": 35 per class of the 360 test images)
NES = {"name": "nes", "config": {"samples": 50, "beta": 1e-3}}  # Aithal & Li: J = 50, beta = 1e-3
HARD_LABEL = {"postprocess": False}  # Aithal & Li's hard label argmax(F(x) + sigma v)

# RFD App. D.3: NES with 60 samples, finite-difference step 0.01, lr 0.005 at eps 0.05 (= eps / 10, our l_inf
# default); Square with p_init 0.05 (l_inf); SignHunter with its defaults.
RFD_CONFIG = {"nes": {"samples": 60, "beta": 0.01}, "square_linf": {"p_init": 0.05}}
RFD_NES = {"name": "nes", "config": RFD_CONFIG["nes"]}
RFD_SQUARE = {"name": "square_linf", "config": RFD_CONFIG["square_linf"]}
RFD_SCORE = [RFD_SQUARE, RFD_NES, "signhunter"]
RFD_PROTOCOL = {"stop_rule": "verified", "pool": "all", "balanced": True}

# Untargeted threat model of the tables: the battery radii (l_inf 0.3, l_2 2.0) let most untargeted attacks
# succeed on 8x8 digits within a few queries, which hides any defense; these radii leave undefended
# untargeted NES / Square / HSJA / RayS at roughly 50-90% success within 2 000 queries.
UNTARGETED_EPS = {"linf": 0.15, "l2": 1.0}
NORM_OF = {name: "l2" for name in ("hsja", "opt", "signopt", "geoda", "boundary", "simba_dct", "simba_pixel",
                                   "square_l2", "zoo", "autozoom", "autozoom_bi", "prgf")}
NORM_OF.update({"zoo_ae": "l2", "autozoom_ae": "l2"})
# Aithal & Li ran l2 attacks only: ZOO-AE in l2 at the targeted battery radius (its registry threat model is l_inf)
ZOO_AE_L2 = {"name": "zoo_ae", "config": {"norm": "l2", "eps": 2.0}}
NORM_OF.update({name: "linf" for name in ("nes", "square_linf", "bandits_td", "signhunter", "genattack", "rays",
                                          "signflip", "hsja_linf", "nes_label_only", "nes_pi")})

GRIDS: dict[str, dict] = {}


def untargeted_threat(entry):
    """An attack entry with the untargeted radius of its norm (entries that set eps keep theirs)."""
    e = {"name": entry} if isinstance(entry, str) else dict(entry)
    norm = e.get("config", {}).get("norm") or NORM_OF.get(e["name"])
    if norm is not None and "eps" not in e.get("config", {}):
        e["config"] = {"norm": norm, "eps": UNTARGETED_EPS[norm], **e.get("config", {})}
    return e


def _add(grid: dict) -> None:
    if grid.get("targeted") is False:
        for g in (grid, grid.get("smoke") or {}, grid.get("full") or {}):
            if "attacks" in g:
                g["attacks"] = [untargeted_threat(a) for a in g["attacks"]]
    GRIDS[grid["name"]] = grid


def _sigma_table(values, mirrors, title, rows=("attack",), note=""):
    return {"mirrors": mirrors, "title": title, "rows": list(rows), "cols": ["level"], "col_name": "sigma",
            "values": list(values), "note": note}


# ----------------------------------------------------------------------------- Aithal & Li (2022)

_AITHAL = ("Aithal & Li's protocol: stop rule single (the attack's own noisy verdict ends it), ASR = asr_lucky "
           "(that verdict), asr = a majority of 9 fresh defended answers at the final point. ")
_add({
    "name": "aithal_table2",
    "description": "targeted soft-label attacks x output noise sigma (Aithal & Li Table 2)",
    "attacks": [NES],
    "defenses": [{"name": "output_noise", "levels": SIGMAS}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 40,
    "smoke": {"n_images": 4, "budgets": [1_000], "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}],
              "acc_draws": 4},
    "full": {"attacks": [NES, "zoo", ZOO_AE_L2, "autozoom_ae", "autozoom", "autozoom_bi", "genattack",
                         "simba_pixel", "simba_dct", "nes_pi"],
             "n_images": FULL_IMAGES, "budgets": [100_000]},
    "table": _sigma_table(["asr_lucky", "asr", "queries_mean", "asr_clean"], "Aithal & Li (2022), Table 2",
                          "Targeted soft-label attacks vs output noise: ASR (the attack's own verdict), the "
                          "majority-of-9 check, and mean queries of the successes",
                          note=_AITHAL + "Differs: digits 8x8 (MNIST / CIFAR-10 / ImageNet in the paper); 100 images "
                          "(900 on MNIST); budget 10 000 queries (their QC limits 2e4 to 1e6); NES only by default "
                          "(--full adds ZOO, ZOO+AE, AZ+AE, AutoZOOM, AZ+Bi, GenAttack, SimBA, NES-PI at 1e5; ZOO+AE and AZ+AE "
                          "search the 4x4x1 code of an autoencoder of the training digits, in l2 as in the paper)."),
})


def _hard_label(name: str, targeted: bool, attacks, full_attacks, table: str, note: str) -> dict:
    """Aithal & Li's hard-label tables (3: targeted, 10: untargeted) x output noise sigma."""
    return {
        "name": name,
        "description": f"{'targeted' if targeted else 'untargeted'} hard-label attacks x output noise sigma "
                       f"(Aithal & Li {table})",
        "attacks": attacks,
        "defenses": [{"name": "output_noise", "levels": SIGMAS, "options": HARD_LABEL}],
        "targeted": targeted, "budgets": [2_000], "n_images": 20, "acc_draws": 20,
        "smoke": {"attacks": attacks[:1], "n_images": 4, "budgets": [600], "acc_draws": 4,
                  "defenses": [{"name": "output_noise", "levels": [0.0, 1e-1], "options": HARD_LABEL}]},
        "full": {"attacks": full_attacks, "n_images": FULL_IMAGES, "budgets": [10_000]},
        "table": _sigma_table(["asr_lucky", "asr", "queries_mean", "l2"], f"Aithal & Li (2022), {table}",
                              f"{'Targeted' if targeted else 'Untargeted'} hard-label attacks see only "
                              f"argmax(F(x) + sigma v): ASR within eps, the majority check, mean queries, L2",
                              note=_AITHAL + note),
    }


_add(_hard_label("aithal_table3", True, ["opt", "signopt"], ["opt", "signopt", "nes_label_only", "boundary", "hsja"],
                 "Table 3", "Differs: digits; 20 images and 2 000 queries (the paper's attacks run up to millions of "
                 "queries); OPT and Sign-OPT (their MNIST / CIFAR-10 rows); --full adds NES label-only, Boundary "
                 "and HSJA (their ImageNet rows) at 10 000 queries."))
_add(_hard_label("aithal_table10", False, ["opt", "signopt", "boundary", "hsja"],
                 ["opt", "signopt", "boundary", "hsja"], "Table 10",
                 "Differs: digits; 20 images and 2 000 queries; l2 eps 1.0 on 8x8 images."))

_BITS = [8, 4, 2]
_add({
    "name": "aithal_table5",
    "description": "ZOO / AutoZOOM vs quantization and output-correlated noise (Aithal & Li Table 5, Lemma 2)",
    "attacks": ["zoo", "autozoom_ae", "autozoom"],
    "defenses": ["none", {"name": "quantize", "levels": _BITS},
                 {"name": "correlated_noise", "levels": [1e-3, 1e-1], "options": {"sigma": 1e-8}},
                 {"name": "output_noise", "levels": [round(1 / (2 ** b - 1) / 12 ** 0.5, 8) for b in _BITS],
                  "label": "white noise of the same SNR"}],
    "targeted": True, "n_images": 50, "acc_draws": 20,
    "smoke": {"attacks": ["autozoom"], "n_images": 4, "budgets": [400], "acc_draws": 4,
              "defenses": [{"name": "quantize", "levels": [2]}, {"name": "correlated_noise", "levels": [1e-1],
                                                                 "options": {"sigma": 1e-8}}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [100_000]},
    "table": {"mirrors": "Aithal & Li (2022), Table 5", "rows": ["defense", "level", "opt.sigma"],
              "cols": ["attack"], "col_name": "attack", "values": ["asr_lucky", "asr", "queries_mean"],
              "title": "Targeted ZOO, AutoZOOM-AE and AutoZOOM vs deterministic output distortions: quantization to b bits "
                       "(level = b) and output-correlated noise alpha F(x) + N(0, sigma^2) with residual sigma = "
                       "1e-8 (level = alpha)",
              "note": _AITHAL + "Lemma 2: noise that is a function of the clean output does not randomize the "
                      "attacker's estimate; only the white part does. Differs: digits; 50 images; each attack at "
                      "its registry budget (ZOO 10 000, AutoZOOM 2 000; the paper 1e5); the paper's AZ+AE (autozoom_ae: "
                      "the 4x4x1 code of an autoencoder of the training digits, l2 eps 2.0) and, beside it, "
                      "AutoZOOM without the autoencoder (ours); the white-noise rows of the same output SNR "
                      "(sigma = Delta / sqrt(12)) are ours, for comparison."},
})

_add({
    "name": "aithal_table6",
    "description": "NES finite-difference step beta x output noise sigma (Aithal & Li Table 6)",
    "attacks": [{"name": "nes", "config": {"samples": 50}, "sweep": {"beta": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]}}],
    "defenses": [{"name": "output_noise", "levels": SIGMAS[:5]}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 20,
    "smoke": {"n_images": 4, "budgets": [1_000], "acc_draws": 4,
              "attacks": [{"name": "nes", "config": {"samples": 50}, "sweep": {"beta": [1e-3, 1e-1]}}],
              "defenses": [{"name": "output_noise", "levels": [0.0, 1e-3]}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [100_000]},
    "table": {"mirrors": "Aithal & Li (2022), Table 6", "rows": ["cfg.beta"], "cols": ["level"], "col_name": "sigma",
              "values": ["asr_lucky", "asr", "queries_mean"],
              "title": "Targeted NES: a larger finite-difference step beta against output noise sigma",
              "note": _AITHAL + "Lemma 1: the SNR of the NES factor grows as beta^2/sigma^2, but a large beta "
                      "biases the gradient estimate. Differs: digits (ImageNet in the paper); 100 images; 10 000 "
                      "queries (their 1e6)."},
})


def _repeated_autozoom(name: str, eot_budget: str, title: str, note: str) -> dict:
    """Aithal & Li Table 7: AutoZOOM with N repeated queries of every point (N = eot)."""
    return {
        "name": name,
        "description": f"AutoZOOM with N repeated queries (EOT mean), {eot_budget} budget x sigma "
                       f"(Aithal & Li Table 7, Theorem 4)",
        "attacks": [{"name": "autozoom", "eot": [1, 10, 100]}],
        "defenses": [{"name": "output_noise", "levels": [0.0, 1e-4, 1e-2]}],
        "targeted": True, "budgets": [2_000], "n_images": 50, "acc_draws": 20, "eot_budget": eot_budget,
        "smoke": {"n_images": 4, "budgets": [200], "acc_draws": 4, "attacks": [{"name": "autozoom", "eot": [1, 5]}],
                  "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}]},
        "full": {"n_images": FULL_IMAGES, "attacks": [{"name": "autozoom", "eot": [1, 10, 100, 1000]}]},
        "table": {"mirrors": "Aithal & Li (2022), Table 7 and Theorem 4", "rows": ["eot"], "cols": ["level"],
                  "col_name": "sigma", "values": ["asr_lucky", "asr", "queries_mean"], "title": title,
                  "note": _AITHAL + note},
    }


_add(_repeated_autozoom(
    "aithal_table7", "scaled",
    "Targeted AutoZOOM averaging N repeated queries of every point (N = eot); the budget grows with N (N x 2 000 "
    "queries), as in the paper",
    "Averaging N answers divides the noise variance by N. Differs: digits; 50 images; base budget 2 000 (theirs "
    "1e5); N up to 100 (1000 with --full); AutoZOOM without the autoencoder."))
_add(_repeated_autozoom(
    "aithal_table7_equal", "equal",
    "Targeted AutoZOOM averaging N repeated queries of every point (N = eot), all at the same total budget of "
    "2 000 queries (every repeat counts): the equal-budget variant, not the paper's setting",
    "At a fixed budget the attack takes N times fewer steps."))

_add({
    "name": "aithal_table8",
    "description": "NES sample count J at sigma = 1e-4 (Aithal & Li Table 8)",
    "attacks": [{"name": "nes", "config": {"beta": 1e-3}, "sweep": {"samples": [50, 100]}}],
    "defenses": [{"name": "output_noise", "levels": [0.0, 1e-4]}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 20,
    "smoke": {"n_images": 4, "budgets": [1_000], "acc_draws": 4,
              "attacks": [{"name": "nes", "config": {"beta": 1e-3}, "sweep": {"samples": [10, 20]}}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [100_000]},
    "table": {"mirrors": "Aithal & Li (2022), Table 8", "rows": ["cfg.samples"], "cols": ["level"],
              "col_name": "sigma", "values": ["asr_lucky", "asr", "queries_mean"],
              "title": "Targeted NES with more samples J per gradient estimate against output noise sigma = 1e-4",
              "note": _AITHAL + "Differs: digits (ImageNet); 100 images; 10 000 queries; sigma = 0 added as the "
                      "reference; the table's untargeted P-RGF row is not in this grid (one goal per grid): run "
                      "aithal_table9's P-RGF with samples 50 / 100."},
})

_add({
    "name": "aithal_table9",
    "description": "untargeted soft-label attacks x output noise sigma (Aithal & Li Table 9)",
    "attacks": ["zoo", "autozoom_ae", "simba_pixel", "simba_dct", "prgf"],
    "defenses": [{"name": "output_noise", "levels": SIGMAS}],
    "targeted": False, "n_images": 30, "acc_draws": 20,
    "smoke": {"attacks": ["simba_dct"], "n_images": 4, "budgets": [300], "acc_draws": 4,
              "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [20_000]},
    "table": _sigma_table(["asr_lucky", "asr", "queries_mean"], "Aithal & Li (2022), Table 9",
                          "Untargeted soft-label attacks vs output noise",
                          note=_AITHAL + "The paper's rows: ZOO, AZ+AE (autozoom_ae: AutoZOOM in the 4x4x1 code of an "
                          "autoencoder of the training digits), SimBA-pixel, SimBA-DCT, P-RGF. Differs: digits; 30 "
                          "images; each attack at its registry budget (ZOO 10 000, AutoZOOM-AE 2 000, SimBA 1 000, "
                          "P-RGF 10 000); l2 eps 1.0."),
})

_add({
    "name": "aithal_table12",
    "description": "distortion of successful targeted attacks x sigma (Aithal & Li Table 12; same cells as table 2)",
    "attacks": [NES],
    "defenses": [{"name": "output_noise", "levels": SIGMAS}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 40,
    "smoke": {"n_images": 4, "budgets": [1_000], "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}],
              "acc_draws": 4},
    "full": {"attacks": [NES, "zoo", ZOO_AE_L2, "autozoom_ae", "autozoom", "autozoom_bi", "genattack",
                         "simba_pixel", "simba_dct", "nes_pi"],
             "n_images": FULL_IMAGES, "budgets": [100_000]},
    "table": _sigma_table(["l2_per_pixel_e4", "l2", "linf"], "Aithal & Li (2022), Table 12",
                          "Distortion of the successful adversarial examples (per-pixel L2 = ||delta||_2 / d, "
                          "x 1e-4 as in the paper; successes by the majority check)",
                          note="The cells are those of aithal_table2: --results <its folder> reuses them."),
})

# ----------------------------------------------------------------------------- SND (Byun et al. 2022)

_SND = ("SND's protocol: success = the attack found an adversarial image within eps and the query budget (its own "
        "verdict at its final point: asr_lucky; stop rule single); asr = a majority of 9 fresh defended answers. ")
SND_NUS = [0.0, 0.001, 0.01]  # SND's sigma = 0.001, 0.01 (input noise std on [0, 1] images)
SND_DECISION = ["boundary", "signopt", "hsja", "geoda"]

_add({
    "name": "snd_table2",
    "description": "untargeted decision-based attacks x input noise nu at 2K / 5K / 10K queries (SND Table 2)",
    "attacks": SND_DECISION,
    "defenses": [{"name": "input_noise", "levels": SND_NUS}],
    "targeted": False, "budgets": [10_000], "n_images": 20, "acc_draws": 20,
    "smoke": {"attacks": ["hsja"], "n_images": 4, "budgets": [600], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.0, 0.01]}]},
    "full": {"n_images": FULL_IMAGES},
    "table": {"mirrors": "SND (Byun et al. 2022), Table 2", "rows": ["attack"], "cols": ["level"], "col_name": "nu",
              "values": ["asr_lucky@2000", "asr_lucky@5000", "asr_lucky", "asr"],
              "title": "Decision-based attacks vs small input noise nu: ASR (%) at 2K / 5K / 10K queries",
              "note": _SND + "Differs: digits (CIFAR-10, ResNet-20); 20 images (1 000); l2 eps 1.0 on 8x8 images "
                      "(1.0 on 32x32x3); the RSE and PNI rows (trained defenses) are not in the registry yet."},
})

_add({
    "name": "snd_table3",
    "description": "untargeted decision- and score-based l2 attacks (and the l_inf Subspace attack) x input noise nu "
                   "at 5K / 10K / 20K (SND Table 3, Sec. 4.8)",
    "attacks": ["signopt", "hsja", "geoda", "simba_pixel", "simba_dct", {"name": "bandits_td",
                                                                        "config": {"norm": "l2"}},
                {"name": "subspace", "config": {"norm": "linf"}}],
    "defenses": [{"name": "input_noise", "levels": SND_NUS}],
    "targeted": False, "budgets": [20_000], "n_images": 10, "acc_draws": 20, "tap": True,
    "smoke": {"attacks": ["simba_dct"], "n_images": 3, "budgets": [300], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.0, 0.01]}]},
    "full": {"n_images": 100},
    "table": {"mirrors": "SND (Byun et al. 2022), Table 3", "rows": ["attack"], "cols": ["level"], "col_name": "nu",
              "values": ["asr_lucky@5000", "asr_lucky@10000", "asr_lucky", "asr", "l2_query"],
              "title": "l2 attacks vs small input noise nu: ASR at 5K / 10K / 20K queries and the mean l2 distance "
                       "of the last query image to x0 (the paper's figure in parentheses)",
              "note": _SND + "Every query is seen on the host (tap), so each image runs alone (the batched run's "
                      "keys and queries). Differs: digits (ImageNet, ResNet-50); 10 images (250); l2 eps 1.0 (5.0 on "
                      "224x224x3); l2_query at the full budget only (the paper gives it at each budget); the PGD-AT "
                      "and R&P rows are not in the registry yet. Subspace (the hybrid attack of Sec. 4.8, whose "
                      "results the paper gives in its supplement): l_inf as in the paper (the authors give settings "
                      "for l_inf only), at the grids' untargeted l_inf eps 0.15, with two reference models that are "
                      "digits_cnn trained with other seeds (train_seed + 1, + 2; the paper: pre-trained ResNet-18 and "
                      "ResNet-34), 20 000 queries like the rest; not in the smoke size (its two reference models "
                      "would be trained first)."},
})

_add({
    "name": "snd_table4",
    "description": "P_mis = P(h(x) != h(x + eta)) over the attacks' queries and on clean images (SND Table 4)",
    "attacks": SND_DECISION,
    "defenses": [{"name": "input_noise", "levels": SND_NUS[1:]}],
    "targeted": False, "budgets": [10_000], "n_images": 20, "acc_draws": 20, "tap": True,
    "smoke": {"attacks": ["hsja"], "n_images": 3, "budgets": [600], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.01]}]},
    "full": {"n_images": FULL_IMAGES},
    "table": {"mirrors": "SND (Byun et al. 2022), Table 4", "rows": ["attack"], "cols": ["level"], "col_name": "nu",
              "values": ["p_mis", "p_mis_clean", "asr_lucky"],
              "title": "P_mis: the share of the attack's queries whose defended label differs from the undefended "
                       "label at the same point (p_mis), and the same on clean test images (p_mis_clean, mean of "
                       "20 draws; the paper's 'None' row)",
              "note": _SND + "Differs: digits (CIFAR-10); 20 images; 10 000 queries."},
})


def _snd_eot(name: str, eot_budget: str, title: str, note: str, tap: bool) -> dict:
    """SND Table 5: HSJA with every query repeated T times (majority label), nu = 0.01."""
    values = (["asr_lucky@2000xM", "asr_lucky@5000xM", "asr_lucky", "asr"] if eot_budget == "scaled"
              else ["asr_lucky@2000", "asr_lucky@5000", "asr_lucky", "asr"]) + (["p_mis"] if tap else [])
    return {
        "name": name,
        "description": f"SND vs the expectation attack: HSJA with T repeated queries, {eot_budget} budget (SND Table 5)",
        "attacks": [{"name": "hsja", "eot": [1, 5, 10]}],
        "defenses": [{"name": "input_noise", "levels": [0.01]}],
        "targeted": False, "budgets": [10_000], "n_images": 10, "acc_draws": 20, "eot_budget": eot_budget,
        "tap": tap,
        "smoke": {"attacks": [{"name": "hsja", "eot": [1, 2]}], "n_images": 3, "budgets": [900], "acc_draws": 4},
        "full": {"attacks": [{"name": "hsja", "eot": [1, 5, 10, 20]}], "n_images": 100},
        "table": {"mirrors": "SND (Byun et al. 2022), Table 5", "rows": ["attack", "eot"], "cols": ["level"],
                  "col_name": "nu", "values": values, "title": title, "note": _SND + note},
    }


_add(_snd_eot("snd_table5", "scaled",
              "Adaptive (expectation) HSJA: every query repeated T times, majority label; ASR at 2K x T, 5K x T and "
              "10K x T queries (the paper's budgets), and P_mis over all its queries",
              "Differs: digits (CIFAR-10); 10 images; T up to 10 (20 with --full).", tap=True))
_add(_snd_eot("snd_table5_equal", "equal",
              "Adaptive HSJA with T repeats at the same total budget (2K / 5K / 10K queries, every repeat "
              "counted): the equal-budget variant (the paper's last row compares this way)",
              "At a fixed budget the attack takes T times fewer steps.", tap=False))

# ----------------------------------------------------------------------------- RND (Qin et al. 2021)

_RND = "RND's protocol: attack failure rate = 1 - ASR, stop rule single; "
_RND_NUS = [0.0, 0.005, 0.01, 0.02, 0.05]
_add({
    "name": "rnd_mu_nu",
    "description": "RND: attack failure rate over the (mu, nu) grid, NES (mu = beta) and Square (mu ~ p_init)",
    "attacks": [{"name": "nes", "config": {"samples": 50}, "sweep": {"beta": [1e-3, 5e-3, 1e-2, 5e-2]}},
                {"name": "square_linf", "sweep": {"p_init": [0.05, 0.3]}}],
    "defenses": [{"name": "input_noise", "levels": _RND_NUS}],
    "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20,
    "smoke": {"attacks": [{"name": "nes", "config": {"samples": 10}, "sweep": {"beta": [1e-3, 5e-2]}}],
              "n_images": 4, "budgets": [330], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.0, 0.02]}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "RND (Qin et al. 2021): failure rate over (mu, nu)", "rows": ["attack", "cfg.beta",
                                                                                      "cfg.p_init"],
              "cols": ["level"], "col_name": "nu", "values": ["failure", "queries_mean"],
              "title": "Attack failure rate (1 - ASR by the majority check) of untargeted NES (finite-difference "
                       "step mu = beta) and Square (its square size p_init stands in for mu) under input noise nu",
              "note": _RND + "Theorem 1: the defense works when nu/mu is large; the attacker answers with a larger "
                      "mu. Differs: digits (CIFAR-10 / ImageNet, VGG-16 / Inception-v3); 30 images; 2 000 queries."},
})


def _rnd_eot(name: str, eot_budget: str, title: str) -> dict:
    return {
        "name": name,
        "description": f"RND vs EOT with M samples per query, {eot_budget} budget (RND's EOT evaluation)",
        "attacks": [{"name": "nes", "config": {"samples": 50, "beta": 1e-3}, "eot": [1, 2, 5, 10]},
                    {"name": "square_linf", "eot": [1, 5, 10]}],
        "defenses": [{"name": "input_noise", "levels": [0.0, 0.02, 0.05]}],
        "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20, "eot_budget": eot_budget,
        "smoke": {"attacks": [{"name": "nes", "config": {"samples": 10, "beta": 1e-3}, "eot": [1, 5]}],
                  "n_images": 4, "budgets": [330], "acc_draws": 4,
                  "defenses": [{"name": "input_noise", "levels": [0.0, 0.05]}]},
        "full": {"attacks": [{"name": "nes", "config": {"samples": 50, "beta": 1e-3}, "eot": [1, 2, 5, 10, 20]},
                             {"name": "square_linf", "eot": [1, 5, 10, 20]}], "n_images": FULL_IMAGES,
                 "budgets": [10_000]},
        "table": {"mirrors": "RND (Qin et al. 2021): EOT with M samples (Theorem 2)", "rows": ["attack", "eot"],
                  "cols": ["level"], "col_name": "nu", "values": ["failure", "queries_mean"], "title": title,
                  "note": _RND + "Differs: digits; 30 images; base budget 2 000."},
    }


_add(_rnd_eot("rnd_eot", "scaled", "Expectation over M noisy answers per point, the budget growing with M (M x 2 000; "
                                   "RND's adaptive setting): failure rate and mean queries of the successes"))
_add(_rnd_eot("rnd_eot_equal", "equal", "Expectation over M noisy answers per point at the same total budget of "
                                        "2 000 queries (RND's fixed setting)"))

# ----------------------------------------------------------------------------- RFD (Nguyen et al. 2024)

_RFD = ("RFD's protocol (App. D.4): stop rule verified (9 defended checks at each claimed success, not counted), "
        "images from the whole test set with every class (misclassified ones count as not robust), robust accuracy "
        "over all of them (robust_all_stop). ")


def _rfd_defense_table(name: str, table: int, drops, dataset: str) -> dict:
    return {
        "name": name,
        "description": f"Square / NES / SignHunter vs input and feature noise at a {drops[0]:.0%} and {drops[1]:.0%} "
                       f"accuracy drop (RFD Table {table}, {dataset})",
        "attacks": RFD_SCORE,
        "defenses": ["none", {"name": "input_noise", "drops": drops}, {"name": "feature_noise", "drops": drops}],
        "targeted": False, "budgets": [10_000], "n_images": 20, "acc_draws": 20, "calib_draws": 20, **RFD_PROTOCOL,
        "smoke": {"attacks": [RFD_SQUARE], "n_images": 10, "budgets": [200], "acc_draws": 4, "calib_draws": 4,
                  "defenses": ["none", {"name": "feature_noise", "drops": drops[1:]}]},
        "full": {"n_images": RFD_FULL_IMAGES},
        "table": {"mirrors": f"RFD (Nguyen et al. 2024), Table {table}", "rows": ["defense", "drop"],
                  "cols": ["attack"], "col_name": "attack",
                  "values": ["robust_all_stop@1000", "robust_all_stop", "level", "acc_defended_mean"],
                  "title": "Robust accuracy (%) at 1 000 and 10 000 queries, over all selected images; defenses "
                           "calibrated to the same clean-accuracy drop",
                  "note": _RFD + f"Differs: digits ({dataset}); 20 images, 2 per class (1 000); l_inf eps 0.15 on "
                          "8x8 images (0.05 on 224x224x3); feature noise at the penultimate marked layer (dense1); "
                          "the 1 000-query column comes from the 10 000-query run (Square's schedule spans the "
                          "budget)."},
    }


_add(_rfd_defense_table("rfd_table1", 1, [0.01, 0.02], "ImageNet"))
_add(_rfd_defense_table("rfd_table2", 2, [0.02, 0.04], "CIFAR-10"))

_add({
    "name": "rfd_table5",
    "description": "decision-based attacks (RayS, Sign-Flip) vs input / feature noise (RFD Table 5, CIFAR-10)",
    "attacks": ["rays", "signflip"],
    "defenses": ["none", {"name": "input_noise", "drops": [0.04]}, {"name": "feature_noise", "drops": [0.04]}],
    "targeted": False, "budgets": [10_000], "n_images": 20, "acc_draws": 20, "calib_draws": 20, **RFD_PROTOCOL,
    "smoke": {"attacks": ["rays"], "n_images": 10, "budgets": [300], "acc_draws": 4, "calib_draws": 4,
              "defenses": ["none", {"name": "feature_noise", "drops": [0.04]}]},
    "full": {"n_images": RFD_FULL_IMAGES},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 5", "rows": ["defense", "drop"], "cols": ["attack"],
              "col_name": "attack", "values": ["robust_all_stop", "robust_all_stop@1000", "level",
                                               "acc_defended_mean"],
              "title": "Robust accuracy against decision-based attacks (10 000 queries; 1 000 beside)",
              "note": _RFD + "Differs: digits (CIFAR-10, ResNet-50 / VGG-19); 20 images; both defenses at a 4% drop "
                      "(the paper's rows are at 3-6%); the AAA row: rfd_table5_aaa; the paper does not "
                      "state the budget (10 000 here)."},
})


def _rfd_layers(name: str, table: str, defense: dict, title: str, note: str) -> dict:
    return {
        "name": name,
        "description": f"feature noise at each marked layer of digits_cnn, 1 000 queries (RFD {table})",
        "attacks": RFD_SCORE,
        "defenses": [defense],
        "targeted": False, "budgets": [1_000], "n_images": 30, "acc_draws": 20, "calib_draws": 20, **RFD_PROTOCOL,
        "smoke": {"attacks": [RFD_SQUARE], "n_images": 10, "budgets": [200], "acc_draws": 4, "calib_draws": 4,
                  "defenses": [dict(defense, sweep={"layers": ["conv1", "dense1"]})]},
        "full": {"n_images": RFD_FULL_IMAGES},
        "table": {"mirrors": f"RFD (Nguyen et al. 2024), {table}", "rows": ["opt.layers"], "cols": ["attack"],
                  "col_name": "attack", "values": ["robust_all_stop", "level", "acc_defended_mean"], "title": title,
                  "note": _RFD + note},
    }


_LAYERS = {"layers": ["conv1", "conv2", "dense1"]}
_add(_rfd_layers("rfd_table6", "Table 6", {"name": "feature_noise", "levels": [0.3], "sweep": _LAYERS},
                 "Feature noise of the same std nu = 0.3 at one layer at a time (digits_cnn's marked layers), 1 000 "
                 "queries; acc_defended_mean shows each layer's accuracy at that nu",
                 "Differs: digits (CIFAR-10, VGG-19 / ViT layers 1-15); 30 images; nu = 0.3 (the paper does not print "
                 "its fixed nu; 0.3 keeps every layer's drop at about 2% or less here); the GradNorm column is "
                 "experiments.defense_comparison's per-layer table."))
_add(_rfd_layers("rfd_table14", "Table 14", {"name": "feature_noise", "drops": [0.04], "sweep": _LAYERS},
                 "Feature noise at one layer at a time, each calibrated to a 4% clean-accuracy drop, 1 000 queries",
                 "Differs: digits (CIFAR-10); 30 images; the 'change of ratio' column is not computed here."))

_add({
    "name": "rfd_table7",
    "description": "EOT (M repeated queries) vs input / feature noise at a 2% drop, M x 1000 queries (RFD Table 7)",
    "attacks": [dict(RFD_SQUARE, eot=[1, 5, 10]), dict(RFD_NES, eot=[1, 5, 10]), {"name": "signhunter",
                                                                                 "eot": [1, 5, 10]}],
    "defenses": [{"name": "input_noise", "drops": [0.02]}, {"name": "feature_noise", "drops": [0.02]}],
    "targeted": False, "budgets": [1_000], "n_images": 20, "acc_draws": 20, "calib_draws": 20,
    "eot_budget": "scaled", **RFD_PROTOCOL,
    "smoke": {"attacks": [dict(RFD_SQUARE, eot=[1, 3])], "n_images": 10, "budgets": [100], "acc_draws": 4,
              "calib_draws": 4, "defenses": [{"name": "feature_noise", "drops": [0.02]}]},
    "full": {"n_images": RFD_FULL_IMAGES},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 7", "rows": ["attack", "eot"], "cols": ["defense"],
              "col_name": "defense (2% drop)", "values": ["robust_all_stop@1000", "robust_all_stop"],
              "title": "Robust accuracy under the expectation attack (M repeated queries per point, averaged): at "
                       "1 000 queries (QC = 1000) and at M x 1 000 queries",
              "note": _RFD + "Differs: digits (CIFAR-10, VGG-19 / ResNet-50); 20 images; the QC = 1000 column of "
                      "M > 1 comes from the M x 1 000 run."},
})

# ----------------------------------------------------------------------------- Aithal & Li Tables 4 and 11, RFD Table 5
# with AAA: other defenses beside output noise (JPEG compression, random resize-and-pad, AAA)

JPEG_QUALITY = 75  # Guo et al. (2018): quality 75
# Xie et al. (2018) enlarge 299 x 299 inputs by 0..31 pixels in a 331 x 331 frame (max_extra 32, 11% of the side);
# 11% of 8 pixels is 0.86, rounded to max_extra 1: the content keeps its size (e = 0) at a random offset in a 9 x 9
# frame, resized back to 8 x 8. Even that costs digits_cnn (never trained on shifted digits) 27% of its clean
# accuracy (0.71 over 10 draws; 0.58 at max_extra 2); their ImageNet models lost about 1%.
RRP_EXTRA = 1
_OTHER_DEFENSES = ["none", {"name": "jpeg", "levels": [JPEG_QUALITY]},
                   {"name": "random_resize_pad", "levels": [RRP_EXTRA]},
                   {"name": "output_noise", "levels": [1e-2, 1e-1]}]
_OTHER_SMOKE = [{"name": "jpeg", "levels": [JPEG_QUALITY]}, {"name": "random_resize_pad", "levels": [RRP_EXTRA]}]


def _defense_comparison(name: str, targeted: bool, attacks, table: str, paper: str, note: str) -> dict:
    """Aithal & Li Tables 4 (targeted) and 11 (untargeted): no defense, JPEG, random input (resize-pad), output
    noise."""
    return {
        "name": name,
        "description": f"{'targeted' if targeted else 'untargeted'} soft-label attacks vs JPEG, random resize-pad "
                       f"and output noise (Aithal & Li {table})",
        "attacks": attacks,
        "defenses": _OTHER_DEFENSES,
        "targeted": targeted, "n_images": 20, "acc_draws": 20,
        "smoke": {"attacks": attacks[:1], "n_images": 3, "budgets": [300], "acc_draws": 4, "defenses": _OTHER_SMOKE},
        "full": {"n_images": FULL_IMAGES, "budgets": [100_000]},
        "table": {"mirrors": f"Aithal & Li (2022), {table}", "rows": ["attack"], "cols": ["defense", "level"],
                  "col_name": "defense, level", "values": ["asr_lucky", "asr", "queries_mean", "acc_defended_mean"],
                  "title": f"{'Targeted' if targeted else 'Untargeted'} soft-label attacks: ASR (the attack's own "
                           f"verdict), the majority-of-9 check and mean queries under no defense, JPEG compression "
                           f"(quality {JPEG_QUALITY}), random resize-and-pad (Xie et al., max_extra {RRP_EXTRA}) and "
                           f"output noise sigma = 1e-2 / 1e-1",
                  "note": _AITHAL + "JPEG (Guo et al. 2018) and the random input (Xie et al. 2018) transform each "
                          "query before the model; both are applied as the paper compares them, with every query "
                          "counted. The paper's 'Our Method' column is output noise at sigma = 1e-2 or 1e-1 "
                          f"(its values match Tables 2 / 9 at those levels): both are here. Differs: {paper}; digits "
                          "8x8 (their CIFAR-10 / ImageNet), digits_cnn; 20 images (1 000 / 200); each attack at its "
                          "registry budget (ZOO, NES, GenAttack, P-RGF 10 000; the paper 1e5 to 1e6); random "
                          f"resize-pad at max_extra {RRP_EXTRA} on 8 pixels (32 on 299: 0.86 pixel here; a random "
                          "offset in a 9x9 frame, resized back to 8x8 for digits_cnn), which costs the undefended "
                          "model 27% of its clean accuracy (acc_defended_mean; theirs about 1%), so its row measures "
                          "a much weaker model; " + note},
    }


_add(_defense_comparison(
    "aithal_table4", True, [NES, "zoo", "genattack"], "Table 4",
    "the paper's rows are CIFAR-10 ZOO / GenAttack and ImageNet NES / GenAttack, one table here",
    "each attack in its registry threat model as in aithal_table2 (ZOO l2 eps 2.0, NES and GenAttack l_inf 0.3)."))
_add(_defense_comparison(
    "aithal_table11", False, ["zoo", "prgf"], "Table 11",
    "the paper's rows are CIFAR-10 ZOO and ImageNet P-RGF, one table here",
    "l2 attacks at eps 1.0, as aithal_table9."))

_add({
    "name": "rfd_table5_aaa",
    "description": "decision-based attacks (RayS, Sign-Flip) vs AAA, input and feature noise (RFD Table 5 with its "
                   "AAA row, CIFAR-10)",
    "attacks": ["rays", "signflip"],
    "defenses": ["none", {"name": "aaa", "levels": [4.0]}, {"name": "input_noise", "drops": [0.04]},
                 {"name": "feature_noise", "drops": [0.04]}],
    "targeted": False, "budgets": [10_000], "n_images": 20, "acc_draws": 20, "calib_draws": 20, **RFD_PROTOCOL,
    "smoke": {"attacks": ["rays"], "n_images": 10, "budgets": [300], "acc_draws": 4, "calib_draws": 4,
              "defenses": ["none", {"name": "aaa", "levels": [4.0]}]},
    "full": {"n_images": RFD_FULL_IMAGES},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 5", "rows": ["defense", "drop", "level"], "cols": ["attack"],
              "col_name": "attack", "values": ["robust_all_stop", "robust_all_stop@1000", "acc_defended_mean"],
              "title": "Robust accuracy against decision-based attacks (10 000 queries; 1 000 beside) under no "
                       "defense, AAA (deterministic, keeps every top-1 label), and input / feature noise at a 4% "
                       "clean-accuracy drop",
              "note": _RFD + "AAA (Chen et al. 2022) is AAA-linear with the authors' defaults (attractor interval "
                      "tau = 4 logits, reverse step 1, 100 Adam steps, calibration weight 5, temperature 1: not "
                      "fitted here); it keeps the hard label, so a decision attack sees the undefended model. "
                      "Differs: digits (CIFAR-10, ResNet-50 / VGG-19); 20 images; both noise defenses at a 4% drop "
                      "(the paper's rows are at 3-6%); the paper does not state the budget (10 000 here); rfd_table5 "
                      "is the same grid without the AAA row."},
})


# ----------------------------------------------------------------------------- trained defenses: SND Table 1; RND-GF and RND-AT
# Models trained with a training-time defense are dataset entries with a "train" block (rnd_jax.train.TrainConfig
# fields) and, where only some defenses apply to them, their own "defenses" list.

TRAINED_PGD_AT = {"adv_eps": 0.1, "adv_steps": 7, "epochs": 20}  # Madry et al.: l_inf PGD-AT (7 steps, 2.5 eps / 7)
TRAINED_RSE = {"rse_init": 0.2, "rse_inner": 0.1}  # Liu et al. (as SND quotes them): sigma_init 0.2, sigma_inner 0.1
TRAINED_PNI = {"pni": "weight", "adv_eps": 0.1, "adv_steps": 7, "adv_weight": 0.5, "epochs": 20}  # PNI-W, layer-wise
TRAINED_GF = {"finetune": True, "gf_noise": 0.02, "gf_samples": 4, "epochs": 10, "learning_rate": 1e-3}  # RND-GF
_TRAINED_SMOKE = {"epochs": 2, "adv_steps": 2}


def _trained_models(entries, smoke: bool):
    """Dataset entries of trained models ``(label, train, defenses)``; ``smoke``: 2 epochs (2 PGD steps)."""
    out = []
    for label, opts, defenses in entries:
        if opts is None:
            e = {"dataset": "digits", "label": label}
        else:
            opts = dict(opts)
            if smoke:
                opts.update({k: v for k, v in _TRAINED_SMOKE.items() if k == "epochs" or "adv_eps" in opts})
            e = {"dataset": "digits", "train": opts, "label": label}
        if defenses is not None:
            e["defenses"] = defenses
        out.append(e)
    return out


_SND1_MODELS = [("baseline", None, None),
                ("RSE", TRAINED_RSE, [{"name": "rse", "levels": [10]}]),
                ("PNI", TRAINED_PNI, [{"name": "pni", "levels": [1]}]),
                ("PGD-AT", TRAINED_PGD_AT, ["none"])]
_add({
    "name": "snd_table1",
    "description": "clean accuracy of every defense: input noise, RSE, PNI, R&P, PGD-AT (SND Table 1)",
    "datasets": _trained_models(_SND1_MODELS, smoke=False),
    "attacks": ["square_linf"],
    "defenses": ["none", {"name": "input_noise", "levels": [0.001, 0.01, 0.02]},
                 {"name": "random_resize_pad", "levels": [1, 2]}],
    "targeted": False, "budgets": [100], "n_images": 2, "acc_draws": 20,
    "smoke": {"datasets": _trained_models(_SND1_MODELS, smoke=True), "acc_draws": 2,
              "defenses": ["none", {"name": "input_noise", "levels": [0.01]}]},
    "full": {"acc_draws": 40},
    "table": {"mirrors": "SND (Byun et al. 2022), Table 1", "rows": ["model", "defense", "level"], "cols": [],
              "values": ["acc_defended_mean", "acc_defended_worst", "acc_clean"],
              "title": "Clean accuracy of the defended models on the whole test split: mean and worst of acc_draws "
                       "draws of the defense's randomness (acc_defended_mean / _worst), and the accuracy of the model "
                       "without its inference noise (acc_clean)",
              "note": "Each model's own defense: input noise nu (SND) and random resize-and-pad (R&P, max_extra "
                      "pixels, Xie et al.) on the clean model; RSE (noise of std 0.2 on the input, before the first "
                      "convolution, and 0.1 before the second, trained with them; the mean of 10 noisy passes); PNI-W "
                      "(layer-wise weight noise, trained with PGD-AT at eps 0.1, half clean and half adversarial loss "
                      "as PNI does; one noisy pass); PGD-AT (l_inf eps 0.1, 7 steps; no inference noise). The attack "
                      "cells (Square, 100 queries, 2 images) only carry the accuracy measurement. Differs: digits 8x8 "
                      "and digits_cnn (CIFAR-10 / ResNet-20 and ImageNet / ResNet-50 in the paper: one table here); "
                      "the paper's spread is over 5 seeds, ours is the worst of 20 draws of one model; PGD-AT at eps "
                      "0.1 on [0, 1] pixels (the usual 8/255 of CIFAR-10 is below a digit's pixel step), 20 epochs "
                      "(PNI too); R&P enlarges 8x8 images by 1 or 2 pixels (Xie et al.: 299 -> up to 331, +11%) and "
                      "resizes back, digits_cnn taking only 8x8 inputs; --smoke trains 2 epochs."},
})

_RND_TRAINED = [("RND", None, None), ("RND-GF", TRAINED_GF, None), ("RND-AT", TRAINED_PGD_AT, None)]
_add({
    "name": "rnd_gf_at",
    "description": "RND, RND-GF (Gaussian-augmentation fine-tuning) and RND-AT (adversarial training + RND) x nu",
    "datasets": _trained_models(_RND_TRAINED, smoke=False),
    "attacks": [{"name": "nes", "config": {"samples": 50, "beta": 0.005}}, {"name": "square_linf"}],
    "defenses": [{"name": "input_noise", "levels": [0.0, 0.01, 0.02]}],
    "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20,
    "smoke": {"datasets": _trained_models(_RND_TRAINED, smoke=True),
              "attacks": [{"name": "nes", "config": {"samples": 10, "beta": 0.005}}], "n_images": 4,
              "budgets": [330], "acc_draws": 4, "defenses": [{"name": "input_noise", "levels": [0.0, 0.02]}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "RND (Qin et al. 2021): RND, RND-GF and RND-AT", "rows": ["attack", "model"],
              "cols": ["level"], "col_name": "nu", "values": ["failure", "queries_mean", "acc_defended_mean"],
              "title": "Attack failure rate (1 - ASR by the majority check), mean queries of the successes and clean "
                       "accuracy under input noise nu, for the clean model (RND), the model fine-tuned with "
                       "Gaussian augmentation (RND-GF) and the adversarially trained model (RND-AT)",
              "note": _RND + "RND-GF: 10 epochs of fine-tuning the clean model (lr 1e-3) on -log E_delta[F(x + "
                      "delta)], delta ~ N(0, 0.02^2), 4 draws inside the log; RND-AT: PGD-AT (l_inf eps 0.1, 7 "
                      "steps, 20 epochs) with input noise at inference. Differs: digits (CIFAR-10 / ImageNet, VGG-16 / "
                      "Inception-v3 / ResNet-50; the paper's RND-AT starts from a public adversarially trained "
                      "model); 30 images; 2 000 queries; NES with mu = 0.005 and Square with its defaults; the "
                      "GF noise 0.02 is the larger of the table's nu; --smoke trains 2 epochs."},
})

# ----------------------------------------------------------------------------- white-box: park_table2, rfd_table13

# Park et al. Table 2 follows Madry et al.'s CIFAR-10 attack: 10 steps of alpha = eps / 4 (the pgd defaults; its
# battery budget 10 = 10 gradient queries), here at the untargeted l_inf radius of the digits grids.
PARK_PGD = {"norm": "linf", "eps": UNTARGETED_EPS["linf"]}
PARK_ATTACKS = [{"name": "pgd", "config": {**PARK_PGD, "loss": "xent"}, "label": "PGD(Xent)"},
                {"name": "pgd", "config": {**PARK_PGD, "loss": "margin"}, "label": "PGD(CW)"},  # the C&W margin loss
                {"name": "cw", "config": {"eps": UNTARGETED_EPS["l2"]}, "label": "CW-L2"}]  # Park's Fig. 5 check
TRAINED_OR = {"logit_noise": 100.0}  # Park: output randomization training, N(0, 100^2) on the logits
TRAINED_PARK_AT = {"adv_eps": UNTARGETED_EPS["linf"], "adv_steps": 7, "epochs": 20}  # Madry PGD-AT at the attack's eps
_PARK_MODELS = [("undefended", None, None), ("PGD-AT", TRAINED_PARK_AT, None), ("OR(100)", TRAINED_OR, None),
                ("PGD-AT+OR(100)", {**TRAINED_PARK_AT, **TRAINED_OR}, None)]
_add({
    "name": "park_table2",
    "description": "white-box PGD(Xent), PGD(CW) and C&W vs PGD adversarial training and output randomization "
                   "training (Park et al. Table 2)",
    "datasets": _trained_models(_PARK_MODELS, smoke=False),
    "attacks": PARK_ATTACKS,
    "defenses": ["none"],
    "targeted": False, "n_images": 100, "acc_draws": 1, "pool": "all",
    "smoke": {"datasets": _trained_models(_PARK_MODELS[:1] + [("OR(1)", {"logit_noise": 1.0}, None)], smoke=True),
              "attacks": PARK_ATTACKS[:2], "n_images": 10},
    "full": {"n_images": 360},
    "table": {"mirrors": "Park et al. (2021), Table 2", "rows": ["model"], "cols": ["attack", "cfg.loss"],
              "col_name": "attack", "values": ["robust_all", "acc_clean"],
              "title": "Accuracy on white-box adversarial examples (robust accuracy over all selected test images, "
                       "misclassified ones counting as not robust) and clean accuracy, per training defense",
              "note": "Park's protocol, point by point: (1) white-box l_inf PGD (Madry et al.) with the "
                      "cross-entropy loss (PGD(Xent)) and with the C&W margin loss (PGD(CW)), untargeted; (2) 10 "
                      "steps of step size eps / 4 (their 2 / 255 at eps = 8 / 255 on [0, 1] pixels; the paper prints "
                      "eps = 0.8 and step 2, read here as 8 and 2 on the 0-255 scale, Madry et al.'s CIFAR-10 "
                      "setting), random start, one gradient query per step, so budget = 10; (3) the metric is the "
                      "accuracy on the adversarial examples over the evaluated test images (pool all: the "
                      "misclassified ones count as errors), beside the clean accuracy; (4) output randomization "
                      "training: N(0, sigma^2) noise, sigma = 100, added to the logits inside the training loss, none "
                      "at test time (defense none); (5) PGD adversarial training as Madry et al. (7 steps at the "
                      "attack's eps); (6) the combination of both. No test-time randomness: stop rule single "
                      "(every rule agrees). Extra column: C&W l_2 (eps 1.0, 6 binary-search stages x 100 Adam steps, "
                      "the attack of Park's Fig. 5), not in Table 2. Differs: digits 8x8 and digits_cnn (CIFAR-10, "
                      "Wide ResNet 32-10 / ResNet 32 trained 80 000 iterations); l_inf eps 0.15 (8 / 255 on 32x32x3); "
                      "100 images (10 000; --full: the 360 test images); PGD-AT 20 epochs. The oracle answers "
                      "probabilities and the attacks' losses take logs of them, where Park's PGD(CW) differentiates "
                      "logits: a model trained with sigma = 100 has logit gaps of hundreds, its float32 probabilities "
                      "saturate to exact 0 and 1, and the floored log-probabilities have no gradient, so PGD(CW) is "
                      "masked here as much as PGD(Xent) (the paper's 0% needs the logits); --smoke trains sigma = 1 for 2 epochs (2 "
                      "epochs at sigma = 100 leave 15% accuracy)."},
})

_add({
    "name": "rfd_table13",
    "description": "white-box C&W and PGD vs randomized feature noise at a 2% accuracy drop (RFD Table 13, CIFAR-10), "
                   "with EOT over 10 gradients beside",
    "attacks": [dict(PARK_ATTACKS[0], eot=[1, 10]), PARK_ATTACKS[2]],
    "defenses": ["none", {"name": "feature_noise", "drops": [0.02]}],
    "targeted": False, "n_images": 50, "acc_draws": 20, "calib_draws": 20, "eot_budget": "scaled", **RFD_PROTOCOL,
    "smoke": {"attacks": [dict(PARK_ATTACKS[0], eot=[1, 2])], "n_images": 10, "acc_draws": 4, "calib_draws": 4},
    "full": {"n_images": RFD_FULL_IMAGES},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 13", "rows": ["defense", "drop"], "cols": ["attack", "eot"],
              "col_name": "attack", "values": ["robust_all_stop", "acc_defended_mean", "level"],
              "title": "Accuracy under white-box attacks (robust accuracy over all selected images) without and with "
                       "feature noise calibrated to a 2% clean-accuracy drop; PGD also with EOT over M = 10 "
                       "gradient draws per step (M x the budget)",
              "note": _RFD + "White-box: every query is a gradient query through the defended model with that "
                      "query's noise; PGD l_inf (10 steps of eps / 4, random start, cross-entropy), C&W l_2 (6 "
                      "binary-search stages x 100 Adam steps, stopping at the first adversarial answer within eps). "
                      "The EOT column (Athalye et al. 2018: 10 draws per step, 100 queries) is not in the paper. "
                      "Differs: digits (CIFAR-10, VGG-19 / ViT); 50 images; l_inf eps 0.15 for 0.03 on 32x32x3; the "
                      "paper states one eps (0.03, l_inf) for both attacks, C&W runs l_2 here at eps 1.0; the "
                      "paper's Acc drop is 1.4-1.9%; it does not state PGD's steps."},
})
