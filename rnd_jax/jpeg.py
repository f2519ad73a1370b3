"""Baseline JPEG compression and decompression in JAX, following libjpeg's (IJG) 8-bit pipeline.

The JPEG defense (Guo et al. 2018, "Countering adversarial images using input transformations",
ICLR; the baseline of Aithal & Li 2022, Tables 4 and 11) answers every query with the model's scores
on the JPEG-compressed query. :func:`compress` reproduces what an encoder of baseline JPEG followed
by a decoder does to an image (ITU-T T.81; the IJG library's defaults, which Pillow uses):

1. pixels ``x`` in [0, 1] -> 8-bit samples ``round(255 * clip(x, 0, 1))`` (a JPEG file holds bytes);
2. RGB -> YCbCr (JFIF, BT.601 full range; libjpeg's 16-bit fixed-point arithmetic, in integers);
   one channel is a grayscale image (a single luminance component);
3. chroma subsampling 4:2:0 when ``subsample`` (each 2x2 block of Cb and Cr averaged, libjpeg's
   alternating rounding bias 1, 2), otherwise 4:4:4;
4. each component padded to whole blocks by edge replication (libjpeg replicates the last column and
   row; with 4:2:0 the image is padded to the 16x16 MCU first), level-shifted by -128, split into
   8x8 blocks, DCT-II (orthonormal: JPEG's ``F(u, v) = C(u) C(v) / 4 * sum f cos cos``);
5. quantisation: ``round(F / Q)`` (halves away from zero, as libjpeg) with the standard tables of
   T.81 Annex K (Table K.1 luminance, K.2 chrominance) scaled by the IJG quality formula
   (:func:`quant_tables`); dequantisation ``F' = Q * round(F / Q)``;
6. inverse DCT, +128, rounding, clamping to 0..255; with 4:2:0 the chroma is upsampled by libjpeg's
   default "fancy" (triangle, 9/16 3/16 3/16 1/16) filter, with its rounding biases 8 and 7;
7. YCbCr -> RGB (libjpeg's fixed-point tables), clamping to 0..255, then ``/ 255``.

Entropy coding is lossless and omitted. Against Pillow (libjpeg-turbo) the result differs only where
libjpeg computes the DCT and its inverse in scaled integer arithmetic (``JDCT_ISLOW``) and this module
in float32: a pixel moves by a level or two, and now and then a coefficient that lies on a quantisation
boundary rounds the other way (``tests/test_new_defenses.py`` states the tolerance).

Not differentiable (rounding); a black-box defense does not need gradients.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# ITU-T T.81 Annex K, Table K.1 (luminance) and Table K.2 (chrominance), row-major.
LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99], np.int64).reshape(8, 8)
CHROMINANCE = np.array([
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99], np.int64).reshape(8, 8)


def check_quality(quality) -> int:
    """A JPEG quality: an int in 1..100 (the IJG scale). Returns it."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be an int in 1..100, got {quality!r}")
    return int(quality)


def quality_scale(quality: int) -> int:
    """The IJG scaling percentage of a quality: ``5000 / q`` below 50, ``200 - 2q`` from 50 on."""
    q = check_quality(quality)
    return 5000 // q if q < 50 else 200 - 2 * q


