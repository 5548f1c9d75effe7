"""The demo's hue-arc check (embedded_model/hue_path.py): issue 14's acceptance for `make demo`.

The unit tests pin the check itself on drawn images; the slow test runs the demo morph (red
circle -> blue triangle, the Makefile's 16 frames and options) on the shipped embedded model.
Its per-frame hues go to out/quality/demo_hue_path.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedded_model import blends, dataset
from embedded_model.colour_space import hue_of
from embedded_model.hue_path import arc_distance, check_hue_path, demo_hue_path, dominant_hue
from tests.conftest import EMBEDDED_MODEL, REPO_ROOT


def _frames(colour_a: str, colour_b: str, count: int = 8) -> list[np.ndarray]:
    a, b = dataset.centred_scene(colour_a, "circle", "white"), dataset.centred_scene(colour_b, "triangle", "white")
    return [np.asarray(blends.render_blend(blends.BlendScene(a, b, float(t))))
            for t in np.linspace(0, 1, count)]


def test_arc_distance_is_zero_on_the_shorter_arc_and_grows_off_it():
    assert arc_distance(350.0, 30.0, 270.0) == 0.0  # 30 -> 270 the short way passes 0/360
    assert arc_distance(300.0, 30.0, 270.0) == 0.0
    assert arc_distance(150.0, 30.0, 270.0) == pytest.approx(120.0)  # the long way: green
    assert arc_distance(40.0, 30.0, 270.0) == pytest.approx(10.0)
    assert arc_distance(100.0, 90.0, 90.0) == pytest.approx(10.0)


def test_dominant_hue_reads_the_drawn_colour():
    for name in ("red", "green", "blue", "yellow", "purple", "orange"):
        image = np.asarray(dataset.render(dataset.centred_scene(name, "square", "white")))
        expected = dataset.COLOURS[name]
        hue = dominant_hue(image)
        assert abs(float(((hue - hue_of(np.array(expected))) + 180) % 360 - 180)) < 2, name
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    assert dominant_hue(blank) is None


def test_a_blend_passes_and_a_detour_fails():
    assert check_hue_path(_frames("red", "blue")).passed
    detour = _frames("red", "blue")
    detour[3] = np.asarray(dataset.render(dataset.centred_scene("green", "circle", "white")))
    result = check_hue_path(detour)
    assert not result.passed and result.distances[2] > 90
    # Half red, half blue reads as one of the two (the mode), not as the purple of their mean.
    frames = _frames("red", "blue")
    frames[4] = np.concatenate([frames[0][:, :32], frames[-1][:, 32:]], axis=1)
    hues = check_hue_path(frames)
    assert min(abs(float((hues.hues[4] - end + 180) % 360 - 180)) for end in hues.end_hues) < 5


@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED_MODEL / "unet").is_dir(), reason="embedded model not built")
def test_demo_morph_stays_on_the_hue_arc_between_its_ends():
    result = demo_hue_path(EMBEDDED_MODEL)
    report = REPO_ROOT / "out" / "quality" / "demo_hue_path.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result.as_dict(), indent=2))
    assert result.passed, result.as_dict()
