"""JPEG, AAA, Xie et al.'s random resize-and-pad and Park et al.'s output noise (rnd_jax.defenses, rnd_jax.jpeg)."""

import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import const_scorer, identity_scorer
from rnd_jax import jpeg as jpeg_codec
from rnd_jax import losses, pytree
from rnd_jax.defenses import aaa, aaa_target, build_defense, jpeg, output_noise_park, random_resize_pad
from rnd_jax.oracle import query_keys

K = 10


def pixel_scorer(x, keys):
    """A batch-independent stand-in classifier: softmax of 8 x the first ten pixels."""
    return jax.nn.softmax(8.0 * x.reshape(x.shape[0], -1)[:, :K], axis=-1)


@functools.cache
def _all_keys():
    return query_keys(jax.random.key(0), 0, 3000)


def qkeys(n):
    """Query keys 0..n-1 of one defense key (computed once: the compiled key derivation is shared)."""
    return _all_keys()[:n]


def uniform(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def assert_point_alone_equals_batch(scorer, x, keys):
    """Same keys, same answers (bit for bit); a point alone answers as inside the batch (floats to 1e-6)."""
    full = np.asarray(scorer(x, keys))
    np.testing.assert_array_equal(np.asarray(scorer(x, keys)), full)
    for i in (0, len(x) - 1):
        np.testing.assert_allclose(np.asarray(scorer(x[i:i + 1], keys[i:i + 1]))[0], full[i], rtol=1e-6, atol=1e-7)
    return full


# ---------------------------------------------------------------------------------------------- JPEG


def _smooth_images(rng, n, h, w, c):
    """Smooth periodic patterns plus a little noise, as 8-bit arrays (what Pillow encodes)."""
    yy, xx = np.mgrid[:h, :w]
    out = []
    for _ in range(n):
        f, ph = rng.uniform(0.1, 0.5, (c, 2)), rng.uniform(0, 6, c)
        base = np.stack([np.sin(f[k, 0] * xx + ph[k]) * np.cos(f[k, 1] * yy) for k in range(c)], -1)
        out.append(np.round(np.clip(0.5 + 0.35 * base + 0.03 * rng.standard_normal((h, w, c)), 0, 1) * 255))
    return np.stack(out).astype(np.uint8)


def _pillow(a, quality, subsampling):
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    buf.seek(0)
    im = Image.open(buf)
    return np.asarray(im, np.int64).reshape(a.shape), im.quantization


def test_quant_tables_are_libjpegs():
    """The IJG quality scaling, against the tables Pillow (libjpeg) writes into the file."""
    a = np.zeros((8, 8, 3), np.uint8)
    for q in (1, 10, 24, 25, 50, 51, 75, 95, 100):
        _, tables = _pillow(a, q, 0)
        mine = jpeg_codec.quant_tables(q)
        for t in (0, 1):
            np.testing.assert_array_equal(np.asarray(tables[t]).reshape(8, 8), mine[t], err_msg=f"quality {q}")
    np.testing.assert_array_equal(jpeg_codec.quant_tables(50)[0], jpeg_codec.LUMINANCE)  # scale 100%


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_pillow(channels):
    """Encode-decode against Pillow at the same quality and subsampling, on a size that is not a multiple of 8
    (so libjpeg's edge replication matters) and, for RGB, 4:4:4 and 4:2:0.

    Not bit-exact: libjpeg computes the DCT and its inverse in scaled integer arithmetic (JDCT_ISLOW) and
    this module in float32, so pixels move by a level or so, and a coefficient lying within that error of a
    quantisation boundary rounds the other way (moving its block by up to Q/4 levels, times 1.77 in RGB).
    Tolerance: a mean absolute error of at most 1.5 levels (of 255) per image. The same tolerance rejects a
    wrong quality (off by 5) and, for RGB, the wrong subsampling (checked, so the test can fail).
    """
    rng = np.random.default_rng(0)
    a = _smooth_images(rng, 3, 21, 27, channels)
    x = jnp.asarray(a / 255.0, jnp.float32)
    run = {sub: jax.jit(lambda x, luma, chroma, sub=sub: jpeg_codec.compress_with_tables(x, luma, chroma, sub))
           for sub in ((False, True) if channels == 3 else (True,))}  # the tables are arguments: one program each

    def err(q, sub, ref_q, ref_sub):
        out = np.round(np.asarray(run[sub](x, *jpeg_codec.quant_tables(q))) * 255).astype(np.int64)
        return [np.abs(out[i] - _pillow(a[i], ref_q, 2 if ref_sub else 0)[0]).mean() for i in range(len(a))]

    for q in (25, 75):
        for sub in run:
            assert max(err(q, sub, q, sub)) <= 1.5, (q, sub)
            assert min(err(q + 5, sub, q, sub)) > 1.5, (q, sub)
            if channels == 3:
                assert min(err(q, not sub, q, sub)) > 1.5, (q, sub)


def test_jpeg_defense_is_the_codec_per_point(digits_model, digits_test):
    x = jnp.asarray(digits_test[0][:4])
    ks = qkeys(4)
    out = assert_point_alone_equals_batch(jax.jit(jpeg(identity_scorer, 50)), x, ks)  # answers = the JPEG image
    pix = np.floor(np.asarray(x) * 255 + 0.5).astype(np.uint8)  # the codec's 8-bit samples
    for i in range(4):
        ref = _pillow(pix[i], 50, 2)[0]
        assert np.abs(np.round(out[i] * 255).reshape(ref.shape) - ref).mean() <= 1.5
    assert np.abs(out - np.asarray(x).reshape(4, -1)).max() > 0.05  # not the identity
    model, params = digits_model
    s = build_defense("jpeg", model, params, 50, (8, 8, 1), subsample=False)
    np.testing.assert_array_equal(s.args[1], jpeg_codec.quant_tables(50)[0])  # tables travel as leaves
    assert s.args[3] is False
    for bad in (0, 101, 50.5, True, "75", None):
        with pytest.raises(ValueError, match="quality"):
            build_defense("jpeg", model, params, bad, (8, 8, 1))
    with pytest.raises(ValueError, match="subsample"):
        jpeg(identity_scorer, 75, subsample="yes")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        build_defense("jpeg", model, params, 75, (8, 8, 2))


# ---------------------------------------------------------------------------------------------- AAA


_margin = jax.jit(losses.margin)  # the attacker's margin loss, compiled once per shape
_target = jax.jit(aaa_target, static_argnums=(1, 3))


def test_aaa_target_closed_forms():
    tau = 4.0
    m = np.array([0.3, 1.0, 2.0, 3.9, 4.1, 7.5, 2.0, 1.0, 3.0, 4.0], np.float32)
    a = (np.floor(m / tau) + 0.5) * tau
    np.testing.assert_allclose(np.asarray(_target(m, tau, 1.0, "linear")), 2 * a - m, rtol=1e-6)  # a reflection
    np.testing.assert_allclose(np.asarray(_target(m, tau, 0.5, "linear")), a - 0.5 * (m - a), rtol=1e-6)
    # sine: no change at the attractor and at the interval's edges, +-0.7 tau a quarter interval from it
    np.testing.assert_allclose(np.asarray(_target(m, tau, 1.0, "sine"))[-4:], [2.0, 1.0 + 2.8, 3.0 - 2.8, 4.0],
                               atol=1e-5)


@pytest.fixture(scope="module")
def aaa_on_digits(clean_scorer, digits_model, digits_test):
    """AAA-linear (tau = 4) answers on every test image and on three line searches (from test image i towards
    the i-th image of another class, 33 steps), with the calibration weight 5 of the original and 0.

    The weight travels as an array leaf, so both settings share one compiled program (pytree.call)."""
    model, params = digits_model
    x, y = digits_test
    steps = np.linspace(0, 1, 33)[:, None, None, None]
    lines = [x[i] + steps * (x[int(np.nonzero(y != y[i])[0][i])] - x[i]) for i in range(3)]
    pts = jnp.asarray(np.concatenate([x] + lines), jnp.float32)
    n = len(y)
    out = {"clean": np.asarray(pytree.call(clean_scorer, pts, None))}
    for w in (5.0, 0.0):
        s = build_defense("aaa", model, params, 4.0, (8, 8, 1), calibration_weight=jnp.float32(w))
        out[w] = np.asarray(pytree.call(s, pts, None))
    return {k: (v[:n], v[n:].reshape(3, 33, K)) for k, v in out.items()}, y


def test_aaa_keeps_top1_and_reaches_target_margins(aaa_on_digits):
    out, _ = aaa_on_digits
    p = out["clean"][0]
    top = p.argmax(1)
    m = np.asarray(_margin(p, top))
    for w in (5.0, 0.0):
        q = out[w][0]
        np.testing.assert_array_equal(q.argmax(1), top)  # every test image keeps its top-1 label
        seen = np.asarray(_margin(q, top))
        err = np.abs(seen - np.asarray(_target(m, 4.0, 1.0, "linear")))
        assert np.median(err) < 0.1, w  # Adam at lr 0.1 on an L1 loss ends within about one step of the target
        assert np.mean(np.abs(seen - m) > 0.5) > 0.5  # and the answers are not the clean ones
    conf = lambda w: np.abs(out[w][0].max(1) - p.max(1)).mean()  # noqa: E731
    assert conf(5.0) < conf(0.0) / 2  # the calibration term keeps the confidence closer to the clean one


def test_aaa_margin_moves_against_the_true_margin_on_a_line(aaa_on_digits):
    """While the label is top-1, each line-search step that stays in one attractor interval moves the margin
    the attacker sees the other way (steps larger than Adam's end precision at both ends, 2 lr = 0.2).

    Checked without the calibration term (weight 0), where every target margin is attainable: with it, near
    the decision boundary (low confidence) no logits have both the target margin t and the calibrated
    confidence p (that needs 1 / (1 + (K - 1) e^-t) <= p <= 1 / (1 + e^-t)) and AAA settles on a compromise."""
    out, y = aaa_on_digits
    p, q = out["clean"][1], out[0.0][1]
    pairs = 0
    for i in range(3):
        true, seen = np.asarray(_margin(p[i], y[i])), np.asarray(_margin(q[i], y[i]))
        same = (true[:-1] > 0) & (true[1:] > 0) & (np.floor(true[:-1] / 4) == np.floor(true[1:] / 4))
        same &= np.abs(np.diff(true)) > 0.2
        d_true, d_seen = np.diff(true)[same], np.diff(seen)[same]
        assert np.all(d_true * d_seen < 0), (i, d_true, d_seen)
        pairs += same.sum()
    assert pairs >= 10


def test_aaa_is_deterministic_per_point_and_validates():
    x, ks = uniform(0, (5, 8, 8, 1)), qkeys(5)
    s = aaa(pixel_scorer, 2.0, num_iter=30)
    assert_point_alone_equals_batch(jax.jit(s), x, ks)
    assert aaa(pixel_scorer, 0.0) is pixel_scorer
    for kw in ({"attractor_interval": -1.0}, {"attractor_interval": float("nan")}, {"reverse_step": -0.5},
               {"kind": "cubic"}, {"temperature": 0.0}, {"num_iter": -1}, {"num_iter": 2.5}, {"lr": 0.0},
               {"calibration_weight": float("inf")}, {"min_margin": 0.0}):
        args = {"attractor_interval": 4.0, **kw}
        with pytest.raises(ValueError, match=next(iter(kw)) if "kind" not in kw else "AAA kind"):
            aaa(pixel_scorer, **args)


# ---------------------------------------------------------------------------------- random resize-pad


def _box(img):
    """(rows, cols) index ranges of the non-zero region of a 2-D array."""
    r, c = np.nonzero(img)
    return r.min(), r.max() + 1, c.min(), c.max() + 1


def test_random_resize_pad_is_xies_enlarge_and_pad():
    h, w, m, n = 6, 5, 4, 400
    img = np.linspace(0.1, 1.0, h * w, dtype=np.float32).reshape(h, w, 1)
    x = jnp.asarray(np.tile(img[None], (n, 1, 1, 1)))
    ks = qkeys(n)
    run = jax.jit(random_resize_pad(identity_scorer, m))
    out = assert_point_alone_equals_batch(run, x, ks).reshape(n, h + m, w + m)
    extras = []
    for o in out:
        r0, r1, c0, c1 = _box(o)
        e = r1 - r0 - h
        assert 0 <= e < m and c1 - c0 == w + e  # enlarged by e in [0, max_extra)
        assert 0 <= r0 <= m - e and 0 <= c0 <= m - e  # offset in 0..max_extra - e
        src_r = np.floor((np.arange(h + e) + 0.5) * h / (h + e)).astype(int)  # nearest neighbour, closed form
        src_c = np.floor((np.arange(w + e) + 0.5) * w / (w + e)).astype(int)
        np.testing.assert_array_equal(o[r0:r1, c0:c1], img[src_r][:, src_c, 0])
        extras.append((e, r0, c0))
    extras = np.array(extras)
    counts = np.bincount(extras[:, 0], minlength=m)
    se = np.sqrt(n * (1 / m) * (1 - 1 / m))
    assert np.all(np.abs(counts - n / m) < 5 * se), counts  # e uniform
    for e in (0, m - 1):  # every offset 0..max_extra - e is drawn, in both directions
        for axis in (1, 2):
            assert set(extras[extras[:, 0] == e, axis]) == set(range(m - e + 1)), (e, axis)


def test_random_resize_pad_bilinear_is_pillows_bilinear():
    """The enlarged image against Pillow's bilinear resize of the float image (half-pixel centres, edge clamped)."""
    h, w, m = 5, 7, 3
    x = uniform(2, (12, h, w, 1)) + 0.1
    out = np.asarray(jax.jit(random_resize_pad(identity_scorer, m, method="bilinear"))(x, qkeys(12)))
    out = out.reshape(12, h + m, w + m)
    sizes = set()
    for i in range(12):
        r0, r1, c0, c1 = _box(out[i])
        ref = Image.fromarray(np.asarray(x[i, ..., 0])).resize((c1 - c0, r1 - r0), Image.BILINEAR)
        np.testing.assert_allclose(out[i, r0:r1, c0:c1], np.asarray(ref), rtol=1e-5, atol=1e-6)
        sizes.add(r1 - r0)
    assert len(sizes) > 1


def test_random_resize_pad_feeds_the_larger_image_when_the_model_takes_it(digits_model):
    from rnd_jax.models import get_model

    model, params = digits_model
    # digits_cnn flattens into a dense layer: the padded image is resized back to 8 x 8
    assert build_defense("random_resize_pad", model, params, 2, (8, 8, 1)).args[2] is True
    assert build_defense("random_resize_pad", model, params, 2, (8, 8, 1), resize_back=False).args[2] is False
    # globally pooled: fed 36 x 36 (built from shapes alone, as the sweep validates grids)
    assert build_defense("random_resize_pad", get_model("cifar10_cnn"), None, 4, (32, 32, 3)).args[2] is False
    assert random_resize_pad(identity_scorer, 0) is identity_scorer
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_extra"):
            random_resize_pad(identity_scorer, bad)
    with pytest.raises(ValueError, match="method"):
        random_resize_pad(identity_scorer, 2, method="bicubic")
    with pytest.raises(ValueError, match="resize_back"):
        random_resize_pad(identity_scorer, 2, resize_back="yes")


# ------------------------------------------------------------------------------------- Park et al.


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _all_losses(probs, cls):
    return {f"{goal}_{name}": fn(probs, cls) for goal, table in (("targeted", losses.TARGETED),
                                                                 ("untargeted", losses.UNTARGETED))
            for name, fn in table.items()}


def test_park_noise_is_gaussian_unprocessed_and_losses_stay_finite(clean_scorer):
    """``p + eps``, eps ~ N(mean, variance): moments, no clipping or renormalisation, the attacks' losses
    finite on the (often negative) answers, a point alone as in the batch. Levels as arrays: one compiled
    program for both settings."""
    n = 3000
    p = np.r_[np.zeros(5), np.full(5, 0.2)]
    x = jnp.zeros((n, 2, 2, 1))
    ks = qkeys(n)
    run = jax.jit(lambda variance, mean, x, ks: output_noise_park(const_scorer(p), variance, mean)(x, ks))
    cls = jnp.arange(n) % K
    for variance, mean in ((1e-2, 0.0), (5.76e-2, 0.05)):
        levels = (jnp.float32(variance), jnp.float32(mean))
        out = assert_point_alone_equals_batch(lambda x, k: run(*levels, x, k), x, ks).astype(np.float64)
        d = (out - p).ravel()
        std = np.sqrt(variance)
        assert abs(d.mean() - mean) < 5 * std / np.sqrt(d.size)
        assert abs(d.std(ddof=1) - std) < 5 * std / np.sqrt(2 * (d.size - 1))
        below = np.mean(out[:, :5] < 0)  # no clipping, no absolute value: P[eps < 0] = Phi(-mean / std)
        expected = _phi(-mean / std)
        assert abs(below - expected) < 5 * np.sqrt(expected * (1 - expected) / (5 * n))
        assert np.std(out.sum(1)) > 0.1  # not renormalised
        for name, value in jax.jit(_all_losses)(jnp.asarray(out, jnp.float32), cls).items():
            assert np.all(np.isfinite(np.asarray(value))), name
    assert output_noise_park(clean_scorer, 0.0) is clean_scorer
    for bad in (-1e-3, float("nan"), "x", 1e20):
        with pytest.raises(ValueError, match="variance"):
            output_noise_park(clean_scorer, bad)
    for bad in (float("inf"), "x", -1e20):
        with pytest.raises(ValueError, match="mean"):
            output_noise_park(clean_scorer, 1e-2, mean=bad)
