"""Built-in sweep grids: one per table of the papers, on our data (see :mod:`rnd_jax.sweep` for the format).

``GRIDS[name]`` is a plain grid dict. Attack names are looked up in the attack registry only when a
grid is used (:func:`rnd_jax.sweep.expand` fails naming any attack that is not registered;
``experiments.sweep --skip-missing`` runs the rest and says which are missing). Each grid has three
sizes: ``--smoke`` (seconds to a few minutes, for tests), the default (at most about 20 minutes on 2
CPU cores for the NES-based tables) and ``--full`` (the paper's image counts and budgets, for an
accelerator). The ``table`` block tells :mod:`experiments.paper_tables` how to lay the results out:
``rows`` and ``cols`` are keys of :func:`rnd_jax.sweep.flat` rows, ``values`` are metrics (also
``asr@B`` / ``robust@B``: success / robust accuracy within ``B`` queries, ``failure`` = 1 - asr,
``acc_drop``, ``l2_per_pixel_e4``).

Papers:

- Aithal & Li, "Mitigating Black-Box Adversarial Attacks via Output Noise Perturbation", IEEE
  Access 2022 (output noise ``sigma`` on the probabilities);
- SND: Byun, Go & Kim, "On the Effectiveness of Small Input Noise for Defending Against Query-based
  Black-Box Attacks", WACV 2022 (input noise ``nu``);
- RND: Qin, Fan, Zha & Wu, "Random Noise Defense Against Query-Based Black-Box Attacks", NeurIPS
  2021 (input noise ``nu`` vs the attacker's finite-difference step ``mu``);
- RFD: Nguyen et al., "Understanding the Robustness of Randomized Feature Defense Against
  Query-Based Adversarial Attacks", ICLR 2024 (feature noise at a hidden layer).

Our digits images are 8x8 in [0, 1]. Targeted grids use each attack's registry battery threat model
(l_inf eps 0.3, l_2 eps 2.0); untargeted grids use :data:`UNTARGETED_EPS` (l_inf 0.15, l_2 1.0),
because at the battery radii most untargeted attacks succeed within a few queries whatever the
defense. The input / feature noise levels are chosen for this scale, not copied from the papers'
CIFAR-10 / ImageNet values.
"""

from __future__ import annotations

SIGMAS = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # Aithal & Li's output-noise levels
NUS = [0.0, 0.01, 0.02, 0.05]  # input-noise std for 8x8 digits in [0, 1]
NES = {"name": "nes", "config": {"samples": 50, "beta": 1e-3}}
FULL_IMAGES = 300  # --full: digits has 353 correctly classified test images

# Score-based (soft-label) and decision-based (hard-label) attacks of the papers' tables.
AITHAL_SCORE = ["nes", "zoo", "autozoom", "bandits_td", "simba_dct", "square_linf", "signhunter", "genattack"]
AITHAL_DECISION = ["hsja", "opt", "signopt", "geoda", "boundary", "signflip"]
AITHAL_DECISION_TARGETED = ["hsja", "opt", "signopt", "boundary"]
SND_DECISION = ["boundary", "signopt", "hsja", "geoda", "rays", "signflip"]
SND_SCORE = ["nes", "bandits_td", "simba_dct", "square_linf", "signhunter"]
RFD_SCORE = ["square_linf", "nes", "signhunter"]
RFD_DECISION = ["rays", "signflip", "hsja"]


def _sigma_table(values, mirrors, title, rows=("attack",), note=""):
    return {"mirrors": mirrors, "title": title, "rows": list(rows), "cols": ["level"], "col_name": "sigma",
            "values": list(values), "note": note}


# Untargeted threat model of the tables: the battery radii (l_inf 0.3, l_2 2.0) let most untargeted attacks
# succeed on 8x8 digits within a few queries, which hides any defense; these radii leave undefended
# untargeted NES / Square / HSJA / RayS at roughly 50-90% success within 2 000 queries.
UNTARGETED_EPS = {"linf": 0.15, "l2": 1.0}
NORM_OF = {name: "l2" for name in ("hsja", "opt", "signopt", "geoda", "boundary", "simba_dct", "simba_pixel",
                                   "square_l2", "zoo", "autozoom", "autozoom_bi", "prgf")}
