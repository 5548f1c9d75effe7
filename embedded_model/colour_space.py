"""OKLab / OKLCh colour conversions (Ottosson 2020) for blending colours and reading hues.

Why OKLab rather than CIELAB: both are built so that equal distances look about equally
different, but CIELAB's hue lines bend for saturated blues (a CIELAB "constant hue" blue drifts
to purple as it lightens), and the embedded model's palette has a saturated blue at one end of
the demo. OKLab was fitted to keep hue straight there, and it needs no white point or piecewise
formula: two 3x3 matrices and a cube root.
"""

from __future__ import annotations

import numpy as np

# Linear sRGB -> LMS cone responses, then cube-rooted LMS -> (L, a, b). Values from Ottosson's
# definition of OKLab; the inverses are computed, not copied, so the pair cannot disagree.
_RGB_TO_LMS = np.array([
    [0.4122214708, 0.5363325363, 0.0514459929],
    [0.2119034982, 0.6806995451, 0.1073969566],
    [0.0883024619, 0.2817188376, 0.6299787005],
])
_LMS_TO_LAB = np.array([
    [0.2104542553, 0.7936177850, -0.0040720468],
    [1.9779984951, -2.4285922050, 0.4505937099],
    [0.0259040371, 0.7827717662, -0.8086757660],
])
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LAB_TO_LMS = np.linalg.inv(_LMS_TO_LAB)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1 / 2.4) - 0.055)


def rgb_to_oklab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 255] (..., 3) -> OKLab (..., 3): L in [0, 1], a and b about [-0.4, 0.4]."""
    linear = _srgb_to_linear(np.asarray(rgb, dtype=np.float64) / 255.0)
    return np.cbrt(linear @ _RGB_TO_LMS.T) @ _LMS_TO_LAB.T


def oklab_to_linear(lab: np.ndarray) -> np.ndarray:
    """OKLab -> linear sRGB, unclipped (values outside [0, 1] are out of gamut)."""
    return ((np.asarray(lab, dtype=np.float64) @ _LAB_TO_LMS.T) ** 3) @ _LMS_TO_RGB.T


def oklab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """OKLab -> sRGB in [0, 255] (float, clipped to the gamut)."""
    return _linear_to_srgb(oklab_to_linear(lab)) * 255.0


def oklab_to_lch(lab: np.ndarray) -> np.ndarray:
    """OKLab -> (L, chroma, hue in degrees [0, 360))."""
    lab = np.asarray(lab, dtype=np.float64)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360.0
    return np.stack([lab[..., 0], chroma, hue], axis=-1)


def lch_to_oklab(lch: np.ndarray) -> np.ndarray:
    lch = np.asarray(lch, dtype=np.float64)
    h = np.radians(lch[..., 2])
    return np.stack([lch[..., 0], lch[..., 1] * np.cos(h), lch[..., 1] * np.sin(h)], axis=-1)


def hue_of(rgb: np.ndarray) -> np.ndarray:
    """OKLCh hue in degrees of sRGB colours in [0, 255]."""
    return oklab_to_lch(rgb_to_oklab(rgb))[..., 2]


def signed_hue_difference(h_from: np.ndarray | float, h_to: np.ndarray | float) -> np.ndarray:
    """h_to - h_from wrapped to [-180, 180): the shorter way round the hue circle."""
    return (np.asarray(h_to, dtype=np.float64) - h_from + 180.0) % 360.0 - 180.0
