"""diffmorpher.encoding: every delivery format decodes back to the frames it was given."""

from __future__ import annotations

import io
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from diffmorpher.config import ConfigError, OutputOptions
from diffmorpher.encoding import encode_frames, encode_parts, encode_png, frame_name


def gradient_frames(count: int, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    """Frames that all differ (so no GIF frame is merged into its neighbour)."""
    frames = []
    for index in range(count):
        pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        pixels[..., 0] = int(255 * index / max(count - 1, 1))
        pixels[..., 2] = 255 - pixels[..., 0]
        pixels[: size[1] // 2, : size[0] // 2, 1] = 40 * index % 256
        frames.append(Image.fromarray(pixels))
    return frames


def test_gif_holds_every_frame_with_duration_and_loop() -> None:
    frames = gradient_frames(6)
    data, mime = encode_frames(frames, OutputOptions(format="gif", frame_duration_ms=80))
    assert mime == "image/gif"
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 6
    assert gif.info["duration"] == 80
    assert gif.info["loop"] == 0
    once = Image.open(io.BytesIO(encode_frames(frames, OutputOptions(format="gif", loop=False))[0]))
    assert "loop" not in once.info


def test_mp4_decodes_to_the_frame_count_and_pads_odd_sizes() -> None:
    frames = gradient_frames(5, size=(63, 65))
    data, mime = encode_frames(frames, OutputOptions(format="mp4", frame_duration_ms=100))
    assert mime == "video/mp4"
    video = iio.imread(data, extension=".mp4")
    assert video.shape == (5, 66, 64, 3)  # padded to even sizes, not rescaled
    # Colour survives H.264 roughly: the first frame is blue, the last red.
    assert video[0, 10:20, 40:50, 2].mean() > 150 and video[-1, 10:20, 40:50, 0].mean() > 150


def test_tiny_mp4_works() -> None:
    data, _ = encode_frames(gradient_frames(2, size=(8, 8)), OutputOptions(format="mp4"))
    assert iio.imread(data, extension=".mp4").shape[0] == 2


def test_frames_zip_and_png_parts_are_lossless() -> None:
    frames = gradient_frames(3)
    data, mime = encode_frames(frames, OutputOptions(format="frames-zip"))
    assert mime == "application/zip"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["frame_000.png", "frame_001.png", "frame_002.png"]
        for name, frame in zip(archive.namelist(), frames):
            decoded = Image.open(io.BytesIO(archive.read(name)))
            assert np.array_equal(np.asarray(decoded), np.asarray(frame))
    parts = encode_parts(frames, OutputOptions(format="png"))
    assert [p.name for p in parts] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert all(p.mime == "image/png" for p in parts)
    assert parts[1].data == encode_png(frames[1])
    # As one blob, png is the ZIP of PNGs.
    assert encode_frames(frames, OutputOptions(format="png"))[1] == "application/zip"


def test_frame_names_sort_in_order() -> None:
    names = [frame_name(i, 1200) for i in range(1200)]
    assert names == sorted(names) and names[7] == "frame_0007.png"


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no frames"):
        encode_parts([], OutputOptions())
    mixed = [Image.new("RGB", (8, 8)), Image.new("RGB", (16, 16))]
    with pytest.raises(ConfigError, match="same size"):
        encode_parts(mixed, OutputOptions())
    with pytest.raises(ConfigError, match="format"):
        OutputOptions(format="webm")


# ---------------------------------------------------------------------------- animated WebP
def webp_frames(data: bytes) -> tuple[list[np.ndarray], Image.Image]:
    """Every frame of an animated WebP as RGB arrays, and the opened image (for its info)."""
    webp = Image.open(io.BytesIO(data))
    assert webp.format == "WEBP"
    frames = []
    for index in range(webp.n_frames):
        webp.seek(index)
        frames.append(np.asarray(webp.convert("RGB")))
    return frames, webp


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse) if mse else float("inf")


def test_webp_holds_every_frame_at_its_size_with_duration_and_loop() -> None:
    frames = gradient_frames(7, size=(48, 40))
    data, mime = encode_frames(frames, OutputOptions(format="webp", frame_duration_ms=80))
    assert mime == "image/webp" and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    decoded, webp = webp_frames(data)
    assert webp.is_animated and webp.n_frames == 7
    assert all(frame.shape == (40, 48, 3) for frame in decoded)
    webp.seek(0)
    webp.load()
    assert webp.info["duration"] == 80 and webp.info["loop"] == 0  # 0 = forever
    once = Image.open(io.BytesIO(encode_frames(frames, OutputOptions(format="webp", loop=False))[0]))
    assert once.info["loop"] == 1  # WebP counts plays: once
    (part,) = encode_parts(frames, OutputOptions(format="webp"))
    assert (part.name, part.mime) == ("morph.webp", "image/webp")


def test_lossless_webp_gives_back_every_pixel() -> None:
    frames = gradient_frames(5)
    data, _ = encode_frames(frames, OutputOptions(format="webp", webp_lossless=True))
    decoded, _ = webp_frames(data)
    assert len(decoded) == 5
    for original, back in zip(frames, decoded):
        assert np.array_equal(np.asarray(original), back)


def textured_frames(count: int, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    """Frames like a morph's: one smooth random picture blending into another, with fine grain
    (flat gradients are what lossless coding wins on; pictures are what lossy coding is for)."""
    rng = np.random.default_rng(0)
    ends = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC),
                       dtype=np.float64) for _ in range(2)]
    grain = rng.normal(0.0, 6.0, (size[1], size[0], 3))
    frames = []
    for index in range(count):
        t = index / max(count - 1, 1)
        frames.append(Image.fromarray(np.clip((1 - t) * ends[0] + t * ends[1] + grain, 0, 255).astype(np.uint8)))
    return frames


