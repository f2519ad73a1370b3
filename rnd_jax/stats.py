"""Measured counterparts of :mod:`rnd_jax.theory` on a trained model.

Everything here is measured through scorers (``scores(x, keys) -> probabilities``, see
:mod:`rnd_jax.defenses`): the clean statistics with the clean scorer, the noisy ones with a real
defended scorer (:func:`rnd_jax.defenses.output_noise`, ``input_noise``, ``feature_noise``), never
with a re-implementation of the defense. Randomness comes from one key: probe directions from
``fold_in(k_dirs, image_index)`` and the defense noise of draw ``r`` from
``query_keys(fold_in(k_noise, r), 0, n_points)``, so results do not depend on how the work is
chunked. Nothing here jits; pass ``jax.jit(scorer)`` for speed (scorers are pure functions).

- :func:`table1` — Aithal & Li's Table 1 statistics: accuracy, mean ``F_t(x)`` over the non-top-1
  classes, and mean/median/std of ``Delta F_t = |F_t(x - beta u) - F_t(x + beta u)|`` for random
  ``u ~ N(0, I)``; plus the per-(image, direction, class) samples the NES factor is built from.
- :func:`measure_factor_noise` / :func:`compare_factor` — the NES factor ``A`` under a defended
  scorer, Monte-Carlo over noise draws: measured ``E[(A - a)^2]``, SNR and sign-flip rate next to
  Lemma 1, Theorem 1 and the exact flip probability, split by whether the small-noise assumption
  ``sigma <= small * min(F_-, F_+)`` holds for the sample.
- :func:`output_noise_stats` — clean accuracy and output SNR of a defended model vs sigma
  (Aithal & Li Fig. 2); the exact prediction is :func:`rnd_jax.theory.park.class_probability`.
- :func:`sign_flip_rates` — how often input or feature noise reverses the sign of
  ``L(x + mu u) - L(x)`` (Qin et al. Theorem 3; randomized feature defense eq. 26), with
  :func:`flip_predictions` for the theory side from the gradients of
  :func:`rnd_jax.theory.rfd.loss_gradients`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax import losses
from rnd_jax.oracle import query_keys
from rnd_jax.theory import aithal_li, qin, rfd
from rnd_jax.theory._util import Phi_inv, db

__all__ = [
    "FactorNoise",
    "FactorSamples",
    "Table1",
    "compare_factor",
    "flip_predictions",
    "measure_factor_noise",
    "output_noise_stats",
    "probe_directions",
    "select_samples",
    "sign_flip_rates",
    "table1",
]


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_pos(name, value):
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _batched(fn, x, batch_size):
    """``fn`` over the leading axis of ``x`` in chunks of exactly ``batch_size`` rows (the last one
    zero-padded, so a jitted ``fn`` compiles once), concatenated as numpy."""
    x = np.asarray(x)
    out = []
    for s in range(0, len(x), batch_size):
        chunk = x[s:s + batch_size]
        m = len(chunk)
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(chunk))[:m])
    return np.concatenate(out)


def _call(defended, x, keys, batch_size):
    """``defended(x, keys)`` as numpy, in chunks of exactly ``batch_size`` points (the last chunk
    padded with repeats of its first point), so a jitted scorer compiles once whatever ``len(x)``."""
    x = np.asarray(x)
    n = len(x)
    out = []
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size)
        idx = np.where(idx < n, idx, s)
        out.append(np.asarray(defended(jnp.asarray(x[idx]), keys[jnp.asarray(idx)]))[: min(batch_size, n - s)])
    return np.concatenate(out)


def _safe_log(p):
    """:func:`rnd_jax.losses.safe_log` in numpy float64."""
    p = np.asarray(p, np.float64)
    return np.log(np.where(p > losses.TINY, p, losses.TINY))


_GROUP, _BLOCK = 64, 1024


def probe_directions(key, n_images: int, n_dirs: int, shape) -> np.ndarray:
    """``u ~ N(0, I)`` of shape ``[n_images, n_dirs, *shape]`` (float32 numpy).

    Image ``i`` draws its directions from ``fold_in(key, i)`` alone (in blocks of 1024 numbers,
    block ``b`` from ``fold_in(fold_in(key, i), b)``), so its probes do not depend on the other
    images; images are sampled 64 at a time, so one compiled sampler serves every call.
    """
    shape = tuple(int(s) for s in shape)
    size = n_dirs * int(np.prod(shape))
    blocks = -(-size // _BLOCK)
    sample = jax.vmap(lambda i, b: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), b), (_BLOCK,)),
                      in_axes=(0, None))
    out = np.empty((n_images, blocks * _BLOCK), np.float32)
    for start in range(0, n_images, _GROUP):
        ids = jnp.arange(start, start + _GROUP)
        rows = min(_GROUP, n_images - start)
        for b in range(blocks):
            out[start:start + rows, b * _BLOCK:(b + 1) * _BLOCK] = np.asarray(sample(ids, b))[:rows]
    return out[:, :size].reshape((n_images, n_dirs) + shape)


# ----------------------------------------------------------------------------- Table 1


class Table1(NamedTuple):
    """Aithal & Li Table 1 statistics of a model on a dataset (no noise)."""

    acc: float
    mean_ft: float  # mean F_t(x) over images and non-top-1 classes
    beta: float
    mean_dF: float
    median_dF: float
    std_dF: float
    n_images: int
    n_dirs: int


class FactorSamples(NamedTuple):
    """One row per (image, direction, non-top-1 class ``t``) of clean NES-pair answers."""

    point: np.ndarray  # i32[S]: index into x_minus / x_plus (image * n_dirs + direction)
    cls: np.ndarray  # i32[S]: the target class t
    f_minus: np.ndarray  # f32[S]: F_t(x - beta u)
    f_plus: np.ndarray  # f32[S]: F_t(x + beta u)
    a: np.ndarray  # f64[S]: (log F_- - log F_+) / beta, from the float32 answers
    x_minus: np.ndarray  # f32[P, H, W, C]
    x_plus: np.ndarray  # f32[P, H, W, C]
    beta: float
    dropped: int  # samples left out because an answer underflowed to 0


def table1(scorer, images, labels, key, beta: float = 1e-3, n_dirs: int = 1, batch_size: int = 1024):
    """Table 1 of Aithal & Li for ``scorer`` on ``(images, labels)``, and the NES-pair samples.

    ``Delta F_t`` is taken over every non-top-1 class ``t`` of every image (the top-1 of the clean
    answer at ``x``), for ``n_dirs`` directions ``u ~ N(0, I)`` per image. Returns
    ``(Table1, FactorSamples)``.
    """
    beta = _check_pos("beta", beta)
    n_dirs = _check_int("n_dirs", n_dirs)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    n = len(images)
    if n == 0 or n != len(labels):
        raise ValueError(f"need matching non-empty images/labels, got {n} and {len(labels)}")
    clean = lambda x: scorer(jnp.asarray(x), None)
    probs = _batched(clean, images, batch_size)
    top = probs.argmax(-1)
    k = probs.shape[-1]
    others = np.arange(k)[None, :] != top[:, None]
    u = probe_directions(key, n, n_dirs, images.shape[1:])
    x = np.repeat(images, n_dirs, axis=0)
    u = u.reshape((n * n_dirs,) + images.shape[1:])
    x_minus, x_plus = x - beta * u, x + beta * u
    p_minus = _batched(clean, x_minus, batch_size)
    p_plus = _batched(clean, x_plus, batch_size)
    point, cls = np.nonzero(np.repeat(others, n_dirs, axis=0))
    f_minus, f_plus = p_minus[point, cls], p_plus[point, cls]
    d_f = np.abs(f_minus.astype(np.float64) - f_plus.astype(np.float64))
    keep = (f_minus > 0) & (f_plus > 0) & np.isfinite(f_minus) & np.isfinite(f_plus)
    a = (np.log(f_minus[keep].astype(np.float64)) - np.log(f_plus[keep].astype(np.float64))) / beta
    stats = Table1(acc=float(np.mean(top == labels)), mean_ft=float(probs[others].mean()), beta=beta,
                   mean_dF=float(d_f.mean()), median_dF=float(np.median(d_f)), std_dF=float(d_f.std()),
                   n_images=n, n_dirs=n_dirs)
    samples = FactorSamples(point[keep].astype(np.int32), cls[keep].astype(np.int32), f_minus[keep], f_plus[keep],
                            a, x_minus, x_plus, beta, int(np.sum(~keep)))
    return stats, samples


def select_samples(samples: FactorSamples, images, n_dirs: int) -> FactorSamples:
    """The samples of the given image indices only (``n_dirs`` as passed to :func:`table1`)."""
    images = np.asarray(images, np.int64)
    points = (images[:, None] * n_dirs + np.arange(n_dirs)[None, :]).ravel()
    new_index = np.full(len(samples.x_minus), -1, np.int64)
    new_index[points] = np.arange(len(points))
    keep = new_index[samples.point] >= 0
    return samples._replace(point=new_index[samples.point[keep]].astype(np.int32), cls=samples.cls[keep],
                            f_minus=samples.f_minus[keep], f_plus=samples.f_plus[keep], a=samples.a[keep],
                            x_minus=samples.x_minus[points], x_plus=samples.x_plus[points])


# ----------------------------------------------------------------------------- NES factor under noise


class FactorNoise(NamedTuple):
    """Monte-Carlo over ``draws`` defense draws of the noisy NES factor ``A`` of each sample."""

    mse: np.ndarray  # f64[S]: mean (A - a)^2
    flip: np.ndarray  # f64[S]: frequency of sign(A) != sign(a)
    mean: np.ndarray  # f64[S]: mean A
    draws: int


def measure_factor_noise(defended, samples: FactorSamples, key, draws: int = 256, chunk: int = 16,
                         batch_size: int = 1024):
    """The NES factor ``A = (log F~_- - log F~_+)/beta`` from ``defended`` answers, ``draws`` times.

    Each draw queries every ``x - beta u`` and ``x + beta u`` once (independent noise per query);
    ``log`` is :func:`rnd_jax.losses.safe_log`, as an attacker's loss would use.
    """
    draws = _check_int("draws", draws)
    chunk = min(_check_int("chunk", chunk), draws)
    x = np.concatenate([samples.x_minus, samples.x_plus])
    n_pts = samples.x_minus.shape[0]
    a = samples.a
    total = np.zeros(len(a))
    total_sq = np.zeros(len(a))
    flips = np.zeros(len(a))
    n_chunks = -(-draws // chunk)
    all_keys = _draw_keys(key, n_chunks * chunk, 2 * n_pts).reshape(n_chunks, -1)
    xs = np.tile(x, (chunk,) + (1,) * (x.ndim - 1))
    for c in range(n_chunks):
        used = min(chunk, draws - c * chunk)
        logp = _safe_log(_call(defended, xs, all_keys[c], batch_size)).reshape(chunk, 2 * n_pts, -1)[:used]
        big_a = (logp[:, samples.point, samples.cls] - logp[:, n_pts + samples.point, samples.cls]) / samples.beta
        total += big_a.sum(0)
        total_sq += ((big_a - a) ** 2).sum(0)
        flips += (np.sign(big_a) != np.sign(a)).sum(0)
    return FactorNoise(total_sq / draws, flips / draws, total / draws, draws)


def compare_factor(samples: FactorSamples, noise: FactorNoise, sigma: float, small: float = 0.1,
                   eps_n: float = 0.3) -> dict:
    """Predicted vs measured SNR (dB) and sign-flip rate of ``A`` at output noise ``sigma``.

    Per sample: Lemma 1's SNR (eq. 5) vs ``a^2 / mean (A - a)^2``; Theorem 1's flip probability and
    the exact one (:func:`rnd_jax.theory.aithal_li.prob_factor_flip_exact`) vs the measured rate;
    the repeated queries a consistent estimator needs for ``P[sign a_hat != sign a] = eps_n``
    (``Phi^{-1}(eps)^2 sigma_Z^2/(a beta)^2`` vs the same with the measured variance). The
    small-noise assumption holds for a sample when ``sigma <= small * min(F_-, F_+)``; medians are
    reported over the samples where it holds (``valid``) and where it does not (``invalid``).
    """
    sigma = _check_pos("sigma", sigma)
    beta = samples.beta
    fm = samples.f_minus.astype(np.float64)
    fp = samples.f_plus.astype(np.float64)
    a = samples.a
    usable = (a != 0) & (noise.mse > 0)
    valid = usable & (sigma <= small * np.minimum(fm, fp))
    invalid = usable & ~valid
    s2 = np.asarray(aithal_li.sigma_z2(sigma, fm, fp), np.float64)
    pred = np.asarray(aithal_li.snr_nes(sigma, fm, fp), np.float64)
    meas = np.where(usable, a**2 / np.where(noise.mse > 0, noise.mse, 1.0), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.asarray(db(meas) - db(pred), np.float64)
    p_thm1 = np.asarray(aithal_li.prob_factor_flip(a, np.sqrt(s2), beta), np.float64)
    p_exact = np.asarray(aithal_li.prob_factor_flip_exact(fm, fp, sigma), np.float64)
    q2 = float(Phi_inv(eps_n)) ** 2
    n_pred = q2 * s2 / (a * beta) ** 2
    n_meas = q2 * noise.mse / a**2

    def med_db(x, m):
        with np.errstate(divide="ignore"):
            return float(np.median(10 * np.log10(x[m]))) if m.any() else float("nan")

    def med(x, m):
        return float(np.median(x[m])) if m.any() else float("nan")

    def mean(x, m):
        return float(np.mean(x[m])) if m.any() else float("nan")

    row = dict(
        sigma=sigma, n_samples=int(usable.sum()), n_valid=int(valid.sum()), frac_valid=float(valid.mean()),
        snr_pred_db=med_db(pred, valid), snr_meas_db=med_db(meas, valid), snr_delta_db=med(delta, valid),
        snr_max_abs_delta_db=float(np.max(np.abs(delta[valid]))) if valid.any() else float("nan"),
        frac_within_3db=mean(np.abs(delta) <= 3.0, valid),
        snr_pred_db_invalid=med_db(pred, invalid), snr_meas_db_invalid=med_db(meas, invalid),
        snr_delta_db_invalid=med(delta, invalid),
        pflip_thm1=mean(p_thm1, usable), pflip_exact=mean(p_exact, usable), pflip_meas=mean(noise.flip, usable),
        pflip_thm1_valid=mean(p_thm1, valid), pflip_exact_valid=mean(p_exact, valid),
        pflip_meas_valid=mean(noise.flip, valid),
        pflip_se=float(np.sqrt(np.mean(noise.flip[usable] * (1 - noise.flip[usable])) / (usable.sum() * noise.draws)))
        if usable.any() else float("nan"),
        n_repeat_pred=med(n_pred, valid), n_repeat_meas=med(n_meas, valid),
    )
    for kind in ("pred", "meas"):
        v = row[f"snr_{kind}_db"]
        row[f"R_{kind}"] = float(aithal_li.query_ratio(10 ** (v / 10))) if np.isfinite(v) else float("nan")
    row["holds"] = "yes" if row["frac_valid"] >= 0.5 else ("partly" if valid.any() else "no")
    return row


# ----------------------------------------------------------------------------- Fig. 2: accuracy, output SNR


def _draw_keys(key, draws, n):
    """Keys of ``draws`` independent passes over ``n`` points: ``query_keys(fold_in(key, r), 0, n)``."""
    return jax.vmap(lambda r: query_keys(jax.random.fold_in(key, r), 0, n))(jnp.arange(draws))


def output_noise_stats(scorer, defended, images, labels, key, draws: int = 40, batch_size: int = 1024) -> dict:
    """Measured accuracy and output SNR of ``defended`` (an output-noise defense of ``scorer``), Fig. 2.

    Over ``draws`` noise draws of the whole set: ``acc_meas`` (mean), ``acc_worst``, ``acc_se``, and
    ``out_snr_meas_db = 10 log10(E||F(x)||^2 / E||F~(x) - F(x)||^2)``. Also returns the clean
    ``probs`` and ``mean_sq_norm = E||F(x)||^2`` for the predictions
    (:func:`rnd_jax.theory.park.class_probability`, :func:`rnd_jax.theory.aithal_li.output_snr`).
    """
    draws = _check_int("draws", draws)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    probs = _batched(lambda x: scorer(jnp.asarray(x), None), images, batch_size).astype(np.float64)
    keys = _draw_keys(key, draws, len(images))
    accs, noise_pow = [], []
    for r in range(draws):
        noisy = _call(defended, images, keys[r], batch_size).astype(np.float64)
        accs.append(np.mean(noisy.argmax(-1) == labels))
        noise_pow.append(np.mean(np.sum((noisy - probs) ** 2, axis=-1)))
    sq = float(np.mean(np.sum(probs**2, axis=-1)))
    accs = np.asarray(accs)
    return dict(acc_clean=float(np.mean(probs.argmax(-1) == labels)), acc_meas=float(accs.mean()),
                acc_worst=float(accs.min()),
                acc_se=float(accs.std(ddof=1) / np.sqrt(draws)) if draws > 1 else float("nan"),
                out_snr_meas_db=float(10 * np.log10(sq / np.mean(noise_pow))), mean_sq_norm=sq, probs=probs)


# ----------------------------------------------------------------------------- sign flips (Qin Thm 3, RFD eq. 26)


def _loss_fn(loss):
    return loss or losses.margin


def sign_flip_rates(clean, defended, images, labels, key, mu: float, n_dirs: int = 16, draws: int = 16,
                    loss=None, chunk_points: int = 8192, batch_size: int = 1024) -> dict:
    """How often ``defended`` reverses the sign of ``h = L(x + mu u) - L(x)`` (random-search decision).

    For each image, ``n_dirs`` probes ``u ~ N(0, I)`` and, per probe, ``draws`` pairs of fresh
    defended queries at ``x + mu u`` and ``x`` (independent noise). ``loss(probs, label)`` defaults
    to the untargeted margin. Returns per image the flip frequency ``f64[N]`` (``flip``), per probe
    ``f64[N, n_dirs]`` (``flip_dir``), the clean differences ``h f64[N, n_dirs]``, and ``acc``: the
    fraction of the defended answers at the clean images ``x`` whose top-1 is the label (the
    randomized model's accuracy on these images, over ``n_dirs * draws`` draws each).
    """
    mu = _check_pos("mu", mu)
    n_dirs, draws = _check_int("n_dirs", n_dirs), _check_int("draws", draws)
    loss = _loss_fn(loss)
    k_dirs, k_noise = jax.random.split(key)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n = len(images)
    u = probe_directions(k_dirs, n, n_dirs, images.shape[1:])
    x0 = np.repeat(images, n_dirs, axis=0)
    x1 = x0 + mu * u.reshape(x0.shape)
    y = np.repeat(labels, n_dirs)
    probs0 = _batched(lambda x: clean(jnp.asarray(x), None), x0, batch_size)
    probs1 = _batched(lambda x: clean(jnp.asarray(x), None), x1, batch_size)
    h = (np.asarray(loss(jnp.asarray(probs1), jnp.asarray(y)), np.float64)
         - np.asarray(loss(jnp.asarray(probs0), jnp.asarray(y)), np.float64))
    pts = np.concatenate([x1, x0])
    per = min(max(1, chunk_points // len(pts)), draws)
    n_chunks = -(-draws // per)
    keys = _draw_keys(k_noise, n_chunks * per, len(pts)).reshape(n_chunks, -1)
    xs = np.tile(pts, (per,) + (1,) * (pts.ndim - 1))
    yy = jnp.asarray(np.tile(np.concatenate([y, y]), per))
    flips = np.zeros(len(h))
    correct = 0.0
    for c in range(n_chunks):
        used = min(per, draws - c * per)
        probs = _call(defended, xs, keys[c], batch_size)
        vals = np.asarray(loss(jnp.asarray(probs), yy), np.float64).reshape(per, 2, len(h))[:used]
        flips += (np.sign(vals[:, 0] - vals[:, 1]) != np.sign(h)).sum(0)
        top = probs.argmax(-1).reshape(per, 2, len(h))[:used, 1]
        correct += np.sum(top == y)
    flip_dir = (flips / draws).reshape(n, n_dirs)
    return dict(flip=flip_dir.mean(1), flip_dir=flip_dir, h=h.reshape(n, n_dirs), draws=draws, mu=mu,
                acc=float(correct / (draws * len(h))))


def flip_predictions(sq: dict, values, mu: float, layer: str, nu: float, h=None, dim: int | None = None) -> dict:
    """Theory for :func:`sign_flip_rates` with noise ``nu`` at ``layer`` (``"input"`` or a marked layer).

    ``sq = grad_sq_norms(grads)`` and ``values`` come from :func:`rnd_jax.theory.rfd.loss_gradients`
    (``{"input": ..., layer: ...}`` squared gradient norms and the loss per image, as numpy or jax
    arrays). Returns, per image: ``eq26`` (the randomized
    feature defense's opposite-action probability, averaged over ``u`` analytically), ``ratio``
    (``2 nu^2 ||grad_h||^2 / (mu^2 ||grad_x||^2)``) and ``acc_pred`` (Sec. 3.5, eq. 14: probability
    of staying correct); given the measured clean differences ``h [N, n_dirs]``: ``conditional``
    (``Phi(-|h|/(sqrt 2 nu ||grad_h||))`` averaged over the probes) and, for input noise with the
    input dimension ``dim``, ``qin_bound`` (Theorem 3's ``min(1, 2 L_0 nu sqrt(d)/|h|)`` with the
    local ``L_0 = ||grad_x L||``, averaged).
    """
    mu = _check_pos("mu", mu)
    nu = _check_pos("nu", nu)
    if layer not in sq:
        raise ValueError(f"unknown layer {layer!r}; choose one of {list(sq)}")
    sq = {k: np.asarray(v, np.float64) for k, v in sq.items()}
    values = np.asarray(values, np.float64)
    ratio = np.asarray(rfd.noise_ratio(sq[layer], np.maximum(sq["input"], 1e-30), nu, mu), np.float64)
    out = dict(eq26=np.asarray(rfd.opposite_action_probability(ratio), np.float64), ratio=ratio,
               acc_pred=np.asarray(rfd.accuracy_probability(values, sq[layer], nu), np.float64))
    if h is not None:
        h = np.asarray(h, np.float64)
        cond = np.asarray(rfd.conditional_flip_probability(h, sq[layer][:, None], nu), np.float64)
        out["conditional"] = cond.mean(1)
        if layer == "input" and dim is not None:
            bound = np.asarray(qin.sign_flip_bound(np.where(h == 0, 1e-30, h), nu, dim,
                                                   np.sqrt(sq["input"])[:, None]), np.float64)
            out["qin_bound"] = np.minimum(bound, 1.0).mean(1)
    return out
