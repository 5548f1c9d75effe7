"""Blended scenes: images *between* two training captions, for a morph-friendly text space.

Why: trained on pure scenes only, the model has nothing to draw for a text embedding halfway
between "a red circle" and "a blue triangle". A blend scene at t is what a morph frame at t
should look like; training on it conditioned on the lerp, at the same t, of the two captions'
text-encoder outputs (see train_unet) gives the points between two captions a meaning. Colour
blends must also hold in the VAE's latent space, which the UNet alone cannot fix (the previous
model's demo went through green for that reason): the colour triplets below feed the VAE's
latent-interpolation loss (train_vae.ColourLerpData).

How a scene at t is blended:
- geometry: centre and size lerped; the two shapes, both placed at that centre and size, are
  mixed as signed-distance fields, (1 - t) * sdf_a + t * sdf_b, and the zero level set drawn
  (anti-aliased by supersampling, as dataset.render does). At t = 0 or 1 that is exactly the
  pure shape; between, the outline morphs instead of one shape fading over the other.
- foreground colour: mixed in OKLCh (colour_space.py) with lightness and chroma lerped and the
  hue turned along the shorter arc. Why not a straight line in OKLab: the chord between two
  far-apart hues (red and blue) dips to a grey-ish midpoint, and a grey has no hue to follow;
  OKLCh keeps the blend as saturated as its ends, and its hue stays on the arc that
  hue_path.py checks in the morph. Colours out of the sRGB gamut lose chroma (not hue) until
  they fit.
- background: backgrounds are near-grey (white, black, gray, brown), where hue is noise, so
  they are lerped in OKLab.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .colour_space import (
    lch_to_oklab, oklab_to_lch, oklab_to_linear, oklab_to_rgb, rgb_to_oklab,
    signed_hue_difference,
)
from .dataset import (
    BACKGROUNDS, COLOURS, RESOLUTION, SUPERSAMPLE, Scene, _jitter, render, sample_scene,
    shape_polygon,
)

# Below this OKLCh chroma a colour counts as grey: its hue is undefined, so it is mixed in OKLab.
ACHROMATIC_CHROMA = 0.05
# Share of blends whose two ends have the same background (as the demo's and the fixed morph
# pairs' ends do); the rest blend two backgrounds too.
SAME_BACKGROUND = 0.5


@dataclass(frozen=True)
class BlendScene:
    """Two pure scenes and the blend weight t of the second."""

    a: Scene
    b: Scene
    t: float


def mix_colours(rgb_a, rgb_b, t: float) -> tuple[float, float, float]:
    """sRGB colour (0..255) at t between rgb_a and rgb_b: OKLCh with the hue on the shorter arc
    for two chromatic colours, OKLab lerp when either is grey (see the module docstring)."""
    lab_a, lab_b = rgb_to_oklab(rgb_a), rgb_to_oklab(rgb_b)
    lch_a, lch_b = oklab_to_lch(lab_a), oklab_to_lch(lab_b)
    if min(lch_a[1], lch_b[1]) < ACHROMATIC_CHROMA:
        return tuple(oklab_to_rgb(lab_a + t * (lab_b - lab_a)).tolist())  # type: ignore[return-value]
    hue = lch_a[2] + t * float(signed_hue_difference(lch_a[2], lch_b[2]))
    lightness = lch_a[0] + t * (lch_b[0] - lch_a[0])
    chroma = lch_a[1] + t * (lch_b[1] - lch_a[1])
    for _ in range(30):  # gamut mapping: shrink chroma, keep hue and lightness
        lab = lch_to_oklab(np.array([lightness, chroma, hue % 360.0]))
        linear = oklab_to_linear(lab)
        if linear.min() >= -1e-4 and linear.max() <= 1 + 1e-4:
            break
        chroma *= 0.95
    return tuple(oklab_to_rgb(lab).tolist())  # type: ignore[return-value]


def shape_sdf(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points (xs, ys) to `shape` in the box of half-side
    r around (cx, cy), all in the same units (pixels)."""
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        return np.hypot(xs - cx, ys - cy) - r
    vertices = np.asarray(polygon, dtype=np.float64)
    distance = np.full(xs.shape, np.inf)
    inside = np.zeros(xs.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        ex, ey = x1 - x0, y1 - y0
        u = np.clip(((xs - x0) * ex + (ys - y0) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(xs - x0 - u * ex, ys - y0 - u * ey))
        crosses = (y0 > ys) != (y1 > ys)  # even-odd rule along a horizontal ray
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (ys - y0) * ex / np.where(ey == 0, 1.0, ey)
        inside ^= crosses & (xs < x_at)
    return np.where(inside, -distance, distance)


def blend_coverage(blend: BlendScene, size: int = RESOLUTION) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (size, size) of the blended shape."""
    t = blend.t
    cx = ((1 - t) * blend.a.cx + t * blend.b.cx) * size
    cy = ((1 - t) * blend.a.cy + t * blend.b.cy) * size
    r = ((1 - t) * blend.a.radius + t * blend.b.radius) * size
    samples = ((np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32)
    xs, ys = np.meshgrid(samples, samples)
    sdf = (1 - t) * shape_sdf(blend.a.shape, cx, cy, r, xs, ys)
    sdf = sdf + t * shape_sdf(blend.b.shape, cx, cy, r, xs, ys)
    # PIL fills a polygon with its outline, half a supersample pixel beyond the exact edge:
    # the same offset here makes t = 0 and 1 draw the dataset's shapes.
    inside = (sdf < 0.5 / SUPERSAMPLE).astype(np.float32)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render_blend(blend: BlendScene, size: int = RESOLUTION) -> Image.Image:
    """Draw a blend scene as an RGB image of size x size."""
    coverage = blend_coverage(blend, size)[..., None]
    fg = np.asarray(mix_colours(blend.a.fg_rgb, blend.b.fg_rgb, blend.t), dtype=np.float32)
    bg = np.asarray(mix_colours(blend.a.bg_rgb, blend.b.bg_rgb, blend.t), dtype=np.float32)
    pixels = coverage * fg + (1.0 - coverage) * bg
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def sample_blend(rng: random.Random) -> BlendScene:
    """Two random training scenes whose captions differ, and t uniform in [0, 1]."""
    a = sample_scene(rng)
    while True:
        background = a.background if rng.random() < SAME_BACKGROUND else None
        b = sample_scene(rng, background=background)
        if b.caption != a.caption:
            return BlendScene(a, b, rng.random())


def blend_at(seed: int, index: int) -> BlendScene:
    """The index-th blend of the blend set with this seed (independent of the others)."""
    return sample_blend(random.Random(f"blend:{seed}:{index}"))


def generate_blends(
    seed: int, count: int, size: int = RESOLUTION,
) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """`count` blend images as uint8 (count, size, size, 3), the captions of their two ends and
    their t (float32)."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    captions_a: list[str] = []
    captions_b: list[str] = []
    ts = np.empty(count, dtype=np.float32)
    for i in range(count):
        blend = blend_at(seed, i)
        images[i] = np.asarray(render_blend(blend, size))
        captions_a.append(blend.a.caption)
        captions_b.append(blend.b.caption)
        ts[i] = blend.t
    return images, captions_a, captions_b, ts


@dataclass(frozen=True)
class ColourTriplet:
    """Two scenes of one geometry that differ in colour (and sometimes background), and t.

    What the VAE's latent-interpolation loss (train_vae) trains on: the decoder of
    lerp(E(a), E(b), t) should draw the colour blend of a and b at t (`render_colour_blend`).
    Why the geometry is shared: only then is the right image at t unambiguous; shapes morph
    in the UNet (the blend scenes), colours must also be linear in the latent space itself,
    because every morph slerps latents and the decoder draws whatever lies between.
    """

    a: Scene
    b: Scene
    t: float


def sample_colour_triplet(rng: random.Random) -> ColourTriplet:
    """A training scene, the same geometry in another colour (and, half the time, on another
    background), and t uniform in [0, 1]."""
    a = sample_scene(rng)
    colour = rng.choice([c for c in COLOURS if c != a.colour])
    background = a.background
    bg_rgb = a.bg_rgb
    if rng.random() >= SAME_BACKGROUND:
        background = rng.choice(list(BACKGROUNDS))
        bg_rgb = _jitter(BACKGROUNDS[background], rng)
    b = Scene(a.shape, colour, background, a.cx, a.cy, a.radius,
              _jitter(COLOURS[colour], rng), bg_rgb)
    return ColourTriplet(a, b, rng.random())


def render_colour_blend(triplet: ColourTriplet, size: int = RESOLUTION) -> Image.Image:
    """The shared geometry drawn in the colours mixed at t (mix_colours)."""
    a, b, t = triplet.a, triplet.b, triplet.t
    mixed = Scene(a.shape, a.colour, a.background, a.cx, a.cy, a.radius,
                  mix_colours(a.fg_rgb, b.fg_rgb, t), mix_colours(a.bg_rgb, b.bg_rgb, t))
    return render(mixed, size)


def generate_colour_triplets(
    seed: int, count: int, size: int = RESOLUTION,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` triplets as uint8 (count, 3, size, size, 3): end a, end b and the blend at t;
    and their t (float32)."""
    images = np.empty((count, 3, size, size, 3), dtype=np.uint8)
    ts = np.empty(count, dtype=np.float32)
    for i in range(count):
        triplet = sample_colour_triplet(random.Random(f"colour-triplet:{seed}:{i}"))
        images[i, 0] = np.asarray(render(triplet.a, size))
        images[i, 1] = np.asarray(render(triplet.b, size))
        images[i, 2] = np.asarray(render_colour_blend(triplet, size))
        ts[i] = triplet.t
    return images, ts