def test_lossy_webp_is_smaller_than_lossless_and_close_to_the_frames() -> None:
    """Measured with libwebp 1.6 on these 6 frames of 64 px: lossless 50.9 KB (the GIF 27.5 KB);
    lossy at 80 (the default) 6.4 KB, every frame at 30.5-31.0 dB PSNR; at 20 2.8 KB, 26.0-26.7 dB."""
    frames = textured_frames(6)
    lossless = encode_frames(frames, OutputOptions(format="webp", webp_lossless=True))[0]
    sizes, worst = {}, {}
    for quality in (20, 80):
        data = encode_frames(frames, OutputOptions(format="webp", webp_quality=quality))[0]
        decoded, _ = webp_frames(data)
        assert len(decoded) == 6
        sizes[quality] = len(data)
        worst[quality] = min(psnr_db(np.asarray(a), b) for a, b in zip(frames, decoded))
    assert sizes[80] < 0.25 * len(lossless) and sizes[20] < 0.6 * sizes[80]
    assert 29.0 < worst[80] < 40.0 and 24.0 < worst[20] < worst[80] - 3.0


@pytest.mark.parametrize(("value", "message"), [
    (101, "webp_quality must be between 0 and 100, got 101"),
    (-1, "webp_quality must be between 0 and 100, got -1"),
    ("80", "webp_quality must be an integer, got '80'"),
    (True, "webp_quality must be an integer, got True"),
])  # fmt: skip
def test_a_webp_quality_out_of_range_is_refused_naming_the_bounds(value, message) -> None:
    with pytest.raises(ConfigError) as caught:
        OutputOptions(format="webp", webp_quality=value)
    assert str(caught.value) == message
    with pytest.raises(ConfigError, match="webp_lossless must be true or false"):
        OutputOptions(format="webp", webp_lossless="yes")
    assert OutputOptions(webp_quality=0).webp_quality == 0 and OutputOptions(webp_quality=100).webp_quality == 100
