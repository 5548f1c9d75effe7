"""Blend scenes (embedded_model/blends.py): the training images between two captions.

The checks are the properties the morph-friendly model relies on: a blend at t = 0 or 1 is the
pure shape, the colour at t lies between the ends in OKLCh and turns the shorter way round the
hue circle, and the shape in between is one outline, not two shapes overlaid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedded_model import blends, dataset
from embedded_model.colour_space import (
    hue_of, oklab_to_lch, oklab_to_rgb, rgb_to_oklab, signed_hue_difference,
)
from embedded_model.train_unet import BlendBatch, train_unet
from tests.conftest import EMBEDDED_MODEL


def _scene(colour: str, shape: str, background: str = "white") -> dataset.Scene:
    return dataset.centred_scene(colour, shape, background)


def test_oklab_round_trip_and_known_values():
    rgb = np.array([[255, 255, 255], [0, 0, 0], [220, 30, 30], [30, 60, 220]], dtype=np.float64)
    lab = rgb_to_oklab(rgb)
    assert lab[0] == pytest.approx([1.0, 0.0, 0.0], abs=1e-3)  # white: L = 1, no chroma
    assert lab[1] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    np.testing.assert_allclose(oklab_to_rgb(lab), rgb, atol=1e-3)


@pytest.mark.parametrize("shape", dataset.SHAPES)
@pytest.mark.parametrize("t", [0.0, 1.0])
def test_sdf_blend_endpoints_are_the_pure_shapes(shape, t):
    """At t = 0 (1) the blend draws shape a (b) alone: coverage as dataset.render draws it, up
    to the rasterisers' edge pixels."""
    other = "circle" if shape != "circle" else "square"
    a, b = (_scene("red", shape), _scene("blue", other)) if t == 0 else (
        _scene("red", other), _scene("blue", shape))
    coverage = blends.blend_coverage(blends.BlendScene(a, b, t))
    pure = dataset.draw_shape_mask(shape, 32, 32, a.radius * 64, 64)
    assert np.abs(coverage - pure).mean() < 0.005
    assert np.minimum(coverage, pure).sum() / np.maximum(coverage, pure).sum() > 0.98  # soft IoU
    image = np.asarray(blends.render_blend(blends.BlendScene(a, b, t)), dtype=np.float64)
    expected = np.asarray(dataset.render((a, b)[int(t)]), dtype=np.float64)
    assert np.abs(image - expected).mean() < 2.0  # colours exact, edges as above


