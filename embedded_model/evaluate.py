"""Programmatic check of generated images: is the foreground the prompted colour and shape?

Why a hand-written check rather than a classifier: nothing can be downloaded, and the scenes are
simple enough that geometry decides. The background is the median colour of the image border;
the foreground is every pixel far from it; its colour is the palette colour most of its inner
pixels are nearest to; its shape is the template (each shape kind drawn into the foreground's
bounding box) with the highest IoU against the foreground mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dataset import BACKGROUNDS, COLOURS, SHAPES, caption_for, draw_shape_mask

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel foreground
MIN_FOREGROUND_PIXELS = 30


@dataclass(frozen=True)
class Verdict:
    prompt: str
    colour: str | None
    shape: str | None
    expected_colour: str
    expected_shape: str
    shape_iou: float

    @property
    def passed(self) -> bool:
        return self.colour == self.expected_colour and self.shape == self.expected_shape


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels far from the border's median colour."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE


def dominant_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """Palette colour that most foreground pixels are nearest to (background palette included,
    so a foreground that looks like a background colour is not forced onto a shape colour)."""
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return None
    names = list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS]
    palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
    pixels = image[mask].astype(np.float32)
    nearest = np.argmin(np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1), axis=1)
    winner = names[int(np.bincount(nearest, minlength=len(names)).argmax())]
    return None if winner.startswith("bg:") else winner


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """Best-matching shape kind and its IoU."""
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return None, 0.0
    rows = np.flatnonzero(mask.sum(axis=1) >= 2)
    cols = np.flatnonzero(mask.sum(axis=0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        return None, 0.0
    cy = (rows[0] + rows[-1] + 1) / 2
    cx = (cols[0] + cols[-1] + 1) / 2
    r = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) / 2
    best, best_iou = None, -1.0
    for shape in SHAPES:
        template = draw_shape_mask(shape, cx, cy, r, mask.shape[0]) >= 0.5
        iou = (template & mask).sum() / max(1, (template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return best, best_iou


def judge(image: np.ndarray, colour: str, shape: str, background: str) -> Verdict:
    """Verdict for one uint8 (H, W, 3) image generated for (colour, shape, background)."""
    mask = foreground_mask(image)
    found_shape, iou = classify_shape(mask)
    return Verdict(caption_for(colour, shape, background), dominant_colour(image, mask),
                   found_shape, colour, shape, iou)


@torch.no_grad()
def generate_images(
    pipe, prompts: list[str], guidance_scale: float, seed: int = 0, steps: int = 25,
) -> list[np.ndarray]:
    """One image per prompt with a StableDiffusionPipeline (DDIM), seeded per prompt."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    result = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
        generator=generators, output_type="np",
    )
    return [np.clip(np.round(im * 255), 0, 255).astype(np.uint8) for im in result.images]


def evaluate_prompts(
    pipe, cases: list[tuple[str, str, str]], guidance_scale: float, seed: int = 0,
    steps: int = 25,
) -> tuple[list[Verdict], list[np.ndarray]]:
    """Generate and judge (colour, shape, background) cases."""
    prompts = [caption_for(c, s, b) for c, s, b in cases]
    images = generate_images(pipe, prompts, guidance_scale, seed, steps)
    verdicts = [judge(im, c, s, b) for im, (c, s, b) in zip(images, cases)]
    return verdicts, images
