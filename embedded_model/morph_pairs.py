"""The fixed morph pairs on which the embedded model's morph quality is measured.

Shared by tests/test_morph_quality.py and benchmarks/ablation.py so both measure the same inputs.
Every (colour, shape, background) end is a training combination of the embedded model.
"""

from __future__ import annotations

from PIL import Image

from .dataset import caption_for, centred_scene, render

# MorphConfig options of the measurements: 17-frame sequences as in the paper's PPL/PDV; LoRA and
# DDIM steps halved from the defaults so that five pairs fit the CI budget.
QUALITY_OPTIONS = {"num_frames": 17, "lora_steps": 100, "num_inference_steps": 25}

# (colour, shape, background) of the two ends of each pair.
PAIRS: list[tuple[tuple[str, str, str], tuple[str, str, str]]] = [
    (("red", "circle", "white"), ("blue", "triangle", "white")),
    (("green", "square", "black"), ("yellow", "star", "black")),
    (("purple", "cross", "gray"), ("orange", "circle", "gray")),
    (("blue", "square", "white"), ("red", "star", "white")),
    (("yellow", "circle", "brown"), ("green", "triangle", "brown")),
]

# Five more pairs for the per-pair protocol of issue 14 (benchmarks/per_pair.py), chosen on
# 2026-12-02 before any morph of them was looked at: every colour, shape and background again,
# training combinations only, and two more far-apart hue pairs (orange -> purple, yellow ->
# blue) beside near ones. Indices 5-9 of `morph_pair`.
EXTRA_PAIRS: list[tuple[tuple[str, str, str], tuple[str, str, str]]] = [
    (("orange", "square", "black"), ("purple", "triangle", "black")),
    (("green", "star", "white"), ("red", "cross", "white")),
    (("blue", "circle", "gray"), ("yellow", "square", "gray")),
    (("red", "triangle", "brown"), ("purple", "circle", "brown")),
    (("yellow", "cross", "white"), ("blue", "circle", "white")),
]
ALL_PAIRS = PAIRS + EXTRA_PAIRS


def scene_image(colour: str, shape: str, background: str) -> tuple[Image.Image, str]:
    """The centred scene and its caption."""
    return render(centred_scene(colour, shape, background)), caption_for(colour, shape, background)


def morph_pair(index: int) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts of fixed pair `index` (0-4: PAIRS, 5-9: EXTRA_PAIRS)."""
    (image_a, prompt_a), (image_b, prompt_b) = (scene_image(*end) for end in ALL_PAIRS[index])
    return [image_a, image_b], [prompt_a, prompt_b]