NORM_OF.update({name: "linf" for name in ("nes", "square_linf", "bandits_td", "signhunter", "genattack", "rays",
                                          "signflip", "hsja_linf", "nes_label_only")})

GRIDS: dict[str, dict] = {}


def _untargeted_threat(entry):
    """An attack entry with the untargeted radius of its norm (entries that set eps keep theirs)."""
    e = {"name": entry} if isinstance(entry, str) else dict(entry)
    norm = NORM_OF.get(e["name"])
    if norm is not None and "eps" not in e.get("config", {}):
        e["config"] = {"norm": norm, "eps": UNTARGETED_EPS[norm], **e.get("config", {})}
    return e


def _add(grid: dict) -> None:
    if grid.get("targeted") is False:
        for g in (grid, grid.get("smoke") or {}, grid.get("full") or {}):
            if "attacks" in g:
                g["attacks"] = [_untargeted_threat(a) for a in g["attacks"]]
    GRIDS[grid["name"]] = grid


# ----------------------------------------------------------------------------- Aithal & Li (2022)

_add({
    "name": "aithal_table2",
    "description": "targeted soft-label attacks x output noise sigma (Aithal & Li Table 2)",
    "attacks": [NES],
    "defenses": [{"name": "output_noise", "levels": SIGMAS}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 40,
    "smoke": {"n_images": 4, "budgets": [1_000], "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}],
              "acc_draws": 4},
    "full": {"attacks": [NES] + [a for a in AITHAL_SCORE if a != "nes"], "n_images": FULL_IMAGES},
    "table": _sigma_table(["asr", "queries_mean", "asr_clean", "asr_lucky"], "Aithal & Li (2022), Table 2",
                          "Targeted soft-label attacks vs output noise: ASR (majority of 9 defended checks) and mean "
                          "queries of the successes"),
})

def _hard_label(name: str, targeted: bool, full_attacks, tables: str, note: str) -> dict:
    """Aithal & Li's hard-label tables (3/10): HSJA and Sign-OPT x output noise sigma."""
    return {
        "name": name,
        "description": f"{'targeted' if targeted else 'untargeted'} hard-label attacks x output noise sigma "
                       f"(Aithal & Li {tables})",
        "attacks": ["hsja", "signopt"],
        "defenses": [{"name": "output_noise", "levels": [0.0, 1e-4, 1e-2, 1e-1]}],
        "targeted": targeted, "budgets": [2_000], "n_images": 20, "acc_draws": 20,
        "smoke": {"attacks": ["hsja"], "n_images": 4, "budgets": [600],
                  "defenses": [{"name": "output_noise", "levels": [0.0, 1e-1]}], "acc_draws": 4},
        "full": {"attacks": full_attacks, "n_images": FULL_IMAGES, "budgets": [10_000],
                 "defenses": [{"name": "output_noise", "levels": SIGMAS}]},
        "table": _sigma_table(["asr", "queries_mean", "l2"], f"Aithal & Li (2022), {tables}", note),
    }


_add(_hard_label("aithal_table3", False, AITHAL_DECISION, "Tables 3 and 10",
                 "Hard-label attacks see only argmax(F(x) + sigma v): ASR within eps and mean queries"))
_add(_hard_label("aithal_table10", True, AITHAL_DECISION_TARGETED, "Table 10",
                 "Targeted hard-label attacks vs output noise"))

_BITS = [8, 4, 2]
_add({
    "name": "aithal_table5",
    "description": "NES (xent / C&W loss) vs quantization and correlated noise (Aithal & Li Table 5, Lemma 2)",
    "attacks": [{"name": "nes", "config": {"samples": 50, "beta": 1e-3}, "sweep": {"loss": ["xent", "cw"]}}],
    "defenses": ["none", {"name": "quantize", "levels": _BITS},
                 {"name": "output_noise", "levels": [round(1 / (2 ** b - 1) / 12 ** 0.5, 8) for b in _BITS],
                  "label": "white noise of the same SNR"},
                 {"name": "correlated_noise", "levels": [1e-3, 1e-1], "options": {"sigma": 1e-6}}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 20,
    "smoke": {"n_images": 4, "budgets": [1_000], "acc_draws": 4,
              "defenses": [{"name": "quantize", "levels": [2]}, {"name": "correlated_noise", "levels": [1e-1],
                                                                 "options": {"sigma": 1e-6}}]},
    "full": {"n_images": FULL_IMAGES},
    "table": {"mirrors": "Aithal & Li (2022), Table 5", "rows": ["defense", "level", "opt.sigma"],
              "cols": ["cfg.loss"], "col_name": "NES loss", "values": ["asr", "queries_mean"],
              "title": "Targeted NES vs deterministic output distortions: quantization to b bits (level = b), "
                       "white noise of the same output SNR (level = sigma = Delta/sqrt(12)), and output-correlated "
                       "noise alpha F(x) + N(0, sigma^2) (level = alpha)",
              "note": "Lemma 2: noise that is a function of the clean output (quantization, alpha F(x)) does not "
                      "randomize the attacker's estimate; only the white part does. Quantization can still stall NES "
                      "deterministically: it erases output differences smaller than its step."},
})

_T_SIGMAS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
_add({
    "name": "aithal_table6",
    "description": "NES finite-difference step beta x output noise sigma (Aithal & Li Table 6)",
    "attacks": [{"name": "nes", "config": {"samples": 50}, "sweep": {"beta": [1e-4, 1e-3, 1e-2, 1e-1]}}],
    "defenses": [{"name": "output_noise", "levels": _T_SIGMAS}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 20,
    "smoke": {"n_images": 4, "budgets": [1_000], "acc_draws": 4,
              "attacks": [{"name": "nes", "config": {"samples": 50}, "sweep": {"beta": [1e-3, 1e-1]}}],
              "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}]},
    "full": {"n_images": FULL_IMAGES, "defenses": [{"name": "output_noise", "levels": SIGMAS}]},
    "table": {"mirrors": "Aithal & Li (2022), Table 6", "rows": ["cfg.beta"], "cols": ["level"], "col_name": "sigma",
              "values": ["asr", "queries_mean"],
              "title": "Targeted NES: a larger finite-difference step beta against output noise sigma",
              "note": "Lemma 1: the SNR of the NES factor grows as beta^2/sigma^2, but a large beta biases the "
                      "gradient estimate."},
})

_add({
    "name": "aithal_table7",
    "description": "NES with N repeated queries (EOT mean) at equal total budget x sigma (Aithal & Li Table 7, Thm 4)",
    "attacks": [{"name": "nes", "config": {"samples": 50, "beta": 1e-3}, "eot": [1, 5, 10, 50]}],
    "defenses": [{"name": "output_noise", "levels": [0.0, 1e-3, 1e-2, 1e-1]}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 20,
    "smoke": {"n_images": 4, "budgets": [1_100], "acc_draws": 4,
              "attacks": [{"name": "nes", "config": {"samples": 10, "beta": 1e-3}, "eot": [1, 5]}],
              "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [10_000, 50_000]},
    "table": {"mirrors": "Aithal & Li (2022), Table 7 and Theorem 4", "rows": ["eot"], "cols": ["level"],
              "col_name": "sigma", "values": ["asr", "queries_mean"],
              "title": "Targeted NES averaging N repeated queries of every point (N = eot), all at the same total "
                       "query budget (every repeat counts)",
              "note": "Averaging N answers divides the noise variance by N but also the number of steps the "
                      "budget allows."},
})

_add({
    "name": "aithal_table8",
    "description": "NES sample count J x output noise sigma (Aithal & Li Table 8)",
    "attacks": [{"name": "nes", "config": {"beta": 1e-3}, "sweep": {"samples": [50, 100]}}],
    "defenses": [{"name": "output_noise", "levels": _T_SIGMAS}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 20,
    "smoke": {"n_images": 4, "budgets": [1_000], "acc_draws": 4,
              "attacks": [{"name": "nes", "config": {"beta": 1e-3}, "sweep": {"samples": [10, 20]}}],
              "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}]},
    "full": {"n_images": FULL_IMAGES, "defenses": [{"name": "output_noise", "levels": SIGMAS}]},
    "table": {"mirrors": "Aithal & Li (2022), Table 8", "rows": ["cfg.samples"], "cols": ["level"],
              "col_name": "sigma", "values": ["asr", "queries_mean"],
              "title": "Targeted NES with more samples J per gradient estimate against output noise"},
})

_add({
    "name": "aithal_table12",
    "description": "distortion of successful targeted attacks x sigma (Aithal & Li Table 12; same cells as table 2)",
    "attacks": [NES],
    "defenses": [{"name": "output_noise", "levels": SIGMAS}],
    "targeted": True, "budgets": [10_000], "n_images": 100, "acc_draws": 40,
    "smoke": {"n_images": 4, "budgets": [1_000], "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}],
              "acc_draws": 4},
    "full": {"attacks": [NES] + [a for a in AITHAL_SCORE if a != "nes"], "n_images": FULL_IMAGES},
    "table": _sigma_table(["l2_per_pixel_e4", "l2", "linf"], "Aithal & Li (2022), Table 12",
                          "Distortion of the successful adversarial examples (per-pixel L2 = ||delta||_2 / d, "
                          "x 1e-4 as in the paper)",
                          note="The cells are those of aithal_table2: --results <its folder> reuses them."),
})

# ----------------------------------------------------------------------------- SND (Byun et al. 2022)

def _snd_attacks_table(name: str, family: str, attacks, full_attacks, n_images: int, smoke_budget: int, values,
                       title: str) -> dict:
    """SND Tables 2 (decision) and 3 (score): untargeted attacks x input noise nu."""
    return {
        "name": name,
        "description": f"untargeted {family}-based attacks x input noise nu (SND Table {name[-1]})",
        "attacks": attacks,
        "defenses": [{"name": "input_noise", "levels": [0.0, 0.01, 0.02]}],
        "targeted": False, "budgets": [2_000], "n_images": n_images, "acc_draws": 20,
        "smoke": {"attacks": attacks[:1], "n_images": 4, "budgets": [smoke_budget], "acc_draws": 4,
                  "defenses": [{"name": "input_noise", "levels": [0.0, 0.02]}]},
        "full": {"attacks": full_attacks, "n_images": FULL_IMAGES, "budgets": [10_000],
                 "defenses": [{"name": "input_noise", "levels": NUS}]},
        "table": {"mirrors": f"SND (Byun et al. 2022), Table {name[-1]}", "rows": ["attack"], "cols": ["level"],
                  "col_name": "nu", "values": values, "title": title},
    }


_add(_snd_attacks_table("snd_table2", "decision", ["hsja", "signopt"], SND_DECISION, 20, 600,
                        ["asr", "l2", "queries_mean"],
                        "Decision-based attacks vs small input noise nu: ASR within eps, L2 of successes"))
_add(_snd_attacks_table("snd_table3", "score", ["square_linf", "nes"], SND_SCORE, 30, 300, ["asr", "queries_mean"],
                        "Score-based attacks vs small input noise nu"))

_add({
    "name": "snd_table4",
    "description": "P_mis (accuracy cost of the noise) and ASR over a finer nu grid (SND Table 4)",
    "attacks": ["square_linf"],
    "defenses": [{"name": "input_noise", "levels": [0.0, 0.005, 0.01, 0.02, 0.05, 0.1]}],
    "targeted": False, "budgets": [1_000], "n_images": 30, "acc_draws": 40,
    "smoke": {"n_images": 4, "budgets": [200], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.0, 0.05]}]},
    "full": {"attacks": ["square_linf", "hsja"], "n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "SND (Byun et al. 2022), Table 4", "rows": ["attack"], "cols": ["level"], "col_name": "nu",
              "values": ["acc_drop", "acc_defended_worst", "asr"],
              "title": "The price of input noise: P_mis = clean accuracy lost to the noise (expected over 40 draws), "
                       "the worst draw's accuracy, and the attack's ASR"},
})

_add({
    "name": "snd_table5",
    "description": "SND vs the expectation attack: EOT T repeated queries at equal budget x nu (SND Table 5)",
    "attacks": [{"name": "square_linf", "eot": [1, 5, 10]}],
    "defenses": [{"name": "input_noise", "levels": [0.0, 0.01, 0.02]}],
    "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20,
    "smoke": {"attacks": [{"name": "square_linf", "eot": [1, 5]}], "n_images": 4, "budgets": [300], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.0, 0.02]}]},
    "full": {"attacks": [{"name": "square_linf", "eot": [1, 5, 10, 20]}, {"name": "hsja", "eot": [1, 5, 10]}],
             "n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "SND (Byun et al. 2022), Table 5", "rows": ["attack", "eot"], "cols": ["level"],
              "col_name": "nu", "values": ["asr", "queries_mean"],
              "title": "Adaptive (expectation) attack: every query repeated T times and averaged, same total budget"},
})

# ----------------------------------------------------------------------------- RND (Qin et al. 2021)

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
              "title": "Attack failure rate (1 - ASR) of untargeted NES (finite-difference step mu = beta) and Square "
                       "(its square size p_init stands in for mu) under random input noise nu",
              "note": "RND's Theorem 1: the defense works when nu/mu is large; the attacker answers with a larger mu."},
})

