"""The procedural shapes dataset is reproducible and keeps the held-out pairs out."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from embedded_model import dataset
from tests.conftest import DEMO_DIR


def test_same_seed_same_images_and_captions() -> None:
    a, captions_a = dataset.generate(seed=3, count=16)
    b, captions_b = dataset.generate(seed=3, count=16)
    c, _ = dataset.generate(seed=4, count=16)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)
    assert a.shape == (16, dataset.RESOLUTION, dataset.RESOLUTION, 3) and a.dtype == np.uint8


def test_scene_does_not_depend_on_preceding_ones() -> None:
    images, captions = dataset.generate(seed=5, count=10)
    scene = dataset.scene_at(5, 9)
    assert np.array_equal(np.asarray(dataset.render(scene)), images[9])
    assert scene.caption == captions[9]


def test_captions_name_colour_shape_and_background() -> None:
    for i in range(50):
        scene = dataset.scene_at(0, i)
        assert scene.caption == f"a {scene.colour} {scene.shape} on a {scene.background} background"


def test_held_out_pairs_never_in_training_captions() -> None:
    _, captions = dataset.generate(seed=0, count=3000)
    held = {dataset.caption_for(c, s, b) for c, s, b in dataset.held_out_prompts()}
    assert held.isdisjoint(captions)
    seen_pairs = {tuple(c.split()[1:3]) for c in captions}
    assert seen_pairs == set(dataset.training_pairs())
    # every colour and every shape alone is still seen in training
    assert {p[0] for p in seen_pairs} == set(dataset.COLOURS)
    assert {p[1] for p in seen_pairs} == set(dataset.SHAPES)


def test_twenty_held_out_prompts() -> None:
    prompts = dataset.held_out_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert all((c, s) in dataset.HELD_OUT_PAIRS for c, s, _ in prompts)


def test_images_vary_in_size_position_and_colour() -> None:
    scenes = [dataset.scene_at(0, i) for i in range(200)]
    assert len({round(s.radius, 2) for s in scenes}) > 10
    assert len({round(s.cx, 1) for s in scenes}) > 3
    assert len({s.fg_rgb for s in scenes if s.colour == "red"}) > 3


def test_demo_images_are_the_generators() -> None:
    prompts = json.loads((DEMO_DIR / "prompts.json").read_text())
    assert prompts == {
        "red_circle.png": "a red circle on a white background",
        "blue_triangle.png": "a blue triangle on a white background",
    }
    for name, (colour, shape) in {"red_circle.png": ("red", "circle"),
                                  "blue_triangle.png": ("blue", "triangle")}.items():
        stored = np.asarray(Image.open(DEMO_DIR / name).convert("RGB"))
        drawn = np.asarray(dataset.render(dataset.centred_scene(colour, shape, "white")))
        assert np.array_equal(stored, drawn), name
