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