def test_sdf_blend_is_one_outline_between_the_shapes():
    """Between a square and the circle inscribed in it (same box) the blend covers all of the
    circle and nothing outside the square (a distance field of a set containing another is
    never larger), and its area shrinks steadily from the square's to the circle's."""
    square, circle = _scene("red", "square"), _scene("red", "circle")
    coverages = [blends.blend_coverage(blends.BlendScene(square, circle, t))
                 for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    areas = [c.sum() for c in coverages]
    assert all(x > y for x, y in zip(areas, areas[1:])), areas
    for outer, inner in zip(coverages, coverages[1:]):
        assert (inner <= outer + 1e-6).all()


def test_blended_colour_lies_between_the_ends_on_the_shorter_hue_arc():
    red, blue = dataset.COLOURS["red"], dataset.COLOURS["blue"]
    h_red, h_blue = float(hue_of(np.array(red))), float(hue_of(np.array(blue)))
    span = float(signed_hue_difference(h_red, h_blue))
    assert abs(span) < 180
    lch_red, lch_blue = oklab_to_lch(rgb_to_oklab(red)), oklab_to_lch(rgb_to_oklab(blue))
    previous = 0.0
    for t in np.linspace(0.1, 0.9, 9):
        mixed = np.array(blends.mix_colours(red, blue, float(t)))
        lch = oklab_to_lch(rgb_to_oklab(mixed))
        offset = float(signed_hue_difference(h_red, lch[2]))
        assert min(0, span) - 1 <= offset <= max(0, span) + 1, (t, lch[2])  # on the short arc
        assert abs(offset) >= abs(previous)  # and moving along it
        previous = offset
        low, high = sorted([lch_red[0], lch_blue[0]])
        assert low - 0.02 <= lch[0] <= high + 0.02  # lightness between the ends
        assert lch[1] >= 0.8 * min(lch_red[1], lch_blue[1])  # no grey midpoint
    # red -> blue the short way is through magenta/purple, not through green (hue ~145)
    assert all(abs(float(signed_hue_difference(145.0, hue_of(np.array(
        blends.mix_colours(red, blue, t)))))) > 90 for t in (0.3, 0.5, 0.7))


def test_grey_backgrounds_are_lerped_in_oklab():
    white, black = dataset.BACKGROUNDS["white"], dataset.BACKGROUNDS["black"]
    mid = rgb_to_oklab(np.array(blends.mix_colours(white, black, 0.5)))
    ends = rgb_to_oklab(np.array([white, black], dtype=np.float64))
    np.testing.assert_allclose(mid, ends.mean(axis=0), atol=2e-3)


def test_generated_blends_are_seeded_and_have_two_different_captions():
    images, captions_a, captions_b, ts = blends.generate_blends(0, 6)
    again = blends.generate_blends(0, 6)
    assert np.array_equal(images, again[0]) and captions_a == again[1]
    assert all(a != b for a, b in zip(captions_a, captions_b))
    assert images.shape == (6, 64, 64, 3) and ((ts >= 0) & (ts <= 1)).all()
    trained = {dataset.caption_for(c, s, b) for c, s in dataset.training_pairs()
               for b in dataset.BACKGROUNDS}
    assert set(captions_a) | set(captions_b) <= trained


def test_train_unet_with_blends_runs_and_off_is_unchanged():
    """A few steps with a blend share train (finite loss); with blend_fraction 0 the result is
    bit-identical to training without blends at all (the shipped path is untouched)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(EMBEDDED_MODEL / "tokenizer"))
    torch.manual_seed(0)
    latents = torch.randn(8, 4, 16, 16)
    captions = [dataset.caption_for("red", "circle", "white")] * 4 + [
        dataset.caption_for("blue", "square", "black")] * 4
    batch = BlendBatch(torch.randn(4, 4, 16, 16), captions[:4], captions[4:],
                       torch.tensor([0.1, 0.4, 0.6, 0.9]))
    kwargs = dict(steps=2, batch_size=4, warmup=1, log=lambda _: None)
    with_blends = train_unet(latents, captions, tokenizer, 1.0, blends=batch, blend_fraction=0.5,
                             **kwargs)
    assert np.isfinite(with_blends.final_loss)
    plain = train_unet(latents, captions, tokenizer, 1.0, **kwargs)
    off = train_unet(latents, captions, tokenizer, 1.0, blends=batch, blend_fraction=0.0, **kwargs)
    assert plain.final_loss == off.final_loss
    for p, q in zip(plain.unet.parameters(), off.unet.parameters()):
        assert torch.equal(p, q)


def test_colour_triplets_share_geometry_and_blend_the_colours():
    """A triplet's two ends are one geometry in two colours; its third image is that geometry
    in mix_colours at t (t = 0 and 1 draw the ends)."""
    images, ts = blends.generate_colour_triplets(3, 5)
    assert images.shape == (5, 3, 64, 64, 3) and ((ts >= 0) & (ts <= 1)).all()
    assert np.array_equal(images, blends.generate_colour_triplets(3, 5)[0])  # seeded
    import random

    for i in range(5):
        triplet = blends.sample_colour_triplet(random.Random(f"colour-triplet:3:{i}"))
        a, b = triplet.a, triplet.b
        assert (a.shape, a.cx, a.cy, a.radius) == (b.shape, b.cx, b.cy, b.radius)
        assert a.colour != b.colour
        for t, end in ((0.0, images[i, 0]), (1.0, images[i, 1])):
            drawn = np.asarray(blends.render_colour_blend(blends.ColourTriplet(a, b, t)))
            assert np.abs(drawn.astype(int) - end).max() <= 1
        fg = dataset.draw_shape_mask(a.shape, a.cx * 64, a.cy * 64, a.radius * 64, 64) > 0.99
        np.testing.assert_allclose(images[i, 2][fg].mean(axis=0),
                                   blends.mix_colours(a.fg_rgb, b.fg_rgb, float(ts[i])), atol=1.0)


def test_colour_lerp_loss_trains_encoder_and_decoder_and_off_is_unchanged():
    """The latent-interpolation loss is finite and reaches encoder and decoder (and only the
    decoder with the encoder frozen); train_vae without it is bit-identical to before."""
    from embedded_model.architecture import make_vae
    from embedded_model.train_vae import ColourLerpData, train_vae

    data = ColourLerpData.from_triplets(*blends.generate_colour_triplets(0, 4), batch_size=2)
    vae = make_vae()
    generator = torch.Generator().manual_seed(0)
    data.loss(vae, generator, (0, 0), "cpu").backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)
    data.loss(vae, generator, None, "cpu", frozen_encoder=True).backward()
    assert vae.encoder.conv_in.weight.grad is None and vae.decoder.conv_out.weight.grad is not None
    images, _ = dataset.generate(0, 8)
    kwargs = dict(batch_size=2, log=lambda _: None)
    plain, again = train_vae(images, 2, **kwargs), train_vae(images, 2, colour_lerp=None, **kwargs)
    assert plain.final_loss == again.final_loss
    with_lerp = train_vae(images, 2, colour_lerp=data, **kwargs)
    assert np.isfinite(with_lerp.final_loss)
