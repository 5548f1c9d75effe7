"""Procedural "shapes" dataset: seeded images of one coloured shape on a plain background.

Why procedural: no model hub or data set can be downloaded on the project's machines, so the
embedded model is trained on images this module draws. Every image comes with a caption of the
form "a red circle on a white background", and the same (seed, index) always gives the same
image, so training and tests are reproducible.

Some colour/shape pairs are *held out* of training (`HELD_OUT_PAIRS`); the generation test asks
the model for exactly those, which checks that it composes colour and shape rather than
memorising captions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges the VAE can reproduce

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Saturated, well separated colours: the generation test recognises them by nearest colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (100, 65, 40),
}

# One held-out colour per shape, all colours different: each colour and each shape is still
# seen in training, only these pairings are not.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("green", "circle"),
        ("purple", "square"),
        ("yellow", "triangle"),
        ("blue", "star"),
        ("orange", "cross"),
    }
)

COLOUR_JITTER = 12  # +- per RGB channel, so a colour word names a small range, not one value
MIN_RADIUS_FRAC = 0.22  # shape half-size as a fraction of the image side
MAX_RADIUS_FRAC = 0.40


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image."""

    shape: str
    colour: str
    background: str
    cx: float  # centre, in [0, 1] image coordinates
    cy: float
    radius: float  # half of the bounding box side, in [0, 1] image coordinates
    fg_rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.background)


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def training_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs that appear in training captions."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def held_out_prompts() -> list[tuple[str, str, str]]:
    """(colour, shape, background) of the 20 test prompts: every held-out pair on every
    background. None of these colour/shape pairs occurs in a training caption."""
    return [
        (c, s, b)
        for (c, s) in sorted(HELD_OUT_PAIRS, key=lambda p: SHAPES.index(p[1]))
        for b in BACKGROUNDS
    ]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of `shape` inside the square box of half-side r around (cx, cy); None for a
    circle (drawn as an ellipse). Shapes are upright so a mask's bounding box identifies them."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        # A 5-point star's box is not square (it is shorter below): stretch it to fill [cy-r, cy+r].
        ys = [p[1] for p in points]
        top, bottom = min(ys), max(ys)
        return [(x, cy - r + (y - top) * 2 * r / (bottom - top)) for x, y in points]
    if shape == "cross":
        a = r / 3  # arm half-width: arms are a third of the box wide
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` (coordinates in pixels of a size x size image)."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    s = SUPERSAMPLE
    polygon = shape_polygon(shape, cx * s, cy * s, r * s)
    if polygon is None:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene, size: int = RESOLUTION) -> Image.Image:
    """Draw a scene as an RGB image of size x size."""
    coverage = draw_shape_mask(
        scene.shape, scene.cx * size, scene.cy * size, scene.radius * size, size
    )[..., None]
    fg = np.asarray(scene.fg_rgb, dtype=np.float32)
    bg = np.asarray(scene.bg_rgb, dtype=np.float32)
    pixels = coverage * fg + (1.0 - coverage) * bg
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in rgb
    )


def sample_scene(
    rng: random.Random, colour: str | None = None, shape: str | None = None,
    background: str | None = None,
) -> Scene:
    """Draw a random scene; fixed colour/shape/background where given. Without them the
    colour/shape pair is drawn from the training pairs only."""
    if colour is None or shape is None:
        pairs = [
            p for p in training_pairs()
            if (colour is None or p[0] == colour) and (shape is None or p[1] == shape)
        ]
        colour, shape = pairs[rng.randrange(len(pairs))]
    if background is None:
        background = list(BACKGROUNDS)[rng.randrange(len(BACKGROUNDS))]
    radius = rng.uniform(MIN_RADIUS_FRAC, MAX_RADIUS_FRAC)
    margin = radius + 0.04
    cx = rng.uniform(margin, 1.0 - margin)
    cy = rng.uniform(margin, 1.0 - margin)
    return Scene(
        shape=shape, colour=colour, background=background, cx=cx, cy=cy, radius=radius,
        fg_rgb=_jitter(COLOURS[colour], rng), bg_rgb=_jitter(BACKGROUNDS[background], rng),
    )


def scene_at(seed: int, index: int) -> Scene:
    """The index-th scene of the dataset with this seed: independent of how many came before,
    so any slice of the dataset can be regenerated alone."""
    return sample_scene(random.Random(f"{seed}:{index}"))


def generate(seed: int, count: int, size: int = RESOLUTION) -> tuple[np.ndarray, list[str]]:
    """`count` training images as uint8 (count, size, size, 3) and their captions."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(count):
        scene = scene_at(seed, i)
        images[i] = np.asarray(render(scene, size))
        captions.append(scene.caption)
    return images, captions


def centred_scene(colour: str, shape: str, background: str, radius: float = 0.34) -> Scene:
    """A canonical, centred scene with the exact palette colours (used for the demo images)."""
    return Scene(
        shape=shape, colour=colour, background=background, cx=0.5, cy=0.5, radius=radius,
        fg_rgb=COLOURS[colour], bg_rgb=BACKGROUNDS[background],
    )
