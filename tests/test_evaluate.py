"""The mask-based colour/shape check recognises clean generator images."""

from __future__ import annotations

import numpy as np

from embedded_model import dataset
from embedded_model.evaluate import judge


def test_recognises_every_colour_shape_and_background() -> None:
    failures = []
    for i in range(300):
        scene = dataset.scene_at(11, i)
        verdict = judge(np.asarray(dataset.render(scene)), scene.colour, scene.shape,
                        scene.background)
        if not verdict.passed:
            failures.append(verdict)
    assert not failures


def test_held_out_pairs_recognised_too() -> None:
    for colour, shape, background in dataset.held_out_prompts():
        scene = dataset.centred_scene(colour, shape, background, radius=0.3)
        assert judge(np.asarray(dataset.render(scene)), colour, shape, background).passed


def test_wrong_shape_or_colour_or_empty_image_fails() -> None:
    image = np.asarray(dataset.render(dataset.centred_scene("red", "circle", "white")))
    assert not judge(image, "red", "square", "white").passed
    assert not judge(image, "blue", "circle", "white").passed
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    verdict = judge(blank, "red", "circle", "white")
    assert not verdict.passed and verdict.colour is None and verdict.shape is None