_add({
    "name": "rnd_eot",
    "description": "RND vs EOT with M samples per query at equal budget (RND's M sweep)",
    "attacks": [{"name": "nes", "config": {"samples": 50, "beta": 1e-3}, "eot": [1, 2, 5, 10]}],
    "defenses": [{"name": "input_noise", "levels": [0.0, 0.02, 0.05]}],
    "targeted": False, "budgets": [4_000], "n_images": 50, "acc_draws": 20,
    "smoke": {"attacks": [{"name": "nes", "config": {"samples": 10, "beta": 1e-3}, "eot": [1, 5]}],
              "n_images": 4, "budgets": [660], "acc_draws": 4,
              "defenses": [{"name": "input_noise", "levels": [0.0, 0.05]}]},
    "full": {"attacks": [{"name": "nes", "config": {"samples": 50, "beta": 1e-3}, "eot": [1, 2, 5, 10, 20, 50]},
                         {"name": "square_linf", "eot": [1, 5, 10, 20]}], "n_images": FULL_IMAGES,
             "budgets": [10_000]},
    "table": {"mirrors": "RND (Qin et al. 2021): EOT with M samples (Theorem 2)", "rows": ["attack", "eot"],
              "cols": ["level"],
              "col_name": "nu", "values": ["asr", "queries_mean"],
              "title": "Expectation over M noisy answers per point, at the same total query budget"},
})