def quant_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """(luminance, chrominance) quantisation tables, int64[8, 8], of the IJG quality ``quality``.

    Each entry is ``(base * scale + 50) // 100`` clamped to 1..255 (baseline JPEG: 8-bit tables), with
    ``scale`` from :func:`quality_scale` and ``base`` the Annex K table.
    """
    s = quality_scale(quality)
    return tuple(np.clip((t * s + 50) // 100, 1, 255) for t in (LUMINANCE, CHROMINANCE))


def _dct_matrix() -> np.ndarray:
    k = np.arange(8)
    d = np.sqrt(2 / 8) * np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)  # orthonormal: D @ D.T = I


_D = _dct_matrix()
_FIX = 1 << 16  # libjpeg's SCALEBITS = 16 fixed point
_HALF = 1 << 15


def _fix(v: float) -> int:
    return int(v * _FIX + 0.5)


def _edge_pad(a, h: int, w: int):
    """Pad the two leading spatial axes of ``a: [B, H, W]`` to ``h x w`` by edge replication."""
    return jnp.pad(a, ((0, 0), (0, h - a.shape[1]), (0, w - a.shape[2])), mode="edge")


def dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix ``f32[8, 8]`` of the codec (pass it to :func:`compress_with_tables`
    as an argument so a compiled program takes it as one, never as a constant)."""
    return _D.copy()


def _code_component(a, table, d):
    """Samples ``a: int32[B, H, W]`` (H, W multiples of 8) through DCT, quantisation and IDCT -> int32."""
    b, h, w = a.shape
    blocks = (a.astype(jnp.float32) - 128.0).reshape(b, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)
    coef = jnp.einsum("ux,bijxy,vy->bijuv", d, blocks, d)
    q = table
    r = coef / q
    levels = jnp.sign(r) * jnp.floor(jnp.abs(r) + 0.5)
    rec = jnp.einsum("ux,bijuv,vy->bijxy", d, levels * q, d)
    out = jnp.clip(jnp.floor(rec + 0.5) + 128.0, 0.0, 255.0).astype(jnp.int32)
    return out.transpose(0, 1, 3, 2, 4).reshape(b, h, w)


def _downsample(a):
    """libjpeg's h2v2 downsampling of ``int32[B, 2h, 2w]``: 2x2 sums with bias 1, 2, 1, 2, ... then >> 2."""
    b, h, w = a.shape
    s = a.reshape(b, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    bias = 1 + (jnp.arange(w // 2) % 2)
    return jnp.right_shift(s + bias, 2)


def _upsample(a, h: int, w: int):
    """libjpeg's "fancy" h2v2 upsampling (triangle filter, edge replication) of ``int32[B, n, m]`` to h x w."""
    up = jnp.pad(a, ((0, 0), (1, 1), (0, 0)), mode="edge")
    near, above, below = up[:, 1:-1], up[:, :-2], up[:, 2:]
    rows = jnp.stack([3 * near + above, 3 * near + below], axis=2).reshape(a.shape[0], -1, a.shape[2])
    cs = jnp.pad(rows, ((0, 0), (0, 0), (1, 1)), mode="edge")
    this, left, right = cs[:, :, 1:-1], cs[:, :, :-2], cs[:, :, 2:]
    out = jnp.stack([jnp.right_shift(3 * this + left + 8, 4), jnp.right_shift(3 * this + right + 7, 4)], axis=3)
    return out.reshape(a.shape[0], rows.shape[1], -1)[:, :h, :w]


def _rgb_to_ycc(rgb):
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    off = (128 << 16) + _HALF - 1
    y = jnp.right_shift(_fix(0.299) * r + _fix(0.587) * g + _fix(0.114) * b + _HALF, 16)
    cb = jnp.right_shift(-_fix(0.16874) * r - _fix(0.33126) * g + _fix(0.5) * b + off, 16)
    cr = jnp.right_shift(_fix(0.5) * r - _fix(0.41869) * g - _fix(0.08131) * b + off, 16)
    return y, cb, cr


def _ycc_to_rgb(y, cb, cr):
    cb, cr = cb - 128, cr - 128
    r = y + jnp.right_shift(_fix(1.402) * cr + _HALF, 16)
    g = y + jnp.right_shift(-_fix(0.34414) * cb + _HALF - _fix(0.71414) * cr, 16)
    b = y + jnp.right_shift(_fix(1.772) * cb + _HALF, 16)
    return jnp.clip(jnp.stack([r, g, b], axis=-1), 0, 255)


def compress(x, quality: int, subsample: bool = True):
    """JPEG-compress and decompress ``x: f32[B, H, W, C]`` in [0, 1] (C = 1 grayscale, C = 3 RGB).

    ``quality`` is the IJG quality 1..100; ``subsample`` selects 4:2:0 chroma (libjpeg's and Pillow's
    default) instead of 4:4:4; it has no effect on a grayscale image. Returns ``f32[B, H, W, C]``, a
    multiple of 1/255 in [0, 1]. Any H, W >= 1 (edge-replicated to whole blocks, cropped back).
    """
    luma, chroma = quant_tables(quality)
    return compress_with_tables(x, luma, chroma, subsample)


def compress_with_tables(x, luma, chroma, subsample: bool = True, dct=None):
    """:func:`compress` with the quantisation tables given (``[8, 8]`` arrays, e.g. from :func:`quant_tables`).

    The tables may be traced: one compiled program serves every quality. ``dct``: the DCT matrix
    (:func:`dct_matrix`, default), e.g. a traced argument of the caller's program.
    """
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"jpeg needs images f32[B, H, W, C] with C = 1 (grayscale) or 3 (RGB), got shape "
                         f"{tuple(x.shape)}")
    luma, chroma = jnp.asarray(luma, jnp.float32), jnp.asarray(chroma, jnp.float32)
    d = jnp.asarray(_D if dct is None else dct, jnp.float32)
    _, h, w, c = x.shape
    pix = jnp.floor(jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * 255.0 + 0.5).astype(jnp.int32)
    if c == 1:
        hp, wp = 8 * math.ceil(h / 8), 8 * math.ceil(w / 8)
        y = _code_component(_edge_pad(pix[..., 0], hp, wp), luma, d)[:, :h, :w]
        return (y[..., None].astype(jnp.float32) / 255.0).astype(x.dtype)
    y, cb, cr = _rgb_to_ycc(pix)
    mcu = 16 if subsample else 8
    hp, wp = mcu * math.ceil(h / mcu), mcu * math.ceil(w / mcu)
    y, cb, cr = (_edge_pad(v, hp, wp) for v in (y, cb, cr))
    y = _code_component(y, luma, d)[:, :h, :w]
    if subsample:
        hc, wc = math.ceil(h / 2), math.ceil(w / 2)
        cb, cr = (_upsample(_code_component(_downsample(v), chroma, d)[:, :hc, :wc], h, w) for v in (cb, cr))
    else:
        cb, cr = (_code_component(v, chroma, d)[:, :h, :w] for v in (cb, cr))
    return (_ycc_to_rgb(y, cb, cr).astype(jnp.float32) / 255.0).astype(x.dtype)
