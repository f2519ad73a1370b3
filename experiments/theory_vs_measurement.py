"""Theory vs measurement: what the papers' closed forms predict for this model, beside what it does.

For the trained model (default: digits), at each output-noise level sigma:

- the SNR of the NES factor ``A`` (Aithal & Li Lemma 1, eq. 5) per (image, direction, target class),
  predicted vs measured by Monte-Carlo over draws of the real defense
  :func:`rnd_jax.defenses.output_noise`, split by whether the small-noise assumption
  ``sigma <= 0.1 * min(F_t(x -/+ beta u))`` holds for the sample;
- ``P[A < 0]`` for ``a > 0`` (sign flips): Theorem 1's model, the exact closed form, measured;
- the query ratio ``R`` (Theorem 2, eq. 6) from the predicted and the measured SNR, and repeated
  queries ``N``: Theorem 4's eq. (8) and the count a consistent estimator needs;
- clean accuracy and output SNR (Fig. 2): measured vs the exact top-1 probability.

Also: Table 1 of the model; Section IV-A recomputed from the paper's own Table 1 (SNR in dB and
``R`` at sigma = 0.01) next to the printed numbers; sign-flip rates under input noise and feature
noise at every marked layer vs the randomized feature defense's eq. (26) and Qin et al.'s
Theorem 3 bound; and Monte-Carlo evidence for each erratum documented in :mod:`rnd_jax.theory`.

Default run (digits, 100 images x 9 target classes, 256 noise draws per sigma; about a minute on
2 CPU cores)::

    python -m experiments.theory_vs_measurement --out runs/theory_vs_measurement

Outputs under ``--out``: ``results.json`` (config, every table, errata evidence; the same seed
gives the same file), ``config.json``, ``timing.json``, ``rows.jsonl`` (each finished part, kept
for a resumed run), and figures ``fig2_accuracy_snr.png``
(Fig. 2 a/b), ``fig3_R_N.png`` (Fig. 3 a/b), ``fig6_prob_negative.png`` (Fig. 6) and
``sign_flips.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.scipy.stats  # noqa: F401  (jax.scipy.stats.norm)
import numpy as np
from tqdm.auto import tqdm

from experiments.common import (apply_smoke, check_out, check_resumable, cli, dataset_info, given_options, open_run,
                                resolve_model, table, write_json, write_timing)
from rnd_jax import data, models, pytree, stats, train
from rnd_jax.defenses import feature_noise, input_noise, model_scorer, output_noise
from rnd_jax.theory import aithal_li, montecarlo, park, rfd

DEFAULT_SIGMAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
R_PARAMS = dict(a=0.1, lam=2.0, eta=0.01, v0=1.0, eps=0.01)  # Section IV-A's choices for eq. (6)

SNR_COLUMNS = [
    ("sigma", "sigma", ".0e"), ("holds", "small noise", "s"), ("valid_pct", "valid %", ".1f"),
    ("snr_pred_db", "SNR pred dB", ".1f"), ("snr_meas_db", "SNR meas dB", ".1f"), ("snr_delta_db", "delta dB", "+.2f"),
    ("within_3db_pct", "<=3dB %", ".0f"), ("snr_pred_db_invalid", "pred (invalid)", ".1f"),
    ("snr_meas_db_invalid", "meas (invalid)", ".1f"), ("snr_table1_db", "Table-1 dB", ".1f"),
]
FLIP_COLUMNS = [
    ("sigma", "sigma", ".0e"), ("pflip_thm1", "P[A<0] Thm1", ".4f"), ("pflip_exact", "P[A<0] exact", ".4f"),
    ("pflip_meas", "P[A<0] meas", ".4f"), ("pflip_se", "se", ".4f"), ("R_pred", "R pred", ".3g"),
    ("R_meas", "R meas", ".3g"), ("R_table1", "R Table-1", ".3g"), ("N_eq8", "N eq.8", ".3g"),
    ("N_consistent", "N consistent", ".3g"), ("n_repeat_pred", "N/pair pred", ".3g"),
    ("n_repeat_meas", "N/pair meas", ".3g"),
]
ACC_COLUMNS = [
    ("sigma", "sigma", ".0e"), ("acc_pred", "acc pred", ".4f"), ("acc_meas", "acc meas", ".4f"),
    ("acc_se", "se", ".4f"), ("acc_worst", "acc worst", ".4f"), ("out_snr_pred_db", "out SNR pred dB", ".1f"),
    ("out_snr_meas_db", "out SNR meas dB", ".1f"),
]
PAPER_COLUMNS = [
    ("model", "model", "s"), ("mean_dF", "mean dF", ".0e"), ("snr_db", "SNR eq.5 dB", ".1f"),
    ("snr_db_printed", "printed dB", ".0f"), ("snr_db_error", "printed - eq.5", "+.2f"),
    ("snr_db_without_half", "10log(dF^2/s^2)", ".1f"), ("R", "R eq.6", ".4g"), ("R_rounded", "R (1 digit)", ".0e"),
    ("R_printed", "printed R", ".0e"), ("R_if_printed_snr", "R from printed SNR", ".3g"),
]
SIGNFLIP_COLUMNS = [
    ("layer", "layer", "s"), ("nu_rel", "nu/nu*", ".2g"), ("nu", "nu", ".3g"),
    ("ratio_median", "ratio r (median)", ".3g"),
    ("p_eq26", "P eq.26", ".4f"), ("p_conditional", "P cond.", ".4f"), ("p_meas", "P meas", ".4f"),
    ("p_se", "se", ".4f"), ("qin_bound", "Qin Thm3 bound", ".3f"), ("acc_pred", "acc pred", ".4f"),
    ("acc_meas", "acc meas", ".4f"),
]
ERRATA_COLUMNS = [
    ("erratum", "erratum", "s"), ("quantity", "quantity", "s"), ("printed", "printed", ".4g"),
    ("corrected", "corrected", ".4g"), ("monte_carlo", "Monte-Carlo", ".4g"), ("mc_se", "se", ".2g"),
]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.theory_vs_measurement",
        description="Predicted vs measured: gradient SNR, P[A<0], R and N under output noise (Aithal & Li), "
                    "top-1 flips (Park et al.), sign flips under input/feature noise (Qin et al.; randomized "
                    "feature defense), Section IV-A recomputed from the paper's Table 1, and the errata.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of {data.DATASETS}")
    p.add_argument("--model", default=None, help=f"one of {sorted(models.MODELS)}; default: the dataset's model")
    p.add_argument("--n-images", type=int, default=100, help="test images for the Monte-Carlo measurements")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS),
                   help="output-noise std levels (> 0)")
    p.add_argument("--beta", type=float, default=1e-3, help="NES search variance")
    p.add_argument("--n-dirs", type=int, default=1, help="NES directions u per image")
    p.add_argument("--draws", type=int, default=256, help="defense noise draws per sigma for the NES factor A")
    p.add_argument("--acc-draws", type=int, default=40, help="noise draws for the defended accuracy")
    p.add_argument("--small", type=float, default=0.1,
                   help="small-noise assumption holds for a sample when sigma <= SMALL * min(F_t(x-bu), F_t(x+bu))")
    p.add_argument("--eps-n", type=float, default=0.3, help="epsilon of Theorem 4 (N repeated queries), in (0, 0.5)")
    p.add_argument("--a-n", type=float, default=1.0, help="true factor a of Theorem 4's paper-style N (Fig. 3(b))")
    p.add_argument("--mu", type=float, default=1e-3, help="attacker probe std for the sign-flip measurements")
    p.add_argument("--nu-rel", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                   help="input/feature noise levels relative to nu* (the level where eq. 26's median ratio is 1)")
    p.add_argument("--layers", nargs="+", default=None, help="'input' and/or marked layers (default: all)")
    p.add_argument("--flip-dirs", type=int, default=16, help="probes u per image for sign flips")
    p.add_argument("--flip-draws", type=int, default=16, help="noisy query pairs per probe")
    p.add_argument("--mc-samples", type=int, default=400_000, help="Monte-Carlo samples for the errata evidence")
    p.add_argument("--seed", type=int, default=0, help="root seed (image choice, probes, noise)")
    p.add_argument("--train-seed", type=int, default=0, help="seed of model training (part of the checkpoint key)")
    p.add_argument("--train-epochs", type=int, default=train.TrainConfig().epochs,
                   help="epochs of model training (part of the checkpoint key)")
    p.add_argument("--out", default="runs/theory_vs_measurement",
                   help="output folder (created once the run is valid; the same options run again there resume "
                        "it, another configuration is refused)")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default $RND_JAX_CACHE or ~/.cache/rnd_jax)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for mnist/fashion_mnist/cifar10")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for tests: 12 images, 3 sigmas, 32 draws, input + last marked layer, "
                        "smaller Monte-Carlo; options given explicitly keep their value")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _positive(name, v):
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _count(name, v, minimum=1):
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(v)


SMOKE = {"n_images": 12, "sigmas": [1e-6, 1e-4, 1e-2], "draws": 32, "acc_draws": 4, "flip_dirs": 4, "flip_draws": 4,
         "nu_rel": [1.0], "mc_samples": 100_000}  # options left unset only (and --layers: input + the last mark)


def configure(args, given: set[str] = frozenset()) -> dict:
    """Validate every option and resolve defaults — before any model is trained or traced.

    ``given``: the options given explicitly (:func:`experiments.common.given_options`); ``--smoke``
    changes only the others."""
    smoke = apply_smoke(args, given, SMOKE)
    check_out(args.out)
    ds = dataset_info(args.dataset, args)
    model_name = resolve_model(args, ds)
    model = models.get_model(model_name, ds.num_classes)
    marks = ["input", *models.perturb_names(model, ds.image_shape)]
    if args.smoke and args.layers is None:
        args.layers = smoke["smoke_set"]["layers"] = ["input", marks[-1]]
    sigmas = [_positive("sigma", s) for s in args.sigmas]
    if not sigmas:
        raise ValueError("--sigmas needs at least one level")
    for name in ("beta", "mu", "small", "a_n"):
        _positive(name.replace("_", "-"), getattr(args, name))
    nu_rel = [_positive("nu-rel", v) for v in args.nu_rel]
    if not 0 < args.eps_n < 0.5:
        raise ValueError(f"eps-n must lie in (0, 0.5), got {args.eps_n!r}")
    for name in ("n_images", "n_dirs", "draws", "acc_draws", "flip_dirs", "flip_draws"):
        _count(name.replace("_", "-"), getattr(args, name))
    _count("mc-samples", args.mc_samples, 1000)
    _count("train-epochs", args.train_epochs)
    layers = args.layers or marks
    unknown = [la for la in layers if la not in marks]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; choose among {marks}")
    cfg = {
        "experiment": "theory_vs_measurement", "dataset": args.dataset, "model": model_name,
        "num_classes": ds.num_classes, "image_shape": list(ds.image_shape), "n_images": args.n_images,
        "sigmas": sigmas, "beta": float(args.beta), "n_dirs": args.n_dirs, "draws": args.draws,
        "acc_draws": args.acc_draws, "small": float(args.small), "eps_n": float(args.eps_n), "a_n": float(args.a_n),
        "R_params": R_PARAMS, "mu": float(args.mu), "nu_rel": nu_rel, "layers": layers,
        "flip_dirs": args.flip_dirs, "flip_draws": args.flip_draws, "mc_samples": args.mc_samples,
        "seed": args.seed, "train_seed": args.train_seed, "train": None, **smoke,
    }
    check_resumable(args.out, cfg)
    return cfg


# ----------------------------------------------------------------------------- errata evidence


def _sampler(fn):
    """A Monte-Carlo simulator ``fn(key, n, ...)`` compiled once per sample count."""
    return jax.jit(fn, static_argnums=(1,))


def errata_evidence(key, n: int) -> list[dict]:
    """Printed vs corrected vs Monte-Carlo (with its standard error) for each erratum."""
    ks = jax.random.split(key, 8)
    rows = []
    theorem1 = _sampler(montecarlo.theorem1_samples)

    # Aithal & Li eq. (17): probability mass of A within +-2 sigma_Z/beta of a.
    a, beta, sz = 1.0, 1e-3, 0.1
    lo, hi = a - 2 * sz / beta, a + 2 * sz / beta
    grid = np.linspace(lo, hi, 20001)

    def mass(f):
        vals = np.asarray(f(jnp.asarray(grid), a, sz, beta), np.float64)
        return float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(grid)))

    samples = np.asarray(theorem1(ks[0], n, a, sz, beta), np.float64)
    p, se = montecarlo.prob_se((samples > lo) & (samples < hi))
    rows.append(dict(erratum="Aithal-Li eq.17 (missing -1)", quantity=f"P[|A-a|<2sZ/b], sZ={sz}",
                     printed=mass(aithal_li.nes_factor_density_as_printed),
                     corrected=mass(aithal_li.nes_factor_density), monte_carlo=p, mc_se=se))

    # Remark 2: P[A < 0] for a > 0.
    a, f_t, sigma = 5.0, 0.01, 1e-4
    sz = math.sqrt(float(aithal_li.sigma_z2(sigma, f_t, f_t)))
    samples = np.asarray(theorem1(ks[1], n, a, sz, beta), np.float64)
    p, se = montecarlo.prob_se(~(samples >= 0))
    rows.append(dict(erratum="Aithal-Li Remark 2 (exponent sign)", quantity=f"P[A<0], a={a:g}, F_t={f_t}, s={sigma:g}",
                     printed=float(aithal_li.prob_factor_negative_as_printed(a, sz, beta)),
                     corrected=float(aithal_li.prob_factor_negative(a, sz, beta)), monte_carlo=p, mc_se=se))

    # Theorem 2: at n = ceil(N_A), P[sum A_i < c] under Var = a^2/SNR (eq. 6's model) vs the text's Var = SNR.
    snr, ra = 0.05, dict(R_PARAMS, eps=0.05)
    n_clean, n_noisy = (float(v) for v in aithal_li.theorem2_iterations(snr, **ra))
    steps = int(math.ceil(n_noisy))
    c = (1 - ra["eta"] / ra["v0"]) / ra["lam"]
    paths = max(2000, n // steps)
    sums = jax.jit(montecarlo.learning_rate_sums, static_argnums=(1, 2))
    s_ok = np.asarray(sums(ks[2], paths, steps, ra["a"], ra["a"] ** 2 / snr), np.float64)
    s_txt = np.asarray(sums(ks[3], paths, steps, ra["a"], snr), np.float64)
    p_ok, se_ok = montecarlo.prob_se(s_ok < c)
    p_txt, _ = montecarlo.prob_se(s_txt < c)
    exact = float(jax.scipy.stats.norm.cdf((c - steps * ra["a"]) / (math.sqrt(steps / snr) * ra["a"])))
    rows.append(dict(erratum="Aithal-Li Thm 2 (A=a+sqrt(SNR)v)",
                     quantity=f"P[sum A<c] at n=ceil(N_A)={steps}, eps={ra['eps']}",
                     printed=p_txt, corrected=exact, monte_carlo=p_ok, mc_se=se_ok))

    # Lemma 3 / Theorem 4: bias of eq. (57) and of the exact MLE, times beta/sigma_Z^2.
    a, beta, vz, reps = 10.0, 1e-3, 0.0025, 64
    trials = max(500, n // reps)
    y = jax.jit(montecarlo.repeated_factor_samples, static_argnums=(1, 2))(ks[4], trials, reps, a, vz, beta)
    for name, est, printed, corrected in (
            ("Aithal-Li Lemma 3 eq.57 (bias)", aithal_li.lemma3_estimator, 0.0, -1.5),
            ("exact MLE of eq.59 (bias)", aithal_li.mle_estimator, float("nan"), 0.0)):
        bias, se = montecarlo.mean_se((np.asarray(est(y, vz, beta), np.float64) - a) * beta / vz)
        rows.append(dict(erratum=name, quantity=f"E[a_hat-a]*beta/sZ^2, sZ^2={vz}", printed=printed,
                         corrected=corrected, monte_carlo=float(bias), mc_se=float(se)))

    # Park Sec. 5.1: flip rate at the noise level chosen for K.
    delta, k = 0.1, 0.01
    for label, sig_fn in (("printed sigma", park.sigma_for_flip_as_printed), ("corrected sigma", park.sigma_for_flip)):
        s = float(sig_fn(delta, k))
        v = np.asarray(s * jax.random.normal(jax.random.fold_in(ks[5], int(label[0] == "c")), (n, 2)), np.float64)
        p, se = montecarlo.prob_se(v[:, 0] - v[:, 1] > delta)
        rows.append(dict(erratum=f"Park 5.1 ({label} = {s:.4f})", quantity=f"flip rate, delta={delta}, K={k}",
                         printed=float(park.pair_flip_probability_as_printed(delta, s)),
                         corrected=float(park.pair_flip_probability(delta, s)), monte_carlo=p, mc_se=se))

    # Park Sec. 5.2: E[log((p_c+e_c)/(p_o+e_o))] - log(p_c/p_o).
    p_c, p_o, s = 0.6, 0.3, 0.03
    lr = np.asarray(_sampler(montecarlo.log_ratio_samples)(ks[6], n, p_c, p_o, s), np.float64) - math.log(p_c / p_o)
    m, se = montecarlo.mean_se(lr)
    rows.append(dict(erratum="Park 5.2 (loss bias)", quantity=f"E[L(p+e)]-L(p), p=({p_c},{p_o}), s={s}",
                     printed=float(park.fd_loss_bias_as_printed(p_c, p_o, s)),
                     corrected=float(park.fd_loss_bias(p_c, p_o, s)), monte_carlo=float(m), mc_se=float(se)))
    return rows


# ----------------------------------------------------------------------------- figures


def _figures(out: Path, cfg: dict, t1: dict, rows: list[dict], acc_rows: list[dict], flip_rows: list[dict], mc_key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig_grid = np.logspace(-6, -1, 41)
    measured_sigmas = [r["sigma"] for r in rows]
    models_stats = {**{f"{k} (paper Table 1)": v for k, v in aithal_li.TABLE1.items()},
                    f"{cfg['model']} (measured Table 1)": t1}
    colors = dict(zip(models_stats, ("tab:blue", "tab:orange", "tab:green", "tab:red")))

    # Fig. 2: (a) accuracy, (b) output and gradient SNR.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    s_acc = [r["sigma"] for r in acc_rows]
    ax1.plot(s_acc, [100 * r["acc_meas"] for r in acc_rows], "o-", label="measured (mean of draws)")
    ax1.plot(s_acc, [100 * r["acc_worst"] for r in acc_rows], "v:", label="measured (worst draw)")
    ax1.plot(s_acc, [100 * r["acc_pred"] for r in acc_rows], "k--", label="exact top-1 probability (|F+sv|)")
    ax1.set(xscale="log", xlabel="output noise sigma", ylabel="clean accuracy (%)",
            title=f"(a) accuracy under output noise, {cfg['dataset']}/{cfg['model']}")
    ax1.legend(fontsize=8)
    ax2.plot(s_acc, [r["out_snr_meas_db"] for r in acc_rows], "o-", color="k", label="output SNR measured")
    ax2.plot(s_acc, [r["out_snr_pred_db"] for r in acc_rows], "k--", label="output SNR E||F||^2/(K s^2)")
    for name, st in models_stats.items():
        ax2.plot(sig_grid, 10 * np.log10(st["mean_dF"] ** 2 / (2 * sig_grid**2)), "-", color=colors[name], alpha=0.7,
                 label=f"grad SNR eq.5, {name}")
    for name, pr in aithal_li.PRINTED_SECTION_IVA.items():
        ax2.plot([0.01], [pr["snr_db"]], "x", color=colors[f"{name} (paper Table 1)"], ms=9)
    ax2.plot([], [], "kx", label="paper's printed SNR at 0.01")
    ax2.plot(measured_sigmas, [r["snr_pred_db"] for r in rows], "s", mfc="none", color="tab:red",
             label="digits per-sample eq.5, median (valid)")
    ax2.plot(measured_sigmas, [r["snr_meas_db"] for r in rows], "^", color="tab:red",
             label="digits measured, median (valid)")
    ax2.set(xscale="log", xlabel="output noise sigma", ylabel="SNR (dB)", title="(b) SNR of outputs and of A")
    ax2.legend(fontsize=6, loc="lower left")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig2_accuracy_snr.png", dpi=110)
    plt.close(fig)

    # Fig. 3: (a) R vs sigma, (b) N vs sigma.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, st in models_stats.items():
        snr = st["mean_dF"] ** 2 / (2 * sig_grid**2)
        ax1.plot(sig_grid, np.asarray(aithal_li.query_ratio(snr, **R_PARAMS)), color=colors[name], label=name)
        n8 = np.asarray(aithal_li.repeated_queries(sig_grid, st["mean_ft"], cfg["a_n"], st["beta"], cfg["eps_n"]))
        ax2.plot(sig_grid, np.where(np.isfinite(n8), n8, np.nan), "-", color=colors[name], label=f"eq.8, {name}")
        nc = np.asarray(aithal_li.repeated_queries_consistent(2 * sig_grid**2 / st["mean_ft"] ** 2, cfg["a_n"],
                                                              st["beta"], cfg["eps_n"]))
        ax2.plot(sig_grid, nc, "--", color=colors[name], alpha=0.7)
    for name, pr in aithal_li.PRINTED_SECTION_IVA.items():
        ax1.plot([0.01], [pr["R"]], "x", color=colors[f"{name} (paper Table 1)"], ms=9)
    ax1.plot([], [], "kx", label="paper's printed R at 0.01")
    ax1.plot(measured_sigmas, [r["R_meas"] for r in rows], "^", color="tab:red", label="digits R from measured SNR")
    ax1.set(xscale="log", yscale="log", xlabel="output noise sigma", ylabel="R = QC(noise)/QC(clean)",
            title="(a) query-count ratio, eq. (6) from mean dF_t")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.plot([], [], "k--", label="consistent estimator (any sigma)")
    ax2.set(xscale="log", yscale="log", xlabel="output noise sigma", ylabel="repeated queries N",
            title=f"(b) N for P[a_hat<0] < {cfg['eps_n']}, a = {cfg['a_n']:g}; eq.8 (solid) ends at sZ^2 = a beta")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig3_R_N.png", dpi=110)
    plt.close(fig)

    # Fig. 6: P[A < 0] vs sigma for F_t = 0.1, 0.01 (beta = 1e-3), closed form vs Monte-Carlo.
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    beta = 1e-3
    mc_sig = np.logspace(-6, -1, 6)
    frac_negative = jax.jit(jax.vmap(
        lambda k, a, sz: jnp.mean(~(montecarlo.theorem1_samples(k, 4000, a, sz, beta) >= 0)), in_axes=(0, None, 0)))
    for i, f_t in enumerate((0.1, 0.01)):
        color = ("tab:blue", "tab:orange")[i]
        for j, (a, style) in enumerate(((1.0, "-"), (30.0, "--"))):
            sz = np.sqrt(2.0) * sig_grid / f_t
            ax.plot(sig_grid, np.asarray(aithal_li.prob_factor_negative(a, sz, beta)), style, color=color,
                    label=f"F_t={f_t}, a={a:g}")
            keys = jax.random.split(jax.random.fold_in(mc_key, 2 * i + j), len(mc_sig))
            mc = np.asarray(frac_negative(keys, a, jnp.asarray(np.sqrt(2.0) * mc_sig / f_t, jnp.float32)))
            ax.plot(mc_sig, mc, "o", color=color, mfc="none", ms=5)
    ax.plot([], [], "ko", mfc="none", label="Monte-Carlo (Theorem 1 model)")
    ax.set(xscale="log", xlabel="output noise sigma", ylabel="P[A < 0]", ylim=(-0.02, 0.55),
           title="Fig. 6: P[A<0] for a>0, beta=1e-3")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig6_prob_negative.png", dpi=110)
    plt.close(fig)

    # Sign flips per layer: measured vs eq. (26).
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for layer in dict.fromkeys(r["layer"] for r in flip_rows):
        rs = [r for r in flip_rows if r["layer"] == layer]
        line, = ax.plot([r["ratio_median"] for r in rs], [r["p_meas"] for r in rs], "o", label=f"{layer} measured")
        ax.plot([r["ratio_median"] for r in rs], [r["p_eq26"] for r in rs], "x", color=line.get_color())
    grid = np.logspace(-2, 2, 100)
    ax.plot(grid, np.asarray(rfd.opposite_action_probability(grid)), "k-", lw=0.8, label="eq. (26) at the ratio")
    ax.plot([], [], "kx", label="eq. (26) per image, mean")
    ax.set(xscale="log", xlabel="median ratio 2 nu^2 |grad_h|^2 / (mu^2 |grad_x|^2)", ylabel="P[opposite action]",
           title=f"sign flips of L(x+mu u)-L(x), mu={cfg['mu']:g}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sign_flips.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


NOTES = [
    "Aithal & Li eq. (17) misses the mean of Z: exp(-(e^{b(x-a)}-1)^2/(2 sZ^2)); as printed it has mass 1/2.",
    "Aithal & Li Remark 2: P[A<x] = P[Z < e^{+b(x-a)}]; the printed e^{-b(x-a)} gives P[A<0] > 1/2 for a > 0.",
    "Aithal & Li Theorem 2: eq. (6) solves A ~ N(a, a^2/SNR), not the text's A = a + sqrt(SNR) v.",
    "Aithal & Li Section IV-A: printed SNRs are 10log10(dF^2/s^2), 3.01 dB above eq. (5)'s dF^2/(2 s^2); the printed R "
    "values follow from eq. (5)+(6) and are reproduced to their one significant digit.",
    "Aithal & Li Lemma 3: eq. (57) is biased by -(3/2) sZ^2/b (a second-order term dropped from (59)); (59) has an "
    "exact root (mle_estimator). Eq. (8) is a necessary count for (57) only and has no solution once sZ^2 >= a b, "
    "which is "
    "Fig. 3(b)'s 'no realistic N'; a consistent estimator needs N = Phi^-1(eps)^2 sZ^2/(a b)^2 at any sigma.",
    "Park et al. 5.1: the flip probability standardises by the std, Phi(-delta/(sqrt2 sigma)); the printed variance "
    "gives sigma^2 = -delta/(2 Phi^-1(K)) instead of delta^2/(2 Phi^-1(K)^2).",
    "Park et al. 5.2: E[log((p_c+e_c)/(p_o+e_o))] - log(p_c/p_o) = (s^2/2)(1/p_o^2 - 1/p_c^2), not "
    "-(s^2/2)(s^2+p_o^2+p_c^2)/(p_c^2 p_o^2).",
    "Randomized feature defense: the paper's nu, mu are variances (N(0, nu I)); with stds the ratio is "
    "2 nu^2 |grad_h|^2/(mu^2 |grad_x|^2). Appendix C's Cauchy scale should use squared norms.",
]


def main(argv=None) -> dict:
    """Run the comparison; each finished part (a sigma's rows, a sign-flip row, the errata) is kept in
    ``rows.jsonl``, so a run started again with the same options and ``--out`` skips those parts (Table 1
    of the model and the gradients are recomputed: the parts start from them); another configuration
    in that ``--out`` is refused."""
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configure(args, given_options(parser, argv, args))
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    show = not args.no_progress
    t_start = time.time()
    timing = {}

    _, k_data, k_probe, k_defense = jax.random.split(jax.random.key(args.seed), 4)
    k_t1, k_flip_dirs = jax.random.split(k_probe)
    k_noise, k_acc, k_flip_noise, k_mc = jax.random.split(k_defense, 4)

    train_cfg = train.TrainConfig(seed=args.train_seed, epochs=args.train_epochs)
    model, params = train.load_or_train(cfg["model"], cfg["dataset"], train_cfg, cache_dir=args.cache_dir,
                                        data_dir=args.data_dir, progress=show)
    cfg["train"] = dataclasses.asdict(train_cfg)
    x_test, y_test = data.load(cfg["dataset"], "test", data_dir=args.data_dir)
    if cfg["n_images"] > len(y_test):
        raise ValueError(f"--n-images {cfg['n_images']}: the {cfg['dataset']} test split has only {len(y_test)} images")
    log = open_run(out, cfg)  # the run is valid: config.json, then one line per finished part
    clean = model_scorer(model, params)
    clean_j = pytree.compiled(clean)
    order = np.asarray(jax.random.permutation(k_data, len(y_test)))[: cfg["n_images"]]
    xs, ys = np.asarray(x_test)[order], np.asarray(y_test)[order]

    n_steps = len(cfg["sigmas"]) * 2 + len(cfg["layers"]) * len(cfg["nu_rel"]) + 3
    bar = tqdm(total=n_steps, desc="theory vs measurement", disable=not show, file=sys.stderr)

    # Table 1 of this model (whole test split), then the NES-pair samples of the chosen images.
    t0 = time.time()
    bar.set_postfix_str("Table 1")
    t1_stats, all_samples = stats.table1(clean_j, x_test, y_test, k_t1, cfg["beta"], cfg["n_dirs"])
    samples = stats.select_samples(all_samples, order, cfg["n_dirs"])
    t1 = t1_stats._asdict()
    paper = aithal_li.section_iva(0.01, **R_PARAMS)
    bar.update()
    timing["table1"] = time.time() - t0

    # Per sigma: the NES factor under the real output-noise defense; accuracy and output SNR.
    # Every defense is compiled once with its noise level (a 0-d array) and the params as arguments.
    rows, acc_rows = [], []
    t0 = time.time()
    def sigma_rows(i, sigma):
        bar.set_postfix_str(f"A at sigma={sigma:g}")
        defended = pytree.compiled(output_noise(clean, jnp.float32(sigma)))
        noise = stats.measure_factor_noise(defended, samples, jax.random.fold_in(k_noise, i), cfg["draws"])
        row = stats.compare_factor(samples, noise, sigma, cfg["small"], cfg["eps_n"])
        snr_t1 = t1["mean_dF"] ** 2 / (2 * sigma**2)
        row.update(
            valid_pct=100 * row["frac_valid"],
            within_3db_pct=100 * row["frac_within_3db"] if np.isfinite(row["frac_within_3db"]) else float("nan"),
            snr_table1_db=float(10 * np.log10(snr_t1)),
            R_table1=float(aithal_li.query_ratio(snr_t1, **R_PARAMS)),
            N_eq8=float(aithal_li.repeated_queries(sigma, t1["mean_ft"], cfg["a_n"], cfg["beta"], cfg["eps_n"])),
            N_consistent=float(aithal_li.repeated_queries_consistent(2 * sigma**2 / t1["mean_ft"] ** 2, cfg["a_n"],
                                                                    cfg["beta"], cfg["eps_n"])))
        bar.update()
        bar.set_postfix_str(f"accuracy at sigma={sigma:g}")
        acc = stats.output_noise_stats(clean_j, defended, x_test, y_test, jax.random.fold_in(k_acc, i),
                                       cfg["acc_draws"])
        probs = acc.pop("probs")
        acc_row = dict(
            sigma=sigma, **acc,
            acc_pred=float(np.mean(park.class_probability(probs, y_test, sigma, fold=True, n_grid=801))),
            acc_pred_gaussian=float(np.mean(park.class_probability(probs, y_test, sigma, fold=False, n_grid=801))),
            out_snr_pred_db=float(10 * np.log10(aithal_li.output_snr(acc["mean_sq_norm"], sigma, probs.shape[-1]))))
        bar.update()
        return {"nes_factor": row, "accuracy": acc_row}

    for i, sigma in enumerate(cfg["sigmas"]):
        if f"sigma/{i}/{sigma!r}" in log:
            bar.update(2)
        done = log.unit(f"sigma/{i}/{sigma!r}", lambda: sigma_rows(i, sigma))
        rows.append(done["nes_factor"])
        acc_rows.append(done["accuracy"])
    timing["output_noise"] = time.time() - t0

    # Sign flips of L(x + mu u) - L(x) under input and feature noise, vs eq. (26) / Theorem 3.
    t0 = time.time()
    mu = cfg["mu"]
    flip_rows = []
    grads, values = jax.jit(lambda p, x, y: rfd.loss_gradients(model, p, x, y))(params, jnp.asarray(xs),
                                                                                jnp.asarray(ys))
    sq = {k: np.asarray(v, np.float64) for k, v in rfd.grad_sq_norms(grads).items()}
    values = np.asarray(values, np.float64)
    dim = int(np.prod(cfg["image_shape"]))
    for j, layer in enumerate(cfg["layers"]):
        nu_star = float(mu / math.sqrt(2.0) * np.median(np.sqrt(sq["input"] / np.maximum(sq[layer], 1e-30))))

        def flip_row(layer, c, nu):
            bar.set_postfix_str(f"sign flips {layer} nu={nu:.3g}")
            level = jnp.float32(nu)
            defended = pytree.compiled(input_noise(clean, level) if layer == "input" else
                                       feature_noise(model, params, {layer: level}, cfg["image_shape"]))
            meas = stats.sign_flip_rates(clean_j, defended, xs, ys, k_flip_dirs, mu, cfg["flip_dirs"],
                                         cfg["flip_draws"])
            pred = stats.flip_predictions(sq, values, mu, layer, nu, h=meas["h"], dim=dim)
            n_pairs = meas["flip_dir"].size * meas["draws"]
            p_meas = float(meas["flip"].mean())
            return dict(
                layer=layer, nu_rel=c, nu=nu, ratio_median=float(np.median(pred["ratio"])),
                p_eq26=float(pred["eq26"].mean()), p_conditional=float(pred["conditional"].mean()), p_meas=p_meas,
                p_se=float(np.sqrt(max(p_meas * (1 - p_meas), 1e-12) / n_pairs)),
                qin_bound=float(pred["qin_bound"].mean()) if "qin_bound" in pred else float("nan"),
                acc_pred=float(pred["acc_pred"].mean()), acc_meas=meas["acc"])

        for c in cfg["nu_rel"]:
            nu = c * nu_star
            flip_rows.append(log.unit(f"sign_flips/{layer}/{c!r}", lambda: flip_row(layer, c, nu)))
            bar.update()
    timing["sign_flips"] = time.time() - t0

    t0 = time.time()
    bar.set_postfix_str("errata Monte-Carlo")
    errata = log.unit("errata", lambda: errata_evidence(jax.random.fold_in(k_mc, 0), cfg["mc_samples"]))
    bar.update()
    timing["errata"] = time.time() - t0

    t0 = time.time()
    bar.set_postfix_str("figures")
    _figures(out, cfg, t1, rows, acc_rows, flip_rows, jax.random.fold_in(k_mc, 1))
    bar.update()
    bar.close()
    timing["figures"] = time.time() - t0

    print(f"Table 1 of {cfg['dataset']}/{cfg['model']}: acc {t1['acc']:.4f}, mean F_t {t1['mean_ft']:.3g}, "
          f"beta {t1['beta']:g}, dF_t mean {t1['mean_dF']:.3g} / median {t1['median_dF']:.3g} / std {t1['std_dF']:.3g}")
    print("\nSection IV-A recomputed from the paper's Table 1 (sigma = 0.01)")
    print(table(paper, PAPER_COLUMNS))
    print(f"\nSNR of the NES factor A (beta={cfg['beta']:g}; medians over samples where sigma <= "
          f"{cfg['small']:g} min F_t holds / where it does not)")
    print(table(rows, SNR_COLUMNS))
    print(f"\nSign flips of A, R (eq. 6) and repeated queries N (eps={cfg['eps_n']}, a={cfg['a_n']:g}, mean F_t)")
    print(table(rows, FLIP_COLUMNS))
    print("\nClean accuracy and output SNR under output noise (Fig. 2)")
    print(table(acc_rows, ACC_COLUMNS))
    print(f"\nSign flips of L(x+mu u)-L(x) under input / feature noise (mu={mu:g}); nu* sets the median ratio to 1")
    print(table(flip_rows, SIGNFLIP_COLUMNS))
    print("\nErrata: printed vs corrected closed form vs Monte-Carlo of the paper's own assumptions")
    print(table(errata, ERRATA_COLUMNS))
    print(f"\nresults in {out}/", file=sys.stderr)

    results = {"config": cfg, "table1": t1, "section_iva": paper, "nes_factor": rows, "accuracy": acc_rows,
               "sign_flips": flip_rows, "errata": errata, "notes": NOTES,
               "samples": {"n": int(len(samples.a)), "dropped_underflow": samples.dropped}}
    write_json(out / "results.json", results)
    write_timing(out, {**timing, "resumed_rows": log.resumed}, t_start)
    return results


if __name__ == "__main__":
    cli(main)