# ----------------------------------------------------------------------------- RFD (Nguyen et al. 2024)

_CALIBRATED = [{"name": "input_noise", "drops": [0.01, 0.02]},
               {"name": "feature_noise", "drops": [0.01, 0.02]},
               {"name": "output_noise_logits", "drops": [0.01, 0.02]}]
_add({
    "name": "rfd_table1",
    "description": "score-based attacks vs input / feature / logit noise at a 1% and 2% accuracy drop (RFD Table 1)",
    "attacks": ["square_linf", "nes"],
    "defenses": ["none"] + _CALIBRATED,
    "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20, "calib_draws": 20,
    "smoke": {"attacks": ["square_linf"], "n_images": 4, "budgets": [200], "acc_draws": 4, "calib_draws": 4,
              "defenses": ["none", {"name": "feature_noise", "drops": [0.02]}]},
    "full": {"attacks": RFD_SCORE, "n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 1", "rows": ["defense", "drop"], "cols": ["attack"],
              "col_name": "attack", "values": ["robust@1000", "robust", "level", "acc_defended_mean"],
              "title": "Robust accuracy (share of the attacked, correctly classified images not fooled) at 1 000 "
                       "queries and at the full budget; defenses calibrated to the same clean-accuracy drop"},
})

_add({
    "name": "rfd_table2",
    "description": "decision-based attacks vs input / feature noise at a 1% and 2% accuracy drop (RFD Table 2)",
    "attacks": ["rays", "hsja"],
    "defenses": ["none", {"name": "input_noise", "drops": [0.01, 0.02]}, {"name": "feature_noise",
                                                                           "drops": [0.01, 0.02]}],
    "targeted": False, "budgets": [2_000], "n_images": 20, "acc_draws": 20, "calib_draws": 20,
    "smoke": {"attacks": ["rays"], "n_images": 4, "budgets": [300], "acc_draws": 4, "calib_draws": 4,
              "defenses": ["none", {"name": "feature_noise", "drops": [0.02]}]},
    "full": {"attacks": RFD_DECISION, "n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 2", "rows": ["defense", "drop"], "cols": ["attack"],
              "col_name": "attack", "values": ["robust@1000", "robust", "level"],
              "title": "Robust accuracy against decision-based attacks at 1 000 queries and the full budget"},
})

_add({
    "name": "rfd_table6",
    "description": "feature noise at each marked layer of the digits CNN, calibrated to a 2% drop (RFD Tables 6/14)",
    "attacks": ["nes", "square_linf"],
    "defenses": [{"name": "feature_noise", "drops": [0.02], "sweep": {"layers": ["conv1", "conv2", "dense1"]}}],
    "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20, "calib_draws": 20,
    "smoke": {"attacks": ["square_linf"], "n_images": 4, "budgets": [200], "acc_draws": 4, "calib_draws": 4,
              "defenses": [{"name": "feature_noise", "drops": [0.02], "sweep": {"layers": ["conv1", "dense1"]}}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [10_000], "attacks": RFD_SCORE},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Tables 6 and 14", "rows": ["opt.layers"], "cols": ["attack"],
              "col_name": "attack", "values": ["robust", "level", "acc_defended_mean"],
              "title": "Feature noise at one layer (digits_cnn's marked layers), each calibrated to a 2% drop"},
})

_add({
    "name": "rfd_table7",
    "description": "EOT (M repeated queries) vs feature / input noise at a 2% drop, equal budget (RFD Table 7)",
    "attacks": [{"name": "nes", "config": {"samples": 50, "beta": 5e-3}, "eot": [1, 5, 10]},
                {"name": "square_linf", "eot": [1, 5, 10]}],
    "defenses": [{"name": "feature_noise", "drops": [0.02]}, {"name": "input_noise", "drops": [0.02]}],
    "targeted": False, "budgets": [2_000], "n_images": 30, "acc_draws": 20, "calib_draws": 20,
    "smoke": {"attacks": [{"name": "square_linf", "eot": [1, 5]}], "n_images": 4, "budgets": [200],
              "acc_draws": 4, "calib_draws": 4, "defenses": [{"name": "feature_noise", "drops": [0.02]}]},
    "full": {"n_images": FULL_IMAGES, "budgets": [10_000]},
    "table": {"mirrors": "RFD (Nguyen et al. 2024), Table 7", "rows": ["attack", "eot"], "cols": ["defense"],
              "col_name": "defense (2% drop)", "values": ["robust", "queries_mean"],
              "title": "Robust accuracy under the expectation attack (M repeated queries per point, equal budget)"},
})
